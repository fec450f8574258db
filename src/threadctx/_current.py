"""The current OpenTelemetry context of each thread, and how other threads read it.

Each thread's (and asyncio task's) current context is the value of :data:`CURRENT`
in the ``contextvars.Context`` it runs in.  Other threads read it in one of two ways:

- the compiled reader (``threadctx._ctxread``) reads ``CURRENT`` in every
  thread's current context, under the GIL: exact, also inside
  ``contextvars.Context.run`` and after it returns, and for threads that
  never touched threadctx but run in a context that holds one (Python 3.14's
  ``thread_inherit_context``);
- without it (not built, refused, failed its self-test, or
  ``THREADCTX_PURE_PYTHON=1``: ``threadctx.reader_info()`` says which), the
  mirror: ``attach``/``detach`` write the new context into the thread's
  registry state (see ``_storage``), and readers read that.  It cannot know
  when ``Context.run`` returns.

This module imports only ``opentelemetry.context.context`` and ``_reader``
(the standard library only): it is loaded through the
``opentelemetry_context`` entry point while ``opentelemetry.context`` itself
is still being imported.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar

from opentelemetry.context.context import Context

from threadctx import _reader

__all__ = ["CURRENT", "LOADED_READER", "read_contexts", "reader_in_use"]

#: Each thread's (and asyncio task's) current OpenTelemetry context.
#: Context is a dict, but OpenTelemetry never mutates one after creating it.
CURRENT: ContextVar[Context] = ContextVar("threadctx_current_context", default=Context())  # noqa: B039

Reader = Callable[[ContextVar[Context]], dict[int, tuple[int, Context]]]


#: The compiled reader where it is built, allowed and self-tested; None means the mirror.
#: ``_reader`` chooses it at import and says why (``threadctx.reader_info()``).
LOADED_READER: Reader | None = _reader.LOADED
#: The reader in use: LOADED_READER, or None for the mirror (the tests switch, see tests/_helpers.py).
_read_contexts: Reader | None = LOADED_READER


def reader_in_use() -> bool:
    """Whether other threads' contexts are read by the compiled reader (else: from the mirror)."""
    return _read_contexts is not None


def read_contexts() -> dict[int, tuple[int, Context]] | None:
    """Every thread's (native id, current context) by ident, read by the compiled reader; None without it."""
    reader = _read_contexts
    return None if reader is None else reader(CURRENT)
