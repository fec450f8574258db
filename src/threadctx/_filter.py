"""The logging filter that stamps each record with its thread's trace context and correlation IDs."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

from opentelemetry import context as otel_context
from opentelemetry import trace

from threadctx._correlation import correlation

__all__ = ["PRESETS", "ContextFilter", "FieldNames", "instrument_logging", "uninstrument_logging"]

IdFormat = Literal["hex", "datadog", "gcp"]


@dataclass(frozen=True)
class FieldNames:
    """The record attribute names a preset writes; ``None`` leaves a field out.

    Attributes:
        trace_id: The trace id (its format depends on ``id_format``).
        span_id: The span id.
        trace_flags: The W3C trace flags, two lowercase hex digits.
        trace_sampled: Whether the trace is sampled, a bool.
        service: The ``service.name`` of the tracer provider's resource.
        id_format: ``"hex"`` (W3C: 32 and 16 lowercase hex digits), ``"datadog"``
            (unsigned decimal of the trace id's low 64 bits and of the span id),
            or ``"gcp"`` (``projects/PROJECT/traces/TRACE_ID`` when a project id
            is given, else the hex trace id).
        missing_trace_id: The trace id written when there is no valid span.
        missing_span_id: The span id written when there is no valid span.
    """

    trace_id: str | None = "trace_id"
    span_id: str | None = "span_id"
    trace_flags: str | None = "trace_flags"
    trace_sampled: str | None = "trace_sampled"
    service: str | None = None
    id_format: IdFormat = "hex"
    missing_trace_id: str = "0" * 32
    missing_span_id: str = "0" * 16


PRESETS: dict[str, FieldNames] = {
    # OpenTelemetry log data model (TraceId, SpanId, TraceFlags), in Python's snake case.
    "otel": FieldNames(),
    # opentelemetry-instrumentation-logging's LoggingInstrumentor: the same names
    # and placeholders, so formats written for it keep working.
    "otel-python": FieldNames(
        trace_id="otelTraceID",
        span_id="otelSpanID",
        trace_flags=None,
        trace_sampled="otelTraceSampled",
        service="otelServiceName",
        missing_trace_id="0",
        missing_span_id="0",
    ),
    # Elastic Common Schema: trace.id, span.id, service.name.
    "ecs": FieldNames(
        trace_id="trace.id", span_id="span.id", trace_flags=None, trace_sampled=None, service="service.name"
    ),
    # Datadog log-trace correlation: dd.trace_id / dd.span_id as unsigned decimal
    # (the low 64 bits of the OpenTelemetry trace id), dd.service.
    "datadog": FieldNames(
        trace_id="dd.trace_id",
        span_id="dd.span_id",
        trace_flags=None,
        trace_sampled=None,
        service="dd.service",
        id_format="datadog",
        missing_trace_id="0",
        missing_span_id="0",
    ),
    # Google Cloud Logging structured logs: the special JSON fields that link a
    # log entry to its trace.
    "gcp": FieldNames(
        trace_id="logging.googleapis.com/trace",
        span_id="logging.googleapis.com/spanId",
        trace_flags=None,
        trace_sampled="logging.googleapis.com/trace_sampled",
        id_format="gcp",
        missing_trace_id="",
        missing_span_id="",
    ),
    # Correlation IDs only (for the OpenTelemetry SDK's LoggingHandler, which
    # records the span itself).
    "correlation": FieldNames(trace_id=None, span_id=None, trace_flags=None, trace_sampled=None),
}

_FIELD_KEYS = ("trace_id", "span_id", "trace_flags", "trace_sampled", "service")
_PLAIN_RECORD = vars(logging.LogRecord("n", logging.INFO, "p", 1, "m", None, None))
#: How many attributes a record has before anything (extra=, a filter) adds one.
_PLAIN_RECORD_SIZE = len(_PLAIN_RECORD)
_RESERVED = frozenset(_PLAIN_RECORD) | {"message", "asctime"}
_CACHE_SIZE = 512


def _printable(text: str) -> str:
    """``text`` with every non-printable character escaped, so a value cannot forge a line."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


class ContextFilter(logging.Filter):
    """Stamp every record with the current trace context and correlation IDs.

    Attach it to handlers (a logger's filters miss records from its child
    loggers)::

        handler.addFilter(threadctx.ContextFilter())
        handler.setFormatter(logging.Formatter("%(trace_id)s %(span_id)s %(request_id)s %(message)s"))

    Or from ``dictConfig``::

        "filters": {"ctx": {"()": "threadctx.ContextFilter", "preset": "ecs"}}

    Every field the preset names is always set (placeholders without a valid
    span), so ``%(trace_id)s`` never fails. Each correlation ID becomes an
    attribute of its own (``prefix`` + name); a correlation ID is not set
    where a format would need it and none is bound, so give such formats a
    default with ``defaults=`` (Python 3.10+) or bind it everywhere.

    The filter adds, it never rewrites: a value passed with ``extra=`` wins,
    and a record already stamped (by a filter in the producing thread, before a
    ``QueueHandler``) keeps its values. It never raises into the logging call
    and always returns ``True``.

    Args:
        preset: One of :data:`PRESETS`: ``"otel"`` (default), ``"otel-python"``,
            ``"ecs"``, ``"datadog"``, ``"gcp"``, ``"correlation"``.
        fields: Overrides of the preset's field names, e.g.
            ``{"trace_id": "traceId", "trace_flags": None}``.
        prefix: Prepended to each correlation ID's attribute name.
        correlation: Whether to stamp correlation IDs at all.
        project_id: The Google Cloud project, for the ``gcp`` preset's trace field.
        service_name: The service name to write; by default the ``service.name``
            of the global tracer provider's resource, where there is one.
        name: As for ``logging.Filter``.

    Raises:
        ValueError: an unknown preset or field key.

    .. versionadded:: 0.1.0
    """

    def __init__(
        self,
        preset: str = "otel",
        *,
        fields: Mapping[str, str | None] | None = None,
        prefix: str = "",
        correlation: bool = True,
        project_id: str | None = None,
        service_name: str | None = None,
        name: str = "",
    ) -> None:
        super().__init__(name)
        try:
            names = PRESETS[preset]
        except KeyError:
            raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}") from None
        if fields:
            unknown = set(fields) - set(_FIELD_KEYS)
            if unknown:
                raise ValueError(
                    f"unknown field key(s) {', '.join(sorted(unknown))}; valid keys: {', '.join(_FIELD_KEYS)}"
                )
            names = replace(names, **fields)  # type: ignore[arg-type]  # keys checked above
        self.preset = preset
        self.names = names
        self.prefix = prefix
        self.stamp_correlation = correlation
        self.project_id = project_id
        self.service_name = service_name
        self._service_name = _printable(service_name) if service_name is not None else None
        # Where a record already stamped by a ContextFilter shows it.
        self._marker = names.trace_id or names.span_id
        self._cache: dict[int, tuple[object, dict[str, Any]]] = {}
        self._reported = False
        self._placeholders = self._fields(None, {})

    # The hot path: one get_current, one cache hit, one dict update.
    def filter(self, record: logging.LogRecord) -> bool:
        """Stamp ``record``; always return ``True``."""
        attributes = record.__dict__
        if len(attributes) == _PLAIN_RECORD_SIZE:
            # Nothing was added to this record (no extra=, no earlier stamp):
            # nothing to preserve, so one update does it.
            attributes.update(self._current())
            return True
        if self._marker is not None and self._marker in attributes:
            return True  # stamped already, in the thread that produced it
        for key, value in self._current().items():
            attributes.setdefault(key, value)  # extra= and earlier values win
        return True

    def _options(self) -> tuple[object, ...]:
        """What decides the fields this filter writes (for instrument_logging's comparison)."""
        return (
            self.preset,
            self.names,
            self.prefix,
            self.stamp_correlation,
            self.project_id,
            self.service_name,
        )

    def fields(self, context: object | None = None) -> dict[str, Any]:
        """The attributes this filter would stamp for ``context`` (default: the current one).

        A new dict, for integrations that carry fields in their own structures.
        """
        return dict(self._current() if context is None else self._compute(context))

    def _current(self) -> dict[str, Any]:
        """The (shared, cached) fields of the current context; placeholders if it can't be read."""
        try:
            context = otel_context.get_current()
            entry = self._cache.get(id(context))
            if entry is not None and entry[0] is context:
                return entry[1]
            return self._compute(context)
        except Exception as exc:  # a logging call must never fail because of us
            self._report(exc)
            return self._placeholders

    def _compute(self, context: Any) -> dict[str, Any]:
        span_context = trace.get_current_span(context).get_span_context()
        ids = correlation(context) if self.stamp_correlation else {}
        fields = self._fields(span_context if span_context.is_valid else None, ids)
        if len(self._cache) >= _CACHE_SIZE:
            self._cache.clear()
        self._cache[id(context)] = (context, fields)
        return fields

    def _fields(self, span_context: trace.SpanContext | None, ids: Mapping[str, str]) -> dict[str, Any]:
        names = self.names
        out: dict[str, Any] = {}
        if span_context is None:
            trace_id, span_id, flags, sampled = names.missing_trace_id, names.missing_span_id, "00", False
        else:
            trace_id, span_id = self._format_ids(span_context.trace_id, span_context.span_id)
            flags = format(span_context.trace_flags, "02x")
            sampled = span_context.trace_flags.sampled
        for key, value in (
            (names.trace_id, trace_id),
            (names.span_id, span_id),
            (names.trace_flags, flags),
            (names.trace_sampled, sampled),
        ):
            if key is not None:
                out[key] = value
        if names.service is not None:
            out[names.service] = self._service()
        for name, value in ids.items():
            key = self.prefix + name
            if key not in _RESERVED:  # never shadow the record's own attributes
                # Values were validated by bind(); escaping again costs nothing
                # here (once per context) and covers values set by other means.
                out.setdefault(key, _printable(value))
        return out

    def _format_ids(self, trace_id: int, span_id: int) -> tuple[str, str]:
        fmt = self.names.id_format
        if fmt == "datadog":
            return str(trace_id & 0xFFFF_FFFF_FFFF_FFFF), str(span_id)
        trace_hex, span_hex = format(trace_id, "032x"), format(span_id, "016x")
        if fmt == "gcp" and self.project_id:
            return f"projects/{self.project_id}/traces/{trace_hex}", span_hex
        return trace_hex, span_hex

    def _service(self) -> str:
        if self._service_name is not None:
            return self._service_name
        try:
            resource = getattr(trace.get_tracer_provider(), "resource", None)
            if resource is None:
                return ""  # maybe no provider yet: look again on the next new context
            name = resource.attributes.get("service.name")
        except Exception as exc:  # a provider of someone else's that fails: no service name
            self._report(exc)
            return ""
        self._service_name = _printable(str(name or ""))
        return self._service_name

    def _report(self, exc: BaseException) -> None:
        """Say once, on stderr and not through logging (no recursion), that stamping failed."""
        if self._reported:
            return
        self._reported = True
        with contextlib.suppress(Exception):  # stderr itself failing: nothing left to tell
            sys.stderr.write(
                f"threadctx.ContextFilter: could not read the context "
                f"({type(exc).__name__}: {_printable(str(exc))[:200]}); "
                "records get placeholders. Reported once.\n"
            )


_installed: list[tuple[logging.Handler, ContextFilter]] = []


def _all_handlers() -> list[logging.Handler]:
    loggers: list[logging.Logger] = [logging.getLogger()]
    loggers += [
        logger
        for logger in list(logging.Logger.manager.loggerDict.values())
        if isinstance(logger, logging.Logger)
    ]
    seen: dict[int, logging.Handler] = {}
    for logger in loggers:
        for handler in logger.handlers:
            seen.setdefault(id(handler), handler)
    return list(seen.values())


def instrument_logging(preset: str = "otel", **options: Any) -> ContextFilter:
    """Attach a :class:`ContextFilter` to every handler configured now.

    Filters go on handlers, not loggers, so that records from child loggers
    are stamped too. Call it after the handlers are configured (for example
    after ``logging.config.fileConfig``); calling it again attaches the filter
    to handlers added since, and never twice to one handler.

    The manual way is ``handler.addFilter(threadctx.ContextFilter(...))`` on
    each handler, or a ``filters`` entry in ``dictConfig``.

    Args:
        preset: As for :class:`ContextFilter`.
        **options: The other :class:`ContextFilter` options.

    Returns:
        The filter instance (the one already installed, where there is one and
        the options are the same).

    Raises:
        ValueError: the options differ from those of the filter already installed;
            call :func:`uninstrument_logging` first.
    """
    wanted = ContextFilter(preset, **options)
    if _installed:
        current = _installed[0][1]
        if current._options() != wanted._options():
            raise ValueError("logging is instrumented with other options; call uninstrument_logging() first")
        wanted = current
    done = {id(handler) for handler, _ in _installed}
    for handler in _all_handlers():
        if id(handler) not in done:
            handler.addFilter(wanted)
            _installed.append((handler, wanted))
    return wanted


def uninstrument_logging() -> None:
    """Remove every filter that :func:`instrument_logging` attached, and nothing else."""
    while _installed:
        handler, installed = _installed.pop()
        handler.removeFilter(installed)
