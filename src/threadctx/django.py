"""Django middleware: each request runs in its caller's context, with a request id.

In ``settings.py``::

    MIDDLEWARE = [
        "threadctx.django.ContextMiddleware",  # first, or right after OpenTelemetry's
        ...
    ]

Django needs a middleware class of its own only beside OpenTelemetry's
``DjangoInstrumentor``: it starts the SERVER span in a Django middleware that
it puts first in ``MIDDLEWARE``, from the headers alone, so a WSGI middleware
around the whole application (outside it) would lose the correlation IDs,
and would turn its span into an INTERNAL one when a ``traceparent`` came in.
This class runs inside that span, keeps it, and binds the request id under
it. Without ``DjangoInstrumentor``, :class:`threadctx.wsgi.ContextMiddleware`
around ``get_wsgi_application()`` does the same job.

It imports nothing from Django at import time. To change an option, subclass it and set the
class attributes (``header``, ``name``, ``trust_incoming``, ``response_header``)
or the ``generate`` method, then name the subclass in ``MIDDLEWARE``.

.. versionadded:: 0.1.0
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from importlib import import_module
from typing import Any, ClassVar

from opentelemetry import context as otel_context

from threadctx._requests import Body, RequestPolicy, environ_carries_context, new_request_id
from threadctx.wsgi import ENVIRON_CONTEXT, EnvironGetter

__all__ = ["ContextMiddleware"]

_GETTER = EnvironGetter()  # request.META holds the headers as a WSGI environ does


class ContextMiddleware:
    """Run each Django request in its caller's context, with a request id bound.

    The contract of :class:`threadctx.wsgi.ContextMiddleware` (same rule
    for the request id, same response header), for ``settings.MIDDLEWARE``.
    A streaming response's content is produced in the request's context too.
    When Django loads it, it warns if OpenTelemetry's middleware comes after
    it in ``MIDDLEWARE`` (that order cannot work).

    Django builds middleware itself, with no options: to change one, subclass
    it and set the class attribute (the options of the WSGI middleware),
    ``header`` (``"X-Request-ID"``), ``name`` (``"request_id"``),
    ``trust_incoming`` (``True``), ``response_header`` (``True``), or
    override :meth:`generate`.

    .. versionadded:: 0.1.0
    """

    sync_capable: ClassVar[bool] = True
    async_capable: ClassVar[bool] = False

    header: ClassVar[str] = "X-Request-ID"
    name: ClassVar[str] = "request_id"
    trust_incoming: ClassVar[bool] = True
    response_header: ClassVar[bool] = True

    def __init__(self, get_response: Callable[[Any], Any]) -> None:
        self.get_response = get_response
        _check_order(type(self))
        self.policy = RequestPolicy(
            header=self.header,
            name=self.name,
            generate=self.generate,
            trust_incoming=self.trust_incoming,
            response_header=self.response_header,
        )

    def generate(self) -> str:
        """Make a request id when the request brings no valid one (override to change)."""
        return new_request_id()

    def __call__(self, request: Any) -> Any:
        """Serve one request in its own context."""
        context, request_id = self.policy.enter(request.META, _GETTER, environ_carries_context(request.META))
        request.META[ENVIRON_CONTEXT] = context  # the WSGI environ itself, for the access log
        token = otel_context.attach(context)
        try:
            response = self.get_response(request)
        finally:
            otel_context.detach(token)
        if self.policy.response_header and not response.has_header(self.header):
            response[self.header] = request_id
        # A FileResponse's file goes to the server's wsgi.file_wrapper (sendfile) as it is: setting
        # streaming_content would drop its file_to_stream, and reading a file runs no application code.
        if (
            getattr(response, "streaming", False)
            and not getattr(response, "is_async", False)
            and getattr(response, "file_to_stream", None) is None
        ):
            response.streaming_content = Body(response.streaming_content, context)
        return response


def _check_order(cls: type) -> None:
    """Warn, when Django loads the middleware, if OpenTelemetry's comes after it in MIDDLEWARE."""
    settings = import_module("django.conf").settings  # Django ships no type information

    path = f"{cls.__module__}.{cls.__qualname__}"
    middleware = [str(entry) for entry in getattr(settings, "MIDDLEWARE", None) or ()]
    if path not in middleware:
        return
    later = middleware[middleware.index(path) + 1 :]
    if any(entry.startswith("opentelemetry.instrumentation.django") for entry in later):
        warnings.warn(
            f"{path} comes before OpenTelemetry's middleware in MIDDLEWARE: OpenTelemetry's server span "
            "then extracts from the headers alone and loses the correlation IDs. Put it after "
            "(OTEL_PYTHON_DJANGO_MIDDLEWARE_POSITION moves OpenTelemetry's).",
            stacklevel=3,
        )
