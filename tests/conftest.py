"""Shared fixtures: threadctx is the runtime context, and every test leaves the state it found."""

from __future__ import annotations

import os

# Before OpenTelemetry is first imported: it reads this once, at import time.
os.environ["OTEL_PYTHON_CONTEXT"] = "threadctx"

import logging
from collections.abc import Iterator

import pytest
from opentelemetry import context as otel_context
from opentelemetry.context.contextvars_context import ContextVarsRuntimeContext
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import threadctx

assert isinstance(otel_context._RUNTIME_CONTEXT, threadctx.ThreadRuntimeContext), (
    "OTEL_PYTHON_CONTEXT=threadctx did not select threadctx's runtime context"
)


@pytest.fixture(autouse=True)
def _restore_context() -> Iterator[None]:
    """Each test starts from the empty context and leaves the thread as it found it."""
    token = otel_context.attach(otel_context.Context())
    yield
    otel_context.detach(token)


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Handlers, filters and levels that a test adds to the root logger are removed afterwards."""
    root = logging.getLogger()
    handlers, filters, level = root.handlers[:], root.filters[:], root.level
    yield
    root.handlers[:], root.filters[:] = handlers, filters
    root.setLevel(level)


@pytest.fixture(autouse=True)
def _restore_allowlist() -> Iterator[None]:
    """Names a test adds to the propagation allowlist are removed afterwards."""
    from threadctx import _propagation

    saved = _propagation._allowlist
    yield
    _propagation._allowlist = saved


@pytest.fixture(params=["threadctx", "contextvars"])
def any_runtime(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run the test once on threadctx's runtime context and once on OpenTelemetry's default."""
    if request.param == "threadctx":
        yield request.param
        return
    saved = otel_context._RUNTIME_CONTEXT
    otel_context._RUNTIME_CONTEXT = ContextVarsRuntimeContext()
    try:
        yield request.param
    finally:
        otel_context._RUNTIME_CONTEXT = saved


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def tracer_provider(exporter: InMemorySpanExporter) -> Iterator[TracerProvider]:
    """A real SDK tracer provider exporting to memory (not installed globally)."""
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider
    provider.shutdown()
