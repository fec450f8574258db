"""The OpenTelemetry runtime context that threadctx provides.

The current context lives in a ``ContextVar``: that gives exactly the token
semantics of ``contextvars`` (restore what the token saved, also out of
order; a token used twice, or from another thread, raises and changes
nothing) and keeps asyncio tasks isolated, with ``asyncio.to_thread`` and
``loop.run_in_executor`` behaving as with the default backend.

How other threads see it (:func:`threadctx.snapshot`) depends on the reader
in use (see ``_current``).  With the compiled reader, ``snapshot()`` reads
each thread's current context itself, and ``attach``/``detach`` are the
ContextVar's own ``set``/``reset``.  Without it (no compiler at install time,
a free-threaded build, or ``THREADCTX_PURE_PYTHON=1``), ``attach`` and
``detach`` also write the new current context into the thread's registry
entry: the mirror that ``snapshot()`` reads there.

This module imports only ``opentelemetry.context.context``: it is loaded
through the ``opentelemetry_context`` entry point while
``opentelemetry.context`` itself is still being imported.
"""

from __future__ import annotations

import weakref
from contextvars import Token

from opentelemetry.context.context import Context

from threadctx import _current
from threadctx._compat import RuntimeContext
from threadctx._current import CURRENT
from threadctx._storage import local

__all__ = ["ThreadRuntimeContext"]


class ThreadRuntimeContext(RuntimeContext):
    """OpenTelemetry runtime context backed by threadctx's per-thread registry.

    Select it before OpenTelemetry is first imported::

        OTEL_PYTHON_CONTEXT=threadctx python app.py

    It behaves like OpenTelemetry's default ``ContextVarsRuntimeContext``
    (same token rules, same asyncio behaviour) and in addition makes each
    thread's current context visible to :func:`threadctx.snapshot` and the
    operator's tools.

    All instances share one current context per thread (or asyncio task).

    .. versionadded:: 0.1.0
    """

    def __init__(self) -> None:
        _instances.add(self)
        _choose_methods(self)

    def attach(self, context: Context) -> Token[Context]:
        """Make ``context`` current and return a token that restores the previous one."""
        token = CURRENT.set(context)
        local.state.context = context
        return token

    #: Return the current context of this thread or asyncio task. It is the
    #: ContextVar's own C method, called without a Python frame: a builtin is
    #: not a descriptor, so no ``self`` is passed.
    get_current = CURRENT.get

    def detach(self, token: Token[Context]) -> None:
        """Restore the context that ``token`` saved.

        Raises:
            RuntimeError: the token was already used.
            ValueError: the token was created in another thread or task.
        """
        CURRENT.reset(token)
        # None where the variable is unset again: the thread is back to no context at all.
        local.state.context = CURRENT.get(None)


#: Every instance, so that a switch of reader (tests/_helpers.py: use_reader) reaches each one.
_instances: weakref.WeakSet[ThreadRuntimeContext] = weakref.WeakSet()


def _choose_methods(runtime: ThreadRuntimeContext) -> None:
    """With the compiled reader, the instance's attach/detach are the ContextVar's builtin set/reset.

    A builtin stored on the instance is called with no Python frame and no
    ``self``; the class keeps the documented methods, which also write the
    mirror, for when the reader is not in use.
    """
    if _current.reader_in_use():
        runtime.__dict__.update(attach=CURRENT.set, detach=CURRENT.reset)
    else:
        runtime.__dict__.pop("attach", None)
        runtime.__dict__.pop("detach", None)
