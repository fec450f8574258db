"""Per-thread storage and the registry that other threads can read (the mirror of their contexts too).

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

Without the compiled reader (see ``_current``), each state also mirrors its
thread's current OpenTelemetry context: ``attach``/``detach`` write it there,
and :func:`live_states` reads it.
"""

from __future__ import annotations

import contextvars
import itertools
import os
import threading
import weakref
from collections.abc import Callable, MutableMapping
from typing import TYPE_CHECKING, Any

from threadctx import _current
from threadctx._compat import active_thread, active_threads

if TYPE_CHECKING:
    from opentelemetry.context.context import Context

__all__ = [
    "LiveThread",
    "OwnThread",
    "at_fork_in_child",
    "delete_thread_storage",
    "get_thread_storage",
    "live_states",
    "local",
    "new_locks_in_child",
]


class _ThreadState:
    """What threadctx keeps for one thread."""

    __slots__ = ("__weakref__", "alive", "context", "generation", "ident", "key", "native_id", "storage")

    def __init__(self, alive: weakref.ref[_Alive]) -> None:
        #: Returns None once the thread has ended (see ``_Local``).
        self.alive = alive
        self.ident: int = threading.get_ident()
        self.native_id: int = threading.get_native_id()
        #: Without the compiled reader only: the OpenTelemetry context this
        #: thread attached last (a mirror of ``_current.CURRENT``, the source of truth).
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


class OwnThread(threading.Thread):
    """A daemon thread of threadctx's own (the dump's log thread, the watchdog).

    It runs ``target`` in a new, empty ``contextvars.Context``, whatever the
    context it was started in (Python 3.14's ``thread_inherit_context``,
    ``instrument_threading()``): it serves no request.  It is never in the
    registry and never listed by :func:`live_states`, whatever it attaches
    (the watchdog logs in a stuck thread's context), so a forked child's
    registry holds the forking thread alone.  A forked child has none of
    them: each owner starts its own again through :func:`at_fork_in_child`.
    """

    def __init__(self, target: Callable[[], None], name: str) -> None:
        super().__init__(target=contextvars.Context().run, args=(target,), name=name, daemon=True)


def _is_own(thread: threading.Thread | None) -> bool:
    return isinstance(thread, OwnThread)


class _Local(threading.local):
    """Runs ``__init__`` once in each thread, on that thread's first access."""

    def __init__(self) -> None:
        # The marker is referenced by this thread's local data only, so it dies
        # when the thread ends, even if something else keeps the state alive.
        self.alive = _Alive()
        state = _ThreadState(weakref.ref(self.alive))
        key = state.key
        if not _is_own(active_thread(state.ident)):  # threadctx's own threads are never listed
            _registry[key] = weakref.ref(state, lambda ref: _forget(ref, key))
        self.state = state


local = _Local()


def get_thread_storage() -> dict[str, Any]:
    """Return the calling thread's private dict, creating it on first use.

    The dict belongs to the calling thread only: no other thread gets it, and
    it is deleted when its thread ends (normal, daemon, ``_thread`` and
    C-started threads alike).  A thread that reuses a dead thread's ident
    starts with a new, empty dict.

    Other threads can see which threads hold storage through :func:`snapshot`,
    but never the dict itself.

    .. versionadded:: 0.1.0
    """
    state = local.state
    storage = state.storage
    if storage is None:
        storage = state.storage = {}
    return storage


def delete_thread_storage() -> None:
    """Delete the calling thread's private dict now, before the thread ends.

    The next :func:`get_thread_storage` call in this thread starts a new,
    empty dict.  The thread's OpenTelemetry context is not touched.

    .. versionadded:: 0.1.0
    """
    local.state.storage = None


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
    contexts = _current.read_contexts()
    if contexts is None:
        return {
            ident: LiveThread(ident, state.native_id, state.storage, state.context)
            for ident, state in states.items()
        }
    live = {}
    for ident, state in states.items():
        entry = contexts.pop(ident, None)
        live[ident] = LiveThread(ident, state.native_id, state.storage, None if entry is None else entry[1])
    if contexts:
        threads = active_threads()
        for ident, (read_native_id, context) in contexts.items():
            if _is_own(threads.get(ident)):
                continue  # threadctx's own: the watchdog holds a stuck thread's context while it logs
            # Python 3.10's thread states carry no native id: threading knows it where it knows the thread.
            native_id = read_native_id or getattr(threads.get(ident), "native_id", None) or 0
            live[ident] = LiveThread(ident, native_id, None, context)
    return live


#: Each owner's way to start its threads again in a forked child; see at_fork_in_child.
_restarts: list[Callable[[], None]] = []


def at_fork_in_child(restart: Callable[[], None]) -> None:
    """Call ``restart`` in a forked child, once the registry holds only the forking thread.

    The one way threadctx's modules restart their :class:`OwnThread` threads
    after ``fork``: the registry is cleaned first, whatever order the modules
    were imported in, then each ``restart`` runs in the order given.
    """
    _restarts.append(restart)


#: (a module's globals, the names of its locks) to renew in a forked child; see new_locks_in_child.
_locks: list[tuple[MutableMapping[str, Any], tuple[str, ...]]] = []


def new_locks_in_child(namespace: MutableMapping[str, Any], *names: str) -> None:
    """Give a forked child new ``threading.Lock`` objects under ``names`` in ``namespace``.

    ``namespace`` is a module's ``globals()``, whose functions look their locks up when they
    run. A thread that held one when another thread forked does not exist in the child, and
    the child's copy would stay locked for good: its first caller would hang.
    """
    _locks.append((namespace, names))


def _after_fork_in_child() -> None:
    """Keep only the forking thread's entry (the other threads are gone), then restart threadctx's own."""
    for namespace, names in _locks:  # first: a restart may need one
        for name in names:
            namespace[name] = threading.Lock()
    state = local.state
    state.ident = threading.get_ident()
    state.native_id = threading.get_native_id()
    for key in list(_registry):
        if key != state.key:
            _registry.pop(key, None)
    for restart in _restarts:
        restart()


if hasattr(os, "register_at_fork"):  # pragma: no branch - absent on Windows only
    os.register_at_fork(after_in_child=_after_fork_in_child)
