"""Celery: the publisher's trace context and correlation IDs travel with each task.

::

    import threadctx.celery

    app = Celery("orders", broker=...)
    threadctx.celery.instrument(app)

When a task is published, the current trace context goes into the message
headers through OpenTelemetry's configured propagators, and the correlation
IDs on the propagation allowlist (:func:`threadctx.propagate`) into a header
of their own.  On the worker, on whichever thread (or prefork child) runs the
task, the task body runs in that context with ``task_id`` and ``task_name``
bound as correlation IDs; the thread is left as it was afterwards.

Beside ``opentelemetry-instrumentation-celery`` (instrument both, in any
order), OpenTelemetry's worker span, a child of its publish span, is kept as
the current span, and the correlation IDs are bound under it.

.. versionadded:: 0.1.0
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any, cast

from celery import Celery, signals
from celery.app.task import Task
from opentelemetry import context as otel_context
from opentelemetry import propagate as otel_propagate
from opentelemetry import trace as otel_trace
from opentelemetry.propagators.textmap import Getter

from threadctx._correlation import correlation, merged
from threadctx._propagation import _valid_ids, decode_ids, encode_ids, extract, propagated

__all__ = ["HEADER", "instrument", "is_instrumented", "uninstrument"]

HEADER = "threadctx_correlation"
"""The message header that carries the allowlisted correlation IDs (W3C baggage syntax).

A header of its own, not ``baggage``: OpenTelemetry's Celery instrumentation
writes ``baggage`` too, and would replace them.
"""

_apps: weakref.WeakSet[Celery] = weakref.WeakSet()
_lock = threading.Lock()
_original_call: Callable[..., Any] | None = None


class _RequestGetter(Getter[Any]):
    """Reads message headers from a task request: Celery makes each header an attribute."""

    def get(self, carrier: Any, key: str) -> list[str] | None:
        value = getattr(carrier, key, None)
        return [value] if isinstance(value, str) else None

    def keys(self, carrier: Any) -> list[str]:
        return [key for key, value in vars(carrier).items() if isinstance(value, str)]


_GETTER = _RequestGetter()


def _on_publish(headers: dict[str, Any] | None = None, **_: Any) -> None:
    """before_task_publish: the publisher's context into the message headers."""
    if headers is None or not _apps:
        return
    otel_propagate.inject(headers)
    allowed = propagated()
    ids = {name: value for name, value in correlation().items() if name in allowed}
    if ids:
        headers[HEADER] = encode_ids(ids)


def _task_context(task: Task[Any, Any]) -> otel_context.Context:
    request = task.request
    current = otel_context.get_current()
    has_span = otel_trace.get_current_span(current).get_span_context().is_valid
    # In a worker thread the current context is clean, or holds OpenTelemetry's
    # task span (its instrumentation ran first): keep that span. An eager task
    # runs in its caller's context, which already holds the caller's IDs.
    context = current if has_span or request.is_eager else extract(request, context=current, getter=_GETTER)
    ids = {} if request.is_eager else decode_ids(getattr(request, HEADER, None), propagated())
    if request.id:
        ids["task_id"] = str(request.id)
    ids["task_name"] = str(task.name)
    return merged(_valid_ids(ids), context)


def _call(self: Task[Any, Any], *args: Any, **kwargs: Any) -> Any:
    """Task.__call__ while instrumented: the task body in the publisher's context.

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
    if self.app not in _apps:
        return self.run(*args, **kwargs)
    token = otel_context.attach(_task_context(self))
    try:
        return self.run(*args, **kwargs)
    finally:
        otel_context.detach(token)


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
    threads, prefork, solo...), the body of each task of ``app`` runs with
    the publisher's span as its parent (or under OpenTelemetry's task span
    when its instrumentation is on), the allowlisted correlation IDs bound,
    and ``task_id`` and ``task_name`` bound; invalid incoming values are
    dropped and counted in :func:`threadctx.propagation_stats`.  The thread
    is left as it was after each task.

    .. versionadded:: 0.1.0
    """
    global _original_call  # noqa: PLW0603 - one process-wide patch
    with _lock:
        if not _apps:
            for signal, receiver in _HOOKS:
                signal.connect(receiver, weak=False, dispatch_uid=f"threadctx.celery.{receiver.__name__}")
            if _original_call is None:
                _original_call = Task.__call__
            # A __call__ from a module other than celery.app.task makes Celery's
            # worker call the task object (not task.run) for every task: that is
            # what lets the body run in the context.
            Task.__call__ = _call  # type: ignore[method-assign]
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


def is_instrumented(app: Celery) -> bool:
    """Whether :func:`instrument` is in force for ``app``."""
    return app in _apps
