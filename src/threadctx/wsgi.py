"""WSGI middleware: each request runs in its caller's context, with a request id.

::

    from threadctx.wsgi import ContextMiddleware

    app = ContextMiddleware(app)

Beside ``opentelemetry-instrumentation-wsgi``, put this middleware inside
OpenTelemetry's, so that OpenTelemetry starts the server span from the
incoming headers and this one binds the request id under that span::

    app = OpenTelemetryMiddleware(ContextMiddleware(app))

.. versionadded:: 0.1.0
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from opentelemetry import context as otel_context
from opentelemetry.propagators.textmap import Getter

from threadctx._requests import (
    Body,
    RequestPolicy,
    environ_carries_context,
    environ_key,
    is_async_callable,
    new_request_id,
    warn_outside,
    wsgi_instrumentor_outside,
)

if TYPE_CHECKING:
    from _typeshed import OptExcInfo
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

__all__ = ["ENVIRON_CONTEXT", "ContextMiddleware", "EnvironGetter", "new_request_id"]

ENVIRON_CONTEXT = "threadctx.context"
"""The environ key under which the middlewares leave the request's context.

For what runs after the application has returned, outside its context: a
server's access log (see the gunicorn how-to).

.. versionadded:: 0.1.0
"""


class EnvironGetter(Getter["WSGIEnvironment"]):
    """Reads HTTP headers from a WSGI environ, for :func:`threadctx.extract`.

    .. versionadded:: 0.1.0
    """

    def get(self, carrier: WSGIEnvironment, key: str) -> list[str] | None:
        """The values of header ``key`` (any case), or ``None``."""
        value = carrier.get(environ_key(key))
        return None if value is None else [value]

    def keys(self, carrier: WSGIEnvironment) -> list[str]:
        """The names of the request's HTTP headers, lowercase."""
        return [key[5:].lower().replace("_", "-") for key in carrier if key.startswith("HTTP_")]


_GETTER = EnvironGetter()


class ContextMiddleware:
    """Run each request in the context its caller sent, with a request id bound.

    For each request the middleware:

    1. extracts the incoming trace context and allowlisted baggage
       (:func:`threadctx.extract`); when a server span is already current
       (``OpenTelemetryMiddleware`` outside), it keeps that span and reads
       only the baggage;
    2. takes the request id from the request header if it is valid (1 to
       128 characters: ASCII letters, digits and ``. _ : / + = -``, starting
       with a letter or digit; an invalid one is counted in
       :func:`threadctx.propagation_stats` and never logged), else from the
       incoming baggage (what :func:`threadctx.inject` sends) if it passes
       the same rule, else generates one;
    3. binds it as a correlation ID for the request, including while the
       response body is produced, and sends it back in a response header;
    4. leaves the worker thread's context as it found it.

    A ``wsgi.file_wrapper`` body is returned as it is, so that the server can
    still send the file with ``sendfile()``: no application code runs while
    it is sent.

    Args:
        app: the WSGI application to wrap (an ASGI application is refused:
            use :class:`threadctx.asgi.ContextMiddleware`).
        header: the request and response header of the request id.
        name: the correlation ID name it is bound under.
        generate: makes a request id when the request brings no valid one;
            an id it makes that breaks the rule above is a ``ValueError``.
        trust_incoming: ``False`` ignores incoming request ids (header and
            baggage) and always generates one.
        response_header: ``False`` does not send the request id back.

    Raises:
        TypeError: ``app`` is an ASGI application.
        ValueError: ``header`` or ``name`` is invalid.

    .. versionadded:: 0.1.0
    """

    def __init__(
        self,
        app: WSGIApplication,
        *,
        header: str = "X-Request-ID",
        name: str = "request_id",
        generate: Callable[[], str] = new_request_id,
        trust_incoming: bool = True,
        response_header: bool = True,
    ) -> None:
        if is_async_callable(app):
            raise TypeError(
                f"{app!r} is an ASGI application: wrap it in threadctx.asgi.ContextMiddleware instead"
            )
        self.policy = RequestPolicy(
            header=header,
            name=name,
            generate=generate,
            trust_incoming=trust_incoming,
            response_header=response_header,
        )
        outside = wsgi_instrumentor_outside(app)
        if outside is not None:
            warn_outside(*outside, 2)
        self.app = app
        self._header_lower = header.lower()

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        """Serve one request in its own context."""
        policy = self.policy
        context, request_id = policy.enter(environ, _GETTER, environ_carries_context(environ))
        environ[ENVIRON_CONTEXT] = context
        respond = start_response
        if policy.response_header:
            respond = _AddHeader(start_response, policy.header, self._header_lower, request_id)
        token = otel_context.attach(context)
        try:
            body = self.app(environ, respond)
        finally:
            otel_context.detach(token)
        if isinstance(body, (list, tuple)):  # already produced: nothing runs later
            return body
        file_wrapper = environ.get("wsgi.file_wrapper")
        if isinstance(file_wrapper, type) and isinstance(body, file_wrapper):
            return body  # the server may sendfile() it; only the file is read
        return Body(body, context)


class _AddHeader:
    __slots__ = ("header", "lower", "start_response", "value")

    def __init__(self, start_response: StartResponse, header: str, lower: str, value: str) -> None:
        self.start_response = start_response
        self.header = header
        self.lower = lower
        self.value = value

    def __call__(
        self, status: str, headers: list[tuple[str, str]], exc_info: OptExcInfo | None = None
    ) -> Callable[[bytes], object]:
        lower = self.lower
        for name, _ in headers:
            if name.lower() == lower:  # the application set it: keep its value
                break
        else:
            headers = [*headers, (self.header, self.value)]
        return self.start_response(status, headers, exc_info)
