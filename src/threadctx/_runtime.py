"""The OpenTelemetry runtime context that threadctx provides.

The current context lives in a ``ContextVar``: that gives exactly the token
semantics of ``contextvars`` (restore what the token saved, also out of
order; a token used twice, or from another thread, raises and changes
nothing) and keeps asyncio tasks isolated, with ``asyncio.to_thread`` and
``loop.run_in_executor`` behaving as with the default backend.  Every
``attach`` and ``detach`` also publishes the new current context in the
calling thread's registry entry, which is what :func:`threadctx.snapshot`
reads from other threads.

This module imports only ``opentelemetry.context.context``: it is loaded
through the ``opentelemetry_context`` entry point while
``opentelemetry.context`` itself is still being imported.
"""

from __future__ import annotations

from contextvars import ContextVar, Token

from opentelemetry.context.context import Context, _RuntimeContext

from threadctx._storage import _local

__all__ = ["ThreadRuntimeContext"]

# Context is a dict, but OpenTelemetry never mutates one after creating it.
_CURRENT: ContextVar[Context] = ContextVar("threadctx_current_context", default=Context())  # noqa: B039


class ThreadRuntimeContext(_RuntimeContext):
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

    def attach(self, context: Context) -> Token[Context]:
        """Make ``context`` current and return a token that restores the previous one."""
        token = _CURRENT.set(context)
        _local.state.context = context
        return token

    #: Return the current context of this thread or asyncio task. It is the
    #: ContextVar's own C method, called without a Python frame: a builtin is
    #: not a descriptor, so no ``self`` is passed.
    get_current = _CURRENT.get

    def detach(self, token: Token[Context]) -> None:
        """Restore the context that ``token`` saved.

        Raises:
            RuntimeError: the token was already used.
            ValueError: the token was created in another thread or task.
        """
        _CURRENT.reset(token)
        _local.state.context = _CURRENT.get()
