"""Per-thread storage and the registry, with real threads, C threads and forks."""

from __future__ import annotations

import _thread
import copy
import ctypes
import ctypes.util
import dataclasses
import gc
import importlib
import json
import logging
import os
import pickle
import signal
import sys
import threading
import weakref
from collections.abc import Callable, Iterator
from types import MappingProxyType
from typing import Any

import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    MetricExporter,
    MetricExportResult,
    MetricsData,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.trace import TracerProvider

import threadctx
from _helpers import JOIN
from threadctx import _storage


def run_in_thread(func: Callable[[], Any], *, daemon: bool = False) -> Any:
    """Run ``func`` in a new threading.Thread, join it, and return or re-raise its result."""
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = func()
        except BaseException as exc:  # handed to the caller below
            result["error"] = exc

    thread = threading.Thread(target=target, daemon=daemon)
    thread.start()
    thread.join(JOIN)
    assert not thread.is_alive()
    if "error" in result:
        raise result["error"]
    return result["value"]


def entries_for(ident: int) -> list[threadctx.ThreadSnapshot]:
    return [entry for entry in threadctx.snapshot() if entry.thread_id == ident]


def test_storage_is_private_to_each_thread() -> None:
    count = 8
    barrier = threading.Barrier(count)
    seen: dict[int, tuple[int, bool]] = {}

    def work(index: int) -> None:
        storage = threadctx.get_thread_storage()
        assert storage == {}
        storage["index"] = index
        barrier.wait(JOIN)  # every thread has written before any reads
        seen[index] = (threadctx.get_thread_storage()["index"], threadctx.get_thread_storage() is storage)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(JOIN)
    assert seen == {i: (i, True) for i in range(count)}


def test_delete_thread_storage_starts_a_new_dict() -> None:
    def work() -> tuple[bool, dict[str, Any]]:
        first = threadctx.get_thread_storage()
        first["a"] = 1
        threadctx.delete_thread_storage()
        second = threadctx.get_thread_storage()
        return second is first, second

    same, second = run_in_thread(work)
    assert not same
    assert second == {}


@pytest.mark.parametrize("daemon", [False, True], ids=["normal", "daemon"])
def test_storage_deleted_when_a_threading_thread_ends(daemon: bool) -> None:
    class Marker:
        pass

    def work() -> tuple[int, weakref.ref[Marker]]:
        marker = Marker()
        threadctx.get_thread_storage()["marker"] = marker
        threadctx.bind(request_id="r-1")
        assert entries_for(threading.get_ident())
        return threading.get_ident(), weakref.ref(marker)

    ident, ref = run_in_thread(work, daemon=daemon)
    assert ref() is None, "the dead thread's storage is still alive"
    assert all(ref_().ident != ident for ref_ in _storage._registry.values() if ref_() is not None)


def _wait_for_thread_end(start: Callable[[Callable[[], None]], None]) -> int:
    """Start a thread with ``start``; return its ident once its storage is gone."""
    gone = threading.Event()
    idents: list[int] = []

    class Marker:
        pass

    def work() -> None:
        marker = Marker()
        threadctx.get_thread_storage()["marker"] = marker
        threadctx.bind(request_id="from-raw-thread")
        # The marker dies with the thread's storage, and sets the event.
        weakref.finalize(marker, gone.set)
        idents.append(threading.get_ident())

    start(work)
    assert gone.wait(JOIN), "the thread's storage was never deleted"
    return idents[0]


def test_storage_deleted_when_a_thread_module_thread_ends() -> None:
    ident = _wait_for_thread_end(lambda work: _thread.start_new_thread(work, ()))
    assert not [s for s in (r() for r in _storage._registry.values()) if s is not None and s.ident == ident]


@pytest.mark.skipif(ctypes.util.find_library("c") is None and sys.platform != "linux", reason="needs libc")
def test_storage_deleted_when_a_thread_started_from_c_ends() -> None:
    """A pthread created in C calls into Python through a ctypes callback."""
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "pthread_create"):
        pytest.skip("this libc has no pthread_create")
    callback_type = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p)
    keep: list[Any] = []
    saw_python_thread: list[bool] = []

    def start(work: Callable[[], None]) -> None:
        def entry(_arg: Any) -> None:
            saw_python_thread.append(threading.current_thread() is threading.main_thread())
            work()

        callback = callback_type(entry)
        keep.append(callback)
        handle = ctypes.c_ulong()
        assert libc.pthread_create(ctypes.byref(handle), None, callback, None) == 0
        assert libc.pthread_join(handle, None) == 0

    ident = _wait_for_thread_end(start)
    assert saw_python_thread == [False]
    assert ident != threading.get_ident()
    assert not entries_for(ident)


def test_new_thread_never_sees_a_dead_threads_data(tracer_provider: TracerProvider) -> None:
    """Sequential threads reuse idents; each must start empty."""
    tracer = tracer_provider.get_tracer("test")
    idents: list[int] = []
    stale: list[str] = []

    def work(index: int) -> None:
        ident = threading.get_ident()
        idents.append(ident)
        if threadctx.get_thread_storage():
            stale.append(f"storage in thread {index}")
        if threadctx.correlation():
            stale.append(f"correlation IDs in thread {index}")
        if trace.get_current_span().get_span_context().is_valid:
            stale.append(f"span in thread {index}")
        threadctx.get_thread_storage()["index"] = index
        threadctx.bind(request_id=f"r-{index}")
        span = tracer.start_span(f"s-{index}")
        otel_context.attach(trace.set_span_in_context(span))  # never detached: the thread just ends

    for index in range(300):
        thread = threading.Thread(target=work, args=(index,))
        thread.start()
        thread.join(JOIN)
    if len(set(idents)) == len(idents):
        pytest.skip("this platform never reused a thread ident in 300 threads")
    assert stale == []


def test_late_cleanup_of_a_dead_thread_never_leaks_into_its_ident_successor() -> None:
    """The dead thread's state is kept alive (as a pending GC clean-up would) while its ident is reused."""
    held: list[Any] = []

    def first() -> int:
        threadctx.get_thread_storage()["owner"] = "dead"
        threadctx.bind(request_id="dead-request")
        held.append(_storage.local.state)  # delays the clean-up of this state
        return threading.get_ident()

    dead_ident = run_in_thread(first)
    assert held[0].ident == dead_ident

    successor_ready = threading.Event()
    release = threading.Event()
    observations: list[tuple[dict[str, Any], dict[str, str]]] = []

    def successor() -> None:
        observations.append((dict(threadctx.get_thread_storage()), dict(threadctx.correlation())))
        threadctx.bind(request_id="live-request")
        successor_ready.set()
        release.wait(JOIN)

    for _ in range(200):
        thread = threading.Thread(target=successor)
        observations.clear()
        successor_ready.clear()
        release.clear()
        thread.start()
        assert successor_ready.wait(JOIN)
        if thread.ident == dead_ident:
            break
        release.set()
        thread.join(JOIN)
    else:
        held.clear()
        pytest.skip("the dead thread's ident was not reused in 200 threads")

    try:
        assert observations == [({}, {})]
        entries = entries_for(dead_ident)
        assert len(entries) == 1
        assert dict(entries[0].correlation) == {"request_id": "live-request"}
    finally:
        release.set()
        thread.join(JOIN)
    dead_key = held[0].key
    assert dead_key in _storage._registry
    held.clear()
    gc.collect()
    assert dead_key not in _storage._registry


def test_snapshot_shows_every_parked_thread(tracer_provider: TracerProvider) -> None:
    tracer = tracer_provider.get_tracer("test")
    count = 8
    parked = threading.Barrier(count + 1)
    release = threading.Event()
    expected: dict[int, tuple[str, str, str, int]] = {}
    lock = threading.Lock()

    def work(index: int) -> None:
        with tracer.start_as_current_span(f"job-{index}") as span, threadctx.bound(request_id=f"r-{index}"):
            ctx = span.get_span_context()
            with lock:
                expected[threading.get_ident()] = (
                    format(ctx.trace_id, "032x"),
                    format(ctx.span_id, "016x"),
                    f"r-{index}",
                    threading.get_native_id(),
                )
            parked.wait(JOIN)
            release.wait(JOIN)

    threads = [threading.Thread(target=work, args=(i,), name=f"worker-{i}") for i in range(count)]
    for thread in threads:
        thread.start()
    try:
        parked.wait(JOIN)
        seen = {entry.thread_id: entry for entry in threadctx.snapshot()}
    finally:
        release.set()
        for thread in threads:
            thread.join(JOIN)
    for thread in threads:
        assert thread.ident is not None
        entry = seen[thread.ident]
        trace_id, span_id, request_id, native_id = expected[thread.ident]
        assert (entry.trace_id, entry.span_id, entry.correlation["request_id"]) == (
            trace_id,
            span_id,
            request_id,
        )
        assert entry.name == thread.name
        assert entry.native_id == native_id
        assert entry.span_name == thread.name.replace("worker", "job")
    # Once the threads are gone, so are their entries.
    remaining = {entry.thread_id for entry in threadctx.snapshot()}
    assert not remaining & {thread.ident for thread in threads}


def test_snapshot_of_the_calling_thread_reads_its_current_context() -> None:
    with threadctx.bound(request_id="me"):
        mine = entries_for(threading.get_ident())
    assert [dict(entry.correlation) for entry in mine] == [{"request_id": "me"}]
    assert mine[0].trace_id is None
    assert mine[0].span_id is None


def test_a_snapshot_is_a_plain_value(tracer_provider: TracerProvider) -> None:
    """asdict, deepcopy, pickle and JSON through to_dict() all work, and give back the same value."""
    with tracer_provider.get_tracer("test").start_as_current_span("job"), threadctx.bound(request_id="r-1"):
        threadctx.get_thread_storage()["held"] = True
        try:
            [entry] = entries_for(threading.get_ident())
        finally:
            threadctx.delete_thread_storage()
    assert entry.trace_id is not None
    assert entry.span_started_at is not None
    names = [f.name for f in dataclasses.fields(entry)]
    assert not [name for name in names if name.startswith("_")]

    as_dict = dataclasses.asdict(entry)
    assert list(as_dict) == names
    assert as_dict["correlation"] == {"request_id": "r-1"}
    assert entry.to_dict() == as_dict
    assert json.loads(json.dumps(entry.to_dict())) == as_dict
    assert threadctx.ThreadSnapshot(**as_dict) == entry
    assert copy.deepcopy(entry) == entry
    assert copy.copy(entry) == entry
    assert pickle.loads(pickle.dumps(entry)) == entry
    assert hash(pickle.loads(pickle.dumps(entry))) == hash(entry)
    assert {entry: 1}[copy.deepcopy(entry)] == 1


def test_a_snapshots_correlation_is_its_own_dict() -> None:
    """Changing it changes neither the thread's context nor another snapshot; no field can be set."""
    with threadctx.bound(request_id="r-1"):
        [first] = entries_for(threading.get_ident())
        first.correlation["request_id"] = "changed"  # type: ignore[index]
        [second] = entries_for(threading.get_ident())
        assert threadctx.correlation() == {"request_id": "r-1"}
    assert type(first.correlation) is dict
    assert second.correlation == {"request_id": "r-1"}
    given = {"request_id": "r-2"}
    built = threadctx.ThreadSnapshot(
        thread_id=1,
        native_id=2,
        name="t",
        trace_id=None,
        span_id=None,
        span_name=None,
        correlation=MappingProxyType(given),
        has_storage=False,
    )
    given["request_id"] = "r-3"
    assert built.correlation == {"request_id": "r-2"}
    assert type(built.correlation) is dict
    with pytest.raises(dataclasses.FrozenInstanceError):
        built.name = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        threadctx.ThreadSnapshot(1, 2, "t", None, None, None, {}, False)  # type: ignore[misc]


def test_snapshot_never_raises_while_threads_start_and_stop() -> None:
    stop = threading.Event()
    errors: list[BaseException] = []
    started = threading.Semaphore(0)

    def short_lived() -> None:
        threadctx.bind(request_id="churn")
        threadctx.get_thread_storage()["x"] = 1

    def churn() -> None:
        started.release()
        while not stop.is_set():
            thread = threading.Thread(target=short_lived)
            thread.start()
            thread.join(JOIN)

    churners = [threading.Thread(target=churn) for _ in range(4)]
    for thread in churners:
        thread.start()
    for _ in churners:
        started.acquire()
    try:
        for _ in range(2000):
            try:
                for entry in threadctx.snapshot():
                    assert entry.thread_id
            except BaseException as exc:
                errors.append(exc)
                break
    finally:
        stop.set()
        for thread in churners:
            thread.join(JOIN)
    assert errors == []


def _fork(child: Callable[[], None]) -> int:
    """Fork; run ``child`` in the child and exit 0 (1 on an exception); return the child's exit code."""
    pid = os.fork()  # beside other threads: see the fork marker in conftest.py
    if pid == 0:  # pragma: no cover - runs in the child
        code = 0
        try:
            child()
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


@needs_fork
@pytest.mark.fork
def test_fork_child_holds_only_the_forking_threads_entry() -> None:
    parked = threading.Barrier(5)
    release = threading.Event()

    def work(index: int) -> None:
        threadctx.bind(request_id=f"other-{index}")
        threadctx.get_thread_storage()["other"] = index
        parked.wait(JOIN)
        release.wait(JOIN)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    parked.wait(JOIN)
    assert len(threadctx.snapshot()) >= 4
    threadctx.get_thread_storage()["parent"] = True

    def child() -> None:
        with threadctx.bound(request_id="child"):
            entries = threadctx.snapshot()
            assert [dict(entry.correlation) for entry in entries] == [{"request_id": "child"}]
            assert entries[0].thread_id == threading.get_ident()
            assert entries[0].native_id == os.getpid() == threading.get_native_id()
        assert threadctx.get_thread_storage() == {"parent": True}
        # Besides the forking thread's, only threadctx's own threads that a fork hook restarted
        # (the dump signal's logging thread, a watchdog) may hold an entry: with the mirror, their
        # attach of an empty context creates one.
        own = {thread.ident for thread in threading.enumerate() if thread.name.startswith("threadctx-")}
        me = _storage.local.state
        states = [ref() for ref in list(_storage._registry.values())]
        assert me.key in _storage._registry
        assert [s.ident for s in states if s is not None and s is not me and s.ident not in own] == []
        # New threads work at once.
        assert run_in_thread(lambda: (threadctx.bind(request_id="t"), dict(threadctx.correlation()))[1]) == {
            "request_id": "t"
        }

    try:
        assert _fork(child) == 0
    finally:
        release.set()
        for thread in threads:
            thread.join(JOIN)
        threadctx.delete_thread_storage()


@needs_fork
@pytest.mark.fork
def test_fork_while_other_threads_register_and_unregister() -> None:
    """Threads churn through the registry during every fork; each child works at once."""
    stop = threading.Event()
    running = threading.Barrier(3)

    def churn() -> None:
        running.wait(JOIN)
        while not stop.is_set():
            thread = threading.Thread(target=lambda: threadctx.bind(request_id="x"))
            thread.start()
            thread.join(JOIN)

    churners = [threading.Thread(target=churn) for _ in range(2)]
    for thread in churners:
        thread.start()
    running.wait(JOIN)

    def child() -> None:
        threadctx.bind(request_id="child")
        assert [dict(e.correlation) for e in threadctx.snapshot()] == [{"request_id": "child"}]
        assert run_in_thread(lambda: threadctx.get_thread_storage() == {})

    try:
        codes = [_fork(child) for _ in range(20)]
    finally:
        stop.set()
        for thread in churners:
            thread.join(JOIN)
    assert codes == [0] * 20


def test_a_dead_thread_whose_state_is_kept_alive_is_not_listed() -> None:
    """Liveness comes from the thread's own local data, whoever else holds its state."""
    held: list[Any] = []

    def work() -> int:
        threadctx.bind(request_id="gone")
        held.append(_storage.local.state)
        return threading.get_ident()

    ident = run_in_thread(work)
    assert held[0].ident == ident
    assert held[0].alive() is None
    assert [entry for entry in threadctx.snapshot() if entry.correlation.get("request_id") == "gone"] == []


# ---------------------------------------------------------------------------
# A fork while threadctx's own threads, or the metrics' reader thread, are in the middle of their
# work: the child's registry holds the forking thread alone, under both readers, and the helper
# works again in the child. Without the compiled reader, the dump's log thread restarted in the
# child used to register a second entry there (issue 22).


def _child_holds_only_the_forking_thread() -> None:
    """In a forked child: the registry and snapshot() know the forking thread only."""
    assert list(_storage._registry) == [_storage.local.state.key]
    with threadctx.bound(request_id="child"):
        assert [(entry.thread_id, dict(entry.correlation)) for entry in threadctx.snapshot()] == [
            (threading.get_ident(), {"request_id": "child"})
        ]


class _ParkingHandler(logging.Handler):
    """Parks the thread that logs through it, in the parent only, until released; counts the child's."""

    def __init__(self) -> None:
        super().__init__()
        self.parent = os.getpid()
        self.parked = threading.Event()
        self.unpark = threading.Event()
        self.in_child = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if os.getpid() != self.parent:
            self.in_child.set()
            return
        self.parked.set()
        self.unpark.wait(JOIN)


@pytest.fixture
def parking_logger() -> Iterator[tuple[logging.Logger, _ParkingHandler]]:
    logger = logging.getLogger("threadctx.tests.fork")
    logger.propagate = False
    handler = _ParkingHandler()
    logger.addHandler(handler)
    yield logger, handler
    handler.unpark.set()
    logger.removeHandler(handler)
    logger.propagate = True


@needs_fork
@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="needs SIGUSR1")
@pytest.mark.fork
def test_fork_while_the_dump_log_thread_logs(
    reader: str, parking_logger: tuple[logging.Logger, _ParkingHandler]
) -> None:
    """The dump's log thread is parked inside a handler; the child's registry holds the forking thread."""
    logger, handler = parking_logger
    previous = threadctx.install_dump_signal(signal.SIGUSR1, logger=logger)
    try:
        signal.raise_signal(signal.SIGUSR1)
        assert handler.parked.wait(JOIN)

        def child() -> None:
            _child_holds_only_the_forking_thread()
            signal.raise_signal(signal.SIGUSR1)  # the log thread, started again, logs the report
            assert handler.in_child.wait(JOIN)
            _child_holds_only_the_forking_thread()

        assert _fork(child) == 0
    finally:
        handler.unpark.set()
        signal.signal(signal.SIGUSR1, previous)


@needs_fork
@pytest.mark.fork
def test_fork_while_the_watchdog_logs_in_a_stuck_threads_context(
    reader: str, parking_logger: tuple[logging.Logger, _ParkingHandler], tracer_provider: TracerProvider
) -> None:
    """The watchdog is parked in a handler with the stuck request's context attached.

    Neither the parent's snapshot() nor the child's registry shows it as a second holder.
    """
    logger, handler = parking_logger
    release = threading.Event()
    serving = threading.Event()

    def serve() -> None:
        with (
            tracer_provider.get_tracer("t").start_as_current_span("stuck"),
            threadctx.bound(request_id="stuck"),
        ):
            serving.set()
            release.wait(JOIN)

    server = threading.Thread(target=serve)
    server.start()
    watchdog = None
    try:
        assert serving.wait(JOIN)
        watchdog = threadctx.start_watchdog(threshold=1e-3, interval=1e-3, logger=logger)
        assert handler.parked.wait(JOIN)
        stuck = [
            entry.thread_id
            for entry in threadctx.snapshot()
            if entry.correlation.get("request_id") == "stuck"
        ]
        assert stuck == [server.ident]

        def child() -> None:
            _child_holds_only_the_forking_thread()
            assert watchdog is not None
            assert watchdog.running  # started again in the child

        assert _fork(child) == 0
    finally:
        handler.unpark.set()
        if watchdog is not None:
            watchdog.stop(JOIN)
        release.set()
        server.join(JOIN)


class _ParkingExporter(MetricExporter):
    """Parks the SDK's reader thread in export (its own context attached), in the parent only."""

    def __init__(self) -> None:
        super().__init__()
        self.parent = os.getpid()
        self.exported: list[str] = []
        self.parked = threading.Event()
        self.release = threading.Event()

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        if os.getpid() == self.parent and not self.release.is_set():
            self.exported += [
                metric.name
                for resource in metrics_data.resource_metrics
                for scope in resource.scope_metrics
                for metric in scope.metrics
            ]
            self.parked.set()
            self.release.wait(JOIN)
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        self.release.set()


@needs_fork
@pytest.mark.fork
def test_fork_while_the_metrics_reader_thread_exports(reader: str) -> None:
    """The SDK's periodic reader ran threadctx's callbacks and is parked exporting, in its own context."""
    exporter = _ParkingExporter()
    metric_reader = PeriodicExportingMetricReader(exporter, export_interval_millis=10)
    provider = MeterProvider(metric_readers=[metric_reader])
    parent = os.getpid()
    child_may_collect = (
        threading.Event()
    )  # never set: the child's reader thread waits in its first collection

    def gate(options: CallbackOptions) -> list[Observation]:
        if os.getpid() != parent:
            child_may_collect.wait()  # before the SDK attaches its context, so the child's checks are exact
        return []

    try:
        threadctx.instrument_metrics(provider)
        provider.get_meter("threadctx.tests").create_observable_gauge("tests.gate", callbacks=[gate])
        assert exporter.parked.wait(JOIN)
        assert "threadctx.threads.busy" in exporter.exported

        assert _fork(_child_holds_only_the_forking_thread) == 0
    finally:
        exporter.release.set()
        provider.shutdown()


def _take_locks_once(module: str) -> None:
    """Calls that take each module-level lock of ``module``."""
    if module == "threadctx._propagation":
        threadctx.propagation_stats()
        threadctx.allow_propagation("tenant")
    elif module == "threadctx._threads":
        threadctx.instrument_threading()
        threadctx.uninstrument_threading()
    elif module == "threadctx._ops.metrics":
        threadctx.uninstrument_metrics()
    else:
        adapter = importlib.import_module("threadctx.celery")
        app = importlib.import_module("celery").Celery("fork-lock")
        adapter.instrument(app)
        adapter.uninstrument(app)


@needs_fork
@pytest.mark.fork
@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("threadctx._propagation", "_stats_lock"),
        ("threadctx._propagation", "_allowlist_lock"),
        ("threadctx._threads", "_lock"),
        ("threadctx._ops.metrics", "_lock"),
        ("threadctx.celery", "_lock"),
    ],
)
def test_a_lock_another_thread_holds_at_fork_is_free_in_the_child(module: str, name: str) -> None:
    """The thread that held it does not exist in the child: its copy of the lock would stay held."""
    if module == "threadctx.celery":
        pytest.importorskip("celery")
    lock = getattr(importlib.import_module(module), name)
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with lock:
            held.set()
            release.wait(JOIN)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(JOIN)

        def child() -> None:
            signal.alarm(JOIN)  # a lock left held hangs the child: the alarm ends it (exit code -14)
            _take_locks_once(module)

        assert _fork(child) == 0
    finally:
        release.set()
        holder.join(JOIN)
