"""Requests fan work out to thread pools; every line carries the request that caused it.

Two ways, side by side:

* ``threadctx.ContextThreadPoolExecutor``: a pool that carries the submitter's context;
* ``threadctx.instrument_threading()``: every ``ThreadPoolExecutor``, ``Thread`` and ``Timer``
  in the process does, including those inside libraries you do not control.

Run: ``OTEL_PYTHON_CONTEXT=threadctx python examples/thread_pool.py``
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("OTEL_PYTHON_CONTEXT", "threadctx")  # before OpenTelemetry is imported

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

import threadctx

trace.set_tracer_provider(TracerProvider())
tracer = trace.get_tracer("examples.thread_pool")
handler = logging.StreamHandler(sys.stdout)
handler.addFilter(threadctx.ContextFilter())
handler.setFormatter(
    logging.Formatter("%(threadName)-9s trace_id=%(trace_id)s request_id=%(request_id)s %(message)s")
)
logging.basicConfig(level=logging.INFO, handlers=[handler])
log = logging.getLogger("example")

context_pool = threadctx.ContextThreadPoolExecutor(max_workers=2, thread_name_prefix="ctxpool")
threadctx.instrument_threading()  # from here on, plain pools, threads and timers carry the context too
plain_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="plain")


def pooled(where: str) -> str | None:
    log.info("in %s", where)
    return threadctx.correlation().get("request_id")


def handle(request_id: str, results: dict[str, list[str | None]]) -> None:
    """One request: a span, a request id, and work in two pools and a thread."""
    with tracer.start_as_current_span("handle"), threadctx.bound(request_id=request_id):
        log.info("request received")
        results[request_id] = [
            context_pool.submit(pooled, "ContextThreadPoolExecutor").result(),
            plain_pool.submit(pooled, "a plain ThreadPoolExecutor").result(),
        ]
        helper = threading.Thread(target=pooled, args=("a plain Thread",), name="helper")
        helper.start()
        helper.join()


if __name__ == "__main__":
    results: dict[str, list[str | None]] = {}
    requests = [
        threading.Thread(target=handle, args=(f"req-{i}", results), name=f"request-{i}") for i in range(3)
    ]
    for thread in requests:
        thread.start()
    for thread in requests:
        thread.join()
    wrong = [request for request, seen in results.items() if seen != [request, request]]
    print(f"requests={len(results)} tasks that saw another request's id: {len(wrong)}")
    sys.exit(1 if wrong or len(results) != len(requests) else 0)
