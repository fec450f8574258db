"""``python -m threadctx top PID``'s screen: the table of :mod:`threadctx._ops.table`, live, with curses.

The command (``__main__``) asks the process; this module only shows what a
``fetch`` callable returns, so it knows nothing of signals or files.
"""

from __future__ import annotations

import contextlib
import curses
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from threadctx._ops.table import Row, age_text, correlation_text, text_table
from threadctx._text import printable

_ENTER = (curses.KEY_ENTER, 10, 13)
_BACK = (27, curses.KEY_LEFT, curses.KEY_BACKSPACE, 127, ord("h"))
_NOTHING = "no thread is serving a request"


@dataclass(frozen=True)
class Snapshot:
    """One look at the process: its rows, oldest first."""

    rows: list[Row] = field(default_factory=list)
    #: The runtime context's class when it is not threadctx's (then only one thread is seen).
    foreign_runtime: str | None = None


def _note(snapshot: Snapshot) -> str | None:
    if snapshot.foreign_runtime is None:
        return None
    return (
        f"note: the process's runtime context is {printable(snapshot.foreign_runtime)}, not threadctx's: "
        "only its main thread is seen (set OTEL_PYTHON_CONTEXT=threadctx)"
    )


def plain(snapshot: Snapshot, threshold: float) -> str:
    """The table once, nothing cut, for scripts (``--once``, or standard output not a terminal)."""
    lines = text_table(snapshot.rows, threshold)
    if not snapshot.rows:
        lines.append(f"({_NOTHING})")
    note = _note(snapshot)
    if note:
        lines.append(note)
    return "\n".join(lines) + "\n"


def run(fetch: Callable[[bool], Snapshot], pid: int, interval: float, threshold: float) -> None:
    """Show the live view until ``q`` (or Ctrl-C); what ``fetch`` raises ends it, the terminal restored.

    ``fetch(stacks)`` takes one look at the process; ``stacks`` asks for the threads' stacks too,
    which the screen does only while it shows one.
    """
    screen = _Screen(fetch, pid, interval, threshold)
    with contextlib.suppress(KeyboardInterrupt):
        curses.wrapper(screen.loop)


class _Screen:
    def __init__(
        self, fetch: Callable[[bool], Snapshot], pid: int, interval: float, threshold: float
    ) -> None:
        self.fetch = fetch
        self.pid = pid
        self.interval = interval
        self.threshold = threshold
        self.snapshot = Snapshot()
        self.selected: int | None = None  # the selected thread's ident: it stays selected as rows move
        self.showing_stack = False
        self.taken = ""
        self.next_look = 0.0

    def loop(self, window: curses.window) -> None:
        with contextlib.suppress(curses.error):
            curses.curs_set(0)
        self.stuck_attr = curses.A_BOLD
        if curses.has_colors():
            with contextlib.suppress(curses.error):
                curses.use_default_colors()
                curses.init_pair(1, curses.COLOR_RED, -1)
                self.stuck_attr |= curses.color_pair(1)
        while True:
            now = time.monotonic()
            if now >= self.next_look:
                self.look()
                self.next_look = now + self.interval
                self.draw(window)
            window.timeout(max(0, int((self.next_look - time.monotonic()) * 1000)))
            key = window.getch()
            if key == -1:
                continue
            if key in (ord("q"), ord("Q")):
                return
            self.press(key)
            self.draw(window)

    def look(self) -> None:
        self.snapshot = self.fetch(self.showing_stack)
        self.taken = time.strftime("%H:%M:%S")
        idents = [row.thread_id for row in self.snapshot.rows]
        if self.selected not in idents and not self.showing_stack:
            self.selected = idents[0] if idents else None

    def press(self, key: int) -> None:
        idents = [row.thread_id for row in self.snapshot.rows]
        if self.showing_stack:
            if key in _ENTER or key in _BACK:
                self.showing_stack = False
            return
        if not idents:
            return
        index = idents.index(self.selected) if self.selected in idents else 0
        if key in (curses.KEY_UP, ord("k")):
            index = max(0, index - 1)
        elif key in (curses.KEY_DOWN, ord("j")):
            index = min(len(idents) - 1, index + 1)
        elif key in (curses.KEY_HOME, ord("g")):
            index = 0
        elif key in (curses.KEY_END, ord("G")):
            index = len(idents) - 1
        elif key in _ENTER:
            self.showing_stack = True
            self.next_look = 0.0  # now, with the stacks
        self.selected = idents[index]

    def draw(self, window: curses.window) -> None:
        height, width = window.getmaxyx()
        window.erase()
        rows = self.snapshot.rows
        title = (
            f"threadctx top: process {self.pid}, {len(rows)} threads serving requests at {self.taken}, "
            f"'!' = {self.threshold:g}s or more"
        )
        _put(window, 0, title, curses.A_BOLD)
        if self.showing_stack:
            _put(window, 1, "Enter/Esc: back to the table   q: quit")
            self.draw_stack(window, height)
        else:
            _put(window, 1, "up/down or j/k: select   Enter: stack   q: quit")
            self.draw_table(window, height, width)
        note = _note(self.snapshot)
        if note:
            _put(window, height - 1, note, curses.A_BOLD)
        window.refresh()

    def draw_table(self, window: curses.window, height: int, width: int) -> None:
        rows = self.snapshot.rows
        lines = text_table(rows, self.threshold, width - 1)
        _put(window, 3, lines[0], curses.A_REVERSE)
        if not rows:
            _put(window, 4, f"({_NOTHING})")
            return
        room = max(1, height - 5)
        index = next((i for i, row in enumerate(rows) if row.thread_id == self.selected), 0)
        first = max(0, index - room + 1)
        for y, (row, line) in enumerate(zip(rows[first:], lines[1 + first :], strict=False), start=4):
            if y >= height - 1:
                break
            attr = self.stuck_attr if _stuck(row, self.threshold) else 0
            if row.thread_id == self.selected:
                attr |= curses.A_REVERSE
            _put(window, y, line, attr)

    def draw_stack(self, window: curses.window, height: int) -> None:
        row = next((row for row in self.snapshot.rows if row.thread_id == self.selected), None)
        if row is None:
            _put(window, 3, "that thread is no longer serving a request (Enter: back)")
            return
        lines = [
            f'thread "{printable(row.thread)}" ident={row.thread_id} native_id={row.native_id}, '
            f"serving for {age_text(row.age_s)}",
            f"  trace_id={row.trace_id or '-'} span_id={row.span_id or '-'}"
            + (f' span_name="{printable(row.span_name)}"' if row.span_name else ""),
        ]
        if row.correlation:
            lines.append(f"  correlation: {correlation_text(row.correlation)}")
        if row.stack:
            lines.append("  stack (innermost last):")
            lines += [printable(line) for line in row.stack]
        else:
            lines.append("  (asking for the stack)")
        for y, line in enumerate(lines, start=3):
            if y >= height - 1:
                break
            _put(window, y, line, self.stuck_attr if y == 3 and _stuck(row, self.threshold) else 0)


def _stuck(row: Row, threshold: float) -> bool:
    return row.age_s is not None and row.age_s >= threshold


def _put(window: curses.window, y: int, text: str, attr: int = 0) -> None:
    """Write ``text`` (cut to the width) on line ``y``; writing the last cell is no error."""
    height, width = window.getmaxyx()
    if 0 <= y < height:
        with contextlib.suppress(curses.error):
            window.addnstr(y, 0, text, max(0, width - 1), attr)
