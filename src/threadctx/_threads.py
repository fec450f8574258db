"""Carrying the context into threads and thread pools."""

from __future__ import annotations

import functools
import inspect
import threading
import types
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Generic, NoReturn, ParamSpec, SupportsIndex, TypeVar

from opentelemetry import context as otel_context

from threadctx._carry import in_context, kind_of, run_in
from threadctx._compat import OTEL_THREAD_CONTEXT, is_wrapt_proxy, serves_many
from threadctx._storage import new_locks_in_child

__all__ = [
    "ContextThread",
    "ContextThreadPoolExecutor",
    "instrument_threading",
    "uninstrument_threading",
    "wrap_context",
]

P = ParamSpec("P")
R = TypeVar("R")


def wrap_context(fn: Callable[P, R]) -> Callable[P, R]:
    """Return a callable that runs ``fn`` in the caller's current context.

    The context (span, baggage, correlation IDs) is captured now, when
    ``wrap_context`` is called; each call of the result attaches it, runs ``fn`` and
    restores the calling thread's own context afterwards, also when ``fn``
    raises, and also undoing whatever ``fn`` bound and left bound::

        pool.submit(threadctx.wrap_context(handle), request)

    ``async def`` functions keep the context across every ``await``;
    generators and async generators keep it for each of their steps and give
    the consumer its own context back at every ``yield``.

    What it returns holds the live context (spans, with their locks) and
    cannot be pickled: for work that crosses a process, use
    :func:`threadctx.wrap_process`, which carries the context as headers.

    .. versionadded:: 0.1.0
    """
    captured = _Captured(otel_context.get_current())
    kind = kind_of(fn)
    if any(
        test(kind)
        for test in (inspect.iscoroutinefunction, inspect.isgeneratorfunction, inspect.isasyncgenfunction)
    ):
        # Stays a function, for whoever inspects it (inspect.iscoroutinefunction before 3.12);
        # plain pickle refuses it by name, cloudpickle (Dask's) reaches _Captured's error.
        return in_context(fn, captured)
    return _ContextCall(fn, captured)


_NOT_PICKLABLE = (
    "the callable that threadctx.wrap_context() returned holds a live context (spans, with their locks) "
    "and cannot be pickled: for work that crosses a process, use threadctx.wrap_process(fn), "
    "which carries the context as W3C headers"
)


class _Captured:
    """The context that :func:`wrap_context` captured, called for it at each call; never pickled."""

    __slots__ = ("context",)

    def __init__(self, context: otel_context.Context) -> None:
        self.context = context

    def __call__(self) -> otel_context.Context:
        return self.context

    def __reduce_ex__(self, protocol: SupportsIndex) -> NoReturn:
        raise TypeError(_NOT_PICKLABLE)


class _ContextCall(Generic[P, R]):
    """What :func:`wrap_context` returns for a plain callable: ``fn`` run in the captured context.

    Looks like ``fn`` (``functools.update_wrapper``), binds as a method as a
    function does, copies as itself, and refuses to be pickled with a message
    that says what to use instead.
    """

    def __init__(self, fn: Callable[P, R], captured: _Captured) -> None:
        functools.update_wrapper(self, fn)
        self._threadctx_fn = fn
        self._threadctx_captured = captured

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return run_in(self._threadctx_captured.context, self._threadctx_fn, *args, **kwargs)

    def __get__(self, instance: object, owner: type | None = None) -> Any:
        return self if instance is None else types.MethodType(self, instance)

    def __reduce_ex__(self, protocol: SupportsIndex) -> NoReturn:
        raise TypeError(_NOT_PICKLABLE)

    def __copy__(self) -> _ContextCall[P, R]:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> _ContextCall[P, R]:
        return self

    def __repr__(self) -> str:
        return f"threadctx.wrap_context({self._threadctx_fn!r})"


class ContextThread(threading.Thread):
    """A ``threading.Thread`` whose ``run`` happens in the context of the thread that created it.

    .. versionadded:: 0.1.0
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._threadctx_context = otel_context.get_current()

    def run(self) -> None:
        """Run the target in the creator's context."""
        run_in(self._threadctx_context, super().run)


def _clean_start(initializer: Callable[..., object] | None) -> Callable[..., None]:
    """An initializer that gives a new pool worker an empty context, then runs ``initializer``."""

    def start_clean(*initargs: Any) -> None:
        # Never detached: this is the worker's own context for its whole life.
        # Without it, a worker that Python 3.14 started in a copy of its
        # creator's context (thread_inherit_context) would keep the first
        # submitter's span and IDs between tasks.
        otel_context.attach(otel_context.Context())
        if initializer is not None:
            initializer(*initargs)

    return start_clean


class ContextThreadPoolExecutor(ThreadPoolExecutor):
    """A ``ThreadPoolExecutor`` whose tasks run in the context of the code that submitted them.

    ``submit`` and ``map`` carry the submitter's span and correlation IDs;
    a worker starts with an empty context (also where Python 3.14 starts new
    threads in a copy of their creator's context), and after each task it is
    back to that clean context, so nothing leaks from one task into the next,
    also after an exception.

    .. versionadded:: 0.1.0
    """

    def __init__(
        self,
        max_workers: int | None = None,
        thread_name_prefix: str = "",
        initializer: Callable[..., object] | None = None,
        initargs: tuple[Any, ...] = (),
    ) -> None:
        super().__init__(max_workers, thread_name_prefix, _clean_start(initializer), initargs)

    def submit(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> Future[R]:
        """Schedule ``fn(*args, **kwargs)`` to run in the caller's current context."""
        return super().submit(run_in, otel_context.get_current(), fn, *args, **kwargs)


# instrument_threading: process-wide patches of class attributes.  Each patch
# sits directly on the attribute it replaced, beneath any wrapt proxy that
# another instrumentor (OpenTelemetry's ThreadingInstrumentor) put there, so
# that either side can be removed first, in any order, and each removal takes
# away exactly its own layer: ours by re-pointing the proxy above it, theirs
# by their usual unwrap of the outermost proxy.  The originals are kept for
# good: a stale reference to a patch (OpenTelemetry's uninstrument leaves one
# on Timer.start) must still work, and a patch that was switched off only
# calls its original.
_enabled = False
_lock = threading.Lock()
new_locks_in_child(globals(), "_lock")
_MISSING: Any = object()  # the class had no attribute of its own: it inherited one
_originals: dict[tuple[type, str], Any] = {}


def _original(owner: type, name: str, instance: object) -> Any:
    """The attribute our patch replaced, bound to ``instance`` as a method call would."""
    original = _originals[owner, name]
    if original is _MISSING:  # look it up where it was inherited from
        original = _inherited(owner, name)
    return original.__get__(instance, type(instance))


def _inherited(owner: type, name: str) -> Any:
    return next(base.__dict__[name] for base in owner.__mro__[1:] if name in base.__dict__)


def _is_inherited(owner: type, name: str, node: object) -> bool:
    """Whether ``node`` is a base class's own attribute ``name``.

    OpenTelemetry's proxy of ``Timer.start`` wraps ``Thread.start``'s proxy
    itself (Timer inherits ``start``): below that point the chain is
    ``Thread``'s, and belongs to ``Thread``'s patch.
    """
    return any(base.__dict__.get(name, _MISSING) is node for base in owner.__mro__[1:])


def _install(owner: type, name: str, patch: Any) -> None:
    holder, node = None, owner.__dict__.get(name, _MISSING)
    while is_wrapt_proxy(node) and not (holder is not None and _is_inherited(owner, name, node)):
        if node.__wrapped__ is patch:
            return  # already in place beneath another instrumentor's proxy
        holder, node = node, node.__wrapped__
    if node is patch:
        return
    # An inherited attribute is looked up where it is at each call, as when the class has none.
    _originals[owner, name] = _MISSING if holder is not None and _is_inherited(owner, name, node) else node
    if holder is None:
        setattr(owner, name, patch)
    else:
        holder.__wrapped__ = patch


def _uninstall(owner: type, name: str, patch: Any) -> None:
    top = owner.__dict__.get(name, _MISSING)
    original = _originals.get((owner, name), _MISSING)
    if top is patch:
        if original is _MISSING:
            delattr(owner, name)
        else:
            setattr(owner, name, original)
        return
    node = top
    while is_wrapt_proxy(node) and not (node is not top and _is_inherited(owner, name, node)):
        if node.__wrapped__ is patch:
            node.__wrapped__ = _inherited(owner, name) if original is _MISSING else original
            return
        node = node.__wrapped__
    # Not found: something replaced it without keeping a reference we can
    # follow; the patch stays where it is, switched off.


class _RunInContext:
    """What a started thread runs instead of its own ``run``: that ``run``, in a given context."""

    __slots__ = ("context", "own", "run", "thread")

    def __init__(self, thread: threading.Thread, context: otel_context.Context) -> None:
        self.thread = thread
        self.context = context
        #: A run set on the instance itself (``t.run = fn``), put back afterwards.
        self.own = thread.__dict__.get("run")
        self.run = thread.run  # the instance's or the subclass's own run, whatever it is

    def __call__(self) -> None:
        try:
            run_in(self.context, self.run)
        finally:
            self.restore()

    def restore(self) -> None:
        """Leave the thread's ``run`` as it was (and break the thread <-> wrapper cycle)."""
        if self.thread.__dict__.get("run") is self:
            if self.own is None:
                del self.thread.__dict__["run"]
            else:
                self.thread.__dict__["run"] = self.own


def _patched_start(owner: type[threading.Thread]) -> Callable[[threading.Thread], None]:
    def start(self: threading.Thread) -> None:
        original = _original(owner, "start", self)
        # threadctx.ContextThread carries its own context; a thread that is already
        # wrapped was wrapped by the patch of a base class (Timer.start
        # reaches Thread.start).
        if (
            not _enabled
            or isinstance(self, ContextThread)
            or isinstance(vars(self).get("run"), _RunInContext)
        ):
            original()
            return
        context = otel_context.Context() if serves_many(self) else otel_context.get_current()
        if OTEL_THREAD_CONTEXT in vars(self):
            # OpenTelemetry's ThreadingInstrumentor (whose start wrapper is outside this one) noted
            # the caller's context for its Thread.run wrapper to attach inside ours: a helper thread
            # would get the request that created it after all. Both carry the one context chosen here.
            self.__dict__[OTEL_THREAD_CONTEXT] = context
        wrapper = _RunInContext(self, context)
        self.__dict__["run"] = wrapper
        try:
            original()
        except BaseException:  # started twice, or no thread could be created
            wrapper.restore()
            raise

    return start


def _submit(self: ThreadPoolExecutor, fn: Callable[..., R], /, *args: Any, **kwargs: Any) -> Future[R]:
    submit = _original(ThreadPoolExecutor, "submit", self)
    if _enabled and not isinstance(self, ContextThreadPoolExecutor):
        return submit(run_in, otel_context.get_current(), fn, *args, **kwargs)  # type: ignore[no-any-return]
    return submit(fn, *args, **kwargs)  # type: ignore[no-any-return]


_PATCHES: dict[tuple[type, str], Any] = {
    (threading.Thread, "start"): _patched_start(threading.Thread),
    (threading.Timer, "start"): _patched_start(threading.Timer),
    (ThreadPoolExecutor, "submit"): _submit,
}


def instrument_threading() -> None:
    """Make every new thread and thread-pool task run in its creator's context, process-wide.

    Patches ``threading.Thread.start`` and ``threading.Timer.start`` (which
    cover every subclass, whatever its ``run``, and a ``run`` set on the
    instance) and ``ThreadPoolExecutor.submit`` (which covers ``map`` and
    ``loop.run_in_executor``).  A thread runs in the context current when
    ``start()`` was called; a task in the context current when it was
    submitted, and the worker is restored after it.

    The standard library's long-lived helper threads, which serve many
    callers, start with an empty context instead: ``ThreadPoolExecutor``
    workers, ``multiprocessing.pool.ThreadPool`` workers and every ``Pool``'s
    handler threads, a ``multiprocessing.Queue``'s feeder thread,
    ``ProcessPoolExecutor``'s manager thread and a ``logging``
    ``QueueListener``'s thread.

    Idempotent, and undone by :func:`uninstrument_threading`.  Beside
    OpenTelemetry's ``ThreadingInstrumentor`` both carry the same context
    (the second attach is redundant but harmless), and the two can be
    switched on and off in any order.

    .. versionadded:: 0.1.0
    """
    global _enabled  # noqa: PLW0603 - one process-wide switch
    with _lock:
        for (owner, name), patch in _PATCHES.items():
            _install(owner, name, patch)
        _enabled = True


def uninstrument_threading() -> None:
    """Undo :func:`instrument_threading`; threads and tasks started afterwards carry nothing.

    Calling it when not instrumented does nothing.

    .. versionadded:: 0.1.0
    """
    global _enabled  # noqa: PLW0603 - one process-wide switch
    with _lock:
        _enabled = False
        for (owner, name), patch in _PATCHES.items():
            _uninstall(owner, name, patch)
