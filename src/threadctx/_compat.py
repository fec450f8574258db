"""Every use of another library's private internals, in one place, each behind a probe.

threadctx reaches a few internals of the standard library, OpenTelemetry, wrapt,
Flask's instrumentor and Celery where nothing public does the job. Each is named
here with what happens when an upstream release moves it: a fallback that keeps
threadctx working (with what it then loses said beside it), or a clear error at
instrument time. ``tests/test_compat.py`` runs each fallback with its probe forced
off, and CI runs the suite on the newest upstream releases (``make pytest-newest``),
so that a move shows up there first.

The bottom layer: it imports nothing of threadctx's, and only the standard
library and ``opentelemetry.context.context`` at import time (it is loaded while
``opentelemetry.context`` is still being imported, through the entry point);
everything else is looked up when it is used.
"""

from __future__ import annotations

import importlib
import sys
import threading
import types
from abc import ABC, abstractmethod
from collections.abc import Callable
from contextvars import Token
from types import ModuleType
from typing import TYPE_CHECKING, Any

from opentelemetry.context import context as _otel_context_module

if TYPE_CHECKING:
    from opentelemetry.context.context import Context

__all__ = [
    "FLASK_OTEL_SPAN",
    "FLASK_OTEL_STARTED",
    "OTEL_GRPC_SERVER",
    "OTEL_INSTRUMENTED",
    "OTEL_THREAD_CONTEXT",
    "RuntimeContext",
    "active_thread",
    "active_threads",
    "baggage_key",
    "celery_tracer_modules",
    "composite_members",
    "flask_otel_keys",
    "is_wrapt_proxy",
    "rewrap_otel_grpc_behavior",
    "runtime_context",
    "serves_many",
    "span_key",
]

# ---------------------------------------------------------------------------
# OpenTelemetry's API


class _RuntimeContextBase(ABC):
    """What OpenTelemetry's ``_RuntimeContext`` declares, for an API that no longer has it by that name.

    OpenTelemetry loads the ``opentelemetry_context`` entry point and calls these
    three methods: it checks no base class.
    """

    @abstractmethod
    def attach(self, context: Context) -> Token[Context]:
        """Make ``context`` current; return a token that restores the previous one."""

    @abstractmethod
    def get_current(self) -> Context:
        """The current context."""

    @abstractmethod
    def detach(self, token: Token[Context]) -> None:
        """Restore the context that ``token`` saved."""


# The base class of runtime contexts: OpenTelemetry's ``_RuntimeContext``, else an ABC of the same
# three methods (the entry point still works: OpenTelemetry only calls them).
if TYPE_CHECKING:
    from opentelemetry.context.context import _RuntimeContext as RuntimeContext
else:
    RuntimeContext = getattr(_otel_context_module, "_RuntimeContext", None) or _RuntimeContextBase


def runtime_context() -> object | None:
    """The runtime context OpenTelemetry's API uses (its ``_RUNTIME_CONTEXT``), or None if unknown.

    Fallback (None): ``_snapshot.foreign_runtime`` tells threadctx's own from
    another by whether OpenTelemetry's current context is threadctx's (it then
    cannot name the other one's class).
    """
    otel_context = sys.modules.get("opentelemetry.context")
    return getattr(otel_context, "_RUNTIME_CONTEXT", None)


def span_key() -> str:
    """The context key ``trace.get_current_span()`` reads (``_SPAN_KEY``), or ``""`` where the API has none.

    Fallback (``""``): the logging filter calls ``trace.get_current_span(context)``,
    which costs a call more per new context. Call it once ``opentelemetry.trace``
    can be imported (not while ``opentelemetry.context`` is still initialising).
    """
    try:
        from opentelemetry.trace.propagation import _SPAN_KEY
    except ImportError:
        return ""
    return _SPAN_KEY if isinstance(_SPAN_KEY, str) else ""


def baggage_key() -> str:
    """The context key of OpenTelemetry's baggage (``_BAGGAGE_KEY``), or ``""`` where the API has none.

    Reading it from a context (a dict) tells whether there is baggage without
    ``baggage.get_all()``'s three calls and read-only copy, on every request.
    Fallback (``""``): the callers use ``baggage.get_all()``.
    """
    try:
        from opentelemetry.baggage import _BAGGAGE_KEY
    except ImportError:
        return ""
    return _BAGGAGE_KEY if isinstance(_BAGGAGE_KEY, str) else ""


def composite_members(propagator: object) -> list[object] | None:
    """The propagators a ``CompositePropagator`` runs, in order (its ``_propagators``), or ``None``.

    ``None`` also for any other propagator. Fallback (the attribute moved): ``None``, and
    :class:`threadctx.CorrelationPropagator` no longer warns when OpenTelemetry's
    ``baggage`` propagator runs after it (and overwrites what it wrote).
    """
    members = getattr(propagator, "_propagators", None)
    return list(members) if isinstance(members, (list, tuple)) else None


#: Set to True on an application by OpenTelemetry's Flask and ASGI instrumentors. No probe: it
#: only decides whether a middleware warns that it wraps an instrumentor (no warning if it moves).
OTEL_INSTRUMENTED = "_is_instrumented_by_opentelemetry"

#: Where OpenTelemetry's ThreadingInstrumentor notes the context a started thread is to run in, which
#: instrument_threading() replaces for the standard library's helper threads. No probe (its module
#: may not be imported): the test beside ThreadingInstrumentor fails when it moves.
OTEL_THREAD_CONTEXT = "_otel_context"

#: What FlaskInstrumentor leaves in the environ: the start time (its WSGI wrapper), the span (its hook).
FLASK_OTEL_STARTED = "opentelemetry-flask.starttime_key"
FLASK_OTEL_SPAN = "opentelemetry-flask.span_key"

#: The module of OpenTelemetry's gRPC server interceptor (``opentelemetry-instrumentation-grpc``).
OTEL_GRPC_SERVER = "opentelemetry.instrumentation.grpc._server"


def flask_otel_keys() -> tuple[str, str]:
    """FlaskInstrumentor's environ keys (start time, span), read from its module where it has them.

    Fallback: the names it has used so far (:data:`FLASK_OTEL_STARTED`, :data:`FLASK_OTEL_SPAN`).
    """
    module = sys.modules.get("opentelemetry.instrumentation.flask")
    started = getattr(module, "_ENVIRON_STARTTIME_KEY", None)
    span = getattr(module, "_ENVIRON_SPAN_KEY", None)
    if isinstance(started, str) and isinstance(span, str):
        return started, span
    return FLASK_OTEL_STARTED, FLASK_OTEL_SPAN


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


# ---------------------------------------------------------------------------
# The standard library

#: ``threading._active``: ident -> Thread, read without threading's lock.
_ACTIVE: dict[int, threading.Thread] | None = getattr(threading, "_active", None)
if not isinstance(_ACTIVE, dict):  # pragma: no cover - every CPython and PyPy so far has it
    _ACTIVE = None


def active_threads() -> dict[int, threading.Thread]:
    """The threads ``threading`` knows, by ident, without taking its lock.

    ``threading.enumerate()`` takes a lock that an interrupted thread may
    hold, which would deadlock a signal handler; a copy of the dict it reads
    is atomic.

    Fallback (no ``threading._active``): an empty dict, never the lock. Snapshots and
    reports then name threads ``<thread IDENT>`` and cannot tell daemon threads.
    """
    active = _ACTIVE
    return active.copy() if active is not None else {}


def active_thread(ident: int) -> threading.Thread | None:
    """The thread ``threading`` knows by ``ident``, or None; without its lock, as :func:`active_threads`.

    Fallback (no ``threading._active``): None, as for a thread ``threading`` does not know.
    """
    active = _ACTIVE
    return active.get(ident) if active is not None else None


#: The targets of the standard library's helper threads that serve many callers, as (module, path):
#: each is looked up when used, and one that is missing is skipped.
_HELPER_TARGETS = (
    ("concurrent.futures.thread", "_worker"),
    ("multiprocessing.pool", "worker"),
    ("multiprocessing.pool", "Pool._handle_workers"),
    ("multiprocessing.pool", "Pool._handle_tasks"),
    ("multiprocessing.pool", "Pool._handle_results"),
    ("multiprocessing.queues", "Queue._feed"),
)


def _lookup(module_name: str, path: str) -> Any:
    """``module.path`` if that module is imported and has it, else None."""
    found: Any = sys.modules.get(module_name)
    for name in path.split("."):
        found = getattr(found, name, None)
    return found


def serves_many(thread: threading.Thread) -> bool:
    """Whether ``thread`` is one of the standard library's long-lived helper threads.

    They serve many callers (pool workers, a pool's task and result
    handlers, a queue's feeder, a process pool's manager, a logging queue's
    listener), so they start
    with an empty context rather than the context of whichever caller
    happened to create them.  Only modules already imported are looked at:
    a thread cannot target a function that was never loaded.

    Fallback: a helper whose target (or ``Thread._target``) has moved is not
    recognised, and starts in its creator's context, as any thread does.
    """
    target: Any = getattr(thread, "_target", None)
    if target is not None:
        for module_name, path in _HELPER_TARGETS:
            if target is _lookup(module_name, path):
                return True
        monitor = _lookup("logging.handlers", "QueueListener._monitor")
        if monitor is not None and getattr(target, "__func__", None) is monitor:
            return True  # it handles every thread's records
    # A subclass with a run of its own, no target.
    manager = _lookup("concurrent.futures.process", "_ExecutorManagerThread")
    return isinstance(manager, type) and isinstance(thread, manager)


# ---------------------------------------------------------------------------
# wrapt (OpenTelemetry's instrumentors patch with its proxies)


def is_wrapt_proxy(value: object) -> bool:
    """Whether ``value`` is a wrapt proxy whose ``__wrapped__`` can be followed and replaced.

    Fallback (no ``ObjectProxy`` in wrapt): nothing is a proxy, and instrument_threading()
    puts its patch above another instrumentor's instead of beneath it (each still
    carries the context; only removing them in any order is lost).
    """
    wrapt = sys.modules.get("wrapt")
    if wrapt is None:
        return False
    kinds = tuple(
        kind
        for kind in (getattr(wrapt, "BaseObjectProxy", None), getattr(wrapt, "ObjectProxy", None))
        if isinstance(kind, type)
    )
    return bool(kinds) and isinstance(value, kinds)


# ---------------------------------------------------------------------------
# Celery

#: Modules whose ``build_tracer`` Celery calls: its own (pools, ``Task.apply``) and the consumer's copy.
CELERY_TRACER_SITES = ("celery.app.trace", "celery.worker.consumer.consumer")


def celery_tracer_modules(*, required: bool = True) -> list[ModuleType]:
    """The modules whose ``build_tracer`` threadctx.celery replaces.

    ``celery.app.trace.build_tracer`` is ``required`` (at instrument time); the worker
    consumer's copy is skipped when that module or its copy is gone.

    Raises:
        RuntimeError: ``required``, and this Celery has no ``celery.app.trace.build_tracer``.
    """
    modules = []
    for index, site in enumerate(CELERY_TRACER_SITES):
        try:
            module = importlib.import_module(site)
        except ImportError:
            module = None
        if module is not None and callable(getattr(module, "build_tracer", None)):
            modules.append(module)
        elif index == 0 and required:
            raise RuntimeError(
                f"threadctx.celery cannot instrument this Celery: {site}.build_tracer, which runs each "
                "task, is missing (a Celery release threadctx does not know yet)"
            )
    return modules
