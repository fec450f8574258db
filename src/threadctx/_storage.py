"""Per-thread storage, the registry that other threads can read, and how their contexts are read.

Each thread gets one ``_ThreadState`` the first time it touches threadctx.
The state is reached through a ``threading.local`` (never through the thread
ident, which CPython reuses), so a new thread can never pick up a dead
thread's state.  The registry maps a key unique to the state to a weak
reference; when a thread ends, ``threading.local`` drops its state and the
weak reference's callback removes the entry.

The registry has no lock: inserting, popping and copying a dict are each
atomic in CPython (under the GIL, and under the per-object lock of
free-threaded builds).  There is therefore no lock that a thread could hold
at the moment of a ``fork`` or of a signal.

Each thread's current OpenTelemetry context is the value of ``_runtime.CURRENT`` in
the ``contextvars.Context`` the thread runs in.  Other threads read it in one
of two ways:

- the compiled reader (``threadctx._ctxread``) reads ``CURRENT`` in every
  thread's current context, under the GIL: exact, also inside
  ``contextvars.Context.run`` and after it returns, and for threads that
  never touched threadctx but run in a context that holds one (Python 3.14's
  ``thread_inherit_context``);
- without it (not built, a free-threaded build, or ``THREADCTX_PURE_PYTHON=1``),
  the mirror: ``attach``/``detach`` write the new context into the thread's
  state, and readers read that.  It cannot know when ``Context.run`` returns.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.context.context import Context

__all__ = [
    "ThreadSnapshot",
    "current_state",
    "delete_thread_storage",
    "get_thread_storage",
    "snapshot",
]


_Reader = Callable[[ContextVar["Context"]], dict[int, tuple[int, "Context"]]]


def _load_reader() -> _Reader | None:
    if os.environ.get("THREADCTX_PURE_PYTHON", "") not in ("", "0"):
        return None
    try:
        from threadctx._ctxread import contexts  # type: ignore[import-not-found,unused-ignore]
    except ImportError:  # not built (no compiler), or a free-threaded build
        return None
    return contexts  # type: ignore[no-any-return,unused-ignore]


#: The compiled reader where it is built and allowed; None means the mirror.
_LOADED_READER = _load_reader()
_read_contexts: _Reader | None = _LOADED_READER


def use_reader(enabled: bool) -> None:
    """Use the compiled reader where it is loaded (``enabled``), else the mirror; see ``_runtime``."""
    global _read_contexts  # noqa: PLW0603 - set once at import, and by tests between threads' lives
    _read_contexts = _LOADED_READER if enabled else None


def reader_in_use() -> bool:
    """Whether other threads' contexts are read by the compiled reader (else: from the mirror)."""
    return _read_contexts is not None


class _ThreadState:
    """What threadctx keeps for one thread."""

    __slots__ = ("__weakref__", "alive", "context", "generation", "ident", "key", "native_id", "storage")

    def __init__(self, alive: weakref.ref[_Alive]) -> None:
        #: Returns None once the thread has ended (see ``_Local``).
        self.alive = alive
        self.ident: int = threading.get_ident()
        self.native_id: int = threading.get_native_id()
        #: Without the compiled reader only: the OpenTelemetry context this
        #: thread attached last (a mirror of CURRENT, the source of truth).
        self.context: Context | None = None
        self.storage: dict[str, Any] | None = None
        self.key: int = id(self)
        #: Orders states that share an ident (see ``live_states``).
        self.generation: int = next(_generations)


class _Alive:
    """Lives exactly as long as its thread's ``threading.local`` data: a liveness marker."""

    __slots__ = ("__weakref__",)


_generations = itertools.count()

#: key -> weak reference to the state of a live thread.
_registry: dict[int, weakref.ref[_ThreadState]] = {}


def _forget(ref: weakref.ref[_ThreadState], key: int) -> None:
    # Pop only if the entry is still this reference: a key is unique among
    # live states, and this runs when the state dies, so nothing else can
    # have taken the key yet; the identity check costs nothing and keeps the
    # invariant explicit.
    if _registry.get(key) is ref:
        _registry.pop(key, None)


class _Local(threading.local):
    """Runs ``__init__`` once in each thread, on that thread's first access."""

    def __init__(self) -> None:
        # The marker is referenced by this thread's local data only, so it dies
        # when the thread ends, even if something else keeps the state alive.
        self.alive = _Alive()
        state = _ThreadState(weakref.ref(self.alive))
        key = state.key
        _registry[key] = weakref.ref(state, lambda ref: _forget(ref, key))
        self.state = state


_local = _Local()


def current_state() -> _ThreadState:
    """The calling thread's state, created on first use."""
    return _local.state


def get_thread_storage() -> dict[str, Any]:
    """Return the calling thread's private dict, creating it on first use.

    The dict belongs to the calling thread only: no other thread gets it, and
    it is deleted when its thread ends (normal, daemon, ``_thread`` and
    C-started threads alike).  A thread that reuses a dead thread's ident
    starts with a new, empty dict.

    Other threads can see which threads hold storage through :func:`snapshot`,
    but never the dict itself.
    """
    state = _local.state
    storage = state.storage
    if storage is None:
        storage = state.storage = {}
    return storage


def delete_thread_storage() -> None:
    """Delete the calling thread's private dict now, before the thread ends.

    The next :func:`get_thread_storage` call in this thread starts a new,
    empty dict.  The thread's OpenTelemetry context is not touched.
    """
    _local.state.storage = None


@dataclass(frozen=True)
class ThreadSnapshot:
    """What one live thread holds, as seen by :func:`snapshot`.

    Attributes:
        thread_id: The thread's ident (``threading.get_ident()``).
        native_id: The operating system's thread id.
        name: The ``threading.Thread`` name, or ``"<thread IDENT>"`` for a
            thread that ``threading`` does not know (started from C or with
            ``_thread``).
        trace_id: The current span's trace id, 32 lowercase hex digits, or
            ``None`` without a valid span.
        span_id: The current span's id, 16 lowercase hex digits, or ``None``.
        span_name: The span's name where the span has one (SDK spans).
        correlation: The thread's correlation IDs, read-only.
        has_storage: Whether the thread holds a :func:`get_thread_storage` dict.
        span_started_at: When the current span started, in seconds since the
            epoch (``time.time()``), for spans that know it (SDK spans);
            ``None`` otherwise.

            .. versionadded:: 0.2.0
        elapsed: Seconds since ``span_started_at`` when the snapshot was
            taken, or ``None``.

            .. versionadded:: 0.2.0
    """

    thread_id: int
    native_id: int
    name: str
    trace_id: str | None
    span_id: str | None
    span_name: str | None
    correlation: Mapping[str, str]
    has_storage: bool
    span_started_at: float | None = None
    elapsed: float | None = None
    #: The context described, for threadctx's own tools (the watchdog logs in it).
    _context: Context | None = field(default=None, repr=False, compare=False)


_EMPTY: Mapping[str, str] = MappingProxyType({})


#: Whether the warning about a runtime context other than threadctx's was given.
_warned_foreign_runtime = False


def _foreign_runtime() -> str | None:
    """The class name of OpenTelemetry's runtime context when it is not threadctx's, else None."""
    from opentelemetry import context as otel_context

    from threadctx._runtime import ThreadRuntimeContext

    runtime = otel_context._RUNTIME_CONTEXT
    return None if isinstance(runtime, ThreadRuntimeContext) else type(runtime).__name__


def _warn_if_foreign_runtime(stacklevel: int = 2) -> None:
    """Warn once per process when OpenTelemetry does not use threadctx's runtime context.

    Then no thread publishes its context, so :func:`snapshot`, ``dump()``, the
    watchdog and the metrics see only the calling thread's.
    """
    global _warned_foreign_runtime  # noqa: PLW0603 - once per process
    if _warned_foreign_runtime:
        return
    runtime = _foreign_runtime()
    if runtime is None:
        return
    _warned_foreign_runtime = True
    warnings.warn(
        f"OpenTelemetry's runtime context is {runtime}, not threadctx's: snapshot(), "
        "dump(), the watchdog and the metrics see only the calling thread's context. Set "
        "OTEL_PYTHON_CONTEXT=threadctx in the environment before OpenTelemetry is first imported "
        "(see the operations page of threadctx's documentation).",
        RuntimeWarning,
        stacklevel=stacklevel + 1,
    )


def _describe(state: LiveThread, context: Context | None, name: str) -> ThreadSnapshot:
    """Describe one thread whose current context is ``context``."""
    trace_id = span_id = span_name = None
    started_at = elapsed = None
    correlation: Mapping[str, str] = _EMPTY
    if context is not None:
        # Imported here: this module is loaded while opentelemetry.context is
        # still initialising (entry point), when opentelemetry.trace can't be.
        from opentelemetry import trace

        from threadctx._correlation import correlation as correlation_of

        span = trace.get_current_span(context)
        span_context = span.get_span_context()
        if span_context.is_valid:
            trace_id = format(span_context.trace_id, "032x")
            span_id = format(span_context.span_id, "016x")
            span_name = getattr(span, "name", None)
            start_ns = getattr(span, "start_time", None)  # SDK spans: nanoseconds since the epoch
            if isinstance(start_ns, int) and start_ns > 0:
                started_at = start_ns / 1e9
                elapsed = max(0.0, time.time() - started_at)
        correlation = correlation_of(context)
    return ThreadSnapshot(
        thread_id=state.ident,
        native_id=state.native_id,
        name=name,
        trace_id=trace_id,
        span_id=span_id,
        span_name=span_name,
        correlation=correlation,
        has_storage=state.storage is not None,
        span_started_at=started_at,
        elapsed=elapsed,
        _context=context,
    )


class LiveThread:
    """One live thread as a reader saw it: what ``snapshot()`` and ``dump()`` describe."""

    __slots__ = ("context", "ident", "native_id", "storage")

    def __init__(
        self, ident: int, native_id: int, storage: dict[str, Any] | None, context: Context | None
    ) -> None:
        self.ident = ident
        self.native_id = native_id
        self.storage = storage
        #: The thread's current OpenTelemetry context; None where it has none.
        self.context = context


def _newest_states() -> dict[int, _ThreadState]:
    newest: dict[int, _ThreadState] = {}
    for ref in _registry.copy().values():  # copy(): atomic, so no lock needed
        state = ref()
        if state is None or state.alive() is None:
            continue
        seen = newest.get(state.ident)
        # A state whose clean-up is still pending can share its ident with a
        # newer thread: keep the one created last (the higher generation).
        if seen is None or state.generation > seen.generation:
            newest[state.ident] = state
    return newest


def live_states() -> dict[int, LiveThread]:
    """Each live thread that holds a context or a registry state, by ident.

    With the compiled reader, a thread's context is the one it runs in now,
    read from the interpreter, and a thread is listed also without a state of
    its own (it may run in a context it inherited or was handed); without it,
    the context is the state's mirror.  For a reused ident, the newest state
    wins.  Liveness comes from each state's marker, not from
    ``sys._current_frames()``, which materialises every thread's frames
    (costly, and it has crashed CPython 3.11 under heavy thread churn).
    """
    states = _newest_states()
    reader = _read_contexts
    if reader is None:
        return {
            ident: LiveThread(ident, state.native_id, state.storage, state.context)
            for ident, state in states.items()
        }
    from threadctx._runtime import CURRENT  # here: _runtime imports this module

    contexts = reader(CURRENT)
    live = {}
    for ident, state in states.items():
        entry = contexts.pop(ident, None)
        live[ident] = LiveThread(ident, state.native_id, state.storage, None if entry is None else entry[1])
    if contexts:
        threads = known_threads()
        for ident, (read_native_id, context) in contexts.items():
            # Python 3.10's thread states carry no native id: threading knows it where it knows the thread.
            native_id = read_native_id or getattr(threads.get(ident), "native_id", None) or 0
            live[ident] = LiveThread(ident, native_id, None, context)
    return live


def known_threads() -> dict[int, threading.Thread]:
    """The threads ``threading`` knows, by ident, without taking its lock.

    ``threading.enumerate()`` takes a lock that an interrupted thread may
    hold, which would deadlock a signal handler; a copy of the dict it reads
    is atomic.
    """
    return threading._active.copy()  # type: ignore[attr-defined,no-any-return]


def snapshot() -> list[ThreadSnapshot]:
    """Describe every live thread that holds a non-empty context or storage, and the calling thread.

    Safe to call from any thread at any time, also while threads start and
    stop, and from a signal handler; it takes no lock and never raises for a
    thread that ends meanwhile.
    The calling thread is described from its current context.  Other threads
    are described from the context they run in at this moment where the
    compiled reader is in use (for a thread that runs an asyncio loop, the
    running task's, else the loop's own); elsewhere (a free-threaded build,
    or no compiler at install time) from the context they attached last.
    """
    _warn_if_foreign_runtime()
    # Imported here for the same reason as in _describe.
    from opentelemetry import context as otel_context

    threads = known_threads()
    me = threading.get_ident()
    result = []
    for live in live_states().values():
        context: Context | None
        if live.ident == me:
            context = otel_context.get_current()
        else:
            context = live.context
            # No context, or an empty one (a thread that inherited or restored an empty
            # context, under Python 3.14's thread_inherit_context too): nothing to show.
            if not context and live.storage is None:
                continue
        thread = threads.get(live.ident)
        name = thread.name if thread is not None else f"<thread {live.ident}>"
        result.append(_describe(live, context, name))
    result.sort(key=lambda entry: entry.thread_id)
    return result


def _after_fork_in_child() -> None:
    """Keep only the forking thread's entry; the other threads are gone."""
    state = _local.state
    state.ident = threading.get_ident()
    state.native_id = threading.get_native_id()
    for key in list(_registry):
        if key != state.key:
            _registry.pop(key, None)


if hasattr(os, "register_at_fork"):  # pragma: no branch - absent on Windows only
    os.register_at_fork(after_in_child=_after_fork_in_child)
