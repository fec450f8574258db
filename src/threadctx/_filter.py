"""The logging filter that stamps each record with its thread's trace context and correlation IDs.

The filter only stamps: what to write is a :class:`threadctx._fields.Stamping`, built
from the options (:class:`_Options`, checked once and read-only afterwards), and the
fields of a context come from the one function the structlog and loguru adapters
call too (:func:`threadctx._fields.context_fields`). Around it the filter keeps a
weak cache by context, reads the tracer provider's resource once there is one, and
reports what went wrong once, on stderr.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, replace
from os import getpid
from threading import get_ident
from types import MappingProxyType
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace

from threadctx._fields import MARKER, Stamping, context_fields, marked_fields, resource_values
from threadctx._text import printable
from threadctx._vendors import NAME_KEYS, PRESETS, FieldNames, WithoutSpan, gcp_project

__all__ = ["PRESETS", "ContextFilter", "FieldNames", "instrument_logging", "uninstrument_logging"]

#: How many attributes a record has before anything (extra=, a filter) adds one.
_PLAIN_RECORD_SIZE = len(vars(logging.LogRecord("n", logging.INFO, "p", 1, "m", None, None)))
_CACHE_SIZE = 512


@dataclass(frozen=True)
class _Options:
    """A filter's options, checked once (see :class:`ContextFilter` for each)."""

    preset: str
    names: FieldNames
    prefix: str
    correlation: bool
    defaults: Mapping[str, str]
    project_id: str | None
    service_name: str | None
    env: str | None
    version: str | None

    @classmethod
    def checked(
        cls,
        preset: str,
        fields: Mapping[str, str | None] | None,
        without_span: WithoutSpan | None,
        **options: Any,
    ) -> _Options:
        """The options, with the preset's names and their overrides resolved.

        Raises:
            ValueError: an unknown preset, field key or ``without_span`` value.
        """
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
        defaults = options.pop("defaults") or {}
        escaped = MappingProxyType({str(key): printable(str(value)) for key, value in defaults.items()})
        return cls(preset=preset, names=names, defaults=escaped, **options)

    def given(self) -> dict[str, str | None]:
        """Service, environment and version as given (``None``: from the resource)."""
        return {"service": self.service_name, "env": self.env, "version": self.version}


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

    The options are read-only once the filter is made (each is a property of
    the same name; ``correlation`` is :attr:`stamp_correlation`): what the
    filter writes is derived from them once. Make another filter for others.

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
        options = _Options.checked(
            preset,
            fields,
            without_span,
            prefix=prefix,
            correlation=correlation,
            defaults=defaults,
            project_id=project_id,
            service_name=service_name,
            env=env,
            version=version,
        )
        self._options = options
        names = options.names
        # Service, env and version as given ("" until the resource is read, see _resolve).
        self._stamping = Stamping(
            names,
            prefix,
            correlation,
            options.defaults,
            resource_values(names, options.given(), {}),
            project_id,
        )
        self._wants_project = names.id_format == "gcp" and project_id is None
        self._pending = self._wants_project or any(
            value is None and getattr(names, what) is not None for what, value in options.given().items()
        )
        self._cache: dict[int, tuple[weakref.ref[Any], dict[str, Any]]] = {}
        self._stamped: dict[str, dict[str, Any]] = {}
        self._reported: set[str] = set()
        self._placeholders = self._stamping_placeholders()

    # The options, read-only: what the filter writes is decided once, at construction.
    @property
    def preset(self) -> str:
        """The preset's name."""
        return self._options.preset

    @property
    def names(self) -> FieldNames:
        """The field names written: the preset's, with ``fields=`` and ``without_span=`` applied."""
        return self._options.names

    @property
    def prefix(self) -> str:
        """What is prepended to each correlation ID's attribute name."""
        return self._options.prefix

    @property
    def stamp_correlation(self) -> bool:
        """Whether correlation IDs are stamped."""
        return self._options.correlation

    @property
    def defaults(self) -> Mapping[str, str]:
        """Correlation ID name -> the value written where none is bound (escaped; read-only)."""
        return self._options.defaults

    @property
    def project_id(self) -> str | None:
        """The Google Cloud project given, if any."""
        return self._options.project_id

    @property
    def service_name(self) -> str | None:
        """The service name given, if any (else the resource's)."""
        return self._options.service_name

    @property
    def env(self) -> str | None:
        """The deployment environment given, if any (else the resource's)."""
        return self._options.env

    @property
    def version(self) -> str | None:
        """The service version given, if any (else the resource's)."""
        return self._options.version

    # The hot path: one get_current, one cache hit, one dict update.
    def filter(self, record: logging.LogRecord) -> bool:
        """Stamp ``record``; always return ``True``."""
        try:
            context = otel_context.get_current()
            entry = self._cache.get(id(context))
            fields = entry[1] if entry is not None and entry[0]() is context else self._computed(context)
        except Exception as exc:  # a logging call must never fail because of us
            self._report("could not read the context", exc)
            fields = self._placeholders
        attributes = record.__dict__
        if len(attributes) == _PLAIN_RECORD_SIZE:
            # Nothing was added to this record (no extra=, no earlier stamp):
            # nothing to preserve, so one update does it.
            attributes.update(fields)
        else:
            self._add(record, fields)
        return True

    def _add(self, record: logging.LogRecord, fields: Mapping[str, Any]) -> None:
        """Add ``fields`` to a record that has more than its own attributes, keeping every one it has."""
        attributes = record.__dict__
        try:
            mark = attributes.get(MARKER)
            if mark is not None and (record.thread != get_ident() or record.process != getpid()):
                fields = self._from_mark(mark)  # stamped in another thread or process: its ids
            for key, value in fields.items():
                attributes.setdefault(key, value)  # extra=, other tools' and earlier values win
        except Exception as exc:  # a logging call must never fail because of us
            self._report("could not stamp a record", exc)

    def _options_key(self) -> object:
        """What decides the fields this filter writes (for instrument_logging's comparison)."""
        return self._options

    def fields(self, context: object | None = None) -> dict[str, Any]:
        """The attributes this filter would stamp for ``context`` (default: the current one).

        A new dict, for integrations that carry fields in their own structures
        (without the filter's record mark).
        """
        try:
            found = self._computed(otel_context.get_current() if context is None else context)
        except Exception as exc:  # as for a record: placeholders, reported once
            self._report("could not read the context", exc)
            found = self._placeholders
        return {key: value for key, value in found.items() if key != MARKER}

    def _computed(self, context: Any) -> dict[str, Any]:
        """The fields of ``context``, computed (the cache's miss path) and cached once final."""
        if self._pending:
            self._resolve()
        # Read before the fields are built (and the stamping after: _resolve replaces the stamping,
        # then clears the flag): if another thread resolves meanwhile, what is built here from the
        # values before must not be cached after it.
        cacheable = not self._pending
        fields = context_fields(self._stamping, context)
        if cacheable:  # cache only what will not change (see _resolve)
            if len(self._cache) >= _CACHE_SIZE:
                self._cache.clear()
            # A weak reference: the cache must not keep ended requests' contexts (and spans) alive.
            self._cache[id(context)] = (weakref.ref(context), fields)
        return fields

    def _from_mark(self, mark: object) -> dict[str, Any]:
        """The fields for a record another thread stamped, cached by its mark."""
        fields = self._stamped.get(mark) if isinstance(mark, str) else None
        if fields is None:
            fields = marked_fields(self._stamping, mark)
            if len(self._stamped) >= _CACHE_SIZE:
                self._stamped.clear()
            self._stamped[str(mark)] = fields
        return fields

    def _stamping_placeholders(self) -> dict[str, Any]:
        """What a record gets when the context cannot be read."""
        return marked_fields(self._stamping, "-")

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
                    self._stamping = replace(self._stamping, project=gcp_project({}))
                return  # no provider yet: look again on the next record
            attributes = resource.attributes if resource is not None else {}
        except Exception as exc:  # a provider of someone else's that fails: resolved as unknown
            self._report("could not read the tracer provider's resource", exc)
            attributes = {}
        options = self._options
        project = gcp_project(attributes) if self._wants_project else options.project_id
        if self._wants_project and project is None:
            self._report(
                "the gcp preset has no project (pass project_id=, set GOOGLE_CLOUD_PROJECT, or "
                "cloud.provider=gcp and cloud.account.id on the resource)",
                None,
                "Trace fields hold the bare trace id, which Cloud Logging does not link.",
            )
        static = resource_values(options.names, options.given(), attributes)
        self._stamping = replace(self._stamping, static=static, project=project)
        self._pending = False
        self._cache.clear()
        self._stamped.clear()
        self._placeholders = self._stamping_placeholders()

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

    .. versionadded:: 0.1.0
    """
    wanted = ContextFilter(preset, **options)
    if _instrumented:
        if _instrumented["main"]._options_key() != wanted._options_key():
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
    """Remove every filter that :func:`instrument_logging` attached, and nothing else.

    .. versionadded:: 0.1.0
    """
    while _installed:
        handler, installed = _installed.pop()
        handler.removeFilter(installed)
    _instrumented.clear()
