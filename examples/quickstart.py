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

# 2. The filter goes on the handler.
handler = logging.StreamHandler()
handler.setFormatter(
    logging.Formatter("%(threadName)s trace_id=%(trace_id)s request_id=%(request_id)s %(message)s")
)
handler.addFilter(threadctx.ContextFilter(defaults={"request_id": "-"}))  # "-" outside a request
logging.basicConfig(level=logging.INFO, handlers=[handler])
log = logging.getLogger("app")


def handle(request_id: str) -> None:
    # 3. Each request: a span and its correlation IDs.
    with tracer.start_as_current_span("handle"), threadctx.bound(request_id=request_id):
        log.info("processing")


threads = [threading.Thread(target=handle, args=(f"req-{i}",), name=f"worker-{i}") for i in range(2)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
