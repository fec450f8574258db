"""Real servers as subprocesses on 127.0.0.1, and concurrent HTTP clients, for the framework tests."""

from __future__ import annotations

import http.client
import logging
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import threadctx

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIApplication

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
READY = 30.0  # seconds a server may take to accept connections
STOP = 30.0
LINE = re.compile(r"trace=(?P<trace>\w+) span=(?P<span>\w+) request_id=(?P<rid>\S+) (?P<message>.*)$")


class Lines(logging.Handler):
    """Formats every record through ContextFilter, as a service's handler would."""

    def __init__(self) -> None:
        super().__init__()
        self.addFilter(threadctx.ContextFilter())
        self.setFormatter(
            logging.Formatter(
                "trace=%(trace_id)s span=%(span_id)s request_id=%(request_id)s %(message)s",
                defaults={"request_id": "-"},
            )
        )
        self.lines: list[str] = []
        self.threads: set[int] = set()

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))
        self.threads.add(record.thread or 0)

    def parsed(self) -> list[dict[str, str]]:
        """Each line's trace, span, request id and message."""
        matches = [LINE.match(line) for line in self.lines]
        assert all(matches), self.lines
        return [match.groupdict() for match in matches if match]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without OTEL_PYTHON_CONTEXT (the app sets it, as a user's would)."""
    env = {key: value for key, value in os.environ.items() if key != "OTEL_PYTHON_CONTEXT"}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


@dataclass
class Server:
    process: subprocess.Popen[str]
    port: int
    output: Path

    def stop(self) -> str:
        """Stop it gracefully (SIGTERM: in-flight requests and their background tasks finish); its output."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(STOP)
        return self.output.read_text()


@contextmanager
def running(command: Sequence[str], port: int, output: Path, env: dict[str, str]) -> Iterator[Server]:
    """Start ``command`` (stdout and stderr to ``output``), wait until ``port`` accepts; always stop it."""
    with output.open("w") as sink:
        process = subprocess.Popen(
            list(command), cwd=EXAMPLES, env=env, stdout=sink, stderr=subprocess.STDOUT, text=True
        )
    server = Server(process, port, output)
    try:
        deadline = time.monotonic() + READY
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{command[0]} exited: {output.read_text()}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{command} did not listen in {READY}s: {output.read_text()}"
                    ) from None
                time.sleep(0.05)  # polling a socket for readiness, bounded by the deadline
        yield server
    finally:
        server.stop()


def python(*args: str) -> list[str]:
    return [sys.executable, *args]


def get(port: int, path: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request("GET", path, headers=headers)
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


@dataclass
class Sent:
    trace_id: str
    span_id: str
    request_id: str
    status: int = 0
    echoed: str | None = None
    body: bytes = b""


def concurrent_requests(
    port: int, paths: Callable[[str], str], clients: int, per_client: int
) -> dict[str, Sent]:
    """Each client sends its requests one after another, all clients at once (released by a barrier).

    Request ``name`` (``c<client>-<n>``) goes to ``paths(name)`` with its own traceparent and
    ``X-Request-ID: req-<name>``.
    """
    sent: dict[str, Sent] = {}
    lock = threading.Lock()
    barrier = threading.Barrier(clients)
    errors: list[BaseException] = []

    def client(index: int) -> None:
        try:
            barrier.wait(60)
            for n in range(per_client):
                name = f"c{index}-{n}"
                request = Sent(secrets.token_hex(16), secrets.token_hex(8), f"req-{name}")
                with lock:
                    sent[name] = request
                status, headers, body = get(
                    port,
                    paths(name),
                    {
                        "traceparent": f"00-{request.trace_id}-{request.span_id}-01",
                        "X-Request-ID": request.request_id,
                    },
                )
                request.status, request.echoed, request.body = status, headers.get("x-request-id"), body
        except BaseException as error:  # reported by the caller's assertion
            errors.append(error)

    threads = [threading.Thread(target=client, args=(index,)) for index in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert errors == []
    return sent


def misattributed(lines: Sequence[str], sent: dict[str, Sent]) -> list[str]:
    """Lines whose trace id or request id is not that of the request named in the message."""
    wrong = []
    for line in lines:
        match = LINE.match(line)
        assert match, line
        name = match["message"].split()[1]
        request = sent[name]
        if (match["trace"], match["rid"]) != (request.trace_id, request.request_id):
            wrong.append(line)
    return wrong


def app_lines(output: str) -> list[str]:
    """The application's own log lines in a server's output."""
    return [line for line in output.splitlines() if LINE.match(line)]


@contextmanager
def waitress_servers(join: float = 60) -> Iterator[Callable[[WSGIApplication], int]]:
    """Start waitress servers (8 threads, a free port of 127.0.0.1 each, in this process); stop them all."""
    from waitress.server import create_server
    from waitress.wasyncore import close_all

    servers = []

    def start(app: WSGIApplication) -> int:
        server = create_server(app, host="127.0.0.1", port=0, threads=8, asyncore_loop_timeout=0.05)
        thread = threading.Thread(target=server.run, name="waitress-loop", daemon=True)
        thread.start()
        servers.append((server, thread))
        return int(server.effective_port)  # type: ignore[union-attr]

    try:
        yield start
    finally:
        for server, thread in servers:
            # Closed from the server's own loop thread: its loop ends when nothing is left to serve.
            try:
                server.trigger.pull_trigger(lambda server=server: close_all(server._map))
            except OSError:
                # Seen twice in many runs (3.12, 3.14): the trigger's pipe was already closed (EBADF),
                # cause not found. Close from here; the loop, polling every 0.05 s, then ends.
                close_all(server._map)
            thread.join(join)
            assert not thread.is_alive()
            server.task_dispatcher.shutdown()
