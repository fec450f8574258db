"""Each integration with the real package: python-json-logger, structlog, loguru, OTel LoggingHandler."""

from __future__ import annotations

import io
import json
import logging
import threading
import warnings

import pytest
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import SimpleLogRecordProcessor

try:
    from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter
except ImportError:  # opentelemetry-sdk < 1.39 names it InMemoryLogExporter
    from opentelemetry.sdk._logs.export import InMemoryLogExporter as InMemoryLogRecordExporter
from opentelemetry.sdk.trace import TracerProvider

import threadctx
from _helpers import JOIN


def hex_ids(span: object) -> tuple[str, str]:
    ctx = span.get_span_context()  # type: ignore[attr-defined]
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")


def test_python_json_logger_lines_carry_the_fields(tracer_provider: TracerProvider) -> None:
    from pythonjsonlogger.json import JsonFormatter

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter("%(message)s"))
    handler.addFilter(threadctx.ContextFilter("ecs"))
    logger = logging.getLogger("jsonlog")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    with (
        tracer_provider.get_tracer("t").start_as_current_span("op") as span,
        threadctx.bound(request_id="r-j"),
    ):
        logger.info("json line")
    line = json.loads(stream.getvalue())
    trace_id, span_id = hex_ids(span)
    assert line["trace.id"] == trace_id
    assert line["span.id"] == span_id
    assert line["request_id"] == "r-j"
    assert line["message"] == "json line"


def test_structlog_processor(tracer_provider: TracerProvider) -> None:
    import structlog

    out = io.StringIO()
    structlog.configure(
        processors=[threadctx.structlog_processor, structlog.processors.JSONRenderer()],
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    try:
        log = structlog.get_logger()
        with (
            tracer_provider.get_tracer("t").start_as_current_span("op") as span,
            threadctx.bound(request_id="r-s"),
        ):
            log.info("structured", request_id="explicit-wins")
        log.info("outside")
    finally:
        structlog.reset_defaults()
    inside, outside = (json.loads(line) for line in out.getvalue().splitlines())
    assert (inside["trace_id"], inside["span_id"]) == hex_ids(span)
    assert inside["request_id"] == "explicit-wins"
    assert "_threadctx" not in inside  # the record mark is for logging records only
    assert outside["trace_id"] == "0" * 32
    assert "request_id" not in outside


def test_loguru_patcher(tracer_provider: TracerProvider) -> None:
    from loguru import logger

    out = io.StringIO()
    sink = logger.add(out, format="{extra[trace_id]} {extra[span_id]} {extra[request_id]} {message}")
    try:
        patched = logger.patch(threadctx.loguru_patcher)
        with (
            tracer_provider.get_tracer("t").start_as_current_span("op") as span,
            threadctx.bound(request_id="r-l"),
        ):
            patched.info("via loguru")
            patched.bind(request_id="bound-wins").info("bound")
    finally:
        logger.remove(sink)
    trace_id, span_id = hex_ids(span)
    assert out.getvalue().splitlines() == [
        f"{trace_id} {span_id} r-l via loguru",
        f"{trace_id} {span_id} bound-wins bound",
    ]


def otel_logging_handler(where: str, provider: LoggerProvider) -> logging.Handler:
    if where == "sdk":
        from opentelemetry.sdk._logs import LoggingHandler

        with warnings.catch_warnings():  # deprecated in favour of the instrumentation's handler
            warnings.simplefilter("ignore", DeprecationWarning)
            return LoggingHandler(logger_provider=provider)
    handler_module = pytest.importorskip("opentelemetry.instrumentation.logging.handler")
    return handler_module.LoggingHandler(logger_provider=provider)  # type: ignore[no-any-return]


@pytest.mark.parametrize("where", ["sdk", "instrumentation-logging"])
def test_otel_logging_handler_exports_each_threads_span_and_ids(
    where: str, tracer_provider: TracerProvider
) -> None:
    exporter = InMemoryLogRecordExporter()
    provider = LoggerProvider()
    provider.add_log_record_processor(SimpleLogRecordProcessor(exporter))
    handler = otel_logging_handler(where, provider)
    handler.addFilter(threadctx.ContextFilter("correlation"))
    logger = logging.getLogger("otel-sdk-handler")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    tracer = tracer_provider.get_tracer("t")
    count = 8
    barrier = threading.Barrier(count)
    expected: dict[str, tuple[int, int]] = {}

    def work(index: int) -> None:
        with tracer.start_as_current_span(f"s{index}") as span, threadctx.bound(request_id=f"r{index}"):
            ctx = span.get_span_context()
            expected[f"r{index}"] = (ctx.trace_id, ctx.span_id)
            barrier.wait(JOIN)
            for _ in range(10):
                logger.info("exported")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(JOIN)
    provider.shutdown()
    exported = exporter.get_finished_logs()
    assert len(exported) == count * 10
    for item in exported:
        record = item.log_record
        request_id = record.attributes["request_id"]
        assert (record.trace_id, record.span_id) == expected[request_id]
        assert "trace_id" not in record.attributes  # the "correlation" preset leaves ids to the SDK


@pytest.mark.parametrize("preset", ["otel", "ecs"])
def test_json_formatter_skips_nothing_we_promise(preset: str) -> None:
    """Every field the filter stamps reaches the JSON line, placeholders included."""
    from pythonjsonlogger.json import JsonFormatter

    filt = threadctx.ContextFilter(preset)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(filt)
    logger = logging.getLogger(f"json-{preset}")
    logger.handlers[:] = [handler]
    logger.propagate = False
    with threadctx.bound(tenant="t1"):
        logger.warning("w")
        expected = filt.fields()
    line = json.loads(stream.getvalue())
    assert {key: line[key] for key in expected} == expected


@pytest.mark.parametrize("preset", ["otel", "otel-python", "ecs", "datadog", "gcp", "newrelic"])
def test_each_presets_json_line_inside_and_outside_a_span(
    preset: str, tracer_provider: TracerProvider
) -> None:
    """python-json-logger writes exactly the preset's fields; the filter's own mark stays out."""
    from pythonjsonlogger.json import JsonFormatter

    filt = threadctx.ContextFilter(preset, project_id="p", defaults={"request_id": "-"})
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter("%(message)s"))
    handler.addFilter(filt)
    logger = logging.getLogger(f"json-line-{preset}")
    logger.handlers[:] = [handler]
    logger.propagate = False
    with tracer_provider.get_tracer("t").start_as_current_span("op"), threadctx.bound(request_id="r-1"):
        logger.warning("inside")
        inside_fields = filt.fields()
    logger.warning("outside")
    inside, outside = (json.loads(line) for line in stream.getvalue().splitlines())
    assert inside == {"message": "inside", **inside_fields}
    assert outside == {"message": "outside", **filt.fields()}
    assert inside["request_id"] == "r-1"
    assert outside["request_id"] == "-"
    names = threadctx.PRESETS[preset]
    assert (names.trace_id in outside) == (names.without_span == "placeholders")
