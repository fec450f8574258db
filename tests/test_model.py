"""Model-based test: random programs run on threadctx and on the contextvars reference agree.

A program is a list of operations on a few long-lived threads: attach a span, detach a token (in
order, out of order, twice, or one from another thread), bind, unbind, enter and leave ``bound``
scopes, start a carried thread, run a pool task, run asyncio tasks, and replace a thread by a new
one. After every operation the thread observes its current span and correlation IDs. The same
program runs on threadctx's runtime context and on OpenTelemetry's ``ContextVarsRuntimeContext``
(the reference): every observation, and every error, must be the same. On threadctx,
``snapshot()`` must also report each thread's observation, seen from the driver's thread. Other
threads churn through attach and detach meanwhile, with the switch interval set very low to force
interleavings.
"""

from __future__ import annotations

import asyncio
import os
import queue
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context.contextvars_context import ContextVarsRuntimeContext
from opentelemetry.trace import NonRecordingSpan, SpanContext

import threadctx
from _helpers import JOIN

THREADS = 3
EXAMPLES = int(os.environ.get("THREADCTX_MODEL_EXAMPLES", "60"))

Observation = tuple[int | None, tuple[tuple[str, str], ...]]

op = st.one_of(
    st.tuples(st.just("attach"), st.integers(0, THREADS - 1), st.integers(1, 50)),
    st.tuples(st.just("detach"), st.integers(0, THREADS - 1), st.integers(0, 20)),
    st.tuples(st.just("detach_foreign"), st.integers(0, THREADS - 1), st.integers(0, 20)),
    st.tuples(
        st.just("bind"), st.integers(0, THREADS - 1), st.sampled_from(["request_id", "tenant", "user"])
    ),
    st.tuples(
        st.just("unbind"), st.integers(0, THREADS - 1), st.sampled_from(["request_id", "tenant", "user"])
    ),
    st.tuples(st.just("enter"), st.integers(0, THREADS - 1), st.integers(0, 9)),
    st.tuples(st.just("leave"), st.integers(0, THREADS - 1), st.just(0)),
    st.tuples(st.just("thread"), st.integers(0, THREADS - 1), st.just(0)),
    st.tuples(st.just("pool"), st.integers(0, THREADS - 1), st.just(0)),
    st.tuples(st.just("asyncio"), st.integers(0, THREADS - 1), st.integers(0, 9)),
    st.tuples(st.just("restart"), st.integers(0, THREADS - 1), st.just(0)),
)
programs = st.lists(op, min_size=1, max_size=40)


def observe() -> Observation:
    span_context = trace.get_current_span().get_span_context()
    span_id = span_context.span_id if span_context.is_valid else None
    return span_id, tuple(sorted(threadctx.correlation().items()))


def span_context(number: int) -> otel_context.Context:
    span = NonRecordingSpan(SpanContext(trace_id=number, span_id=number, is_remote=False))
    return trace.set_span_in_context(span)


class Driven:
    """A thread that runs the operations it is sent, one at a time, and reports what it saw."""

    def __init__(self, pool: threadctx.ContextThreadPoolExecutor) -> None:
        self.inbox: queue.SimpleQueue[Callable[[], object] | None] = queue.SimpleQueue()
        self.outbox: queue.SimpleQueue[object] = queue.SimpleQueue()
        self.tokens: list[Any] = []
        self.scopes: list[AbstractContextManager[object]] = []
        self.pool = pool
        self.thread = threading.Thread(target=self.loop)
        self.thread.start()

    def loop(self) -> None:
        while (work := self.inbox.get()) is not None:
            try:
                self.outbox.put(("ok", work()))
            except Exception as error:  # the error itself is the observation
                self.outbox.put(("error", type(error).__name__))

    def run(self, work: Callable[[], object]) -> object:
        self.inbox.put(work)
        return self.outbox.get(timeout=JOIN)

    def stop(self) -> None:
        self.inbox.put(None)
        self.thread.join(JOIN)


def step(driven: Driven, others: list[Driven], name: str, arg: int | str) -> Callable[[], object]:
    """The operation, as work for the driven thread; it returns what the thread observed."""
    runtime = otel_context._RUNTIME_CONTEXT

    def attach() -> object:
        driven.tokens.append(runtime.attach(span_context(int(arg))))
        return observe()

    def detach() -> object:
        if not driven.tokens:
            return observe()
        runtime.detach(driven.tokens[int(arg) % len(driven.tokens)])  # may be used already
        return observe()

    def detach_foreign() -> object:
        tokens = [token for other in others for token in other.tokens]
        if not tokens:
            return observe()
        runtime.detach(tokens[int(arg) % len(tokens)])  # another thread's: ValueError
        return observe()

    def bind() -> object:
        driven.tokens.append(threadctx.bind(**{str(arg): f"{arg}-{len(driven.tokens)}"}))
        return observe()

    def unbind() -> object:
        driven.tokens.append(threadctx.unbind(str(arg)))
        return observe()

    def enter() -> object:
        scope = threadctx.bound(request_id=f"scope-{arg}")
        scope.__enter__()
        driven.scopes.append(scope)
        return observe()

    def leave() -> object:
        if driven.scopes:
            driven.scopes.pop().__exit__(None, None, None)
        return observe()

    def carried_thread() -> object:
        seen: list[Observation] = []
        thread = threadctx.ContextThread(target=lambda: seen.append(observe()))
        thread.start()
        thread.join(JOIN)
        return seen, observe()

    def pool_task() -> object:
        return driven.pool.submit(observe).result(JOIN), observe()

    def tasks() -> object:
        async def task(index: int) -> list[Observation]:
            seen = [observe()]
            with threadctx.bound(request_id=f"task-{index}"):
                token = otel_context.attach(span_context(100 + index))
                await asyncio.sleep(0)  # let the other task run in between
                seen.append(observe())
                otel_context.detach(token)
            seen.append(observe())
            return seen

        async def main() -> object:
            return await asyncio.gather(task(int(arg)), task(int(arg) + 1))

        return asyncio.run(main()), observe()

    return {
        "attach": attach,
        "detach": detach,
        "detach_foreign": detach_foreign,
        "bind": bind,
        "unbind": unbind,
        "enter": enter,
        "leave": leave,
        "thread": carried_thread,
        "pool": pool_task,
        "asyncio": tasks,
    }[name]


def run_program(program: list[tuple[str, int, int | str]], check_snapshot: bool) -> list[object]:
    results: list[object] = []
    with threadctx.ContextThreadPoolExecutor(max_workers=2) as pool:
        threads = [Driven(pool) for _ in range(THREADS)]
        try:
            for name, index, arg in program:
                if name == "restart":  # the thread ends; a new one takes its place
                    threads[index].stop()
                    threads[index] = Driven(pool)
                    results.append(threads[index].run(observe))
                    continue
                others = [thread for position, thread in enumerate(threads) if position != index]
                result = threads[index].run(step(threads[index], others, name, arg))
                results.append(result)
                if name in ("thread", "pool") and result[0] == "ok":  # type: ignore[index]
                    carried, own = result[1]  # type: ignore[index]
                    assert carried in (own, [own]), f"the {name} did not run in its creator's context"
                if check_snapshot:
                    seen = threads[index].run(observe)[1]
                    entries = {entry.thread_id: entry for entry in threadctx.snapshot()}
                    entry = entries.get(threads[index].thread.ident)  # type: ignore[arg-type]
                    reported = (
                        (
                            int(entry.span_id, 16) if entry.span_id else None,
                            tuple(sorted(entry.correlation.items())),
                        )
                        if entry is not None
                        else (None, ())
                    )
                    assert reported == seen, f"snapshot() disagrees with the thread after {name}"
        finally:
            for thread in threads:
                thread.stop()
    return results


@contextmanager
def churn() -> Iterator[None]:
    """Threads that attach and detach without pause, and a very low switch interval."""
    stop = threading.Event()

    def spin(number: int) -> None:
        while not stop.is_set():
            token = otel_context.attach(span_context(1000 + number))
            threadctx.bind(request_id=f"churn-{number}")
            otel_context.detach(token)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    spinners = [threading.Thread(target=spin, args=(number,), daemon=True) for number in range(2)]
    for spinner in spinners:
        spinner.start()
    try:
        yield
    finally:
        stop.set()
        for spinner in spinners:
            spinner.join(JOIN)
        sys.setswitchinterval(interval)


# The autouse fixtures restore logging and context once per test, not per example: each example
# stops its own threads and leaves the driver's context alone, so nothing carries over.
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(program=programs)
def test_threadctx_agrees_with_the_contextvars_reference(program: list[tuple[str, int, Any]]) -> None:
    with churn():
        on_threadctx = run_program(program, check_snapshot=True)
    saved = otel_context._RUNTIME_CONTEXT
    otel_context._RUNTIME_CONTEXT = ContextVarsRuntimeContext()
    try:
        with churn():
            reference = run_program(program, check_snapshot=False)
    finally:
        otel_context._RUNTIME_CONTEXT = saved
    assert on_threadctx == reference
