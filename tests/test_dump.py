"""dump() and install_dump_signal(): every live thread, with its context and stack, safely on a signal."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from collections.abc import Callable, Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import threadctx
from _helpers import JOIN, Records

needs_sigusr1 = pytest.mark.skipif(
    not hasattr(signal, "SIGUSR1"), reason="SIGUSR1 does not exist on this platform"
)


@pytest.fixture
def busy_threads(tracer_provider: TracerProvider) -> Iterator[None]:
    """A pool worker stuck inside a request, and a plain daemon thread with an odd name."""
    release, started = threading.Event(), threading.Barrier(3)

    def stuck_in_request() -> None:
        with (
            tracer_provider.get_tracer("t").start_as_current_span("stuck order"),
            threadctx.bound(request_id="r-7"),
        ):
            started.wait(JOIN)
            release.wait(JOIN)

    def idle() -> None:
        started.wait(JOIN)
        release.wait(JOIN)

    plain = threading.Thread(target=idle, name="odd\nname", daemon=True)
    plain.start()
    with threadctx.ContextThreadPoolExecutor(max_workers=1, thread_name_prefix="pool") as pool:
        future = pool.submit(stuck_in_request)
        started.wait(JOIN)
        try:
            yield
        finally:
            release.set()
            future.result(JOIN)
            plain.join(JOIN)


def block(report: str, name: str) -> str:
    """The part of the report about the thread called name."""
    match = re.search(
        rf'^Thread "{re.escape(name)}".*?(?=^Thread |^end of threadctx dump)', report, re.M | re.S
    )
    assert match, report
    return match[0]


@pytest.mark.other_threads_stacks
def test_dump_describes_every_thread_with_its_context_and_stack(busy_threads: None) -> None:
    report = threadctx.dump()
    listed = len(re.findall(r"^Thread ", report, re.M))
    assert report.startswith(f"threadctx dump: {listed} threads in process {os.getpid()} ")
    assert report.endswith("end of threadctx dump\n")
    worker = block(report, "pool_0")
    assert re.search(r"trace_id=[0-9a-f]{32} span_id=[0-9a-f]{16} span_name=\"stuck order\"", worker)
    assert "correlation: request_id=r-7" in worker
    # The worker is at the barrier or already in release.wait(): either way its own frame, with source.
    assert re.search(r"in stuck_in_request\n      (started|release)\.wait\(JOIN\)", worker), worker
    plain = block(report, "odd\\nname")
    assert " daemon" in plain.splitlines()[0], "the name is escaped: a thread is one header line"
    assert "trace_id" not in plain
    assert "correlation" not in plain
    main = block(report, "MainThread")
    assert "(this thread)" in main
    assert "threadctx/_ops/" not in main, "the report's own frames are left out"


@pytest.mark.other_threads_stacks
def test_frames_limits_the_stack(busy_threads: None) -> None:
    assert "File " not in threadctx.dump(frames=0)
    worker = block(threadctx.dump(frames=1, source=False), "pool_0")
    assert len([line for line in worker.splitlines() if line.lstrip().startswith("File ")]) == 1
    with pytest.raises(ValueError, match="frames"):
        threadctx.dump(frames=-1)


@pytest.mark.other_threads_stacks
@needs_sigusr1
def test_the_signal_writes_the_report_to_a_file_descriptor(busy_threads: None) -> None:
    report = signal_report()
    assert "correlation: request_id=r-7" in block(report, "pool_0")
    assert ".wait(JOIN)" not in report, "no source lines from a signal handler"
    assert "in stuck_in_request" in report


@needs_sigusr1
def test_the_signal_can_log_the_report_from_a_thread_of_its_own(busy_threads: None) -> None:
    handler = Records()
    logger = logging.getLogger("test.dump")
    logger.addHandler(handler)
    logger.propagate = False
    previous = threadctx.install_dump_signal(signal.SIGUSR1, logger="test.dump")
    try:
        signal.raise_signal(signal.SIGUSR1)
        (record,) = handler.wait_for(bool)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert record.levelno == logging.WARNING
    assert record.threadName == "threadctx-dump"
    assert "correlation: request_id=r-7" in block(record.getMessage(), "pool_0")


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="not both"):
        threadctx.install_dump_signal(file=2, logger="x")
    with pytest.raises(ValueError, match="frames"):
        threadctx.install_dump_signal(frames=-1)
    errors: list[BaseException] = []

    def from_a_worker() -> None:
        try:
            threadctx.install_dump_signal()
        except ValueError as error:
            errors.append(error)

    thread = threading.Thread(target=from_a_worker)
    thread.start()
    thread.join(JOIN)
    assert [str(error) for error in errors] == ["install_dump_signal() must be called from the main thread"]


HOLDS_LOCKS = textwrap.dedent(
    """
    import logging, signal, sys, threading
    import threadctx

    logged = threading.Event()
    class Keep(logging.Handler):
        def emit(self, record):
            logged.set()
    handler = Keep()
    logging.getLogger("dump").addHandler(handler)

    threadctx.install_dump_signal(signal.SIGUSR1, file=sys.stderr)
    # The interrupted thread holds threading's registry lock and the logging handler's lock.
    with threading._active_limbo_lock:
        handler.acquire()
        signal.raise_signal(signal.SIGUSR1)
        print("stderr report written", flush=True)
        threadctx.install_dump_signal(signal.SIGUSR1, logger="dump")
        signal.raise_signal(signal.SIGUSR1)
        print("log report queued", flush=True)
        handler.release()
    print("logged" if logged.wait(30) else "not logged", flush=True)
    """
)


@needs_sigusr1
def test_a_signal_while_the_interrupted_thread_holds_locks_does_not_deadlock() -> None:
    result = subprocess.run(
        [sys.executable, "-c", HOLDS_LOCKS], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["stderr report written", "log report queued", "logged"]
    assert result.stderr.endswith("end of threadctx dump\n")


def test_snapshot_and_dump_say_since_when_each_thread_serves_its_span(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    """started_at is the SDK span's start; busy threads come first, the oldest first, whatever their names."""
    tracer = tracer_provider.get_tracer("t")
    release = threading.Event()
    entered = {name: threading.Event() for name in ("z-old", "a-new")}

    def serve(name: str) -> None:
        with tracer.start_as_current_span(f"span of {name}"):
            entered[name].set()
            release.wait(JOIN)

    threads = [threading.Thread(target=serve, args=(name,), name=name) for name in entered]
    threads[0].start()
    assert entered["z-old"].wait(JOIN)
    threads[1].start()  # its span starts after z-old's
    assert entered["a-new"].wait(JOIN)
    try:
        before = time.time()
        entries = {entry.name: entry for entry in threadctx.snapshot()}
        report = threadctx.dump(frames=0)
    finally:
        release.set()
        for thread in threads:
            thread.join(JOIN)
    spans = {span.name: span for span in exporter.get_finished_spans()}
    for name in entered:
        entry = entries[name]
        start_time = spans[f"span of {name}"].start_time
        assert start_time is not None
        assert entry.span_started_at == start_time / 1e9
        assert entry.elapsed is not None
        assert 0 <= entry.elapsed <= time.time() - entry.span_started_at
        assert entry.elapsed >= before - entry.span_started_at
        since = r"^  started_at=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z elapsed=\d+\.\d{3}s$"
        assert re.search(since, block(report, name), re.M)
    headers = re.findall(r'^Thread "([^"]*)"', report, re.M)
    assert headers[:2] == ["z-old", "a-new"], headers
    assert "started_at" not in block(report, "MainThread"), "no span: no start"


def test_dump_escapes_correlation_values_so_none_forges_a_thread(busy_threads: None) -> None:
    """A value with a line feed, set through the OpenTelemetry context (not bind()), stays on its line."""
    from opentelemetry import context as otel_context

    from threadctx._correlation import CORRELATION_KEY

    forged = 'x\nThread "forged" ident=1\n\x1b[2Jy'
    token = otel_context.attach(otel_context.set_value(CORRELATION_KEY, {"request_id": forged, "k\nk": "v"}))
    try:
        report = threadctx.dump(frames=0)
    finally:
        otel_context.detach(token)
    assert 'Thread "forged"' not in report.replace('\\nThread "forged"', "")
    assert not re.search(r'^Thread "forged"', report, re.M)
    assert "\x1b" not in report
    escaped = 'correlation: request_id=x\\nThread "forged" ident=1\\n\\x1b[2Jy k\\nk=v'
    assert escaped in block(report, "MainThread")


@pytest.mark.other_threads_stacks
def test_dump_escapes_file_names_so_none_forges_a_thread() -> None:
    """Code compiled under a name with a line feed (a template, say) stays on its stack line."""
    started, release = threading.Event(), threading.Event()
    namespace: dict[str, object] = {"started": started, "release": release, "JOIN": JOIN}
    source = "def wait_here():\n    started.set()\n    release.wait(JOIN)\n"
    exec(compile(source, 'tpl\nThread "forged" ident=1', "exec"), namespace)
    thread = threading.Thread(target=namespace["wait_here"], name="templated")  # type: ignore[arg-type]
    thread.start()
    try:
        assert started.wait(JOIN)
        report = threadctx.dump()
    finally:
        release.set()
        thread.join(JOIN)
    assert not re.search(r'^Thread "forged"', report, re.M)
    assert 'File "tpl\\nThread "forged" ident=1", line 3, in wait_here' in block(report, "templated")


@needs_sigusr1
def test_install_dump_signal_again_replaces_it_one_thread_one_fork_hook() -> None:
    """Three installs with a logger: one dump thread, in the process and in a forked child; none listed."""
    code = textwrap.dedent(
        """
        import os, re, signal, sys, threading, warnings
        import threadctx

        warnings.simplefilter("ignore", DeprecationWarning)  # fork in a multi-threaded process (3.12+)
        for _ in range(3):
            threadctx.install_dump_signal(signal.SIGUSR1, logger="dumps")

        def dump_threads():
            return sum(thread.name == "threadctx-dump" for thread in threading.enumerate())

        report = threadctx.dump(frames=0)
        listed = len(re.findall(r"^Thread ", report, re.M))
        print("parent", dump_threads(), listed, report.split()[2], "threadctx-dump" in report)
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            print("child", dump_threads(), flush=True)
            os._exit(0)
        os.waitpid(pid, 0)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    parent, child = result.stdout.splitlines()
    _, threads, listed, counted, shows_itself = parent.split()
    assert threads == "1"
    assert counted == listed, "the header counts the threads it lists (its own dump thread is not)"
    assert shows_itself == "False"
    assert child == "child 1"


@needs_sigusr1
def test_a_report_that_fails_to_log_does_not_end_the_logging_thread() -> None:
    """A filter that raises on the first report: it is said on stderr, and the next report comes.

    The exception used to end threadctx's logging thread: later reports piled up in its queue,
    never logged.
    """
    code = textwrap.dedent(
        """
        import logging, signal, threading
        import threadctx

        logged = threading.Event()
        calls = []

        def flaky(record):
            calls.append(record)
            if len(calls) == 1:
                raise RuntimeError("filter bug")
            return True

        class Done(logging.Handler):
            def emit(self, record):
                logged.set()

        logger = logging.getLogger("dumps")
        logger.addFilter(flaky)
        logger.addHandler(Done())
        threadctx.install_dump_signal(signal.SIGUSR1, logger="dumps")
        signal.raise_signal(signal.SIGUSR1)
        signal.raise_signal(signal.SIGUSR1)
        print(logged.wait(30), len(calls), flush=True)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "True 2\n"
    assert "RuntimeError: filter bug" in result.stderr


def test_snapshot_dump_and_signal_warn_once_on_another_runtime_context(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On OpenTelemetry's default runtime context: one RuntimeWarning, then silence; the report says it."""
    from opentelemetry import context as otel_context
    from opentelemetry.context.contextvars_context import ContextVarsRuntimeContext

    from threadctx import _snapshot

    monkeypatch.setattr(_snapshot, "_warned_foreign_runtime", False)
    monkeypatch.setattr(otel_context, "_RUNTIME_CONTEXT", ContextVarsRuntimeContext())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        threadctx.snapshot()
        report = threadctx.dump(frames=0)
        threadctx.snapshot()
    assert [(w.category, w.filename) for w in caught] == [(RuntimeWarning, __file__)]
    assert "runtime context is ContextVarsRuntimeContext, not threadctx's" in str(caught[0].message)
    assert "OTEL_PYTHON_CONTEXT=threadctx" in str(caught[0].message)
    assert report.splitlines()[2].startswith(  # under the header and the reader's line
        "note: the runtime context is ContextVarsRuntimeContext, not threadctx's"
    )
    for call in (lambda: threadctx.dump(frames=0), lambda: threadctx.install_dump_signal(file=2)):
        monkeypatch.setattr(_snapshot, "_warned_foreign_runtime", False)
        with pytest.warns(RuntimeWarning, match="not threadctx's") as each:
            previous = call()
        assert [w.filename for w in each] == [__file__]
        if not isinstance(previous, str):
            signal.signal(signal.SIGUSR1, previous)


def test_no_warning_on_threadctx_runtime_context(monkeypatch: pytest.MonkeyPatch) -> None:
    from threadctx import _snapshot

    monkeypatch.setattr(_snapshot, "_warned_foreign_runtime", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        threadctx.snapshot()
        threadctx.dump(frames=0)
    assert "note:" not in threadctx.dump(frames=0)


def signal_report() -> str:
    """The report the dump signal writes to a file descriptor (the handler runs in this thread)."""
    read_end, write_end = os.pipe()
    previous = threadctx.install_dump_signal(signal.SIGUSR1, file=write_end)
    try:
        signal.raise_signal(signal.SIGUSR1)  # the handler has run when this returns
    finally:
        signal.signal(signal.SIGUSR1, previous)
        os.close(write_end)
    with os.fdopen(read_end) as pipe:
        return pipe.read()


@pytest.mark.parametrize(
    "report",
    [
        pytest.param(threadctx.dump, id="dump"),
        pytest.param(
            signal_report,
            id="signal",
            marks=pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="SIGUSR1 does not exist here"),
        ),
    ],
)
def test_without_the_gil_only_the_calling_threads_stack_is_read(
    busy_threads: None, monkeypatch: pytest.MonkeyPatch, report: Callable[[], str]
) -> None:
    """A free-threaded build cannot walk the frames of a running thread safely: the report says so.

    No free-threaded interpreter is available here, so the build is stood in
    for by ``sys._is_gil_enabled`` answering False, which is what threadctx asks.
    (``python -m threadctx dump`` gets the signal's report through a file.)
    """
    monkeypatch.setattr(sys, "_is_gil_enabled", lambda: False, raising=False)
    text = report()
    worker = block(text, "pool_0")
    assert "correlation: request_id=r-7" in worker, "the context is still shown"
    assert "stack not shown: a free-threaded build" in worker
    assert "File " not in worker
    assert "File " in block(text, "MainThread"), "the calling thread's own stack is safe to read"


@pytest.mark.parametrize(
    ("is_gil_enabled", "readable"),
    [(None, True), (True, True), (False, False)],
    ids=["before-3.13", "gil-enabled", "gil-disabled"],
)
def test_other_threads_frames_are_read_only_while_the_gil_is_enabled(
    monkeypatch: pytest.MonkeyPatch, is_gil_enabled: bool | None, readable: bool
) -> None:
    """The one decision: sys._is_gil_enabled() where it exists (3.13+), else a GIL build."""
    from threadctx._ops import report as _report

    if is_gil_enabled is None:
        monkeypatch.delattr(sys, "_is_gil_enabled", raising=False)
    else:
        monkeypatch.setattr(sys, "_is_gil_enabled", lambda: is_gil_enabled, raising=False)
    assert _report.others_frames_readable() is readable
    release = threading.Event()
    other = threading.Thread(target=release.wait, args=(JOIN,))
    other.start()
    try:
        frames = _report.current_frames()
    finally:
        release.set()
        other.join(JOIN)
    assert frames[threading.get_ident()] is not None
    assert other.ident in frames
    assert (frames[other.ident] is not None) is readable
