"""The request path with and without a watchdog running, side by side in one process.

A request: a span, a bound request id and one log record through ContextFilter.
Eight other threads are inside requests (blocked), so that every look of the
watchdog describes nine threads.  The watchdog variants start it before their
loop and stop it after (inside the timed part: the comparison leans against
the watchdog), looking every 100 ms and every 10 ms: far more often than a
real one, which looks every quarter of its threshold (7.5 s by default).
"""

from __future__ import annotations

import logging
import os
import statistics
import threading
import time
from collections.abc import Callable

from opentelemetry.sdk.trace import TracerProvider

import threadctx
from benchmarks.harness import Result, compare

TRACER = TracerProvider().get_tracer("bench")
BASELINE = "no watchdog"
BUSY_THREADS = 8


def _logger() -> logging.Logger:
    handler = logging.StreamHandler(open(os.devnull, "w"))  # noqa: SIM115 - lives as long as the benchmark
    handler.setFormatter(logging.Formatter("%(trace_id)s %(request_id)s %(message)s"))
    handler.addFilter(threadctx.ContextFilter())
    logger = logging.getLogger("bench.watchdog")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger


LOGGER = _logger()


def _requests(interval: float | None) -> Callable[[int], None]:
    def run(loops: int) -> None:
        watchdog = None if interval is None else threadctx.start_watchdog(threshold=3600, interval=interval)
        try:
            for _ in range(loops):
                with TRACER.start_as_current_span("request"), threadctx.bound(request_id="r-0000001"):
                    LOGGER.info("handled")
        finally:
            if watchdog is not None:
                watchdog.stop()

    return run


def _serve(inside: threading.Barrier, release: threading.Event) -> None:
    with TRACER.start_as_current_span("long request"), threadctx.bound(request_id="r-busy"):
        inside.wait()
        release.wait()


def run_all() -> list[tuple[str, list[Result], str]]:
    inside, release = threading.Barrier(BUSY_THREADS + 1), threading.Event()
    busy = [threading.Thread(target=_serve, args=(inside, release)) for _ in range(BUSY_THREADS)]
    for thread in busy:
        thread.start()
    inside.wait()
    try:
        results = compare(
            {
                BASELINE: _requests(None),
                "watchdog, a look every 100 ms": _requests(0.1),
                "watchdog, a look every 10 ms": _requests(0.01),
            },
            baseline=BASELINE,
            loops=3_000,
            rounds=31,
        )
        look_ns = _one_look_ns()
    finally:
        release.set()
        for thread in busy:
            thread.join()
    share = look_ns / 0.1e9
    return [
        (
            f"a request (span, bound id, one log record) with {BUSY_THREADS} other threads busy",
            results,
            "Target: at most 1.02x with a look every 100 ms. One look (the watchdog's check of "
            f"{BUSY_THREADS + 1} threads, all in spans) takes {look_ns / 1000:,.1f} µs of the GIL: "
            f"{share:.3%} of the time at a look every 100 ms, {look_ns / 7.5e9:.5%} at the default "
            "(7.5 s).",
        )
    ]


def _one_look_ns(looks: int = 2_000) -> float:
    """The median time of one look of a watchdog that never finds a stuck span."""
    watchdog = threadctx.start_watchdog(threshold=3600, interval=3600)  # looks only when told
    try:
        times = []
        for _ in range(looks):
            start = time.perf_counter_ns()
            watchdog._check()
            times.append(time.perf_counter_ns() - start)
    finally:
        watchdog.stop()
    return statistics.median(times)


if __name__ == "__main__":
    from benchmarks.harness import table

    for title, rows, target in run_all():
        print(table(title, rows, target=target))
