"""Carrying the context into child processes, as W3C headers."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Generic, ParamSpec, TypeVar

from opentelemetry import context as otel_context

from threadctx._propagation import process_carrier, process_context

__all__ = ["ContextProcessPoolExecutor", "wrap_process"]

P = ParamSpec("P")
R = TypeVar("R")


class InContext(Generic[P, R]):
    """A picklable call of ``fn`` in the context that ``headers`` describe."""

    __slots__ = ("fn", "headers")

    def __init__(self, fn: Callable[P, R], headers: dict[str, str]) -> None:
        self.fn = fn
        self.headers = headers

    def __getstate__(self) -> tuple[Callable[P, R], dict[str, str]]:
        return self.fn, self.headers

    def __setstate__(self, state: tuple[Callable[P, R], dict[str, str]]) -> None:
        self.fn, self.headers = state

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        token = otel_context.attach(process_context(self.headers))
        try:
            return self.fn(*args, **kwargs)
        finally:
            otel_context.detach(token)

    def __repr__(self) -> str:
        return f"threadctx.wrap_process({self.fn!r})"


def wrap_process(fn: Callable[P, R]) -> Callable[P, R]:
    """Return a picklable callable that runs ``fn`` in the caller's context, in any process.

    The context is captured now, as W3C headers (``traceparent``,
    ``tracestate``, ``baggage``) plus every correlation ID, never as pickled
    spans; in the child each call attaches it on a clean context and restores
    the child's own context afterwards.  It works under the ``fork``,
    ``spawn`` and ``forkserver`` start methods, wherever ``fn`` itself can be
    pickled::

        process = multiprocessing.Process(target=threadctx.wrap_process(work), args=(job,))
        pool.map(threadctx.wrap_process(work), jobs)

    In the child the span is the caller's, as a remote parent: log lines
    carry its trace and span ids, and spans started there are its children.

    .. versionadded:: 0.1.0
    """
    return InContext(fn, process_carrier())


class ContextProcessPoolExecutor(ProcessPoolExecutor):
    """A ``ProcessPoolExecutor`` whose tasks run in the context of the code that submitted them.

    ``submit`` and ``map`` send the submitter's trace context and all its
    correlation IDs to the worker process as W3C headers (see
    :func:`wrap_process`); each task starts from a clean context there, so
    nothing leaks from one task to the next.

    .. versionadded:: 0.1.0
    """

    def submit(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> Future[R]:
        """Schedule ``fn(*args, **kwargs)`` to run in the caller's current context."""
        return super().submit(wrap_process(fn), *args, **kwargs)
