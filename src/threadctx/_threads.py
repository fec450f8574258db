"""Carrying the context into threads and thread pools."""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import thread as _futures_thread
from typing import Any, ParamSpec, TypeVar

from opentelemetry import context as otel_context

__all__ = ["ContextThreadPoolExecutor", "Thread", "instrument_threading", "uninstrument_threading", "wrap"]

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


# instrument_threading: process-wide patches of class attributes, each
# installed at most once and removed only while it is still the outermost
# wrapper.  When another wrapper (OpenTelemetry's ThreadingInstrumentor) was
# put on top of ours, removing ours would remove theirs too, so ours stays in
# place, switched off.  The originals are kept for good: a stale reference to
# a patch (OpenTelemetry's uninstrument leaves one on Timer.start) must still
# work.
_enabled = False
_lock = threading.Lock()
_MISSING: Any = object()  # the class had no attribute of its own: it inherited one
_originals: dict[tuple[type, str], Any] = {}
_installed: set[tuple[type, str]] = set()


def _original(owner: type, name: str, instance: object) -> Any:
    """The attribute our patch replaced, bound to ``instance`` as a method call would."""
    original = _originals[owner, name]
    if original is _MISSING:  # look it up where it was inherited from
        original = next(base.__dict__[name] for base in owner.__mro__[1:] if name in base.__dict__)
    return original.__get__(instance, type(instance))


def _patched_start(owner: type[threading.Thread]) -> Callable[[threading.Thread], None]:
    def start(self: threading.Thread) -> None:
        original = _original(owner, "start", self)
        # Executor workers are excluded: they serve many submitters, each task
        # brings its own context, and between tasks a worker holds none.
        if (
            not _enabled
            or isinstance(self, Thread)
            or getattr(self, "_target", None) is _futures_thread._worker
            or "run" in vars(self)  # already wrapped by the patch of a base class
        ):
            original()
            return
        context = otel_context.get_current()
        run = self.run  # the subclass's own run, whatever it is

        def run_in_context() -> None:
            try:
                _run_in(context, run)
            finally:
                vars(self).pop("run", None)  # break the thread <-> closure cycle

        self.run = run_in_context  # type: ignore[method-assign]
        try:
            original()
        except BaseException:  # started twice, or no thread could be created
            if vars(self).get("run") is run_in_context:
                del self.run
            raise

    return start


def _submit(self: ThreadPoolExecutor, fn: Callable[..., R], /, *args: Any, **kwargs: Any) -> Future[R]:
    if _enabled and not isinstance(self, ContextThreadPoolExecutor):
        fn = functools.partial(_run_in, otel_context.get_current(), fn)
    return _original(ThreadPoolExecutor, "submit", self)(fn, *args, **kwargs)  # type: ignore[no-any-return]


_PATCHES: dict[tuple[type, str], Any] = {
    (threading.Thread, "start"): _patched_start(threading.Thread),
    (threading.Timer, "start"): _patched_start(threading.Timer),
    (ThreadPoolExecutor, "submit"): _submit,
}


def instrument_threading() -> None:
    """Make every new thread and thread-pool task run in its creator's context, process-wide.

    Patches ``threading.Thread.start`` and ``threading.Timer.start`` (which
    cover every subclass, whatever its ``run``) and ``ThreadPoolExecutor.submit``
    (which covers ``map`` and ``loop.run_in_executor``).  A thread runs in
    the context current when ``start()`` was called; a task in the context
    current when it was submitted, and the worker is restored after it.
    Pool worker threads themselves start clean.

    Idempotent, and undone by :func:`uninstrument_threading`.  Beside
    OpenTelemetry's ``ThreadingInstrumentor`` both carry the same context;
    the second attach is redundant but harmless.

    .. versionadded:: 0.1.0
    """
    global _enabled  # noqa: PLW0603 - one process-wide switch
    with _lock:
        for (owner, name), patch in _PATCHES.items():
            if (owner, name) not in _installed:
                _originals[owner, name] = owner.__dict__.get(name, _MISSING)
                setattr(owner, name, patch)
                _installed.add((owner, name))
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
            if (owner, name) in _installed and owner.__dict__.get(name) is patch:
                original = _originals[owner, name]
                if original is _MISSING:
                    delattr(owner, name)
                else:
                    setattr(owner, name, original)
                _installed.discard((owner, name))
