"""threadctx demo: a threaded HTTP service whose every log line carries its own request's ids.

``make demo`` runs it. It starts a real WSGI service (waitress, a pool of
worker threads) on 127.0.0.1, configured the way the README says: the
threadctx runtime context, the OpenTelemetry SDK, ``ContextFilter`` on the one
log handler, ``ContextMiddleware``, and a thread pool behind the handlers.
Then a real HTTP client sends a burst of concurrent requests, each with its
own ``traceparent`` and ``X-Request-ID``. At the end the demo checks every log
line and every span against the request that produced it, and exits non-zero
if any check fails.
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import secrets
import sys
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

os.environ.setdefault("OTEL_PYTHON_CONTEXT", "threadctx")  # 1. before OpenTelemetry is imported

import logging

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from waitress.server import create_server

import threadctx
from threadctx.wsgi import ContextMiddleware

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

FORMAT = "%(threadName)-10s trace=%(trace_id)s span=%(span_id)s request_id=%(request_id)s %(message)s"
LINE = re.compile(r"trace=(?P<trace>\w+) span=\w+ request_id=(?P<rid>\S+) .* (?P<own>req-\d+)$")
TIMEOUT = 30


class Collect(logging.Handler):
    """Keeps the formatted lines, for the checks at the end (a service would write them out)."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def configure() -> tuple[InMemorySpanExporter, Collect]:
    """2. The tracer provider, and 3. the filter on the handler: once, at start-up."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "threadctx-demo"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    handler = Collect()
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(threadctx.ContextFilter(defaults={"request_id": "-"}))  # "-" outside a request
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    logging.getLogger("waitress").setLevel(logging.WARNING)
    return exporter, handler


class Service:
    """The application: a server span per request, and two steps on a backend pool."""

    def __init__(self, backend: threadctx.ContextThreadPoolExecutor, hold: int) -> None:
        self.backend = backend
        self.log = logging.getLogger("demo.orders")
        self.tracer = trace.get_tracer("demo")
        # The first `hold` requests wait, all at once, until the snapshot is taken.
        self.hold = hold
        self.held = threading.Barrier(hold + 1)
        self.snapshot_taken = threading.Event()
        self.arrivals = 0
        self.lock = threading.Lock()

    def step(self, what: str, order: str) -> int:
        self.log.info("%s for %s", what, order)
        return sum(i * i for i in range(2_000))

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        order = environ["PATH_INFO"].rsplit("/", 1)[-1]
        with self.tracer.start_as_current_span("GET /orders/{id}", kind=trace.SpanKind.SERVER):
            self.log.info("received %s", order)
            with self.lock:
                self.arrivals += 1
                held = self.arrivals <= self.hold
            if held:
                self.held.wait(TIMEOUT)
                self.snapshot_taken.wait(TIMEOUT)
            for future in [
                self.backend.submit(self.step, what, order) for what in ("stock check", "payment")
            ]:
                future.result(TIMEOUT)
            self.log.info("answered %s", order)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [order.encode()]


def progress(done: int, total: int, tty: bool) -> None:
    width = 30
    filled = width * done // total
    bar = f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total} requests"
    if tty:
        print(f"\r  {bar}", end="" if done < total else "\n", flush=True)
    elif done == total or done % max(total // 4, 1) == 0:
        print(f"  {bar}", flush=True)


class Burst:
    """The HTTP client: concurrent requests, each with its own traceparent and X-Request-ID."""

    def __init__(self, port: int, total: int) -> None:
        self.port = port
        self.total = total
        self.sent: dict[str, tuple[str, str]] = {}  # request id -> (trace id, the caller's span id)
        self.answers: dict[str, tuple[int, str | None]] = {}
        self.lock = threading.Lock()
        self.tty = sys.stdout.isatty()

    def call(self, index: int) -> None:
        request_id = f"req-{index:05d}"
        trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
        with self.lock:
            self.sent[request_id] = (trace_id, span_id)
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=TIMEOUT)
        try:
            headers = {"traceparent": f"00-{trace_id}-{span_id}-01", "X-Request-ID": request_id}
            connection.request("GET", f"/orders/{request_id}", headers=headers)
            response = connection.getresponse()
            response.read()
            answer = (response.status, response.getheader("X-Request-ID"))
        finally:
            connection.close()
        with self.lock:
            self.answers[request_id] = answer
            progress(len(self.answers), self.total, self.tty)


def show(lines: list[str], outside: list[str], busy: list[threadctx.ThreadSnapshot]) -> None:
    print("\nsample of the service's log lines (one handler, many threads):")
    for line in lines[:: max(len(lines) // 8, 1)][:8]:
        print("  " + line)
    if outside:
        # Waitress warns "Task queue depth is N" when requests wait for a free worker thread,
        # as this burst makes them do on purpose; its loop thread serves no request.
        example = outside[0].split("request_id=- ", 1)[-1]
        print(
            f"  (and {len(outside)} line(s) of waitress's own, such as {example!r}:"
            " requests waiting for a free worker; logged outside any request, so without ids)"
        )
    print("\nsnapshot of the server threads mid-flight (threadctx.snapshot()):")
    for entry in sorted(busy, key=lambda entry: entry.name):
        request_id = entry.correlation["request_id"]
        print(f"  {entry.name:<10} {entry.span_name:<16} trace={entry.trace_id} request_id={request_id}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300, help="requests to send (default: 300)")
    parser.add_argument("--workers", type=int, default=8, help="server worker threads (default: 8)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent HTTP clients (default: 16)")
    args = parser.parse_args(argv)
    if min(args.requests, args.workers, args.clients) < 1:
        parser.error("--requests, --workers and --clients must be at least 1")
    started = time.monotonic()

    exporter, collected = configure()
    backend = threadctx.ContextThreadPoolExecutor(max_workers=4, thread_name_prefix="backend")
    hold = min(args.workers, args.requests, args.clients)
    service = Service(backend, hold)
    # 4. The middleware: the caller's context and request id, per request.
    server = create_server(ContextMiddleware(service), host="127.0.0.1", port=0, threads=args.workers)
    port = int(server.effective_port)  # type: ignore[union-attr]
    threading.Thread(target=server.run, name="server", daemon=True).start()
    runtime = type(otel_context._RUNTIME_CONTEXT).__name__
    print(f"threadctx demo: {args.requests} requests, {args.clients} clients, {args.workers} server threads")
    print(f"  service on http://127.0.0.1:{port}, runtime context {runtime}")

    burst = Burst(port, args.requests)
    with ThreadPoolExecutor(max_workers=args.clients, thread_name_prefix="client") as clients:
        futures = [clients.submit(burst.call, index) for index in range(args.requests)]
        service.held.wait(TIMEOUT)  # `hold` server threads are busy with a request each now
        mid_flight = threadctx.snapshot()
        service.snapshot_taken.set()
        for future in futures:
            future.result(TIMEOUT)
    server.task_dispatcher.shutdown()
    backend.shutdown()
    elapsed = time.monotonic() - started

    # The app's lines end with their request's id; others (waitress's own warnings, from its
    # loop thread) belong to no request and must carry no ids.
    lines = [line for line in collected.lines if re.search(r" req-\d+$", line)]
    outside = [line for line in collected.lines if line not in lines]
    busy = [entry for entry in mid_flight if entry.correlation.get("request_id")]
    show(lines, outside, busy)
    sent = burst.sent

    unmarked = sum(f"trace={'0' * 32} " in line and "request_id=- " in line for line in outside)
    wrong = 0
    for line in lines:
        match = LINE.search(line)
        wrong += match is None or match["rid"] != match["own"] or match["trace"] != sent[match["own"]][0]
    snapshot_wrong = sum(sent[entry.correlation["request_id"]][0] != entry.trace_id for entry in busy)
    spans = exporter.get_finished_spans()
    by_trace = dict(sent.values())
    children = sum(
        span.parent is not None
        and by_trace.get(format(span.context.trace_id, "032x")) == format(span.parent.span_id, "016x")
        for span in spans
    )
    server_threads = {line.split(" ", 1)[0] for line in lines if "received" in line}
    ok_answers = sum(answer == (200, request_id) for request_id, answer in burst.answers.items())
    checks = [
        ("requests answered, X-Request-ID echoed", ok_answers, ok_answers == args.requests),
        ("server threads that served", len(server_threads), hold <= len(server_threads) <= args.workers),
        ("threads busy in the snapshot", len(busy), len(busy) == hold and snapshot_wrong == 0),
        ("log lines of the requests", len(lines), len(lines) == 4 * args.requests),
        ("lines attributed to the wrong request", wrong, wrong == 0),
        ("other lines (waitress's), all without ids", len(outside), unmarked == len(outside)),
        ("spans whose parent is the caller's", children, children == len(spans) == args.requests),
        ("seconds", round(elapsed, 1), elapsed < TIMEOUT),
    ]
    print("\nsummary:")
    for label, value, ok in checks:
        print(f"  {label:<40} {value:>8}  {'ok' if ok else 'FAILED'}")
    failed = [label for label, _, ok in checks if not ok]
    if failed:
        print(f"\nFAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    print("\nall checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
