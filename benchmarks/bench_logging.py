"""Logging benchmarks: records through a StreamHandler, with a format that prints the ids.

Variants: bare logging (the ids come from Formatter defaults, so the format
work is the same), OpenTelemetry's LoggingInstrumentor(inject_trace_context=True),
and threadctx.ContextFilter on the handler (with ``defaults=``, as the quick start
configures it). The floor: a filter that sets the same fields to constants (what any
filter costs at least: a call and a dict update). Long-lived spans (one span, many records: the filter's cache
hits), and short requests (a new span every 4 records, and every record: the
cache misses), where each variant starts the same spans and binds the same ids.
"""

from __future__ import annotations

import logging
import os
import statistics
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from opentelemetry.instrumentation.logging import LoggingInstrumentor
from opentelemetry.sdk.trace import TracerProvider

import threadctx
from benchmarks.harness import Result, compare
from benchmarks.verdict import added, ratio_text, target_line

PROVIDER = TracerProvider()
TRACER = PROVIDER.get_tracer("bench")
FORMAT = "%(asctime)s %(levelname)s [trace_id=%(tid)s span_id=%(sid)s request_id=%(request_id)s] %(message)s"
BASELINE = "bare logging"
FILTER = "threadctx.ContextFilter"
FLOOR = "floor: a filter setting constant fields"


class ConstantFilter(logging.Filter):
    """The floor: the same fields as ContextFilter's, constants, one dict update per record."""

    FIELDS = {  # noqa: RUF012 - read only
        "trace_id": "0af7651916cd43dd8448eb211c80319c",
        "span_id": "b7ad6b7169203331",
        "trace_flags": "01",
        "trace_sampled": True,
        "request_id": "r-0000001",
    }

    def filter(self, record: logging.LogRecord) -> bool:
        record.__dict__.update(self.FIELDS)
        return True


def _logger(
    name: str, tid: str, sid: str, defaults: dict[str, str], filt: logging.Filter | None
) -> logging.Logger:
    fmt = FORMAT.replace("%(tid)s", f"%({tid})s").replace("%(sid)s", f"%({sid})s")
    handler = logging.StreamHandler(open(os.devnull, "w"))  # noqa: SIM115 - lives as long as the benchmark
    handler.setFormatter(logging.Formatter(fmt, defaults=defaults))
    if filt is not None:
        handler.addFilter(filt)
    logger = logging.getLogger(f"bench.{name}")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger


REQUEST_ID = {"request_id": "r-0000001"}
LOGGERS = {
    # The ids come from Formatter defaults, so the format work is the same as with the others.
    "bare logging": _logger(
        "bare", "trace_id", "span_id", {**REQUEST_ID, "trace_id": "0" * 32, "span_id": "0" * 16}, None
    ),
    # The ids come from the instrumentor's record factory; request_id from the same default.
    "LoggingInstrumentor": _logger("instrumentor", "otelTraceID", "otelSpanID", REQUEST_ID, None),
    # The same Formatter defaults as the instrumentor's variant (the filter sets request_id itself):
    # a Formatter with defaults merges them into every record's attributes, and all pay for that.
    FILTER: _logger(
        "filter", "trace_id", "span_id", REQUEST_ID, threadctx.ContextFilter(defaults={"request_id": "-"})
    ),
    FLOOR: _logger("floor", "trace_id", "span_id", REQUEST_ID, ConstantFilter()),
}


@contextmanager
def _instrumented(name: str) -> Iterator[None]:
    """LoggingInstrumentor's record factory, installed only while its own variant runs."""
    if name != "LoggingInstrumentor":
        yield
        return
    instrumentor = LoggingInstrumentor()
    instrumentor.instrument(inject_trace_context=True, tracer_provider=PROVIDER)
    try:
        yield
    finally:
        instrumentor.uninstrument()


def _single(name: str) -> Callable[[int], None]:
    logger = LOGGERS[name]

    def run(loops: int) -> None:
        with (
            _instrumented(name),
            TRACER.start_as_current_span("request"),
            threadctx.bound(request_id="r-0000001"),
        ):
            for _ in range(loops):
                logger.info("handled")

    return run


def _threaded(name: str, threads: int = 8) -> Callable[[int], None]:
    def run(loops: int) -> None:
        per_thread = max(loops // threads, 1)
        barrier = threading.Barrier(threads)
        logger = LOGGERS[name]

        def work() -> None:
            with TRACER.start_as_current_span("request"), threadctx.bound(request_id="r-0000001"):
                barrier.wait()
                for _ in range(per_thread):
                    logger.info("handled")

        with _instrumented(name):
            workers = [threading.Thread(target=work) for _ in range(threads)]
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join()

    return run


SHORT_NOTE = (
    "\n\nWhere every record sees a context the filter has not seen, it does what the instrumentor"
    " does for every record (look up the span, format both ids in hex) and adds the correlation IDs"
    " and its defaults, once per context; the cache pays off from the second record in a context."
    " It holds contexts by weak reference (a request's context and spans are freed when it ends;"
    " the reference costs one small allocation per new context)."
)


def _short_requests(name: str, per_span: int) -> Callable[[int], None]:
    """Requests of ``per_span`` records each: a new span and a new request id binding per request."""
    logger = LOGGERS[name]

    def run(loops: int) -> None:
        with _instrumented(name):
            for _ in range(max(loops // per_span, 1)):
                with TRACER.start_as_current_span("request"), threadctx.bound(request_id="r-0000001"):
                    for _ in range(per_span):
                        logger.info("handled")

    return run


def added_cost_line(results: list[Result], target: float = 0.40, record_target: float | None = 1.10) -> str:
    """The filter's, the floor's and the instrumentor's added cost per record, with verdicts.

    Added costs are paired within each round (every variant ran under the same load), and each
    ratio comes with its bootstrap interval over the rounds (see ``benchmarks.verdict``).
    """
    by = {r.name: r.times for r in results}
    bare = by[BASELINE]
    filt, instr, floor = (added(by[name], bare) for name in (FILTER, "LoggingInstrumentor", FLOOR))
    median = {name: statistics.median(values) for name, values in (("f", filt), ("i", instr), ("0", floor))}
    lines = [
        f"Added cost per record (median of paired rounds): ContextFilter {median['f']:,.0f} ns, "
        f"LoggingInstrumentor {median['i']:,.0f} ns, the floor {median['0']:,.0f} ns.",
        "",
        "- " + target_line("ContextFilter's added cost (A) / LoggingInstrumentor's (B)", filt, instr, target),
        f"- The floor's added cost / LoggingInstrumentor's: {ratio_text(floor, instr)}.",
    ]
    if record_target is not None:
        lines.append(
            "- "
            + target_line("A record with the filter (A) / a bare record (B)", by[FILTER], bare, record_target)
        )
    lines.append(f"- A record with the floor / a bare record: {ratio_text(by[FLOOR], bare)}.")
    return "\n".join(lines)


def run_all() -> list[tuple[str, list[Result], str]]:
    single = compare({name: _single(name) for name in LOGGERS}, baseline=BASELINE, loops=10_000, rounds=41)
    threaded = compare(
        {name: _threaded(name) for name in LOGGERS}, baseline=BASELINE, loops=16_000, rounds=21
    )
    every_4 = compare(
        {name: _short_requests(name, 4) for name in LOGGERS}, baseline=BASELINE, loops=8_000, rounds=41
    )
    every_1 = compare(
        {name: _short_requests(name, 1) for name in LOGGERS}, baseline=BASELINE, loops=4_000, rounds=41
    )
    return [
        ("one thread: logger.info to a StreamHandler, inside a span", single, added_cost_line(single)),
        ("8 threads through one handler (time per record)", threaded, added_cost_line(threaded)),
        (
            "short requests: a new span and request id every 4 records (time per record)",
            every_4,
            added_cost_line(every_4, target=0.50, record_target=None),
        ),
        (
            "short requests: a new span and request id for every record (time per record)",
            every_1,
            added_cost_line(every_1, target=0.50, record_target=None) + SHORT_NOTE,
        ),
    ]
