"""Correlation IDs (MDC): string IDs carried in the OpenTelemetry context.

They live under one key of the OpenTelemetry ``Context``, as a read-only
mapping, so they travel wherever the context travels (threads, tasks,
propagation) and work with any runtime context OpenTelemetry is set up with.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from contextvars import ContextVar, Token
from types import MappingProxyType
from typing import ParamSpec, TypeVar, cast

# ``import ... as`` and attribute access at call time: this module is imported
# while ``opentelemetry.context`` may still be initialising (entry point).
from opentelemetry import context as _otel_context
from opentelemetry.context.context import Context

from threadctx._carry import in_context
from threadctx._text import show

P = ParamSpec("P")
R = TypeVar("R")

__all__ = [
    "CORRELATION_KEY",
    "CORRELATION_MAX_IDS",
    "CORRELATION_MAX_NAME_LENGTH",
    "CORRELATION_MAX_VALUE_LENGTH",
    "bind",
    "bound",
    "clear_correlation",
    "correlation",
    "unbind",
    "validate",
    "with_ids",
]

CORRELATION_KEY = "threadctx.correlation"
"""The OpenTelemetry context key under which correlation IDs are stored."""

CORRELATION_MAX_NAME_LENGTH = 64
"""Longest correlation ID name accepted, in characters."""

CORRELATION_MAX_VALUE_LENGTH = 256
"""Longest correlation ID value accepted, in characters."""

CORRELATION_MAX_IDS = 64
"""Most correlation IDs one context may carry (the W3C baggage member limit)."""

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_EMPTY: Mapping[str, str] = MappingProxyType({})


def validate(name: object, value: object) -> None:
    """Raise if ``name=value`` may not be bound as a correlation ID.

    Names are ASCII identifiers of at most :data:`CORRELATION_MAX_NAME_LENGTH` characters
    (so ``%(name)s`` works in a log format).  Values are strings of at most
    :data:`CORRELATION_MAX_VALUE_LENGTH` characters whose every character is printable
    (``str.isprintable``): no control characters, line or paragraph
    separators, ANSI escapes or invisible format characters, which could
    forge or hide a log line.

    Raises:
        TypeError: the name or value is not a string.
        ValueError: the name or value breaks one of the rules; the message
            names the rule and shows the offending text escaped.
    """
    if not isinstance(name, str):
        raise TypeError(f"correlation ID names must be str, not {type(name).__name__}")
    if not isinstance(value, str):
        raise TypeError(f"correlation ID {name!r} must be a str, not {type(value).__name__}")
    if len(name) > CORRELATION_MAX_NAME_LENGTH:
        raise ValueError(
            f"correlation ID name {show(name)} is longer than {CORRELATION_MAX_NAME_LENGTH} characters"
        )
    if not _NAME.fullmatch(name):
        raise ValueError(f"correlation ID name {show(name)} is not an ASCII identifier")
    if len(value) > CORRELATION_MAX_VALUE_LENGTH:
        raise ValueError(
            f"correlation ID {name!r} is {len(value)} characters long; "
            f"the limit is {CORRELATION_MAX_VALUE_LENGTH}"
        )
    if not value.isprintable():
        raise ValueError(
            f"correlation ID {name!r} holds a control or non-printable character "
            f"(which could forge a log line): {show(value)}"
        )


def correlation(context: Context | None = None) -> Mapping[str, str]:
    """Return the correlation IDs of ``context`` (default: the current one).

    The mapping is read-only; it is a snapshot that later binds do not change.

    .. versionadded:: 0.1.0
    """
    ids = _otel_context.get_value(CORRELATION_KEY, context)
    return cast("Mapping[str, str]", ids) if ids is not None else _EMPTY


def with_ids(ids: Mapping[str, str], context: Context | None = None, *, fresh: bool = False) -> Context:
    """A copy of ``context`` whose correlation IDs are ``ids``, unchecked (callers validated them).

    ``fresh``: ``ids`` is a new dict that the caller gives up (it is not copied again).
    """
    # What opentelemetry.context.set_value does (a copy with one key set), in one step.
    base = _otel_context.get_current() if context is None else context
    kept = (ids if fresh else dict(ids)) if ids else None
    return Context({**base, CORRELATION_KEY: None if kept is None else MappingProxyType(kept)})


def merged(ids: Mapping[str, str], context: Context | None = None) -> Context:
    """A copy of ``context`` with ``ids`` validated and added to its correlation IDs."""
    for name, value in ids.items():
        validate(name, value)
    current = correlation(context)
    new = {**current, **ids}
    if len(new) > CORRELATION_MAX_IDS:
        raise ValueError(
            f"binding {len(ids)} correlation IDs would exceed the limit of {CORRELATION_MAX_IDS}"
        )
    return with_ids(new, context)


def bind(**ids: str) -> Token[Context]:
    """Bind correlation IDs in the current context, MDC-style.

    The IDs stay bound in this thread (or asyncio task) until :func:`unbind`,
    :func:`clear_correlation`, or ``opentelemetry.context.detach`` of the returned token,
    which restores exactly what was bound before::

        threadctx.bind(request_id="r-42", tenant="acme")

    Names are ASCII identifiers of at most :data:`CORRELATION_MAX_NAME_LENGTH`
    characters; values are strings of at most :data:`CORRELATION_MAX_VALUE_LENGTH`
    printable characters (no control, line-separator or invisible format
    character, which could forge or hide a log line); a context holds at most
    :data:`CORRELATION_MAX_IDS`.  Nothing is bound if any name or value is invalid.

    Returns:
        The token of the context attached, for ``opentelemetry.context.detach``.

    Raises:
        TypeError, ValueError: an ID is invalid; the message says which and why.

    .. versionadded:: 0.1.0
    """
    return _otel_context.attach(merged(ids))


def unbind(*names: str) -> Token[Context]:
    """Remove the named correlation IDs from the current context.

    Names that are not bound are ignored.

    .. versionadded:: 0.1.0
    """
    current = correlation()
    remaining = {name: value for name, value in current.items() if name not in names}
    return _otel_context.attach(with_ids(remaining))


def clear_correlation() -> Token[Context]:
    """Remove every correlation ID from the current context.

    The current span, baggage and other context values are kept.

    .. versionadded:: 0.1.0
    """
    return _otel_context.attach(with_ids(_EMPTY))


#: The tokens of the ``bound()`` blocks entered and not yet left, innermost last, with their
#: objects.  Each thread and asyncio task has its own stack, so one ``bound()`` object can be
#: entered in several at once (a module-level one used by many threads or tasks); once every
#: block is left the stack is empty again, so nothing stays behind in a long-lived thread.
_entered: ContextVar[tuple[tuple[_Bound, Token[Context]], ...]] = ContextVar(
    "threadctx.bound_entered", default=()
)


class _Bound:
    """What :func:`bound` returns: a context manager that is also a decorator."""

    __slots__ = ("_ids",)

    def __init__(self, ids: Mapping[str, str]) -> None:
        self._ids = ids

    def __enter__(self) -> Mapping[str, str]:
        token = _otel_context.attach(merged(self._ids))
        _entered.set((*_entered.get(), (self, token)))
        return correlation()

    def __exit__(self, *exc_info: object) -> None:
        stack = _entered.get()
        # This object's innermost block in this thread or task (entered again inside itself: LIFO).
        index = next((i for i in reversed(range(len(stack))) if stack[i][0] is self), None)
        if index is None:
            raise RuntimeError("bound() block left in a thread or task that did not enter it")
        _entered.set(stack[:index] + stack[index + 1 :])
        _otel_context.detach(stack[index][1])

    def __call__(self, fn: Callable[P, R]) -> Callable[P, R]:
        ids = self._ids
        return in_context(fn, lambda: merged(ids))


def bound(**ids: str) -> _Bound:
    """Bind correlation IDs for a block or a function call, then restore.

    As a context manager (it yields the correlation IDs now in force)::

        with threadctx.bound(request_id="r-42"):
            handle()

    As a decorator, the IDs are bound afresh for each call, in whichever
    thread makes it, on top of that thread's (or task's) context::

        @threadctx.bound(job="nightly")
        def run(): ...

    An ``async def`` function keeps them across every ``await``; a generator
    or async generator keeps them for each of its steps, and the code that
    iterates it keeps its own IDs between steps.

    On exit exactly the previous correlation IDs are restored, also when the
    block raises.  The IDs are validated here, when ``bound`` is called.  One
    ``bound()`` object may be used by many threads and tasks at once; each
    block is left in the thread or task that entered it (leaving it elsewhere,
    say across a ``yield`` of a generator resumed by another thread, is a
    ``RuntimeError``).

    Raises:
        TypeError, ValueError: an ID is invalid (the rules of :func:`bind`).

    .. versionadded:: 0.1.0
    """
    for name, value in ids.items():
        validate(name, value)
    return _Bound(ids)
