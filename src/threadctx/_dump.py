"""The operator's view: every live thread's work, on demand, on a signal, or for ``python -m threadctx``."""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import signal
import stat
import sys
import threading
import time
import traceback
from collections.abc import Callable
from types import FrameType
from typing import IO, Any

from opentelemetry.context import Context

from threadctx._carry import run_in
from threadctx._filter import _printable
from threadctx._storage import (
    ThreadSnapshot,
    _foreign_runtime,
    _warn_if_foreign_runtime,
    known_threads,
    snapshot,
)

__all__ = ["dump", "install_dump_signal"]

_DUMP_THREAD_NAME = "threadctx-dump"

#: Set by the command and by tests, read by both sides: where reports are exchanged.
RUNTIME_DIR_ENV = "THREADCTX_RUNTIME_DIR"


def _utc(seconds: float) -> str:
    """``seconds`` since the epoch as ISO 8601 UTC with milliseconds."""
    whole = int(seconds)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{int((seconds - whole) * 1000):03d}Z"


def _stack(frame: FrameType | None, limit: int, source: bool) -> list[str]:
    """The innermost ``limit`` frames from ``frame``, outermost first, as a traceback reads."""
    while frame is not None and frame.f_code.co_filename == __file__:
        frame = frame.f_back  # the report's own frames (and the signal handler's) tell nothing
    if frame is None:
        return []
    summary = traceback.StackSummary.extract(traceback.walk_stack(frame), limit=limit, lookup_lines=source)
    lines = []
    for entry in reversed(summary):
        filename, name = _printable(entry.filename), _printable(entry.name)
        lines.append(f'    File "{filename}", line {entry.lineno}, in {name}')
        if source and entry.line:
            lines.append(f"      {_printable(entry.line)}")
    return lines


NO_STACK = "    (stack not shown: a free-threaded build cannot read a running thread's frames safely)"


def current_frames() -> dict[int, FrameType | None]:
    """Each thread's innermost frame, by ident; on a free-threaded build, only the calling thread's.

    ``sys._current_frames()`` gathers the frames with the world stopped, but
    the world runs again before anyone reads them: without the GIL, walking
    a frame that its thread is executing is not safe (the free-threading
    HOWTO, "Frame objects").  With the GIL the other threads are paused while
    this thread runs Python code, so their frames hold still.
    """
    frames: dict[int, FrameType | None] = dict(sys._current_frames())
    is_gil_enabled = getattr(sys, "_is_gil_enabled", None)
    if is_gil_enabled is not None and not is_gil_enabled():
        me = threading.get_ident()
        frames = {ident: (frame if ident == me else None) for ident, frame in frames.items()}
    return frames


def describe_span(entry: ThreadSnapshot) -> list[str]:
    """The report lines about ``entry``'s span and correlation IDs, every value escaped."""
    lines = []
    if entry.trace_id:
        span_name = f' span_name="{_printable(entry.span_name)}"' if entry.span_name else ""
        lines.append(f"  trace_id={entry.trace_id} span_id={entry.span_id}{span_name}")
    if entry.span_started_at is not None and entry.elapsed is not None:
        lines.append(f"  started_at={_utc(entry.span_started_at)} elapsed={entry.elapsed:.3f}s")
    if entry.correlation:
        ids = " ".join(f"{_printable(key)}={_printable(value)}" for key, value in entry.correlation.items())
        lines.append(f"  correlation: {ids}")
    return lines


def _report(frames: int, source: bool) -> str:
    """dump()'s report; takes no lock and never warns, so the signal handler can call it."""
    now = time.time()
    current = current_frames()
    threads = known_threads()
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
        if getattr(threads.get(ident), "name", None) != _DUMP_THREAD_NAME
    ]
    lines = [
        f"threadctx dump: {len(listed)} threads in process {os.getpid()} "
        f"at {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(now))}"
    ]
    foreign = _foreign_runtime()
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
        header = f'Thread "{_printable(name)}" ident={ident}'
        if native_id is not None:
            header += f" native_id={native_id}"
        if thread is not None and thread.daemon:
            header += " daemon"
        lines += ["", header + (" (this thread)" if ident == me else "")]
        if entry is not None:
            lines += describe_span(entry)
        frame = current[ident]
        lines += _stack(frame, frames, source) if frame is not None else [NO_STACK]
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
    first; then the others by name::

        print(threadctx.dump())

    It takes no lock (with ``source=False`` it reads no file either), so it
    is safe from a signal handler; see :func:`install_dump_signal`.

    .. versionadded:: 0.1.0

    .. versionchanged:: 0.2.0
       Shows ``started_at`` and ``elapsed`` and lists the busy threads
       oldest first; correlation IDs are escaped; warns once when the
       runtime context is not threadctx's.
    """
    if frames < 0:
        raise ValueError(f"frames must be 0 or more, not {frames}")
    _warn_if_foreign_runtime()
    return _report(frames, source)


# ---------------------------------------------------------------------------
# Reports for ``python -m threadctx dump PID``: a request file and a report
# file in a directory that only this user can enter.


class RuntimeDirError(Exception):
    """The per-user directory where reports are exchanged is missing or unsafe."""


def runtime_dir() -> str:
    """Where this user's processes and ``python -m threadctx`` exchange reports.

    ``$THREADCTX_RUNTIME_DIR`` if set; else ``/run/user/UID/threadctx`` where
    ``/run/user/UID`` belongs to this user; else ``/tmp/threadctx-UID``. Both
    sides compute it alike, from the user id, not from ``$TMPDIR``.
    """
    chosen = os.environ.get(RUNTIME_DIR_ENV)
    if chosen:
        return chosen
    uid = os.getuid()
    user_run = f"/run/user/{uid}"
    try:
        info = os.lstat(user_run)
    except OSError:
        pass
    else:
        if stat.S_ISDIR(info.st_mode) and info.st_uid == uid:
            return f"{user_run}/threadctx"
    return f"/tmp/threadctx-{uid}"  # checked when used: ours, mode 0700, no symlink


def check_private_dir(path: str, *, create: bool) -> None:
    """Make sure ``path`` is a directory (not a symlink) owned by this user that nobody else can enter.

    Raises:
        RuntimeDirError: it is missing (and not ``create``), or it fails a check.
    """
    if create:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        except OSError as error:
            raise RuntimeDirError(f"cannot create {path}: {error.strerror}") from None
    try:
        info = os.lstat(path)
    except OSError as error:
        raise RuntimeDirError(f"cannot use {path}: {error.strerror}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise RuntimeDirError(f"{path} is not a directory (a symlink?); remove it")
    if info.st_uid != os.getuid():
        raise RuntimeDirError(f"{path} belongs to user id {info.st_uid}, not to this user; remove it")
    if info.st_mode & 0o077:
        mode = f"{info.st_mode & 0o777:o}"
        raise RuntimeDirError(f"{path} can be entered by other users (mode {mode}); chmod 700 {path}")


def request_path(directory: str, pid: int) -> str:
    return os.path.join(directory, f"dump-{pid}.request")


def report_path(directory: str, pid: int) -> str:
    return os.path.join(directory, f"dump-{pid}.txt")


_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def _answer_request(frames: int) -> bool:
    """Write the report for ``python -m threadctx dump`` if it asked; return whether it did.

    Called in the signal handler: only system calls, no lock, never raises.
    """
    if not hasattr(os, "getuid"):  # pragma: no cover - Windows: no command, no per-user directory
        return False
    try:
        directory = runtime_dir()
        check_private_dir(directory, create=False)  # a request counts only in a directory of ours
        pid = os.getpid()
        os.unlink(request_path(directory, pid))  # claims the request: one answer per request
    except (OSError, RuntimeDirError):
        return False  # not asked (the usual case)
    try:
        final = report_path(directory, pid)
        partial = final + ".partial"
        for stale in (partial, final):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(stale)
        fd = os.open(partial, _CREATE, 0o600)
        try:
            _write_fd(fd, _report(frames, source=False).encode("utf-8", "backslashreplace"))
        finally:
            os.close(fd)
        os.rename(partial, final)  # the command sees the whole report or nothing
    except OSError:
        return False  # the report goes where it would without a request; the command says it got none
    return True


def _write_fd(fd: int, data: bytes) -> None:
    """Write everything with os.write: no Python buffer, so no lock the interrupted thread may hold."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


class _LogThread:
    """Logs reports from a thread of its own: a signal handler must not log (handler locks, recursion).

    One per process, whatever the number of install_dump_signal() calls; restarted in a forked child.
    """

    def __init__(self) -> None:
        # put() is safe in a signal handler; each report comes with the logger it goes to.
        self.reports: queue.SimpleQueue[tuple[logging.Logger, str]] = queue.SimpleQueue()
        self.start()

    def start(self) -> None:
        # In an empty context: it serves no request, also where its starter's context would be
        # inherited (Python 3.14's thread_inherit_context, instrument_threading()).
        self.thread = threading.Thread(
            target=run_in, args=(Context(), self.run), name=_DUMP_THREAD_NAME, daemon=True
        )
        self.thread.start()

    def run(self) -> None:
        while True:
            logger, report = self.reports.get()
            try:
                logger.warning("%s", report)
            except Exception:  # a filter's bug must not end the thread: later reports still come
                with contextlib.suppress(Exception):
                    traceback.print_exc()  # on stderr, as logging's own handleError does


_log_thread: _LogThread | None = None


def _restart_log_thread_in_child() -> None:
    if _log_thread is not None:
        _log_thread.start()


if hasattr(os, "register_at_fork"):  # pragma: no branch - absent on Windows only
    os.register_at_fork(after_in_child=_restart_log_thread_in_child)  # once, for every install


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

    When ``python -m threadctx dump PID`` sends the signal, the report goes
    to that command instead, through a file only this user can read.

    Source lines are left out of the report (reading them could block).
    Call it from the main thread, as ``signal.signal`` requires.  Calling it
    again replaces the handler: the process keeps one logging thread.

    Returns:
        The previous handler, for ``signal.signal(signum, previous)``.

    Raises:
        ValueError: called from another thread than the main one, or both
            ``file`` and ``logger`` given.

    .. versionadded:: 0.1.0

    .. versionchanged:: 0.2.0
       Answers ``python -m threadctx dump PID``; a second call no longer
       starts another thread.
    """
    global _log_thread  # noqa: PLW0603 - one logging thread per process
    if file is not None and logger is not None:
        raise ValueError("give file or logger, not both")
    if frames < 0:
        raise ValueError(f"frames must be 0 or more, not {frames}")
    if threading.current_thread() is not threading.main_thread():
        raise ValueError("install_dump_signal() must be called from the main thread")
    _warn_if_foreign_runtime()  # now, not in the handler (where warning could deadlock)
    if logger is not None:
        if _log_thread is None:
            _log_thread = _LogThread()
        reports = _log_thread.reports
        target_logger = logging.getLogger(logger) if isinstance(logger, str) else logger

        def handler(signum: int, frame: FrameType | None) -> None:
            if not _answer_request(frames):
                reports.put((target_logger, _report(frames, source=False)))

    else:
        target = sys.stderr if file is None else file
        fd = target if isinstance(target, int) else target.fileno()

        def handler(signum: int, frame: FrameType | None) -> None:
            if not _answer_request(frames):
                _write_fd(fd, _report(frames, source=False).encode("utf-8", "backslashreplace"))

    return signal.signal(signum, handler)
