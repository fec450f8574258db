"""The request-id policy that the WSGI and ASGI middlewares share.

One place decides, for a request, which context it runs in and which
request id it gets: the header name, the rule a request id must pass (for
whatever is echoed in a response header, from whichever source), the
generator, the counters.  ``threadctx.wsgi`` and ``threadctx.asgi`` only
read their server's headers and write the response header.
"""

from __future__ import annotations

import inspect
import re
import uuid
import warnings
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from typing import Final, TypeVar

from opentelemetry import baggage as otel_baggage
from opentelemetry import context as otel_context
from opentelemetry import trace as otel_trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter

from threadctx._correlation import MAX_IDS, _show, _with_ids, correlation, merged, validate
from threadctx._propagation import _BAGGAGE, _count, carries_context, extract

__all__ = ["REQUEST_ID", "RequestPolicy", "is_async_callable", "new_request_id", "warn_outside"]

REQUEST_ID: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/+=-]{0,127}")
"""A request id that may be taken from a client and sent back in a header."""

_HEADER_NAME: Final = re.compile(r"[A-Za-z0-9-]+")

C = TypeVar("C")


def new_request_id() -> str:
    """A new random request id: 32 lowercase hex digits."""
    return uuid.uuid4().hex


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


def _has_header(carrier: C, getter: Getter[C], names: AbstractSet[str] | None, header: str) -> bool:
    return header in names if names is not None else getter.get(carrier, header) is not None


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
        if not isinstance(header, str) or not _HEADER_NAME.fullmatch(header):
            raise ValueError(f"header must be an HTTP header name, not {header!r}")
        self.header = header
        self.name = name
        self.generate = generate
        self.trust_incoming = trust_incoming
        self.response_header = response_header

    def enter(
        self, carrier: C, getter: Getter[C], names: AbstractSet[str] | None = None
    ) -> tuple[Context, str]:
        """The context to serve the request in, and its request id.

        The incoming trace context and allowlisted baggage are extracted
        (only the baggage when a server span is already current: an
        OpenTelemetry middleware outside started it), and the request id is
        bound under :attr:`name`. ``names``: the carrier's header names in
        lowercase, if the adapter has them at hand.
        """
        context = current = otel_context.get_current()
        extracted_baggage = otel_baggage.get_all(current)  # by a middleware outside: to turn into IDs
        # Without a propagation header (or such baggage), extract would return `current`.
        if carries_context(carrier, getter, names) or extracted_baggage:
            has_span = otel_trace.get_current_span(current).get_span_context().is_valid
            # Under a server span only the baggage is read: skip extract when there is none.
            if not has_span or extracted_baggage or _has_header(carrier, getter, names, _BAGGAGE):
                context = extract(carrier, context=current, getter=getter, trace=not has_span)
        request_id = self._request_id(getter.get(carrier, self.header), context)
        ids = correlation(context)
        if len(ids) >= MAX_IDS:  # rare: let merged() say why it is refused
            return merged({self.name: request_id}, context), request_id
        # The name was validated when the policy was made, and the rule is stricter than validate().
        return _with_ids({**ids, self.name: request_id}, context), request_id

    def _request_id(self, incoming: list[str] | None, context: Context) -> str:
        if not self.trust_incoming:
            return self._generated()
        if incoming is not None:
            # One header, one valid value; anything else is counted and never logged.
            if len(incoming) == 1 and isinstance(incoming[0], str) and REQUEST_ID.fullmatch(incoming[0]):
                return incoming[0]
            _count("invalid_request_ids")
        # A caller that used threadctx.inject sent it as baggage: extract checked it only
        # as a correlation ID, and it is echoed in a header, so it passes the same rule.
        from_baggage = correlation(context).get(self.name)
        if from_baggage is not None:
            if REQUEST_ID.fullmatch(from_baggage):
                return from_baggage
            _count("invalid_request_ids")
        return self._generated()

    def _generated(self) -> str:
        request_id = self.generate()
        if not isinstance(request_id, str) or not REQUEST_ID.fullmatch(request_id):
            raise ValueError(f"generate() made an invalid request id: {_show(str(request_id))}")
        return request_id
