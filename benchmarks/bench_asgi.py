"""ASGI benchmark: one HTTP request through a middleware, against the same app with none.

Variants: no middleware; asgi-correlation-id's ``CorrelationIdMiddleware``
(the most used ASGI correlation-id middleware), with its defaults; and
``threadctx.asgi.ContextMiddleware``. The app is a bare ASGI callable that
answers at once, so the difference is the middleware's own cost per request.
Both middlewares accept the incoming id (a UUID4, which asgi-correlation-id's
default validator wants), bind it and echo it in the response.

With a ``traceparent``, threadctx's middleware alone extracts the trace context
(asgi-correlation-id does not). In a service OpenTelemetry's middleware outside it
has extracted it already, and threadctx's then reads only the baggage; so that
table also times OpenTelemetry's extraction alone (``propagate.extract`` over the
scope with its ASGI getter, what ``OpenTelemetryMiddleware`` does per request),
and the target compares threadctx's added cost minus that extraction's.
"""

from __future__ import annotations

import asyncio
import statistics
import uuid
from collections.abc import Callable
from typing import Any

from asgi_correlation_id import CorrelationIdMiddleware
from opentelemetry import propagate
from opentelemetry.instrumentation.asgi import asgi_getter

from benchmarks.harness import Result, compare
from benchmarks.verdict import added, target_line
from threadctx.asgi import ContextMiddleware

BASELINE = "no middleware"
OURS = "threadctx.asgi.ContextMiddleware"
THEIRS = "asgi-correlation-id"
EXTRACTION = "OpenTelemetry's extraction alone"
REQUEST_ID = uuid.uuid4().hex.encode()
TRACEPARENT = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


async def app(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"ok"})


async def extraction(scope: Any, receive: Any, send: Any) -> None:
    """What OpenTelemetry's ASGI middleware does with the headers before its span, and the app."""
    propagate.extract(scope, getter=asgi_getter)
    await app(scope, receive, send)


APPS: dict[str, Any] = {
    BASELINE: app,
    THEIRS: CorrelationIdMiddleware(app),
    OURS: ContextMiddleware(app),
    EXTRACTION: extraction,
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
    by = {r.name: r.times for r in results}
    bare = by[BASELINE]
    ours, theirs = added(by[OURS], bare), added(by[THEIRS], bare)
    line = (
        f"Added cost per request (median of paired rounds): threadctx {statistics.median(ours):,.0f} ns, "
        f"asgi-correlation-id {statistics.median(theirs):,.0f} ns.\n\n- "
        + target_line("threadctx's added cost (A) / asgi-correlation-id's (B)", ours, theirs, 1.0)
    )
    if EXTRACTION in by:
        # Per round: threadctx's time minus the extraction's = threadctx's added cost minus the
        # extraction's added cost (the bare app's time cancels).
        beyond = added(by[OURS], by[EXTRACTION])
        extracting = statistics.median(added(by[EXTRACTION], bare))
        line += f"\n- OpenTelemetry's extraction alone adds {extracting:,.0f} ns. " + target_line(
            "threadctx's added cost less that extraction (done anyway under OpenTelemetry's middleware)"
            " (A) / asgi-correlation-id's (B)",
            beyond,
            theirs,
            1.0,
        )
    return line


def run_all() -> list[tuple[str, list[Result], str]]:
    out = []
    for title, headers, names in (
        ("a request with X-Request-ID", [(b"x-request-id", REQUEST_ID)], [BASELINE, THEIRS, OURS]),
        (
            "a request with X-Request-ID and traceparent (threadctx also extracts the trace context)",
            [(b"x-request-id", REQUEST_ID), (b"traceparent", TRACEPARENT)],
            list(APPS),
        ),
        ("a request without an id (both generate one)", [], [BASELINE, THEIRS, OURS]),
    ):
        results = compare(
            {name: _requests(name, headers) for name in names}, baseline=BASELINE, loops=2_000, rounds=41
        )
        out.append((title, results, added_cost_line(results)))
    return out
