"""A request hands CPU work to a process pool; the child process logs with the request's ids.

The context crosses as W3C headers (``traceparent`` plus the correlation IDs),
under the ``spawn`` start method here, as under ``fork`` and ``forkserver``.

Run: ``OTEL_PYTHON_CONTEXT=threadctx python examples/process_pool.py``
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys

os.environ.setdefault("OTEL_PYTHON_CONTEXT", "threadctx")  # before OpenTelemetry is imported (children too)

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

import threadctx

FORMAT = "pid=%(process)d trace_id=%(trace_id)s request_id=%(request_id)s tenant=%(tenant)s %(message)s"
log = logging.getLogger("example")


def configure_logging() -> None:
    """Run in the parent and, as the pool's initializer, in every child."""
    handler = logging.StreamHandler(sys.stdout)
    handler.addFilter(threadctx.ContextFilter())
    handler.setFormatter(logging.Formatter(FORMAT, defaults={"request_id": "-", "tenant": "-"}))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)


def crunch(n: int) -> tuple[str, dict[str, str]]:
    """CPU work in a child process; returns what the child saw, for the check below."""
    log.info("crunching %d: %d", n, sum(i * i for i in range(n)))
    trace_id = format(trace.get_current_span().get_span_context().trace_id, "032x")
    return trace_id, dict(threadctx.correlation())


def main() -> int:
    configure_logging()
    trace.set_tracer_provider(TracerProvider())
    tracer = trace.get_tracer("examples.process_pool")
    spawn = multiprocessing.get_context("spawn")
    wrong = 0
    with threadctx.ContextProcessPoolExecutor(
        max_workers=2, mp_context=spawn, initializer=configure_logging
    ) as pool:
        for index in range(3):
            with (
                tracer.start_as_current_span("request") as span,
                threadctx.bound(request_id=f"req-{index}", tenant="acme"),
            ):
                log.info("sending work to the process pool")
                seen = pool.submit(crunch, 10_000 * (index + 1)).result()
                expected = (
                    format(span.get_span_context().trace_id, "032x"),
                    {"request_id": f"req-{index}", "tenant": "acme"},
                )
                wrong += seen != expected
    print(f"tasks that ran with another context: {wrong}")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
