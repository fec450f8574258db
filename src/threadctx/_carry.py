"""Running a callable in a given OpenTelemetry context, whatever kind of callable it is.

Used by :func:`threadctx.wrap_context`, :func:`threadctx.bound` as a decorator and the
thread and pool helpers.  A plain function runs between one ``attach`` and its
``detach``.  A coroutine function attaches inside the coroutine, so the
context holds across every ``await`` of that one task.  A generator (or
async generator) is driven step by step: each step runs in the generator's
own context and the consumer's context is restored at every ``yield``, so
nothing leaks into the loop that consumes it, and what the generator binds
itself stays bound for its next step.

This module imports only ``opentelemetry.context``, through attribute access
at call time (it can be loaded while that package is still initialising).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import AsyncGenerator, Callable, Generator
from typing import Any, ParamSpec, TypeVar, cast

from opentelemetry import context as _otel_context
from opentelemetry.context.context import Context

__all__ = ["in_context", "kind_of", "run_in"]

P = ParamSpec("P")
R = TypeVar("R")


def run_in(context: Context, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
    """Call ``fn(*args, **kwargs)`` with ``context`` attached, then restore the caller's context.

    The parameters before ``/`` are positional-only, so ``fn`` may take
    keyword arguments named ``context`` or ``fn``.
    """
    token = _otel_context.attach(context)
    try:
        return fn(*args, **kwargs)
    finally:
        # Restores what the thread had before, whatever fn attached or bound
        # and did not undo (contextvars semantics: the token saved it).
        _otel_context.detach(token)


def _drive(generator: Generator[Any, Any, Any], context: Context) -> Generator[Any, Any, Any]:
    """Yield from ``generator``, each of its steps in its own context (see the module's docstring)."""
    sent: Any = None
    thrown: BaseException | None = None
    while True:
        token = _otel_context.attach(context)
        try:
            item = generator.send(sent) if thrown is None else generator.throw(thrown)
        except StopIteration as stop:
            return stop.value
        finally:
            context = _otel_context.get_current()
            _otel_context.detach(token)
        thrown = None
        try:
            sent = yield item
        except GeneratorExit:
            run_in(context, generator.close)
            raise
        except BaseException as exc:  # passed on to the generator, as yield from does
            thrown = exc


def kind_of(fn: Callable[..., Any]) -> Callable[..., Any]:
    """What tells whether calling ``fn`` starts a coroutine or a generator.

    That is ``fn`` itself (through any ``functools.partial``), or for an
    instance of a class with ``__call__`` (``async def __call__``: a FastAPI
    dependency class, for one) that method.
    """
    while isinstance(fn, functools.partial):
        fn = fn.func
    if inspect.isroutine(fn) or isinstance(fn, type):
        return fn
    return getattr(type(fn), "__call__", fn)  # noqa: B004 - the method itself is what we inspect


def in_context(fn: Callable[P, R], context_for_call: Callable[[], Context]) -> Callable[P, R]:
    """Wrap ``fn`` so that each call runs in ``context_for_call()``, for the whole of its run.

    ``context_for_call`` is called once per call of the result: for a plain
    function at the call, for a coroutine, generator or async generator when
    its body first runs (so on top of the context of whoever awaits or
    iterates it).
    """
    wrapper: Callable[..., Any]
    call: Callable[..., Any] = fn  # what it returns is known from kind_of(fn), not from its type
    kind = kind_of(fn)
    if inspect.iscoroutinefunction(kind):

        async def run_coroutine(*args: Any, **kwargs: Any) -> Any:
            token = _otel_context.attach(context_for_call())
            try:
                return await call(*args, **kwargs)
            finally:
                _otel_context.detach(token)

        wrapper = run_coroutine
    elif inspect.isasyncgenfunction(kind):

        async def run_async_generator(*args: Any, **kwargs: Any) -> AsyncGenerator[Any, Any]:
            generator = call(*args, **kwargs)
            context = context_for_call()
            sent: Any = None
            thrown: BaseException | None = None
            while True:
                token = _otel_context.attach(context)
                try:
                    item = await (generator.asend(sent) if thrown is None else generator.athrow(thrown))
                except StopAsyncIteration:
                    return
                finally:
                    context = _otel_context.get_current()
                    _otel_context.detach(token)
                thrown = None
                try:
                    sent = yield item
                except GeneratorExit:
                    token = _otel_context.attach(context)
                    try:
                        await generator.aclose()
                    finally:
                        _otel_context.detach(token)
                    raise
                except BaseException as exc:  # passed on to the generator
                    thrown = exc

        wrapper = run_async_generator
    elif inspect.isgeneratorfunction(kind):

        def run_generator(*args: Any, **kwargs: Any) -> Generator[Any, Any, Any]:
            return (yield from _drive(call(*args, **kwargs), context_for_call()))

        wrapper = run_generator
    else:

        def run_function(*args: Any, **kwargs: Any) -> Any:
            return run_in(context_for_call(), fn, *args, **kwargs)

        wrapper = run_function
    return cast("Callable[P, R]", functools.wraps(fn)(wrapper))
