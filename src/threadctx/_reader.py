"""Which reader shows other threads' contexts (the compiled one or the mirror), and why.

The compiled reader (``threadctx._ctxread``) reads fields of CPython's
``PyThreadState``.  A CPython release could keep those fields' names and
change what they mean, and the reader would then read wrong without a
sound.  So it is used only where it can be trusted:

- only on CPython versions it was checked against, up to :data:`CHECKED_UP_TO`
  (the build hook, ``hatch_build.py``, reads the same constant and does not
  build it for a newer one; raise it once a new release's ``PyThreadState``
  has been checked);
- never on a free-threaded build (it relies on the GIL);
- only after a self-test when it is loaded: it reads a context set in this
  thread and must find exactly that value, for this thread only, and nothing
  once the context is left.  If not, threadctx warns and uses the mirror.

:func:`reader_info` tells which reader was chosen at import, and why.

This module imports only the standard library: the build hook reads
:data:`CHECKED_UP_TO` from its source.
"""

from __future__ import annotations

import contextvars
import os
import sys
import sysconfig
import threading
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["CHECKED_UP_TO", "ReaderInfo", "reader_info"]

#: The newest CPython (major, minor) whose ``PyThreadState`` fields (``thread_id``,
#: ``native_thread_id``, ``context``) the compiled reader was checked against.
CHECKED_UP_TO = (3, 15)

#: The environment variable that selects the mirror whatever is installed.
PURE_PYTHON_ENV = "THREADCTX_PURE_PYTHON"

#: ``contexts(var)``: {thread ident: (native id, value)} for each thread whose current context holds var.
Reader = Callable[[contextvars.ContextVar[Any]], dict[int, tuple[int, Any]]]

ReaderName = Literal["compiled", "mirror"]
ReaderReason = Literal["built", "not-built", "refused", "disabled", "failed"]


@dataclass(frozen=True)
class ReaderInfo:
    """Which reader shows other threads' contexts to :func:`threadctx.snapshot`, and why.

    ``name`` is ``"compiled"`` (the compiled reader, exact: it reads the
    context each thread runs in now) or ``"mirror"`` (the pure-Python
    fallback: the context each thread attached last, see the concepts page).
    ``reason`` says why:

    - ``"built"``: the compiled reader was built for this interpreter and
      passed its self-test (the name is ``"compiled"`` only then);
    - ``"not-built"``: it is not installed (a pure-Python wheel, or no C
      compiler when installing from the source distribution);
    - ``"refused"``: this interpreter is one the reader must not read (a
      CPython newer than it was checked against, a free-threaded build, or
      not CPython);
    - ``"disabled"``: ``THREADCTX_PURE_PYTHON`` is set;
    - ``"failed"``: it is installed but could not be loaded, or it failed its
      self-test (threadctx warned with a ``RuntimeWarning``).

    ``detail`` says the same in words for a person. ``str()`` gives the
    one line that :func:`threadctx.dump` prints::

        print(threadctx.reader_info())  # compiled (built): ...

    .. versionadded:: 0.1.0
    """

    name: ReaderName
    reason: ReaderReason
    detail: str

    def __str__(self) -> str:
        return f"{self.name} ({self.reason}): {self.detail}"


def _self_test(contexts: Reader) -> str | None:
    """Read a value set in this thread through ``contexts``; None if right, else what went wrong."""
    var: contextvars.ContextVar[object] = contextvars.ContextVar("threadctx_reader_self_test")
    sentinel = object()
    ident = threading.get_ident()
    # Python 3.10 keeps no native id in a thread state: the reader gives 0 there.
    native_id = threading.get_native_id() if sys.version_info >= (3, 11) else 0

    def inside() -> dict[int, tuple[int, Any]]:
        var.set(sentinel)
        return contexts(var)

    try:
        seen_inside = contextvars.Context().run(inside)
        seen_outside = contexts(var)
    except Exception as exc:  # a reader that raises is as untrustworthy as one that reads wrong
        return f"it raised {type(exc).__name__}: {exc}"
    if set(seen_inside) != {ident} or seen_inside[ident][1] is not sentinel:
        return f"inside a context it saw threads {sorted(seen_inside)}, expected only this one ({ident})"
    if seen_inside[ident][0] != native_id:
        return f"it read native id {seen_inside[ident][0]}, expected {native_id}"
    if seen_outside:
        return f"outside the context it still saw threads {sorted(seen_outside)}"
    return None


def _refusal(version: tuple[int, int], implementation: str, free_threaded: bool) -> str | None:
    if implementation != "cpython":
        return f"{implementation} is not CPython (the reader reads CPython's thread states)"
    if free_threaded:
        return "a free-threaded build (the reader relies on the GIL)"
    if version > CHECKED_UP_TO:
        newest = ".".join(map(str, CHECKED_UP_TO))
        return (
            f"Python {version[0]}.{version[1]} is newer than the newest release the reader was checked "
            f"against ({newest})"
        )
    return None


def load(
    *,
    environ: Mapping[str, str] = os.environ,
    version: tuple[int, int] | None = None,
    implementation: str | None = None,
    free_threaded: bool | None = None,
) -> tuple[Reader | None, ReaderInfo]:
    """Choose the reader: the compiled one if allowed, present and self-tested, else None (the mirror).

    The keywords default to this interpreter; tests pass others.
    """
    if environ.get(PURE_PYTHON_ENV, "") not in ("", "0"):
        return None, ReaderInfo("mirror", "disabled", f"{PURE_PYTHON_ENV}={environ[PURE_PYTHON_ENV]}")
    refusal = _refusal(
        version if version is not None else (sys.version_info[0], sys.version_info[1]),
        implementation if implementation is not None else sys.implementation.name,
        free_threaded if free_threaded is not None else bool(sysconfig.get_config_var("Py_GIL_DISABLED")),
    )
    if refusal is not None:
        return None, ReaderInfo("mirror", "refused", refusal)
    try:
        from threadctx._ctxread import contexts  # type: ignore[import-not-found,unused-ignore]
    except ModuleNotFoundError:
        return None, ReaderInfo(
            "mirror",
            "not-built",
            "threadctx._ctxread is not installed (a pure-Python wheel, or no C compiler at install)",
        )
    except ImportError as exc:
        return None, _failed(f"threadctx._ctxread could not be loaded ({exc})")
    problem = _self_test(contexts)
    if problem is not None:
        return None, _failed(f"threadctx._ctxread failed its self-test: {problem}")
    return contexts, ReaderInfo(  # type: ignore[return-value,unused-ignore]
        "compiled",
        "built",
        f"threadctx._ctxread passed its self-test on Python {sys.version_info[0]}.{sys.version_info[1]}",
    )


def _failed(detail: str) -> ReaderInfo:
    warnings.warn(
        f"threadctx: {detail}; snapshot() and dump() use the pure-Python mirror", RuntimeWarning, stacklevel=3
    )
    return ReaderInfo("mirror", "failed", detail)


LOADED, INFO = load()


def reader_info() -> ReaderInfo:
    """Which reader shows other threads' contexts, chosen when threadctx was imported, and why.

    The compiled reader shows the context each thread runs in now; the mirror
    shows the context each thread attached last (see the concepts page)::

        info = threadctx.reader_info()
        if info.name != "compiled":
            log.warning("threadctx reads contexts through the mirror: %s", info)

    .. versionadded:: 0.1.0
    """
    return INFO
