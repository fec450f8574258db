"""Logging benchmarks: one record through a StreamHandler, inside a span, with a format that prints the ids.

Variants: bare logging (the ids come from Formatter defaults, so the format
work is the same), OpenTelemetry's LoggingInstrumentor(inject_trace_context=True),
and threadctx.ContextFilter on the handler.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from opentelemetry.instrumentation.logging import LoggingInstrumentor
from opentelemetry.sdk.trace import TracerProvider

import threadctx
from benchmarks.harness import Result, compare

PROVIDER = TracerProvider()
TRACER = PROVIDER.get_tracer("bench")
FORMAT = "%(asctime)s %(levelname)s [trace_id=%(tid)s span_id=%(sid)s request_id=%(request_id)s] %(message)s"
BASELINE = "bare logging"


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
    "threadctx.ContextFilter": _logger("filter", "trace_id", "span_id", {}, threadctx.ContextFilter()),
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


def added_cost_line(results: list[Result]) -> str:
    by = {r.name: r for r in results}
    bare = by[BASELINE].per_call_ns
    filter_added = by["threadctx.ContextFilter"].per_call_ns - bare
    instrumentor_added = by["LoggingInstrumentor"].per_call_ns - bare
    return (
        f"Added cost per record: ContextFilter {filter_added:,.0f} ns, "
        f"LoggingInstrumentor {instrumentor_added:,.0f} ns; "
        f"ratio {filter_added / instrumentor_added:.2f}x (target: at most 0.40x). "
        f"A record with the filter: {by['threadctx.ContextFilter'].ratio:.2f}x a bare record "
        "(target: at most 1.10x)."
    )


def run_all() -> list[tuple[str, list[Result], str]]:
    single = compare({name: _single(name) for name in LOGGERS}, baseline=BASELINE, loops=20_000, rounds=21)
    threaded = compare(
        {name: _threaded(name) for name in LOGGERS}, baseline=BASELINE, loops=40_000, rounds=11
    )
    return [
        ("one thread: logger.info to a StreamHandler, inside a span", single, added_cost_line(single)),
        ("8 threads through one handler (time per record)", threaded, added_cost_line(threaded)),
    ]
