"""``python -m threadctx dump PID``: ask a running process for its threadctx report and print it."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import sys
import time

from threadctx._ops.exchange import (
    RUNTIME_DIR_ENV,
    RuntimeDirError,
    check_private_dir,
    report_path,
    request_path,
    runtime_dir,
    snapshot_path,
    snapshot_request_path,
)
from threadctx._ops.table import DEFAULT_THRESHOLD
from threadctx._text import printable

_HELP = f"""\
Ask a running Python process what each of its threads is doing: its request, span,
correlation IDs and stack (threadctx.dump()'s report).

The process must have called threadctx.install_dump_signal() and run as the same user.
The command leaves a request in a directory that only this user can enter
(${RUNTIME_DIR_ENV}, else /run/user/UID/threadctx, else /tmp/threadctx-UID), sends the
signal, and prints the report the process writes there (mode 0600).

Example: python -m threadctx dump 41200
"""

_POLL = 0.02


class CommandError(Exception):
    """What went wrong, in words for the operator."""


class ProcessEndedError(CommandError):
    """The process asked has ended."""

    def __init__(self, pid: int) -> None:
        super().__init__(f"process {pid} has ended")


def _signal_named(name: str) -> signal.Signals:
    """``USR1``, ``SIGUSR1`` or a number, as a signal of this platform."""
    if name.isdigit():
        return signal.Signals(int(name))
    try:
        return signal.Signals["SIG" + name.upper().removeprefix("SIG")]
    except KeyError:
        raise argparse.ArgumentTypeError(f"no signal {name!r} on this platform") from None


def _catches(pid: int, signum: int) -> bool | None:
    """Whether process ``pid`` catches ``signum`` (Linux's /proc), or None where that can't be told."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    except OSError:
        pass
    return None


def _check_process(pid: int, signum: signal.Signals, force: bool) -> None:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        raise CommandError(f"no process with pid {pid}") from None
    except PermissionError:
        raise CommandError(
            f"process {pid} belongs to another user; run this command as that user "
            f"(for example: sudo -u USER {sys.executable} -m threadctx dump {pid})"
        ) from None
    catches = _catches(pid, signum)
    if catches is False:
        raise CommandError(
            f"process {pid} does not catch {signum.name}: it did not call "
            f"threadctx.install_dump_signal() (the signal would end it, so it was not sent)"
        )
    if catches is None and not force:
        raise CommandError(
            f"cannot tell whether process {pid} catches {signum.name} on this platform (no /proc); "
            f"if it called threadctx.install_dump_signal(), run again with --force"
        )


def _create_request(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # left by an earlier command that gave up
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    os.close(os.open(path, flags, 0o600))


def _read_report(path: str) -> str | None:
    """The report if it is there (then removed), else None; refuses a file that is not ours."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        return None
    try:
        if os.fstat(fd).st_uid != os.getuid():
            raise CommandError(f"{path} does not belong to this user; not reading it")
        with os.fdopen(fd, encoding="utf-8", errors="backslashreplace", closefd=False) as report:
            text = report.read()
    finally:
        os.close(fd)
    os.unlink(path)
    return text


def dump_command(pid: int, signum: signal.Signals, timeout: float, force: bool) -> str:
    """Ask process ``pid`` for its report and return it.

    Raises:
        CommandError: the process is not there, not ours, does not catch the
            signal, or did not answer within ``timeout`` seconds.
    """
    _check_process(pid, signum, force)
    directory = _directory()
    return _ask(pid, signum, timeout, request_path(directory, pid), report_path(directory, pid))


def _directory() -> str:
    directory = runtime_dir()
    try:
        check_private_dir(directory, create=True)
    except RuntimeDirError as error:
        raise CommandError(str(error)) from None
    return directory


def _ask(pid: int, signum: signal.Signals, timeout: float, request: str, report: str) -> str:
    """Leave ``request``, signal ``pid``, and return what it writes to ``report`` within ``timeout`` s."""
    directory = os.path.dirname(request)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(report)
    _create_request(request)
    try:
        os.kill(pid, signum)
    except OSError as error:
        os.unlink(request)
        if isinstance(error, ProcessLookupError):
            raise ProcessEndedError(pid) from None
        raise CommandError(f"could not signal process {pid}: {error.strerror}") from None
    deadline = time.monotonic() + timeout
    while True:
        text = _read_report(report)
        if text is not None:
            return text
        if time.monotonic() >= deadline:
            break
        time.sleep(_POLL)
    try:
        os.unlink(request)
    except FileNotFoundError:  # it took the request: it is writing, or could not
        raise CommandError(
            f"process {pid} took the request but wrote no report to {directory} within {timeout:g}s"
        ) from None
    if not _alive(pid):
        raise ProcessEndedError(pid)
    raise CommandError(
        f"process {pid} did not answer within {timeout:g}s: it catches {signum.name}, but not with "
        f"threadctx.install_dump_signal() (another handler?), or its main thread has not run Python "
        f"since (signal handlers run there), or it sees another {directory} (another "
        f"{RUNTIME_DIR_ENV}, a private /tmp)"
    )


def _alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie, ended but not yet reaped by its parent, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True  # no /proc: the signal test is all there is


def top_command(args: argparse.Namespace) -> int:
    """``python -m threadctx top PID``: the live view, or one plain table."""
    from threadctx._ops import top as _top
    from threadctx._ops.table import FirstSeen, Row

    _check_process(args.pid, args.signal, args.force)
    directory = _directory()
    me = os.getpid()
    answer = snapshot_path(directory, args.pid, me)
    ages = FirstSeen()

    def fetch(stacks: bool) -> _top.Snapshot:
        request = snapshot_request_path(directory, args.pid, me, stacks=stacks)
        text = _ask(args.pid, args.signal, args.timeout, request, answer)
        try:
            data = json.loads(text)
            rows = [Row.from_json(item) for item in data["threads"]]
        except (ValueError, KeyError, TypeError) as error:
            raise CommandError(f"process {args.pid} answered something else than rows: {error}") from None
        note = data.get("foreign_runtime")
        return _top.Snapshot(rows=ages.fill(rows), foreign_runtime=note if isinstance(note, str) else None)

    if args.once or not sys.stdout.isatty():
        sys.stdout.write(_top.plain(fetch(False), args.threshold))
        return 0
    try:
        _top.run(fetch, args.pid, args.interval, args.threshold)
    except ProcessEndedError as ended:  # the terminal is back to normal: say so there
        print(f"python -m threadctx top: {ended}")
    return 0


_TOP_HELP = f"""\
A live view of a running Python process: one row per thread serving a request (its
age, name, trace id, span name and correlation IDs), the oldest first, refreshed
every second; rows past the threshold are marked with "!". Keys: up/down or j/k
select a row, Enter shows that thread's stack, q quits.

With --once, or when standard output is not a terminal, it prints the table once.
It asks the process as `dump` does (install_dump_signal(), the same user, files in
${RUNTIME_DIR_ENV}, else /run/user/UID/threadctx, else /tmp/threadctx-UID).

Example: python -m threadctx top 41200
"""


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, not {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m threadctx", description=_HELP, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    dump = commands.add_parser(
        "dump",
        help="print the threadctx report of a running process",
        description=_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    top = commands.add_parser(
        "top",
        help="a live view of the requests each thread of a running process serves",
        description=_TOP_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for command in (dump, top):
        command.add_argument("pid", type=int, metavar="PID", help="the process id")
        command.add_argument(
            "--signal",
            type=_signal_named,
            default="USR1",
            help="the signal given to install_dump_signal() (default: USR1)",
        )
        command.add_argument(
            "--timeout", type=_seconds, default=10.0, help="seconds to wait for an answer (default: 10)"
        )
        command.add_argument(
            "--force",
            action="store_true",
            help="send the signal even where it can't be told that the process catches it (no /proc)",
        )
    top.add_argument("--interval", type=_seconds, default=1.0, help="seconds between looks (default: 1)")
    top.add_argument(
        "--threshold",
        type=_seconds,
        default=DEFAULT_THRESHOLD,
        help=f"mark requests served longer than this, in seconds (default: {DEFAULT_THRESHOLD:g}, "
        "the watchdog's)",
    )
    top.add_argument("--once", action="store_true", help="print the table once, without the live view")
    args = parser.parse_args(argv)
    if args.pid <= 0:
        (top if args.command == "top" else dump).error(f"PID must be a positive process id, not {args.pid}")
    try:
        if args.command == "top":
            return top_command(args)
        report = dump_command(args.pid, args.signal, args.timeout, args.force)
    except CommandError as error:
        print(f"python -m threadctx {args.command}: error: {error}", file=sys.stderr)
        return 1
    sys.stdout.write(_shown(report))
    return 0


def _shown(report: str) -> str:
    """The report with every control character escaped, line by line: the process may not be honest."""
    return "\n".join(printable(line) for line in report.split("\n"))


if __name__ == "__main__":
    sys.exit(main())
