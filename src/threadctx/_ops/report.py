"""The report of every live thread's work: :func:`dump`, and the pieces the watchdog and the signal share."""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from types import FrameType

from threadctx._compat import active_threads
from threadctx._reader import reader_info
from threadctx._snapshot import ThreadSnapshot, foreign_runtime, snapshot, warn_if_foreign_runtime
from threadctx._text import printable

__all__ = [
    "DUMP_THREAD_NAME",
    "NO_STACK",
    "current_frames",
    "describe_span",
    "dump",
    "others_frames_readable",
    "report",
    "stack",
]

#: The name of the thread that logs reports for the signal (left out of the report).
DUMP_THREAD_NAME = "threadctx-dump"

#: The files whose frames the report leaves out: its own, the signal handler's and the exchange's.
_OWN_FILES = frozenset(
    os.path.join(os.path.dirname(__file__), name) for name in ("report.py", "signal.py", "exchange.py")
)


def _utc(seconds: float) -> str:
    """``seconds`` since the epoch as ISO 8601 UTC with milliseconds."""
    whole = int(seconds)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{int((seconds - whole) * 1000):03d}Z"


def stack(frame: FrameType | None, limit: int, source: bool) -> list[str]:
    """The innermost ``limit`` frames from ``frame``, outermost first, as a traceback reads."""
    while frame is not None and frame.f_code.co_filename in _OWN_FILES:
        frame = frame.f_back  # the report's own frames (and the signal handler's) tell nothing
    if frame is None:
        return []
    summary = traceback.StackSummary.extract(traceback.walk_stack(frame), limit=limit, lookup_lines=source)
    lines = []
    for entry in reversed(summary):
        filename, name = printable(entry.filename), printable(entry.name)
        lines.append(f'    File "{filename}", line {entry.lineno}, in {name}')
        if source and entry.line:
            lines.append(f"      {printable(entry.line)}")
    return lines


NO_STACK = "    (stack not shown: a free-threaded build cannot read a running thread's frames safely)"


def others_frames_readable() -> bool:
    """Whether this thread may walk other threads' frames now: only while a GIL keeps them still.

    ``sys._current_frames()`` is ``_PyThread_CurrentFrames`` in CPython's
    ``Python/pystate.c``.  On a free-threaded build it stops the world only
    while it gathers the frame objects (3.14 and main: ``_PyEval_StopTheWorldAll``
    and ``HEAD_LOCK``, then ``HEAD_UNLOCK`` and ``_PyEval_StartTheWorldAll``
    before the dict is returned; the stop came with gh-117300 in 3.13).  The
    walk that follows (``f_back``, ``f_lineno``, ``f_code``) runs with the
    world running again, against frames their threads are executing and
    popping: gh-118680 (a crash, 3.13), gh-128421 (3.14 locks frame objects,
    and its pull request says reading the line number of a frame another
    thread still runs may crash the interpreter), gh-152355 (a use-after-free
    from pure Python, 2026).  With the GIL (every build before 3.13, and a
    free-threaded one where ``sys._is_gil_enabled()`` is true) the other
    threads hold still while this one runs Python code.
    """
    is_gil_enabled = getattr(sys, "_is_gil_enabled", None)  # 3.13+
    return is_gil_enabled is None or bool(is_gil_enabled())


def current_frames() -> dict[int, FrameType | None]:
    """Each thread's innermost frame, by ident; only the calling thread's unless others_frames_readable().

    The others are then listed with None: the report says why it shows no stack.
    """
    frames: dict[int, FrameType | None] = dict(sys._current_frames())
    if not others_frames_readable():
        me = threading.get_ident()
        frames = {ident: (frame if ident == me else None) for ident, frame in frames.items()}
    return frames


def describe_span(entry: ThreadSnapshot) -> list[str]:
    """The report lines about ``entry``'s span and correlation IDs, every value escaped."""
    lines = []
    if entry.trace_id:
        span_name = f' span_name="{printable(entry.span_name)}"' if entry.span_name else ""
        lines.append(f"  trace_id={entry.trace_id} span_id={entry.span_id}{span_name}")
    if entry.span_started_at is not None and entry.elapsed is not None:
        lines.append(f"  started_at={_utc(entry.span_started_at)} elapsed={entry.elapsed:.3f}s")
    if entry.correlation:
        ids = " ".join(f"{printable(key)}={printable(value)}" for key, value in entry.correlation.items())
        lines.append(f"  correlation: {ids}")
    return lines


def report(frames: int, source: bool) -> str:
    """dump()'s report; takes no lock and never warns, so the signal handler can call it."""
    now = time.time()
    current = current_frames()
    threads = active_threads()
    described = {entry.thread_id: entry for entry in snapshot()}
    me = threading.get_ident()

    def order(ident: int) -> tuple[int, float, str, int]:
        entry = described.get(ident)
        name = getattr(threads.get(ident), "name", "~")
        if entry is not None and entry.span_started_at is not None:
            return (0, entry.span_started_at, "", ident)  # busy, oldest first
        return (1, 0.0, name, ident)

    listed = [
        ident
        for ident in sorted(current, key=order)
        if getattr(threads.get(ident), "name", None) != DUMP_THREAD_NAME
    ]
    lines = [
        f"threadctx dump: {len(listed)} threads in process {os.getpid()} "
        f"at {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(now))}",
        f"reader: {reader_info()}",
    ]
    foreign = foreign_runtime()
    if foreign is not None:
        lines.append(
            f"note: the runtime context is {foreign}, not threadctx's: only this thread's context is shown "
            "(set OTEL_PYTHON_CONTEXT=threadctx before OpenTelemetry is imported)"
        )
    for ident in listed:
        thread = threads.get(ident)
        entry = described.get(ident)
        name = thread.name if thread is not None else f"<thread {ident}>"
        native_id = entry.native_id if entry is not None else getattr(thread, "native_id", None)
        header = f'Thread "{printable(name)}" ident={ident}'
        if native_id is not None:
            header += f" native_id={native_id}"
        if thread is not None and thread.daemon:
            header += " daemon"
        lines += ["", header + (" (this thread)" if ident == me else "")]
        if entry is not None:
            lines += describe_span(entry)
        frame = current[ident]
        lines += stack(frame, frames, source) if frame is not None else [NO_STACK]
    del current  # the frames, this one included, would otherwise stay alive in a cycle
    lines.append("end of threadctx dump")
    return "\n".join(lines) + "\n"


def dump(*, frames: int = 8, source: bool = True) -> str:
    """Return a readable report of every live thread.

    For each thread: its name, ident, native id, the trace id, span id and
    span name of its current context where it has one, when that span
    started and how long ago, its correlation IDs, and the innermost
    ``frames`` frames of its stack (with their source lines if ``source``).
    Threads serving a span whose start is known come first, the oldest
    first; then the others by name. The header says which reader showed
    the threads' contexts (:func:`reader_info`)::

        print(threadctx.dump())

    It takes no lock (with ``source=False`` it reads no file either), so it
    is safe from a signal handler; see :func:`install_dump_signal`.

    .. versionadded:: 0.1.0
    """
    if frames < 0:
        raise ValueError(f"frames must be 0 or more, not {frames}")
    warn_if_foreign_runtime()
    return report(frames, source)
