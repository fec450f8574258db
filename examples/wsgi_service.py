"""A threaded WSGI service (waitress) whose every log line carries its request's trace and request id.

Run one service, then call it::

    OTEL_PYTHON_CONTEXT=threadctx python examples/wsgi_service.py --port 8080
    curl -H 'X-Request-ID: r-1' http://127.0.0.1:8080/work

With ``--downstream URL`` each request also calls another service, sending the
trace context and the request id along (``threadctx.inject``).  With
``--self-test N`` the service serves N concurrent requests from its own
clients, checks every log line against the request that wrote it, and exits
non-zero on any mismatch.
"""

from __future__ import annotations

import argparse
import http.client
import logging
import os
import re
import secrets
import sys
import threading
import urllib.request
from collections.abc import Iterable
from typing import TYPE_CHECKING

os.environ.setdefault("OTEL_PYTHON_CONTEXT", "threadctx")  # before OpenTelemetry is imported

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from waitress.server import create_server

import threadctx
from threadctx.wsgi import ContextMiddleware

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

FORMAT = "service=%(service)s trace_id=%(trace_id)s span_id=%(span_id)s request_id=%(request_id)s %(message)s"
LINE = re.compile(r"trace_id=(?P<trace>\w+) span_id=\w+ request_id=(?P<rid>\S+) (?P<message>.*)$")

log = logging.getLogger("service")


def configure(name: str) -> None:
    """The set-up a service does once: a tracer provider, and the filter on the handler."""
    trace.set_tracer_provider(TracerProvider(resource=Resource.create({"service.name": name})))
    handler = logging.StreamHandler(sys.stdout)
    handler.addFilter(threadctx.ContextFilter())
    handler.setFormatter(logging.Formatter(FORMAT, defaults={"service": name, "request_id": "-"}))
    logging.basicConfig(level=logging.INFO, handlers=[handler])


def make_app(downstream: str | None, pool: threadctx.ContextThreadPoolExecutor) -> ContextMiddleware:
    """The WSGI app: a server span, a log line, a pool task and, maybe, a downstream call."""
    tracer = trace.get_tracer("examples.wsgi_service")

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        with tracer.start_as_current_span(f"GET {path}", kind=trace.SpanKind.SERVER):
            log.info("handling %s", path)
            pool.submit(log.info, "pool task for %s", path).result()
            if downstream:
                request = urllib.request.Request(downstream, headers=threadctx.inject({}))
                with urllib.request.urlopen(request, timeout=30) as response:
                    log.info("downstream answered %s for %s", response.status, path)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [path.encode()]

    return ContextMiddleware(app)


def self_test(port: int, requests: int, lines: list[str]) -> int:
    """Send concurrent requests, each with its own traceparent and request id; check every line."""
    sent: dict[str, str] = {}
    barrier = threading.Barrier(min(requests, 32))
    lock = threading.Lock()

    def client(names: list[str]) -> None:
        barrier.wait(30)
        for name in names:
            trace_id = secrets.token_hex(16)
            with lock:
                sent[name] = trace_id
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            headers = {"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01", "X-Request-ID": name}
            connection.request("GET", f"/{name}", headers=headers)
            connection.getresponse().read()
            connection.close()

    names = [f"req-{i}" for i in range(requests)]
    clients = [threading.Thread(target=client, args=(names[i::32],)) for i in range(min(requests, 32))]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join()
    wrong = 0
    for line in lines:
        match = LINE.search(line)
        name = match["message"].rsplit("/", 1)[1] if match else ""
        wrong += match is None or (match["trace"], match["rid"]) != (sent.get(name), name)
    print(f"requests={requests} log_lines={len(lines)} misattributed={wrong}")
    return 0 if wrong == 0 and len(lines) == 2 * requests else 1


class _Keep(logging.Handler):
    def __init__(self, formatter: logging.Formatter, lines: list[str]) -> None:
        super().__init__()
        self.addFilter(threadctx.ContextFilter())
        self.setFormatter(formatter)
        self.lines = lines

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="wsgi-service", help="service.name (default: wsgi-service)")
    parser.add_argument("--port", type=int, default=8080, help="port on 127.0.0.1; 0 picks a free one")
    parser.add_argument("--threads", type=int, default=8, help="waitress worker threads (default: 8)")
    parser.add_argument("--downstream", help="URL of another service to call on each request")
    parser.add_argument("--self-test", type=int, metavar="N", help="serve N concurrent requests, check, exit")
    args = parser.parse_args(argv)
    if args.threads < 1 or (args.self_test is not None and args.self_test < 1):
        parser.error("--threads and --self-test must be at least 1")

    configure(args.name)
    lines: list[str] = []
    if args.self_test:
        log.addHandler(_Keep(logging.Formatter(FORMAT, defaults={"service": args.name}), lines))
    with threadctx.ContextThreadPoolExecutor(max_workers=4, thread_name_prefix="pool") as pool:
        server = create_server(
            make_app(args.downstream, pool), host="127.0.0.1", port=args.port, threads=args.threads
        )
        port = server.effective_port  # type: ignore[union-attr]
        print(f"listening on http://127.0.0.1:{port}", flush=True)
        if not args.self_test:
            server.run()
            return 0
        loop = threading.Thread(target=server.run, daemon=True)
        loop.start()
        try:
            return self_test(int(port), args.self_test, lines)
        finally:
            server.task_dispatcher.shutdown()


if __name__ == "__main__":
    sys.exit(main())
