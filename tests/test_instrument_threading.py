"""instrument_threading: every Thread, Timer and pool task runs in its creator's context, reversibly."""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

import threadctx
from _helpers import JOIN

ORIGINAL_START = threading.Thread.start
ORIGINAL_SUBMIT = ThreadPoolExecutor.submit

State = tuple[int | None, dict[str, str]]
NOTHING: State = (None, {})

#: Python 3.14's thread_inherit_context: a new thread starts in a copy of the
#: context of the code that called start(), with or without threadctx.
INHERITS = bool(getattr(sys.flags, "thread_inherit_context", 0))


def state() -> State:
    span_context = trace.get_current_span().get_span_context()
    return (span_context.span_id if span_context.is_valid else None), dict(threadctx.correlation())


@pytest.fixture(autouse=True)
def _uninstrumented() -> Iterator[None]:
    # OpenTelemetry's unwrap leaves a stale wrapper as Timer's own start (Timer inherits start):
    # each test starts without it, as in a fresh process, whatever ran before.
    if "start" in vars(threading.Timer):
        del threading.Timer.start
    yield
    if "opentelemetry.instrumentation.threading" in sys.modules:
        from opentelemetry.instrumentation.threading import ThreadingInstrumentor

        if ThreadingInstrumentor().is_instrumented_by_opentelemetry:
            ThreadingInstrumentor().uninstrument()
    threadctx.uninstrument_threading()
    assert threading.Thread.start is ORIGINAL_START
    assert ThreadPoolExecutor.submit is ORIGINAL_SUBMIT


@pytest.fixture
def caller(tracer_provider: TracerProvider) -> Iterator[State]:
    """A span and a request id current in the test's thread."""
    with (
        tracer_provider.get_tracer("t").start_as_current_span("caller") as span,
        threadctx.bound(request_id="r-1"),
    ):
        yield span.get_span_context().span_id, {"request_id": "r-1"}


class OwnRun(threading.Thread):
    """A subclass that overrides run, as many do."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: State | None = None

    def run(self) -> None:
        self.seen = state()


def in_thread(kind: str) -> State:
    results: list[State] = []
    thread: threading.Thread
    if kind == "thread":
        thread = threading.Thread(target=lambda: results.append(state()))
    elif kind == "timer":
        thread = threading.Timer(0, lambda: results.append(state()))
    else:
        thread = OwnRun()
    thread.start()
    thread.join(JOIN)
    return results[0] if results else thread.seen  # type: ignore[attr-defined,return-value]


def in_pool(kind: str) -> State:
    """Run ``state`` on a pool whose worker was started outside the caller's context."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        token = otel_context.attach(otel_context.Context())
        try:
            pool.submit(state).result(JOIN)  # the worker starts here, in an empty context
        finally:
            otel_context.detach(token)
        if kind == "submit":
            return pool.submit(state).result(JOIN)
        if kind == "map":
            return next(pool.map(lambda _: state(), [0]))

        async def main() -> State:
            return await asyncio.get_running_loop().run_in_executor(pool, state)

        return asyncio.run(main())


def uncarried(runner: str, caller: State) -> State:
    """What ``runner`` sees without any instrumentation: a new thread inherits only under the 3.14 flag."""
    return caller if INHERITS and runner in THREAD_RUNNERS else NOTHING


THREAD_RUNNERS = {"Thread", "Timer", "Thread subclass with its own run"}
RUNNERS: dict[str, Callable[[], State]] = {
    "Thread": lambda: in_thread("thread"),
    "Timer": lambda: in_thread("timer"),
    "Thread subclass with its own run": lambda: in_thread("subclass"),
    "ThreadPoolExecutor.submit": lambda: in_pool("submit"),
    "ThreadPoolExecutor.map": lambda: in_pool("map"),
    "loop.run_in_executor": lambda: in_pool("run_in_executor"),
}


@pytest.mark.parametrize("runner", RUNNERS)
def test_instrumented_threads_and_tasks_run_in_the_creators_context(caller: State, runner: str) -> None:
    assert RUNNERS[runner]() == uncarried(runner, caller), "without instrumentation it does not cross"
    threadctx.instrument_threading()
    assert RUNNERS[runner]() == caller
    threadctx.uninstrument_threading()
    assert RUNNERS[runner]() == uncarried(runner, caller)


def test_run_in_executor_on_the_default_executor_carries_the_context(caller: State) -> None:
    threadctx.instrument_threading()

    async def main() -> State:
        return await asyncio.get_running_loop().run_in_executor(None, state)

    assert asyncio.run(main()) == caller


def test_instrument_and_uninstrument_are_idempotent() -> None:
    threadctx.instrument_threading()
    patched = threading.Thread.start
    threadctx.instrument_threading()
    assert threading.Thread.start is patched, "a second call does not wrap twice"
    threadctx.uninstrument_threading()
    threadctx.uninstrument_threading()
    assert threading.Thread.start is ORIGINAL_START
    assert ThreadPoolExecutor.submit is ORIGINAL_SUBMIT


def test_pool_workers_start_clean_and_are_clean_between_tasks(caller: State) -> None:
    """The worker thread does not keep the context of the submitter that created it."""
    threadctx.instrument_threading()
    seen_by_initializer: list[State] = []
    with ThreadPoolExecutor(max_workers=1, initializer=lambda: seen_by_initializer.append(state())) as pool:
        assert pool.submit(state).result(JOIN) == caller

        def fail() -> None:
            threadctx.bind(leftover="x")
            raise RuntimeError("task failed")

        with pytest.raises(RuntimeError):
            pool.submit(fail).result(JOIN)
        token = otel_context.attach(otel_context.Context())
        try:
            assert pool.submit(state).result(JOIN) == (None, {}), "nothing left from earlier tasks"
        finally:
            otel_context.detach(token)
    assert seen_by_initializer == [(None, {})]


def test_a_thread_started_twice_raises_as_usual() -> None:
    threadctx.instrument_threading()
    thread = threading.Thread(target=lambda: None)
    thread.start()
    thread.join(JOIN)
    with pytest.raises(RuntimeError, match="once"):
        thread.start()
    assert "run" not in vars(thread), "the wrapper does not stay on the thread"


def both_instrumented(order: str) -> Any:
    """Switch on threadctx's and OpenTelemetry's instrumentation in ``order``; return OpenTelemetry's."""
    threading_instrumentation = pytest.importorskip(
        "opentelemetry.instrumentation.threading",
        reason="opentelemetry-instrumentation-threading is not installed",
    )
    instrumentor = threading_instrumentation.ThreadingInstrumentor()
    steps = [threadctx.instrument_threading, instrumentor.instrument]
    for step in steps if order == "threadctx first" else steps[::-1]:
        step()
    return instrumentor


@pytest.mark.parametrize("order", ["threadctx first", "OpenTelemetry first"])
def test_beside_opentelemetrys_threading_instrumentor(caller: State, order: str) -> None:
    """Both on: the same context arrives; both off, in either order: everything is restored."""
    instrumentor = both_instrumented(order)
    for runner in RUNNERS.values():
        assert runner() == caller
    threadctx.uninstrument_threading()
    for name, runner in RUNNERS.items():
        if name == "Thread subclass with its own run":
            # OpenTelemetry wraps Thread.run on the class: an override escapes it.
            assert runner() == uncarried(name, caller)
        else:
            assert runner() == caller, "OpenTelemetry's instrumentor still carries the context"
    instrumentor.uninstrument()
    assert in_thread("thread") == uncarried("Thread", caller)
    assert in_pool("submit") == NOTHING
    threadctx.instrument_threading()
    assert in_thread("subclass") == caller
    assert in_pool("submit") == caller


def test_a_run_set_on_the_instance_is_carried_and_put_back(caller: State) -> None:
    """Issue 11, item 9: ``t.run = fn`` was taken for "already wrapped" and got no context."""
    threadctx.instrument_threading()
    seen: list[State] = []

    def own_run() -> None:
        seen.append(state())

    thread = threading.Thread()
    thread.run = own_run  # type: ignore[method-assign]
    thread.start()
    thread.join(JOIN)
    assert seen == [caller]
    assert vars(thread)["run"] is own_run, "the instance's own run is left as it was"


def _helper_thread_states() -> dict[str, State]:
    """What the standard library's long-lived helper threads see, by kind (each queried from a task)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing.pool import ThreadPool

    seen: dict[str, State] = {}
    with ThreadPool(1) as pool:
        seen["ThreadPool worker, first request"] = pool.apply(state)
        token = otel_context.attach(otel_context.Context())
        try:
            seen["ThreadPool worker, second request"] = pool.apply(state)
        finally:
            otel_context.detach(token)
    queue: multiprocessing.Queue[int] = multiprocessing.get_context("spawn").Queue()
    queue.put(1)  # starts the feeder thread
    assert queue.get(timeout=JOIN) == 1
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        assert pool.submit(int, "7").result(JOIN) == 7  # starts the manager thread
        for entry in threadctx.snapshot():
            if entry.name.startswith(("QueueFeederThread", "Thread-")) and entry.trace_id is not None:
                seen[f"helper thread {entry.name}"] = (int(entry.span_id or "0", 16), dict(entry.correlation))
    queue.close()
    queue.join_thread()
    return seen


def test_helper_threads_that_serve_many_callers_start_clean(caller: State) -> None:
    """Issue 11, item 7: a ThreadPool worker, a queue's feeder, a process pool's manager thread.

    Created inside one request, they kept that request for good: the next
    request's task on the pool ran with the first request's IDs.
    """
    threadctx.instrument_threading()
    seen = _helper_thread_states()
    assert seen == {
        "ThreadPool worker, first request": (None, {}),
        "ThreadPool worker, second request": (None, {}),
    }, "no helper thread shows the request that created it"


@pytest.mark.parametrize("order", ["threadctx first", "OpenTelemetry first"])
def test_helper_threads_start_clean_beside_opentelemetrys_instrumentor(caller: State, order: str) -> None:
    """Both instrumentors on, in either order: the helper threads still start clean.

    OpenTelemetry's wrapper of ``Thread.run`` attached the context it noted at ``start()``
    inside threadctx's clean one: a pool worker created by the first request kept its IDs for
    good, and the next request's ThreadPool task ran with them (issue 11, item 7).
    """
    both_instrumented(order)
    seen_by_initializer: list[State] = []
    with ThreadPoolExecutor(max_workers=1, initializer=lambda: seen_by_initializer.append(state())) as pool:
        assert pool.submit(state).result(JOIN) == caller
    assert seen_by_initializer == [(None, {})], "the worker itself starts clean"
    assert in_thread("thread") == caller, "a plain thread still runs in its creator's context"
    assert _helper_thread_states() == {
        "ThreadPool worker, first request": (None, {}),
        "ThreadPool worker, second request": (None, {}),
    }


def test_a_logging_queue_listener_started_in_a_request_starts_clean(caller: State) -> None:
    """A QueueListener's thread handles every thread's records: it must not keep its starter's request.

    It did: its handlers (and what they call: an exporter, an HTTP client's spans) ran in the first
    request's context for good, and a filter there stamped that request on every later record.
    """
    import logging.handlers
    import queue

    threadctx.instrument_threading()
    seen: list[State] = []

    class Recording(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(state())

    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    listener = logging.handlers.QueueListener(records, Recording())
    listener.start()  # inside the request of the caller fixture
    try:
        records.put(logging.makeLogRecord({"msg": "from another request"}))
    finally:
        listener.stop()
    assert seen == [(None, {})]


CALLS = ["threadctx on", "threadctx off", "OpenTelemetry on", "OpenTelemetry off"]


def _patched_layers(value: object) -> list[object]:
    """The chain of wrapt proxies and whatever they wrap, from the class attribute down."""
    layers = [value]
    while hasattr(value, "__wrapped__") and type(value).__module__.startswith(("wrapt", "_wrappers")):
        value = value.__wrapped__  # type: ignore[attr-defined]
        layers.append(value)
    return layers


@pytest.mark.parametrize("order", list(__import__("itertools").permutations(CALLS)), ids=" / ".join)
def test_any_order_beside_opentelemetrys_instrumentor_ends_with_nothing_patched(
    caller: State, order: tuple[str, ...]
) -> None:
    """Issue 11, item 8: every order of the four calls; then whatever is still on is switched off."""
    threading_instrumentation = pytest.importorskip(
        "opentelemetry.instrumentation.threading",
        reason="opentelemetry-instrumentation-threading is not installed",
    )
    instrumentor = threading_instrumentation.ThreadingInstrumentor()
    calls = {
        "threadctx on": threadctx.instrument_threading,
        "threadctx off": threadctx.uninstrument_threading,
        "OpenTelemetry on": instrumentor.instrument,
        "OpenTelemetry off": instrumentor.uninstrument,
    }
    for name in order:
        calls[name]()
    on = {
        tool
        for tool in ("threadctx", "OpenTelemetry")
        if order.index(f"{tool} on") > order.index(f"{tool} off")
    }
    if on:
        assert in_pool("submit") == caller, f"{on} still on: the context is carried"
    else:
        assert in_pool("submit") == NOTHING, "both off: nothing carries the context"
        assert in_thread("thread") == uncarried("Thread", caller)
    if "threadctx" in on:
        threadctx.uninstrument_threading()
    if "OpenTelemetry" in on:
        instrumentor.uninstrument()
    from threadctx import _threads

    ours = set(map(id, _threads._PATCHES.values()))
    for owner, name in _threads._PATCHES:
        layers = _patched_layers(owner.__dict__.get(name))
        assert not ours & set(map(id, layers)), f"{owner.__name__}.{name} still has threadctx's patch"
        if owner is not threading.Timer:
            # OpenTelemetry's own unwrap leaves a stale bound wrapper on Timer.start
            # (Timer inherits start), with or without threadctx.
            assert len(layers) == 1, f"{owner.__name__}.{name} is still wrapped: {layers}"
    assert threading.Thread.start is ORIGINAL_START
    assert ThreadPoolExecutor.submit is ORIGINAL_SUBMIT
    assert in_pool("submit") == NOTHING
    assert in_thread("thread") == uncarried("Thread", caller)
    assert in_thread("timer") == uncarried("Timer", caller)
