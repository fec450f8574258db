"""What several test modules share: the wait bound, a record-keeping handler, the reader switch.

Test-only code lives here, not in the package. The benchmarks use it too
(``from tests._helpers import use_reader``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from threadctx import _current, _runtime

JOIN = 30
"""Seconds: a bound for joins and waits, never a delay."""


class Records(logging.Handler):
    """Keeps every record it handles; :meth:`wait_for` blocks until a condition on them holds."""

    def __init__(self, level: int = logging.NOTSET) -> None:
        super().__init__(level)
        self.records: list[logging.LogRecord] = []
        self.changed = threading.Condition()

    def emit(self, record: logging.LogRecord) -> None:
        with self.changed:
            self.records.append(record)
            self.changed.notify_all()

    def messages(self) -> list[str]:
        """The messages of the records kept so far."""
        with self.changed:
            return [record.getMessage() for record in self.records]

    def wait_for(
        self, condition: Callable[[list[logging.LogRecord]], bool], timeout: float = JOIN
    ) -> list[logging.LogRecord]:
        """Wait (at most ``timeout`` seconds, else fail) until ``condition(records)``; return the records."""
        with self.changed:
            assert self.changed.wait_for(lambda: condition(self.records), timeout), self.records
            return list(self.records)


def use_reader(enabled: bool) -> None:
    """Read other threads' contexts with the compiled reader (``enabled``, where it is loaded) or the mirror.

    Chosen once at import (``THREADCTX_PURE_PYTHON``); tests and benchmarks switch between
    threads' lives. Every runtime context instance then takes the methods that go with it.
    """
    _current._read_contexts = _current.LOADED_READER if enabled else None
    for runtime in list(_runtime._instances):
        _runtime._choose_methods(runtime)
