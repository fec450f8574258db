"""instrument_threading: every Thread, Timer and pool task runs in its creator's context, reversibly."""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

import threadctx

JOIN = 30
ORIGINAL_START = threading.Thread.start
ORIGINAL_SUBMIT = ThreadPoolExecutor.submit

State = tuple[int | None, dict[str, str]]


def state() -> State:
    span_context = trace.get_current_span().get_span_context()
    return (span_context.span_id if span_context.is_valid else None), dict(threadctx.correlation())


@pytest.fixture(autouse=True)
def _uninstrumented() -> Iterator[None]:
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
    with ThreadPoolExecutor(max_workers=2) as pool:
        if kind == "submit":
            return pool.submit(state).result(JOIN)
        if kind == "map":
            return next(pool.map(lambda _: state(), [0]))

        async def main() -> State:
            return await asyncio.get_running_loop().run_in_executor(pool, state)

        return asyncio.run(main())


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
    assert RUNNERS[runner]() == (None, {}), "without instrumentation the context does not cross"
    threadctx.instrument_threading()
    assert RUNNERS[runner]() == caller
    threadctx.uninstrument_threading()
    assert RUNNERS[runner]() == (None, {})


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


@pytest.mark.parametrize("order", ["threadctx first", "OpenTelemetry first"])
def test_beside_opentelemetrys_threading_instrumentor(caller: State, order: str) -> None:
    """Both on: the same context arrives; both off, in either order: everything is restored."""
    threading_instrumentation = pytest.importorskip(
        "opentelemetry.instrumentation.threading",
        reason="opentelemetry-instrumentation-threading is not installed",
    )
    instrumentor = threading_instrumentation.ThreadingInstrumentor()
    steps = [threadctx.instrument_threading, instrumentor.instrument]
    for step in steps if order == "threadctx first" else steps[::-1]:
        step()
    for runner in RUNNERS.values():
        assert runner() == caller
    threadctx.uninstrument_threading()
    for name, runner in RUNNERS.items():
        if name == "Thread subclass with its own run":
            # OpenTelemetry wraps Thread.run on the class: an override escapes it.
            assert runner() == (None, {})
        else:
            assert runner() == caller, "OpenTelemetry's instrumentor still carries the context"
    instrumentor.uninstrument()
    assert in_thread("thread") == (None, {})
    assert in_pool("submit") == (None, {})
    threadctx.instrument_threading()
    assert in_thread("subclass") == caller
    assert in_pool("submit") == caller
