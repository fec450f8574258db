"""wrap_context() and bound() as a decorator: every kind of callable, for its whole run; any keywords."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

import threadctx
from _helpers import JOIN


def ids() -> dict[str, str]:
    return dict(threadctx.correlation())


def echo(*args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any], dict[str, str]]:
    return args, kwargs, ids()


# Issue 11, item 3: the runner's own parameters are positional-only.


def test_wrap_passes_keyword_arguments_named_like_the_runners_parameters() -> None:
    with threadctx.bound(request_id="r-k"):
        wrapped = threadctx.wrap_context(echo)
    assert wrapped(1, context=2, fn=3) == ((1,), {"context": 2, "fn": 3}, {"request_id": "r-k"})


def test_context_pool_passes_keyword_arguments_named_like_the_runners_parameters() -> None:
    with threadctx.ContextThreadPoolExecutor(max_workers=1) as pool, threadctx.bound(request_id="r-k"):
        future = pool.submit(echo, fn="y", context="z")
        assert future.result(JOIN) == ((), {"fn": "y", "context": "z"}, {"request_id": "r-k"})


def test_instrumented_pool_passes_keyword_arguments_named_like_the_runners_parameters() -> None:
    threadctx.instrument_threading()
    try:
        with ThreadPoolExecutor(max_workers=1) as pool, threadctx.bound(request_id="r-k"):
            future = pool.submit(echo, context=1, fn=2)
            assert future.result(JOIN) == ((), {"context": 1, "fn": 2}, {"request_id": "r-k"})
    finally:
        threadctx.uninstrument_threading()


# Issue 11, item 4: coroutines, generators and async generators, for their whole run.

Decorate = Callable[[Callable[..., Any]], Callable[..., Any]]


def by_bound(fn: Callable[..., Any]) -> Callable[..., Any]:
    return threadctx.bound(job="j-1")(fn)


def by_wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
    with threadctx.bound(job="j-1"):
        return threadctx.wrap_context(fn)


DECORATORS: dict[str, Decorate] = {"bound()": by_bound, "wrap_context()": by_wrap}


@pytest.mark.parametrize("decorate", DECORATORS.values(), ids=DECORATORS.keys())
def test_a_coroutine_keeps_its_ids_across_awaits_while_another_task_runs(decorate: Decorate) -> None:
    async def main() -> list[tuple[str, dict[str, str]]]:
        seen: list[tuple[str, dict[str, str]]] = []
        inside, outside = asyncio.Event(), asyncio.Event()

        async def decorated() -> str:
            seen.append(("coroutine, before await", ids()))
            inside.set()
            await outside.wait()
            seen.append(("coroutine, after await", ids()))
            return "done"

        async def other() -> None:
            await inside.wait()
            seen.append(("other task", ids()))
            outside.set()

        with threadctx.bound(request_id="r-task"):
            results = await asyncio.gather(decorate(decorated)(), other())
            assert results[0] == "done"
            seen.append(("caller, after", ids()))
        return seen

    seen = asyncio.run(main())
    by_step = dict(seen)
    assert by_step["coroutine, before await"]["job"] == "j-1"
    assert by_step["coroutine, after await"]["job"] == "j-1"
    assert "job" not in by_step["other task"]
    assert by_step["caller, after"] == {"request_id": "r-task"}


@pytest.mark.parametrize("decorate", DECORATORS.values(), ids=DECORATORS.keys())
def test_a_generator_has_its_ids_in_every_step_and_the_consumer_keeps_its_own(decorate: Decorate) -> None:
    def steps() -> Iterator[dict[str, str]]:
        yield ids()
        threadctx.bind(step="two")  # the generator's own bind lasts into its next step
        received = yield ids()
        yield {**ids(), "received": received}

    with threadctx.bound(request_id="r-consumer"):
        generator = decorate(steps)()
        first = next(generator)
        assert ids() == {"request_id": "r-consumer"}, "nothing leaks to the consumer at a yield"
        second = next(generator)
        assert ids() == {"request_id": "r-consumer"}
        third = generator.send("hello")
        assert ids() == {"request_id": "r-consumer"}
        with pytest.raises(StopIteration):
            next(generator)
    assert first["job"] == "j-1"
    assert second["step"] == "two"
    assert third["step"] == "two"
    assert third["received"] == "hello"


def test_a_generator_gets_thrown_exceptions_and_closes_in_its_own_context() -> None:
    closed: list[dict[str, str]] = []

    @threadctx.bound(job="j-2")
    def steps() -> Iterator[str]:
        try:
            while True:
                try:
                    yield "value"
                except KeyError:
                    yield f"handled with {ids()['job']}"
        finally:
            closed.append(ids())

    generator = steps()
    assert next(generator) == "value"
    assert generator.throw(KeyError("k")) == "handled with j-2"
    generator.close()
    assert closed == [{"job": "j-2"}]
    assert ids() == {}


def test_a_generators_return_value_reaches_yield_from() -> None:
    @threadctx.bound(job="j-3")
    def inner() -> Iterator[int]:
        yield 1
        return ids()["job"]  # type: ignore[return-value]

    def outer() -> Iterator[Any]:
        returned = yield from inner()
        yield returned

    assert list(outer()) == [1, "j-3"]


@pytest.mark.parametrize("decorate", DECORATORS.values(), ids=DECORATORS.keys())
def test_an_async_generator_has_its_ids_in_every_step_and_the_consumer_keeps_its_own(
    decorate: Decorate,
) -> None:
    async def steps() -> AsyncIterator[dict[str, str]]:
        yield ids()
        threadctx.bind(step="two")
        await asyncio.sleep(0)
        yield ids()

    async def main() -> tuple[list[dict[str, str]], list[dict[str, str]]]:
        produced, between = [], []
        with threadctx.bound(request_id="r-consumer"):
            async for item in decorate(steps)():
                produced.append(item)
                between.append(ids())
        return produced, between

    produced, between = asyncio.run(main())
    assert [item["job"] for item in produced] == ["j-1", "j-1"]
    assert produced[1]["step"] == "two"
    assert between == [{"request_id": "r-consumer"}] * 2


def test_an_async_generator_closed_early_finishes_in_its_own_context() -> None:
    closed: list[dict[str, str]] = []

    @threadctx.bound(job="j-4")
    async def steps() -> AsyncIterator[int]:
        try:
            yield 1
            yield 2
        finally:
            closed.append(ids())

    async def main() -> None:
        generator = steps()
        assert await generator.__anext__() == 1
        await generator.aclose()

    asyncio.run(main())
    assert closed == [{"job": "j-4"}]


class AsyncCall:
    async def __call__(self) -> dict[str, str]:
        await asyncio.sleep(0)
        return ids()


class GeneratorCall:
    def __call__(self) -> Iterator[dict[str, str]]:
        yield ids()


class AsyncGeneratorCall:
    async def __call__(self) -> AsyncIterator[dict[str, str]]:
        await asyncio.sleep(0)
        yield ids()


@pytest.mark.parametrize("decorate", DECORATORS.values(), ids=DECORATORS.keys())
def test_an_object_whose_call_is_a_coroutine_or_generator_runs_in_the_context(decorate: Decorate) -> None:
    """``async def __call__`` (a FastAPI dependency class) and generator ``__call__``: their whole run.

    They were taken for plain functions: the IDs were bound only while the coroutine or generator
    object was created, and the body ran without them.
    """

    async def consume() -> tuple[dict[str, str], dict[str, str], list[dict[str, str]]]:
        return (
            await decorate(AsyncCall())(),
            await decorate(functools.partial(AsyncCall()))(),
            [item async for item in decorate(AsyncGeneratorCall())()],
        )

    awaited, through_partial, iterated = asyncio.run(consume())
    assert awaited == through_partial == {"job": "j-1"}
    assert iterated == [{"job": "j-1"}]
    assert list(decorate(GeneratorCall())()) == [{"job": "j-1"}]
    assert ids() == {}


def test_bound_as_a_decorator_keeps_what_the_function_is() -> None:
    import inspect

    async def coroutine() -> None: ...

    def generator() -> Iterator[int]:
        yield 1

    async def async_generator() -> AsyncIterator[int]:
        yield 1

    decorate = threadctx.bound(job="j")
    assert inspect.iscoroutinefunction(decorate(coroutine))
    assert inspect.isgeneratorfunction(decorate(generator))
    assert inspect.isasyncgenfunction(decorate(async_generator))
    assert decorate(generator).__name__ == "generator"


def test_one_bound_object_can_be_entered_again_inside_itself() -> None:
    scope = threadctx.bound(request_id="r-n")
    with scope:
        threadctx.bind(extra="x")
        with scope as inner:
            assert inner == {"request_id": "r-n", "extra": "x"}
        assert ids() == {"request_id": "r-n", "extra": "x"}
    assert ids() == {}
