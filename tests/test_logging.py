"""ContextFilter and instrument_logging with real handlers, threads and the OpenTelemetry SDK."""

from __future__ import annotations

import io
import logging
import logging.config
import logging.handlers
import queue
import re
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context.context import Context
from opentelemetry.context.contextvars_context import ContextVarsRuntimeContext
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider

import threadctx
from threadctx._correlation import CORRELATION_KEY

JOIN = 30
SERVICE = "threadctx-tests"


@pytest.fixture(scope="module", autouse=True)
def global_provider() -> TracerProvider:
    """The process-wide tracer provider (OpenTelemetry lets it be set once)."""
    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider):
        return current
    provider = TracerProvider(resource=Resource.create({"service.name": SERVICE}))
    trace.set_tracer_provider(provider)
    return provider


@pytest.fixture
def tracer(global_provider: TracerProvider) -> trace.Tracer:
    return global_provider.get_tracer("test")


def make_logger(
    name: str, fmt: str, filt: logging.Filter | None = None
) -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(fmt))
    if filt is not None:
        handler.addFilter(filt)
    logger = logging.getLogger(name)
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    return logger, stream


@pytest.fixture
def capture() -> Iterator[list[logging.LogRecord]]:
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep()
    handler.addFilter(threadctx.ContextFilter())
    logger = logging.getLogger("capture")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    yield records
    logger.handlers.clear()


def ids_of(span: trace.Span) -> tuple[str, str]:
    ctx = span.get_span_context()
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")


def test_default_fields_inside_a_span(tracer: trace.Tracer, capture: list[logging.LogRecord]) -> None:
    with tracer.start_as_current_span("op") as span, threadctx.bound(request_id="r-1", tenant="acme"):
        logging.getLogger("capture").info("hello")
    [record] = capture
    trace_id, span_id = ids_of(span)
    assert (record.trace_id, record.span_id, record.trace_flags, record.trace_sampled) == (  # type: ignore[attr-defined]
        trace_id,
        span_id,
        format(span.get_span_context().trace_flags, "02x"),  # the SDK may set the W3C random flag too
        True,
    )
    assert (record.request_id, record.tenant) == ("r-1", "acme")  # type: ignore[attr-defined]


def test_placeholders_without_a_span_so_formats_never_fail() -> None:
    logger, stream = make_logger(
        "nospan", "%(trace_id)s %(span_id)s %(trace_flags)s %(message)s", threadctx.ContextFilter()
    )
    logger.info("x")
    assert stream.getvalue() == f"{'0' * 32} {'0' * 16} 00 x\n"


def test_extra_wins_over_a_bound_id(capture: list[logging.LogRecord]) -> None:
    with threadctx.bound(request_id="bound"):
        logging.getLogger("capture").info("x", extra={"request_id": "explicit"})
    assert capture[0].request_id == "explicit"  # type: ignore[attr-defined]


def test_prefix_and_reserved_names(capture: list[logging.LogRecord]) -> None:
    logger, stream = make_logger(
        "prefixed", "%(ctx_name)s|%(name)s|%(message)s", threadctx.ContextFilter(prefix="ctx_")
    )
    with threadctx.bound(name="from-bind"):
        logger.info("m")
    assert stream.getvalue() == "from-bind|prefixed|m\n"
    # Without a prefix a correlation ID never shadows the record's own attributes.
    with threadctx.bound(name="from-bind", msg="x"):
        logging.getLogger("capture").info("kept")
    assert (capture[0].name, capture[0].getMessage()) == ("capture", "kept")


@pytest.mark.parametrize(
    ("preset", "expected"),
    [
        ("otel-python", lambda t, s, ti, si: {"otelTraceID": t, "otelSpanID": s, "otelTraceSampled": True,
                                              "otelServiceName": SERVICE}),
        ("ecs", lambda t, s, ti, si: {"trace.id": t, "span.id": s, "service.name": SERVICE}),
        # The SDK's trace ids are random 128-bit ids: ddtrace writes those in hex.
        ("datadog", lambda t, s, ti, si: {"dd.trace_id": t if ti >= 2**64 else str(ti), "dd.span_id": str(si),
                                          "dd.service": SERVICE, "dd.env": "", "dd.version": ""}),
        ("gcp", lambda t, s, ti, si: {"logging.googleapis.com/trace": f"projects/proj-1/traces/{t}",
                                      "logging.googleapis.com/spanId": s,
                                      "logging.googleapis.com/trace_sampled": True}),
        ("newrelic", lambda t, s, ti, si: {"trace.id": t, "span.id": s, "entity.name": SERVICE}),
        ("correlation", lambda t, s, ti, si: {}),
    ],
)  # fmt: skip
def test_presets(preset: str, expected: object, tracer: trace.Tracer) -> None:
    filt = threadctx.ContextFilter(preset, project_id="proj-1")
    with tracer.start_as_current_span("op") as span, threadctx.bound(request_id="r"):
        ctx = span.get_span_context()
        fields = filt.fields()
    trace_hex, span_hex = ids_of(span)
    assert fields == {**expected(trace_hex, span_hex, ctx.trace_id, ctx.span_id), "request_id": "r"}  # type: ignore[operator]


def test_otel_python_preset_matches_logging_instrumentor_placeholders() -> None:
    fields = threadctx.ContextFilter("otel-python").fields()
    assert fields == {
        "otelTraceID": "0",
        "otelSpanID": "0",
        "otelTraceSampled": False,
        "otelServiceName": SERVICE,
    }


def test_custom_field_names(tracer: trace.Tracer) -> None:
    filt = threadctx.ContextFilter(fields={"trace_id": "traceId", "span_id": "spanId", "trace_flags": None})
    with tracer.start_as_current_span("op") as span:
        fields = filt.fields()
    assert fields == {"traceId": ids_of(span)[0], "spanId": ids_of(span)[1], "trace_sampled": True}


def test_bad_options_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="unknown preset 'splunk'; choose one of otel, otel-python"):
        threadctx.ContextFilter("splunk")
    with pytest.raises(ValueError, match=r"unknown field key.*traceid.*valid keys: trace_id"):
        threadctx.ContextFilter(fields={"traceid": "x"})


def test_dict_config(tracer: trace.Tracer) -> None:
    stream = io.StringIO()
    logging.config.dictConfig(
        {
            "version": 1,
            "disable_existing_loggers": False,
            "filters": {"ctx": {"()": "threadctx.ContextFilter", "preset": "ecs", "prefix": "labels."}},
            "formatters": {"plain": {"format": "%(trace.id)s %(labels.request_id)s %(message)s"}},
            "handlers": {
                "out": {
                    "class": "logging.StreamHandler",
                    "stream": stream,
                    "filters": ["ctx"],
                    "formatter": "plain",
                }
            },
            "loggers": {"dictconfigured": {"handlers": ["out"], "level": "INFO", "propagate": False}},
        }
    )
    with tracer.start_as_current_span("op") as span, threadctx.bound(request_id="r-9"):
        logging.getLogger("dictconfigured.child").info("hi")
    assert stream.getvalue() == f"{ids_of(span)[0]} r-9 hi\n"
    logging.getLogger("dictconfigured").handlers.clear()


def test_file_config_then_instrument_logging(tmp_path: Path, tracer: trace.Tracer) -> None:
    log_file = tmp_path / "out.log"
    ini = tmp_path / "logging.ini"
    ini.write_text(
        textwrap.dedent(
            f"""\
            [loggers]
            keys=root,app
            [handlers]
            keys=file
            [formatters]
            keys=plain
            [logger_root]
            level=WARNING
            handlers=
            [logger_app]
            level=INFO
            handlers=file
            qualname=fileapp
            propagate=0
            [handler_file]
            class=FileHandler
            formatter=plain
            args=({str(log_file)!r},)
            [formatter_plain]
            format=%(otelTraceID)s %(otelServiceName)s %(request_id)s %(message)s
            """
        )
    )
    logging.config.fileConfig(ini, disable_existing_loggers=False)
    try:
        threadctx.instrument_logging("otel-python")
        with tracer.start_as_current_span("op") as span, threadctx.bound(request_id="r-file"):
            logging.getLogger("fileapp.sub").info("from file config")
    finally:
        threadctx.uninstrument_logging()
        for handler in logging.getLogger("fileapp").handlers:
            handler.close()
        logging.getLogger("fileapp").handlers.clear()
    assert log_file.read_text() == f"{ids_of(span)[0]} {SERVICE} r-file from file config\n"


def test_instrument_logging_is_idempotent_reversible_and_covers_child_loggers() -> None:
    root = logging.getLogger()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(trace_id)s %(request_id)s %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    mine = logging.Filter("unrelated")
    handler.addFilter(mine)
    handler.removeFilter(mine)
    first = threadctx.instrument_logging()
    second = threadctx.instrument_logging()
    assert first is second
    assert handler.filters == [first]
    with pytest.raises(ValueError, match="other options"):
        threadctx.instrument_logging("ecs")
    with pytest.raises(ValueError, match="other options"):
        threadctx.instrument_logging(service_name="another")
    with threadctx.bound(request_id="child"):
        logging.getLogger("some.deep.child").info("stamped")
    threadctx.uninstrument_logging()
    assert handler.filters == []
    assert stream.getvalue() == f"{'0' * 32} child stamped\n"


class BrokenRuntime(ContextVarsRuntimeContext):
    """A runtime context whose get_current fails, as a broken backend would."""

    def get_current(self) -> Context:
        raise RuntimeError("backend exploded")


def test_filter_never_raises_and_reports_once(capsys: pytest.CaptureFixture[str]) -> None:
    logger, stream = make_logger("broken", "%(trace_id)s %(message)s", threadctx.ContextFilter())
    saved = otel_context._RUNTIME_CONTEXT
    otel_context._RUNTIME_CONTEXT = BrokenRuntime()
    try:
        logger.info("first")
        logger.info("second")
    finally:
        otel_context._RUNTIME_CONTEXT = saved
    assert stream.getvalue() == f"{'0' * 32} first\n{'0' * 32} second\n"
    err = capsys.readouterr().err
    assert (
        err.count("threadctx.ContextFilter: could not read the context (RuntimeError: backend exploded)") == 1
    )


def test_values_that_bypass_bind_are_escaped() -> None:
    logger, stream = make_logger("escape", "%(request_id)s|%(message)s", threadctx.ContextFilter())
    forged = otel_context.set_value(CORRELATION_KEY, {"request_id": "a\nFORGED INFO\x1b[31m\u2028"})
    token = otel_context.attach(forged)
    try:
        logger.info("m")
    finally:
        otel_context.detach(token)
    assert stream.getvalue() == "a\\nFORGED INFO\\x1b[31m\\u2028|m\n"


LINE = re.compile(r"^(?P<trace>[0-9a-f]{32}) (?P<span>[0-9a-f]{16}) (?P<req>\S+) (?P<thread>\d+) (?P<n>\d+)$")


def run_threads(
    logger: logging.Logger, tracer: trace.Tracer, count: int = 32, lines: int = 50
) -> dict[str, tuple]:
    """``count`` threads, each in its own span and request id, log ``lines`` lines at once."""
    barrier = threading.Barrier(count)
    expected: dict[str, tuple[str, str, str]] = {}
    lock = threading.Lock()

    def work(index: int) -> None:
        with tracer.start_as_current_span(f"req-{index}") as span, threadctx.bound(request_id=f"req-{index}"):
            with lock:
                expected[str(index)] = (*ids_of(span), f"req-{index}")
            barrier.wait(JOIN)
            for n in range(lines):
                logger.info("%d %d", index, n)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(JOIN)
    return expected


def check_lines(output: str, expected: dict[str, tuple], count: int = 32, lines: int = 50) -> None:
    parsed = [LINE.match(line) for line in output.splitlines()]
    assert all(parsed), "a line does not have the expected shape"
    assert len(parsed) == count * lines
    wrong = [m.group(0) for m in parsed if m and (m["trace"], m["span"], m["req"]) != expected[m["thread"]]]
    assert wrong == []


FMT = "%(trace_id)s %(span_id)s %(request_id)s %(message)s"


def test_32_threads_through_one_handler(tracer: trace.Tracer) -> None:
    logger, stream = make_logger("threads", FMT, threadctx.ContextFilter())
    expected = run_threads(logger, tracer)
    check_lines(stream.getvalue(), expected)


def test_32_threads_through_a_queue_handler(tracer: trace.Tracer) -> None:
    """Producer threads stamp; the listener's own filter keeps their values."""
    stream = io.StringIO()
    target = logging.StreamHandler(stream)
    target.setFormatter(logging.Formatter(FMT))
    target.addFilter(threadctx.ContextFilter())  # runs in the listener thread
    records: queue.Queue[logging.LogRecord] = queue.Queue()
    queue_handler = logging.handlers.QueueHandler(records)
    queue_handler.addFilter(threadctx.ContextFilter())  # runs in each producing thread
    logger = logging.getLogger("queued")
    logger.handlers[:] = [queue_handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    listener = logging.handlers.QueueListener(records, target)
    listener.start()
    try:
        expected = run_threads(logger, tracer)
    finally:
        listener.stop()
    check_lines(stream.getvalue(), expected)
