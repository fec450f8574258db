"""The request-id policy and the plumbing that every web adapter shares.

One place decides, for a request, which context it runs in and which
request id it gets: the header name, the rule a request id must pass (for
whatever is echoed in a response header, from whichever source), the
generator, the counters.  ``threadctx.wsgi``, ``threadctx.asgi``,
``threadctx.django`` and ``threadctx.flask`` only read their server's headers
and write the response header.  Here too: the response body that is produced
in the request's context (:class:`Body`), and the detection of an
OpenTelemetry instrumentor that a middleware would wrap instead of going inside.
"""

from __future__ import annotations

import functools
import inspect
import os
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, KeysView, Mapping
from importlib import import_module
from types import MappingProxyType
from typing import Any, Final, TypeVar

from opentelemetry import baggage as otel_baggage
from opentelemetry import context as otel_context
from opentelemetry import trace as otel_trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter

from threadctx._compat import OTEL_INSTRUMENTED, baggage_key
from threadctx._correlation import CORRELATION_KEY, CORRELATION_MAX_IDS, merged, validate, with_ids
from threadctx._propagation import BAGGAGE, carries_context, context_header_keys, count, extract
from threadctx._text import show

__all__ = [
    "HEADER_NAME",
    "REQUEST_ID",
    "Body",
    "RequestPolicy",
    "asgi_instrumentor_outside",
    "check_header_name",
    "environ_carries_context",
    "environ_key",
    "is_async_callable",
    "names_carry_context",
    "new_request_id",
    "warn_outside",
    "wsgi_instrumentor_outside",
]

REQUEST_ID: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/+=-]{0,127}")
"""A request id that may be taken from a client and sent back in a header."""

HEADER_NAME: Final = re.compile(r"[A-Za-z0-9-]+")
"""An HTTP header name that the middlewares and the propagator accept as an option."""

#: Headers of W3C Trace Context and Baggage: a request-id header of that name would replace them.
_PROPAGATION_HEADERS: Final = frozenset({BAGGAGE, "traceparent", "tracestate"})

C = TypeVar("C")

_BAGGAGE_KEY: Final = baggage_key()
_NO_IDS: Final[Mapping[str, str]] = MappingProxyType({})

#: The bits of a random 128-bit number that a version 4 UUID keeps, and those it sets.
_UUID_KEEP: Final = ~((0xF000 << 64) | (0xC000 << 48)) & (1 << 128) - 1
_UUID_SET: Final = (0x4000 << 64) | (0x8000 << 48)


def check_header_name(header: object, what: str) -> str:
    """``header`` if it may carry a request id: an HTTP header name, not one of the W3C context headers.

    Raises:
        ValueError: it is not; the message names the option (``what``).
    """
    if not isinstance(header, str) or not HEADER_NAME.fullmatch(header):
        raise ValueError(f"{what} must be an HTTP header name, not {header!r}")
    if header.lower() in _PROPAGATION_HEADERS:
        raise ValueError(f"{what} {header!r} would replace the W3C header of that name; choose another")
    return header


#: Request ids made ahead, from one os.urandom call per batch (a system call per id cost more than
#: the rest of the id). Each is popped once: list.pop is atomic, also on a free-threaded build.
_made: list[str] = []
_BATCH: Final = 64


def new_request_id() -> str:
    """A new random request id: 32 lowercase hex digits (a random UUID, version 4, as ``uuid4().hex``).

    From the operating system's random source (``os.urandom``), as ``uuid4()``.

    .. versionadded:: 0.1.0
    """
    while True:
        try:
            return _made.pop()
        except IndexError:
            _make_batch()


def _make_batch() -> None:
    # What uuid.uuid4() does, without building a UUID object (which costs most of the time):
    # 122 random bits, the version nibble 4 and the RFC 4122 variant bits 10.
    data = os.urandom(16 * _BATCH)
    _made.extend(
        (int.from_bytes(data[start : start + 16], "big") & _UUID_KEEP | _UUID_SET).to_bytes(16, "big").hex()
        for start in range(0, len(data), 16)
    )


@functools.lru_cache(maxsize=256)  # the few names asked for, again and again
def environ_key(header: str) -> str:
    """Where a WSGI environ (or Django's ``request.META``) holds a request header: ``HTTP_X_REQUEST_ID``."""
    return "HTTP_" + header.upper().replace("-", "_")


def names_carry_context(names: KeysView[str]) -> bool:
    """Whether request header ``names`` (lowercase) include any that :func:`threadctx.extract` reads."""
    return not names.isdisjoint(context_header_keys(str.lower))


def environ_carries_context(environ: Mapping[str, object]) -> bool:
    """Whether a WSGI environ holds any header :func:`threadctx.extract` reads (one set operation)."""
    return not environ.keys().isdisjoint(context_header_keys(environ_key))


if hasattr(os, "register_at_fork"):  # pragma: no branch - absent on Windows only
    # A child must not send the ids its parent made: they would be sent twice.
    os.register_at_fork(after_in_child=_made.clear)


def is_async_callable(app: object) -> bool:
    """Whether ``app`` (a function, or an object through its ``__call__``) is ``async def``."""
    call = getattr(app, "__call__", None)  # noqa: B004 - the method itself is what we inspect
    return inspect.iscoroutinefunction(app) or inspect.iscoroutinefunction(call)


def warn_outside(kind: str, inside: str, stacklevel: int) -> None:
    """Warn that a middleware wraps OpenTelemetry's instead of going inside it."""
    warnings.warn(
        f"ContextMiddleware wraps {kind}: OpenTelemetry's server span then extracts from the headers "
        f"alone, and correlation IDs are lost for requests without a traceparent. Put it inside "
        f"instead: {inside}",
        stacklevel=stacklevel + 1,
    )


def wsgi_instrumentor_outside(app: object) -> tuple[str, str] | None:
    """What OpenTelemetry instrumentor a WSGI middleware around ``app`` would wrap, and where to go instead.

    Returns:
        ``(what it wraps, where to put it)`` for :func:`warn_outside`, or ``None``.
    """
    if type(app).__module__.startswith("opentelemetry.instrumentation.wsgi"):
        return "OpenTelemetryMiddleware", "OpenTelemetryMiddleware(ContextMiddleware(app))"
    if _flask_instrumented(app):
        return "a Flask app under FlaskInstrumentor", "threadctx.flask.init_app(app)"
    if _django_instrumented(app):
        return "Django under DjangoInstrumentor", "threadctx.django.ContextMiddleware in MIDDLEWARE"
    return None


def asgi_instrumentor_outside(app: object) -> tuple[str, str] | None:
    """What OpenTelemetry instrumentor an ASGI middleware around ``app`` would wrap (see the WSGI one)."""
    if type(app).__module__.startswith("opentelemetry.instrumentation.asgi"):
        return "OpenTelemetryMiddleware", "OpenTelemetryMiddleware(ContextMiddleware(app))"
    if getattr(app, OTEL_INSTRUMENTED, False) is True:
        return "an instrumented application", "app.add_middleware(ContextMiddleware)"
    return None


def _flask_instrumented(app: object) -> bool:
    """A Flask app under FlaskInstrumentor, or its ``wsgi_app`` (the instrumentor's wrapper, or method)."""
    if str(getattr(app, "__module__", "")).startswith("opentelemetry.instrumentation.flask"):
        return True
    owner = getattr(app, "__self__", app)
    return type(owner).__module__.startswith("flask") and getattr(owner, OTEL_INSTRUMENTED, False) is True


def _django_instrumented(app: object) -> bool:
    """Django's WSGI handler, with OpenTelemetry's middleware in MIDDLEWARE."""
    if not type(app).__module__.startswith("django.core.handlers"):
        return False
    settings = import_module("django.conf").settings  # Django ships no type information
    middleware = getattr(settings, "MIDDLEWARE", None) or ()
    return any(str(entry).startswith("opentelemetry.instrumentation.django") for entry in middleware)


class Body:
    """A response body, produced (and closed) in the request's context.

    What the body binds itself stays bound for its next steps, as in any
    generator; the server's thread gets its own context back between steps.
    """

    __slots__ = ("_context", "_iterable")

    def __init__(self, iterable: Iterable[bytes], context: Context) -> None:
        self._iterable = iterable
        self._context = context

    def _step(self, fn: Callable[[], Any]) -> Any:
        token = otel_context.attach(self._context)
        try:
            return fn()
        finally:
            self._context = otel_context.get_current()
            otel_context.detach(token)

    def __iter__(self) -> Iterator[bytes]:
        iterator: Iterator[bytes] = self._step(lambda: iter(self._iterable))
        while True:
            try:
                chunk: bytes = self._step(lambda: next(iterator))
            except StopIteration:
                return
            yield chunk

    def close(self) -> None:
        """Close the wrapped body, in the request's context."""
        close: Callable[[], Any] | None = getattr(self._iterable, "close", None)
        if close is not None:
            self._step(close)


class RequestPolicy:
    """Which context and request id a request gets.

    Args:
        header: the request and response header of the request id.
        name: the correlation ID name it is bound under.
        generate: makes a request id when the request brings no valid one.
        trust_incoming: ``False`` ignores incoming request ids (header and
            baggage) and always generates one.
        response_header: ``False`` does not send the request id back.
    """

    __slots__ = ("generate", "header", "name", "response_header", "trust_incoming")

    def __init__(
        self,
        *,
        header: str,
        name: str,
        generate: Callable[[], str],
        trust_incoming: bool,
        response_header: bool,
    ) -> None:
        validate(name, "")
        self.header = check_header_name(header, "header")
        self.name = name
        self.generate = generate
        self.trust_incoming = trust_incoming
        self.response_header = response_header

    def enter(self, carrier: C, getter: Getter[C], carries: bool | None = None) -> tuple[Context, str]:
        """The context to serve the request in, and its request id.

        The incoming trace context and allowlisted baggage are extracted
        (only the baggage when a server span is already current: an
        OpenTelemetry middleware outside started it), and the request id is
        bound under :attr:`name`. ``carries``: whether the carrier holds any
        header extract reads, if the adapter can tell more cheaply than the
        getter (see :func:`context_header_keys`).
        """
        context = current = otel_context.get_current()
        # Baggage a middleware outside extracted: to turn into IDs (a Context is a dict).
        extracted_baggage = current.get(_BAGGAGE_KEY) if _BAGGAGE_KEY else otel_baggage.get_all(current)
        if carries is None:
            carries = carries_context(carrier, getter)
        # Without a propagation header (or such baggage), extract would return `current`.
        if carries or extracted_baggage:
            has_span = otel_trace.get_current_span(current).get_span_context().is_valid
            # Under a server span only the baggage is read: skip extract when there is none.
            if not has_span or extracted_baggage or getter.get(carrier, BAGGAGE) is not None:
                context = extract(carrier, context=current, getter=getter, trace=not has_span)
        # correlation(context), inlined: a Context is a dict.
        ids: Any = context.get(CORRELATION_KEY) or _NO_IDS  # a Mapping[str, str]
        request_id = self._request_id(getter.get(carrier, self.header), ids)
        if len(ids) >= CORRELATION_MAX_IDS:  # rare: let merged() say why it is refused
            return merged({self.name: request_id}, context), request_id
        # The name was validated when the policy was made, and the rule is stricter than validate().
        return with_ids({**ids, self.name: request_id}, context, fresh=True), request_id

    def _request_id(self, incoming: list[str] | None, ids: Mapping[str, str]) -> str:
        if self.trust_incoming:
            if incoming is not None:
                # One header, one valid value; anything else is counted and never logged.
                if len(incoming) == 1 and isinstance(incoming[0], str) and REQUEST_ID.fullmatch(incoming[0]):
                    return incoming[0]
                count("invalid_request_ids")
            # A caller that used threadctx.inject sent it as baggage: extract checked it only
            # as a correlation ID, and it is echoed in a header, so it passes the same rule.
            from_baggage = ids.get(self.name)
            if from_baggage is not None:
                if REQUEST_ID.fullmatch(from_baggage):
                    return from_baggage
                count("invalid_request_ids")
        generate = self.generate
        request_id = generate()
        if generate is new_request_id:  # valid by construction
            return request_id
        if not isinstance(request_id, str) or not REQUEST_ID.fullmatch(request_id):
            raise ValueError(f"generate() made an invalid request id: {show(str(request_id))}")
        return request_id
