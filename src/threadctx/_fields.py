"""Context -> log fields: the one stamping function the logging filter, structlog and loguru share.

:class:`Stamping` says what to write (a preset's field names, the correlation IDs'
prefix and defaults, the service, environment and version as written) and holds what
follows from it, computed once. :func:`context_fields` is the pure function from an
OpenTelemetry context to the fields; :func:`marked_fields` is the other half of the
cross-thread stamp protocol (a record stamped in one thread carries :data:`MARKER`,
and a filter in another thread writes the ids it holds, not its own thread's);
:func:`resource_values` reads the service, environment and version from a tracer
provider's resource. Nothing here keeps state or reports:
:class:`threadctx.ContextFilter` caches and reports around these.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from opentelemetry import trace

from threadctx._compat import span_key
from threadctx._correlation import CORRELATION_KEY
from threadctx._text import printable
from threadctx._vendors import FieldNames, format_ids, from_resource

#: The key trace.get_current_span() reads; its call costs more than the read (once per context).
_SPAN_KEY = span_key()

__all__ = [
    "MARKER",
    "RESERVED",
    "Stamping",
    "context_fields",
    "marked_fields",
    "printable",
    "resource_values",
]

MARKER = "_threadctx"
"""The filter's own mark on a record it stamped: trace id, span id and flags of the stamping context
(32, 16 and 2 hex digits, one string), or ``"-"`` without a valid span.

Its leading underscore keeps it out of python-json-logger's output. A record that
carries it was stamped already (in the producing thread, before a ``QueueHandler``):
a filter in another thread takes the ids from it, never from its own thread's context.
"""
_NO_SPAN = "-"
_NO_IDS: Mapping[str, str] = MappingProxyType({})
#: The W3C trace flags byte as two lowercase hex digits.
_FLAGS = [format(flags, "02x") for flags in range(256)]
#: A record's own attributes (and what Formatter adds): never shadowed by a correlation ID.
RESERVED = frozenset(vars(logging.LogRecord("n", logging.INFO, "p", 1, "m", None, None))) | {
    "message",
    "asctime",
}


@dataclass(frozen=True)
class Stamping:
    """What to stamp, and the tables that follow from it (computed once, read on every new context).

    Args:
        names: The preset's field names and formats.
        prefix: Prepended to each correlation ID's field name.
        correlation: Whether to stamp correlation IDs at all.
        defaults: Correlation ID name -> the value written where none is bound (escaped).
        static: Service, environment and version under their field names, as written.
        project: The Google Cloud project, for the ``gcp`` id format.
    """

    names: FieldNames
    prefix: str = ""
    correlation: bool = True
    defaults: Mapping[str, str] = field(default_factory=dict)
    static: Mapping[str, str] = field(default_factory=dict)
    project: str | None = None
    # Derived, for the hot path: which trace fields to write, the placeholders, the names
    # a correlation ID may not take, the defaults under their field names, and whether to mark.
    trace_names: tuple[str | None, str | None, str | None, str | None] = field(init=False, repr=False)
    missing: Mapping[str, Any] = field(init=False, repr=False)
    protected: frozenset[str] = field(init=False, repr=False)
    default_fields: Mapping[str, str] = field(init=False, repr=False)
    constant: Mapping[str, str] = field(init=False, repr=False)  # static, then default_fields
    hex_ids: bool = field(init=False, repr=False)
    partial: bool = field(init=False, repr=False)  # a trace field left out (its key is None)
    marks: bool = field(init=False, repr=False)

    def __post_init__(self) -> None:
        names = self.names
        trace_names = (names.trace_id, names.span_id, names.trace_flags, names.trace_sampled)
        placeholders = (names.missing_trace_id, names.missing_span_id, "00", False)
        missing = {
            key: value for key, value in zip(trace_names, placeholders, strict=True) if key is not None
        }
        protected = RESERVED | set(missing) | {MARKER}
        protected |= {name for name in (names.service, names.env, names.version) if name is not None}
        defaults = {self.prefix + key: value for key, value in self.defaults.items()}
        default_fields = {key: value for key, value in defaults.items() if key not in protected}
        derived = {
            "trace_names": trace_names,
            "missing": missing,
            "protected": frozenset(protected),
            "default_fields": default_fields,
            "constant": {**self.static, **default_fields},
            "hex_ids": names.id_format == "hex",
            "partial": None in trace_names,
            "marks": names.trace_id is not None or names.span_id is not None,
        }
        for name, value in derived.items():
            object.__setattr__(self, name, value)


def span_fields(
    stamping: Stamping, span: tuple[int, int, int] | None, ids: Mapping[str, str]
) -> dict[str, Any]:
    """The fields for a span's (trace id, span id, flags), or ``None``, and correlation IDs.

    Once per context (a cache's miss path, which short requests take often): kept lean.
    """
    out: dict[Any, Any]  # str keys once None is dropped
    if span is not None:
        trace_int, span_int, flags_int = span
        trace_hex, span_hex, flags = (
            format(trace_int, "032x"),
            format(span_int, "016x"),
            _FLAGS[flags_int & 0xFF],
        )
        mark = trace_hex + span_hex + flags
        if not stamping.hex_ids:
            trace_hex, span_hex = format_ids(stamping.names, trace_int, span_int, stamping.project)
        # One dict display is several times faster than filling it key by key; a field the
        # preset leaves out has the key None, dropped right after.
        key_trace, key_span, key_flags, key_sampled = stamping.trace_names
        out = {key_trace: trace_hex, key_span: span_hex, key_flags: flags, key_sampled: flags_int & 1 == 1}
        if stamping.partial:
            out.pop(None, None)
    else:
        mark = _NO_SPAN
        out = dict(stamping.missing) if stamping.names.without_span == "placeholders" else {}
    if stamping.constant:
        out.update(stamping.constant)
    prefix, protected = stamping.prefix, stamping.protected
    for name, value in ids.items():
        key = prefix + name
        if key not in protected:  # never shadow the record's own attributes or the trace fields
            # Values were validated by bind(); escaping again covers values set by other means.
            out[key] = value if value.isprintable() else printable(value)
    if stamping.marks:
        out[MARKER] = mark
    return out


def context_fields(stamping: Stamping, context: Mapping[str, object]) -> dict[str, Any]:
    """The fields for an OpenTelemetry ``context``: its span's ids and its correlation IDs.

    A new dict, with :data:`MARKER` when the stamping writes trace fields. Raises
    whatever a broken span raises; callers that must not raise catch it.
    """
    # What trace.get_current_span() and correlation() read, without their calls (a Context is a dict).
    span = context.get(_SPAN_KEY) if _SPAN_KEY else trace.get_current_span(context)  # type: ignore[arg-type]
    span_context = span.get_span_context() if span is not None else trace.INVALID_SPAN_CONTEXT  # type: ignore[attr-defined]
    # A SpanContext is a tuple (trace_id, span_id, is_remote, trace_flags, trace_state, is_valid),
    # as its class declares: one unpack instead of four property calls.
    trace_id, span_id, _, flags, _, valid = span_context
    ids = (context.get(CORRELATION_KEY) or _NO_IDS) if stamping.correlation else _NO_IDS
    return span_fields(stamping, (trace_id, span_id, flags) if valid else None, ids)  # type: ignore[arg-type]


def marked_fields(stamping: Stamping, mark: object) -> dict[str, Any]:
    """The fields for a record another thread stamped: the ids its mark holds, no correlation IDs."""
    text = str(mark)
    try:
        span: tuple[int, int, int] | None = (int(text[:32], 16), int(text[32:48], 16), int(text[48:], 16))
    except ValueError:
        span = None  # "-" (no span), or not ours after all
    return span_fields(stamping, span, _NO_IDS)


def resource_values(
    names: FieldNames, given: Mapping[str, str | None], attributes: Mapping[str, object]
) -> dict[str, str]:
    """Service, environment and version under ``names``' field names: ``given`` ones, else the resource's.

    ``given`` maps ``service``, ``env`` and ``version`` to an option's value or ``None``;
    ``attributes`` are the tracer provider's resource attributes. Fields the preset
    leaves out are left out; unknown values are ``""``.
    """
    out = {}
    for what, value in given.items():
        name = getattr(names, what)
        if name is not None:
            out[name] = printable(value if value is not None else from_resource(attributes, what) or "")
    return out
