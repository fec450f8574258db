"""The operator's view: what every live thread is doing, on demand or on a signal."""

from __future__ import annotations

import logging
import os
import queue
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from types import FrameType
from typing import IO, Any

from threadctx._storage import _describe, known_threads, live_states

__all__ = ["dump", "install_dump_signal"]

_DUMP_THREAD_NAME = "threadctx-dump"


def _printable(text: str) -> str:
    """Text with every non-printable character escaped: a report line stays one line."""
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)


def _stack(frame: FrameType | None, limit: int, source: bool) -> list[str]:
    while frame is not None and frame.f_code.co_filename == __file__:
        frame = frame.f_back  # the report's own frames (and the signal handler's) tell nothing
    if frame is None:
        return []
    summary = traceback.StackSummary.extract(traceback.walk_stack(frame), limit=limit, lookup_lines=source)
    lines = []
    for entry in reversed(summary):  # outermost first, as a traceback reads
        lines.append(f'    File "{entry.filename}", line {entry.lineno}, in {_printable(entry.name)}')
        if source and entry.line:
            lines.append(f"      {_printable(entry.line)}")
    return lines


def dump(*, frames: int = 8, source: bool = True) -> str:
    """Return a readable report of every live thread.

    For each thread: its name, ident, native id, the trace id, span id and
    span name of its current context where it has one, its correlation IDs,
    and the innermost ``frames`` frames of its stack (with their source
    lines if ``source``)::

        print(threadctx.dump())

    It takes no lock (with ``source=False`` it reads no file either), so it
    is safe from a signal handler; see :func:`install_dump_signal`.

    .. versionadded:: 0.1.0
    """
    if frames < 0:
        raise ValueError(f"frames must be 0 or more, not {frames}")
    current = sys._current_frames()
    threads = known_threads()
    states = live_states()
    me = threading.get_ident()
    lines = [
        f"threadctx dump: {len(current)} threads in process {os.getpid()} "
        f"at {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}"
    ]
    for ident in sorted(current, key=lambda ident: (getattr(threads.get(ident), "name", "~"), ident)):
        thread = threads.get(ident)
        name = thread.name if thread is not None else f"<thread {ident}>"
        if name == _DUMP_THREAD_NAME:
            continue
        state = states.get(ident)
        native_id = state.native_id if state is not None else getattr(thread, "native_id", None)
        context = None
        if ident == me:
            from opentelemetry import context as otel_context

            context = otel_context.get_current()
        elif state is not None:
            context = state.context
        lines.append("")
        header = f'Thread "{_printable(name)}" ident={ident}'
        if native_id is not None:
            header += f" native_id={native_id}"
        if thread is not None and thread.daemon:
            header += " daemon"
        lines.append(header + (" (this thread)" if ident == me else ""))
        if state is not None:
            described = _describe(state, context, name)
            if described.trace_id:
                span_name = f' span_name="{_printable(described.span_name)}"' if described.span_name else ""
                lines.append(f"  trace_id={described.trace_id} span_id={described.span_id}{span_name}")
            if described.correlation:
                ids = " ".join(f"{key}={value}" for key, value in described.correlation.items())
                lines.append(f"  correlation: {ids}")
        lines.extend(_stack(current[ident], frames, source))
    del current  # the frames, this one included, would otherwise stay alive in a cycle
    lines.append("end of threadctx dump")
    return "\n".join(lines) + "\n"


def _write_fd(fd: int, data: bytes) -> None:
    """Write everything with os.write: no Python buffer, so no lock the interrupted thread may hold."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


class _LogThread:
    """Logs reports from a thread of its own: a signal handler must not log (handler locks, recursion)."""

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger
        self.reports: queue.SimpleQueue[str] = queue.SimpleQueue()  # put() is safe in a signal handler
        self.start()
        if hasattr(os, "register_at_fork"):  # pragma: no branch - absent on Windows only
            os.register_at_fork(after_in_child=self.start)

    def start(self) -> None:
        self.thread = threading.Thread(target=self.run, name=_DUMP_THREAD_NAME, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while True:
            self.logger.warning("%s", self.reports.get())


def install_dump_signal(
    signum: int = signal.SIGUSR1,
    *,
    file: IO[Any] | int | None = None,
    logger: logging.Logger | str | None = None,
    frames: int = 8,
) -> Callable[[int, FrameType | None], Any] | int | None:
    """Write :func:`dump`'s report when the process receives ``signum``.

    By default the report goes to standard error, with ``os.write`` on its
    file descriptor (``file`` picks another file or descriptor); with
    ``logger`` it is logged at WARNING level, by a thread of threadctx's, as
    one record.  Either way the signal handler takes no lock that the
    interrupted thread may hold and never calls into ``logging``, so it
    cannot deadlock or recurse::

        threadctx.install_dump_signal()   # then: kill -USR1 <pid>

    Source lines are left out of the report (reading them could block).
    Call it from the main thread, as ``signal.signal`` requires.

    Returns:
        The previous handler, for ``signal.signal(signum, previous)``.

    Raises:
        ValueError: called from another thread than the main one, or both
            ``file`` and ``logger`` given.

    .. versionadded:: 0.1.0
    """
    if file is not None and logger is not None:
        raise ValueError("give file or logger, not both")
    if frames < 0:
        raise ValueError(f"frames must be 0 or more, not {frames}")
    if threading.current_thread() is not threading.main_thread():
        raise ValueError("install_dump_signal() must be called from the main thread")
    if logger is not None:
        log_thread = _LogThread(logging.getLogger(logger) if isinstance(logger, str) else logger)

        def handler(signum: int, frame: FrameType | None) -> None:
            log_thread.reports.put(dump(frames=frames, source=False))

    else:
        target = sys.stderr if file is None else file
        fd = target if isinstance(target, int) else target.fileno()

        def handler(signum: int, frame: FrameType | None) -> None:
            _write_fd(fd, dump(frames=frames, source=False).encode("utf-8", "backslashreplace"))

    return signal.signal(signum, handler)
