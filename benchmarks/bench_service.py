"""Real services under load, server CPU time per request: waitress (WSGI) and FastAPI under uvicorn (ASGI).

Each request writes four log lines through one handler and runs one task on a
thread pool (which logs once more there), under one server span. Each stack is
served by a server process of its own:

(a) no tracing (WSGI only: the floor of the server itself);
(b) OpenTelemetry's ``OpenTelemetryMiddleware`` (one server span per request);
(c) (b) + what a user assembles today for trace ids (and, on ASGI, request ids):
    ``LoggingInstrumentor(inject_trace_context=True)`` + ``ThreadingInstrumentor``
    (+ asgi-correlation-id's ``CorrelationIdMiddleware`` and ``CorrelationIdFilter``);
(d) (b) + threadctx's ``ContextMiddleware`` + ``ContextFilter`` + ``instrument_threading()``,
    on ``OTEL_PYTHON_CONTEXT=threadctx``.

The WSGI peer (c) has no request-id middleware at all, on purpose: the target is request
ids, correlation IDs and the operator's view for no more than OpenTelemetry charges for
trace ids alone. The same no-op exporter behind a ``SimpleSpanProcessor`` everywhere.

The load comes from this process (8 client threads on keep-alive connections, no request
id and no ``traceparent`` sent: both middlewares generate an id). With two CPUs or more the
servers run on one CPU and the clients on the others (``cpus()``: spread over CPUs, the GIL
hand-offs between a server's threads cost more than everything measured and vary from batch
to batch; on this 2-CPU machine, (b) took 760 µs per request spread and 306 µs pinned). The
server's CPU time is read before and after each batch, every thread of the process, in
nanoseconds where the system allows (``cpu_seconds``). Within a round every stack serves
one batch, in a rotating order; added costs are paired differences within each round, and
each comes with a bootstrap interval over the rounds (``benchmarks.verdict``), so the
verdict on the target says met, missed or undecided rather than quoting one median.

Usage: ``python -m benchmarks.bench_service [wsgi|asgi]`` (both by default; also part of
``make bench``); ``python -m benchmarks.bench_service serve wsgi|asgi VARIANT`` serves one stack.
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
from dataclasses import dataclass
from typing import Any

from benchmarks.verdict import added, estimate, target_line

FORMAT = "%(asctime)s %(levelname)s [trace_id=%(tid)s span_id=%(sid)s request_id=%(rid)s] %(message)s"
CLIENTS = 8


@dataclass(frozen=True)
class Service:
    kind: str  # "wsgi" or "asgi"
    title: str
    variants: dict[str, str]
    paths: dict[str, str]  # endpoint label -> path prefix


WSGI = Service(
    "wsgi",
    "A waitress service under load (8 threads)",
    {
        "a": "no tracing",
        "b": "OpenTelemetryMiddleware",
        "c": "(b) + LoggingInstrumentor + ThreadingInstrumentor",
        "d": "(b) + threadctx ContextMiddleware + ContextFilter + instrument_threading()",
    },
    {"": "/orders/"},
)
ASGI = Service(
    "asgi",
    "A FastAPI service under uvicorn",
    {
        "b": "OpenTelemetryMiddleware",
        "c": "(b) + asgi-correlation-id + LoggingInstrumentor + ThreadingInstrumentor",
        "d": "(b) + threadctx ContextMiddleware + ContextFilter + instrument_threading()",
    },
    {"async endpoint": "/async/", "sync endpoint": "/sync/"},
)
SERVICES = {service.kind: service for service in (WSGI, ASGI)}


def _logger(kind: str, variant: str) -> Any:
    """The service's logger, configured for one stack (runs in the server process)."""
    import logging

    logging.getLogger("waitress").setLevel(logging.ERROR)  # "Task queue depth" warnings under load
    logger = logging.getLogger("service")
    handler = logging.StreamHandler(open(os.devnull, "w"))  # noqa: SIM115 - lives as long as the server
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    defaults = {"request_id": "-", "correlation_id": "-"}
    tid, sid, rid = "trace_id", "span_id", "request_id"
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
        if kind == "asgi":
            from asgi_correlation_id import CorrelationIdFilter

            handler.addFilter(CorrelationIdFilter())
            rid = "correlation_id"
    else:
        import threadctx

        handler.addFilter(threadctx.ContextFilter())
        threadctx.instrument_threading()
    fmt = FORMAT.replace("%(tid)s", f"%({tid})s").replace("%(sid)s", f"%({sid})s")
    handler.setFormatter(logging.Formatter(fmt.replace("%(rid)s", f"%({rid})s"), defaults=defaults))
    return logger


def wsgi_app(variant: str) -> Any:
    """The WSGI app of one stack."""
    logger = _logger("wsgi", variant)
    pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="pool")

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        logger.info("request for %s", environ["PATH_INFO"])
        logger.info("looking the order up")
        pool.submit(logger.info, "pool task").result()
        logger.info("order found")
        logger.info("answering")
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
        return [b"ok"]

    if variant == "a":
        return app
    from opentelemetry.instrumentation.wsgi import OpenTelemetryMiddleware

    if variant == "d":
        from threadctx.wsgi import ContextMiddleware

        return OpenTelemetryMiddleware(ContextMiddleware(app))
    return OpenTelemetryMiddleware(app)


def asgi_app(variant: str) -> Any:
    """The FastAPI app of one stack, wrapped in OpenTelemetry's ASGI middleware."""
    import asyncio

    from fastapi import FastAPI
    from fastapi.responses import PlainTextResponse
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

    logger = _logger("asgi", variant)
    pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="pool")
    app = FastAPI()

    @app.get("/async/{order}", response_class=PlainTextResponse)
    async def async_order(order: int) -> str:
        logger.info("request for %s", order)
        logger.info("looking the order up")
        await asyncio.wrap_future(pool.submit(logger.info, "pool task"))
        logger.info("order found")
        logger.info("answering")
        return "ok"

    @app.get("/sync/{order}", response_class=PlainTextResponse)
    def sync_order(order: int) -> str:
        logger.info("request for %s", order)
        logger.info("looking the order up")
        pool.submit(logger.info, "pool task").result()
        logger.info("order found")
        logger.info("answering")
        return "ok"

    if variant == "c":
        from asgi_correlation_id import CorrelationIdMiddleware

        app.add_middleware(CorrelationIdMiddleware)
    elif variant == "d":
        from threadctx.asgi import ContextMiddleware

        app.add_middleware(ContextMiddleware)
    return OpenTelemetryMiddleware(app)


def serve(kind: str, variant: str) -> None:
    """Serve one stack on a free port; print the port, then serve until killed."""
    pinned = os.environ.get("THREADCTX_BENCH_CPU")
    if pinned is not None:
        os.sched_setaffinity(0, {int(pinned)})  # before any thread starts: they all stay there
    if kind == "wsgi":
        from waitress.server import create_server

        server = create_server(wsgi_app(variant), host="127.0.0.1", port=0, threads=8)
        print(server.effective_port, flush=True)  # type: ignore[union-attr]
        server.run()
        return
    import uvicorn

    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY on accepted sockets only when the listening
    # socket says so (proto 0 leaves Nagle on: 40 ms per response, delayed ACKs).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)  # before the port is printed: a client may connect before uvicorn starts serving
    config = uvicorn.Config(asgi_app(variant), log_level="warning", access_log=False, lifespan="off")
    print(sock.getsockname()[1], flush=True)
    uvicorn.Server(config).run(sockets=[sock])


@contextmanager
def servers(service: Service) -> Iterator[dict[str, tuple[int, int]]]:
    """One server process per stack; yields their (port, pid)."""
    procs: dict[str, subprocess.Popen[str]] = {}
    split = cpus()
    saved = os.sched_getaffinity(0) if split is not None else None
    try:
        if split is not None:
            os.sched_setaffinity(0, split[1])  # the clients (this process) on the other CPUs
        for variant in service.variants:
            env = dict(os.environ)
            env.pop("OTEL_PYTHON_CONTEXT", None)
            if split is not None:
                env["THREADCTX_BENCH_CPU"] = str(min(split[0]))
            if variant == "d":
                env["OTEL_PYTHON_CONTEXT"] = "threadctx"
            procs[variant] = subprocess.Popen(
                [sys.executable, "-m", "benchmarks.bench_service", "serve", service.kind, variant],
                stdout=subprocess.PIPE,
                text=True,
                env=env,
            )
        found = {}
        for variant, proc in procs.items():
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"server {service.kind} {variant} did not start")
            found[variant] = (int(line), proc.pid)
        yield found
    finally:
        if saved is not None:
            os.sched_setaffinity(0, saved)
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            proc.wait(30)


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int) -> float:
    """CPU time of process ``pid``, every thread of it, also those that have ended.

    In nanoseconds from the process's CPU-time clock where the system has one for another
    process (Linux: the clock id ``(~pid << 3) | 2``, CPUCLOCK_SCHED); else user + system time
    from ``/proc/PID/stat``, in clock ticks (10 ms: 6 µs per request in a batch of 1,600).
    """
    try:
        return time.clock_gettime_ns(((~pid) << 3) | 2) / 1e9
    except (OSError, AttributeError, OverflowError):
        pass
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime (fields 14 and 15)


def cpus() -> tuple[set[int], set[int]] | None:
    """(the servers' CPU, the clients' CPUs) when this machine has two or more to split, else ``None``.

    A server's threads hand the GIL to each other; spread over CPUs, each hand-off is a wake-up on
    another CPU, which costs more than everything measured here and varies from batch to batch.
    """
    if not hasattr(os, "sched_getaffinity"):
        return None
    mine = sorted(os.sched_getaffinity(0))
    return ({mine[-1]}, set(mine[:-1])) if len(mine) >= 2 else None


def _get(conn: http.client.HTTPConnection, path: str) -> None:
    conn.request("GET", path)
    response = conn.getresponse()
    response.read()
    if response.status != 200:
        raise RuntimeError(f"{path}: HTTP {response.status}")


def load(port: int, pid: int, prefix: str, requests: int) -> tuple[float, float]:
    """Send ``requests`` from 8 client threads; return (server CPU seconds, wall seconds)."""
    per_client = requests // CLIENTS
    # A client that cannot connect breaks the barrier: the run fails instead of waiting forever.
    ready = threading.Barrier(CLIENTS + 1, timeout=60)

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.connect()
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        ready.wait()
        for index in range(per_client):
            _get(conn, f"{prefix}{index}")
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    for thread in threads:
        thread.start()
    ready.wait()  # every connection open: only requests from here on
    cpu_before, started = cpu_seconds(pid), time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    return cpu_seconds(pid) - cpu_before, wall


Samples = dict[str, dict[str, list[float]]]  # endpoint -> variant -> one value per round


#: Rounds served by one set of server processes before all are started anew.
ROUNDS_PER_SERVER = 6


def measure(service: Service, requests: int, rounds: int, budget: float = 200.0) -> tuple[Samples, Samples]:
    """Per endpoint, stack and round: server CPU µs per request, and requests per second.

    The servers are started anew every :data:`ROUNDS_PER_SERVER` rounds: one process can be
    faster or slower than another running the same code (where its objects landed, its hash
    seed), by about 10 µs per request here, and across one run that bias would pass for a
    difference between stacks; across several processes per stack it is part of the spread.
    At most ``rounds`` rounds, and no new round once ``budget`` seconds are spent (a busy
    machine serves fewer requests per second): the report says how many ran.
    """
    began = time.perf_counter()
    names = list(service.variants)
    cpu: Samples = {path: {v: [] for v in names} for path in service.paths}
    rps: Samples = {path: {v: [] for v in names} for path in service.paths}
    sent = requests // CLIENTS * CLIENTS
    batches = [(path, v) for path in service.paths for v in names]
    round_index = 0
    while round_index < rounds and time.perf_counter() - began <= budget:
        with servers(service) as found:
            for path, variant in batches:  # warm-up
                load(*found[variant], service.paths[path], sent // 4)
            for _ in range(ROUNDS_PER_SERVER):
                if round_index >= rounds or time.perf_counter() - began > budget:
                    break
                shift = round_index % len(batches)
                for path, variant in batches[shift:] + batches[:shift]:
                    seconds, wall = load(*found[variant], service.paths[path], sent)
                    cpu[path][variant].append(seconds / sent * 1e6)
                    rps[path][variant].append(sent / wall)
                round_index += 1
    return cpu, rps


def report(service: Service, cpu: Samples, rps: Samples, requests: int, seconds: float) -> str:
    rounds = len(next(iter(next(iter(cpu.values())).values())))
    lines = [
        f"### {service.title} (server CPU per request)",
        "",
        f"{requests:,} requests from 8 client threads in another process per stack, endpoint and round;",
        f"{rounds} interleaved rounds ({seconds:.0f} s in all; the servers started anew every "
        f"{ROUNDS_PER_SERVER} rounds). Each request: four log lines through one",
        "handler, one task on a thread pool that logs once more. Medians over the rounds, with the 95%",
        "bootstrap interval of each. Load average at the end of the run: "
        + (f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs." if hasattr(os, "getloadavg") else "-")
        + (" The servers ran on one CPU, the clients on the others." if cpus() is not None else ""),
        "",
    ]
    for path, by_variant in cpu.items():
        if path:
            lines += [f"**{path}**", ""]
        lines += ["| stack | server CPU per request | requests per second |", "|---|---|---|"]
        for variant, name in service.variants.items():
            per_second = statistics.median(rps[path][variant])
            shown = estimate(by_variant[variant]).show(" µs")
            lines.append(f"| ({variant}) {name} | {shown} | {per_second:,.0f} |")
        added_c, added_d = (added(by_variant[v], by_variant["b"]) for v in ("c", "d"))
        lines += [
            "",
            f"Added over (b), paired within each round: (c) {estimate(added_c).show(' µs')}, "
            f"(d) {estimate(added_d).show(' µs')}; (d) - (c) "
            f"{estimate(added(by_variant['d'], by_variant['c'])).show(' µs')}.",
            "",
            "- " + target_line("What (d) adds (A) / what (c) adds (B)", added_d, added_c, 1.0),
            "",
        ]
    return "\n".join(lines)


def run(kind: str, requests: int | None = None, rounds: int | None = None) -> str:
    service = SERVICES[kind]
    # Sized for under five minutes each on a 2-CPU machine.
    requests = requests or (1600 if kind == "wsgi" else 800)
    rounds = rounds or (36 if kind == "wsgi" else 28)
    began = time.perf_counter()
    cpu, rps = measure(service, requests, rounds)
    return report(service, cpu, rps, requests, time.perf_counter() - began)


def run_all() -> list[str]:
    return [run("wsgi"), run("asgi")]


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "serve":
        serve(sys.argv[2], sys.argv[3])
    else:
        kinds = sys.argv[1:2] or list(SERVICES)
        for kind in kinds:
            rounds = int(sys.argv[2]) if len(sys.argv) > 2 else None
            print(run(kind, rounds=rounds))
