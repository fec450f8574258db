"""Dask: tasks run on the workers in the context of the code that submitted them.

::

    import threadctx.dask

    client = distributed.Client(cluster)
    threadctx.dask.instrument(client)

    future = client.submit(work, job)  # runs in this thread's trace context, with its correlation IDs

What :func:`instrument` covers: ``client.submit()`` and ``client.map()`` on
that client. The submitter's context travels with each task as W3C headers
(``traceparent``, ``tracestate``, ``baggage``) plus every correlation ID,
never as pickled spans, as :func:`threadctx.wrap_process` sends it; on the
worker's thread the task runs with it attached and the thread gets its own
context back afterwards.

What it does not cover, and why:

- Tasks of Dask collections (``dask.delayed``, bags, arrays, dataframes)
  computed with ``client.compute()``, ``persist()`` or ``.compute()``: their
  graphs are built, optimized and fused by Dask, and the same graph key is
  shared by every caller that computes the same thing, so no single caller's
  context belongs to a task. Wrap the functions you give the collection:
  ``bag.map(threadctx.wrap_process(parse))``.
- ``async def`` functions, which Dask runs on the worker's event loop rather
  than on a worker thread, and actors: they are submitted unchanged.

With the default ``pure=True``, Dask gives two submissions of the same call
the same key and runs it once; instrumented, two submissions share a key
(and a run) only when they also come from the same context, so that each
task's log lines belong to one caller.

.. versionadded:: 0.1.0
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

try:
    from dask.tokenize import normalize_token
    from dask.utils import funcname
    from distributed import Client, Future
except ImportError as error:  # pragma: no cover - the test group installs distributed
    raise ImportError(
        "threadctx.dask needs dask.distributed: pip install 'threadctx[dask]' (or pip install distributed)"
    ) from error

from threadctx._processes import InContext
from threadctx._propagation import process_carrier

__all__ = ["instrument", "is_instrumented", "uninstrument"]


class _Task(InContext[..., Any]):
    """A submitted function and its submitter's context: named and tokenized as Dask names the function."""

    __slots__ = ()

    @property
    def __name__(self) -> str:  # what Dask's funcname() reads for the task's key
        return funcname(self.fn)

    def __dask_tokenize__(self) -> object:
        return ("threadctx.dask", normalize_token(self.fn), sorted(self.headers.items()))

    def __repr__(self) -> str:
        return f"threadctx.dask task of {self.fn!r}"


def _in_context(func: Callable[..., Any], options: dict[str, Any]) -> Callable[..., Any]:
    if (
        isinstance(func, _Task)
        or options.get("actor")
        or options.get("actors")
        or inspect.iscoroutinefunction(func)
    ):
        return func
    return _Task(func, process_carrier())


class _Submit:
    """``client.submit`` of an instrumented client."""

    __slots__ = ("original",)

    def __init__(self, original: Callable[..., Future[Any]]) -> None:
        self.original = original

    def __call__(self, func: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        """Submit ``func(*args, **kwargs)`` to run in the caller's current context."""
        return self.original(_in_context(func, kwargs), *args, **kwargs)


class _Map:
    """``client.map`` of an instrumented client."""

    __slots__ = ("original",)

    def __init__(self, original: Callable[..., list[Future[Any]]]) -> None:
        self.original = original

    def __call__(self, func: Callable[..., Any], /, *iterables: Any, **kwargs: Any) -> list[Future[Any]]:
        """Map ``func`` over ``iterables``, each task in the caller's current context."""
        return self.original(_in_context(func, kwargs), *iterables, **kwargs)


def instrument(client: Client) -> Client:
    """Make the tasks submitted through ``client`` run in their submitter's context.

    After the call, ``client.submit()`` and ``client.map()`` send the
    calling thread's trace context and correlation IDs with each task, and
    the worker runs the task with them attached: its log lines carry the
    submitter's trace id, span id and IDs, and its spans are children of the
    submitter's span. Nothing changes at the call sites, and only this client
    is affected. Calling it again does nothing.

    The workers' logging and tracer are set up as any worker's: see the Dask
    how-to for a ``WorkerPlugin`` that adds ``threadctx.ContextFilter``.

    Returns:
        ``client``.

    .. versionadded:: 0.1.0
    """
    if not is_instrumented(client):
        # Instance attributes, in front of the class's methods: this client only, and undone exactly.
        vars(client).update(submit=_Submit(client.submit), map=_Map(client.map))
    return client


def uninstrument(client: Client) -> Client:
    """Undo :func:`instrument`: ``client`` submits tasks as plain Dask does.

    Tasks already submitted keep their context. Returns ``client``.

    .. versionadded:: 0.1.0
    """
    for name, kind in (("submit", _Submit), ("map", _Map)):
        if isinstance(vars(client).get(name), kind):
            delattr(client, name)
    return client


def is_instrumented(client: Client) -> bool:
    """Whether :func:`instrument` was called on ``client`` (and not undone).

    .. versionadded:: 0.1.0
    """
    return isinstance(vars(client).get("submit"), _Submit)
