"""ThreadRuntimeContext: selection, token semantics, threads and asyncio."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import threading
from contextvars import Token

import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context.context import Context
from opentelemetry.sdk.trace import TracerProvider

import threadctx
from _helpers import JOIN


def value() -> object:
    return otel_context.get_value("k")


def test_selected_by_environment_variable_even_when_trace_is_imported_first() -> None:
    """The entry point loads while opentelemetry.context is still initialising."""
    code = (
        "from opentelemetry import trace\n"
        "from opentelemetry import context\n"
        "import threadctx\n"
        "print(type(context._RUNTIME_CONTEXT).__name__)\n"
    )
    env = {**os.environ, "OTEL_PYTHON_CONTEXT": "threadctx"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, timeout=JOIN
    )
    assert out.stdout.strip() == "ThreadRuntimeContext"
    assert "Failed to load context" not in out.stderr


def test_attach_detach_restores() -> None:
    first = otel_context.attach(otel_context.set_value("k", 1))
    second = otel_context.attach(otel_context.set_value("k", 2))
    assert value() == 2
    otel_context.detach(second)
    assert value() == 1
    otel_context.detach(first)
    assert value() is None


def test_detach_out_of_order_restores_what_each_token_saved() -> None:
    t1 = otel_context.attach(otel_context.set_value("k", 1))
    t2 = otel_context.attach(otel_context.set_value("k", 2))
    otel_context.detach(t1)
    assert value() is None
    otel_context.detach(t2)
    assert value() == 1


def test_token_used_twice_raises_and_changes_nothing(caplog: pytest.LogCaptureFixture) -> None:
    runtime = threadctx.ThreadRuntimeContext()
    token = runtime.attach(otel_context.set_value("k", 1))
    runtime.detach(token)
    marker = otel_context.attach(otel_context.set_value("k", "after"))
    with pytest.raises(RuntimeError):
        runtime.detach(token)
    assert value() == "after"
    # Through the API, the error is logged rather than raised.
    with caplog.at_level(logging.ERROR, logger="opentelemetry.context"):
        otel_context.detach(token)
    assert "Failed to detach context" in caplog.text
    assert value() == "after"
    otel_context.detach(marker)


def test_token_from_another_thread_raises_and_changes_nothing() -> None:
    token = otel_context.attach(otel_context.set_value("k", "main"))
    errors: list[BaseException] = []
    seen: list[object] = []

    def other() -> None:
        otel_context.attach(otel_context.set_value("k", "other"))
        try:
            threadctx.ThreadRuntimeContext().detach(token)
        except ValueError as exc:
            errors.append(exc)
        seen.append(value())
        seen.append(threadctx.snapshot()[0].thread_id == threading.get_ident())

    thread = threading.Thread(target=other)
    thread.start()
    thread.join(JOIN)
    assert len(errors) == 1
    assert seen[0] == "other"
    assert value() == "main"
    otel_context.detach(token)  # still usable in its own thread
    assert value() is None


def test_instances_share_one_current_context() -> None:
    a, b = threadctx.ThreadRuntimeContext(), threadctx.ThreadRuntimeContext()
    token = a.attach(Context({"k": "v"}))
    assert b.get_current() == {"k": "v"}
    b.detach(token)
    assert a.get_current() == {}


def test_threads_have_separate_contexts(tracer_provider: TracerProvider) -> None:
    tracer = tracer_provider.get_tracer("test")
    count = 16
    barrier = threading.Barrier(count)
    mismatches: list[int] = []

    def work(index: int) -> None:
        assert not trace.get_current_span().get_span_context().is_valid
        with tracer.start_as_current_span(f"s{index}") as span, threadctx.bound(request_id=str(index)):
            barrier.wait(JOIN)  # all threads are inside their spans at once
            current = trace.get_current_span()
            if current is not span or threadctx.correlation()["request_id"] != str(index):
                mismatches.append(index)
            barrier.wait(JOIN)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(JOIN)
    assert mismatches == []


def test_asyncio_tasks_are_isolated_and_inherit_from_their_creator() -> None:
    async def task(name: str, attached: asyncio.Event, other_attached: asyncio.Event) -> tuple[object, ...]:
        inherited = value()
        otel_context.attach(otel_context.set_value("k", name))
        attached.set()
        await other_attached.wait()  # both tasks have attached before either reads
        return inherited, value()

    async def main() -> tuple[object, ...]:
        otel_context.attach(otel_context.set_value("k", "creator"))
        a_done, b_done = asyncio.Event(), asyncio.Event()
        results = await asyncio.gather(task("a", a_done, b_done), task("b", b_done, a_done))
        return (*results, value())

    a, b, creator_after = asyncio.run(main())
    assert a == ("creator", "a")
    assert b == ("creator", "b")
    assert creator_after == "creator"
    assert value() is None


def test_asyncio_to_thread_carries_the_context() -> None:
    async def main() -> tuple[object, object, bool]:
        with threadctx.bound(request_id="async-req"):
            otel_context.attach(otel_context.set_value("k", "task"))

            def in_thread() -> tuple[object, object, bool]:
                return (
                    value(),
                    threadctx.correlation().get("request_id"),
                    threading.current_thread() is not main_thread,
                )

            main_thread = threading.current_thread()
            return await asyncio.to_thread(in_thread)

    assert asyncio.run(main()) == ("task", "async-req", True)


def test_attach_publishes_to_snapshot_for_other_threads() -> None:
    attached = threading.Event()
    detached = threading.Event()
    step = threading.Event()
    done = threading.Event()
    ident: list[int] = []

    def work() -> None:
        ident.append(threading.get_ident())
        token = threadctx.bind(request_id="published")
        attached.set()
        step.wait(JOIN)
        otel_context.detach(token)
        detached.set()
        done.wait(JOIN)

    thread = threading.Thread(target=work)
    thread.start()
    try:
        assert attached.wait(JOIN)
        [entry] = [e for e in threadctx.snapshot() if e.thread_id == ident[0]]
        assert dict(entry.correlation) == {"request_id": "published"}
        step.set()
        assert detached.wait(JOIN)
        # Back to no context at all, and no storage: the thread is not listed.
        assert [e for e in threadctx.snapshot() if e.thread_id == ident[0]] == []
    finally:
        step.set()
        done.set()
        thread.join(JOIN)


def test_token_type_is_a_contextvars_token() -> None:
    token = otel_context.attach(Context())
    assert isinstance(token, Token)
    otel_context.detach(token)
