"""ASGI benchmark: one HTTP request through a middleware, against the same app with none.

Variants: no middleware; asgi-correlation-id's ``CorrelationIdMiddleware``
(the most used ASGI correlation-id middleware), with its defaults; and
``threadctx.asgi.ContextMiddleware``. The app is a bare ASGI callable that
answers at once, so the difference is the middleware's own cost per request.
Both middlewares accept the incoming id (a UUID4, which asgi-correlation-id's
default validator wants), bind it and echo it in the response.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

from asgi_correlation_id import CorrelationIdMiddleware

from benchmarks.harness import Result, compare
from threadctx.asgi import ContextMiddleware

BASELINE = "no middleware"
REQUEST_ID = uuid.uuid4().hex.encode()
TRACEPARENT = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


async def app(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"ok"})


APPS: dict[str, Any] = {
    BASELINE: app,
    "asgi-correlation-id": CorrelationIdMiddleware(app),
    "threadctx.asgi.ContextMiddleware": ContextMiddleware(app),
}


async def _receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


async def _send(message: Any) -> None:
    return None


def _requests(name: str, headers: list[tuple[bytes, bytes]]) -> Callable[[int], None]:
    target = APPS[name]

    async def serve(loops: int) -> None:
        for _ in range(loops):
            scope = {"type": "http", "method": "GET", "path": "/", "headers": list(headers)}
            await target(scope, _receive, _send)

    def run(loops: int) -> None:
        asyncio.run(serve(loops))

    return run


def added_cost_line(results: list[Result]) -> str:
    by = {r.name: r for r in results}
    bare = by[BASELINE].per_call_ns
    ours = by["threadctx.asgi.ContextMiddleware"].per_call_ns - bare
    theirs = by["asgi-correlation-id"].per_call_ns - bare
    return (
        f"Added cost per request: threadctx {ours:,.0f} ns, asgi-correlation-id {theirs:,.0f} ns; "
        f"ratio {ours / theirs:.2f}x (target: at most 1.0x)."
    )


def run_all() -> list[tuple[str, list[Result], str]]:
    out = []
    for title, headers in (
        ("a request with X-Request-ID", [(b"x-request-id", REQUEST_ID)]),
        (
            "a request with X-Request-ID and traceparent (threadctx also extracts the trace context)",
            [(b"x-request-id", REQUEST_ID), (b"traceparent", TRACEPARENT)],
        ),
        ("a request without an id (both generate one)", []),
    ):
        results = compare(
            {name: _requests(name, headers) for name in APPS}, baseline=BASELINE, loops=5_000, rounds=15
        )
        out.append((title, results, added_cost_line(results)))
    return out
