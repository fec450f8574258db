"""Each probe of threadctx._compat finds what it looks for, and each fallback works with it forced off."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import thread as futures_thread

import pytest
from opentelemetry import context as otel_context
from opentelemetry import propagate
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

import threadctx
from _helpers import JOIN
from threadctx import _compat, _fields, _propagator, _snapshot


def run_in_thread_until_released(release: threading.Event, started: threading.Event) -> threading.Thread:
    def work() -> None:
        with threadctx.bound(request_id="r-compat"):
            started.set()
            release.wait(JOIN)

    thread = threading.Thread(target=work, name="compat-worker")
    thread.start()
    assert started.wait(JOIN)
    return thread


@pytest.fixture
def worker() -> Iterator[threading.Thread]:
    """A thread with a request id bound, parked until the test ends."""
    release, started = threading.Event(), threading.Event()
    thread = run_in_thread_until_released(release, started)
    yield thread
    release.set()
    thread.join(JOIN)


# threading._active


def test_active_threads_reads_threadings_own_table() -> None:
    assert _compat.active_threads()[threading.get_ident()] is threading.current_thread()


def test_without_threadings_table_threads_are_named_by_ident(
    monkeypatch: pytest.MonkeyPatch, worker: threading.Thread
) -> None:
    monkeypatch.setattr(_compat, "_ACTIVE", None)
    assert _compat.active_threads() == {}
    (entry,) = [entry for entry in threadctx.snapshot() if entry.thread_id == worker.ident]
    assert entry.name == f"<thread {worker.ident}>"
    assert dict(entry.correlation) == {"request_id": "r-compat"}
    report = threadctx.dump(frames=1)
    assert f'Thread "<thread {worker.ident}>" ident={worker.ident}' in report
    assert "correlation: request_id=r-compat" in report


# OpenTelemetry's _RUNTIME_CONTEXT


def test_runtime_context_is_opentelemetrys() -> None:
    assert _compat.runtime_context() is otel_context._RUNTIME_CONTEXT


def test_without_the_apis_global_a_foreign_runtime_is_still_told(
    monkeypatch: pytest.MonkeyPatch, any_runtime: str
) -> None:
    monkeypatch.setattr(_snapshot, "runtime_context", lambda: None)
    monkeypatch.setattr(_snapshot, "_warned_foreign_runtime", False)
    token = otel_context.attach(otel_context.set_value("k", "v"))
    try:
        if any_runtime == "threadctx":
            assert _snapshot.foreign_runtime() is None
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                threadctx.snapshot()
        else:
            assert _snapshot.foreign_runtime() == "an unknown one"
            with pytest.warns(RuntimeWarning, match="runtime context is an unknown one, not threadctx's"):
                threadctx.snapshot()
    finally:
        otel_context.detach(token)


# OpenTelemetry's _RuntimeContext


def test_runtime_context_base_is_opentelemetrys() -> None:
    from opentelemetry.context.context import _RuntimeContext

    assert _compat.RuntimeContext is _RuntimeContext
    assert issubclass(threadctx.ThreadRuntimeContext, _RuntimeContext)


def test_without_the_apis_base_class_the_runtime_context_still_works() -> None:
    """An API without ``_RuntimeContext``: threadctx's runtime context stands on its own ABC."""
    code = textwrap.dedent(
        """
        import os
        os.environ.pop("OTEL_PYTHON_CONTEXT", None)
        from opentelemetry import context as otel_context
        import opentelemetry.context.context as api
        del api._RuntimeContext
        import threadctx
        from threadctx import _compat
        assert _compat.RuntimeContext is _compat._RuntimeContextBase
        otel_context._RUNTIME_CONTEXT = threadctx.ThreadRuntimeContext()
        token = otel_context.attach(otel_context.set_value("k", "v"))
        with threadctx.bound(request_id="r-1"):
            assert otel_context.get_value("k") == "v"
            assert [dict(e.correlation) for e in threadctx.snapshot()] == [{"request_id": "r-1"}]
        otel_context.detach(token)
        assert otel_context.get_value("k") is None
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "ok\n"


# OpenTelemetry's _SPAN_KEY


def test_span_key_is_the_apis() -> None:
    from opentelemetry.trace.propagation import _SPAN_KEY

    assert _compat.span_key() == _SPAN_KEY != ""


def test_without_the_span_key_the_filter_reads_the_span_through_the_api(
    monkeypatch: pytest.MonkeyPatch, tracer_provider: TracerProvider
) -> None:
    import opentelemetry.trace.propagation

    with monkeypatch.context() as patched:
        patched.delattr(opentelemetry.trace.propagation, "_SPAN_KEY")
        assert _compat.span_key() == ""
    monkeypatch.setattr(_fields, "_SPAN_KEY", "")
    stamp = threadctx.ContextFilter()
    with tracer_provider.get_tracer("t").start_as_current_span("s") as span, threadctx.bound(request_id="r"):
        fields = stamp.fields()
    ids = span.get_span_context()
    assert fields["trace_id"] == format(ids.trace_id, "032x")
    assert fields["span_id"] == format(ids.span_id, "016x")
    assert fields["request_id"] == "r"


# FlaskInstrumentor's environ keys


def test_flask_keys_are_the_instrumentors(monkeypatch: pytest.MonkeyPatch) -> None:
    flask_instrumentation = pytest.importorskip("opentelemetry.instrumentation.flask")
    found = (flask_instrumentation._ENVIRON_STARTTIME_KEY, flask_instrumentation._ENVIRON_SPAN_KEY)
    assert _compat.flask_otel_keys() == found
    monkeypatch.delattr(flask_instrumentation, "_ENVIRON_STARTTIME_KEY")
    assert _compat.flask_otel_keys() == (_compat.FLASK_OTEL_STARTED, _compat.FLASK_OTEL_SPAN)


# The standard library's helper threads


def test_helper_threads_are_recognised_and_plain_ones_are_not() -> None:
    with ThreadPoolExecutor(1) as pool:
        worker = pool.submit(threading.current_thread).result(JOIN)
        assert _compat.serves_many(worker)
    assert not _compat.serves_many(threading.Thread(target=print))
    assert not _compat.serves_many(threading.Thread())
    manager = pytest.importorskip("concurrent.futures.process")._ExecutorManagerThread
    assert _compat.serves_many(manager.__new__(manager)), "a helper recognised by its class (no target)"


def test_a_helper_whose_target_moved_starts_as_any_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fallback: a moved target is skipped (no error), and its thread is not recognised."""
    import multiprocessing.pool

    monkeypatch.delattr(multiprocessing.pool.Pool, "_handle_tasks")
    helper = threading.Thread(target=futures_thread._worker)
    assert _compat.serves_many(helper)
    monkeypatch.setattr(_compat, "_HELPER_TARGETS", ())
    assert not _compat.serves_many(helper)
    threadctx.instrument_threading()
    try:
        seen: list[dict[str, str]] = []
        with threadctx.bound(request_id="r-creator"):
            thread = threading.Thread(target=lambda: seen.append(dict(threadctx.correlation())))
            thread._target = helper._target  # type: ignore[attr-defined]  # looks like a pool worker
            thread.run = lambda: seen.append(dict(threadctx.correlation()))  # type: ignore[method-assign]
            thread.start()
        thread.join(JOIN)
    finally:
        threadctx.uninstrument_threading()
    assert seen == [{"request_id": "r-creator"}], "not recognised: its creator's context, as any thread"


# wrapt proxies


def test_without_wrapts_proxy_class_instrument_threading_still_carries_the_context(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    wrapt = pytest.importorskip("wrapt")
    proxy = wrapt.ObjectProxy(print)
    assert _compat.is_wrapt_proxy(proxy)
    monkeypatch.delattr(wrapt, "ObjectProxy")
    monkeypatch.delattr(wrapt, "BaseObjectProxy", raising=False)
    assert not _compat.is_wrapt_proxy(proxy)
    original = threading.Thread.start
    threadctx.instrument_threading()
    try:
        seen: list[dict[str, str]] = []
        with threadctx.bound(request_id="r-1"):
            thread = threading.Thread(target=lambda: seen.append(dict(threadctx.correlation())))
            thread.start()
        thread.join(JOIN)
    finally:
        threadctx.uninstrument_threading()
    assert seen == [{"request_id": "r-1"}]
    assert threading.Thread.start is original


# Celery's build_tracer


@pytest.fixture
def celery_app() -> Iterator[object]:
    celery = pytest.importorskip("celery")
    pytest.importorskip("threadctx.celery")
    app = celery.Celery("compat")
    yield app
    import threadctx.celery

    threadctx.celery.uninstrument(app)


def test_without_celerys_build_tracer_instrument_says_so_and_patches_nothing(
    monkeypatch: pytest.MonkeyPatch, celery_app: object
) -> None:
    import celery.app.trace
    from celery.app.task import Task

    import threadctx.celery

    call = Task.__call__
    monkeypatch.delattr(celery.app.trace, "build_tracer")
    with pytest.raises(
        RuntimeError, match=r"celery\.app\.trace\.build_tracer, which runs each task, is missing"
    ):
        threadctx.celery.instrument(celery_app)  # type: ignore[arg-type]
    assert not threadctx.celery.is_instrumented(celery_app)  # type: ignore[arg-type]
    assert Task.__call__ is call


def test_without_the_consumers_copy_tasks_still_run_in_their_context(
    monkeypatch: pytest.MonkeyPatch, celery_app: object
) -> None:
    import celery.worker.consumer.consumer

    import threadctx.celery

    monkeypatch.delattr(celery.worker.consumer.consumer, "build_tracer")
    assert [module.__name__ for module in _compat.celery_tracer_modules()] == ["celery.app.trace"]

    @celery_app.task(name="compat.ids")  # type: ignore[attr-defined, untyped-decorator]
    def ids() -> dict[str, str]:
        return dict(threadctx.correlation())

    threadctx.celery.instrument(celery_app)  # type: ignore[arg-type]
    with threadctx.bound(request_id="r-eager"):
        result = ids.apply(task_id="t-1").get()
    assert result == {"request_id": "r-eager", "task_id": "t-1", "task_name": "compat.ids"}


# ---------------------------------------------------------------------------
# OpenTelemetry's CompositePropagator._propagators


def test_composite_members_are_the_composites_propagators() -> None:
    first, second = TraceContextTextMapPropagator(), W3CBaggagePropagator()
    assert _compat.composite_members(CompositePropagator([first, second])) == [first, second]
    assert _compat.composite_members(first) is None


def test_without_the_composites_list_the_propagator_still_sends_and_says_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_propagator, "composite_members", lambda propagator: None)
    monkeypatch.setattr(_propagator, "_checked", [None])
    misordered = CompositePropagator(
        [threadctx.CorrelationPropagator(request_id_header=None), W3CBaggagePropagator()]
    )
    saved = propagate.get_global_textmap()
    propagate.set_global_textmap(misordered)
    try:
        with threadctx.bound(request_id="r-1"), warnings.catch_warnings():
            warnings.simplefilter("error")
            headers: dict[str, str] = {}
            propagate.inject(headers)
    finally:
        propagate.set_global_textmap(saved)
    assert headers == {"baggage": "request_id=r-1"}, "no baggage in the context: nothing replaced it"
