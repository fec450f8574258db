"""The live views against real services: ``python -m threadctx top`` in a real terminal, the threadz page.

A service (tests/_live_service.py: waitress or uvicorn, threadctx's middleware, the dump
signal, threadz at /threadz) holds requests in flight on events; what both views show is
checked against that service's own ``snapshot()``.
"""

from __future__ import annotations

import contextlib
import html.parser
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from _servers import free_port, get
from threadctx._current import reader_in_use

HERE = Path(__file__).resolve().parent
SERVICE = HERE / "_live_service.py"
WAIT = 60.0
#: A span name no page or terminal may take for markup or for a control sequence.
HOSTILE_SPAN = "<script>alert(1)</script>\"'&\x1b[31m red"
#: A correlation ID value (printable, so bind() takes it) that tries the same.
HOSTILE_ID = '<img src=x onerror=alert(2)>"'

pytestmark = pytest.mark.skipif(
    not hasattr(signal, "SIGUSR1") or not hasattr(os, "getuid"), reason="needs SIGUSR1 and user ids"
)


class Service:
    """tests/_live_service.py in a process of its own, and the requests it holds."""

    def __init__(self, kind: str, runtime_dir: Path, output: Path) -> None:
        self.port = free_port()
        env = {key: value for key, value in os.environ.items() if key != "OTEL_PYTHON_CONTEXT"}
        env.update(PYTHONUNBUFFERED="1", THREADCTX_RUNTIME_DIR=str(runtime_dir))
        self.output = output
        with output.open("w") as sink:
            self.process = subprocess.Popen(
                [sys.executable, str(SERVICE), kind, str(self.port)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=sink,
                text=True,
            )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        assert line.startswith("ready "), output.read_text()
        self.pid = self.process.pid
        self.clients: dict[str, threading.Thread] = {}
        self.answers: dict[str, tuple[int, bytes]] = {}
        self.get("/ping")  # the server accepts connections

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        deadline = time.monotonic() + WAIT
        while True:
            try:
                return get(self.port, path, headers or {})
            except ConnectionRefusedError:  # the server starts listening just after "ready"
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)  # polling for readiness, bounded by the deadline

    def hold(self, name: str, *, request_id: str | None = None, **query: str) -> None:
        """Send request ``name`` and return once the service holds it in flight."""
        path = "/hold?" + urllib.parse.urlencode({"name": name, **query})
        headers = {"X-Request-ID": request_id} if request_id else {}

        def client() -> None:
            status, _, body = get(self.port, path, headers)
            self.answers[name] = (status, body)

        self.clients[name] = thread = threading.Thread(target=client, name=f"client-{name}")
        thread.start()
        assert self.get(f"/inside?name={name}")[2] == b"inside\n"

    def release_all(self) -> None:
        for name, thread in self.clients.items():
            self.get(f"/release?name={name}")
            thread.join(WAIT)
            assert self.answers[name] == (200, b"released\n")
        self.clients.clear()

    def snapshot(self) -> list[dict[str, Any]]:
        """The service's threadctx.snapshot(), taken in the service."""
        status, _, body = self.get("/snapshot")
        assert status == 200
        entries: list[dict[str, Any]] = json.loads(body)
        return entries

    def stop(self) -> None:
        if self.process.poll() is None:
            self.release_all()
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(WAIT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(WAIT)
        assert self.process.stdout is not None
        self.process.stdout.close()


@pytest.fixture
def runtime_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "run"
    monkeypatch.setenv("THREADCTX_RUNTIME_DIR", str(directory))
    return directory


@pytest.fixture
def service(request: pytest.FixtureRequest, runtime_dir: Path, tmp_path: Path) -> Iterator[Service]:
    kind = getattr(request, "param", "wsgi")
    if kind == "asgi":
        pytest.importorskip("uvicorn")
    started = Service(kind, runtime_dir, tmp_path / "service.log")
    try:
        yield started
    finally:
        started.stop()


def held(service: Service) -> dict[str, dict[str, Any]]:
    """Three requests held in flight: a hostile span name, a hostile correlation ID, no span at all."""
    service.hold("a", request_id="req-a", tenant="acme")
    service.hold("b", request_id="req-b", span=HOSTILE_SPAN, tenant=HOSTILE_ID)
    service.hold("c", request_id="req-c", nospan="1")
    entries = {
        entry["correlation"].get("request_id"): entry
        for entry in service.snapshot()
        if entry["correlation"].get("request_id") in ("req-a", "req-b", "req-c")
    }
    assert sorted(entries) == ["req-a", "req-b", "req-c"]
    assert entries["req-b"]["span_name"] == HOSTILE_SPAN
    assert entries["req-c"]["trace_id"] is None
    return entries


def top(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "threadctx", "top", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def printable(text: str) -> str:
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode() for ch in text)


# ---------------------------------------------------------------------------
# python -m threadctx top


@pytest.mark.parametrize("service", ["wsgi", "asgi"], indirect=True)
def test_top_once_prints_the_rows_snapshot_sees_oldest_first(service: Service, runtime_dir: Path) -> None:
    entries = held(service)
    result = top(str(service.pid), "--once")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["AGE", "THREAD", "TRACE", "ID", "SPAN", "CORRELATION"]
    rows = lines[1:]
    assert len(rows) == 3, result.stdout  # the held requests, and nothing else
    for row, request_id in zip(rows, ["req-a", "req-b", "req-c"], strict=True):
        entry = entries[request_id]
        assert not row.startswith("!"), "nothing is 30s old"
        age, thread, trace_id = row.split()[:3]
        assert re.fullmatch(r"\d+\.\ds", age)
        assert thread == entry["name"]
        assert trace_id == (entry["trace_id"] or "-")
        assert f"request_id={request_id}" in row
    assert "hold a" in rows[0]
    assert "tenant=acme" in rows[0]
    assert printable(HOSTILE_SPAN) in rows[1]
    assert f"tenant={HOSTILE_ID}" in rows[1]
    assert "\x1b" not in result.stdout, "no escape sequence reaches the terminal"
    assert list(runtime_dir.iterdir()) == [], "nothing left behind"
    service.release_all()


def test_top_marks_the_rows_past_the_threshold(service: Service) -> None:
    held(service)
    rows = top(str(service.pid), "--once", "--threshold", "0.001").stdout.splitlines()[1:]
    # The two spans are older than a millisecond; the request without a span is counted from
    # this first look, so 0.0s.
    assert [row[:1] for row in rows] == ["!", "!", " "], rows
    assert "req-c" in rows[2]


def test_top_says_when_there_is_nothing_to_show(service: Service) -> None:
    result = top(str(service.pid))  # stdout is a pipe: the plain table, once
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1:] == ["(no thread is serving a request)"]


def test_top_keeps_the_exchange_private(service: Service, runtime_dir: Path) -> None:
    """It refuses a runtime directory others can enter, as dump does, and never reads through it."""
    runtime_dir.mkdir(mode=0o755)
    runtime_dir.chmod(0o755)
    result = top(str(service.pid), "--once")
    assert result.returncode == 1
    assert "can be entered by other users" in result.stderr
    assert list(runtime_dir.iterdir()) == []


def test_top_and_the_page_match_snapshot_under_load(service: Service) -> None:
    """Quick requests come and go on other threads while both views are asked again and again."""
    entries = held(service)
    stop = threading.Event()
    errors: list[BaseException] = []

    def traffic(index: int) -> None:
        try:
            while not stop.is_set():
                assert service.get("/ping", {"X-Request-ID": f"ping-{index}"})[0] == 200
        except BaseException as error:  # reported below
            errors.append(error)

    clients = [threading.Thread(target=traffic, args=(index,)) for index in range(2)]
    for client in clients:
        client.start()
    try:
        for _ in range(10):
            rows = {row["correlation"]["request_id"]: row for row in page_json(service)}
            assert {"req-a", "req-b", "req-c"} <= set(rows)
            assert set(rows) <= {"req-a", "req-b", "req-c", "ping-0", "ping-1"}
            for request_id, entry in entries.items():
                row = rows[request_id]
                assert (row["thread_id"], row["trace_id"], row["span_id"], row["span_name"]) == (
                    entry["thread_id"],
                    entry["trace_id"],
                    entry["span_id"],
                    entry["span_name"],
                )
        for _ in range(3):
            result = top(str(service.pid), "--once")
            assert result.returncode == 0, result.stderr
            shown = [line for line in result.stdout.splitlines()[1:] if "ping-" not in line]
            assert [line.split()[1] for line in shown] == [
                entries[r]["name"] for r in ("req-a", "req-b", "req-c")
            ]
    finally:
        stop.set()
        for client in clients:
            client.join(WAIT)
    assert errors == []
    service.release_all()


def test_top_refuses_a_process_that_does_not_answer() -> None:
    result = top(str(os.getpid()), "--timeout", "0.5")  # pytest catches no SIGUSR1
    assert result.returncode == 1
    assert "does not catch SIGUSR1" in result.stderr


tmux_missing = pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux (Debian package tmux)")


class Terminal:
    """A real terminal: a tmux session of 160x40 on a server of its own, running one command."""

    def __init__(self, tmp_path: Path, command: list[str]) -> None:
        self.socket = f"threadctx-test-{os.getpid()}-{id(self)}"
        self.done = tmp_path / "exit-status"
        shell = " ".join(_quote(part) for part in command)
        shell += f"; echo $? > {_quote(str(self.done))}; sleep 600"
        self.tmux("new-session", "-d", "-x", "160", "-y", "40", shell)

    def tmux(self, *args: str) -> str:
        return subprocess.run(
            ["tmux", "-L", self.socket, "-f", "/dev/null", *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p")

    def wait_for(self, predicate: Any, what: str) -> str:
        """The screen once ``predicate(screen)`` holds; polls the screen, up to a deadline."""
        deadline = time.monotonic() + WAIT
        while True:
            screen = self.screen()
            if predicate(screen):
                return screen
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}; the screen:\n{screen}")
            time.sleep(0.05)  # a terminal is watched by looking at it again, bounded by the deadline

    def keys(self, *keys: str) -> None:
        self.tmux("send-keys", *keys)

    def exit_status(self) -> int:
        deadline = time.monotonic() + WAIT
        while not self.done.exists() or not self.done.read_text().strip():
            assert time.monotonic() < deadline, f"the command did not end; the screen:\n{self.screen()}"
            time.sleep(0.05)  # the shell writes the status when the command ends
        return int(self.done.read_text())

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, check=False)


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


@pytest.fixture
def terminal(tmp_path: Path) -> Iterator[list[Terminal]]:
    opened: list[Terminal] = []
    yield opened
    for one in opened:
        one.close()


def run_top(terminal: list[Terminal], tmp_path: Path, runtime_dir: Path, *args: str) -> Terminal:
    # Without COLUMNS and LINES (pytest's own terminal's): curses then asks the terminal its size.
    command = ["env", "-u", "COLUMNS", "-u", "LINES", f"THREADCTX_RUNTIME_DIR={runtime_dir}"]
    command += [sys.executable, "-m", "threadctx", "top", *args]
    terminal.append(Terminal(tmp_path, command))
    return terminal[-1]


@pytest.mark.other_threads_stacks
@tmux_missing
def test_top_in_a_terminal_shows_the_rows_a_stack_and_quits_on_q(
    service: Service, runtime_dir: Path, tmp_path: Path, terminal: list[Terminal]
) -> None:
    entries = held(service)
    screen = run_top(terminal, tmp_path, runtime_dir, str(service.pid), "--interval", "0.2")
    shown = screen.wait_for(lambda text: "req-c" in text, "top shows the three requests")
    lines = shown.splitlines()
    assert lines[0].startswith(f"threadctx top: process {service.pid}, 3 threads serving requests")
    start = next(index for index, line in enumerate(lines) if line.lstrip().startswith("AGE"))
    rows = [line for line in lines[start + 1 :] if line.strip()]
    assert len(rows) == 3, shown
    for row, request_id in zip(rows, ["req-a", "req-b", "req-c"], strict=True):
        entry = entries[request_id]
        assert row.split()[1:3] == [entry["name"], entry["trace_id"] or "-"], shown
        assert f"request_id={request_id}" in row
    assert printable(HOSTILE_SPAN)[:31] + "~" in rows[1], "escaped (not interpreted), then cut"
    assert all(len(line) < 160 for line in lines)

    screen.keys("j")  # the second row, then its stack
    screen.keys("Enter")
    stack = screen.wait_for(lambda text: "stack (innermost last)" in text, "Enter shows the stack")
    assert f'thread "{entries["req-b"]["name"]}"' in stack
    assert f"trace_id={entries['req-b']['trace_id']}" in stack
    assert re.search(r'File ".*_live_service\.py", line \d+, in hold', stack), stack
    screen.keys("Escape")
    screen.wait_for(lambda text: "Enter: stack" in text, "Escape goes back to the table")
    screen.keys("q")
    assert screen.exit_status() == 0
    service.release_all()


@tmux_missing
def test_top_in_a_terminal_ends_cleanly_when_the_process_ends(
    service: Service, runtime_dir: Path, tmp_path: Path, terminal: list[Terminal]
) -> None:
    held(service)
    screen = run_top(terminal, tmp_path, runtime_dir, str(service.pid), "--threshold", "0.001")
    shown = screen.wait_for(lambda text: "req-c" in text, "top shows the requests")
    marked = [line[:1] for line in shown.splitlines() if "request_id=req-" in line]
    assert marked[:2] == ["!", "!"], "the two spans are past a threshold of 1 ms"
    service.stop()
    assert screen.exit_status() == 0
    ended = screen.wait_for(lambda text: "has ended" in text, "top says the process ended")
    assert f"python -m threadctx top: process {service.pid} has ended" in ended
    assert "Traceback" not in ended


# ---------------------------------------------------------------------------
# The threadz page under real servers


def page_json(service: Service, path: str = "/threadz?format=json", **headers: str) -> list[dict[str, Any]]:
    status, response_headers, body = service.get(path, headers)
    assert status == 200
    assert response_headers["content-type"] == "application/json"
    rows: list[dict[str, Any]] = json.loads(body)
    return rows


@pytest.mark.parametrize("service", ["wsgi", "asgi"], indirect=True)
def test_the_json_rows_match_snapshot_field_by_field(service: Service) -> None:
    entries = held(service)
    rows = page_json(service)
    after = {entry["thread_id"]: entry for entry in service.snapshot()}
    assert [row["correlation"]["request_id"] for row in rows] == ["req-a", "req-b", "req-c"]
    for row in rows:
        entry = entries[row["correlation"]["request_id"]]
        assert set(row) == {"thread", "thread_id", "trace_id", "span_id", "span_name", "age_s", "correlation"}
        assert row["thread"] == entry["name"]
        assert row["thread_id"] == entry["thread_id"]
        assert row["trace_id"] == entry["trace_id"]
        assert row["span_id"] == entry["span_id"]
        assert row["span_name"] == entry["span_name"]
        assert row["correlation"] == entry["correlation"]
        if entry["elapsed"] is not None:  # between the snapshots taken before and after
            assert entry["elapsed"] - 0.001 <= row["age_s"] <= after[entry["thread_id"]]["elapsed"] + 0.001
        else:
            assert row["age_s"] == 0.0, "no span: counted from the page's first look"
    assert rows[1]["span_name"] == HOSTILE_SPAN
    assert rows[1]["correlation"]["tenant"] == HOSTILE_ID
    asked = page_json(service, "/threadz", Accept="application/json")
    assert [{**row, "age_s": 0} for row in asked] == [{**row, "age_s": 0} for row in rows]
    service.release_all()
    remaining = page_json(service)
    if reader_in_use():  # the service's build is this one's
        assert remaining == []
    else:  # snapshot() shows an idle pool thread in the context it attached last: no span now
        assert all(row["trace_id"] is None for row in remaining)


@pytest.mark.parametrize("service", ["wsgi", "asgi"], indirect=True)
def test_the_page_answers_the_accept_header_head_and_other_methods(service: Service) -> None:
    held(service)
    assert len(page_json(service, "/threadz", Accept="application/json")) == 3
    browser = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
    status, headers, body = service.get("/threadz", {"Accept": browser})
    assert (status, headers["content-type"]) == (200, "text/html; charset=utf-8")
    assert body.startswith(b"<!doctype html>")
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["cache-control"] == "no-store"
    assert "script-src" not in headers["content-security-policy"]  # default-src 'none': no script runs
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", service.port, timeout=WAIT)
    try:
        connection.request("HEAD", "/threadz")
        head = connection.getresponse()
        assert (head.status, head.read()) == (200, b"")
        assert int(head.getheader("content-length") or 0) > 0
        connection.request("POST", "/threadz", body=b"x")
        post = connection.getresponse()
        assert (post.status, post.getheader("allow")) == (405, "GET, HEAD")
        post.read()
    finally:
        connection.close()
    service.release_all()


class Dom(html.parser.HTMLParser):
    """The elements of a page, and the text of each table row's cells."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.rows: list[list[str]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        if tag == "tr" and dict(attrs).get("class") in ("row", "row stuck"):
            self.rows.append([])
        if tag == "td" and self.rows:
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None:
            self.rows[-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


chromium = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(chromium is None, reason="needs Chromium (Debian package chromium)")
@pytest.mark.parametrize("service", ["wsgi", "asgi"], indirect=True)
def test_the_page_in_headless_chromium_shows_the_rows_and_no_injected_markup(
    service: Service, tmp_path: Path
) -> None:
    assert chromium is not None
    entries = held(service)
    screenshot = tmp_path / "threadz.png"
    result = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'chromium'}",
            "--window-size=1100,260",
            f"--screenshot={screenshot}",
            f"http://127.0.0.1:{service.port}/threadz",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert screenshot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    dump = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'chromium'}",
            "--dump-dom",
            f"http://127.0.0.1:{service.port}/threadz",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert dump.returncode == 0, dump.stderr
    dom = Dom()
    dom.feed(dump.stdout)
    assert not {"script", "img"} & set(dom.tags), "a value became markup"
    assert len(dom.rows) == 3, dump.stdout
    for cells, request_id in zip(dom.rows, ["req-a", "req-b", "req-c"], strict=True):
        entry = entries[request_id]
        age, thread, trace_id, span_id, span_name, correlation = cells
        assert re.fullmatch(r"\d+\.\ds", age)
        assert (thread, trace_id, span_id) == (entry["name"], entry["trace_id"] or "", entry["span_id"] or "")
        assert span_name == printable(entry["span_name"] or "")
        assert f"request_id={request_id}" in correlation
    assert dom.rows[1][4] == printable(HOSTILE_SPAN)
    assert f"tenant={HOSTILE_ID}" in dom.rows[1][5]
    service.release_all()


@contextlib.contextmanager
def thread_in_a_request(name: str, request_id: str) -> Iterator[None]:
    """A thread named ``name`` held in a span named ``work`` with ``request_id`` bound, for the block."""
    from opentelemetry.sdk.trace import TracerProvider

    import threadctx

    inside, release = threading.Event(), threading.Event()

    def work() -> None:
        tracer = TracerProvider().get_tracer("t")
        with tracer.start_as_current_span("work"), threadctx.bound(request_id=request_id):
            inside.set()
            release.wait(WAIT)

    worker = threading.Thread(target=work, name=name)
    worker.start()
    try:
        assert inside.wait(WAIT)
        yield
    finally:
        release.set()
        worker.join(WAIT)


@pytest.mark.other_threads_stacks
def test_stacks_are_shown_only_when_asked() -> None:
    """Without ``stacks=True`` no frame of the service's code is shown, in JSON or HTML."""
    from threadctx import threadz

    with thread_in_a_request("worker-stack", "r-1"):
        plain = call_wsgi(threadz.wsgi_app(), query="format=json")
        with_stacks = call_wsgi(threadz.wsgi_app(stacks=True), query="format=json")
        page = call_wsgi(threadz.wsgi_app(stacks=True))
    (row,) = [row for row in json.loads(plain[2]) if row["thread"] == "worker-stack"]
    assert "stack" not in row
    (row,) = [row for row in json.loads(with_stacks[2]) if row["thread"] == "worker-stack"]
    assert any("in work" in line for line in row["stack"])
    assert b"release.wait(WAIT)" in page[2]
    assert b"<pre>" in page[2]
    assert b"<pre>" not in call_wsgi(threadz.wsgi_app())[2]


# ---------------------------------------------------------------------------
# Who may see the page: the apps called directly, as a server would, with the client's address


def call_wsgi(
    app: Any, *, method: str = "GET", remote: str | None = "127.0.0.1", query: str = "", **headers: str
) -> tuple[str, dict[str, str], bytes]:
    environ: dict[str, Any] = {
        "REQUEST_METHOD": method,
        "PATH_INFO": "/",
        "QUERY_STRING": query,
        "SERVER_NAME": "localhost",
        "SERVER_PORT": "8080",
        "wsgi.url_scheme": "http",
    }
    if remote is not None:
        environ["REMOTE_ADDR"] = remote
    for name, value in headers.items():
        environ["HTTP_" + name.upper()] = value
    started: list[Any] = []
    body = b"".join(app(environ, lambda status, headers, exc_info=None: started.extend([status, headers])))
    status, response_headers = started
    return status, dict(response_headers), body


def call_asgi(
    app: Any,
    *,
    method: str = "GET",
    client: tuple[str, int] | None = ("127.0.0.1", 50000),
    headers: list[tuple[bytes, bytes]] | None = None,
) -> tuple[int, dict[bytes, bytes], bytes]:
    import asyncio

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": "/threadz",
        "raw_path": b"/threadz",
        "query_string": b"",
        "root_path": "",
        "headers": headers or [],
        "client": client,
        "server": ("127.0.0.1", 8000),
    }
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    start, body = sent
    return start["status"], dict(start["headers"]), body["body"]


@pytest.mark.parametrize(
    ("remote", "status"),
    [
        ("127.0.0.1", "200 OK"),
        ("127.0.0.2", "200 OK"),
        ("::1", "200 OK"),
        ("::ffff:127.0.0.1", "200 OK"),
        ("10.0.0.1", "403 Forbidden"),
        ("192.168.1.7", "403 Forbidden"),
        ("::ffff:10.0.0.1", "403 Forbidden"),
        ("", "403 Forbidden"),
        ("localhost", "403 Forbidden"),
        (None, "403 Forbidden"),
    ],
)
def test_the_wsgi_page_answers_only_loopback_clients_by_default(remote: str | None, status: str) -> None:
    from threadctx import threadz

    answer = call_wsgi(threadz.wsgi_app(), remote=remote)
    assert answer[0] == status
    if status != "200 OK":
        assert b"<table" not in answer[2]
        assert b"loopback clients only" in answer[2]


def test_the_wsgi_page_refuses_a_proxied_request_and_obeys_allow() -> None:
    from threadctx import threadz

    proxied = call_wsgi(threadz.wsgi_app(), X_FORWARDED_FOR="203.0.113.9")
    assert proxied[0] == "403 Forbidden", "behind a proxy on this host every client seems local"
    seen: list[str] = []

    def allow(environ: Any) -> bool:
        seen.append(environ["REMOTE_ADDR"])
        return bool(environ.get("HTTP_X_OPS_TOKEN") == "s3cret")

    app = threadz.wsgi_app(allow=allow)
    assert call_wsgi(app, remote="10.0.0.1", X_OPS_TOKEN="s3cret")[0] == "200 OK"
    assert call_wsgi(app, remote="10.0.0.1")[0] == "403 Forbidden"
    assert call_wsgi(app, remote="127.0.0.1")[0] == "403 Forbidden", "allow= alone decides"
    assert seen == ["10.0.0.1", "10.0.0.1", "127.0.0.1"]


def test_the_wsgi_page_answers_head_and_refuses_other_methods() -> None:
    from threadctx import threadz

    app = threadz.wsgi_app()
    get_status, get_headers, _ = call_wsgi(app)
    head_status, head_headers, head_body = call_wsgi(app, method="HEAD")
    assert (head_status, head_body) == (get_status, b"")
    assert head_headers["Content-Type"] == get_headers["Content-Type"]
    for method in ("POST", "PUT", "DELETE", "OPTIONS"):
        status, headers, _ = call_wsgi(app, method=method)
        assert (status, headers["Allow"]) == ("405 Method Not Allowed", "GET, HEAD")
    assert call_wsgi(app, method="POST", remote="10.0.0.1")[0] == "403 Forbidden"


def test_the_asgi_page_refuses_a_non_loopback_client_without_a_check() -> None:
    from threadctx import threadz

    app = threadz.asgi_app()
    assert call_asgi(app)[0] == 200
    status, headers, body = call_asgi(app, client=("10.0.0.1", 50000))
    assert status == 403
    assert b"<table" not in body
    assert headers[b"content-type"] == b"text/plain; charset=utf-8"
    assert call_asgi(app, client=None)[0] == 403
    assert call_asgi(app, headers=[(b"x-forwarded-for", b"203.0.113.9")])[0] == 403
    assert call_asgi(app, method="POST")[0] == 405
    assert call_asgi(app, method="HEAD")[2] == b""
    allowed = threadz.asgi_app(allow=lambda scope: scope["client"][0] == "10.0.0.1")
    assert call_asgi(allowed, client=("10.0.0.1", 50000))[0] == 200
    assert call_asgi(allowed)[0] == 403


def test_the_asgi_page_answers_lifespan_and_refuses_websockets() -> None:
    import asyncio

    from threadctx import threadz

    app = threadz.asgi_app()
    incoming = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return incoming.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send))
    assert [message["type"] for message in sent] == [
        "lifespan.startup.complete",
        "lifespan.shutdown.complete",
    ]
    sent.clear()
    asyncio.run(app({"type": "websocket", "client": ("127.0.0.1", 1), "headers": []}, receive, send))
    assert sent == [{"type": "websocket.close", "code": 1008}]


def test_hostile_values_never_become_markup_in_process() -> None:
    """The page's HTML, parsed: only its own elements, the hostile values as text."""
    from opentelemetry.sdk.trace import TracerProvider

    import threadctx
    from threadctx import threadz

    inside, release = threading.Event(), threading.Event()

    def work() -> None:
        tracer = TracerProvider().get_tracer("t")
        with tracer.start_as_current_span(HOSTILE_SPAN), threadctx.bound(request_id=HOSTILE_ID):
            inside.set()
            release.wait(WAIT)

    worker = threading.Thread(target=work, name="</td><script>x</script>")
    worker.start()
    try:
        assert inside.wait(WAIT)
        body = call_wsgi(threadz.wsgi_app(stacks=True))[2].decode()
    finally:
        release.set()
        worker.join(WAIT)
    dom = Dom()
    dom.feed(body)
    assert set(dom.tags) <= {
        "html", "head", "meta", "title", "style", "body", "h1", "p", "span", "a",
        "table", "thead", "tbody", "tr", "th", "td", "code", "pre",
    }  # fmt: skip
    (cells,) = [row for row in dom.rows if row[1] == "</td><script>x</script>"]
    assert cells[4] == printable(HOSTILE_SPAN)
    assert cells[5] == f"request_id={HOSTILE_ID}"
    assert "\x1b" not in body


# ---------------------------------------------------------------------------
# The exchange and the table, in this process


def test_the_handler_answers_each_top_that_asks_with_a_private_json_file(runtime_dir: Path) -> None:
    import stat

    import threadctx
    from threadctx._ops import exchange as _dump

    _dump.check_private_dir(str(runtime_dir), create=True)
    pid = os.getpid()
    read_end, write_end = os.pipe()
    previous = threadctx.install_dump_signal(file=write_end)
    try:
        for requester in (101, 102):  # two tops; the second shows a stack
            path = _dump.snapshot_request_path(str(runtime_dir), pid, requester, stacks=requester == 102)
            Path(path).touch(0o600)
        Path(runtime_dir / f"snapshot-{pid}-../x.request".replace("/", "")).touch(0o600)  # not a requester
        with threadctx.bound(request_id="req-main"):
            signal.raise_signal(signal.SIGUSR1)
    finally:
        signal.signal(signal.SIGUSR1, previous)
        os.close(write_end)
    with os.fdopen(read_end) as rest:
        assert rest.read() == "", "answered: nothing written to the installed file"
    for requester in (101, 102):
        answer = Path(_dump.snapshot_path(str(runtime_dir), pid, requester))
        assert stat.S_IMODE(answer.stat().st_mode) == 0o600
        data = json.loads(answer.read_text())
        (row,) = data["threads"]
        assert row["thread"] == "MainThread"
        assert row["correlation"] == {"request_id": "req-main"}
        if requester == 101:
            assert row["stack"] == [], "no stacks unless asked: sys._current_frames() is not called"
        else:
            assert any("test_live.py" in line for line in row["stack"])
        answer.unlink()
    assert [path.name for path in runtime_dir.iterdir()] == [f"snapshot-{pid}-..x.request"]


def test_a_row_read_back_from_json_is_checked() -> None:
    from threadctx._ops.table import Row

    row = Row("w", 1, 2, "a" * 32, "b" * 16, "s", 1.5, {"request_id": "r"}, ("  File x",))
    assert Row.from_json(json.loads(json.dumps(row.as_json()))) == row
    for bad in (
        [],
        {**row.as_json(), "thread_id": "1"},
        {**row.as_json(), "age_s": "NaN"},
        {**row.as_json(), "correlation": {"a": 1}},
        {**row.as_json(), "stack": "x"},
        {**row.as_json(), "span_name": 3},
        {**row.as_json(), "trace_id": "\x1b[2J" + "a" * 28},
        {**row.as_json(), "span_id": "B" * 16},
    ):
        with pytest.raises(ValueError):  # noqa: PT011 - each says what is wrong
            Row.from_json(bad)


def test_the_text_table_fits_the_width_request_id_first() -> None:
    from threadctx._ops.table import Row, text_table

    correlation = {"tenant": "acme", "request_id": "req-1", "user": "u" * 40}
    row = Row("worker-1", 1, 2, "a" * 32, "b" * 16, "GET /orders", 3.5, correlation)
    wide = text_table([row], 30.0)
    assert wide[1].endswith(f"request_id=req-1 tenant=acme user={'u' * 40}")
    narrow = text_table([row], 3.0, width=110)
    assert all(len(line) <= 110 for line in narrow)
    assert narrow[1].startswith("!  3.5s  worker-1")
    assert narrow[1].endswith("request_id=req-1 tenant=acme +1")


# ---------------------------------------------------------------------------
# Attacks on the default access check and the page, against a real server on 127.0.0.1


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 200),
        ({"Host": "localhost:8080"}, 200),
        ({"Host": "[::1]:8080"}, 200),
        ({"Host": "127.0.0.7"}, 200),
        # DNS rebinding: a web page the operator's browser opened on this host, whose name now resolves to
        # 127.0.0.1, reads the page as its own origin. Its Host is the attacker's name.
        ({"Host": "rebind.attacker.example:8080"}, 403),
        ({"Host": "127.0.0.1.attacker.example"}, 403),
        # A proxy on this host that says only part of what it forwards: every client seems local.
        # (waitress removes X-Forwarded-* and Forwarded before the app sees them: see the next tests.)
        ({"Via": "1.1 proxy"}, 403),
        ({"True-Client-IP": "203.0.113.9"}, 403),
        ({"X-Client-IP": "203.0.113.9"}, 403),
    ],
)
def test_the_default_check_refuses_rebinding_and_proxied_requests_on_a_real_server(
    headers: dict[str, str], status: int
) -> None:
    import http.client

    from _servers import waitress_servers
    from threadctx import threadz

    with waitress_servers() as serve:
        port = serve(threadz.wsgi_app())
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        try:
            # http.client sends Host: 127.0.0.1:PORT unless the test gives its own.
            connection.putrequest("GET", "/?format=json", skip_host="Host" in headers)
            for name, value in headers.items():
                connection.putheader(name, value)
            connection.endheaders()
            response = connection.getresponse()
            body = response.read()
        finally:
            connection.close()
    assert response.status == status, body
    assert (
        call_asgi(threadz.asgi_app(), headers=[(k.lower().encode(), v.encode()) for k, v in headers.items()])[
            0
        ]
        == status
    )


@pytest.mark.other_threads_stacks
def test_the_page_shows_each_stack_line_on_a_line_of_its_own() -> None:
    """The stack's lines are escaped one by one: a newline inside a line is shown, the lines are kept."""
    from threadctx import threadz

    with thread_in_a_request("worker-lines", "r-stack"):
        page = call_wsgi(threadz.wsgi_app(stacks=True))[2].decode()
    stacks = re.findall(r"<pre>(.*?)</pre>", page, re.DOTALL)
    (stack,) = [stack for stack in stacks if "release.wait(WAIT)" in stack]
    lines = stack.split("\n")
    assert any(line.strip() == "release.wait(WAIT)" for line in lines), lines
    assert "\\n" not in stack


@pytest.mark.parametrize(
    "header", ["X-Forwarded-Proto", "X-Forwarded-Host", "X-Forwarded-Port", "X-Forwarded-Prefix"]
)
def test_any_x_forwarded_header_means_a_proxy(header: str) -> None:
    """A proxy may send only one of them (gunicorn and uvicorn pass them all to the app)."""
    from threadctx import threadz

    assert call_wsgi(threadz.wsgi_app(), **{header.upper().replace("-", "_"): "x"})[0] == "403 Forbidden"
    assert call_asgi(threadz.asgi_app(), headers=[(header.lower().encode(), b"x")])[0] == 403


def test_a_reverse_proxy_on_this_host_in_front_of_waitress_is_refused() -> None:
    """A real proxy on 127.0.0.1 before waitress, which strips the proxy's X-Forwarded-For: the Host tells."""
    import http.client
    import http.server

    from _servers import waitress_servers
    from threadctx import threadz

    with waitress_servers() as serve:
        upstream = serve(threadz.wsgi_app())

        class Proxy(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                # As nginx with the usual "proxy_set_header Host $host; ... X-Forwarded-For ...".
                connection = http.client.HTTPConnection("127.0.0.1", upstream, timeout=60)
                try:
                    connection.putrequest("GET", self.path, skip_host=True)
                    connection.putheader("Host", self.headers["Host"])
                    connection.putheader("X-Forwarded-For", "203.0.113.9")
                    connection.endheaders()
                    response = connection.getresponse()
                    body = response.read()
                finally:
                    connection.close()
                self.send_response(response.status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
        thread = threading.Thread(target=proxy.serve_forever, name="proxy")
        thread.start()
        try:
            connection = http.client.HTTPConnection("127.0.0.1", proxy.server_port, timeout=60)
            try:
                connection.putrequest("GET", "/?format=json", skip_host=True)
                connection.putheader("Host", "service.example")  # the name the remote client used
                connection.endheaders()
                response = connection.getresponse()
                body = response.read()
            finally:
                connection.close()
        finally:
            proxy.shutdown()
            proxy.server_close()
            thread.join(WAIT)
    assert response.status == 403, body
    assert b"loopback clients only" in body


LIAR = r"""
import json, os, signal, sys, threading
directory = os.environ["THREADCTX_RUNTIME_DIR"]
hostile = "\x1b]0;owned\x07\x1b[2J\x1b[31m"
row = {"thread": "w", "thread_id": 1, "native_id": 2, "trace_id": hostile, "span_id": hostile,
       "span_name": "s", "age_s": 1.0, "correlation": {}, "stack": []}
answered = threading.Event()

def answer(signum, frame):
    for name in os.listdir(directory):
        if name.startswith(f"snapshot-{os.getpid()}-") and name.endswith(".request"):
            os.unlink(os.path.join(directory, name))
            requester = name.split("-")[2].split(".")[0]
            path = os.path.join(directory, f"snapshot-{os.getpid()}-{requester}.json")
            with open(path + ".partial", "w") as file:
                json.dump({"pid": os.getpid(), "foreign_runtime": None, "threads": [row]}, file)
            os.rename(path + ".partial", path)

    request = os.path.join(directory, f"dump-{os.getpid()}.request")
    if os.path.exists(request):
        os.unlink(request)
        with open(os.path.join(directory, "partial"), "w") as file:
            file.write(f'Thread "w" ident=1\n  trace_id={hostile}\n')
        os.rename(os.path.join(directory, "partial"), os.path.join(directory, f"dump-{os.getpid()}.txt"))

signal.signal(signal.SIGUSR1, answer)
print("ready", flush=True)
sys.stdin.read()
"""


@contextlib.contextmanager
def lying_process() -> Iterator[int]:
    """The LIAR program, ready to answer; yields its pid, and ends it after."""
    liar = subprocess.Popen(
        [sys.executable, "-c", LIAR], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert liar.stdin is not None
    assert liar.stdout is not None
    try:
        assert liar.stdout.readline() == "ready\n"
        yield liar.pid
    finally:
        liar.stdin.close()
        liar.wait(WAIT)
        liar.stdout.close()


def test_top_shows_nothing_a_lying_process_sends_as_a_terminal_control(runtime_dir: Path) -> None:
    """A process that answers with escape sequences in its ids cannot reach the operator's terminal."""
    runtime_dir.mkdir(mode=0o700)
    with lying_process() as pid:
        result = top(str(pid), "--once")
    assert "\x1b" not in result.stdout + result.stderr
    assert "\x07" not in result.stdout + result.stderr
    assert result.returncode == 1
    assert "answered something else than rows: trace_id" in result.stderr


def test_dump_shows_nothing_a_lying_process_sends_as_a_terminal_control(runtime_dir: Path) -> None:
    """``dump PID`` prints the report's lines with every control character escaped, the lines kept."""
    runtime_dir.mkdir(mode=0o700)
    with lying_process() as pid:
        result = subprocess.run(
            [sys.executable, "-m", "threadctx", "dump", str(pid)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    assert result.returncode == 0, result.stderr
    assert result.stdout == 'Thread "w" ident=1\n  trace_id=\\x1b]0;owned\\x07\\x1b[2J\\x1b[31m\n'
