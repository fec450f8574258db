"""A FastAPI service whose every log line carries its request's trace and request id.

Run it under uvicorn, then call it::

    OTEL_PYTHON_CONTEXT=threadctx uvicorn fastapi_app:app --app-dir examples --port 8000
    curl -H 'X-Request-ID: r-1' http://127.0.0.1:8000/sync/one

Async and sync endpoints, a sync dependency, Starlette's ``run_in_threadpool``,
background tasks (which run after the response), streaming bodies and a
websocket: each logs, and each line carries its own request's ids.

Environment: ``THREADCTX_EXAMPLE_SPANS=FILE`` writes every finished span to
FILE as a JSON line; ``THREADCTX_EXAMPLE_INSTRUMENT=1`` adds OpenTelemetry's
``FastAPIInstrumentor`` (its SERVER span, named after the route, is then the
parent of everything the request does).
"""

from __future__ import annotations

import os

os.environ.setdefault("OTEL_PYTHON_CONTEXT", "threadctx")  # before OpenTelemetry is imported

import asyncio
import logging
import sys
from collections.abc import AsyncIterator, Iterator

from fastapi import BackgroundTasks, Depends, FastAPI, WebSocket
from fastapi.responses import StreamingResponse
from opentelemetry import trace
from span_file import configure_tracing
from starlette.concurrency import run_in_threadpool

import threadctx
from threadctx.asgi import ContextMiddleware

FORMAT = "trace=%(trace_id)s span=%(span_id)s request_id=%(request_id)s %(message)s"

log = logging.getLogger("service")


def configure() -> None:
    """The set-up a service does once: a tracer provider, and the filter on the handler."""
    configure_tracing()
    handler = logging.StreamHandler(sys.stdout)
    handler.addFilter(threadctx.ContextFilter())
    handler.setFormatter(logging.Formatter(FORMAT, defaults={"request_id": "-"}))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


configure()
tracer = trace.get_tracer("examples.fastapi_app")
app = FastAPI()
app.add_middleware(ContextMiddleware)  # inside FastAPIInstrumentor's middleware, in either order
if os.environ.get("THREADCTX_EXAMPLE_INSTRUMENT") == "1":
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    FastAPIInstrumentor.instrument_app(app)


def work(name: str) -> None:
    """Blocking work, run on Starlette's thread pool."""
    with tracer.start_as_current_span("work"):
        log.info("threadpool %s", name)


def sync_dependency(name: str) -> str:
    """A sync dependency: FastAPI runs it on its thread pool."""
    log.info("dependency %s", name)
    return name


async def after_async(name: str) -> None:
    await asyncio.sleep(0)  # let other requests interleave
    log.info("background %s", name)


def after_sync(name: str) -> None:
    log.info("background %s", name)


@app.get("/async/{name}")
async def async_endpoint(name: str, tasks: BackgroundTasks) -> dict[str, str]:
    log.info("async %s", name)
    await run_in_threadpool(work, name)
    tasks.add_task(after_async, name)
    return {"request_id": threadctx.correlation()["request_id"]}


@app.get("/sync/{name}")
def sync_endpoint(tasks: BackgroundTasks, name: str = Depends(sync_dependency)) -> dict[str, str]:
    log.info("sync %s", name)
    work(name)
    tasks.add_task(after_sync, name)
    return {"request_id": threadctx.correlation()["request_id"]}


@app.get("/stream/{name}")
async def stream_endpoint(name: str) -> StreamingResponse:
    async def chunks() -> AsyncIterator[bytes]:
        for index in range(2):
            await asyncio.sleep(0)
            log.info("stream %s chunk %d", name, index)
            yield f"{name}:{index}\n".encode()

    return StreamingResponse(chunks(), media_type="text/plain")


@app.get("/stream-sync/{name}")
def stream_sync_endpoint(name: str) -> StreamingResponse:
    def chunks() -> Iterator[bytes]:  # Starlette iterates it on its thread pool
        for index in range(2):
            log.info("stream-sync %s chunk %d", name, index)
            yield f"{name}:{index}\n".encode()

    return StreamingResponse(chunks(), media_type="text/plain")


@app.websocket("/ws/{name}")
async def websocket_endpoint(websocket: WebSocket, name: str) -> None:
    await websocket.accept()
    text = await websocket.receive_text()
    log.info("websocket %s got %s", name, text)
    await websocket.send_text(threadctx.correlation()["request_id"])
    await websocket.close()
