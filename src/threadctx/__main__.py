"""``python -m threadctx dump PID``: ask a running process for its threadctx report and print it."""

from __future__ import annotations

import argparse
import contextlib
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
)

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
    directory = runtime_dir()
    try:
        check_private_dir(directory, create=True)
    except RuntimeDirError as error:
        raise CommandError(str(error)) from None
    request, report = request_path(directory, pid), report_path(directory, pid)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(report)
    _create_request(request)
    try:
        os.kill(pid, signum)
    except OSError as error:
        os.unlink(request)
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
    raise CommandError(
        f"process {pid} did not answer within {timeout:g}s: it catches {signum.name}, but not with "
        f"threadctx.install_dump_signal() (another handler?), or its main thread has not run Python "
        f"since (signal handlers run there), or it sees another {directory} (another "
        f"{RUNTIME_DIR_ENV}, a private /tmp)"
    )


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
    dump.add_argument("pid", type=int, metavar="PID", help="the process id")
    dump.add_argument(
        "--signal",
        type=_signal_named,
        default="USR1",
        help="the signal given to install_dump_signal() (default: USR1)",
    )
    dump.add_argument(
        "--timeout", type=float, default=10.0, help="seconds to wait for the report (default: 10)"
    )
    dump.add_argument(
        "--force",
        action="store_true",
        help="send the signal even where it can't be told that the process catches it (no /proc)",
    )
    args = parser.parse_args(argv)
    if args.pid <= 0:
        dump.error(f"PID must be a positive process id, not {args.pid}")
    try:
        report = dump_command(args.pid, args.signal, args.timeout, args.force)
    except CommandError as error:
        print(f"python -m threadctx dump: error: {error}", file=sys.stderr)
        return 1
    sys.stdout.write(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
