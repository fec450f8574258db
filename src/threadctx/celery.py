"""Celery: the publisher's trace context and correlation IDs travel with each task.

::

    import threadctx.celery

    app = Celery("orders", broker=...)
    threadctx.celery.instrument(app)

When a task is published, the current trace context goes into the message
headers through OpenTelemetry's configured propagators, and the correlation
IDs on the propagation allowlist (:func:`threadctx.allow_propagation`) into a header
of their own.  On the worker, on whichever thread (or prefork child) runs the
task, the whole execution of the task runs in that context with ``task_id``
and ``task_name`` bound as correlation IDs: not only the body, but all that
Celery does for the task after it, such as publishing the next step of a
chain and the ``link=``/``link_error=`` callbacks, sending the ``task_*``
signals, and calling ``on_success``/``on_failure``.  The thread is left as
it was afterwards.

The hook is the function that Celery's ``build_tracer`` returns, which the
worker (and ``Task.apply``) calls to execute a task.  Beside
``opentelemetry-instrumentation-celery`` (instrument both, in any order),
OpenTelemetry's worker span, a child of its publish span, is kept as the
current span, and the correlation IDs are bound under it from the body on.

.. versionadded:: 0.1.0
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Mapping
from typing import Any, cast

from celery import Celery, signals
from celery.app.task import Task
from opentelemetry import context as otel_context
from opentelemetry import propagate as otel_propagate
from opentelemetry.propagators.textmap import Getter

from threadctx._compat import celery_tracer_modules
from threadctx._correlation import correlation, merged
from threadctx._propagation import decode_ids, encode_ids, extract, propagation_allowlist, valid_ids
from threadctx._storage import new_locks_in_child

__all__ = ["HEADER", "instrument", "is_instrumented", "uninstrument"]

HEADER = "threadctx_correlation"
"""The message header that carries the allowlisted correlation IDs (W3C baggage syntax).

A header of its own, not ``baggage``: OpenTelemetry's Celery instrumentation
writes ``baggage`` too, and would replace them.
"""

_apps: weakref.WeakSet[Celery] = weakref.WeakSet()
_lock = threading.Lock()
new_locks_in_child(globals(), "_lock")
_original_call: Callable[..., Any] | None = None
_original_build_tracer: Callable[..., Any] | None = None
_running = threading.local()
"""``ids``: the correlation IDs of the task this thread executes (while _build_tracer's tracer runs)."""


class _RequestGetter(Getter[Mapping[str, Any]]):
    """Reads message headers from a task's request dict, where Celery puts each header; text only."""

    def get(self, carrier: Mapping[str, Any], key: str) -> list[str] | None:
        value = carrier.get(key)
        return [value] if isinstance(value, str) else None

    def keys(self, carrier: Mapping[str, Any]) -> list[str]:
        return [key for key, value in carrier.items() if isinstance(value, str)]


_GETTER = _RequestGetter()


def _on_publish(headers: dict[str, Any] | None = None, **_: Any) -> None:
    """before_task_publish: the publisher's context into the message headers."""
    if headers is None or not _apps:
        return
    otel_propagate.inject(headers)
    allowed = propagation_allowlist()
    ids = {name: value for name, value in correlation().items() if name in allowed}
    if ids:
        headers[HEADER] = encode_ids(ids)


def _task_context(task: Task[Any, Any], task_id: object, request: Mapping[str, Any]) -> otel_context.Context:
    """The context a task executes in: its publisher's, read from the request, and its own id and name."""
    current = otel_context.get_current()
    ids: dict[str, object]
    if request.get("is_eager"):  # Task.apply: the caller's thread, which has the caller's context
        context, ids = current, {}
    else:
        context = extract(request, context=current, getter=_GETTER)
        ids = {**decode_ids(request.get(HEADER), propagation_allowlist())}
    if task_id:
        ids["task_id"] = task_id
    ids["task_name"] = task.name
    return merged(valid_ids(ids), context)


def _build_tracer(name: str, task: Task[Any, Any], *args: Any, **kwargs: Any) -> Callable[..., Any]:
    """celery.app.trace.build_tracer while instrumented: the whole execution of a task in its context.

    Celery's tracer runs the ``task_prerun`` handlers, the body, then
    publishes the callbacks and the chain's next step, stores the result and
    calls the ``on_*`` methods, errbacks and the other signal handlers: all
    of it runs in the publisher's context here.
    """
    tracer = cast("Callable[..., Any]", _original_build_tracer)(name, task, *args, **kwargs)

    def trace(
        task_id: str, task_args: Any, task_kwargs: Any, request: Mapping[str, Any] | None = None, /
    ) -> Any:
        if task.app not in _apps:
            return tracer(task_id, task_args, task_kwargs, request)
        context = _task_context(task, task_id, request or {})
        outer = getattr(_running, "ids", None)
        _running.ids = correlation(context)
        token = otel_context.attach(context)
        try:
            return tracer(task_id, task_args, task_kwargs, request)
        finally:
            otel_context.detach(token)
            _running.ids = outer

    return trace


def _call(self: Task[Any, Any], *args: Any, **kwargs: Any) -> Any:
    """Task.__call__ while instrumented: the IDs stay bound under a span attached after the tracer began.

    OpenTelemetry's Celery instrumentation attaches its task span from a
    ``task_prerun`` handler, in a context of its own that has none of the
    correlation IDs; the body is the first point after every prerun handler,
    so the IDs are bound again there, under that span.  That context is left
    attached, for what Celery does after the body: the tracer's detach
    restores the thread as it was before the task.

    The worker executes a task by calling it with its request pushed; any
    other call (a plain function call, or the task calling itself) is handed
    to the ``__call__`` this one replaced.  Like Celery's own worker
    optimisation, the worker path calls ``run`` directly, so ``self.request``
    stays the worker's request.
    """
    original = cast("Callable[..., Any]", _original_call)  # set whenever this is installed
    stack = self.request_stack
    request = stack.top
    if request is None or request.called_directly or len(stack) != 1 or getattr(request, "_threadctx", False):
        return original(self, *args, **kwargs)
    setattr(request, "_threadctx", True)  # noqa: B010 - a nested call of the same task is a plain call
    ids: Mapping[str, str] | None = getattr(_running, "ids", None)
    if ids and self.app in _apps:
        current = otel_context.get_current()
        if not correlation(current).items() >= ids.items():
            otel_context.attach(merged(ids, current))  # detached by the tracer's own detach, see above
    return self.run(*args, **kwargs)


def _outermost(**_: Any) -> None:
    """Put _call back on top: Celery's worker replaces Task.__call__ with a stack protection at start-up.

    Connected to ``worker_init`` and ``worker_process_init``, which come after it.
    """
    with _lock:
        if _apps and Task.__dict__.get("__call__") is not _call:
            Task.__call__ = _call  # type: ignore[method-assign]


_HOOKS = (
    (signals.before_task_publish, _on_publish),
    (signals.worker_init, _outermost),
    (signals.worker_process_init, _outermost),
)


def instrument(app: Celery) -> None:
    """Carry the trace context and correlation IDs with the tasks of ``app``.

    Call it where the app is created, so that both the publishing processes
    and the workers run it before any task is published or run.  Idempotent.

    On the publishing side the headers are added to every task message the
    process sends while any app is instrumented.  On the worker (any pool:
    threads, prefork, solo...), each task of ``app`` executes with the
    publisher's span as its parent (from the body on, under OpenTelemetry's
    task span when its instrumentation is on), the allowlisted correlation
    IDs bound, and ``task_id`` and ``task_name`` bound; invalid incoming
    values are dropped and counted in :func:`threadctx.propagation_stats`.
    That is the whole execution: the ``task_prerun`` handlers, the body, the
    next step of a chain and the ``link=``/``link_error=`` callbacks it
    publishes, ``on_success``/``on_failure`` and the other signal handlers.
    The thread is left as it was after each task.

    Raises:
        RuntimeError: this Celery release has no ``celery.app.trace.build_tracer``,
            the hook threadctx needs (nothing is patched then).

    .. versionadded:: 0.1.0
    """
    global _original_call, _original_build_tracer  # noqa: PLW0603 - one process-wide patch
    with _lock:
        if not _apps:
            modules = celery_tracer_modules()  # raises, before anything is patched, if Celery moved it
            for signal, receiver in _HOOKS:
                signal.connect(receiver, weak=False, dispatch_uid=f"threadctx.celery.{receiver.__name__}")
            if _original_call is None:
                _original_call = Task.__call__
            # A __call__ from a module other than celery.app.task makes Celery's
            # worker call the task object (not task.run) for every task: that is
            # what lets the body bind the IDs again under OpenTelemetry's span.
            Task.__call__ = _call  # type: ignore[method-assign]
            for module in modules:
                if _original_build_tracer is None:
                    _original_build_tracer = module.build_tracer
                if getattr(module, "build_tracer", None) is _original_build_tracer:
                    setattr(module, "build_tracer", _build_tracer)  # noqa: B010 - the stubs lack it
        _apps.add(app)


def uninstrument(app: Celery) -> None:
    """Undo :func:`instrument` for ``app``; the last one removes the process-wide hooks.

    A worker that already started keeps calling tasks through the hook,
    which then runs them as Celery would.

    .. versionadded:: 0.1.0
    """
    with _lock:
        _apps.discard(app)
        if _apps:
            return
        for signal, receiver in _HOOKS:
            signal.disconnect(receiver, dispatch_uid=f"threadctx.celery.{receiver.__name__}")
        if _original_call is not None and Task.__dict__.get("__call__") is _call:
            Task.__call__ = _original_call  # type: ignore[method-assign]
        for module in celery_tracer_modules(required=False):
            if getattr(module, "build_tracer", None) is _build_tracer:
                setattr(module, "build_tracer", _original_build_tracer)  # noqa: B010 - the stubs lack it


def is_instrumented(app: Celery) -> bool:
    """Whether :func:`instrument` is in force for ``app``.

    .. versionadded:: 0.1.0
    """
    return app in _apps
