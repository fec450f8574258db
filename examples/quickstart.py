"""The README's quick start, runnable: two threads, each logging with its own ids."""

import os

os.environ.setdefault("OTEL_PYTHON_CONTEXT", "threadctx")  # 1. before OpenTelemetry is imported

import logging
import threading

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

import threadctx

trace.set_tracer_provider(TracerProvider())
tracer = trace.get_tracer("quickstart")

# 2. The filter goes on the handler (a logger's filters miss its child loggers' records).
handler = logging.StreamHandler()
handler.setFormatter(
    logging.Formatter("%(threadName)s trace_id=%(trace_id)s request_id=%(request_id)s %(message)s")
)
# A line logged outside a request has no request_id bound: `defaults` gives it "-".
handler.addFilter(threadctx.ContextFilter(defaults={"request_id": "-"}))
logging.basicConfig(level=logging.INFO, handlers=[handler])
log = logging.getLogger("app")


def handle(request_id: str) -> None:
    # 3. Each request: a span and its correlation IDs, restored on exit.
    with tracer.start_as_current_span("handle"), threadctx.bound(request_id=request_id):
        log.info("processing")


log.info("starting")  # MainThread trace_id=000...000 request_id=- starting
workers = [threading.Thread(target=handle, args=(f"req-{i}",), name=f"worker-{i}") for i in range(2)]
for worker in workers:
    worker.start()
for worker in workers:
    worker.join()
