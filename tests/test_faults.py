"""Faults: signals mid-call, handlers and providers that fail, shutdown with daemon threads busy.

Whatever fails, the logging call returns, nothing deadlocks, and every record the user logged
reaches the handlers that work.
"""

from __future__ import annotations

import io
import logging
import re
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator

import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext

import threadctx

FORMAT = "%(trace_id)s %(span_id)s %(request_id)s %(message)s"
LINE = r"[0-9a-f]{32} [0-9a-f]{16} \S+ .+"


def span_context(number: int) -> otel_context.Context:
    return trace.set_span_in_context(NonRecordingSpan(SpanContext(number, number, is_remote=False)))


@pytest.fixture
def lines() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(threadctx.ContextFilter())
    handler.setFormatter(logging.Formatter(FORMAT, defaults={"request_id": "-"}))
    log = logging.getLogger("faults")
    log.addHandler(handler)
    log.propagate = False
    log.setLevel(logging.INFO)
    yield log, stream
    log.removeHandler(handler)


@pytest.mark.skipif(
    not hasattr(signal, "setitimer"), reason="signal.setitimer is not available on this platform"
)
def test_a_signal_handler_that_logs_while_the_thread_is_inside_threadctx(
    lines: tuple[logging.Logger, io.StringIO],
) -> None:
    """SIGALRM every 0.5 ms interrupts a loop of bound/attach/log/detach; the handler logs too."""
    log, stream = lines
    wanted = 300
    fired = 0
    done = threading.Event()

    def on_alarm(signum: int, frame: object) -> None:
        nonlocal fired
        fired += 1
        log.info("alarm %d", fired)  # whatever context the interrupted code had attached
        # ">=", not "==": a handler can itself be interrupted by the next alarm, and the two
        # may step over the exact count (this test once ran away on "==").
        if fired >= wanted:
            signal.setitimer(signal.ITIMER_REAL, 0)
            done.set()

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, 0.0005, 0.0005)
    loops = 0
    try:
        while not done.is_set():
            # A bound: this test replaces pytest-timeout's SIGALRM, so nothing else would stop it.
            assert loops < 2_000_000, f"only {fired} of {wanted} alarms arrived"
            with threadctx.bound(request_id=f"r{loops}"):
                token = otel_context.attach(span_context(loops + 1))
                log.info("main %d", loops)
                otel_context.detach(token)
            loops += 1
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert otel_context.get_current() == otel_context.Context(), "the thread's context is intact"
    output = stream.getvalue().splitlines()
    main = [line for line in output if " main " in line]
    alarms = [line for line in output if " alarm " in line]
    assert len(main) == loops
    assert len(alarms) >= wanted, "every alarm logged its line"
    for line in main:  # lines of the interrupted code keep their own ids
        trace_id, _, request_id, _, number = line.split(" ")
        assert (trace_id, request_id) == (format(int(number) + 1, "032x"), f"r{number}"), line
    for line in alarms:
        assert re.fullmatch(LINE, line), line


def test_a_handler_that_raises_loses_nothing_for_the_others(
    lines: tuple[logging.Logger, io.StringIO], capsys: pytest.CaptureFixture[str]
) -> None:
    """A handler whose stream fails (disk full): logging reports it; the other handler gets the line."""
    log, stream = lines

    class FullDisk(io.StringIO):
        def write(self, text: str) -> int:
            raise OSError("disk full")

    failing = logging.StreamHandler(FullDisk())
    failing.addFilter(threadctx.ContextFilter())
    failing.setFormatter(logging.Formatter(FORMAT))
    log.addHandler(failing)
    try:
        with threadctx.bound(request_id="r-1"):
            log.info("kept")  # does not raise: logging reports the handler's error on stderr
    finally:
        log.removeHandler(failing)
    assert stream.getvalue().endswith(" r-1 kept\n")
    assert "OSError: disk full" in capsys.readouterr().err


def test_a_span_that_fails_gives_placeholders_and_one_report(
    lines: tuple[logging.Logger, io.StringIO], capsys: pytest.CaptureFixture[str]
) -> None:
    log, stream = lines

    class FailingSpan(NonRecordingSpan):
        def get_span_context(self) -> SpanContext:
            raise RuntimeError("provider\nbroken")

    token = otel_context.attach(trace.set_span_in_context(FailingSpan(SpanContext(1, 1, False))))
    try:
        log.info("first")
        log.info("second")
    finally:
        otel_context.detach(token)
    assert stream.getvalue() == f"{'0' * 32} {'0' * 16} - first\n{'0' * 32} {'0' * 16} - second\n"
    err = capsys.readouterr().err
    assert (
        err.count("threadctx.ContextFilter: could not read the context (RuntimeError: provider\\nbroken)")
        == 1
    )


def test_a_tracer_provider_whose_resource_fails(capsys: pytest.CaptureFixture[str]) -> None:
    """The service name comes from the global provider's resource; a failing one costs only the ids."""

    class Provider(trace.NoOpTracerProvider):
        @property
        def resource(self) -> object:
            raise RuntimeError("no resource")

    saved = trace._TRACER_PROVIDER
    trace._TRACER_PROVIDER = Provider()
    try:
        record = logging.makeLogRecord({"msg": "m"})
        with threadctx.bound(request_id="r-2"):
            assert threadctx.ContextFilter("ecs").filter(record)
    finally:
        trace._TRACER_PROVIDER = saved
    assert (record.__dict__["service.name"], record.__dict__["request_id"]) == ("", "r-2")
    assert "RuntimeError: no resource" in capsys.readouterr().err


SHUTDOWN = textwrap.dedent(
    """
    import logging, sys, threading
    import threadctx
    from opentelemetry import context, trace
    from opentelemetry.trace import NonRecordingSpan, SpanContext

    handler = logging.StreamHandler(sys.stdout)
    handler.addFilter(threadctx.ContextFilter())
    fmt = "%(trace_id)s %(request_id)s %(message)s"
    handler.setFormatter(logging.Formatter(fmt, defaults={"request_id": "-"}))
    log = logging.getLogger("daemons")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    running = threading.Barrier(9)

    def busy(number):
        first = True
        while True:
            with threadctx.bound(request_id=f"d{number}"):
                span = NonRecordingSpan(SpanContext(number + 1, number + 1, False))
                token = context.attach(trace.set_span_in_context(span))
                log.info("daemon %d", number)
                threadctx.get_thread_storage()["n"] = number
                threadctx.snapshot()
                context.detach(token)
            if first:
                first = False
                running.wait()

    for number in range(8):
        threading.Thread(target=busy, args=(number,), daemon=True).start()
    running.wait()
    print("main leaves", flush=True)
    """
)


def test_interpreter_shutdown_with_daemon_threads_holding_context() -> None:
    env = {"OTEL_PYTHON_CONTEXT": "threadctx", "PATH": "/usr/bin:/bin"}
    for _ in range(5):  # shutdown races differ from run to run
        result = subprocess.run(
            [sys.executable, "-c", SHUTDOWN],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert "main leaves" in result.stdout
        assert "Traceback" not in result.stderr, result.stderr
        assert "Fatal" not in result.stderr, result.stderr
