"""Shared fixtures: threadctx is the runtime context, and every test leaves the state it found."""

from __future__ import annotations

import os

# Before OpenTelemetry is first imported: it reads this once, at import time.
os.environ["OTEL_PYTHON_CONTEXT"] = "threadctx"

import logging
import signal
import sys
import threading
import warnings
from collections.abc import Iterator

import hypothesis
import pytest
from opentelemetry import context as otel_context
from opentelemetry.context.contextvars_context import ContextVarsRuntimeContext
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import threadctx

# THREADCTX_SWITCH_INTERVAL=1e-6 (seconds) makes the interpreter switch threads as often as it
# can: the closest a GIL build gets to the interleavings of a free-threaded one.
if os.environ.get("THREADCTX_SWITCH_INTERVAL"):
    sys.setswitchinterval(float(os.environ["THREADCTX_SWITCH_INTERVAL"]))

# In CI (CI=true) the generated tests draw the same examples on every run, so that a run that
# lands is one that can be repeated; locally they draw new ones and keep what fails in .hypothesis/.
hypothesis.settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
if os.environ.get("CI"):
    hypothesis.settings.load_profile("ci")

assert isinstance(otel_context._RUNTIME_CONTEXT, threadctx.ThreadRuntimeContext), (
    "OTEL_PYTHON_CONTEXT=threadctx did not select threadctx's runtime context"
)


def pytest_report_header() -> str:
    inherit = getattr(sys.flags, "thread_inherit_context", "n/a")
    gil = "off" if getattr(sys, "_is_gil_enabled", lambda: True)() is False else "on"
    interval = sys.getswitchinterval()
    from threadctx import _current

    reader = "compiled" if _current.reader_in_use() else "mirror (pure Python)"
    return (
        f"threadctx: thread_inherit_context={inherit}, GIL {gil}, switch interval {interval} s, "
        f"reader {reader}"
    )


def pytest_runtest_setup(item: pytest.Item) -> None:
    """A test marked ``other_threads_stacks`` is skipped, with the reason, where the GIL is disabled.

    On a free-threaded build, with the GIL off, threadctx shows no stack but the calling thread's
    (see ``others_frames_readable`` in ``threadctx._ops.report`` and docs/reliability.md); the tests of that
    branch run everywhere, with ``sys._is_gil_enabled`` answering False.
    """
    if item.get_closest_marker("other_threads_stacks") is not None:
        is_gil_enabled = getattr(sys, "_is_gil_enabled", None)  # 3.13+
        if is_gil_enabled is not None and not is_gil_enabled():
            pytest.skip(
                "the GIL is disabled: threadctx does not read another running thread's frames "
                "(unsafe on a free-threaded build, docs/reliability.md); the report says so instead"
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
    saved = threadctx.propagation_allowlist()
    yield
    threadctx.set_propagation_allowlist(saved)


#: What os.fork() warns (Python 3.12+) when the process runs other threads.
FORK_WITH_THREADS = r"This process \(pid=\d+\) is multi-threaded, use of fork\(\) may lead to deadlocks"


def _forks_of_this_process() -> set[int] | None:
    """Children that are forks of this process (not exec'd helpers); None where Linux's /proc can't tell."""
    if not os.path.exists(f"/proc/self/task/{threading.get_native_id()}/children"):
        return None
    children: set[int] = set()
    with os.scandir("/proc/self/task") as tasks:
        for task in tasks:
            try:
                with open(f"{task.path}/children") as listed:
                    children.update(int(pid) for pid in listed.read().split())
            except FileNotFoundError:  # that thread ended meanwhile
                pass
    with open("/proc/self/cmdline", "rb") as own:
        command = own.read()
    forks = set()
    for pid in children:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as theirs:
                if theirs.read() == command:
                    forks.add(pid)
        except FileNotFoundError:  # it ended meanwhile
            pass
    return forks


@pytest.fixture(autouse=True)
def _forks_beside_threads(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test marked ``fork`` may fork while other threads run, and leaves no forked child behind.

    Forking beside threads is what those tests are about (or, with multiprocessing's ``fork``
    start method, what a service does whose own threads run): os.fork()'s warning about it,
    an error from 3.15 on under the suite's filters, is ignored there and only there.  Raised,
    it would come in the parent after the child exists, leaving a pool worker that nobody
    joins and that keeps a piped test run from ending: any such fork is killed, and the test fails.
    """
    if request.node.get_closest_marker("fork") is None:
        yield
        return
    before = _forks_of_this_process()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", FORK_WITH_THREADS, DeprecationWarning)
        yield
    after = _forks_of_this_process()
    left = set() if before is None or after is None else after - before
    for pid in left:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert not left, f"forked children left behind (killed): {sorted(left)}"


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


@pytest.fixture(params=["compiled", "mirror"])
def reader(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run the test with the compiled reader, then with the pure-Python mirror; yields which.

    Each test whose answer depends on the reader takes this fixture and names the reader in its
    assertions.  The compiled one is skipped, with the reason, where it is not loaded (no
    compiler, a free-threaded build, or ``THREADCTX_PURE_PYTHON=1``).
    """
    from _helpers import use_reader
    from threadctx import _current

    if request.param == "compiled" and _current.LOADED_READER is None:
        pytest.skip(
            "threadctx._ctxread is not built here (no compiler, free-threaded, or THREADCTX_PURE_PYTHON)"
        )
    use_reader(request.param == "compiled")
    try:
        yield request.param
    finally:
        use_reader(True)  # what was loaded at import


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
