"""The report on a signal: :func:`install_dump_signal`, and the thread that logs reports for it."""

from __future__ import annotations

import contextlib
import logging
import queue
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from types import FrameType
from typing import IO, Any

from threadctx._ops.exchange import answer_request, write_fd
from threadctx._ops.report import DUMP_THREAD_NAME, report
from threadctx._snapshot import warn_if_foreign_runtime
from threadctx._storage import OwnThread, at_fork_in_child

__all__ = ["install_dump_signal"]


class _LogThread:
    """Logs reports from a thread of its own: a signal handler must not log (handler locks, recursion).

    One per process, whatever the number of install_dump_signal() calls; restarted in a forked child.
    """

    def __init__(self) -> None:
        # put() is safe in a signal handler; each report comes with the logger it goes to.
        self.reports: queue.SimpleQueue[tuple[logging.Logger, str]] = queue.SimpleQueue()
        self.start()

    def start(self) -> None:
        self.thread = OwnThread(self.run, DUMP_THREAD_NAME)
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


at_fork_in_child(_restart_log_thread_in_child)  # once, for every install


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
    """
    global _log_thread  # noqa: PLW0603 - one logging thread per process
    if file is not None and logger is not None:
        raise ValueError("give file or logger, not both")
    if frames < 0:
        raise ValueError(f"frames must be 0 or more, not {frames}")
    if threading.current_thread() is not threading.main_thread():
        raise ValueError("install_dump_signal() must be called from the main thread")
    warn_if_foreign_runtime()  # now, not in the handler (where warning could deadlock)
    if logger is not None:
        if _log_thread is None:
            _log_thread = _LogThread()
        reports = _log_thread.reports
        target_logger = logging.getLogger(logger) if isinstance(logger, str) else logger

        def handler(signum: int, frame: FrameType | None) -> None:
            if not answer_request(frames):
                reports.put((target_logger, report(frames, source=False)))

    else:
        target = sys.stderr if file is None else file
        fd = target if isinstance(target, int) else target.fileno()

        def handler(signum: int, frame: FrameType | None) -> None:
            if not answer_request(frames):
                write_fd(fd, report(frames, source=False).encode("utf-8", "backslashreplace"))

    return signal.signal(signum, handler)
