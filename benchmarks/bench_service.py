"""A real service under load: waitress, served four ways, server CPU time per request.

The service: waitress with 8 threads; each request writes four log lines
through one handler and runs one task on a thread pool (which logs once more
there). Served four ways, each in a server process of its own:

(a) no tracing;
(b) OpenTelemetry's ``OpenTelemetryMiddleware`` (one server span per request);
(c) (b) + ``LoggingInstrumentor(inject_trace_context=True)`` + ``ThreadingInstrumentor``;
(d) (b) + threadctx's ``ContextMiddleware`` + ``ContextFilter`` + ``instrument_threading()``,
    on ``OTEL_PYTHON_CONTEXT=threadctx``.

The same no-op exporter behind a ``SimpleSpanProcessor`` in (b), (c) and (d).
The load comes from this process (8 client threads on keep-alive connections)
and each server reports its own CPU time (``time.process_time()``), read
before and after each batch; the batches of the four servers alternate
within each round, and the figures are medians over the rounds.

Usage: ``python -m benchmarks.bench_service`` (also part of ``make bench``).
"""

from __future__ import annotations

import http.client
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

VARIANTS = {
    "a": "no tracing",
    "b": "OpenTelemetryMiddleware",
    "c": "(b) + LoggingInstrumentor + ThreadingInstrumentor",
    "d": "(b) + threadctx ContextMiddleware + ContextFilter + instrument_threading",
}
FORMAT = "%(asctime)s %(levelname)s [trace_id=%(tid)s span_id=%(sid)s request_id=%(request_id)s] %(message)s"
CPU_PATH = "/__cpu"


def _app(variant: str) -> Any:
    """Build the WSGI app of one variant (runs in the server process)."""
    import logging

    logging.getLogger("waitress").setLevel(logging.ERROR)  # "Task queue depth" warnings under load
    logger = logging.getLogger("service")
    handler = logging.StreamHandler(open(os.devnull, "w"))  # noqa: SIM115 - lives as long as the server
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="pool")
    defaults = {"request_id": "-"}
    tid, sid = "trace_id", "span_id"

    if variant != "a":
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

        class NoopExporter(SpanExporter):
            def export(self, spans: Sequence[Any]) -> SpanExportResult:
                return SpanExportResult.SUCCESS

        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(NoopExporter()))
        trace.set_tracer_provider(provider)
    if variant in ("a", "b"):
        defaults |= {"trace_id": "0", "span_id": "0"}
    elif variant == "c":
        from opentelemetry.instrumentation.logging import LoggingInstrumentor
        from opentelemetry.instrumentation.threading import ThreadingInstrumentor

        LoggingInstrumentor().instrument(inject_trace_context=True)
        ThreadingInstrumentor().instrument()
        tid, sid = "otelTraceID", "otelSpanID"
    else:
        import threadctx

        handler.addFilter(threadctx.ContextFilter())
        threadctx.instrument_threading()
    fmt = FORMAT.replace("%(tid)s", f"%({tid})s").replace("%(sid)s", f"%({sid})s")
    handler.setFormatter(logging.Formatter(fmt, defaults=defaults))

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        if environ["PATH_INFO"] == CPU_PATH:
            body = repr(time.process_time()).encode()
        else:
            logger.info("request for %s", environ["PATH_INFO"])
            logger.info("looking the order up")
            pool.submit(logger.info, "pool task").result()
            logger.info("order found")
            logger.info("answering")
            body = b"ok"
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]

    if variant == "a":
        return app
    from opentelemetry.instrumentation.wsgi import OpenTelemetryMiddleware

    if variant == "d":
        from threadctx.wsgi import ContextMiddleware

        return OpenTelemetryMiddleware(ContextMiddleware(app))
    return OpenTelemetryMiddleware(app)


def serve(variant: str) -> None:
    """Serve one variant on a free port; print the port, then serve until killed."""
    from waitress.server import create_server

    server = create_server(_app(variant), host="127.0.0.1", port=0, threads=8)
    print(server.effective_port, flush=True)  # type: ignore[union-attr]
    server.run()


@contextmanager
def servers() -> Iterator[dict[str, int]]:
    """One server process per variant; yields their ports."""
    procs: dict[str, subprocess.Popen[str]] = {}
    try:
        for variant in VARIANTS:
            env = dict(os.environ)
            env.pop("OTEL_PYTHON_CONTEXT", None)
            if variant == "d":
                env["OTEL_PYTHON_CONTEXT"] = "threadctx"
            procs[variant] = subprocess.Popen(
                [sys.executable, "-m", "benchmarks.bench_service", "serve", variant],
                stdout=subprocess.PIPE,
                text=True,
                env=env,
            )
        ports = {}
        for variant, proc in procs.items():
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"server {variant} did not start")
            ports[variant] = int(line)
        yield ports
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            proc.wait(30)


def _get(conn: http.client.HTTPConnection, path: str) -> bytes:
    conn.request("GET", path)
    response = conn.getresponse()
    body = response.read()
    if response.status != 200:
        raise RuntimeError(f"{path}: HTTP {response.status}")
    return body


def load(port: int, requests: int, clients: int = 8) -> tuple[float, float]:
    """Send ``requests`` from ``clients`` threads; return (server CPU seconds, wall seconds)."""
    control = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    per_client = requests // clients

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.connect()
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for index in range(per_client):
            _get(conn, f"/orders/{index}")
        conn.close()

    cpu_before = float(_get(control, CPU_PATH))
    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    cpu_after = float(_get(control, CPU_PATH))
    control.close()
    return cpu_after - cpu_before, wall


def measure(requests: int, rounds: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Per variant and round: server CPU µs per request, and requests per second."""
    cpu: dict[str, list[float]] = {v: [] for v in VARIANTS}
    rps: dict[str, list[float]] = {v: [] for v in VARIANTS}
    names = list(VARIANTS)
    sent = requests // 8 * 8
    with servers() as ports:
        for variant in names:  # warm-up
            load(ports[variant], requests // 5)
        for round_index in range(rounds):
            order = names[round_index % len(names) :] + names[: round_index % len(names)]
            for variant in order:
                seconds, wall = load(ports[variant], sent)
                cpu[variant].append(seconds / sent * 1e6)
                rps[variant].append(sent / wall)
    return cpu, rps


def report(cpu: dict[str, list[float]], rps: dict[str, list[float]], requests: int) -> str:
    rounds = len(cpu["a"])
    median = {v: statistics.median(cpu[v]) for v in VARIANTS}
    lines = [
        "### A waitress service under load (server CPU per request)",
        "",
        f"{requests:,} requests from 8 client threads in another process, per variant and round; {rounds}",
        "interleaved rounds, medians. Each request: four log lines through one handler, one task on a",
        "thread pool that logs once more.",
        "",
        "| variant | server CPU per request | requests per second |",
        "|---|---|---|",
    ]
    for variant, name in VARIANTS.items():
        per_second = statistics.median(rps[variant])
        lines.append(f"| ({variant}) {name} | {median[variant]:,.0f} µs | {per_second:,.0f} |")
    # Added costs as paired differences within each round (the four batches ran back to back, so a
    # slow drift of the machine cancels out), then their medians over the rounds.
    added = {v: sorted(x - b for x, b in zip(cpu[v], cpu["b"], strict=True)) for v in ("c", "d")}
    added_c, added_d = (statistics.median(added[v]) for v in ("c", "d"))
    quartiles = {v: statistics.quantiles(added[v], n=4) for v in ("c", "d")}
    lines += [
        "",
        f"Added over (b), paired within each round: (c) {added_c:,.0f} µs (quartiles "
        f"{quartiles['c'][0]:,.0f} to {quartiles['c'][2]:,.0f}), (d) {added_d:,.0f} µs (quartiles "
        f"{quartiles['d'][0]:,.0f} to {quartiles['d'][2]:,.0f}).",
        f"What (d) adds is {added_d / added_c:.2f}x what (c) adds (target: at most 1.0x)."
        if added_c > 0
        else "(c) added nothing measurable over (b) in this run.",
        "",
    ]
    return "\n".join(lines)


def run_all(requests: int = 800, rounds: int = 15) -> list[str]:
    return [report(*measure(requests, rounds), requests)]


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "serve":
        serve(sys.argv[2])
    else:
        began = time.perf_counter()
        print(run_all()[0])
        print(f"took {time.perf_counter() - began:.0f} s")
