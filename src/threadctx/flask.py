"""Flask: each request runs in its caller's context, with a request id.

::

    from threadctx.flask import init_app

    FlaskInstrumentor().instrument_app(app)  # if you use it, in either order
    init_app(app)

Without OpenTelemetry's ``FlaskInstrumentor``, ``app.wsgi_app =
threadctx.wsgi.ContextMiddleware(app.wsgi_app)`` does the same job. Beside
it, that WSGI middleware is outside the SERVER span, which the instrumentor
starts in a ``before_request`` hook from the headers alone: the correlation
IDs would be lost, and the span would become INTERNAL when a
``traceparent`` came in. :func:`init_app` registers hooks that run after the
instrumentor's (Flask runs ``before_request`` hooks in the order they were
registered; called first, they move behind the instrumentor's at the first
request), keep its span and bind the request id under it.

.. versionadded:: 0.1.0
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any

import flask
from opentelemetry import context as otel_context
from opentelemetry.context import Context

from threadctx._compat import flask_otel_keys
from threadctx._requests import Body, RequestPolicy, environ_carries_context, new_request_id
from threadctx.wsgi import ENVIRON_CONTEXT, EnvironGetter

__all__ = ["init_app"]

_GETTER = EnvironGetter()
_TOKEN = "threadctx.token"
_REQUEST_ID = "threadctx.request_id"


def _otel_excluded(url: str) -> bool:
    """Whether FlaskInstrumentor skips ``url`` (``OTEL_PYTHON_FLASK_EXCLUDED_URLS``)."""
    from opentelemetry.util.http import get_excluded_urls

    return bool(get_excluded_urls("FLASK").url_disabled(url))


def init_app(
    app: flask.Flask,
    *,
    header: str = "X-Request-ID",
    name: str = "request_id",
    generate: Callable[[], str] = new_request_id,
    trust_incoming: bool = True,
    response_header: bool = True,
) -> None:
    """Bind a request id and the caller's context for each request of ``app``.

    The options and the request-id rule are those of
    :class:`threadctx.wsgi.ContextMiddleware`. Beside
    ``FlaskInstrumentor().instrument_app(app)``, in either order, its hooks run
    inside the instrumentor's SERVER span (called first, they move behind
    the instrumentor's at the first request). A streamed response's body
    is produced in the request's context too, with or without
    ``stream_with_context``.

    .. versionadded:: 0.1.0
    """
    policy = RequestPolicy(
        header=header,
        name=name,
        generate=generate,
        trust_incoming=trust_incoming,
        response_header=response_header,
    )
    moved: list[bool] = []
    lock = threading.Lock()

    def bind_now() -> None:
        environ = flask.request.environ
        context, request_id = policy.enter(environ, _GETTER, environ_carries_context(environ))
        environ[ENVIRON_CONTEXT] = context
        environ[_TOKEN] = otel_context.attach(context)
        environ[_REQUEST_ID] = request_id

    def bind() -> None:
        if moved:  # bind_now runs after the instrumentor's hook now
            return
        environ = flask.request.environ
        # The instrumentor's WSGI wrapper ran (it notes the start time) but its before_request
        # hook, which notes the span, has not: it was registered after this one. Move behind
        # it: Flask is iterating the list of hooks, and will call what is appended to it.
        started, span = flask_otel_keys()
        instrumentor_pending = started in environ and span not in environ
        if instrumentor_pending and not _otel_excluded(flask.request.url):
            with lock:
                if not moved:
                    app.before_request_funcs.setdefault(None, []).append(bind_now)
                    teardowns = app.teardown_request_funcs.setdefault(None, [])
                    teardowns.remove(unbind)
                    teardowns.append(unbind)  # Flask calls them in reverse: before the instrumentor's
                    moved.append(True)
            return
        bind_now()

    def add_header(response: Any) -> Any:
        environ = flask.request.environ
        request_id = environ.get(_REQUEST_ID)
        if policy.response_header and request_id is not None and header not in response.headers:
            response.headers[header] = request_id
        context = environ.get(ENVIRON_CONTEXT)
        # A streamed body is produced after the request context was popped (send_file's
        # direct_passthrough body is a file for the server's wsgi.file_wrapper: left as it is).
        if context is not None and response.is_streamed and not response.direct_passthrough:
            response.response = _Streamed(response.response, context, environ)
        return response

    def unbind(_: BaseException | None) -> None:
        token = flask.request.environ.pop(_TOKEN, None)
        if token is not None:
            otel_context.detach(token)

    app.before_request(bind)
    app.after_request(add_header)
    app.teardown_request(unbind)


class _Streamed(Body):
    """A streamed response body, produced (and closed) in the request's context.

    Only where the request's own binding is gone (``unbind`` ran when Flask
    popped the request context): while ``stream_with_context`` keeps that
    context the body already runs in it, and its last step runs ``unbind``,
    which a second attach around it would undo.
    """

    __slots__ = ("_environ",)

    def __init__(self, iterable: Iterable[bytes], context: Context, environ: dict[str, Any]) -> None:
        super().__init__(iterable, context)
        self._environ = environ

    def _step(self, fn: Callable[[], Any]) -> Any:
        return fn() if _TOKEN in self._environ else super()._step(fn)
