"""A request through a real service: waitress, one span, four log lines, one thread-pool task.

Four servers run side by side, each its own process (the runtime context is
chosen when OpenTelemetry is imported):

(a) no tracing; (b) OpenTelemetry's ``OpenTelemetryMiddleware`` only; (c) (b) +
``LoggingInstrumentor(inject_trace_context=True)`` + ``ThreadingInstrumentor``;
(d) (b) + threadctx's ``ContextMiddleware`` + ``ContextFilter`` +
``instrument_threading()`` on ``OTEL_PYTHON_CONTEXT=threadctx``.  All export
their spans to the same exporter, which discards them.

A load generator in another process sends a fixed number of requests from
several client threads, each request with its own ``traceparent`` and
``X-Request-ID``.  The figure is the server's CPU time per request (user +
system, from ``/proc``), so the client's own cost is not counted; the rounds
alternate the servers, and each ratio is the median of the per-round ratios.

Usage: ``python -m benchmarks.bench_service`` (also part of ``make bench``).
"""

from __future__ import annotations

import http.client
import os
import secrets
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

VARIANTS = {
    "a": "(a) no tracing",
    "b": "(b) OpenTelemetryMiddleware",
    "c": "(c) (b) + LoggingInstrumentor + ThreadingInstrumentor",
    "d": "(d) (b) + threadctx (ContextMiddleware, ContextFilter, instrument_threading)",
}
REQUESTS = 2_000
CLIENTS = 8
ROUNDS = 5
SERVER_THREADS = 8
ROOT = Path(__file__).resolve().parent.parent


# --- the server ----------------------------------------------------------------------------------


def serve(variant: str, port: int) -> None:  # pragma: no cover - runs in the server process
    import logging
    from concurrent.futures import ThreadPoolExecutor

    import waitress
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

    class Discard(SpanExporter):
        def export(self, spans: object) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(Discard()))
    trace.set_tracer_provider(provider)

    fields = {
        "a": "",
        "b": "",
        "c": "trace_id=%(otelTraceID)s span_id=%(otelSpanID)s ",
        "d": "trace_id=%(trace_id)s span_id=%(span_id)s request_id=%(request_id)s ",
    }[variant]
    handler = logging.StreamHandler(open(os.devnull, "w"))  # noqa: SIM115 - lives as long as the server
    handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s %(threadName)s {fields}%(message)s"))
    log = logging.getLogger("service")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    logging.getLogger("waitress").setLevel(logging.ERROR)  # "Task queue depth" warnings under load

    if variant == "c":
        from opentelemetry.instrumentation.logging import LoggingInstrumentor
        from opentelemetry.instrumentation.threading import ThreadingInstrumentor

        LoggingInstrumentor().instrument(set_logging_format=False, inject_trace_context=True)
        ThreadingInstrumentor().instrument()
    if variant == "d":
        import threadctx

        threadctx.instrument_threading()
        handler.addFilter(threadctx.ContextFilter())

    pool = ThreadPoolExecutor(max_workers=4)

    def lookup(order: str) -> int:
        log.info("looking up order %s", order)
        return len(order)

    def app(environ: dict[str, object], start_response: object) -> list[bytes]:
        order = str(environ.get("PATH_INFO", "/"))
        log.info("request for %s", order)
        size = pool.submit(lookup, order).result()
        log.info("order %s has %d items", order, size)
        body = b"ok"
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])  # type: ignore[operator]
        log.info("answered %s", order)
        return [body]

    application = app
    if variant == "d":
        from threadctx.wsgi import ContextMiddleware

        application = ContextMiddleware(application)  # type: ignore[assignment]
    if variant != "a":
        from opentelemetry.instrumentation.wsgi import OpenTelemetryMiddleware

        application = OpenTelemetryMiddleware(application)  # type: ignore[assignment]
    waitress.serve(application, host="127.0.0.1", port=port, threads=SERVER_THREADS, _quiet=True)


# --- the load generator --------------------------------------------------------------------------


def load(port: int, requests: int, clients: int) -> None:  # pragma: no cover - runs in the client process
    """Send ``requests`` requests from ``clients`` threads over keep-alive connections."""
    failures: list[str] = []

    def client(count: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        for n in range(count):
            headers = {
                "traceparent": f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01",
                "X-Request-ID": f"req-{secrets.token_hex(6)}",
            }
            connection.request("GET", f"/orders/{n}", headers=headers)
            response = connection.getresponse()
            if response.read() != b"ok" or response.status != 200:
                failures.append(f"{response.status}")
        connection.close()

    threads = [threading.Thread(target=client, args=(requests // clients,)) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        sys.exit(f"{len(failures)} requests failed: {failures[:5]}")


# --- the comparison ------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _wait_ready(port: int, server: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"server exited with {server.returncode}: {server.stderr.read()!r}")  # type: ignore[union-attr]
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"server on port {port} did not start")


@dataclass
class ServiceResult:
    name: str
    cpu_us: float  # server CPU per request, median over rounds
    rps: float  # requests per second, median over rounds
    ratio: float  # median of per-round CPU ratios to (b)


def run_all(requests: int = REQUESTS, rounds: int = ROUNDS) -> list[ServiceResult]:
    """Start the four servers, load each in turn for ``rounds`` rounds, and compare."""
    if not Path("/proc/self/stat").exists():
        raise RuntimeError("the service benchmark reads server CPU time from /proc (Linux only)")
    servers: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
    try:
        for variant in VARIANTS:
            port = _free_port()
            env = {key: value for key, value in os.environ.items() if not key.startswith("OTEL_")}
            if variant == "d":
                env["OTEL_PYTHON_CONTEXT"] = "threadctx"
            server = subprocess.Popen(
                [sys.executable, "-m", "benchmarks.bench_service", "serve", variant, str(port)],
                cwd=ROOT,
                env=env,
                stderr=subprocess.PIPE,
            )
            servers[variant] = (server, port)
        for server, port in servers.values():
            _wait_ready(port, server)
        cpu: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
        rps: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
        names = list(VARIANTS)
        for round_index in range(rounds + 1):  # round 0 warms every server up
            order = names[round_index % len(names) :] + names[: round_index % len(names)]
            for variant in order:
                server, port = servers[variant]
                before, start = _cpu_seconds(server.pid), time.perf_counter()
                subprocess.run(
                    [sys.executable, "-m", "benchmarks.bench_service", "load", str(port), str(requests)],
                    cwd=ROOT,
                    check=True,
                )
                elapsed = time.perf_counter() - start
                if round_index:
                    cpu[variant].append((_cpu_seconds(server.pid) - before) / requests * 1e6)
                    rps[variant].append(requests / elapsed)
    finally:
        for server, _ in servers.values():
            server.terminate()
            server.wait(30)
    return [
        ServiceResult(
            name=VARIANTS[variant],
            cpu_us=statistics.median(cpu[variant]),
            rps=statistics.median(rps[variant]),
            ratio=statistics.median(c / b for c, b in zip(cpu[variant], cpu["b"], strict=True)),
        )
        for variant in VARIANTS
    ]


def table(results: list[ServiceResult]) -> str:
    by_letter = {result.name[1]: result for result in results}
    base = by_letter["b"].cpu_us
    added_c, added_d = by_letter["c"].cpu_us - base, by_letter["d"].cpu_us - base
    lines = [
        f"### A request through waitress ({SERVER_THREADS} threads), {REQUESTS:,} requests from "
        f"{CLIENTS} clients, {ROUNDS} rounds",
        "",
        "| variant | server CPU per request (µs, median) | requests/s (median) | CPU ratio to (b) |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r.name} | {r.cpu_us:,.0f} | {r.rps:,.0f} | {r.ratio:.2f}x |" for r in results]
    lines += [
        "",
        f"Over (b): OpenTelemetry's instrumentors (c) add {added_c:,.0f} µs per request, threadctx (d) "
        f"adds {added_d:,.0f} µs ({added_d / added_c:.2f}x of (c)'s)."
        if added_c > 0
        else f"Over (b): (c) adds {added_c:,.0f} µs, (d) adds {added_d:,.0f} µs per request.",
        "",
        "Target: what (d) adds over (b) at most what (c) adds over (b).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    if sys.argv[1:2] == ["serve"]:
        serve(sys.argv[2], int(sys.argv[3]))
    elif sys.argv[1:2] == ["load"]:
        load(int(sys.argv[2]), int(sys.argv[3]), CLIENTS)
    else:
        print(table(run_all()))


if __name__ == "__main__":
    main()
