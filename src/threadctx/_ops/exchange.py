"""The file exchange with ``python -m threadctx dump PID`` and ``top PID``: request and answer files.

Both live in a directory that only this user can enter; the command (``threadctx.__main__``)
writes the request and reads the report, the process answers from its signal handler.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import stat
from collections.abc import Callable

from threadctx._ops.report import report
from threadctx._ops.table import rows_of, serving_stacks
from threadctx._snapshot import foreign_runtime, snapshot

__all__ = [
    "RUNTIME_DIR_ENV",
    "RuntimeDirError",
    "answer_request",
    "check_private_dir",
    "report_path",
    "request_path",
    "runtime_dir",
    "snapshot_path",
    "snapshot_request_path",
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
    parent = os.path.dirname(os.path.abspath(path))
    try:
        above = os.stat(parent)
    except OSError as error:
        raise RuntimeDirError(f"cannot use {parent}: {error.strerror}") from None
    # In a directory another user can write to (and that is not sticky, as /tmp is), they could
    # rename this one and put a symlink in its place between the check above and its use.
    writable = 0o002 if above.st_gid == os.getgid() else 0o022  # a user's own group: theirs alone, usually
    others_write = above.st_mode & writable and not above.st_mode & stat.S_ISVTX
    if above.st_uid not in (0, os.getuid()) or others_write:
        raise RuntimeDirError(
            f"{path} is in {parent}, where other users can replace it; choose a directory of your own"
        )


def request_path(directory: str, pid: int) -> str:
    """Where the command leaves its request for process ``pid``."""
    return os.path.join(directory, f"dump-{pid}.request")


def report_path(directory: str, pid: int) -> str:
    """Where process ``pid`` writes its report for the command."""
    return os.path.join(directory, f"dump-{pid}.txt")


_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def snapshot_request_path(directory: str, pid: int, requester: int, *, stacks: bool = False) -> str:
    """Where ``requester`` (``python -m threadctx top``) asks process ``pid`` for its rows as JSON.

    With ``stacks``, each row comes with its thread's stack: ``sys._current_frames()`` then runs in
    the process, so ``top`` asks for them only while it shows one.
    """
    return os.path.join(directory, f"snapshot-{pid}-{requester}{'.stacks' if stacks else ''}.request")


def snapshot_path(directory: str, pid: int, requester: int) -> str:
    """Where process ``pid`` writes its rows for ``requester``."""
    return os.path.join(directory, f"snapshot-{pid}-{requester}.json")


def answer_request(frames: int) -> bool:
    """Answer ``python -m threadctx dump`` and ``top`` if they asked; return whether one did.

    Called in the signal handler: only system calls, no lock, never raises.
    """
    if not hasattr(os, "getuid"):  # pragma: no cover - Windows: no command, no per-user directory
        return False
    try:
        directory = runtime_dir()
        check_private_dir(directory, create=False)  # a request counts only in a directory of ours
    except (OSError, RuntimeDirError):
        return False  # not asked (the usual case)
    pid = os.getpid()
    answered = _answer_snapshot_requests(directory, pid, frames)
    try:
        os.unlink(request_path(directory, pid))  # claims the request: one answer per request
    except OSError:
        return answered
    return _write_answer(report_path(directory, pid), lambda: report(frames, source=False)) or answered


def _answer_snapshot_requests(directory: str, pid: int, frames: int) -> bool:
    """Write the rows, as JSON, for each ``top`` that asked (one file per asking process)."""
    prefix, suffix = f"snapshot-{pid}-", ".request"
    try:
        names = os.listdir(directory)
    except OSError:
        return False
    answered = False
    for name in names:
        requester, _, flag = name[len(prefix) : -len(suffix)].partition(".")
        if not (name.startswith(prefix) and name.endswith(suffix) and flag in ("", "stacks")):
            continue
        if not (requester.isascii() and requester.isdigit()):
            continue
        try:
            os.unlink(os.path.join(directory, name))  # claims it
        except OSError:
            continue
        answer = snapshot_path(directory, pid, int(requester))
        answered |= _write_answer(answer, functools.partial(_rows_json, frames if flag else None))
    return answered


def _rows_json(frames: int | None) -> str:
    """The threads serving a request, with their innermost ``frames`` frames unless None, for ``top``."""
    entries = snapshot()
    stacks = serving_stacks(entries, frames, source=False) if frames is not None else None
    threads = [row.as_json() for row in rows_of(entries, stacks)]
    return json.dumps({"pid": os.getpid(), "foreign_runtime": foreign_runtime(), "threads": threads})


def _write_answer(final: str, make: Callable[[], str]) -> bool:
    """Write ``make()`` to a new file and rename it to ``final``: the reader sees all of it or nothing."""
    try:
        partial = final + ".partial"
        for stale in (partial, final):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(stale)
        fd = os.open(partial, _CREATE, 0o600)
        try:
            write_fd(fd, make().encode("utf-8", "backslashreplace"))
        finally:
            os.close(fd)
        os.rename(partial, final)
    except OSError:
        return False  # the report goes where it would without a request; the command says it got none
    return True


def write_fd(fd: int, data: bytes) -> None:
    """Write everything with os.write: no Python buffer, so no lock the interrupted thread may hold."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
