"""The logging filter that stamps each record with its thread's trace context and correlation IDs."""

from __future__ import annotations

import contextlib
import logging
import sys
import weakref
from collections.abc import Mapping
from dataclasses import replace
from os import getpid
from threading import get_ident
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace

from threadctx._compat import span_key
from threadctx._correlation import CORRELATION_KEY
from threadctx._text import printable
from threadctx._vendors import (
    NAME_KEYS,
    PRESETS,
    FieldNames,
    WithoutSpan,
    format_ids,
    from_resource,
    gcp_project,
)

#: The key trace.get_current_span() reads; its call costs more than the read (once per context).
_SPAN_KEY = span_key()

__all__ = ["PRESETS", "ContextFilter", "FieldNames", "instrument_logging", "uninstrument_logging"]

MARKER = "_threadctx"
"""The filter's own mark on a record it stamped: trace id, span id and flags of the stamping context
(32, 16 and 2 hex digits, one string), or ``"-"`` without a valid span.

Its leading underscore keeps it out of python-json-logger's output. A record that
carries it was stamped already (in the producing thread, before a ``QueueHandler``):
a filter in another thread takes the ids from it, never from its own thread's context.
"""
_NO_SPAN = "-"
_NO_IDS: Mapping[str, str] = {}
#: The W3C trace flags byte as two lowercase hex digits.
_FLAGS = [format(flags, "02x") for flags in range(256)]
_PLAIN_RECORD = vars(logging.LogRecord("n", logging.INFO, "p", 1, "m", None, None))
#: How many attributes a record has before anything (extra=, a filter) adds one.
_PLAIN_RECORD_SIZE = len(_PLAIN_RECORD)
RESERVED = frozenset(_PLAIN_RECORD) | {"message", "asctime"}
_CACHE_SIZE = 512


class ContextFilter(logging.Filter):
    """Stamp every record with the current trace context and correlation IDs.

    Attach it to handlers (a logger's filters miss records from its child
    loggers)::

        handler.addFilter(threadctx.ContextFilter(defaults={"request_id": "-"}))
        handler.setFormatter(logging.Formatter("%(trace_id)s %(span_id)s %(request_id)s %(message)s"))

    Or from ``dictConfig``::

        "filters": {"ctx": {"()": "threadctx.ContextFilter", "defaults": {"request_id": "-"}}}

    Each correlation ID becomes an attribute of its own (``prefix`` + name).
    One named in ``defaults`` is always set, to the bound value or the default,
    so a format that prints it works outside a request too (the answer to
    "Formatting field not found in record"). The trace fields are always set
    with placeholders where the preset writes them (``otel``, ``otel-python``,
    ``datadog``), and left out without a valid span where a placeholder would
    pass for a real id (``ecs``, ``gcp``, ``newrelic``); ``without_span``
    chooses.

    The filter adds, it never rewrites: a value passed with ``extra=``, or put
    on the record by another tool (ddtrace, LoggingInstrumentor), wins. A record
    it stamped carries its mark; a filter in another thread (a
    ``QueueListener``'s handler) takes the ids from that mark, not from its own
    thread. It never raises into the logging call and always returns ``True``.

    Args:
        preset: One of :data:`PRESETS`: ``"otel"`` (default), ``"otel-python"``,
            ``"ecs"``, ``"datadog"``, ``"gcp"``, ``"newrelic"``, ``"correlation"``.
        fields: Overrides of the preset's field names, e.g.
            ``{"trace_id": "traceId", "trace_flags": None}``.
        prefix: Prepended to each correlation ID's attribute name.
        correlation: Whether to stamp correlation IDs at all.
        defaults: Correlation ID name -> the value written where none is bound.
        without_span: ``"placeholders"`` or ``"omit"``: what to write without a
            valid span; by default the preset's choice.
        project_id: The Google Cloud project, for the ``gcp`` preset's trace field;
            by default the resource's ``cloud.account.id`` (when ``cloud.provider``
            is ``gcp``) or ``GOOGLE_CLOUD_PROJECT``.
        service_name: The service name to write; by default the ``service.name``
            of the global tracer provider's resource, where there is one.
        env: The deployment environment (``datadog``'s ``dd.env``); by default the resource's.
        version: The service version (``datadog``'s ``dd.version``); by default the resource's.
        name: As for ``logging.Filter``.

    Raises:
        ValueError: an unknown preset, field key or ``without_span`` value.

    .. versionadded:: 0.1.0
    """

    def __init__(
        self,
        preset: str = "otel",
        *,
        fields: Mapping[str, str | None] | None = None,
        prefix: str = "",
        correlation: bool = True,
        defaults: Mapping[str, str] | None = None,
        without_span: WithoutSpan | None = None,
        project_id: str | None = None,
        service_name: str | None = None,
        env: str | None = None,
        version: str | None = None,
        name: str = "",
    ) -> None:
        super().__init__(name)
        try:
            names = PRESETS[preset]
        except KeyError:
            raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}") from None
        if fields:
            unknown = set(fields) - set(NAME_KEYS)
            if unknown:
                raise ValueError(
                    f"unknown field key(s) {', '.join(sorted(unknown))}; valid keys: {', '.join(NAME_KEYS)}"
                )
            names = replace(names, **fields)  # type: ignore[arg-type]  # keys checked above
        if without_span is not None:
            if without_span not in ("placeholders", "omit"):
                raise ValueError(f"without_span must be 'placeholders' or 'omit', not {without_span!r}")
            names = replace(names, without_span=without_span)
        self.preset = preset
        self.names = names
        self.prefix = prefix
        self.stamp_correlation = correlation
        self.defaults = {str(key): printable(str(value)) for key, value in (defaults or {}).items()}
        self.project_id = project_id
        self.service_name = service_name
        self.env = env
        self.version = version
        # Service, env and version as written ("" until the resource is read, see _resolve).
        given = {"service": service_name, "env": env, "version": version}
        self._resource_values = {
            what: printable(value) if value is not None else ""
            for what, value in given.items()
            if getattr(names, what) is not None
        }
        self._unresolved = {what for what in self._resource_values if given[what] is None}
        self._static = self._named(self._resource_values)
        self._project = project_id
        self._wants_project = names.id_format == "gcp" and project_id is None
        self._pending = bool(self._unresolved) or self._wants_project
        self._marks = names.trace_id is not None or names.span_id is not None
        # Precomputed for _build: which trace fields to write, and the correlation IDs' defaults.
        self._trace_names = (names.trace_id, names.span_id, names.trace_flags, names.trace_sampled)
        placeholders = (names.missing_trace_id, names.missing_span_id, "00", False)
        self._missing = {
            key: value for key, value in zip(self._trace_names, placeholders, strict=True) if key is not None
        }
        self._protected = RESERVED | set(self._missing) | {MARKER}
        self._protected |= {getattr(names, what) for what in self._resource_values}
        self._default_fields = {
            prefix + key: value for key, value in self.defaults.items() if prefix + key not in self._protected
        }
        self._cache: dict[int, tuple[weakref.ref[Any], dict[str, Any]]] = {}
        self._stamped: dict[str, dict[str, Any]] = {}
        self._reported: set[str] = set()
        self._placeholders = self._build(None, {})

    # The hot path: one get_current, one cache hit (inlined), one dict update.
    def filter(self, record: logging.LogRecord) -> bool:
        """Stamp ``record``; always return ``True``."""
        attributes = record.__dict__
        if len(attributes) == _PLAIN_RECORD_SIZE:
            # Nothing was added to this record (no extra=, no earlier stamp):
            # nothing to preserve, so one update does it.
            try:
                context = otel_context.get_current()
                entry = self._cache.get(id(context))
                if entry is not None and entry[0]() is context:
                    attributes.update(entry[1])
                    return True
            except Exception:  # _current() reads it again, and reports
                pass
            attributes.update(self._current())
            return True
        try:
            stamp = attributes.get(MARKER)
            if stamp is None or (record.thread == get_ident() and record.process == getpid()):
                fields = self._current()
            else:  # stamped in another thread or process: its ids, not this thread's
                fields = self._from_stamp(stamp)
            for key, value in fields.items():
                attributes.setdefault(key, value)  # extra=, other tools' and earlier values win
        except Exception as exc:  # a logging call must never fail because of us
            self._report("could not stamp a record", exc)
        return True

    def _options(self) -> tuple[object, ...]:
        """What decides the fields this filter writes (for instrument_logging's comparison)."""
        return (
            self.preset,
            self.names,
            self.prefix,
            self.stamp_correlation,
            self.defaults,
            self.project_id,
            self.service_name,
            self.env,
            self.version,
        )

    def fields(self, context: object | None = None) -> dict[str, Any]:
        """The attributes this filter would stamp for ``context`` (default: the current one).

        A new dict, for integrations that carry fields in their own structures
        (without the filter's record mark).
        """
        found = self._current() if context is None else self._compute(context)
        return {key: value for key, value in found.items() if key != MARKER}

    def _current(self) -> dict[str, Any]:
        """The (shared, cached) fields of the current context; placeholders if it can't be read."""
        try:
            context = otel_context.get_current()
            entry = self._cache.get(id(context))
            if entry is not None and entry[0]() is context:
                return entry[1]
            return self._compute(context)
        except Exception as exc:  # a logging call must never fail because of us
            self._report("could not read the context", exc)
            return self._placeholders

    def _compute(self, context: Any) -> dict[str, Any]:
        if self._pending:
            self._resolve()
        # Read before the fields are built: if another thread resolves meanwhile, what is built here
        # from the values before must not be cached after it.
        cacheable = not self._pending
        # What trace.get_current_span() and correlation() read, without their calls (a Context is a dict).
        span = context.get(_SPAN_KEY) if _SPAN_KEY else trace.get_current_span(context)
        span_context = span.get_span_context() if span is not None else trace.INVALID_SPAN_CONTEXT
        # A SpanContext is a tuple (trace_id, span_id, is_remote, trace_flags, trace_state, is_valid),
        # as its class declares: one unpack instead of four property calls.
        trace_id, span_id, _, flags, _, valid = span_context
        fields = self._build(
            (trace_id, span_id, flags) if valid else None,
            (context.get(CORRELATION_KEY) or _NO_IDS) if self.stamp_correlation else _NO_IDS,
        )
        if cacheable:  # cache only what will not change (see _resolve)
            if len(self._cache) >= _CACHE_SIZE:
                self._cache.clear()
            # A weak reference: the cache must not keep ended requests' contexts (and spans) alive.
            self._cache[id(context)] = (weakref.ref(context), fields)
        return fields

    def _from_stamp(self, stamp: object) -> dict[str, Any]:
        """The fields for a record another thread stamped: its ids, this filter's names, no correlation."""
        fields = self._stamped.get(stamp) if isinstance(stamp, str) else None
        if fields is None:
            text = str(stamp)
            try:
                span: tuple[int, int, int] | None = (
                    int(text[:32], 16),
                    int(text[32:48], 16),
                    int(text[48:], 16),
                )
            except ValueError:
                span = None  # "-" (no span), or not ours after all
            fields = self._build(span, _NO_IDS)
            if len(self._stamped) >= _CACHE_SIZE:
                self._stamped.clear()
            self._stamped[text] = fields
        return fields

    def _build(self, span: tuple[int, int, int] | None, ids: Mapping[str, str]) -> dict[str, Any]:
        """The fields for a span's (trace id, span id, flags), or ``None``, and correlation IDs.

        Once per context (the cache's miss path, which short requests take often): kept lean.
        """
        names = self.names
        out: dict[Any, Any]  # str keys once None is dropped
        if span is not None:
            trace_int, span_int, flags_int = span
            trace_hex, span_hex, flags = (
                format(trace_int, "032x"),
                format(span_int, "016x"),
                _FLAGS[flags_int & 0xFF],
            )
            stamp = trace_hex + span_hex + flags
            if names.id_format != "hex":
                trace_hex, span_hex = format_ids(names, trace_int, span_int, self._project)
            # One dict display is several times faster than filling it key by key; a field the
            # preset leaves out has the key None, dropped right after.
            key_trace, key_span, key_flags, key_sampled = self._trace_names
            out = {
                key_trace: trace_hex,
                key_span: span_hex,
                key_flags: flags,
                key_sampled: flags_int & 1 == 1,
            }
            out.pop(None, None)
        else:
            stamp = _NO_SPAN
            out = dict(self._missing) if names.without_span == "placeholders" else {}
        out.update(self._static)
        out.update(self._default_fields)
        prefix, protected = self.prefix, self._protected
        for name, value in ids.items():
            key = prefix + name
            if key not in protected:  # never shadow the record's own attributes or the trace fields
                # Values were validated by bind(); escaping again covers values set by other means.
                out[key] = value if value.isprintable() else printable(value)
        if self._marks:
            out[MARKER] = stamp
        return out

    def _named(self, values: Mapping[str, str]) -> dict[str, str]:
        """``values`` of service, env and version under this filter's field names."""
        return {getattr(self.names, what): value for what, value in values.items()}

    def _resolve(self) -> None:
        """Read what the tracer provider's resource gives, once it has one.

        Until then nothing is cached, so that lines logged before the provider
        was set (start-up, idle threads) do not keep an empty service name.
        """
        try:
            provider = trace.get_tracer_provider()
            resource = getattr(provider, "resource", None)
            if resource is None and isinstance(provider, trace.ProxyTracerProvider):
                if self._wants_project:
                    self._project = gcp_project({})
                return  # no provider yet: look again on the next record
            attributes = resource.attributes if resource is not None else {}
        except Exception as exc:  # a provider of someone else's that fails: resolved as unknown
            self._report("could not read the tracer provider's resource", exc)
            attributes = {}
        for what in self._unresolved:
            self._resource_values[what] = printable(from_resource(attributes, what) or "")
        self._static = self._named(self._resource_values)
        if self._wants_project:
            self._project = gcp_project(attributes)
            if self._project is None:
                self._report(
                    "the gcp preset has no project (pass project_id=, set GOOGLE_CLOUD_PROJECT, or "
                    "cloud.provider=gcp and cloud.account.id on the resource)",
                    None,
                    "Trace fields hold the bare trace id, which Cloud Logging does not link.",
                )
        self._pending = False
        self._cache.clear()
        self._stamped.clear()
        self._placeholders = self._build(None, {})

    def _report(self, what: str, exc: BaseException | None, consequence: str = "") -> None:
        """Say once per kind, on stderr and not through logging (no recursion), what went wrong."""
        if what in self._reported:
            return
        self._reported.add(what)
        cause = f" ({type(exc).__name__}: {printable(str(exc))[:200]})" if exc is not None else ""
        consequence = consequence or "Records get placeholders."
        with contextlib.suppress(Exception):  # stderr itself failing: nothing left to tell
            sys.stderr.write(f"threadctx.ContextFilter: {what}{cause}; {consequence} Reported once.\n")


_installed: list[tuple[logging.Handler, ContextFilter]] = []
#: The filters of the current instrument_logging(): "main", and "otel" for OpenTelemetry's handlers.
_instrumented: dict[str, ContextFilter] = {}


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


def _exports_attributes(handler: logging.Handler) -> bool:
    """Whether ``handler`` is OpenTelemetry's ``LoggingHandler`` (SDK or instrumentation).

    It exports every record attribute and takes the span from the context itself.
    """
    return any(
        cls.__name__ == "LoggingHandler" and cls.__module__.startswith("opentelemetry.")
        for cls in type(handler).__mro__
    )


def instrument_logging(preset: str = "otel", **options: Any) -> ContextFilter:
    """Attach a :class:`ContextFilter` to every handler configured now.

    Filters go on handlers, not loggers, so that records from child loggers
    are stamped too. OpenTelemetry's ``LoggingHandler`` gets the correlation IDs
    only (it records the span itself, and would export the trace fields twice).
    Call it after the handlers are configured (for example after
    ``logging.config.fileConfig``); calling it again attaches the filter to
    handlers added since, and never twice to one handler.

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
    if _instrumented:
        if _instrumented["main"]._options() != wanted._options():
            raise ValueError("logging is instrumented with other options; call uninstrument_logging() first")
    else:
        _instrumented["main"] = wanted
        _instrumented["otel"] = ContextFilter(
            "correlation", prefix=wanted.prefix, correlation=wanted.stamp_correlation
        )
    done = {id(handler) for handler, _ in _installed}
    for handler in _all_handlers():
        if id(handler) not in done:
            chosen = _instrumented["otel" if _exports_attributes(handler) else "main"]
            handler.addFilter(chosen)
            _installed.append((handler, chosen))
    return _instrumented["main"]


def uninstrument_logging() -> None:
    """Remove every filter that :func:`instrument_logging` attached, and nothing else."""
    while _installed:
        handler, installed = _installed.pop()
        handler.removeFilter(installed)
    _instrumented.clear()
