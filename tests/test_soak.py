"""Soak and churn: many threads, many records, many forks. CI runs the short form; `make soak` the long one.

THREADCTX_SOAK=long selects the figures of the reliability page: 100,000 threads, 64 threads
logging 10,000 records each, 200 forks, 2 minutes of snapshots under thread churn and collector
pressure. Each test prints what it ran (see `-s`).
"""

from __future__ import annotations

import contextvars
import ctypes
import gc
import io
import logging
import logging.handlers
import os
import queue
import re
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable

import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext

import threadctx
from threadctx import _current, _storage

LONG = os.environ.get("THREADCTX_SOAK") == "long"
JOIN = 120
pytestmark = pytest.mark.soak


def span_context(number: int) -> otel_context.Context:
    return trace.set_span_in_context(NonRecordingSpan(SpanContext(number, number, is_remote=False)))


def work_once(number: int) -> None:
    token = otel_context.attach(span_context(number + 1))
    threadctx.bind(request_id=f"r-{number}")
    threadctx.get_thread_storage()["n"] = number
    otel_context.detach(token)


def test_thread_churn_the_registry_keeps_only_live_threads_and_memory_is_flat(
    capsys: pytest.CaptureFixture[str],
) -> None:
    total = 100_000 if LONG else 4_000
    batch = 50

    def run(count: int) -> None:
        for start in range(0, count, batch):
            threads = [threading.Thread(target=work_once, args=(start + i,)) for i in range(batch)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(JOIN)

    run(total // 10)  # warm-up: caches, free lists
    gc.collect()
    tracemalloc.start()
    try:
        run(total // 2)
        gc.collect()
        middle, _ = tracemalloc.get_traced_memory()
        run(total // 2)
        gc.collect()
        end, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    live = {thread.ident for thread in threading.enumerate()}
    registered = {ref().ident for ref in list(_storage._registry.values()) if ref() is not None}  # type: ignore[union-attr]
    assert registered <= live, "the registry holds only live threads"
    growth = end - middle
    with capsys.disabled():
        print(
            f"\n  thread churn: {total + total // 10} threads; registry {len(registered)} entries; "
            f"memory growth over the second half {growth / 1024:.1f} KiB"
        )
    assert growth < 256 * 1024, f"memory grew by {growth} bytes over {total // 2} threads"


@pytest.mark.parametrize("through", ["one handler", "QueueHandler"])
def test_many_threads_log_through_one_handler_and_no_line_is_misattributed(
    through: str, capsys: pytest.CaptureFixture[str]
) -> None:
    threads, records = (64, 10_000) if LONG else (16, 500)
    stream = io.StringIO()
    target = logging.StreamHandler(stream)
    target.setFormatter(logging.Formatter("%(trace_id)s %(request_id)s %(message)s"))
    log = logging.getLogger(f"soak.{through}")
    log.propagate = False
    log.setLevel(logging.INFO)
    listener = None
    if through == "QueueHandler":
        handler: logging.Handler = logging.handlers.QueueHandler(queue.SimpleQueue())
        handler.addFilter(threadctx.ContextFilter())  # in the producing thread, as the docs say
        listener = logging.handlers.QueueListener(handler.queue, target)  # type: ignore[attr-defined]
        listener.start()
    else:
        target.addFilter(threadctx.ContextFilter())
        handler = target
    log.addHandler(handler)
    barrier = threading.Barrier(threads)

    def worker(number: int) -> None:
        barrier.wait(JOIN)
        for index in range(records):
            with threadctx.bound(request_id=f"t{number}-{index % 7}"):
                token = otel_context.attach(span_context(number * 1_000_000 + index % 7 + 1))
                log.info("t%d-%d", number, index % 7)
                otel_context.detach(token)

    started = time.perf_counter()
    pool = [threading.Thread(target=worker, args=(number,)) for number in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(JOIN)
    if listener is not None:
        listener.stop()
    log.removeHandler(handler)
    elapsed = time.perf_counter() - started

    lines = stream.getvalue().splitlines()
    assert len(lines) == threads * records
    wrong = 0
    for line in lines:
        trace_id, request_id, message = line.split(" ")
        number, variant = (int(part) for part in re.fullmatch(r"t(\d+)-(\d+)", message).groups())  # type: ignore[union-attr]
        expected_trace = format(number * 1_000_000 + variant + 1, "032x")
        wrong += (trace_id, request_id) != (expected_trace, message)
    with capsys.disabled():
        print(
            f"\n  {through}: {threads} threads x {records} records = {len(lines)} lines, "
            f"{wrong} misattributed, {elapsed:.1f} s"
        )
    assert wrong == 0


@pytest.mark.fork
@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is not available on this platform")
def test_repeated_forks_while_threads_work_every_child_is_usable(capsys: pytest.CaptureFixture[str]) -> None:
    forks = 200 if LONG else 20
    stop = threading.Event()

    def busy(number: int) -> None:
        while not stop.is_set():
            work_once(number)

    workers = [threading.Thread(target=busy, args=(number,)) for number in range(4)]
    for worker in workers:
        worker.start()
    slowest = 0.0
    try:
        for attempt in range(forks):
            with threadctx.bound(request_id=f"parent-{attempt}"):
                started = time.monotonic()
                pid = os.fork()  # beside working threads: see the fork marker in conftest.py
                if pid == 0:  # the child: attach, bind, storage, snapshot, a log line; then leave
                    try:
                        ok = threadctx.correlation() == {"request_id": f"parent-{attempt}"}
                        work_once(attempt)
                        ok = ok and len(threadctx.snapshot()) == 1
                        record = logging.makeLogRecord({})
                        ok = (
                            ok
                            and threadctx.ContextFilter().filter(record)
                            and record.request_id == f"parent-{attempt}"
                        )
                    except BaseException:
                        ok = False
                    os._exit(0 if ok else 1)
                _, status = os.waitpid(pid, 0)
                slowest = max(slowest, time.monotonic() - started)
                assert os.waitstatus_to_exitcode(status) == 0, f"child {attempt} failed"
    finally:
        stop.set()
        for worker in workers:
            worker.join(JOIN)
    with capsys.disabled():
        print(
            f"\n  forks: {forks} children forked while 4 threads worked; "
            f"slowest child {slowest * 1000:.0f} ms"
        )


class Finalized:
    """A context value whose finalizer runs Python code (a snapshot, a GIL switch) wherever it dies.

    It dies with the last reference to its context: in its own thread, in the collector, or in the
    compiled reader dropping the reference it took while it walked the threads.
    """

    finalized = 0
    #: How many died in the middle of a read: the compiled reader dropping the last reference
    #: (it runs no Python frame of its own, so the frame below is the one that called it).
    in_a_read = 0

    def __del__(self) -> None:
        Finalized.finalized += 1
        below = sys._getframe().f_back  # None where a thread's end drops it
        if below is not None and below.f_code.co_name == _current.read_contexts.__name__:
            Finalized.in_a_read += 1
        threadctx.snapshot()
        time.sleep(0)  # lets the GIL go: another thread runs in the middle of whoever dropped us


#: Not in the OpenTelemetry context, which a read returns: held by the thread's contextvars.Context only.
PAYLOAD: contextvars.ContextVar[Finalized] = contextvars.ContextVar("threadctx_soak_payload")


def enter(context: otel_context.Context) -> None:
    PAYLOAD.set(Finalized())
    otel_context.attach(context)


def work_in_contexts(number: int) -> None:
    """Context.run, attach/detach and bind, each context holding a :class:`Finalized`; one left to the end."""
    for round_ in range(3):
        context = otel_context.set_value("payload", Finalized(), span_context(number + 1))
        contextvars.copy_context().run(enter, context)  # that context dies with run's, maybe in a read
        token = otel_context.attach(context)
        with threadctx.bound(request_id=f"c-{number}-{round_}"):
            threadctx.get_thread_storage()["n"] = number
        otel_context.detach(token)
    otel_context.attach(otel_context.set_value("payload", Finalized()))  # dies with the thread


class Churn:
    """Threads start, switch contexts and end while others snapshot, with the collector always running.

    Threads come from ``threading`` and, on Linux, from C (``pthread_create``: CPython links their
    thread states in without the GIL). The collector runs at every allocation (threshold 1) and in
    a thread of its own, and the interpreter switches threads as often as it can.
    """

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.counts = {"threads": 0, "c_threads": 0, "snapshots": 0, "collections": 0}

    def guarded(self, body: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                body()
            except BaseException as exc:
                self.errors.append(exc)
                self.stop.set()

        return run

    def churn(self) -> None:
        number = 0
        while not self.stop.is_set():
            batch = [
                threading.Thread(target=self.guarded(lambda n=number + i: work_in_contexts(n)))
                for i in range(8)
            ]
            for thread in batch:
                thread.start()
            for thread in batch:
                thread.join(JOIN)
            number += len(batch)
            self.counts["threads"] += len(batch)

    def churn_from_c(self, libc: ctypes.CDLL) -> None:
        body = self.guarded(lambda: work_in_contexts(-1))
        callback = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p)(lambda _arg: body())
        while not self.stop.is_set():
            handle = ctypes.c_ulong()
            assert libc.pthread_create(ctypes.byref(handle), None, callback, None) == 0
            libc.pthread_join(handle, None)  # without the GIL, as every ctypes call
            self.counts["c_threads"] += 1

    def read(self) -> None:
        while not self.stop.is_set():
            assert all(isinstance(entry.thread_id, int) for entry in threadctx.snapshot())
            for ident, (native_id, context) in (_current.read_contexts() or {}).items():
                assert isinstance(ident, int)
                assert isinstance(native_id, int)
                assert isinstance(context, otel_context.Context)
            self.counts["snapshots"] += 1

    def collect(self) -> None:
        while not self.stop.is_set():
            gc.collect()
            self.counts["collections"] += 1

    def run(self, seconds: float) -> dict[str, int]:
        """Run for ``seconds``; raise what any thread raised; return what was done."""
        bodies = [self.churn, self.churn, self.read, self.read, self.collect]
        if sys.platform == "linux":
            libc = ctypes.CDLL(None)
            bodies.append(lambda: self.churn_from_c(libc))
        threads = [threading.Thread(target=self.guarded(body)) for body in bodies]
        thresholds, interval = gc.get_threshold(), sys.getswitchinterval()
        gc.set_threshold(1)
        sys.setswitchinterval(1e-6)
        try:
            for thread in threads:
                thread.start()
            self.stop.wait(seconds)
        finally:
            self.stop.set()
            for thread in threads:
                thread.join(JOIN)
            gc.set_threshold(*thresholds)
            sys.setswitchinterval(interval)
        gc.collect()
        if self.errors:
            raise self.errors[0]
        return self.counts


def test_snapshots_while_threads_churn_under_collector_pressure(capsys: pytest.CaptureFixture[str]) -> None:
    """No crash, no corrupted value: the compiled reader where it is built (else the mirror)."""
    seconds = 120 if LONG else 3
    counts = Churn().run(seconds)
    with capsys.disabled():
        reader = "compiled reader" if _current.reader_in_use() else "mirror"
        print(
            f"\n  snapshots under churn ({reader}, {seconds} s): "
            + ", ".join(f"{value} {name}" for name, value in counts.items())
            + f", {Finalized.finalized} finalizers run ({Finalized.in_a_read} in the middle of a read)"
        )
    assert counts["snapshots"] > 0
    assert counts["threads"] > 0
    assert counts["collections"] > 0
    assert Finalized.finalized > 0
