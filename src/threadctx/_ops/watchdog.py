"""The watchdog: a thread of its own that warns, once, about every span served longer than a threshold.

It only reads: each check takes a :func:`snapshot` (no lock, nothing on the
request path) and, when a span has newly become stuck, the stacks.  It logs
in the stuck thread's context, so the warning carries that request's trace
id and correlation IDs, not its own.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import math
import sys
import threading
import time
from collections.abc import Iterable
from types import TracebackType

from opentelemetry import context as otel_context
from opentelemetry.context import Context

from threadctx._fields import RESERVED
from threadctx._ops.report import NO_STACK, current_frames, describe_span, stack
from threadctx._snapshot import ThreadSnapshot, snapshot_with_contexts, warn_if_foreign_runtime
from threadctx._storage import OwnThread, at_fork_in_child
from threadctx._text import printable

__all__ = ["Ages", "Watchdog", "start_watchdog"]

_THREAD_NAME = "threadctx-watchdog"
_FRAMES = 8

_SpanKey = tuple[int, str, str | None]


class Ages:
    """How long each thread has served its current span.

    From the span's start where the snapshot knows it (SDK spans); else from
    the first time this tracker saw the span (spans that were not sampled,
    or a caller's span carried in without a local one), so to within one
    look.
    """

    def __init__(self) -> None:
        self._first_seen: dict[_SpanKey, float] = {}

    def busy(
        self, entries: Iterable[ThreadSnapshot], now: float
    ) -> list[tuple[ThreadSnapshot, _SpanKey, float]]:
        """The entries serving a span, each with its key and age in seconds; forgets ended spans."""
        seen: dict[_SpanKey, float] = {}
        result = []
        for entry in entries:
            if entry.trace_id is None:  # snapshot() never lists threadctx's own threads (OwnThread)
                continue
            key = (entry.thread_id, entry.trace_id, entry.span_id)
            first = seen[key] = self._first_seen.get(key, now)
            age = entry.elapsed if entry.elapsed is not None else max(0.0, now - first)
            result.append((entry, key, age))
        self._first_seen = seen
        return result


class Watchdog:
    """A running watchdog, as :func:`start_watchdog` returns it (which checks the options first).

    Stop it with :meth:`stop`, or use it as a context manager::

        with threadctx.start_watchdog(threshold=10.0):
            serve()

    .. versionadded:: 0.1.0
    """

    def __init__(self, threshold: float, interval: float, logger: logging.Logger) -> None:
        #: Seconds a thread may serve one span before it is reported.
        self.threshold = threshold
        #: Seconds between two looks.
        self.interval = interval
        #: Where the warnings go.
        self.logger = logger
        self._reported: set[_SpanKey] = set()
        self._ages = Ages()
        self._failed = False
        self._start()

    def _start(self) -> None:
        """Start the thread (also in a forked child, whose copy of the old one's lock may be held)."""
        self._stopping = threading.Event()
        self._thread = OwnThread(self._run, _THREAD_NAME)
        _running.append(self)
        self._thread.start()

    def _run(self) -> None:
        # Event.wait refuses more than TIMEOUT_MAX (some 292 years): a longer interval never ends anyway.
        while not self._stopping.wait(min(self.interval, threading.TIMEOUT_MAX)):
            try:
                self._check()
            except Exception as error:  # a bug must not end the watching: say so once
                self._report(error)

    def _check(self) -> None:
        taken = snapshot_with_contexts()
        busy = self._ages.busy([entry for entry, _ in taken], time.time())
        self._reported &= {key for _, key, _ in busy}  # forget spans that ended
        stuck = [(entry, key, age) for entry, key, age in busy if age >= self.threshold]
        new = [item for item in stuck if item[1] not in self._reported]
        if not new:
            return
        contexts = {entry.thread_id: context for entry, context in taken}
        frames = current_frames()  # only now: it materialises every thread's frames
        try:
            for entry, key, age in new:
                self._reported.add(key)
                frame = frames.get(entry.thread_id)
                if frame is not None:
                    lines = stack(frame, _FRAMES, source=True)
                else:  # a free-threaded build says why; a thread that ended meanwhile has none
                    lines = [NO_STACK] if entry.thread_id in frames else []
                self._warn(entry, contexts[entry.thread_id], age, lines)
        finally:
            del frames  # this thread's own frame is among them: no cycle left behind

    def _warn(self, entry: ThreadSnapshot, context: Context | None, age: float, stack: list[str]) -> None:
        extra: dict[str, object] = {"trace_id": entry.trace_id, "span_id": entry.span_id}
        for name, value in entry.correlation.items():
            if name not in RESERVED:  # a record's own attributes can't be given in extra=
                extra.setdefault(name, printable(value))
        # Nor can what a LogRecord factory sets (logging raises KeyError): that stays as it is.
        made = vars(logging.getLogRecordFactory()(self.logger.name, logging.WARNING, "", 0, "", (), None))
        extra = {name: value for name, value in extra.items() if name not in made}
        details = "\n".join(describe_span(entry) + (["  stack (innermost last):", *stack] if stack else []))
        # Logged in the stuck thread's context, so that every filter and handler (threadctx's,
        # OpenTelemetry's) attributes the record to the stuck request.
        token = otel_context.attach(context) if context is not None else None
        try:
            self.logger.warning(
                'thread "%s" (ident=%d) has served its span for %.1fs (threshold %gs)\n%s',
                printable(entry.name),
                entry.thread_id,
                age,
                self.threshold,
                details,
                extra=extra,
            )
        finally:
            if token is not None:
                otel_context.detach(token)

    def _report(self, error: Exception) -> None:
        """Say once, on stderr and not through logging (which may be what failed), that a look failed."""
        if self._failed:
            return
        self._failed = True
        with contextlib.suppress(Exception):
            sys.stderr.write(
                f"threadctx watchdog: a look failed ({type(error).__name__}: "
                f"{printable(str(error))[:200]}); it keeps watching\n"
            )

    @property
    def running(self) -> bool:
        """Whether the watchdog's thread is running."""
        return self._thread.is_alive() and not self._stopping.is_set()

    def stop(self, timeout: float | None = None) -> None:
        """Stop watching and wait (up to ``timeout`` seconds) for the thread to end.

        Calling it again, or on a watchdog whose thread has ended, does nothing.
        """
        self._stopping.set()
        with contextlib.suppress(ValueError):
            _running.remove(self)
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def __enter__(self) -> Watchdog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


#: The watchdogs started and not stopped, to restart after fork and stop at exit.
_running: list[Watchdog] = []


def _restart_in_child() -> None:
    """In a forked child only the forking thread exists: start each watchdog's thread again, once."""
    running = _running[:]
    _running.clear()
    for watchdog in running:
        watchdog._start()


@atexit.register
def _stop_all() -> None:
    """Stop every watchdog at interpreter exit, before daemon threads are frozen mid-log."""
    for watchdog in _running[:]:
        watchdog.stop(timeout=5.0)


at_fork_in_child(_restart_in_child)


def start_watchdog(
    threshold: float = 30.0, *, interval: float | None = None, logger: logging.Logger | str | None = None
) -> Watchdog:
    """Start a thread that warns about every thread serving one span longer than ``threshold`` seconds.

    Every ``interval`` seconds (default: a quarter of ``threshold``) it looks
    at every thread's current span and, once per stuck span, logs a WARNING
    on the ``threadctx.watchdog`` logger (or ``logger``) that names the
    thread, the span, its correlation IDs, how long it has run, and its
    innermost frames::

        watchdog = threadctx.start_watchdog(threshold=30.0)

    The record is logged in the stuck thread's context and carries its
    ``trace_id``, ``span_id`` and correlation IDs as attributes, so the
    warning lands in the stuck request's trace.  A span's age comes from its
    start time (SDK spans), else from when the watchdog first saw it.

    Nothing runs on the request path: the watchdog reads the registry that
    :func:`snapshot` reads, takes no lock a request thread may hold (until
    it logs, through your handlers), and copes with threads ending while it
    looks.  A process runs one watchdog: calling this again stops the
    running one first.  It stops at interpreter exit; in a child created by
    ``fork`` it runs again, once.

    Returns:
        The :class:`Watchdog`; its :meth:`~Watchdog.stop` ends it.

    Raises:
        ValueError: ``threshold`` or ``interval`` is not a positive number.

    .. versionadded:: 0.1.0
    """
    if not (isinstance(threshold, (int, float)) and math.isfinite(threshold) and threshold > 0):
        raise ValueError(f"threshold must be a positive number of seconds, not {threshold!r}")
    if interval is None:
        interval = threshold / 4
    if not (isinstance(interval, (int, float)) and math.isfinite(interval) and interval > 0):
        raise ValueError(f"interval must be a positive number of seconds, not {interval!r}")
    warn_if_foreign_runtime()
    if logger is None or isinstance(logger, str):
        logger = logging.getLogger(logger or "threadctx.watchdog")
    for running in _running[:]:  # one per process: this one replaces it
        running.stop()
    return Watchdog(float(threshold), float(interval), logger)
