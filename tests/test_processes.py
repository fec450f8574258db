"""ContextProcessPoolExecutor and wrap_process: children run in the parent's context, any start method."""

from __future__ import annotations

import copy
import io
import logging
import multiprocessing
import pickle
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor

import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

import threadctx

JOIN = 60
# Under "fork" the suite's own threads may be running (see the fork marker in conftest.py).
START_METHODS = [pytest.param("fork", marks=pytest.mark.fork), "spawn", "forkserver"]


@pytest.fixture(params=START_METHODS)
def mp_context(request: pytest.FixtureRequest) -> multiprocessing.context.BaseContext:
    method = request.param
    if method not in multiprocessing.get_all_start_methods():
        pytest.skip(f"the {method!r} start method is not available on this platform")
    return multiprocessing.get_context(method)


def child_view(tag: str) -> dict[str, object]:
    """What a child process sees: its ids, and a log line formatted through ContextFilter."""
    span_context = trace.get_current_span().get_span_context()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(threadctx.ContextFilter(preset="otel-python"))
    handler.setFormatter(logging.Formatter("trace=%(otelTraceID)s span=%(otelSpanID)s %(message)s"))
    log = logging.getLogger(f"child.{tag}")
    log.addHandler(handler)
    log.propagate = False
    log.warning("in child %s", tag)
    log.removeHandler(handler)
    return {
        "trace_id": span_context.trace_id if span_context.is_valid else None,
        "span_id": span_context.span_id if span_context.is_valid else None,
        "remote": span_context.is_remote,
        "ids": dict(threadctx.correlation()),
        "line": stream.getvalue().strip(),
    }


def report_to(queue: multiprocessing.Queue[dict[str, object]], tag: str) -> None:
    queue.put(child_view(tag))


@pytest.fixture
def parent(tracer_provider: TracerProvider) -> Iterator[dict[str, object]]:
    """A span and correlation IDs, some of which are not on the propagation allowlist."""
    with (
        tracer_provider.get_tracer("t").start_as_current_span("parent") as span,
        threadctx.bound(request_id="r-p", tenant="acme", note="a b,c=d%"),
    ):
        span_context = span.get_span_context()
        yield {
            "trace_id": span_context.trace_id,
            "span_id": span_context.span_id,
            "remote": True,
            "ids": {"request_id": "r-p", "tenant": "acme", "note": "a b,c=d%"},
            "line": f"trace={span_context.trace_id:032x} span={span_context.span_id:016x} in child t",
        }


def test_pool_tasks_run_in_the_submitters_context_and_leak_nothing(
    mp_context: multiprocessing.context.BaseContext, parent: dict[str, object]
) -> None:
    with threadctx.ContextProcessPoolExecutor(max_workers=1, mp_context=mp_context) as pool:
        assert pool.submit(child_view, "t").result(JOIN) == parent
        assert list(pool.map(child_view, ["t", "t"])) == [parent, parent]
        token = otel_context.attach(otel_context.Context())
        try:
            clean = pool.submit(child_view, "u").result(JOIN)
        finally:
            otel_context.detach(token)
    assert clean["trace_id"] is None, "the same worker process keeps nothing from the earlier task"
    assert clean["ids"] == {}
    assert clean["line"] == "trace=0 span=0 in child u", "the otel-python preset writes 0 outside a span"


def test_wrap_process_carries_the_context_into_a_multiprocessing_process(
    mp_context: multiprocessing.context.BaseContext, parent: dict[str, object]
) -> None:
    queue = mp_context.Queue()
    process = mp_context.Process(target=threadctx.wrap_process(report_to), args=(queue, "t"))  # type: ignore[attr-defined]
    process.start()
    try:
        assert queue.get(timeout=JOIN) == parent
    finally:
        process.join(JOIN)
    assert process.exitcode == 0


def test_wrap_process_with_a_multiprocessing_pool(
    mp_context: multiprocessing.context.BaseContext, parent: dict[str, object]
) -> None:
    with mp_context.Pool(2) as pool:  # type: ignore[attr-defined]
        assert pool.map(threadctx.wrap_process(child_view), ["t"] * 4) == [parent] * 4


def test_a_child_span_is_a_child_of_the_parents_span(parent: dict[str, object]) -> None:
    """Context crosses as headers: in the child the parent's span is a remote parent."""
    wrapped = threadctx.wrap_process(child_view)
    assert set(wrapped.headers) == {"traceparent", "threadctx-correlation"}  # type: ignore[attr-defined]
    assert repr(wrapped).startswith("threadctx.wrap_process(<function child_view")
    view = wrapped("t")  # in this process too: attach, run, restore
    assert view == parent
    assert threadctx.correlation() == parent["ids"]


def test_pickling_what_wrap_returns_says_to_use_wrap_process() -> None:
    """Issue 21.4: it failed with "not the same object as builtins.len" (Dask: "cannot pickle lock")."""
    with threadctx.bound(request_id="r-1"):
        for fn in (len, child_view, threadctx.ContextFilter().filter):
            wrapped = threadctx.wrap_context(fn)
            for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
                with pytest.raises(
                    TypeError, match=r"holds a live context .* use threadctx\.wrap_process\(fn\)"
                ):
                    pickle.dumps(wrapped, protocol)


def test_what_wrap_context_returns_still_behaves_as_the_function() -> None:
    """Name, call, binding and copies: as the function wrap_context() returned before it refused pickling."""

    class Service:
        handle = threadctx.wrap_context(lambda self, job: (self, job, dict(threadctx.correlation())))

    with threadctx.bound(request_id="r-3"):
        wrapped = threadctx.wrap_context(child_view)
        counted = threadctx.wrap_context(len)
    service = Service()
    assert (wrapped.__name__, wrapped.__doc__, wrapped.__wrapped__) == (
        "child_view",
        child_view.__doc__,
        child_view,
    )
    assert counted([1, 2]) == 2
    assert wrapped("same")["ids"] == {"request_id": "r-3"}
    assert threadctx.correlation() == {}, "the caller's context is back"
    assert service.handle("job") == (service, "job", {})
    assert copy.copy(wrapped) is wrapped
    assert copy.deepcopy([wrapped])[0] is wrapped


def test_a_process_pool_refuses_what_wrap_returns_with_the_same_error() -> None:
    with (
        ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool,
        threadctx.bound(request_id="r-2"),
    ):
        future = pool.submit(threadctx.wrap_context(child_view), "wrapped")
        with pytest.raises(TypeError, match=r"live context .* threadctx\.wrap_process\(fn\)"):
            future.result(JOIN)
        assert pool.submit(threadctx.wrap_process(child_view), "carried").result(JOIN)["ids"] == {
            "request_id": "r-2"
        }


def test_cloudpickle_reaches_the_same_error_for_every_kind_of_callable() -> None:
    """Dask serializes with cloudpickle, by value: coroutine functions and generators give the error too."""
    cloudpickle = pytest.importorskip("cloudpickle", reason="cloudpickle comes with Dask")

    async def coroutine() -> None:
        pass

    def generator() -> Iterator[int]:
        yield 1

    with threadctx.bound(request_id="r-4"):
        for fn in (coroutine, generator, child_view, lambda: None):
            with pytest.raises(TypeError, match=r"holds a live context .* use threadctx\.wrap_process\(fn\)"):
                cloudpickle.dumps(threadctx.wrap_context(fn))
