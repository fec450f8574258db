"""ASGI middleware: each request runs in its caller's context, with a request id.

A plain ASGI 3 middleware, with no framework dependency: FastAPI,
Starlette, Django's ASGI handler, anything a server such as uvicorn serves::

    from threadctx.asgi import ContextMiddleware

    app.add_middleware(ContextMiddleware)  # FastAPI, Starlette
    app = ContextMiddleware(app)  # any ASGI application

The request's context is the task's context, so it reaches the code the
framework runs on worker threads (FastAPI's sync endpoints and
dependencies, Starlette's ``run_in_threadpool``), background tasks that run
after the response, and every message of a streaming response.

Beside OpenTelemetry, put this middleware inside OpenTelemetry's, so that
OpenTelemetry starts the SERVER span from the incoming headers and this one
binds the request id under it. ``FastAPIInstrumentor`` puts its middleware
outside the whole middleware stack, so ``app.add_middleware(ContextMiddleware)``
is inside it in either order; ``ContextMiddleware(instrumented_app)`` is
not, and warns.

.. versionadded:: 0.1.0
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry.propagators.textmap import Getter

from threadctx._propagation import context_header_keys
from threadctx._requests import (
    RequestPolicy,
    asgi_instrumentor_outside,
    is_async_callable,
    names_carry_context,
    new_request_id,
    warn_outside,
)

__all__ = ["ContextMiddleware", "ScopeGetter", "new_request_id"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_SERVED = frozenset({"http", "websocket"})
#: The messages that carry the response's headers (a websocket refused with an HTTP response
#: too: the ASGI "websocket denial response" extension).
_STARTS = frozenset({"http.response.start", "websocket.accept", "websocket.http.response.start"})


class ScopeGetter(Getter[Scope]):
    """Reads HTTP headers from an ASGI scope, for :func:`threadctx.extract`.

    .. versionadded:: 0.1.0
    """

    def get(self, carrier: Scope, key: str) -> list[str] | None:
        """The values of header ``key`` (any case), or ``None``."""
        name = key.lower().encode("latin-1")
        values = [value.decode("latin-1") for header, value in _headers(carrier) if header.lower() == name]
        return values or None

    def keys(self, carrier: Scope) -> list[str]:
        """The names of the request's HTTP headers, lowercase."""
        return [header.decode("latin-1").lower() for header, _ in _headers(carrier)]


def _headers(scope: Scope) -> Iterable[tuple[bytes, bytes]]:
    headers: Iterable[tuple[bytes, bytes]] = scope.get("headers") or ()
    return headers


class _HeadersGetter(Getter[dict[str, list[str]]]):
    """Reads the headers of one request, gathered once by name (the middleware's own getter)."""

    def get(self, carrier: dict[str, list[str]], key: str) -> list[str] | None:
        return carrier.get(key.lower())

    def keys(self, carrier: dict[str, list[str]]) -> list[str]:
        return list(carrier)


def _gathered(headers: Iterable[tuple[bytes, bytes]]) -> dict[str, list[str]]:
    gathered: dict[str, list[str]] = {}
    for name, value in headers:
        gathered.setdefault(name.decode("latin-1").lower(), []).append(value.decode("latin-1"))
    return gathered


@functools.lru_cache(maxsize=256)  # the few names asked for, again and again
def _raw_name(header: str) -> bytes:
    return header.lower().encode("latin-1")


class _RawGetter(Getter[dict[bytes, bytes]]):
    """Reads the headers of one request from its raw headers as a dict (each name once, lowercase)."""

    def get(self, carrier: dict[bytes, bytes], key: str) -> list[str] | None:
        value = carrier.get(_raw_name(key))
        return None if value is None else [value.decode("latin-1")]

    def keys(self, carrier: dict[bytes, bytes]) -> list[str]:
        return [name.decode("latin-1") for name in carrier]


_GETTER = _HeadersGetter()
_RAW_GETTER = _RawGetter()


def _carrier(headers: Iterable[tuple[bytes, bytes]]) -> tuple[Any, Getter[Any], bool]:
    """The request's headers as a carrier, its getter, and whether they carry a context."""
    if isinstance(headers, (list, tuple)):
        raw = dict(headers)
        # Each name once and in lowercase, as servers send them: the raw dict serves, nothing decoded.
        if len(raw) == len(headers) and b"".join(raw).islower():
            return raw, _RAW_GETTER, not raw.keys().isdisjoint(context_header_keys(_raw_name))
    gathered = _gathered(headers)
    return gathered, _GETTER, names_carry_context(gathered.keys())


class ContextMiddleware:
    """Run each HTTP and websocket request in its caller's context, with a request id bound.

    The same contract as :class:`threadctx.wsgi.ContextMiddleware`, the same
    options and the same request-id rule: extract the incoming context (keep a
    SERVER span already current, from OpenTelemetry's middleware outside),
    take a valid incoming request id or generate one, bind it for the whole
    request (the endpoint, a streaming body, background tasks that run after
    the response), send it back in the response headers (also when a
    websocket is accepted, or refused with an HTTP response), and leave the
    task's context as it was.
    ``lifespan`` and other scopes pass through untouched.

    Args:
        app: the ASGI 3 application to wrap (a WSGI application is refused:
            use :class:`threadctx.wsgi.ContextMiddleware`).
        header: the request and response header of the request id.
        name: the correlation ID name it is bound under.
        generate: makes a request id when the request brings no valid one.
        trust_incoming: ``False`` ignores incoming request ids (header and
            baggage) and always generates one.
        response_header: ``False`` does not send the request id back.

    Raises:
        TypeError: ``app`` is not an ASGI 3 application (no ``async def``).
        ValueError: ``header`` or ``name`` is invalid.

    .. versionadded:: 0.1.0
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        header: str = "X-Request-ID",
        name: str = "request_id",
        generate: Callable[[], str] = new_request_id,
        trust_incoming: bool = True,
        response_header: bool = True,
    ) -> None:
        if not is_async_callable(app):
            raise TypeError(
                f"{app!r} is not an ASGI 3 application (an async callable): for a WSGI application "
                "use threadctx.wsgi.ContextMiddleware"
            )
        self.policy = RequestPolicy(
            header=header,
            name=name,
            generate=generate,
            trust_incoming=trust_incoming,
            response_header=response_header,
        )
        outside = asgi_instrumentor_outside(app)
        if outside is not None:
            warn_outside(*outside, 2)
        self.app = app
        self._header = header.lower().encode("latin-1")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one request (or websocket) in its own context."""
        if scope.get("type") not in _SERVED:
            await self.app(scope, receive, send)
            return
        policy = self.policy
        carrier, getter, carries = _carrier(scope.get("headers") or ())
        context, request_id = policy.enter(carrier, getter, carries)
        if policy.response_header:
            send = _AddHeader(send, self._header, request_id.encode("latin-1"))
        token = otel_context.attach(context)
        try:
            await self.app(scope, receive, send)
        finally:
            otel_context.detach(token)


class _AddHeader:
    """Wraps ``send``: adds the request id to the message that starts the response."""

    __slots__ = ("header", "send", "value")

    def __init__(self, send: Send, header: bytes, value: bytes) -> None:
        self.send = send
        self.header = header
        self.value = value

    # A coroutine function, not a plain one returning send's awaitable: what it wraps may ask
    # (asgiref's AsyncToSync, used by its WsgiToAsgi and by Channels, warns otherwise).
    async def __call__(self, message: Message) -> None:
        if message.get("type") in _STARTS:
            headers = message.get("headers") or ()
            if not isinstance(headers, (list, tuple)):
                headers = list(headers)  # any iterable: read once
            for name, _ in headers:
                if name.lower() == self.header:  # the application set it: keep its value
                    break
            else:
                message = {**message, "headers": [*headers, (self.header, self.value)]}
        await self.send(message)
