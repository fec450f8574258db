"""What each logging backend expects: one entry per backend, and the one function that applies it.

Adding a backend is one :data:`PRESETS` entry (and its test, its JSON example in
docs/logging.md, and the presets table there, which ``python docs/presets_table.py``
prints). Nothing here reads the current context: :mod:`threadctx._filter` does that,
and asks this module how to write what it found.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

__all__ = ["PRESETS", "FieldNames"]

IdFormat = Literal["hex", "datadog", "gcp"]
WithoutSpan = Literal["placeholders", "omit"]

#: Where the service, environment and version come from in the tracer provider's
#: resource (OpenTelemetry semantic conventions; the first key present wins).
RESOURCE_KEYS: dict[str, tuple[str, ...]] = {
    "service": ("service.name",),
    "env": ("deployment.environment.name", "deployment.environment"),
    "version": ("service.version",),
}
_LOW_64 = 0xFFFF_FFFF_FFFF_FFFF


@dataclass(frozen=True)
class FieldNames:
    """One backend's fields: the record attribute names (``None`` leaves a field out) and formats.

    Attributes:
        trace_id: The trace id (its format depends on ``id_format``).
        span_id: The span id.
        trace_flags: The W3C trace flags, two lowercase hex digits.
        trace_sampled: Whether the trace is sampled, a bool.
        service: The service name (``service_name=``, else the resource's ``service.name``).
        env: The deployment environment (``env=``, else the resource's
            ``deployment.environment.name`` or ``deployment.environment``), ``""`` if unknown.
        version: The service version (``version=``, else the resource's ``service.version``),
            ``""`` if unknown.
        id_format: ``"hex"`` (W3C: 32 and 16 lowercase hex digits), ``"datadog"``
            (the trace id as 32 hex digits when its high 64 bits are non-zero, else
            in decimal, as ddtrace writes it; the span id in decimal), or ``"gcp"``
            (``projects/PROJECT/traces/TRACE_ID`` when the project is known, else the
            hex trace id).
        missing_trace_id: The trace id written without a valid span (with placeholders).
        missing_span_id: The span id written without a valid span (with placeholders).
        without_span: What to write without a valid span: ``"placeholders"`` (the
            ``missing_*`` values, flags ``"00"``, not sampled) or ``"omit"`` (no trace
            fields at all, for backends that would take a placeholder for a real id).
        source: The vendor page this entry follows.

    .. versionadded:: 0.1.0
    """

    trace_id: str | None = "trace_id"
    span_id: str | None = "span_id"
    trace_flags: str | None = "trace_flags"
    trace_sampled: str | None = "trace_sampled"
    service: str | None = None
    env: str | None = None
    version: str | None = None
    id_format: IdFormat = "hex"
    missing_trace_id: str = "0" * 32
    missing_span_id: str = "0" * 16
    without_span: WithoutSpan = "placeholders"
    source: str = field(default="", compare=False)


#: The keys ``ContextFilter(fields=...)`` may override.
NAME_KEYS = ("trace_id", "span_id", "trace_flags", "trace_sampled", "service", "env", "version")

_PRESETS: dict[str, FieldNames] = {
    "otel": FieldNames(
        source="https://opentelemetry.io/docs/specs/otel/logs/data-model/#trace-context-fields",
    ),
    # The same names and placeholders as LoggingInstrumentor, so formats written for it keep working.
    "otel-python": FieldNames(
        trace_id="otelTraceID",
        span_id="otelSpanID",
        trace_flags=None,
        trace_sampled="otelTraceSampled",
        service="otelServiceName",
        missing_trace_id="0",
        missing_span_id="0",
        source="https://opentelemetry-python-contrib.readthedocs.io/en/latest/instrumentation/logging/logging.html",
    ),
    "ecs": FieldNames(
        trace_id="trace.id",
        span_id="span.id",
        trace_flags=None,
        trace_sampled=None,
        service="service.name",
        without_span="omit",
        source="https://www.elastic.co/guide/en/ecs/current/ecs-tracing.html",
    ),
    # ddtrace's log injection writes "0" for both ids outside a span, and "" for unknown env/version.
    "datadog": FieldNames(
        trace_id="dd.trace_id",
        span_id="dd.span_id",
        trace_flags=None,
        trace_sampled=None,
        service="dd.service",
        env="dd.env",
        version="dd.version",
        id_format="datadog",
        missing_trace_id="0",
        missing_span_id="0",
        source="https://docs.datadoghq.com/tracing/other_telemetry/connect_logs_and_traces/python/",
    ),
    "gcp": FieldNames(
        trace_id="logging.googleapis.com/trace",
        span_id="logging.googleapis.com/spanId",
        trace_flags=None,
        trace_sampled="logging.googleapis.com/trace_sampled",
        id_format="gcp",
        without_span="omit",
        source="https://cloud.google.com/logging/docs/structured-logging#special-payload-fields",
    ),
    "newrelic": FieldNames(
        trace_id="trace.id",
        span_id="span.id",
        trace_flags=None,
        trace_sampled=None,
        service="entity.name",
        without_span="omit",
        source="https://docs.newrelic.com/docs/logs/logs-context/configure-logs-context-python/",
    ),
    # Correlation IDs only: for OpenTelemetry's LoggingHandler, which takes the span itself.
    "correlation": FieldNames(
        trace_id=None,
        span_id=None,
        trace_flags=None,
        trace_sampled=None,
        source="https://opentelemetry-python.readthedocs.io/en/latest/sdk/_logs.html",
    ),
}

#: The presets by name, read-only (a preset changed at run time would change every later filter).
PRESETS: Mapping[str, FieldNames] = MappingProxyType(_PRESETS)


def format_ids(names: FieldNames, trace_id: int, span_id: int, project: str | None) -> tuple[str, str]:
    """The trace and span id of a valid span, as ``names`` wants them written."""
    if names.id_format == "datadog":
        return (format(trace_id, "032x") if trace_id > _LOW_64 else str(trace_id)), str(span_id)
    trace_hex, span_hex = format(trace_id, "032x"), format(span_id, "016x")
    if names.id_format == "gcp" and project:
        return f"projects/{project}/traces/{trace_hex}", span_hex
    return trace_hex, span_hex


def from_resource(attributes: Mapping[str, object], what: str) -> str | None:
    """The resource's value for ``what`` (``service``, ``env``, ``version``), if it has one."""
    for key in RESOURCE_KEYS[what]:
        value = attributes.get(key)
        if value:
            return str(value)
    return None


def gcp_project(attributes: Mapping[str, object], environ: Mapping[str, str] = os.environ) -> str | None:
    """The Google Cloud project: the resource's ``cloud.account.id`` on GCP, else ``GOOGLE_CLOUD_PROJECT``."""
    if attributes.get("cloud.provider") == "gcp" and attributes.get("cloud.account.id"):
        return str(attributes["cloud.account.id"])
    return environ.get("GOOGLE_CLOUD_PROJECT") or None
