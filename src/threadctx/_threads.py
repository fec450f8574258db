"""Carrying the context into threads and thread pools."""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, ParamSpec, TypeVar

from opentelemetry import context as otel_context

__all__ = ["ContextThreadPoolExecutor", "Thread", "wrap"]

P = ParamSpec("P")
R = TypeVar("R")


def _run_in(context: otel_context.Context, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    token = otel_context.attach(context)
    try:
        return fn(*args, **kwargs)
    finally:
        # Restores what the thread had before, whatever fn attached or bound
        # and did not undo (contextvars semantics: the token saved it).
        otel_context.detach(token)


def wrap(fn: Callable[P, R]) -> Callable[P, R]:
    """Return a callable that runs ``fn`` in the caller's current context.

    The context (span, baggage, correlation IDs) is captured now, when
    ``wrap`` is called; each call of the result attaches it, runs ``fn`` and
    restores the calling thread's own context afterwards, also when ``fn``
    raises, and also undoing whatever ``fn`` bound and left bound::

        pool.submit(threadctx.wrap(handle), request)

    .. versionadded:: 0.1.0
    """
    context = otel_context.get_current()

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        return _run_in(context, fn, *args, **kwargs)

    return wrapper


class Thread(threading.Thread):
    """A ``threading.Thread`` whose ``run`` happens in the context of the thread that created it.

    .. versionadded:: 0.1.0
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._threadctx_context = otel_context.get_current()

    def run(self) -> None:
        """Run the target in the creator's context."""
        _run_in(self._threadctx_context, super().run)


class ContextThreadPoolExecutor(ThreadPoolExecutor):
    """A ``ThreadPoolExecutor`` whose tasks run in the context of the code that submitted them.

    ``submit`` and ``map`` carry the submitter's span and correlation IDs;
    after each task the worker is back to its own clean context, so nothing
    leaks from one task into the next, also after an exception.

    .. versionadded:: 0.1.0
    """

    def submit(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> Future[R]:
        """Schedule ``fn(*args, **kwargs)`` to run in the caller's current context."""
        context = otel_context.get_current()

        def task() -> R:
            return _run_in(context, fn, *args, **kwargs)

        return super().submit(task)
