"""snapshot() and dump() read what each thread runs in now: the compiled reader and the mirror, side by side.

Every behaviour runs on both readers in the same process (the ``reader``
fixture of conftest.py switches between threads' lives), and a subprocess checks that
``THREADCTX_PURE_PYTHON=1`` selects the mirror at import.  Where the mirror
cannot know (a thread inside ``contextvars.Context.run`` once it returns, a
thread that never touched threadctx), the test asserts its documented limit,
so a change on either side shows.
"""

from __future__ import annotations

import _thread
import asyncio
import ctypes
import gc
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import threading
import warnings
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextvars import Context, ContextVar, copy_context
from pathlib import Path

import pytest
from opentelemetry import context as otel_context
from opentelemetry.sdk.trace import TracerProvider

import threadctx
from _helpers import JOIN
from threadctx import _current

SOURCE = Path(_current.__file__).with_name("_ctxread.c")
FREE_THREADED = bool(sysconfig.get_config_var("Py_GIL_DISABLED"))
HEADERS = Path(sysconfig.get_paths()["include"], "Python.h").exists()


def request_ids(ident: int | None) -> list[str | None]:
    """The request_id of each snapshot entry for ``ident`` (an empty list: not listed)."""
    return [e.correlation.get("request_id") for e in threadctx.snapshot() if e.thread_id == ident]


class Parked:
    """Runs ``body`` in a thread started by ``start``, parks it at each ``step()`` until told to go on."""

    def __init__(self) -> None:
        self.ident: int | None = None
        self.arrived = threading.Semaphore(0)
        self.go_on = threading.Semaphore(0)
        self.errors: list[BaseException] = []
        self.finished = threading.Event()

    def __enter__(self) -> Parked:
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Let the thread run to its end whatever happened, so that no test leaves it parked."""
        for _ in range(8):
            self.go_on.release()
        if self.ident is not None:
            self.finished.wait(JOIN)

    def step(self) -> None:
        """Called by the parked thread: let the test look, wait for it to say go on."""
        self.arrived.release()
        assert self.go_on.acquire(timeout=JOIN)

    def run(self, body: Callable[[], None]) -> None:
        """The thread's target: runs ``body``, records how it ended."""
        self.ident = threading.get_ident()
        try:
            body()
        except BaseException as exc:  # reported by next()
            self.errors.append(exc)
        finally:
            self.finished.set()
            self.arrived.release()

    def wait(self) -> None:
        """Wait until the thread parks (or ends)."""
        assert self.arrived.acquire(timeout=JOIN)
        assert self.errors == []

    def next(self) -> None:
        """Let the thread go on to its next step, and wait until it parks there."""
        self.go_on.release()
        self.wait()


def test_thread_inside_context_run_shows_the_inner_context_during_and_nothing_after(reader: str) -> None:
    parked = Parked()

    def body() -> None:
        def inner() -> None:
            with threadctx.bound(request_id="inner"):
                parked.step()  # inside run, with the id bound for a block
            threadctx.bind(request_id="for-the-rest-of-run")  # never undone: run's context ends with run
            parked.step()

        Context().run(inner)
        parked.step()  # run has returned

    thread = threading.Thread(target=parked.run, args=(body,))
    with parked:
        thread.start()
        parked.wait()
        assert request_ids(parked.ident) == ["inner"]
        parked.next()
        assert request_ids(parked.ident) == ["for-the-rest-of-run"]
        parked.next()
        # Nothing tells the mirror that run returned: it keeps the last context attached inside run.
        assert request_ids(parked.ident) == ([] if reader == "compiled" else ["for-the-rest-of-run"])
    thread.join(JOIN)
    assert parked.finished.is_set()


@pytest.mark.parametrize("how", ["to_thread", "run_in_executor"])
def test_asyncio_workers_show_the_task_while_they_run_it_and_nothing_when_idle(reader: str, how: str) -> None:
    parked = Parked()
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="asyncio-worker")

    def work() -> None:
        parked.ident = threading.get_ident()
        with threadctx.bound(step="in-worker"):
            parked.step()

    async def main() -> None:
        with threadctx.bound(request_id="async-req"):
            if how == "to_thread":
                await asyncio.to_thread(work)
            else:
                # run_in_executor does not carry the context: the task's own copy is handed over here.
                await asyncio.get_running_loop().run_in_executor(None, copy_context().run, work)

    # Not asyncio.run, which would shut the pool down: the worker must stay, idle.
    loop = asyncio.new_event_loop()
    loop.set_default_executor(pool)
    runner = threading.Thread(target=loop.run_until_complete, args=(main(),))
    runner.start()
    try:
        parked.wait()
        [entry] = [e for e in threadctx.snapshot() if e.thread_id == parked.ident]
        assert dict(entry.correlation) == {"request_id": "async-req", "step": "in-worker"}
        parked.go_on.release()
        runner.join(JOIN)
        assert not runner.is_alive()
        # The worker is idle now, parked in the pool's queue.
        assert any(t.ident == parked.ident for t in threading.enumerate())
        idle = request_ids(parked.ident)
        if reader == "compiled" and getattr(sys.flags, "thread_inherit_context", 0):
            # Python 3.14's inheritance: the worker, started by this submit, really runs in the
            # request's context when idle (instrument_threading() starts pool workers clean).
            assert idle == ["async-req"]
        else:
            assert idle == ([] if reader == "compiled" else ["async-req"])
    finally:
        loop.close()
        pool.shutdown(wait=True)
        pool.shutdown(wait=True)


def test_a_thread_handed_a_context_shows_it_before_it_touches_threadctx(reader: str) -> None:
    """What Python 3.14's thread_inherit_context does for a new Thread, done by hand on any version."""
    entered, release = threading.Event(), threading.Event()

    def park() -> None:
        entered.set()
        release.wait(JOIN)

    with threadctx.bound(request_id="handed-over"):
        context = copy_context()
    thread = threading.Thread(target=context.run, args=(park,))
    thread.start()
    try:
        assert entered.wait(JOIN)
        assert request_ids(thread.ident) == (["handed-over"] if reader == "compiled" else [])
        if reader == "compiled":
            report = threadctx.dump(frames=0)
            assert f"ident={thread.ident}" in report
            assert "correlation: request_id=handed-over" in report
    finally:
        release.set()
        thread.join(JOIN)
    assert request_ids(thread.ident) == []


INHERIT_SCRIPT = textwrap.dedent(
    """
    import os, sys, threading
    os.environ["OTEL_PYTHON_CONTEXT"] = "threadctx"
    import threadctx
    from threadctx import _current

    assert sys.flags.thread_inherit_context == 1
    entered, release = threading.Event(), threading.Event()

    def plain():
        entered.set()
        release.wait(30)

    with threadctx.bound(request_id="parent-request"):
        thread = threading.Thread(target=plain)
        thread.start()
    assert entered.wait(30)
    entries = [e for e in threadctx.snapshot() if e.thread_id == thread.ident]
    report = threadctx.dump(frames=0)
    release.set()
    thread.join(30)
    if _current.reader_in_use():
        assert [dict(e.correlation) for e in entries] == [{"request_id": "parent-request"}], entries
        assert "correlation: request_id=parent-request" in report, report
    else:
        assert entries == [], entries  # the mirror's documented limit
    print("reader" if _current.reader_in_use() else "mirror")
    """
)


@pytest.mark.parametrize("pure_python", ["0", "1"])
def test_under_thread_inherit_context_a_plain_thread_shows_its_parents_request(pure_python: str) -> None:
    """Python 3.14+ with -X thread_inherit_context=1, in a fresh interpreter."""
    if not hasattr(sys.flags, "thread_inherit_context"):
        pytest.skip("sys.flags has no thread_inherit_context before Python 3.14")
    env = {**os.environ, "THREADCTX_PURE_PYTHON": pure_python}
    done = subprocess.run(
        [sys.executable, "-X", "thread_inherit_context=1", "-c", INHERIT_SCRIPT],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    built = importlib.util.find_spec("threadctx._ctxread") is not None and not FREE_THREADED
    expected = "reader" if pure_python == "0" and built else "mirror"
    assert done.stdout.strip() == expected


def test_an_idents_new_thread_never_shows_the_dead_threads_context(reader: str) -> None:
    """Each thread binds and ends without unbinding; the next, on the same ident, has bound nothing yet."""
    dead: dict[int, str] = {}
    reused: list[list[str | None]] = []
    for index in range(100):
        ready, release = threading.Event(), threading.Event()

        def work(
            index: int = index, ready: threading.Event = ready, release: threading.Event = release
        ) -> None:
            ident = threading.get_ident()
            if ident in dead:
                threadctx.get_thread_storage()  # listed, so that a stale context would show
                reused.append(request_ids(ident))
            ready.set()
            release.wait(JOIN)
            threadctx.bind(request_id=f"dead-{index}")
            dead[ident] = f"dead-{index}"

        thread = threading.Thread(target=work)
        thread.start()
        assert ready.wait(JOIN)
        release.set()
        thread.join(JOIN)
    if not reused:
        pytest.skip("this platform never reused a thread ident in 100 threads")
    assert reused == [[None]] * len(reused)


def _start_with_thread_module(body: Callable[[], None]) -> None:
    _thread.start_new_thread(body, ())


def _start_from_c(body: Callable[[], None]) -> None:
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "pthread_create"):
        pytest.skip("this libc has no pthread_create")
    callback = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p)(lambda _arg: body())
    _start_from_c.keep = callback  # type: ignore[attr-defined]  # alive while the thread runs
    handle = ctypes.c_ulong()
    assert libc.pthread_create(ctypes.byref(handle), None, callback, None) == 0
    assert libc.pthread_detach(handle) == 0


@pytest.mark.skipif(sys.platform != "linux", reason="starts a pthread through ctypes (Linux)")
@pytest.mark.parametrize("start", [_start_with_thread_module, _start_from_c], ids=["_thread", "C"])
def test_threads_started_outside_threading_show_their_context(
    reader: str, start: Callable[[Callable[[], None]], None]
) -> None:
    parked = Parked()

    def body() -> None:
        with threadctx.bound(request_id="raw"):
            parked.step()
        parked.step()

    with parked:
        start(lambda: parked.run(body))
        parked.wait()
        [entry] = [e for e in threadctx.snapshot() if e.thread_id == parked.ident]
        assert entry.correlation == {"request_id": "raw"}
        assert entry.name == f"<thread {parked.ident}>"
        # Python 3.10 keeps no native id in a thread state, and neither threading nor the registry
        # knows this thread: unknown (0) there.
        assert entry.native_id > 0 or (sys.version_info < (3, 11) and reader == "compiled")
        parked.next()
        assert request_ids(parked.ident) == []
    assert parked.finished.wait(JOIN)


@pytest.mark.fork
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_fork_child_sees_only_its_own_thread(reader: str) -> None:
    parked = Parked()

    def body() -> None:
        with threadctx.bound(request_id="parent-thread"):
            parked.step()

    thread = threading.Thread(target=parked.run, args=(body,))
    thread.start()
    parked.wait()
    try:
        with threadctx.bound(request_id="forking"), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: fork() with threads
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child
                entries = threadctx.snapshot()
                ok = [(e.thread_id, dict(e.correlation)) for e in entries] == [
                    (threading.get_ident(), {"request_id": "forking"})
                ]
                os._exit(0 if ok and "parent-thread" not in threadctx.dump(frames=0) else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        parked.go_on.release()
        thread.join(JOIN)


def test_the_event_loop_thread_shows_the_running_task_only_while_it_runs(reader: str) -> None:
    parked = Parked()
    loop = asyncio.new_event_loop()
    waiting: list[asyncio.Event] = []

    async def task() -> None:
        with threadctx.bound(request_id="task"):
            parked.step()  # the task runs (and blocks the loop) with its id bound
            await waiting[0].wait()  # the task is suspended: the loop runs nothing

    async def main() -> None:
        waiting.append(asyncio.Event())
        running = asyncio.ensure_future(task())
        await asyncio.sleep(0)
        parked.arrived.release()
        await running

    runner = threading.Thread(target=loop.run_until_complete, args=(main(),))
    runner.start()
    try:
        parked.wait()
        assert request_ids(runner.ident) == ["task"]
        parked.go_on.release()
        parked.wait()  # main ran on: the task is suspended in wait()
        # The mirror keeps what the task attached last; the loop itself serves no request.
        assert request_ids(runner.ident) == ([] if reader == "compiled" else ["task"])
    finally:
        loop.call_soon_threadsafe(waiting[0].set)
        runner.join(JOIN)
        loop.close()


def test_attach_detach_keep_contextvars_token_semantics(reader: str, tracer_provider: TracerProvider) -> None:
    runtime = otel_context._RUNTIME_CONTEXT
    first = runtime.attach(otel_context.Context({"k": 1}))
    second = runtime.attach(otel_context.Context({"k": 2}))
    runtime.detach(first)  # out of order: back to what first saved
    assert otel_context.get_value("k") is None
    with pytest.raises(RuntimeError):
        runtime.detach(first)
    errors: list[BaseException] = []

    def other() -> None:
        try:
            runtime.detach(second)
        except ValueError as exc:
            errors.append(exc)

    thread = threading.Thread(target=other)
    thread.start()
    thread.join(JOIN)
    assert len(errors) == 1
    assert otel_context.get_value("k") is None


def test_the_environment_variable_selects_the_mirror_at_import() -> None:
    code = textwrap.dedent(
        """
        import os
        os.environ["OTEL_PYTHON_CONTEXT"] = "threadctx"
        from opentelemetry import context
        import threadctx
        from threadctx import _current
        print(_current.reader_in_use(), context._RUNTIME_CONTEXT.attach == _current.CURRENT.set)
        """
    )
    seen = {}
    for value in ("0", "1"):
        done = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "THREADCTX_PURE_PYTHON": value},
            check=True,
        )
        seen[value] = done.stdout.split()
    assert seen["1"] == ["False", "False"]
    built = str(importlib.util.find_spec("threadctx._ctxread") is not None and not FREE_THREADED)
    assert seen["0"] == [built, built]


def _compiler() -> str | None:
    return shutil.which(sysconfig.get_config_var("CC").split()[0] if sysconfig.get_config_var("CC") else "cc")


@pytest.mark.skipif(_compiler() is None, reason="no C compiler")
@pytest.mark.skipif(not HEADERS, reason="no Python headers (Python.h)")
def test_the_reader_compiles_cleanly_with_all_warnings(tmp_path: Path) -> None:
    compiler = _compiler()
    assert compiler is not None
    include = sysconfig.get_paths()["include"]
    for defines in ([], ["-DPy_GIL_DISABLED"]):  # the free-threaded branch too
        done = subprocess.run(
            [compiler, "-Wall", "-Wextra", "-Werror", "-fsyntax-only", *defines, "-I", include, str(SOURCE)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr


def test_the_reader_rejects_what_is_not_a_contextvar() -> None:
    if _current.LOADED_READER is None:
        pytest.skip("threadctx._ctxread is not loaded (not built, free-threaded, or THREADCTX_PURE_PYTHON)")
    with pytest.raises(TypeError):
        _current.LOADED_READER("not a ContextVar")  # type: ignore[arg-type]


ROOT = Path(__file__).resolve().parent.parent


def _build_wheel(out: Path, env: dict[str, str]) -> tuple[Path, str]:
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-v", "-w", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    if done.returncode != 0 and "No matching distribution found" in done.stderr:
        pytest.skip("pip cannot fetch the build backend (hatchling, setuptools) here")
    assert done.returncode == 0, done.stderr[-3000:]
    [wheel] = out.glob("threadctx-*.whl")
    return wheel, done.stdout + done.stderr


@pytest.mark.skipif(_compiler() is None or FREE_THREADED, reason="needs a C compiler and a GIL build")
@pytest.mark.skipif(not HEADERS, reason="no Python headers (Python.h)")
@pytest.mark.skipif(sysconfig.get_platform().startswith("win"), reason="the no-compiler case uses CC")
@pytest.mark.timeout(600)  # two wheel builds, each in a fresh build environment
def test_the_wheel_holds_the_reader_and_is_pure_python_without_a_compiler(tmp_path: Path) -> None:
    """The build hook: a platform wheel with the module, or without a compiler a pure-Python one."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("THREADCTX_BUILD_EXTENSION", "THREADCTX_STRICT_BUILD")
    }
    wheel, _ = _build_wheel(tmp_path / "with", env)
    names = zipfile.ZipFile(wheel).namelist()
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    assert f"threadctx/_ctxread{suffix}" in names
    assert "threadctx/_ctxread.c" not in names
    assert not wheel.name.endswith("-py3-none-any.whl"), wheel.name

    wheel, output = _build_wheel(tmp_path / "without", {**env, "CC": "/bin/false"})
    assert wheel.name.endswith("-py3-none-any.whl"), wheel.name
    assert not [name for name in zipfile.ZipFile(wheel).namelist() if "_ctxread" in name]
    assert "could not build threadctx._ctxread" in output


@pytest.mark.skipif(_current.LOADED_READER is None, reason="threadctx._ctxread is not built here")
@pytest.mark.skipif(
    sys.version_info >= (3, 12),
    reason="Python 3.12+ collects at the next bytecode boundary, never inside the reader's C code",
)
def test_threads_ending_in_a_collection_inside_a_read_leave_the_last_reference_to_the_reader() -> None:
    """Python 3.10 and 3.11 collect inside an allocation: one inside the reader runs Python code.

    The collector's callback lets the other threads leave ``Context.run`` and end while the reader
    holds their contexts; the reader then drops the last reference, and the finalizers of the
    contexts' values run inside it and read again.
    """
    count = 4
    parked = threading.Barrier(count + 1)
    release = threading.Event()
    died_in_a_read: list[bool] = []

    class Finalized:
        def __del__(self) -> None:
            below = sys._getframe().f_back
            died_in_a_read.append(below is not None and below.f_code.co_name == "read_contexts")
            _current.read_contexts()  # a read inside the read

    # Not in the OpenTelemetry context, which the read returns: held by the thread's context only.
    payload: ContextVar[Finalized] = ContextVar("payload")

    def body(number: int) -> None:
        def inner() -> None:
            payload.set(Finalized())
            threadctx.bind(request_id=f"ending-{number}")
            parked.wait(JOIN)
            release.wait(JOIN)

        Context().run(inner)  # nothing else holds that context once run returns

    threads = [threading.Thread(target=body, args=(number,)) for number in range(count)]
    for thread in threads:
        thread.start()
    parked.wait(JOIN)
    inside: list[str] = []

    def during_collection(phase: str, info: dict[str, int]) -> None:
        below = sys._getframe().f_back
        if phase == "start" and not inside and below is not None and below.f_code.co_name == "read_contexts":
            inside.append(phase)
            release.set()
            for thread in threads:
                thread.join(JOIN)

    thresholds = gc.get_threshold()
    gc.callbacks.append(during_collection)
    gc.set_threshold(1)
    try:
        # No free 2-tuple left: the reader's first one is allocated, and the collector runs there.
        held = [(number, -number) for number in range(5000)]
        read = _current.read_contexts()
    finally:
        gc.set_threshold(*thresholds)
        gc.callbacks.remove(during_collection)
        release.set()
        for thread in threads:
            thread.join(JOIN)
    del held
    assert inside, "the collector ran inside the read"
    assert read is not None
    ids = {ident: threadctx.correlation(entry[1]).get("request_id") for ident, entry in read.items()}
    assert [ids.get(thread.ident) for thread in threads] == [f"ending-{n}" for n in range(count)], (
        "the read shows what the walk saw"
    )
    assert True in died_in_a_read, "the reader dropped the last reference to a context"
