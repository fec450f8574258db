"""Where the server's time goes under load: py-spy attached to ``bench_service``'s servers.

For each stack asked for, a server process of its own is started (the same app as the
service benchmark), loaded by 8 client threads from this process, and sampled by
``py-spy record --gil`` (Python frames only: no ``--native``; idle threads left out: no
``--idle``; only the thread holding the GIL, the one running Python code; full file
names, without which OpenTelemetry's logging instrumentation is ``logging/__init__.py``
like the standard library's). From the
collapsed stacks it prints, per stack:

- the frames with the most samples of their own ("self");
- the time of the pieces that (c) and (d) add over (b) (threadctx's modules,
  asgi-correlation-id, OpenTelemetry's logging and threading instrumentations): a sample
  counts for a piece when, walking from its innermost frame outwards, the first frame
  that is neither a helper (OpenTelemetry's API and SDK, ``uuid``, ``re``, ``weakref``,
  ``contextlib``, ``contextvars``) nor a piece's is one of the piece's; a frame of the
  application, the framework, the server or the stdlib's logging and threads first means
  the work would be done anyway (the log record's emit, the pool's submit), and it is not
  counted. Each piece is named by its outermost frame in that run (its entry point),
  with the innermost frames where the time goes beside it. Figures are microseconds of
  server CPU per request: samples / rate / requests served during the recording.

Usage: ``python -m benchmarks.profile_service [wsgi|asgi ...]`` (py-spy from PyPI on PATH
or in this interpreter's ``bin``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from pathlib import Path

from benchmarks.bench_service import SERVICES, Service, load, servers

RATE = 400  # samples per second
SECONDS = 15
#: Frames of the pieces that (c) and (d) add over (b): path fragments of their files.
ADDED = (
    "threadctx/",
    "asgi_correlation_id/",
    "instrumentation/logging/",
    "instrumentation/threading/",
)
#: Code a piece calls that is its own cost (the first frame outside these and the pieces is the caller's).
HELPERS = (
    "opentelemetry/context/",
    "opentelemetry/trace/",
    "opentelemetry/baggage/",
    "opentelemetry/propagate",
    "opentelemetry/propagators/",
    "opentelemetry/util/",
    "opentelemetry/sdk/",
    "opentelemetry/attributes/",
    "uuid.py",
    "re/",
    "re.py",
    "weakref.py",
    "contextlib.py",
    "contextvars",
    "inspect.py",
    "functools.py",
    "typing.py",
    "dataclasses.py",
    "types.py",
)
STACKS = ("c", "d")
HEADING = "### Where the servers spend their time: py-spy profiles under load"
EXPLANATION = """\
py-spy (from PyPI) attached to each server process under the same load as above, sampling the
thread that holds the GIL (`--gil`: the one running Python code), Python frames only. For each
stack: the frames with the most samples of their own, then the time of each piece that (c) or (d)
adds over (b), named by its entry point (see `benchmarks/profile_service.py` for the rule), as
microseconds of GIL-holding time per request. The samples are few (a few thousand per stack), so
a figure under about 2 µs is a handful of samples.

What threadctx's pieces do per request, by entry point:

- `ContextMiddleware.__call__` (WSGI and ASGI) and `RequestPolicy.enter`: read the current context
  (OpenTelemetry's middleware outside made it), look for baggage in it and for propagation headers
  in the request (none here, so nothing is extracted twice), take the request id from its header
  or generate one (`new_request_id`: 16 random bytes as a version 4 UUID in hex), and copy the
  context once with the id bound (`with_ids`); then attach it around the application and detach.
  `_AddHeader.__call__` adds the id to the response headers.
- `ContextFilter.filter`, once per log record: one `get_current`, one cache lookup by context,
  one `dict.update` of the record; the first record in a new context computes the fields
  (`context_fields`: the span's ids formatted once, the correlation IDs) and caches them.
- `_submit` / `run_in` (`instrument_threading()`), once per pool task: the submitter's context
  goes with the task, and the worker attaches it around the task and detaches after.

The peers' entries, for comparison: LoggingInstrumentor's record factory (`record_factory`) runs
for every record and looks up the span and the service name each time; ThreadingInstrumentor's
`_trace_submit`/`wrapped_func` carry the context into the task; asgi-correlation-id's middleware
validates the id as a UUID and sets a ContextVar, and its `CorrelationIdFilter` reads it per
record."""


def py_spy() -> str | None:
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


def _record(service: Service, variant: str, path: str, spy: str) -> tuple[Counter[str], int]:
    """Collapsed stacks of one stack's server under load, and the requests served meanwhile."""
    served = 0
    stop = threading.Event()

    def drive(port: int, pid: int) -> None:
        nonlocal served
        while not stop.is_set():
            load(port, pid, path, 400)
            served += 400

    one = Service(service.kind, service.title, {variant: service.variants[variant]}, service.paths)
    with servers(one) as found, tempfile.TemporaryDirectory() as tmp:
        port, pid = found[variant]
        load(port, pid, path, 400)  # warm-up
        out = os.path.join(tmp, "profile.txt")
        driver = threading.Thread(target=drive, args=(port, pid))
        driver.start()
        try:
            subprocess.run(
                [
                    *(spy, "record", "--pid", str(pid), "--rate", str(RATE), "--duration", str(SECONDS)),
                    *("--format", "raw", "--output", out, "--gil", "--nonblocking", "--full-filenames"),
                ],
                check=True,
                capture_output=True,
            )
        finally:
            stop.set()
            driver.join()
        stacks: Counter[str] = Counter()
        for line in Path(out).read_text().splitlines():
            stack, _, samples = line.rpartition(" ")
            if stack:
                stacks[stack] += int(samples)
    return stacks, served


def _short(frame: str) -> str:
    """``func (path/to/site-packages/pkg/mod.py:12)`` -> ``func (pkg/mod.py)``."""
    func, _, where = frame.partition(" (")
    file = where.rstrip(")").rsplit(":", 1)[0]
    for prefix in (r"^.*/site-packages/", r"^.*/src/", r"^.*/lib/python3\.\d+/"):
        file, found = re.subn(prefix, "", file)
        if found:
            break
    if file.startswith("/"):
        file = file.rsplit("/", 2)[-1]
    return f"`{func}` ({file})"


def _piece(frames: list[str]) -> tuple[str, str] | None:
    """(entry frame, innermost frame) of the piece a sample's time belongs to, or ``None``."""
    inner = None
    index = len(frames) - 1
    while index >= 0:
        frame = frames[index]
        if any(marker in frame for marker in ADDED):
            inner = inner or frame
            entry = frame
            # The run of the piece's (and helpers') frames outwards: its outermost piece frame is the entry.
            while index > 0 and any(m in frames[index - 1] for m in ADDED + HELPERS):
                index -= 1
                if any(m in frames[index] for m in ADDED):
                    entry = frames[index]
            return _short(entry), _short(inner)
        if not any(marker in frame for marker in HELPERS):
            return None
        index -= 1
    return None


def summarize(stacks: Counter[str], served: int, top: int = 12) -> tuple[list[str], list[str]]:
    """(self rows, added-piece rows): Markdown table rows with µs per request."""
    per_request = 1e6 / RATE / max(served, 1)
    own: Counter[str] = Counter()
    entries: Counter[str] = Counter()
    inner: dict[str, Counter[str]] = {}
    for stack, samples in stacks.items():
        frames = stack.split(";")
        own[_short(frames[-1])] += samples
        found = _piece(frames)
        if found is not None:
            entries[found[0]] += samples
            inner.setdefault(found[0], Counter())[found[1]] += samples
    total = sum(stacks.values())
    self_rows = [
        f"| {name} | {count / total:.1%} | {count * per_request:,.1f} |"
        for name, count in own.most_common(top)
    ]
    added_rows = [
        f"| {name} | {count / total:.1%} | {count * per_request:,.1f} | "
        + ", ".join(f"{where} {n * per_request:,.1f}" for where, n in inner[name].most_common(3))
        + " |"
        for name, count in entries.most_common(top)
    ]
    pieces = sum(entries.values())
    added_rows.append(f"| all of them | {pieces / total:.1%} | {pieces * per_request:,.1f} | |")
    return self_rows, added_rows


def run(kinds: list[str]) -> str:
    spy = py_spy()
    if spy is None:
        return "(py-spy is not installed here: `pip install py-spy`, then `make bench` again.)\n"
    out = []
    for kind in kinds:
        service = SERVICES[kind]
        for label, path in service.paths.items():
            for variant in STACKS:
                stacks, served = _record(service, variant, path, spy)
                self_rows, added_rows = summarize(stacks, served)
                where = f", {label}" if label else ""
                out += [
                    f"#### {service.title}{where}: ({variant}) {service.variants[variant]}",
                    "",
                    f"{sum(stacks.values()):,} samples over {SECONDS} s at {RATE} per second, {served:,} "
                    "requests served meanwhile.",
                    "",
                    "| frame (its own time) | share of samples | µs per request |",
                    "|---|---|---|",
                    *self_rows,
                    "",
                    "| piece the stack adds over (b), by entry | share of samples | µs per request "
                    "| innermost frames, µs per request |",
                    "|---|---|---|---|",
                    *added_rows,
                    "",
                ]
    return "\n".join(out)


if __name__ == "__main__":
    print(run(sys.argv[1:] or list(SERVICES)))
