"""Integrations with structlog and loguru: the same fields as ContextFilter, in their structures."""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

from opentelemetry import context as otel_context

from threadctx._fields import MARKER, Stamping, context_fields, marked_fields
from threadctx._vendors import PRESETS

__all__ = ["loguru_patcher", "structlog_processor"]

#: The ``otel`` preset: no service, environment or version, so nothing to read from a resource.
_STAMPING = Stamping(PRESETS["otel"])
_PLACEHOLDERS = marked_fields(_STAMPING, "-")


def _add_missing(target: MutableMapping[str, Any]) -> None:
    """Add the current fields to ``target``, keeping the keys it already has."""
    try:
        fields = context_fields(_STAMPING, otel_context.get_current())
    except Exception:  # a span that cannot be read: placeholders, as the filter writes
        fields = _PLACEHOLDERS
    for key, value in fields.items():
        if key != MARKER:  # the record mark is for logging records only
            target.setdefault(key, value)


def structlog_processor(
    logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """A structlog processor that adds the trace context and correlation IDs to each event.

    Fields use the ``otel`` preset's names (``trace_id``, ``span_id``,
    ``trace_flags``, ``trace_sampled``, one key per correlation ID); keys the
    event already has are kept::

        structlog.configure(processors=[threadctx.structlog_processor, structlog.processors.JSONRenderer()])

    For another preset, wrap a filter: ``ContextFilter("ecs").fields()`` returns the same fields.

    .. versionadded:: 0.1.0
    """
    _add_missing(event_dict)
    return event_dict


def loguru_patcher(record: MutableMapping[str, Any]) -> None:
    """A loguru patcher that adds the trace context and correlation IDs to ``record["extra"]``.

    Values already in ``extra`` (from ``logger.bind`` or ``contextualize``) are kept::

        logger = logger.patch(threadctx.loguru_patcher)
        logger.add(sys.stderr, format="{extra[trace_id]} {extra[request_id]} {message}")

    .. versionadded:: 0.1.0
    """
    _add_missing(record["extra"])
