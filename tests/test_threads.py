"""wrap, Thread and ContextThreadPoolExecutor carry the submitter's context and leak nothing."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

import threadctx
from _helpers import JOIN


def state() -> tuple[int | None, dict[str, str]]:
    span_context = trace.get_current_span().get_span_context()
    return (span_context.span_id if span_context.is_valid else None), dict(threadctx.correlation())


def test_wrap_runs_in_the_callers_context_and_restores_the_workers(tracer_provider: TracerProvider) -> None:
    tracer = tracer_provider.get_tracer("t")
    with tracer.start_as_current_span("caller") as span, threadctx.bound(request_id="r-w"):
        wrapped = threadctx.wrap_context(state)
    expected = (span.get_span_context().span_id, {"request_id": "r-w"})
    results: list[object] = []

    def worker() -> None:
        threadctx.bind(worker="own")
        results.append(wrapped())
        results.append(state())

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(JOIN)
    assert results == [expected, (None, {"worker": "own"})]


def test_wrap_restores_after_an_exception_and_undoes_leftover_binds() -> None:
    def task() -> None:
        threadctx.bind(leftover="x")
        raise ValueError("task failed")

    with threadctx.bound(request_id="r-e"):
        wrapped = threadctx.wrap_context(task)
    with pytest.raises(ValueError, match="task failed"):
        wrapped()
    assert threadctx.correlation() == {}


def test_thread_starts_in_its_creators_context() -> None:
    seen: list[dict[str, str]] = []
    with threadctx.bound(request_id="r-t"):
        thread = threadctx.ContextThread(
            target=lambda: seen.append(dict(threadctx.correlation())), name="carried"
        )
    thread.start()
    thread.join(JOIN)
    assert seen == [{"request_id": "r-t"}]


def test_pool_carries_the_submitters_context_and_nothing_leaks_between_tasks() -> None:
    """One worker, so every task runs on the same thread after the one before it."""

    def task(index: int) -> dict[str, str]:
        before = dict(threadctx.correlation())
        threadctx.bind(leaked=str(index))  # never undone by the task
        if index % 2:
            raise RuntimeError(index)
        return before

    with threadctx.ContextThreadPoolExecutor(max_workers=1) as pool:
        futures = []
        for index in range(20):
            with threadctx.bound(request_id=f"r-{index}"):
                futures.append(pool.submit(task, index))
        for index, future in enumerate(futures):
            if index % 2:
                assert isinstance(future.exception(JOIN), RuntimeError)
            else:
                assert future.result(JOIN) == {"request_id": f"r-{index}"}
        with threadctx.bound(request_id="mapped"):
            assert (
                list(pool.map(lambda _: dict(threadctx.correlation()), range(3)))
                == [{"request_id": "mapped"}] * 3
            )
        assert pool.submit(lambda: dict(threadctx.correlation())).result(JOIN) == {}


def test_plain_pool_worker_keeps_what_a_task_left_bound() -> None:
    """The defect ContextThreadPoolExecutor exists for, shown on the standard pool."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(threadctx.bind, request_id="stale").result(JOIN)
        assert pool.submit(lambda: dict(threadctx.correlation())).result(JOIN) == {"request_id": "stale"}


def test_context_pool_workers_start_clean_even_when_created_inside_a_request() -> None:
    """Python 3.14's thread_inherit_context starts a worker in its creator's context: not this pool's.

    The worker is created by the first submit, inside the request; its own
    context (what the initializer sees, what it returns to after each task)
    must still be empty.
    """
    seen_by_initializer: list[dict[str, str]] = []

    def initializer(tag: str) -> None:
        seen_by_initializer.append({**threadctx.correlation(), "tag": tag})

    with (
        threadctx.ContextThreadPoolExecutor(max_workers=1, initializer=initializer, initargs=("t",)) as pool,
        threadctx.bound(request_id="r-first"),
    ):
        assert pool.submit(lambda: dict(threadctx.correlation())).result(JOIN) == {"request_id": "r-first"}
        token = otel_context.attach(otel_context.Context())
        try:
            assert pool.submit(lambda: dict(threadctx.correlation())).result(JOIN) == {}
        finally:
            otel_context.detach(token)
    assert seen_by_initializer == [{"tag": "t"}]
