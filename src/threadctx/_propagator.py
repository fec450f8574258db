"""threadctx's OpenTelemetry propagator: correlation IDs wherever OpenTelemetry's context travels.

Registered as the ``threadctx`` entry point of the ``opentelemetry_propagator``
group, so ``OTEL_PROPAGATORS=tracecontext,threadctx`` (in place of
``baggage``) makes every instrumentation that injects or extracts carry the
allowlisted correlation IDs.  The ``baggage`` header is written and read by the
same functions that :func:`threadctx.inject` and :func:`threadctx.extract` use.

OpenTelemetry loads this module while ``opentelemetry.propagate`` is being
imported (its module-level ``_load_propagators()``): what it imports uses
``opentelemetry.propagate`` only when called, never at import time, so the
half-initialised module it gets then is enough (tested in a subprocess, with
and without ``OTEL_PYTHON_CONTEXT=threadctx``, importing either first).
"""

from __future__ import annotations

import enum
import os
import warnings
from collections.abc import Mapping
from typing import Final

from opentelemetry import context as otel_context
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import (
    CarrierT,
    Getter,
    Setter,
    TextMapPropagator,
    default_getter,
    default_setter,
)

from threadctx import _propagation
from threadctx._compat import composite_members
from threadctx._correlation import correlation
from threadctx._propagation import (
    BAGGAGE,
    extract_baggage,
    inject_baggage,
    propagation_allowlist,
)
from threadctx._requests import REQUEST_ID, check_header_name

__all__ = ["REQUEST_ID_HEADER_ENV", "CorrelationPropagator"]

REQUEST_ID_HEADER_ENV: Final = "THREADCTX_PROPAGATOR_REQUEST_ID_HEADER"
"""The environment variable that names the header the request id also goes out in."""


def _has_header(carrier: object, header: str) -> bool:
    """Whether ``carrier`` (a mapping of headers, in any case) already has ``header``: the caller's wins.

    Carriers that are not mappings cannot be read here: they get the header.
    """
    if not isinstance(carrier, Mapping):
        return False
    lower = header.lower()
    return any(isinstance(key, str) and key.lower() == lower for key in carrier)


#: The global propagator last checked by _warn_if_overwritten (a new one is checked once).
_checked: list[object] = [None]


def _members(propagator: object) -> list[object]:
    """``propagator``, or what a composite runs, in order (the members of nested composites too)."""
    members = composite_members(propagator)
    return [propagator] if members is None else [inner for member in members for inner in _members(member)]


def _warn_if_overwritten() -> None:
    """Warn once per global propagator when OpenTelemetry's ``baggage`` runs after threadctx's.

    ``OTEL_PROPAGATORS=tracecontext,threadctx,baggage``: the ``baggage`` propagator writes the
    header after this one and replaces it with OpenTelemetry's baggage alone, so the correlation
    IDs never leave whenever the context holds baggage. The global propagator is checked,
    whichever instance injects first (a hook may use one of its own).
    """
    textmap = _propagation.global_textmap()
    if _checked[0] is textmap:
        return
    _checked[0] = textmap
    writers = [
        member
        for member in _members(textmap)
        if isinstance(member, (CorrelationPropagator, W3CBaggagePropagator))
    ]
    if (
        writers
        and isinstance(writers[-1], W3CBaggagePropagator)
        and any(isinstance(member, CorrelationPropagator) for member in writers)
    ):
        warnings.warn(
            "OpenTelemetry's baggage propagator runs after threadctx's and replaces the baggage header "
            "it wrote: correlation IDs are not sent when the context holds baggage. threadctx's "
            "propagator sends OpenTelemetry's baggage too; use it in place of baggage: "
            "OTEL_PROPAGATORS=tracecontext,threadctx",
            RuntimeWarning,
            stacklevel=4,
        )


class _FromEnvironment(enum.Enum):
    """The default of ``request_id_header``: read :data:`REQUEST_ID_HEADER_ENV`."""

    TOKEN = enum.auto()


_FROM_ENVIRONMENT: Final = _FromEnvironment.TOKEN


class CorrelationPropagator(TextMapPropagator):
    """An OpenTelemetry propagator for W3C baggage that carries the allowlisted correlation IDs.

    Use it instead of OpenTelemetry's ``baggage`` propagator::

        OTEL_PROPAGATORS=tracecontext,threadctx

    or in code::

        propagate.set_global_textmap(
            CompositePropagator([TraceContextTextMapPropagator(), threadctx.CorrelationPropagator()])
        )

    On the way out, the ``baggage`` header carries the context's OpenTelemetry
    baggage, as ``baggage`` sends it, plus the correlation IDs on the allowlist
    (:func:`threadctx.allow_propagation`; a correlation ID wins over a baggage entry of
    the same name).  On the way in, the header is untrusted: it is cut to the
    W3C limits at whole members, its allowlisted members that pass validation
    are bound as correlation IDs, and its other members become OpenTelemetry
    baggage, as ``baggage`` keeps them.  This is exactly what
    :func:`threadctx.inject` and :func:`threadctx.extract` do, through the same
    code.

    Args:
        request_id_header: also send the ``request_id`` correlation ID in this
            header (for example ``"X-Request-ID"``), when it is on the
            allowlist and passes the request-id rule of the middlewares.
            ``None`` sends no such header.  By default, the header named by
            the environment variable ``THREADCTX_PROPAGATOR_REQUEST_ID_HEADER``
            if it is set and not empty (how to turn it on with
            ``OTEL_PROPAGATORS``), else none.  The header is only sent, never
            read: the middlewares read ``X-Request-ID`` themselves.  A
            request id the caller put in the headers itself (in any case) is
            kept, never replaced nor sent twice.

    Raises:
        ValueError: ``request_id_header`` is not an HTTP header name, or is
            ``baggage``, ``traceparent`` or ``tracestate``.

    .. versionadded:: 0.1.0
    """

    __slots__ = ("_fields", "_request_id_header")

    def __init__(self, *, request_id_header: str | _FromEnvironment | None = _FROM_ENVIRONMENT) -> None:
        if request_id_header is _FROM_ENVIRONMENT:
            request_id_header = os.environ.get(REQUEST_ID_HEADER_ENV, "").strip() or None
        if request_id_header is not None:
            request_id_header = check_header_name(request_id_header, "request_id_header")
        self._request_id_header: str | None = request_id_header
        fields = {BAGGAGE}
        if request_id_header is not None:
            fields.add(request_id_header)
        self._fields = frozenset(fields)

    @property
    def request_id_header(self) -> str | None:
        """The header the request id also goes out in, or ``None``."""
        return self._request_id_header

    def inject(
        self,
        carrier: CarrierT,
        context: Context | None = None,
        setter: Setter[CarrierT] = default_setter,
    ) -> None:
        """Write the ``baggage`` header (and the request-id header, if configured) into ``carrier``."""
        context = context if context is not None else otel_context.get_current()
        _warn_if_overwritten()
        inject_baggage(carrier, context, setter, keep_baggage=True)
        header = self._request_id_header
        if (
            header is not None
            and "request_id" in propagation_allowlist()
            and not _has_header(carrier, header)
        ):
            request_id = correlation(context).get("request_id")
            if request_id is not None and REQUEST_ID.fullmatch(request_id):
                setter.set(carrier, header, request_id)

    def extract(
        self,
        carrier: CarrierT,
        context: Context | None = None,
        getter: Getter[CarrierT] = default_getter,
    ) -> Context:
        """Read the ``baggage`` header of ``carrier`` into ``context`` (by default the current one)."""
        context = context if context is not None else otel_context.get_current()
        return extract_baggage(carrier, context, getter, keep_baggage=True)

    @property
    def fields(self) -> set[str]:
        """The headers :meth:`inject` writes: ``baggage``, and the request-id header if configured."""
        return set(self._fields)

    def __repr__(self) -> str:
        return f"CorrelationPropagator(request_id_header={self._request_id_header!r})"
