"""start_watchdog(): real threads held by events, a real clock, and thresholds the tests wait past."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

import threadctx
from _helpers import JOIN, Records

# Short enough for a quick test, long enough that a look runs many times in between.
THRESHOLD, INTERVAL = 0.2, 0.01


@pytest.fixture
def records() -> Iterator[Records]:
    handler = Records()
    logger = logging.getLogger("test.watchdog")
    logger.addHandler(handler)
    logger.propagate = False
    yield handler
    logger.removeHandler(handler)
    logger.propagate = True


class Stuck:
    """A thread inside a span (or not), with correlation IDs, until released."""

    def __init__(self, name: str, enter: Callable[[], AbstractContextManager[Any]]) -> None:
        self.inside, self.release = threading.Event(), threading.Event()
        self.enter = enter
        self.span_context: trace.SpanContext | None = None
        self.thread = threading.Thread(target=self.run, name=name)
        self.thread.start()
        assert self.inside.wait(JOIN)

    def run(self) -> None:
        with self.enter():
            self.span_context = trace.get_current_span().get_span_context()
            self.inside.set()
            self.release.wait(JOIN)

    def stop(self) -> None:
        self.release.set()
        self.thread.join(JOIN)


def in_span(provider: TracerProvider, name: str, **ids: str) -> Callable[[], ExitStack]:
    def enter() -> ExitStack:
        stack = ExitStack()
        stack.enter_context(provider.get_tracer("t").start_as_current_span(name))
        stack.enter_context(threadctx.bound(**ids))
        return stack

    return enter


@pytest.mark.other_threads_stacks
def test_a_stuck_span_is_reported_once_with_the_stuck_threads_ids(
    tracer_provider: TracerProvider, records: Records
) -> None:
    datadog = threadctx.ContextFilter(preset="datadog")  # stamps from the current context
    records.addFilter(datadog)
    idle = threading.Event()
    plain = threading.Thread(target=idle.wait, args=(JOIN,), name="idle")  # no span: never reported
    plain.start()
    only_ids = Stuck("ids only", lambda: threadctx.bound(request_id="r-0"))  # no span: never reported
    first = Stuck(
        "pool_0", in_span(tracer_provider, "charge card", request_id="r-1", tenant="acme", thread="t")
    )
    try:
        with threadctx.start_watchdog(threshold=THRESHOLD, interval=INTERVAL, logger="test.watchdog"):
            (record,) = records.wait_for(lambda records: len(records) >= 1)
            second = Stuck("pool_1", in_span(tracer_provider, "ship order", request_id="r-2"))
            try:
                # pool_1 needs the whole threshold (many looks) to be stuck: pool_0 is not reported again.
                got = records.wait_for(lambda records: len(records) >= 2)
            finally:
                second.stop()
    finally:
        first.stop()
        only_ids.stop()
        idle.set()
        plain.join(JOIN)
    assert [r.request_id for r in got] == ["r-1", "r-2"]  # type: ignore[attr-defined]
    assert record.levelno == logging.WARNING
    assert record.name == "test.watchdog"
    assert record.threadName == "threadctx-watchdog", "logged by the watchdog..."
    assert first.span_context is not None
    trace_id, span_id = (
        format(first.span_context.trace_id, "032x"),
        format(first.span_context.span_id, "016x"),
    )
    # ...with the stuck thread's IDs as attributes, and in its context (what the filter stamped).
    assert (record.trace_id, record.span_id, record.tenant) == (trace_id, span_id, "acme")  # type: ignore[attr-defined]
    trace_int = first.span_context.trace_id  # Datadog: hex for a 128-bit id, decimal for a 64-bit one
    assert record.__dict__["dd.trace_id"] == (f"{trace_int:032x}" if trace_int >> 64 else str(trace_int))
    assert isinstance(record.thread, int), "a correlation ID never overwrites the record's own attributes"
    message = record.getMessage()
    assert message.startswith(f'thread "pool_0" (ident={first.thread.ident}) has served its span for ')
    assert "(threshold 0.2s)" in message
    assert f'trace_id={trace_id} span_id={span_id} span_name="charge card"' in message
    assert "correlation: request_id=r-1 tenant=acme thread=t" in message
    assert "started_at=" in message
    assert "in run\n      self.release.wait(JOIN)" in message, "the stuck thread's innermost frames"


def test_without_the_gil_the_warning_says_why_it_shows_no_stack(
    tracer_provider: TracerProvider, records: Records, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A free-threaded build (stood in for by ``sys._is_gil_enabled`` answering False): ids, no stack.

    The watchdog reads no other thread's frames there (see ``others_frames_readable``); the warning
    still names the stuck request, and says why its stack is missing.
    """
    monkeypatch.setattr(sys, "_is_gil_enabled", lambda: False, raising=False)
    stuck = Stuck("pool_0", in_span(tracer_provider, "charge card", request_id="r-1"))
    try:
        with threadctx.start_watchdog(threshold=THRESHOLD, interval=INTERVAL, logger="test.watchdog"):
            (record, *_) = records.wait_for(lambda records: len(records) >= 1)
    finally:
        stuck.stop()
    message = record.getMessage()
    assert record.request_id == "r-1"  # type: ignore[attr-defined]
    assert "correlation: request_id=r-1" in message
    assert message.endswith(
        "  stack (innermost last):\n"
        "    (stack not shown: a free-threaded build cannot read a running thread's frames safely)"
    )
    assert "File " not in message


def test_a_record_factory_that_sets_trace_id_keeps_it_and_the_warning_comes(
    tracer_provider: TracerProvider, records: Records
) -> None:
    """A LogRecord factory that stamps ``trace_id`` itself: its value stays, and the warning comes.

    Logging refuses an ``extra=`` that would overwrite it (KeyError): the warning was lost for good.
    """
    default = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = default(*args, **kwargs)
        record.trace_id = "from-factory"
        return record

    logging.setLogRecordFactory(factory)
    stuck = Stuck("pool_0", in_span(tracer_provider, "charge card", request_id="r-1"))
    try:
        with threadctx.start_watchdog(threshold=THRESHOLD, interval=INTERVAL, logger="test.watchdog"):
            (record,) = records.wait_for(lambda records: len(records) >= 1)
    finally:
        stuck.stop()
        logging.setLogRecordFactory(default)
    assert record.trace_id == "from-factory", "what another tool put on the record stays"  # type: ignore[attr-defined]
    assert record.request_id == "r-1"  # type: ignore[attr-defined]
    assert 'thread "pool_0"' in record.getMessage()


def test_a_span_without_a_start_time_is_aged_from_when_the_watchdog_first_saw_it(records: Records) -> None:
    """A caller's span carried in (or one not sampled) has no start time: age counts from the first look."""
    carried = trace.SpanContext(
        trace_id=0x0AF7651916CD43DD8448EB211C80319C, span_id=0xB7AD6B7169203331, is_remote=True
    )

    def enter() -> AbstractContextManager[Any]:
        return trace.use_span(trace.NonRecordingSpan(carried))

    stuck = Stuck("carried", enter)
    try:
        (entry,) = [e for e in threadctx.snapshot() if e.name == "carried"]
        assert (entry.span_started_at, entry.elapsed) == (None, None)
        with threadctx.start_watchdog(threshold=THRESHOLD, interval=INTERVAL, logger="test.watchdog"):
            (record,) = records.wait_for(lambda records: len(records) >= 1)
    finally:
        stuck.stop()
    assert record.trace_id == "0af7651916cd43dd8448eb211c80319c"  # type: ignore[attr-defined]
    assert "started_at" not in record.getMessage()


def test_threads_ending_while_it_looks_do_not_stop_it(
    tracer_provider: TracerProvider, records: Records, capfd: pytest.CaptureFixture[str]
) -> None:
    """Short spans on 160 threads that come and go while it looks all the time: it still reports the next.

    The short spans are not stuck: the stacks (sys._current_frames(), which CPython 3.11 has crashed in
    under heavy churn) are read only for the stuck one, as in a service.
    """
    tracer = tracer_provider.get_tracer("t")

    def churn() -> None:
        for _ in range(20):
            thread = threading.Thread(target=short)
            thread.start()
            thread.join(JOIN)

    def short() -> None:
        with tracer.start_as_current_span("short"):
            pass

    with threadctx.start_watchdog(threshold=THRESHOLD, interval=1e-4, logger="test.watchdog") as watchdog:
        churners = [threading.Thread(target=churn) for _ in range(8)]
        for thread in churners:
            thread.start()
        for thread in churners:
            thread.join(JOIN)
        stuck = Stuck("after the churn", in_span(tracer_provider, "last", request_id="r-last"))
        try:
            records.wait_for(lambda records: any(getattr(r, "request_id", None) == "r-last" for r in records))
        finally:
            stuck.stop()
        assert watchdog.running
    assert "a look failed" not in capfd.readouterr().err


def test_it_reports_a_thread_that_holds_threadings_own_lock(
    tracer_provider: TracerProvider, records: Records
) -> None:
    """The stuck thread holds the lock threading.enumerate() takes: the watchdog never needs it."""

    def enter() -> AbstractContextManager[Any]:
        stack = in_span(tracer_provider, "holds the lock", request_id="r-lock")()
        stack.enter_context(threading._active_limbo_lock)  # type: ignore[attr-defined]
        return stack

    with threadctx.start_watchdog(threshold=THRESHOLD, interval=INTERVAL, logger="test.watchdog"):
        stuck = Stuck("holder", enter)  # no thread may start while it holds the lock
        try:
            (record,) = records.wait_for(lambda records: len(records) >= 1)
        finally:
            stuck.stop()
    assert record.request_id == "r-lock"  # type: ignore[attr-defined]


def test_stop_and_the_context_manager_end_the_thread() -> None:
    def watchdog_threads() -> list[threading.Thread]:
        return [thread for thread in threading.enumerate() if thread.name == "threadctx-watchdog"]

    with threadctx.start_watchdog(threshold=60) as watchdog:
        assert watchdog.running
        assert len(watchdog_threads()) == 1
        assert watchdog_threads()[0].daemon
    assert not watchdog.running
    assert watchdog_threads() == []
    watchdog.stop()  # again: nothing happens
    first = threadctx.start_watchdog(threshold=60)
    other = threadctx.start_watchdog(threshold=8)
    assert not first.running, "one watchdog per process: the second replaces the first"
    assert len(watchdog_threads()) == 1
    assert (other.interval, other.logger.name) == (2.0, "threadctx.watchdog")
    other.stop()
    assert not other.running


@pytest.mark.parametrize(
    ("threshold", "interval", "message"),
    [
        (0, None, "threshold"),
        (-1, None, "threshold"),
        (float("nan"), None, "threshold"),
        (float("inf"), None, "threshold"),
        (1, 0, "interval"),
        (1, float("nan"), "interval"),
    ],
)
def test_bad_arguments_are_rejected(threshold: float, interval: float | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        threadctx.start_watchdog(threshold=threshold, interval=interval)


def test_it_warns_once_on_another_runtime_context(monkeypatch: pytest.MonkeyPatch) -> None:
    from opentelemetry import context as otel_context
    from opentelemetry.context.contextvars_context import ContextVarsRuntimeContext

    from threadctx import _snapshot

    monkeypatch.setattr(_snapshot, "_warned_foreign_runtime", False)
    monkeypatch.setattr(otel_context, "_RUNTIME_CONTEXT", ContextVarsRuntimeContext())
    with pytest.warns(RuntimeWarning, match="not threadctx's") as caught:
        threadctx.start_watchdog(threshold=60).stop()
    assert [w.filename for w in caught] == [__file__]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        threadctx.start_watchdog(threshold=60).stop()  # once: no second warning


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OTEL_PYTHON_CONTEXT": "threadctx"}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_a_threshold_of_years_keeps_it_watching() -> None:
    """An interval beyond what Event.wait accepts (threading.TIMEOUT_MAX) waits in steps.

    The watchdog thread used to die at its first wait with an OverflowError, silently for the
    caller of start_watchdog().
    """
    result = run_python(
        """
        import sys, threading, time
        import threadctx

        watchdog = threadctx.start_watchdog(threshold=1e12)  # the interval: a quarter of it
        thread = watchdog._thread
        deadline = time.monotonic() + 60
        # Until its first wait has begun (or it died): the innermost frame is in threading's Condition.
        while thread.is_alive() and time.monotonic() < deadline:
            frame = sys._current_frames().get(thread.ident)
            if frame is not None and frame.f_code.co_name == "wait":
                break
            time.sleep(0.001)
        print(watchdog.running, flush=True)
        watchdog.stop()
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout == "True\n"


def test_it_stops_cleanly_at_interpreter_exit() -> None:
    """The exit stops it (an atexit handler registered earlier runs later and sees it stopped)."""
    result = run_python(
        """
        import atexit, threading
        import threadctx

        def after():
            names = [thread.name for thread in threading.enumerate()]
            print("running" if watchdog.running else "stopped", "threadctx-watchdog" in names, flush=True)

        atexit.register(after)
        watchdog = threadctx.start_watchdog(threshold=1e-6, interval=1e-4)
        stuck = threading.Event()
        def serve():
            with threadctx.bound(request_id="r"):
                stuck.wait()
        threading.Thread(target=serve, daemon=True).start()
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "stopped False\n"
    assert result.stderr == ""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_after_fork_the_child_runs_it_once_and_it_reports_there() -> None:
    result = run_python(
        """
        import logging, os, threading, warnings
        from opentelemetry.sdk.trace import TracerProvider
        import threadctx

        warnings.simplefilter("ignore", DeprecationWarning)  # fork in a multi-threaded process (3.12+)
        tracer = TracerProvider().get_tracer("t")
        reported = threading.Event()
        class Handler(logging.Handler):
            def emit(self, record):
                print(os.getpid() == child_pid, record.request_id, flush=True)
                reported.set()
        logging.getLogger("threadctx.watchdog").addHandler(Handler())
        child_pid = None

        def watchdogs():
            return sum(thread.name == "threadctx-watchdog" for thread in threading.enumerate())

        watchdog = threadctx.start_watchdog(threshold=0.2, interval=0.01)
        pid = os.fork()
        if pid == 0:
            child_pid = os.getpid()
            print("child", watchdogs(), flush=True)
            watchdog = threadctx.start_watchdog(threshold=0.2, interval=0.01)  # a post-fork hook's
            print("child", watchdogs(), flush=True)
            release = threading.Event()
            def serve():
                with tracer.start_as_current_span("in the child"), threadctx.bound(request_id="r-child"):
                    release.wait(30)
            thread = threading.Thread(target=serve)
            thread.start()
            ok = reported.wait(30)
            release.set()
            thread.join()
            watchdog.stop()
            print("child stopped", ok, watchdogs(), flush=True)
            os._exit(0)
        os.waitpid(pid, 0)
        print("parent", watchdogs(), watchdog.running, flush=True)
        watchdog.stop()
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "child 1",
        "child 1",
        "True r-child",
        "child stopped True 0",
        "parent 1 True",
    ]
