"""threadctx demo: a worker pool whose threads each log with their own trace and request ids.

Run it with ``make demo`` (or ``OTEL_PYTHON_CONTEXT=threadctx python examples/demo.py``).
Each request runs on a pool thread, inside its own span, with its own request id
bound; every line goes through one shared handler. At the end the demo checks
every line against the request that wrote it and exits non-zero on any mismatch.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import re
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("OTEL_PYTHON_CONTEXT", "threadctx")  # before OpenTelemetry is imported

from opentelemetry import context as otel_context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import threadctx

FORMAT = (
    "%(threadName)-10s trace=%(trace_id)s span=%(span_id)s "
    "request_id=%(request_id)s tenant=%(tenant)s %(message)s"
)
LINE = re.compile(
    r"trace=(?P<trace>[0-9a-f]{32}) span=(?P<span>[0-9a-f]{16}) request_id=(?P<req>\S+) .* req=(?P<own>\S+)$"
)


def misattributed(lines: list[str], expected: dict[str, tuple[str, str]]) -> int:
    """Count the lines whose ids are not those of the request that wrote them."""
    wrong = 0
    for line in lines:
        match = LINE.search(line)
        if (
            match is None
            or match["req"] != match["own"]
            or (match["trace"], match["span"]) != expected[match["own"]]
        ):
            wrong += 1
    return wrong


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200, help="requests to serve (default: 200)")
    parser.add_argument("--workers", type=int, default=8, help="pool threads (default: 8)")
    parser.add_argument("--lines", type=int, default=5, help="log lines per request (default: 5)")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.workers < 1 or args.lines < 1:
        parser.error("--requests, --workers and --lines must be at least 1")

    runtime = type(otel_context._RUNTIME_CONTEXT).__name__
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "threadctx-demo"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("demo")

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(FORMAT, defaults={"request_id": "-", "tenant": "-"}))
    handler.addFilter(threadctx.ContextFilter())  # on the handler: every logger's records get stamped
    log = logging.getLogger("demo.worker")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False

    expected: dict[str, tuple[str, str]] = {}
    lock = threading.Lock()

    def serve(index: int) -> None:
        request_id = f"req-{index:05d}"
        with (
            tracer.start_as_current_span(f"GET /orders/{index}") as span,
            threadctx.bound(request_id=request_id, tenant=f"tenant-{index % 3}"),
        ):
            ctx = span.get_span_context()
            with lock:
                expected[request_id] = (format(ctx.trace_id, "032x"), format(ctx.span_id, "016x"))
            for step in range(args.lines):
                log.info("step %d of request req=%s", step, request_id)
        # The worker leaves the request: nothing of it stays bound on this thread.
        if threadctx.correlation():
            raise AssertionError("a finished request left correlation IDs on its worker")

    with ThreadPoolExecutor(max_workers=args.workers, thread_name_prefix="worker") as pool:
        for future in [pool.submit(serve, i) for i in range(args.requests)]:
            future.result()

    lines = stream.getvalue().splitlines()
    wrong = misattributed(lines, expected)
    threads = {line.split(" ", 1)[0] for line in lines}

    print(f"runtime context: {runtime}")
    print("sample of the log lines (one shared handler, many threads):")
    for line in lines[:: max(len(lines) // 6, 1)][:6]:
        print("  " + line)
    spans = exporter.get_finished_spans()
    checks = [
        ("requests served", args.requests, len(expected) == args.requests),
        ("worker threads that logged", len(threads), 0 < len(threads) <= args.workers),
        ("log lines", len(lines), len(lines) == args.requests * args.lines),
        ("lines attributed to the wrong request", wrong, wrong == 0),
        ("spans exported", len(spans), len(spans) == args.requests),
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
