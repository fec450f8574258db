"""Correlation IDs on threadctx's runtime context and on OpenTelemetry's default one."""

from __future__ import annotations

import asyncio
import threading

import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

import threadctx
from _helpers import JOIN

pytestmark = pytest.mark.usefixtures("any_runtime")


def test_bind_unbind_clear() -> None:
    assert threadctx.correlation() == {}
    threadctx.bind(request_id="r-1", tenant="acme")
    threadctx.bind(user="u-7")
    assert threadctx.correlation() == {"request_id": "r-1", "tenant": "acme", "user": "u-7"}
    threadctx.unbind("tenant", "not-bound")
    assert threadctx.correlation() == {"request_id": "r-1", "user": "u-7"}
    threadctx.clear_correlation()
    assert threadctx.correlation() == {}


def test_bind_token_restores_exactly_the_previous_ids() -> None:
    threadctx.bind(request_id="outer")
    token = threadctx.bind(request_id="inner", extra="x")
    otel_context.detach(token)
    assert threadctx.correlation() == {"request_id": "outer"}


def test_clear_keeps_the_span(tracer_provider: TracerProvider) -> None:
    with tracer_provider.get_tracer("t").start_as_current_span("s") as span:
        threadctx.bind(request_id="r")
        threadctx.clear_correlation()
        assert trace.get_current_span() is span
        assert threadctx.correlation() == {}


def test_correlation_is_a_read_only_snapshot() -> None:
    threadctx.bind(a="1")
    ids = threadctx.correlation()
    threadctx.bind(a="2")
    assert ids == {"a": "1"}
    with pytest.raises(TypeError):
        ids["a"] = "3"  # type: ignore[index]


def test_bound_context_manager_restores_previous_values_also_on_error() -> None:
    threadctx.bind(request_id="outer", tenant="acme")
    seen: list[dict[str, str]] = []

    @threadctx.bound(request_id="inner", user="u")
    def fail() -> None:
        seen.append(dict(threadctx.correlation()))
        raise KeyError("boom")

    with pytest.raises(KeyError):
        fail()
    assert seen == [{"request_id": "inner", "tenant": "acme", "user": "u"}]
    assert threadctx.correlation() == {"request_id": "outer", "tenant": "acme"}
    with threadctx.bound(request_id="inner") as ids:
        assert ids == threadctx.correlation() == {"request_id": "inner", "tenant": "acme"}
    assert threadctx.correlation() == {"request_id": "outer", "tenant": "acme"}


def test_bound_nested() -> None:
    with threadctx.bound(a="1"):
        with threadctx.bound(a="2", b="2"):
            assert threadctx.correlation() == {"a": "2", "b": "2"}
        assert threadctx.correlation() == {"a": "1"}
    assert threadctx.correlation() == {}


def test_bound_decorator_binds_per_call_in_every_thread() -> None:
    count = 8
    barrier = threading.Barrier(count)
    seen: dict[int, dict[str, str]] = {}

    @threadctx.bound(job="nightly")
    def work(index: int) -> None:
        threadctx.bind(index=str(index))  # undone by the decorator on return
        barrier.wait(JOIN)
        seen[index] = dict(threadctx.correlation())

    def run(index: int) -> None:
        work(index)
        assert threadctx.correlation() == {}

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(JOIN)
    assert seen == {i: {"job": "nightly", "index": str(i)} for i in range(count)}
    assert work.__name__ == "work"


def test_one_bound_object_entered_by_two_threads_at_once_leaves_each_clean() -> None:
    """A shared ``bound()`` left first by the thread that entered first: each undoes only its own block.

    It used to keep one stack of tokens for every thread: the first to leave took the other's token,
    could not detach it, and both threads kept the IDs after their blocks.
    """
    scope = threadctx.bound(job="shared")
    both_inside = threading.Barrier(2)
    first_left = threading.Event()
    after: dict[str, dict[str, str]] = {}

    def first() -> None:
        with scope:
            both_inside.wait(JOIN)
        after["first"] = dict(threadctx.correlation())
        first_left.set()

    def second() -> None:
        with scope:
            both_inside.wait(JOIN)
            assert first_left.wait(JOIN)
            after["inside second"] = dict(threadctx.correlation())
        after["second"] = dict(threadctx.correlation())

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(JOIN)
    assert after == {"first": {}, "inside second": {"job": "shared"}, "second": {}}


def test_one_bound_object_entered_by_two_asyncio_tasks_leaves_each_clean() -> None:
    """The same, with two tasks of one thread that leave in the order they entered."""
    scope = threadctx.bound(job="shared")

    async def main() -> dict[str, dict[str, str]]:
        after: dict[str, dict[str, str]] = {}
        second_inside, first_left = asyncio.Event(), asyncio.Event()

        async def first() -> None:
            with scope:
                await second_inside.wait()
            after["first"] = dict(threadctx.correlation())
            first_left.set()

        async def second() -> None:
            with scope:
                second_inside.set()
                await first_left.wait()
            after["second"] = dict(threadctx.correlation())

        await asyncio.gather(first(), second())
        return after

    assert asyncio.run(main()) == {"first": {}, "second": {}}


def test_leaving_a_bound_block_that_was_not_entered_here_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="did not enter it"):
        threadctx.bound(job="x").__exit__(None, None, None)


def test_ids_follow_the_context_object() -> None:
    with threadctx.bound(request_id="carried"):
        captured = otel_context.get_current()
    assert threadctx.correlation() == {}
    assert threadctx.correlation(captured) == {"request_id": "carried"}
    token = otel_context.attach(captured)
    assert threadctx.correlation() == {"request_id": "carried"}
    otel_context.detach(token)


@pytest.mark.parametrize(
    ("ids", "error", "message"),
    [
        ({"request_id": "a\nb"}, ValueError, "control or non-printable"),
        ({"request_id": "a\rb"}, ValueError, "control or non-printable"),
        ({"request_id": "\x1b[31mred"}, ValueError, "control or non-printable"),
        ({"request_id": "a\u2028b"}, ValueError, "control or non-printable"),
        ({"request_id": "a\u202eb"}, ValueError, "control or non-printable"),
        ({"request_id": "a\x00b"}, ValueError, "control or non-printable"),
        ({"request_id": "x" * 257}, ValueError, "257 characters long; the limit is 256"),
        ({"request_id": 42}, TypeError, "must be a str, not int"),
        ({"request-id": "x"}, ValueError, "not an ASCII identifier"),
        ({"n" * 65: "x"}, ValueError, "longer than 64 characters"),
    ],
)
def test_invalid_ids_raise_and_bind_nothing(
    ids: dict[str, object], error: type[Exception], message: str
) -> None:
    threadctx.bind(request_id="kept")
    with pytest.raises(error, match=message):
        threadctx.bind(ok="fine", **ids)  # type: ignore[arg-type]
    with pytest.raises(error, match=message):
        threadctx.bound(**ids)  # type: ignore[arg-type]
    assert threadctx.correlation() == {"request_id": "kept"}


def test_error_message_shows_untrusted_text_escaped() -> None:
    with pytest.raises(ValueError, match="control") as info:
        threadctx.bind(request_id="evil\n2026-01-01 INFO forged")
    assert "\n" not in str(info.value)
    assert "\\n" in str(info.value)


def test_limits_are_inclusive_and_unicode_text_is_accepted() -> None:
    threadctx.bind(request_id="x" * threadctx.CORRELATION_MAX_VALUE_LENGTH, tenant="Zürich-東京")
    assert len(threadctx.correlation()["request_id"]) == 256


def test_too_many_ids() -> None:
    threadctx.bind(**{f"id{i}": "v" for i in range(threadctx.CORRELATION_MAX_IDS)})
    with pytest.raises(ValueError, match="limit of 64"):
        threadctx.bind(one_more="v")
    threadctx.bind(id0="replaced")  # replacing does not add
    assert len(threadctx.correlation()) == threadctx.CORRELATION_MAX_IDS
