"""ContextFilter and instrument_logging with real handlers, threads and the OpenTelemetry SDK."""

from __future__ import annotations

import gc
import io
import logging
import logging.config
import logging.handlers
import pickle
import queue
import re
import textwrap
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context.context import Context
from opentelemetry.context.contextvars_context import ContextVarsRuntimeContext
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider

import threadctx
from _helpers import JOIN, Records
from threadctx._correlation import CORRELATION_KEY

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
    handler = Records()
    handler.addFilter(threadctx.ContextFilter())
    logger = logging.getLogger("capture")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    yield handler.records
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
    assert fields == {**expected(trace_hex, span_hex, ctx.trace_id, ctx.span_id), "request_id": "r"}


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


def test_options_are_read_only_after_construction() -> None:
    """A changed option would leave the fields derived from it stale: every option refuses a new value."""
    filt = threadctx.ContextFilter("datadog", prefix="ctx_", defaults={"tenant": "-"}, env="prod")
    for option, value in (
        ("preset", "ecs"),
        ("names", threadctx.PRESETS["ecs"]),
        ("prefix", ""),
        ("stamp_correlation", False),
        ("defaults", {}),
        ("project_id", "p"),
        ("service_name", "s"),
        ("env", "dev"),
        ("version", "2"),
    ):
        with pytest.raises(AttributeError):
            setattr(filt, option, value)
    with pytest.raises(TypeError):
        filt.defaults["tenant"] = "acme"  # type: ignore[index]
    assert (filt.prefix, dict(filt.defaults), filt.env) == ("ctx_", {"tenant": "-"}, "prod")
    assert filt.fields(Context())["ctx_tenant"] == "-"


def test_presets_are_read_only() -> None:
    """A preset replaced at run time would break every later ContextFilter: the table refuses it."""
    with pytest.raises(TypeError):
        threadctx.PRESETS["otel"] = None  # type: ignore[index]
    with pytest.raises(TypeError):
        del threadctx.PRESETS["ecs"]  # type: ignore[attr-defined]
    assert threadctx.ContextFilter().names == threadctx.PRESETS["otel"]


def test_the_adapters_and_the_filter_stamp_the_same_fields(tracer: trace.Tracer) -> None:
    """The structlog processor and the loguru patcher add what the default filter stamps (one function)."""
    with tracer.start_as_current_span("op"), threadctx.bound(request_id="r-9"):
        expected = threadctx.ContextFilter().fields()
        event = threadctx.structlog_processor(None, "info", {"event": "e", "request_id": "kept"})
        record: dict[str, dict[str, object]] = {"extra": {}}
        threadctx.loguru_patcher(record)
    assert record["extra"] == expected
    assert event == {**expected, "event": "e", "request_id": "kept"}


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


# --- Issue 12: logging that never loses an ID ---------------------------------------------------------

TRACE_FIELD = {
    "otel": "trace_id",
    "otel-python": "otelTraceID",
    "ecs": "trace.id",
    "datadog": "dd.trace_id",
    "gcp": "logging.googleapis.com/trace",
    "newrelic": "trace.id",
}


@pytest.mark.parametrize("preset", sorted(TRACE_FIELD))
def test_extra_with_the_presets_trace_field_keeps_every_other_field(
    preset: str, tracer: trace.Tracer
) -> None:
    """A caller's trace field in extra= wins, and does not make the filter skip the correlation IDs."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    handler.addFilter(threadctx.ContextFilter(preset, project_id="p"))
    logger = logging.getLogger(f"extra-{preset}")
    logger.handlers[:] = [handler]
    logger.propagate = False
    with tracer.start_as_current_span("op"), threadctx.bound(request_id="r-x"):
        logger.warning("x", extra={TRACE_FIELD[preset]: "from-extra"})
    [record] = records
    assert record.__dict__[TRACE_FIELD[preset]] == "from-extra"
    assert record.request_id == "r-x"  # type: ignore[attr-defined]


@pytest.fixture
def ddtrace_like_factory() -> Iterator[None]:
    """A record factory stamping dd.* the way ddtrace's log injection does (in makeRecord)."""
    previous = logging.getLogRecordFactory()

    def factory(*args: object, **kwargs: object) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        record.__dict__.update(
            {
                "dd.trace_id": "123",
                "dd.span_id": "456",
                "dd.service": "dd-svc",
                "dd.env": "prod",
                "dd.version": "1",
            }
        )
        return record

    logging.setLogRecordFactory(factory)
    yield
    logging.setLogRecordFactory(previous)


@pytest.mark.usefixtures("ddtrace_like_factory")
def test_ddtrace_stamped_records_keep_its_values_and_get_the_correlation_ids(tracer: trace.Tracer) -> None:
    logger, stream = make_logger(
        "dd-stamped",
        "%(dd.trace_id)s %(dd.span_id)s %(dd.env)s %(request_id)s %(message)s",
        threadctx.ContextFilter("datadog"),
    )
    with tracer.start_as_current_span("op"), threadctx.bound(request_id="r-dd"):
        logger.info("m")
    assert stream.getvalue() == "123 456 prod r-dd m\n"


def test_logging_instrumentor_stamped_records_get_the_correlation_ids(
    tracer: trace.Tracer, global_provider: TracerProvider
) -> None:
    instrumentation = pytest.importorskip(
        "opentelemetry.instrumentation.logging",
        reason="opentelemetry-instrumentation-logging is not installed (test group)",
    )
    LoggingInstrumentor = instrumentation.LoggingInstrumentor  # noqa: N806 - the class, by its name

    logger, stream = make_logger(
        "instrumented", "%(otelTraceID)s %(request_id)s %(message)s", threadctx.ContextFilter("otel-python")
    )
    instrumentor = LoggingInstrumentor()
    instrumentor.instrument(inject_trace_context=True, tracer_provider=global_provider)
    try:
        with tracer.start_as_current_span("op") as span, threadctx.bound(request_id="r-li"):
            logger.info("m")
    finally:
        instrumentor.uninstrument()
    assert stream.getvalue() == f"{ids_of(span)[0]} r-li m\n"


def test_a_listener_with_another_preset_takes_the_producers_ids_not_its_own(tracer: trace.Tracer) -> None:
    """The queue's listener thread runs in a span of its own: its filter must still write the producer's."""
    seen: list[dict[str, object]] = []
    target = logging.Handler()
    target.emit = lambda record: seen.append(dict(record.__dict__))  # type: ignore[method-assign]
    target.addFilter(threadctx.ContextFilter("ecs", defaults={"request_id": "-"}))
    records: queue.Queue[logging.LogRecord | None] = queue.Queue()
    queue_handler = logging.handlers.QueueHandler(records)  # type: ignore[arg-type]
    queue_handler.addFilter(threadctx.ContextFilter())
    logger = logging.getLogger("queued-other-preset")
    logger.handlers[:] = [queue_handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)

    def listen() -> None:
        with tracer.start_as_current_span("listener"), threadctx.bound(request_id="listener's"):
            while (record := records.get()) is not None:
                target.handle(record)

    listener = threading.Thread(target=listen)
    listener.start()
    with tracer.start_as_current_span("producer") as span, threadctx.bound(request_id="r-q"):
        logger.info("inside")
    logger.info("outside")
    records.put(None)
    listener.join(JOIN)
    trace_id, span_id = ids_of(span)
    inside, outside = seen
    assert (inside["trace.id"], inside["span.id"], inside["request_id"]) == (trace_id, span_id, "r-q")
    assert outside["request_id"] == "-"
    assert "trace.id" not in outside  # ecs: nothing outside a span, and never the listener's span


def test_a_pickled_record_from_another_process_keeps_its_ids(tracer: trace.Tracer) -> None:
    """As through a multiprocessing queue or a SocketHandler: the mark survives pickling."""
    producer = threadctx.ContextFilter()
    record = logging.makeLogRecord({"msg": "m"})
    with tracer.start_as_current_span("op") as span, threadctx.bound(request_id="r-p"):
        producer.filter(record)
    received = logging.makeLogRecord(pickle.loads(pickle.dumps(record.__dict__)))
    received.process = -1  # another process
    with tracer.start_as_current_span("consumer"):
        threadctx.ContextFilter("datadog").filter(received)
    trace_id, span_id = ids_of(span)
    ids = span.get_span_context()
    assert (received.trace_id, received.request_id) == (trace_id, "r-p")  # type: ignore[attr-defined]
    assert received.__dict__["dd.trace_id"] == (trace_id if ids.trace_id >= 2**64 else str(ids.trace_id))
    assert received.__dict__["dd.span_id"] == str(int(span_id, 16))


def test_two_handlers_with_different_presets_each_get_their_fields(tracer: trace.Tracer) -> None:
    """One record, two handlers: the second filter is not fooled by the first one's mark."""
    records: list[logging.LogRecord] = []
    first, second = logging.Handler(), logging.Handler()
    first.emit = second.emit = records.append  # type: ignore[method-assign]
    first.addFilter(threadctx.ContextFilter(prefix="a_"))
    second.addFilter(threadctx.ContextFilter("ecs", prefix="b_"))
    logger = logging.getLogger("two-presets")
    logger.handlers[:] = [first, second]
    logger.propagate = False
    with tracer.start_as_current_span("op") as span, threadctx.bound(request_id="r-2"):
        logger.warning("m")
    record = records[0]
    assert (record.trace_id, record.__dict__["trace.id"]) == (ids_of(span)[0], ids_of(span)[0])  # type: ignore[attr-defined]
    assert (record.a_request_id, record.b_request_id) == ("r-2", "r-2")  # type: ignore[attr-defined]


def test_a_foreign_mark_never_raises() -> None:
    record = logging.makeLogRecord({"msg": "m", "_threadctx": object(), "thread": -1})
    assert threadctx.ContextFilter(defaults={"request_id": "-"}).filter(record) is True
    assert (record.trace_id, record.request_id) == ("0" * 32, "-")  # type: ignore[attr-defined]


DEFAULTS_CONFIG = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"ctx": {"()": "threadctx.ContextFilter", "defaults": {"request_id": "-", "tenant": "none"}}},
    "formatters": {"plain": {"format": "%(trace_id)s %(request_id)s %(tenant)s %(message)s"}},
    "handlers": {"out": {"class": "logging.StreamHandler", "filters": ["ctx"], "formatter": "plain"}},
    "loggers": {"defaulted": {"handlers": ["out"], "level": "INFO", "propagate": False}},
}


def test_defaults_from_dict_config_outside_a_request(tracer: trace.Tracer) -> None:
    """The quick start's and the docs' format, on every supported Python (no Formatter defaults=)."""
    stream = io.StringIO()
    config = {
        **DEFAULTS_CONFIG,
        "handlers": {"out": {**DEFAULTS_CONFIG["handlers"]["out"], "stream": stream}},
    }  # type: ignore[dict-item]
    logging.config.dictConfig(config)
    logger = logging.getLogger("defaulted")
    try:
        logger.info("start-up")
        with tracer.start_as_current_span("op") as span, threadctx.bound(request_id="r-d"):
            logger.info("request")
    finally:
        logger.handlers.clear()
    assert stream.getvalue().splitlines() == [
        f"{'0' * 32} - none start-up",
        f"{ids_of(span)[0]} r-d none request",
    ]


def test_without_span_omits_or_writes_placeholders() -> None:
    assert "trace.id" not in threadctx.ContextFilter("ecs").fields()
    assert "logging.googleapis.com/trace" not in threadctx.ContextFilter("gcp", project_id="p").fields()
    assert "trace.id" not in threadctx.ContextFilter("newrelic").fields()
    assert threadctx.ContextFilter("ecs", without_span="placeholders").fields()["trace.id"] == "0" * 32
    assert threadctx.ContextFilter("datadog").fields()["dd.trace_id"] == "0"
    assert "trace_id" not in threadctx.ContextFilter(without_span="omit").fields()
    with pytest.raises(ValueError, match="without_span must be"):
        threadctx.ContextFilter(without_span="zeros")  # type: ignore[arg-type]


def span_context_with(trace_id: int) -> Context:
    ids = trace.SpanContext(
        trace_id=trace_id, span_id=0x1234, is_remote=False, trace_flags=trace.TraceFlags(1)
    )
    return trace.set_span_in_context(trace.NonRecordingSpan(ids))


def test_datadog_writes_128_bit_ids_in_hex_and_64_bit_ids_in_decimal() -> None:
    """As ddtrace >= 2.12 does: hex only when the high 64 bits are non-zero."""
    filt = threadctx.ContextFilter("datadog")
    wide = filt.fields(span_context_with(0x0AF7651916CD43DD8448EB211C80319C))
    narrow = filt.fields(span_context_with(0x8448EB211C80319C))
    assert wide["dd.trace_id"] == "0af7651916cd43dd8448eb211c80319c"
    assert narrow["dd.trace_id"] == str(0x8448EB211C80319C)
    assert wide["dd.span_id"] == narrow["dd.span_id"] == str(0x1234)


@pytest.fixture
def provider_with(monkeypatch: pytest.MonkeyPatch) -> Callable[[dict[str, str] | None], None]:
    """Install a tracer provider with the given resource as the global one, for one test."""

    def install(attributes: dict[str, str] | None) -> None:
        provider = None if attributes is None else TracerProvider(resource=Resource.create(attributes))
        monkeypatch.setattr(trace, "_TRACER_PROVIDER", provider)

    return install


def test_datadog_env_and_version_from_options_or_the_resource(
    provider_with: Callable[[dict[str, str] | None], None],
) -> None:
    provider_with({"service.name": "svc", "deployment.environment.name": "prod", "service.version": "1.2"})
    fields = threadctx.ContextFilter("datadog").fields()
    assert (fields["dd.service"], fields["dd.env"], fields["dd.version"]) == ("svc", "prod", "1.2")
    given = threadctx.ContextFilter("datadog", env="staging", version="2.0").fields()
    assert (given["dd.env"], given["dd.version"]) == ("staging", "2.0")
    provider_with({"service.name": "svc", "deployment.environment": "old-key"})
    older = threadctx.ContextFilter("datadog").fields()
    assert (older["dd.env"], older["dd.version"]) == ("old-key", "")


def test_gcp_project_from_the_resource_the_environment_or_a_warning(
    provider_with: Callable[[dict[str, str] | None], None],
    tracer: trace.Tracer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    key = "logging.googleapis.com/trace"
    monkeypatch.delenv("GOOGLE_CLOUD_PROJECT", raising=False)
    with tracer.start_as_current_span("op") as span:
        context = otel_context.get_current()
    trace_hex = ids_of(span)[0]
    provider_with({"cloud.provider": "gcp", "cloud.account.id": "from-resource"})
    assert threadctx.ContextFilter("gcp").fields(context)[key] == f"projects/from-resource/traces/{trace_hex}"
    provider_with({"cloud.provider": "aws", "cloud.account.id": "123456"})
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "from-env")
    assert threadctx.ContextFilter("gcp").fields(context)[key] == f"projects/from-env/traces/{trace_hex}"
    assert (
        threadctx.ContextFilter("gcp", project_id="given").fields(context)[key].startswith("projects/given/")
    )
    monkeypatch.delenv("GOOGLE_CLOUD_PROJECT")
    nowhere = threadctx.ContextFilter("gcp")
    assert nowhere.fields(context)[key] == trace_hex
    assert nowhere.fields(context)[key] == trace_hex
    assert capsys.readouterr().err.count("the gcp preset has no project") == 1


def test_the_service_name_appears_once_the_provider_is_set(
    provider_with: Callable[[dict[str, str] | None], None],
) -> None:
    """Lines logged before the provider was set must not keep an empty name in that context."""
    logger, stream = make_logger(
        "early", "%(otelServiceName)s|%(message)s", threadctx.ContextFilter("otel-python")
    )
    provider_with(None)
    logger.info("start-up")
    provider_with({"service.name": "late"})
    logger.info("ready")  # the same (empty) context as the start-up line
    assert stream.getvalue() == "|start-up\nlate|ready\n"


class ParkingIds(dict[str, str]):
    """Correlation IDs whose first ``items()`` (the filter building its fields) parks until told to go on."""

    def __init__(self, ids: dict[str, str]) -> None:
        super().__init__(ids)
        self.parked, self.go_on, self.first = threading.Event(), threading.Event(), True

    def items(self) -> Any:
        if self.first:
            self.first = False
            self.parked.set()
            assert self.go_on.wait(JOIN)
        return super().items()


def test_fields_built_before_another_thread_resolved_the_resource_are_not_cached(
    provider_with: Callable[[dict[str, str] | None], None],
) -> None:
    """A line in flight while the provider arrives may miss the name; the next one in its context has it.

    The filter built one thread's fields from the unresolved name, another thread resolved the
    resource meanwhile, and the first then cached what it had built: that context's lines kept the
    empty name. Found reading the filter for free-threaded builds; a thread switch did it with the GIL.
    """
    logger, stream = make_logger(
        "resolving", "%(otelServiceName)s|%(message)s", threadctx.ContextFilter("otel-python")
    )
    provider_with(None)
    ids = ParkingIds({"request_id": "r-1"})
    context = otel_context.set_value(CORRELATION_KEY, ids, Context())

    def log_in_context(message: str) -> None:
        token = otel_context.attach(context)
        try:
            logger.info(message)
        finally:
            otel_context.detach(token)

    early = threading.Thread(target=log_in_context, args=("early",))
    early.start()
    try:
        assert ids.parked.wait(JOIN)  # its fields are half built, with no name yet
        provider_with({"service.name": "late"})
        logger.info("ready")  # resolves the resource, in this thread
    finally:
        ids.go_on.set()
        early.join(JOIN)
    log_in_context("again")
    assert stream.getvalue().splitlines() == ["late|ready", "|early", "late|again"]


def test_the_cache_keeps_no_ended_context_alive(tracer: trace.Tracer) -> None:
    filt = threadctx.ContextFilter()
    with tracer.start_as_current_span("ended") as span:
        filt.filter(logging.makeLogRecord({"msg": "m"}))
    gone = weakref.ref(span)
    del span
    gc.collect()
    assert gone() is None


def test_instrument_logging_gives_opentelemetrys_handler_correlation_ids_only(tracer: trace.Tracer) -> None:
    from opentelemetry.sdk._logs import LoggerProvider, LoggingHandler
    from opentelemetry.sdk._logs.export import SimpleLogRecordProcessor

    try:
        from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter
    except ImportError:  # opentelemetry-sdk < 1.39
        from opentelemetry.sdk._logs.export import InMemoryLogExporter as InMemoryLogRecordExporter

    exporter = InMemoryLogRecordExporter()
    provider = LoggerProvider()
    provider.add_log_record_processor(SimpleLogRecordProcessor(exporter))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        handler = LoggingHandler(logger_provider=provider)
    logger = logging.getLogger("otel-instrumented")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    threadctx.instrument_logging(defaults={"request_id": "-"})
    try:
        with tracer.start_as_current_span("op") as span, threadctx.bound(request_id="r-o"):
            logger.info("exported")
    finally:
        threadctx.uninstrument_logging()
        logger.handlers.clear()
    assert handler.filters == []
    [exported] = exporter.get_finished_logs()
    attributes = dict(exported.log_record.attributes or {})
    assert exported.log_record.trace_id == span.get_span_context().trace_id
    assert attributes["request_id"] == "r-o"
    assert not {"trace_id", "span_id", "trace_flags", "trace_sampled", "_threadctx"} & set(attributes)
