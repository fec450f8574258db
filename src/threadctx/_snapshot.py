"""What every live thread holds, as a list of values: :class:`ThreadSnapshot` and :func:`snapshot`.

It reads the registry (``_storage``) and, with the compiled reader, each thread's
current context (``_current``); the operator's tools (``_ops``) build on it.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from threadctx._compat import active_threads, runtime_context
from threadctx._correlation import correlation as correlation_of
from threadctx._current import CURRENT
from threadctx._runtime import ThreadRuntimeContext
from threadctx._storage import LiveThread, live_states

if TYPE_CHECKING:
    from opentelemetry.context.context import Context

__all__ = [
    "ThreadSnapshot",
    "foreign_runtime",
    "snapshot",
    "snapshot_with_contexts",
    "warn_if_foreign_runtime",
]


@dataclass(frozen=True, kw_only=True)
class ThreadSnapshot:
    """What one live thread holds, as seen by :func:`snapshot`: a plain value.

    Its fields are plain data, taken when the snapshot was: it survives
    ``dataclasses.asdict``, ``copy.deepcopy`` and ``pickle``, and
    :meth:`to_dict` gives a JSON-ready ``dict``::

        json.dumps([entry.to_dict() for entry in threadctx.snapshot()])

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
        correlation: The thread's correlation IDs, a ``dict`` of this
            snapshot's own (a copy: changing it changes nothing else).
        has_storage: Whether the thread holds a :func:`get_thread_storage` dict.
        span_started_at: When the current span started, in seconds since the
            epoch (``time.time()``), for spans that know it (SDK spans);
            ``None`` otherwise.
        elapsed: Seconds since ``span_started_at`` when the snapshot was
            taken, or ``None``.

    Fields are keyword-only when you build one yourself (in a test, say).

    .. versionadded:: 0.1.0
    """

    thread_id: int
    native_id: int
    name: str
    trace_id: str | None
    span_id: str | None
    span_name: str | None
    correlation: Mapping[str, str] = field(hash=False)  # a dict; only hashable fields are hashed
    has_storage: bool
    span_started_at: float | None = None
    elapsed: float | None = None

    def __post_init__(self) -> None:
        # A dict of its own: a read-only view of the context's mapping would not survive asdict,
        # deepcopy or pickle, and the context's own mapping must never be handed out.
        object.__setattr__(self, "correlation", dict(self.correlation))

    def to_dict(self) -> dict[str, Any]:
        """The snapshot as a ``dict`` of its fields, ready for ``json.dumps``.

        .. versionadded:: 0.1.0
        """
        return asdict(self)


#: Whether the warning about a runtime context other than threadctx's was given.
_warned_foreign_runtime = False


def foreign_runtime() -> str | None:
    """The class name of OpenTelemetry's runtime context when it is not threadctx's, else None."""
    runtime = runtime_context()
    if runtime is None:  # the API's global is out of reach (see _compat): ask the context itself
        from opentelemetry import context as otel_context

        return None if otel_context.get_current() is CURRENT.get() else "an unknown one"
    return None if isinstance(runtime, ThreadRuntimeContext) else type(runtime).__name__


def warn_if_foreign_runtime(stacklevel: int = 2) -> None:
    """Warn once per process when OpenTelemetry does not use threadctx's runtime context.

    Then no thread publishes its context, so :func:`snapshot`, ``dump()``, the
    watchdog and the metrics see only the calling thread's.
    """
    global _warned_foreign_runtime  # noqa: PLW0603 - once per process
    if _warned_foreign_runtime:
        return
    runtime = foreign_runtime()
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
    correlation: Mapping[str, str] = {}
    if context is not None:
        # Imported here: this module is loaded while opentelemetry.context is
        # still initialising (entry point), when opentelemetry.trace can't be.
        from opentelemetry import trace

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
    )


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

    .. versionadded:: 0.1.0
    """
    warn_if_foreign_runtime()
    return [entry for entry, _ in snapshot_with_contexts()]


def snapshot_with_contexts() -> list[tuple[ThreadSnapshot, Context | None]]:
    """What :func:`snapshot` returns, each entry with the context it describes (for threadctx's own tools).

    The watchdog logs in a stuck thread's context; a :class:`ThreadSnapshot` is
    a plain value and does not carry it.  Unlike :func:`snapshot`, it does not
    warn about a foreign runtime context: its callers warned when they started.
    """
    # Imported here: this module is loaded while opentelemetry.context is
    # still initialising (entry point), when opentelemetry.trace can't be.
    from opentelemetry import context as otel_context

    threads = active_threads()
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
        result.append((_describe(live, context, name), context))
    result.sort(key=lambda pair: pair[0].thread_id)
    return result
