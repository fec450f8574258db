"""A real service for the live-view tests: requests held in flight by events, threadz mounted.

    python tests/_live_service.py wsgi|asgi PORT

``wsgi``: waitress, threadctx's WSGI middleware; ``asgi``: uvicorn,
threadctx's ASGI middleware, the held requests on the loop's thread pool.
Both install the dump signal (for ``python -m threadctx top``) and mount
``threadctx.threadz`` at ``/threadz``. Routes:

- ``/hold?name=N[&span=S][&tenant=T][&nospan=1]``: serve a request until
  ``/release?name=N``; inside a span named S (``hold N``), with
  ``tenant`` bound if given (no span with ``nospan``);
- ``/inside?name=N``: answers once request N is held;
- ``/snapshot``: ``threadctx.snapshot()`` as JSON, as this process sees it.
"""

from __future__ import annotations

import os

os.environ.setdefault("OTEL_PYTHON_CONTEXT", "threadctx")  # before OpenTelemetry is imported

import asyncio
import contextlib
import json
import sys
import threading
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qs

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

import threadctx
from threadctx import threadz

trace.set_tracer_provider(TracerProvider())
tracer = trace.get_tracer("live-service")
WAIT = 120.0

_events: dict[tuple[str, str], threading.Event] = {}
_lock = threading.Lock()


def event(name: str, what: str) -> threading.Event:
    with _lock:
        return _events.setdefault((name, what), threading.Event())


def hold(query: dict[str, list[str]]) -> bytes:
    """Serve request ``name`` until it is released: the work the live views show."""
    name = query["name"][0]
    span_name = query.get("span", [f"hold {name}"])[0]
    ids = {"tenant": query["tenant"][0]} if "tenant" in query else {}
    with contextlib.ExitStack() as stack:
        if "nospan" not in query:
            stack.enter_context(tracer.start_as_current_span(span_name))
        stack.enter_context(threadctx.bound(**ids))
        event(name, "inside").set()
        event(name, "release").wait(WAIT)
    return b"released\n"


def snapshot_json() -> bytes:
    return json.dumps([entry.to_dict() for entry in threadctx.snapshot()]).encode()


def answer(path: str, query: dict[str, list[str]]) -> bytes:
    """Everything but /hold and /threadz: quick answers."""
    if path == "/release":
        event(query["name"][0], "release").set()
        return b"ok\n"
    if path == "/inside":
        return b"inside\n" if event(query["name"][0], "inside").wait(WAIT) else b"not inside\n"
    if path == "/snapshot":
        return snapshot_json()
    return b"hello\n"


def wsgi(port: int) -> None:
    from waitress.server import create_server

    from threadctx.wsgi import ContextMiddleware

    page = threadz.wsgi_app()

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        path, query = environ["PATH_INFO"], parse_qs(environ["QUERY_STRING"])
        if path.startswith("/threadz"):
            return page(environ, start_response)
        body = hold(query) if path == "/hold" else answer(path, query)
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]

    threadctx.install_dump_signal()
    server = create_server(ContextMiddleware(app), host="127.0.0.1", port=port, threads=8)
    print("ready", os.getpid(), flush=True)
    server.run()


def asgi(port: int) -> None:
    import uvicorn

    from threadctx.asgi import ContextMiddleware

    page = threadz.asgi_app()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan" or scope["path"].startswith("/threadz"):
            await page(scope, receive, send)
            return
        query = parse_qs(scope["query_string"].decode())
        if scope["path"] == "/hold":  # blocking work, on the loop's thread pool, in the request's context
            loop = asyncio.get_running_loop()
            body = await loop.run_in_executor(None, _in_context(hold, query))
        else:
            body = await asyncio.to_thread(answer, scope["path"], query)
        headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    config = uvicorn.Config(ContextMiddleware(app), host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    threadctx.install_dump_signal()
    print("ready", os.getpid(), flush=True)
    server.run()


def _in_context(function: Any, *args: Any) -> Any:
    import contextvars

    context = contextvars.copy_context()
    return lambda: context.run(function, *args)


def main(argv: list[str]) -> None:
    kind, port = argv[0], int(argv[1])
    (wsgi if kind == "wsgi" else asgi)(port)


if __name__ == "__main__":
    main(sys.argv[1:])
