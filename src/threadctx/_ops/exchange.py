"""The file exchange with ``python -m threadctx dump PID``: a request file and a report file.

Both live in a directory that only this user can enter; the command (``threadctx.__main__``)
writes the request and reads the report, the process answers from its signal handler.
"""

from __future__ import annotations

import contextlib
import os
import stat

from threadctx._ops.report import report

__all__ = [
    "RUNTIME_DIR_ENV",
    "RuntimeDirError",
    "answer_request",
    "check_private_dir",
    "report_path",
    "request_path",
    "runtime_dir",
    "write_fd",
]

#: Set by the command and by tests, read by both sides: where reports are exchanged.
RUNTIME_DIR_ENV = "THREADCTX_RUNTIME_DIR"


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
    """Where the command leaves its request for process ``pid``."""
    return os.path.join(directory, f"dump-{pid}.request")


def report_path(directory: str, pid: int) -> str:
    """Where process ``pid`` writes its report for the command."""
    return os.path.join(directory, f"dump-{pid}.txt")


_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def answer_request(frames: int) -> bool:
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
            write_fd(fd, report(frames, source=False).encode("utf-8", "backslashreplace"))
        finally:
            os.close(fd)
        os.rename(partial, final)  # the command sees the whole report or nothing
    except OSError:
        return False  # the report goes where it would without a request; the command says it got none
    return True


def write_fd(fd: int, data: bytes) -> None:
    """Write everything with os.write: no Python buffer, so no lock the interrupted thread may hold."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
