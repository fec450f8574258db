"""Every use of another library's private internals, in one place.

threadctx reaches a few internals of the standard library, OpenTelemetry, wrapt,
Flask's instrumentor and Celery where nothing public does the job. Each is named
here, so that an upstream release that moves one breaks one known place.

The bottom layer: it imports nothing of threadctx's, and only the standard
library and ``opentelemetry.context.context`` at import time (it is loaded while
``opentelemetry.context`` is still being imported, through the entry point);
everything else is looked up when it is used.
"""

from __future__ import annotations

import sys
import threading
import types
from collections.abc import Callable
from typing import Any

from opentelemetry.context.context import _RuntimeContext as RuntimeContext

__all__ = [
    "CELERY_TRACER_SITES",
    "FLASK_OTEL_SPAN",
    "FLASK_OTEL_STARTED",
    "OTEL_GRPC_SERVER",
    "OTEL_INSTRUMENTED",
    "OTEL_THREAD_CONTEXT",
    "RuntimeContext",
    "active_thread",
    "active_threads",
    "baggage_key",
    "is_wrapt_proxy",
    "rewrap_otel_grpc_behavior",
    "runtime_context",
    "serves_many",
    "span_key",
]

#: Set to True on an application by OpenTelemetry's Flask and ASGI instrumentors.
OTEL_INSTRUMENTED = "_is_instrumented_by_opentelemetry"

#: Where OpenTelemetry's ThreadingInstrumentor notes the context a started thread is to run in.
OTEL_THREAD_CONTEXT = "_otel_context"

#: What FlaskInstrumentor leaves in the environ: the start time (its WSGI wrapper), the span (its hook).
FLASK_OTEL_STARTED = "opentelemetry-flask.starttime_key"
FLASK_OTEL_SPAN = "opentelemetry-flask.span_key"

#: The module of OpenTelemetry's gRPC server interceptor (``opentelemetry-instrumentation-grpc``).
OTEL_GRPC_SERVER = "opentelemetry.instrumentation.grpc._server"

#: Modules whose ``build_tracer`` Celery calls: its own (pools, ``Task.apply``) and the consumer's copy.
CELERY_TRACER_SITES = ("celery.app.trace", "celery.worker.consumer.consumer")


def active_threads() -> dict[int, threading.Thread]:
    """The threads ``threading`` knows, by ident, without taking its lock.

    ``threading.enumerate()`` takes a lock that an interrupted thread may
    hold, which would deadlock a signal handler; a copy of the dict it reads
    is atomic.
    """
    return threading._active.copy()  # type: ignore[attr-defined,no-any-return]


def active_thread(ident: int) -> threading.Thread | None:
    """The thread ``threading`` knows by ``ident``, or None; without its lock, as active_threads()."""
    return threading._active.get(ident)  # type: ignore[attr-defined,no-any-return]


def runtime_context() -> object:
    """The runtime context OpenTelemetry's API uses (``opentelemetry.context._RUNTIME_CONTEXT``)."""
    from opentelemetry import context as otel_context

    return otel_context._RUNTIME_CONTEXT


def span_key() -> str:
    """The context key ``trace.get_current_span()`` reads, or ``""`` where the API has none.

    Call it once ``opentelemetry.trace`` can be imported (not while ``opentelemetry.context``
    is still initialising).
    """
    try:
        from opentelemetry.trace.propagation import _SPAN_KEY
    except ImportError:  # pragma: no cover - a future opentelemetry-api without it: use the public call
        return ""
    return _SPAN_KEY


def baggage_key() -> str:
    """The context key OpenTelemetry's baggage lives under, or ``""`` where the API has none.

    Reading it from a context (a dict) tells whether there is baggage without
    ``baggage.get_all()``'s three calls and read-only copy, on every request.
    """
    try:
        from opentelemetry.baggage import _BAGGAGE_KEY
    except ImportError:  # pragma: no cover - a future opentelemetry-api without it: use the public call
        return ""
    return _BAGGAGE_KEY


def is_wrapt_proxy(value: object) -> bool:
    """Whether ``value`` is a wrapt proxy (what OpenTelemetry's instrumentors patch with)."""
    wrapt = sys.modules.get("wrapt")
    if wrapt is None:
        return False
    kinds = tuple(kind for kind in (getattr(wrapt, "BaseObjectProxy", None), wrapt.ObjectProxy) if kind)
    return isinstance(value, kinds)


def serves_many(thread: threading.Thread) -> bool:
    """Whether ``thread`` is one of the standard library's long-lived helper threads.

    They serve many callers (pool workers, a pool's task and result
    handlers, a queue's feeder, a process pool's manager, a logging queue's
    listener), so they start
    with an empty context rather than the context of whichever caller
    happened to create them.  Only modules already imported are looked at:
    a thread cannot target a function that was never loaded.
    """
    target: Any = getattr(thread, "_target", None)
    futures_thread = sys.modules.get("concurrent.futures.thread")
    if futures_thread is not None and target is futures_thread._worker:
        return True
    pool = sys.modules.get("multiprocessing.pool")
    if pool is not None and target in (
        pool.worker,
        pool.Pool._handle_workers,
        pool.Pool._handle_tasks,
        pool.Pool._handle_results,
    ):
        return True
    queues = sys.modules.get("multiprocessing.queues")
    if queues is not None and target is queues.Queue._feed:
        return True
    handlers = sys.modules.get("logging.handlers")
    if handlers is not None and getattr(target, "__func__", None) is handlers.QueueListener._monitor:
        return True  # it handles every thread's records
    process = sys.modules.get("concurrent.futures.process")
    manager = getattr(process, "_ExecutorManagerThread", None)
    return manager is not None and isinstance(thread, manager)


def rewrap_otel_grpc_behavior(
    behavior: Callable[..., Any], wrap: Callable[[Callable[..., Any]], Callable[..., Any]]
) -> Callable[..., Any] | None:
    """OpenTelemetry's gRPC handler wrapper rebuilt over ``wrap(what it runs)``; ``None`` if it is not one.

    OpenTelemetry's server interceptor wraps a handler's behaviour in a closure
    over it, a free variable named ``behavior`` (``telemetry_interceptor``, in
    ``opentelemetry-instrumentation-grpc`` up to at least 0.66b1). The same
    function is rebuilt with that variable bound to the wrapped behaviour: its
    own code runs unchanged, with ``wrap``'s wrapper inside its SERVER span.
    """
    if not (
        isinstance(behavior, types.FunctionType)
        and behavior.__closure__ is not None
        and "behavior" in behavior.__code__.co_freevars
    ):
        return None
    cells = list(behavior.__closure__)
    index = behavior.__code__.co_freevars.index("behavior")
    inner = cells[index].cell_contents
    if not callable(inner):
        return None
    cells[index] = types.CellType(wrap(inner))
    code, name, defaults = behavior.__code__, behavior.__name__, behavior.__defaults__
    return types.FunctionType(code, behavior.__globals__, name, defaults, tuple(cells))
