"""The live views' table: one row per thread serving a request, shared by ``top`` and the threadz page.

A row is plain data (it crosses the file exchange as JSON and becomes a page);
every text value in it is untrusted (span names and IDs come from callers) and
is escaped by whoever shows it: the terminal with :func:`~threadctx._text.printable`, the page
with ``html.escape``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from threadctx._ops.report import DUMP_THREAD_NAME, NO_STACK, current_frames, stack
from threadctx._snapshot import ThreadSnapshot
from threadctx._text import printable

#: threadctx's own threads (the watchdog's is ``watchdog._THREAD_NAME``, a layer above): the watchdog
#: holds a stuck thread's context for a moment while it logs, which is not a request of its own.
OWN_THREADS = frozenset({DUMP_THREAD_NAME, "threadctx-watchdog"})

#: The watchdog's default threshold, in seconds: past it a row is marked.
DEFAULT_THRESHOLD = 30.0


@dataclass(frozen=True)
class Row:
    """One thread serving a request: a span, or correlation IDs bound without one."""

    thread: str
    thread_id: int
    native_id: int
    trace_id: str | None
    span_id: str | None
    span_name: str | None
    age_s: float | None
    correlation: Mapping[str, str] = field(default_factory=dict)
    stack: tuple[str, ...] = ()

    def as_json(self, *, stack: bool = True) -> dict[str, Any]:
        """The row as a JSON object (the threadz page's fields, ``thread_id``, ``native_id``, ``stack``)."""
        data: dict[str, Any] = {
            "thread": self.thread,
            "trace_id": self.trace_id,
            "span_id": self.span_id,
            "span_name": self.span_name,
            "age_s": None if self.age_s is None else round(self.age_s, 3),
            "correlation": dict(self.correlation),
            "thread_id": self.thread_id,
            "native_id": self.native_id,
        }
        if stack:
            data["stack"] = list(self.stack)
        return data

    @classmethod
    def from_json(cls, data: object) -> Row:
        """A row read back from :meth:`as_json`'s output, written by another process: checked field by field.

        The ids must be lowercase hex digits of their length (they are shown unescaped).

        Raises:
            ValueError: ``data`` is not such an object.
        """
        if not isinstance(data, dict):
            raise ValueError("a row is a JSON object")

        def text(name: str) -> str | None:
            value = data.get(name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{name} is not a string")
            return value

        def hex_id(name: str, digits: int) -> str | None:
            value = text(name)
            if value is not None and not (
                len(value) == digits and value.isascii() and all(c in "0123456789abcdef" for c in value)
            ):
                raise ValueError(f"{name} is not {digits} lowercase hex digits")
            return value

        def number(name: str) -> int:
            value = data.get(name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{name} is not an integer")
            return value

        age = data.get("age_s")
        if age is not None and not (isinstance(age, (int, float)) and math.isfinite(age)):
            raise ValueError("age_s is not a number")
        correlation = data.get("correlation", {})
        stack = data.get("stack", [])
        if not isinstance(correlation, dict) or not all(
            isinstance(key, str) and isinstance(value, str) for key, value in correlation.items()
        ):
            raise ValueError("correlation is not an object of strings")
        if not isinstance(stack, list) or not all(isinstance(line, str) for line in stack):
            raise ValueError("stack is not a list of strings")
        return cls(
            thread=text("thread") or "",
            thread_id=number("thread_id"),
            native_id=number("native_id"),
            trace_id=hex_id("trace_id", 32),
            span_id=hex_id("span_id", 16),
            span_name=text("span_name"),
            age_s=None if age is None else float(age),
            correlation=correlation,
            stack=tuple(stack),
        )


def serving(entry: ThreadSnapshot) -> bool:
    """Whether the snapshot's thread serves a request: a valid span, or correlation IDs."""
    return (entry.trace_id is not None or bool(entry.correlation)) and entry.name not in OWN_THREADS


def rows_of(
    entries: Iterable[ThreadSnapshot], stacks: Mapping[int, list[str]] | None = None, *, exclude: int = 0
) -> list[Row]:
    """The rows of the threads serving a request (but thread ``exclude``), oldest first.

    ``stacks`` gives each thread's stack lines by ident, where they are wanted.
    """
    rows = [
        Row(
            thread=entry.name,
            thread_id=entry.thread_id,
            native_id=entry.native_id,
            trace_id=entry.trace_id,
            span_id=entry.span_id,
            span_name=entry.span_name,
            age_s=entry.elapsed,
            correlation=dict(entry.correlation),
            stack=tuple(stacks.get(entry.thread_id, ())) if stacks is not None else (),
        )
        for entry in entries
        if serving(entry) and entry.thread_id != exclude
    ]
    return sort_rows(rows)


def serving_stacks(entries: list[ThreadSnapshot], frames: int, source: bool) -> dict[int, list[str]]:
    """The stacks of the threads among ``entries`` that serve a request, by ident."""
    current = current_frames()
    wanted = {entry.thread_id for entry in entries if serving(entry)}
    stacks = {
        ident: stack(frame, frames, source) if frame is not None else [NO_STACK]
        for ident, frame in current.items()
        if ident in wanted
    }
    del current  # the frames, this one included, would otherwise stay alive in a cycle
    return stacks


def sort_rows(rows: list[Row]) -> list[Row]:
    """Oldest first; rows of unknown age last, by thread name."""
    return sorted(rows, key=lambda row: (row.age_s is None, -(row.age_s or 0.0), row.thread, row.thread_id))


class FirstSeen:
    """Ages for rows whose span start is unknown, from the first look that saw the same request.

    A span that was not sampled, or only the caller's span carried in, has
    no start time, nor has a request served without a span: its age is then
    counted from the first time this tracker saw that thread serve it, so it
    is short by up to one look.  Not thread-safe: one caller at a time.
    """

    def __init__(self) -> None:
        self._seen: dict[tuple[object, ...], float] = {}

    def fill(self, rows: Iterable[Row], now: float | None = None) -> list[Row]:
        """``rows`` with every unknown age filled in, oldest first; forgets requests no longer seen."""
        now = time.time() if now is None else now
        seen: dict[tuple[object, ...], float] = {}
        result = []
        for row in rows:
            key = (row.thread_id, row.trace_id, row.span_id, tuple(sorted(row.correlation.items())))
            first = seen[key] = self._seen.get(key, now)
            result.append(row if row.age_s is not None else replace(row, age_s=max(0.0, now - first)))
        self._seen = seen
        return sort_rows(result)


# ---------------------------------------------------------------------------
# The table as text, for `python -m threadctx top` (the screen and --once).

HEADINGS = ("", "AGE", "THREAD", "TRACE ID", "SPAN", "CORRELATION")


def age_text(age: float | None) -> str:
    """``age`` as the table shows it: ``12.3s``, ``4m05s``, ``2h03m``, or ``?``."""
    if age is None:
        return "?"
    if age < 60:
        return f"{age:.1f}s"
    minutes = int(age // 60)
    if minutes < 60:
        return f"{minutes}m{int(age % 60):02d}s"
    return f"{minutes // 60}h{minutes % 60:02d}m"


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(0, width - 1)] + "~"


def correlation_text(correlation: Mapping[str, str], width: int | None = None) -> str:
    """The correlation IDs as ``name=value`` pairs, ``request_id`` first, as many as fit ``width``."""
    names = sorted(correlation, key=lambda name: (name != "request_id", name))
    pairs = [f"{printable(name)}={printable(correlation[name])}" for name in names]
    text = " ".join(pairs)
    if width is None or len(text) <= width:
        return text
    for count in range(len(pairs) - 1, 0, -1):  # the first ones, and how many more
        text = " ".join(pairs[:count]) + f" +{len(pairs) - count}"
        if len(text) <= width:
            return text
    return _cut(pairs[0], width)


def cells(row: Row, threshold: float) -> tuple[str, ...]:
    """The row's cells, escaped for a terminal; the first is ``!`` past ``threshold``."""
    stuck = row.age_s is not None and row.age_s >= threshold
    return (
        "!" if stuck else "",
        age_text(row.age_s),
        printable(row.thread),
        row.trace_id or "-",
        printable(row.span_name) if row.span_name else "-",
    )


def text_table(rows: Iterable[Row], threshold: float, width: int | None = None) -> list[str]:
    """The table as lines: headings first, then one line per row, each at most ``width`` characters.

    Without ``width`` nothing is cut (for scripts).  With it, the thread and
    span names are cut to fit and the correlation IDs get what is left,
    ``request_id`` first.
    """
    rows = list(rows)
    table = [cells(row, threshold) for row in rows]
    columns = list(zip(*table, strict=True)) if table else [() for _ in HEADINGS[:-1]]
    limits = [1, 7, 24, 32, 32] if width is not None else [None] * 5
    widths = [
        min(max([len(HEADINGS[index]), *(len(cell) for cell in column)]), limit or 10**9)
        for index, (column, limit) in enumerate(zip(columns, limits, strict=True))
    ]
    fixed = sum(widths) + 2 * len(widths)
    rest = None if width is None else max(0, width - fixed)

    def line(values: tuple[str, ...], correlation: str) -> str:
        text = "  ".join(
            (_cut(value, size) if width is not None else value).ljust(size)
            for value, size in zip(values, widths, strict=True)
        )
        text = f"{text}  {correlation}".rstrip()
        return text if width is None else text[:width]

    lines = [line(HEADINGS[:-1], HEADINGS[-1])]
    for row, values in zip(rows, table, strict=True):
        lines.append(line(values, correlation_text(row.correlation, rest)))
    return lines
