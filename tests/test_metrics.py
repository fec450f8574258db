"""instrument_metrics() and its inverse: observable instruments read by the real SDK's in-memory reader."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import Gauge, InMemoryMetricReader, Sum
from opentelemetry.sdk.trace import TracerProvider

import threadctx
from _helpers import JOIN


@pytest.fixture
def reader() -> Iterator[InMemoryMetricReader]:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    threadctx.instrument_metrics(provider)
    yield reader
    provider.shutdown()


def collect(reader: InMemoryMetricReader) -> dict[str, Any]:
    """Each threadctx metric by name (the instrument itself, with its one data point)."""
    data = reader.get_metrics_data()
    assert data is not None
    found = {}
    for resource_metrics in data.resource_metrics:
        for scope_metrics in resource_metrics.scope_metrics:
            assert scope_metrics.scope.name == "threadctx"
            for metric in scope_metrics.metrics:
                assert metric.name not in found, f"{metric.name} registered twice"
                found[metric.name] = metric
    return found


def value(metric: Any) -> float:
    (point,) = metric.data.data_points
    return point.value  # type: ignore[no-any-return]


class Serving:
    """Threads each inside a span until released."""

    def __init__(self, spans: list[trace.Span | None]) -> None:
        self.release = threading.Event()
        self.threads = []
        for span in spans:
            inside = threading.Event()
            thread = threading.Thread(target=self.serve, args=(span, inside))
            thread.start()
            assert inside.wait(JOIN)
            self.threads.append(thread)

    def serve(self, span: trace.Span | None, inside: threading.Event) -> None:
        if span is None:  # idle: holds nothing
            inside.set()
            self.release.wait(JOIN)
            return
        with trace.use_span(span, end_on_exit=True):
            inside.set()
            self.release.wait(JOIN)

    def stop(self) -> None:
        self.release.set()
        for thread in self.threads:
            thread.join(JOIN)


def test_busy_threads_and_the_oldest_spans_age(
    reader: InMemoryMetricReader, tracer_provider: TracerProvider
) -> None:
    tracer = tracer_provider.get_tracer("t")
    oldest = tracer.start_span("oldest")
    serving = Serving([oldest, tracer.start_span("newer"), None])
    try:
        before = time.time()
        metrics = collect(reader)
        after = time.time()
    finally:
        serving.stop()
    busy, age = metrics["threadctx.threads.busy"], metrics["threadctx.span.oldest_age"]
    assert value(busy) == 2, "two threads serve a span; the idle one and this one do not"
    assert oldest.start_time is not None  # type: ignore[attr-defined]
    started = oldest.start_time / 1e9  # type: ignore[attr-defined]
    assert before - started <= value(age) <= after - started
    assert (busy.unit, age.unit) == ("{thread}", "s")
    assert isinstance(busy.data, Sum)
    assert not busy.data.is_monotonic
    assert isinstance(age.data, Gauge)
    idle = collect(reader)
    assert (value(idle["threadctx.threads.busy"]), value(idle["threadctx.span.oldest_age"])) == (0, 0.0)


def test_a_span_without_a_start_time_counts_from_the_first_collection(reader: InMemoryMetricReader) -> None:
    carried = trace.NonRecordingSpan(trace.SpanContext(trace_id=1, span_id=2, is_remote=True))
    started = time.time()
    serving = Serving([carried])
    try:
        first = collect(reader)
        second = collect(reader)
    finally:
        serving.stop()
    assert value(first["threadctx.threads.busy"]) == 1
    first_age, second_age = (value(m["threadctx.span.oldest_age"]) for m in (first, second))
    assert 0.0 <= first_age <= second_age < time.time() - started, "counted from the first look"


def test_instrumenting_the_same_provider_again_adds_nothing() -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    try:
        threadctx.instrument_metrics(provider)
        threadctx.instrument_metrics(provider)
        metrics = collect(reader)  # fails on a name registered twice
    finally:
        provider.shutdown()
    assert set(metrics) == {"threadctx.threads.busy", "threadctx.span.oldest_age"}


def test_uninstrument_metrics_stops_the_reporting_and_instrument_starts_it_again() -> None:
    """No threadctx data point after uninstrument (twice is harmless); instrumenting again reports once."""
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    other_reader = InMemoryMetricReader()
    other = MeterProvider(metric_readers=[other_reader])
    try:
        threadctx.instrument_metrics(provider)
        threadctx.instrument_metrics(other)
        assert set(collect(reader)) == {"threadctx.threads.busy", "threadctx.span.oldest_age"}
        threadctx.uninstrument_metrics(provider)
        threadctx.uninstrument_metrics(provider)
        assert reader.get_metrics_data() is None
        assert set(collect(other_reader)) == {"threadctx.threads.busy", "threadctx.span.oldest_age"}
        threadctx.instrument_metrics(provider)
        threadctx.instrument_metrics(provider)
        again = collect(reader)  # fails on a name registered twice
    finally:
        provider.shutdown()
        other.shutdown()
    assert set(again) == {"threadctx.threads.busy", "threadctx.span.oldest_age"}
    assert value(again["threadctx.threads.busy"]) == 0


def run_fresh(code: str) -> str:
    """What ``code`` prints in a new interpreter (whose global meter provider is not set yet)."""
    env = {**os.environ, "OTEL_PYTHON_CONTEXT": "threadctx"}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_uninstrument_metrics_without_a_provider_finds_the_one_instrumented_before_it_was_set() -> None:
    """instrument_metrics() before the global provider is set (OpenTelemetry's proxy), then the SDK's."""
    code = (
        "import threadctx\n"
        "from opentelemetry import metrics\n"
        "from opentelemetry.sdk.metrics import MeterProvider\n"
        "from opentelemetry.sdk.metrics.export import InMemoryMetricReader\n"
        "threadctx.uninstrument_metrics()\n"
        "threadctx.instrument_metrics()\n"
        "reader = InMemoryMetricReader()\n"
        "metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))\n"
        "data = reader.get_metrics_data()\n"
        "print(sorted(m.name for r in data.resource_metrics for s in r.scope_metrics for m in s.metrics))\n"
        "threadctx.uninstrument_metrics()\n"
        "print(reader.get_metrics_data())\n"
    )
    assert run_fresh(code).splitlines() == ["['threadctx.span.oldest_age', 'threadctx.threads.busy']", "None"]


def test_the_instruments_need_only_the_api() -> None:
    """Instrumenting the global (no-op) provider imports nothing of the SDK."""
    code = (
        "import sys, threadctx\n"
        "threadctx.instrument_metrics()\n"
        "print(sorted(name for name in sys.modules if name.startswith('opentelemetry.sdk')))\n"
    )
    assert run_fresh(code) == "[]\n"
