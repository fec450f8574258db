"""Tracing set-up shared by the framework examples: spans can be written to a file for the tests.

``THREADCTX_EXAMPLE_SPANS=FILE`` writes every finished span to FILE as a JSON line.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult


class JsonLinesExporter(SpanExporter):
    """Writes each finished span as one JSON line."""

    def __init__(self, path: str) -> None:
        self._file = open(path, "a", buffering=1)  # noqa: SIM115 - open for the life of the process

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        for span in spans:
            context = span.get_span_context()
            assert context is not None
            record = {
                "name": span.name,
                "kind": span.kind.name,
                "trace_id": format(context.trace_id, "032x"),
                "span_id": format(context.span_id, "016x"),
                "parent_id": format(span.parent.span_id, "016x") if span.parent else None,
            }
            self._file.write(json.dumps(record) + "\n")
        return SpanExportResult.SUCCESS


def configure_tracing() -> None:
    """A tracer provider for the process, exporting to THREADCTX_EXAMPLE_SPANS if it is set."""
    provider = TracerProvider()
    spans = os.environ.get("THREADCTX_EXAMPLE_SPANS")
    if spans:
        provider.add_span_processor(SimpleSpanProcessor(JsonLinesExporter(spans)))
    trace.set_tracer_provider(provider)
