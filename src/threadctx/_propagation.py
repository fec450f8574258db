"""Carrying the context across processes and services as W3C headers.

The trace context travels through OpenTelemetry's configured propagators
(``traceparent``/``tracestate`` by default).  Correlation IDs travel as W3C
baggage members, but only those on the propagation allowlist, because baggage
leaves the process: ``request_id`` is on it by default and
:func:`allow_propagation` adds names.  Within the application's own process pools
every correlation ID travels, in a header of its own.

Everything read from a carrier is untrusted: the baggage header is cut to the
W3C limits at whole members before any parser sees it, and correlation values
that :func:`threadctx._correlation.validate` rejects are dropped and counted.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Final, TypeVar
from urllib.parse import quote, unquote

from opentelemetry import baggage as otel_baggage
from opentelemetry import context as otel_context
from opentelemetry import trace as otel_trace
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
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from threadctx._correlation import CORRELATION_MAX_IDS, correlation, validate, with_ids
from threadctx._storage import new_locks_in_child

__all__ = [
    "BAGGAGE_MAX_BYTES",
    "BAGGAGE_MAX_MEMBERS",
    "allow_propagation",
    "attached",
    "extract",
    "inject",
    "propagation_allowlist",
    "propagation_stats",
    "set_propagation_allowlist",
]

BAGGAGE_MAX_MEMBERS: Final = 64
"""Most baggage members read from one carrier (W3C Baggage, "Limits")."""

BAGGAGE_MAX_BYTES: Final = 8192
"""Longest baggage header read from one carrier, in bytes (W3C Baggage, "Limits")."""

BAGGAGE = "baggage"
_TRACESTATE = "tracestate"
_PROCESS_IDS = "threadctx-correlation"  # every correlation ID, in the application's own processes

_allowlist: frozenset[str] = frozenset({"request_id"})
_allowlist_lock = threading.Lock()

_stats: Counter[str] = Counter()
_stats_lock = threading.Lock()
new_locks_in_child(globals(), "_allowlist_lock", "_stats_lock")

_TRACE: Final = TraceContextTextMapPropagator()
_W3C_BAGGAGE: Final = W3CBaggagePropagator()

C = TypeVar("C")


def allow_propagation(*names: str) -> frozenset[str]:
    """Let the named correlation IDs leave the process as W3C baggage.

    Adds the names to the propagation allowlist, on which ``request_id`` is
    from the start.  Call it once at start-up, before requests are served::

        threadctx.allow_propagation("tenant", "user_id")

    IDs not on the list are never injected into outgoing headers, and are not
    taken from incoming baggage.  :func:`set_propagation_allowlist` replaces
    the whole list (also to take names off it).

    Returns:
        The whole allowlist after the call.

    Raises:
        ValueError: a name is not a valid correlation ID name; nothing is added.

    .. versionadded:: 0.1.0
    """
    global _allowlist  # noqa: PLW0603 - one process-wide allowlist, replaced whole
    added = _valid_names(names)
    with _allowlist_lock:
        _allowlist = _allowlist | added
        return _allowlist


def set_propagation_allowlist(names: Iterable[str]) -> frozenset[str]:
    """Replace the whole propagation allowlist with ``names``.

    The way back from :func:`allow_propagation`: ``set_propagation_allowlist(())``
    lets no correlation ID leave the process, not even ``request_id``, and
    ``set_propagation_allowlist({"request_id"})`` restores the default::

        saved = threadctx.propagation_allowlist()
        threadctx.set_propagation_allowlist(saved | {"tenant"})

    Returns:
        The new allowlist.

    Raises:
        TypeError: ``names`` is a single string, not a collection of names.
        ValueError: a name is not a valid correlation ID name; the list is unchanged.

    .. versionadded:: 0.1.0
    """
    global _allowlist  # noqa: PLW0603 - one process-wide allowlist, replaced whole
    if isinstance(names, str):
        raise TypeError(f"set_propagation_allowlist takes a collection of names, not the string {names!r}")
    new = _valid_names(names)
    with _allowlist_lock:
        _allowlist = new
        return _allowlist


def _valid_names(names: Iterable[str]) -> frozenset[str]:
    """``names`` as a frozenset, each checked as a correlation ID name."""
    checked = frozenset(names)
    for name in checked:
        validate(name, "")
    return checked


def propagation_allowlist() -> frozenset[str]:
    """Return the names of the correlation IDs that :func:`inject` sends and :func:`extract` takes.

    .. versionadded:: 0.1.0
    """
    return _allowlist


def propagation_stats() -> dict[str, int]:
    """Counts of untrusted input that was dropped, since the process started.

    Keys: ``invalid_ids`` (correlation values from a carrier that failed
    validation), ``baggage_members_cut`` (members beyond the W3C limits or
    not printable ASCII), ``tracestate_members_cut`` (``tracestate`` members
    that are not printable ASCII) and ``invalid_request_ids`` (request ids
    the WSGI middleware replaced with one of its own).

    .. versionadded:: 0.1.0
    """
    with _stats_lock:
        keys = ("invalid_ids", "baggage_members_cut", "tracestate_members_cut", "invalid_request_ids")
        return {key: _stats[key] for key in keys}


def count(key: str, n: int = 1) -> None:
    if n:
        with _stats_lock:
            _stats[key] += n


def _cut_baggage(values: list[str] | None) -> str | None:
    """The incoming baggage cut at whole members to the W3C limits.

    Members that are not printable ASCII are dropped too: they are invalid
    baggage, and parsers log invalid members verbatim.
    """
    if not values:
        return None
    kept: list[str] = []
    size = -1  # no comma before the first member
    members = [member.strip(" \t") for value in values for member in value.split(",")]
    members = [member for member in members if member]
    for member in members:
        if len(kept) == BAGGAGE_MAX_MEMBERS or size + 1 + len(member) > BAGGAGE_MAX_BYTES:
            break
        if member.isascii() and member.isprintable():
            kept.append(member)
            size += 1 + len(member)
    count("baggage_members_cut", len(members) - len(kept))
    return ",".join(kept) or None


class _CuttingGetter(Getter[C]):
    """Reads the carrier through another getter, cutting the baggage header."""

    def __init__(self, getter: Getter[C]) -> None:
        self._getter = getter

    def get(self, carrier: C, key: str) -> list[str] | None:
        values = self._getter.get(carrier, key)
        if key == BAGGAGE:
            cut = _cut_baggage(values)
            return [cut] if cut else None
        if key == _TRACESTATE and values:
            # OpenTelemetry logs an invalid tracestate member verbatim: drop the
            # ones that could break a log line before it sees them.
            members = [member for value in values for member in value.split(",")]
            kept = [member for member in members if member.isascii() and member.isprintable()]
            count("tracestate_members_cut", len(members) - len(kept))
            return [",".join(kept)] if kept else None
        return values

    def keys(self, carrier: C) -> list[str]:
        return self._getter.keys(carrier)


def valid_ids(pairs: Mapping[str, object]) -> dict[str, str]:
    ids: dict[str, str] = {}
    for name, value in pairs.items():
        try:
            validate(name, value)
        except (TypeError, ValueError):
            count("invalid_ids")
        else:
            ids[name] = str(value)  # validate checked that it is a str
    if len(ids) > CORRELATION_MAX_IDS:
        count("invalid_ids", len(ids) - CORRELATION_MAX_IDS)
        ids = dict(list(ids.items())[:CORRELATION_MAX_IDS])
    return ids


def encode_ids(ids: Mapping[str, str]) -> str:
    """Correlation IDs as one header value, in W3C baggage syntax (values percent-encoded)."""
    return ",".join(f"{name}={quote(value, safe='')}" for name, value in ids.items())


def decode_ids(header: object, allowed: frozenset[str] | None = None) -> dict[str, str]:
    """What :func:`encode_ids` wrote, validated; invalid members are dropped and counted.

    With ``allowed``, names not in it are ignored.
    """
    pairs: dict[str, object] = {}
    if isinstance(header, str):
        for member in header.split(","):
            name, sep, value = member.partition("=")
            if sep and (allowed is None or name in allowed):
                pairs[name] = unquote(value)
    return valid_ids(pairs)


def _first_global_textmap() -> TextMapPropagator:
    """:data:`global_textmap` until its first call, which puts OpenTelemetry's own function in its place.

    ``opentelemetry.propagate`` is imported then, never with this module: with ``threadctx`` in
    ``OTEL_PROPAGATORS`` importing it loads :mod:`threadctx._propagator`, which needs this
    module (and ``_requests``, which imports it) whole.
    """
    global global_textmap  # noqa: PLW0603 - replaced once, by OpenTelemetry's function
    from opentelemetry import propagate  # at call time: see above

    global_textmap = propagate.get_global_textmap
    return global_textmap()


#: OpenTelemetry's global propagator, ``opentelemetry.propagate.get_global_textmap()``; call it as
#: ``_propagation.global_textmap()`` (a name imported from here keeps the first function, which works
#: but imports on every call).
global_textmap: Callable[[], TextMapPropagator] = _first_global_textmap


_fields_cache: tuple[object, frozenset[str], tuple[str, ...]] = (None, frozenset(), ())


def _cached_fields() -> tuple[object, frozenset[str], tuple[str, ...]]:
    """(propagator, its fields, every header extract reads): cached per propagator object."""
    global _fields_cache  # noqa: PLW0603 - a one-entry cache, replaced whole
    textmap = global_textmap()
    if _fields_cache[0] is not textmap:
        fields = frozenset(textmap.fields)
        _fields_cache = (textmap, fields, (BAGGAGE, *sorted(fields - {BAGGAGE})))
    return _fields_cache


def _context_fields() -> tuple[str, ...]:
    """Every header :func:`extract` reads: the propagators' and threadctx's own ``baggage``, once each."""
    return _cached_fields()[2]


def _propagator_sends_baggage() -> bool:
    return BAGGAGE in _cached_fields()[1]


K = TypeVar("K", bound=Hashable)
#: A key form -> (the propagator it was made for, every header extract reads, in that form).
_keyed_fields: dict[Callable[[str], Any], tuple[object, frozenset[Any]]] = {}


def context_header_keys(form: Callable[[str], K]) -> frozenset[K]:
    """Every header :func:`extract` reads, each as a carrier keys it: ``form(header)``.

    Cached per ``form`` (a module-level function) and configured propagator, so that an
    adapter asks "does this request carry a context?" with one set operation on its
    carrier's keys (``HTTP_TRACEPARENT`` in a WSGI environ, ``b"traceparent"`` in ASGI).
    """
    textmap = global_textmap()
    found = _keyed_fields.get(form)
    if found is None or found[0] is not textmap:
        found = _keyed_fields[form] = (textmap, frozenset(form(header) for header in _context_fields()))
    keys: frozenset[K] = found[1]
    return keys


def carries_context(carrier: CarrierT, getter: Getter[CarrierT]) -> bool:
    """Whether ``carrier`` has any header that :func:`extract` reads (its own ``baggage`` too).

    An adapter that can look at its carrier's keys asks :func:`context_header_keys` instead.
    """
    # Each header once, threadctx's own baggage among them.
    return any(getter.get(carrier, field) is not None for field in _context_fields())


def inject(
    carrier: CarrierT,
    *,
    context: Context | None = None,
    setter: Setter[CarrierT] = default_setter,
) -> CarrierT:
    """Write the context into outgoing headers, and return the carrier.

    The trace context goes through OpenTelemetry's configured propagators;
    correlation IDs on the allowlist (see :func:`allow_propagation`) go as W3C
    baggage members, next to any OpenTelemetry baggage (a correlation ID wins
    over a baggage entry of the same name).  When the configured propagators
    send no baggage (``OTEL_PROPAGATORS=tracecontext``), the ``baggage``
    header carries the allowlisted correlation IDs alone, never the
    context's OpenTelemetry baggage::

        headers = threadctx.inject({})
        urllib.request.Request(url, headers=headers)

    The ``baggage`` header is the one :class:`threadctx.CorrelationPropagator`
    writes (``OTEL_PROPAGATORS=tracecontext,threadctx``), made by the same
    code; with that propagator configured, OpenTelemetry's client
    instrumentations send it without a call at each site.

    Args:
        carrier: where to write, by default a ``dict`` of header names to values.
        context: the context to send, by default the current one.
        setter: how to write into the carrier.

    .. versionadded:: 0.1.0
    """
    context = context if context is not None else otel_context.get_current()
    if _propagator_sends_baggage():
        # The configured baggage propagator (``baggage`` or threadctx's) writes the header.
        global_textmap().inject(carrier, context=outgoing_baggage(context, keep_baggage=True), setter=setter)
    else:
        # Baggage is off: the configured propagators send no baggage, and threadctx's
        # own header carries the allowlisted correlation IDs and nothing else.
        global_textmap().inject(carrier, context=context, setter=setter)
        inject_baggage(carrier, context, setter, keep_baggage=False)
    return carrier


def outgoing_baggage(context: Context, *, keep_baggage: bool) -> Context:
    """The baggage that the ``baggage`` header carries for ``context``, as a context.

    The allowlisted correlation IDs, over the context's OpenTelemetry baggage
    (``keep_baggage``; a correlation ID wins over an entry of the same name)
    or alone.  Every outgoing ``baggage`` header, from :func:`inject` or from
    :class:`threadctx.CorrelationPropagator`, is made here.
    """
    allowed = _allowlist
    ids = {name: value for name, value in correlation(context).items() if name in allowed}
    if not keep_baggage:
        result = Context()
    elif not ids:
        return context
    else:
        # The IDs first: the header is cut at whole members (by OpenTelemetry's inject and by
        # receivers) to the W3C limits, and incoming baggage, which a caller chose, must not crowd
        # them out.
        result = otel_baggage.clear(context)
        entries: dict[str, object] = dict(ids)
        for name, value in otel_baggage.get_all(context).items():
            entries.setdefault(name, value)
        for name, value in entries.items():
            result = otel_baggage.set_baggage(name, value, result)
        return result
    for name, value in ids.items():
        result = otel_baggage.set_baggage(name, value, result)
    return result


def inject_baggage(
    carrier: CarrierT, context: Context, setter: Setter[CarrierT], *, keep_baggage: bool
) -> None:
    """Write the ``baggage`` header of :func:`outgoing_baggage`; nothing when it is empty."""
    _W3C_BAGGAGE.inject(carrier, context=outgoing_baggage(context, keep_baggage=keep_baggage), setter=setter)


def extract_baggage(
    carrier: CarrierT, context: Context, getter: Getter[CarrierT], *, keep_baggage: bool
) -> Context:
    """``context`` with the incoming ``baggage`` header read, as untrusted input.

    The header is cut to the W3C limits; its allowlisted members become
    correlation IDs (validated); its other members are added to the
    OpenTelemetry baggage (``keep_baggage``) or dropped.  Every incoming
    ``baggage`` header, read by :func:`extract` or by
    :class:`threadctx.CorrelationPropagator`, is read here.
    """
    cutting = getter if isinstance(getter, _CuttingGetter) else _CuttingGetter(getter)
    if keep_baggage:
        return ids_from_baggage(_W3C_BAGGAGE.extract(carrier, context=context, getter=cutting))
    entries = otel_baggage.get_all(_W3C_BAGGAGE.extract(carrier, context=Context(), getter=cutting))
    return _bind_incoming(entries, context)


def ids_from_baggage(context: Context) -> Context:
    """``context`` with its allowlisted baggage entries moved to the correlation IDs (validated)."""
    allowed = _allowlist
    entries = otel_baggage.get_all(context)
    for name in entries:
        if name in allowed:
            context = otel_baggage.remove_baggage(name, context)
    return _bind_incoming(entries, context)


def _bind_incoming(entries: Mapping[str, object], context: Context) -> Context:
    """``context`` with the allowlisted ``entries`` that pass validation bound as correlation IDs."""
    allowed = _allowlist
    incoming = {name: value for name, value in entries.items() if name in allowed}
    if not incoming:
        return context
    ids = {**correlation(context), **valid_ids(incoming)}
    return with_ids(dict(list(ids.items())[:CORRELATION_MAX_IDS]), context)


def extract(
    carrier: CarrierT,
    *,
    context: Context | None = None,
    getter: Getter[CarrierT] = default_getter,
    trace: bool = True,
) -> Context:
    """Read the context of incoming headers.

    The result is ``context`` (by default the current one) with the remote
    span as the current span, the incoming OpenTelemetry baggage (only when
    the configured propagators accept baggage), and the incoming baggage
    members named on the allowlist bound as correlation IDs (and removed from
    the baggage).  With ``OTEL_PROPAGATORS=tracecontext`` no other incoming
    baggage member is kept.  Input is untrusted: a malformed
    ``traceparent`` is ignored as the W3C spec says, baggage beyond
    :data:`BAGGAGE_MAX_MEMBERS` members or :data:`BAGGAGE_MAX_BYTES` bytes is
    cut at whole members, and invalid correlation values are dropped (counted
    in :func:`propagation_stats`), never bound.  The ``baggage`` header is
    read by the same code as :class:`threadctx.CorrelationPropagator`'s.

    Args:
        carrier: the incoming headers, by default a ``dict``.
        context: the context to add to, by default the current one.
        getter: how to read from the carrier.
        trace: ``False`` keeps the span of ``context`` and reads only baggage
            and correlation IDs (for use under a middleware that already
            started a server span).

    .. versionadded:: 0.1.0
    """
    base = context if context is not None else otel_context.get_current()
    cutting = _CuttingGetter(getter)
    if not _propagator_sends_baggage():
        # Baggage is off: threadctx's own header gives the allowlisted IDs only,
        # and no other member of the incoming baggage is kept.
        extracted = global_textmap().extract(carrier, context=base, getter=cutting) if trace else base
        return extract_baggage(carrier, extracted, cutting, keep_baggage=False)
    if not trace:
        return extract_baggage(carrier, base, cutting, keep_baggage=True)
    # The configured baggage propagator read the header (threadctx's has bound the IDs already);
    # allowlisted entries left in the baggage (by ``baggage``, or a middleware outside) become IDs.
    return ids_from_baggage(global_textmap().extract(carrier, context=base, getter=cutting))


@contextmanager
def attached(
    carrier: CarrierT,
    *,
    getter: Getter[CarrierT] = default_getter,
) -> Iterator[Context]:
    """Extract the context of ``carrier`` and make it current for a block.

    For a message consumer or a handler written by hand::

        with threadctx.attached(message.headers):
            process(message)

    The thread's previous context is restored on exit, also on an exception.
    Yields the attached context.

    Inside a request whose SERVER span is current (a framework
    instrumentation started it), that span stays the parent: only the
    carrier's baggage and correlation IDs are taken, as the middlewares do.

    .. versionadded:: 0.1.0
    """
    current = otel_trace.get_current_span()
    keep = current.is_recording() and getattr(current, "kind", None) is otel_trace.SpanKind.SERVER
    context = extract(carrier, getter=getter, trace=not keep)
    token = otel_context.attach(context)
    try:
        yield context
    finally:
        otel_context.detach(token)


def process_carrier(context: Context | None = None) -> dict[str, str]:
    """Headers that carry ``context`` to a process of the same application.

    W3C ``traceparent``/``tracestate`` and ``baggage`` whatever propagators
    are configured, plus every correlation ID (not only the allowlist).
    """
    context = context if context is not None else otel_context.get_current()
    carrier: dict[str, str] = {}
    _TRACE.inject(carrier, context=context, setter=default_setter)
    _W3C_BAGGAGE.inject(carrier, context=context, setter=default_setter)
    ids = correlation(context)
    if ids:
        carrier[_PROCESS_IDS] = encode_ids(ids)
    return carrier


def process_context(carrier: Mapping[str, str]) -> Context:
    """The context that :func:`process_carrier` sent, on a clean base context."""
    cutting = _CuttingGetter(default_getter)
    context = _TRACE.extract(carrier, context=Context(), getter=cutting)
    context = _W3C_BAGGAGE.extract(carrier, context=context, getter=cutting)
    return with_ids(decode_ids(carrier.get(_PROCESS_IDS)), context)
