"""Instructions per operation under ``valgrind --tool=callgrind``: a figure that machine load does not move.

Timings on a shared machine drift; instruction counts do not. Each workload runs
in a process of its own under callgrind twice, with ``N`` and ``2N`` operations
(after a warm-up), and the difference of the two totals divided by ``N`` is the
count per operation: start-up, imports and warm-up cancel. Instructions are not
time (a cache miss costs more than an add), but a change that removes work shows
here without noise, which is what a before/after comparison of a hot path needs.

Workloads (the same code as the timed benchmarks):

- ``wsgi-b``, ``wsgi-c``, ``wsgi-d``: one request of ``bench_service``'s waitress app
  through its stack (b), (c), (d), called in-process: four log lines and one pool task;
- ``asgi-b``, ``asgi-c``, ``asgi-d``: one request of ``bench_service``'s FastAPI app
  (async endpoint) through (b), (c), (d), driven by an event loop in-process;
- ``record-bare``, ``record-instrumentor``, ``record-filter``, ``record-floor``: one log record
  in a long span (``bench_logging``), with nothing, LoggingInstrumentor, ContextFilter, the floor;
- ``mw-none``, ``mw-asgi-correlation-id``, ``mw-threadctx``: one request through the ASGI
  middleware alone (``bench_asgi``, with an X-Request-ID), and ``mw-threadctx-traceparent``;
- ``piece-wsgi-0``, ``piece-wsgi-1``: ``bench_request_path``'s WSGI layer (OpenTelemetryMiddleware
  alone, with ContextMiddleware inside); ``piece-records-0/1/2``: its five records (no injection,
  LoggingInstrumentor, ContextFilter); ``piece-pool-0/1/2``: its pool task (plain,
  ThreadingInstrumentor, ``instrument_threading()``).

Usage: ``python -m benchmarks.callgrind [WORKLOAD ...]`` (needs valgrind on PATH).
"""

from __future__ import annotations

import asyncio
import gc
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

N = {"wsgi": 40, "asgi": 40, "record": 400, "mw": 400, "piece": 100}
ENVIRON = {
    "REQUEST_METHOD": "GET",
    "PATH_INFO": "/orders/1",
    "QUERY_STRING": "",
    "SERVER_NAME": "127.0.0.1",
    "SERVER_PORT": "8080",
    "SERVER_PROTOCOL": "HTTP/1.1",
    "REMOTE_ADDR": "127.0.0.1",
    "HTTP_HOST": "127.0.0.1:8080",
    "wsgi.url_scheme": "http",
}
WORKLOADS = [
    "wsgi-b",
    "wsgi-c",
    "wsgi-d",
    "asgi-b",
    "asgi-c",
    "asgi-d",
    "record-bare",
    "record-instrumentor",
    "record-filter",
    "record-floor",
    "mw-none",
    "mw-asgi-correlation-id",
    "mw-threadctx",
    "mw-threadctx-traceparent",
    "piece-wsgi-0",
    "piece-wsgi-1",
    "piece-records-0",
    "piece-records-1",
    "piece-records-2",
    "piece-pool-0",
    "piece-pool-1",
    "piece-pool-2",
]


def _wsgi(variant: str) -> Callable[[int], None]:
    from benchmarks.bench_request_path import _serve
    from benchmarks.bench_service import wsgi_app

    return _serve(wsgi_app(variant), ENVIRON)


def _asgi(variant: str) -> Callable[[int], None]:
    from benchmarks.bench_service import asgi_app

    app = asgi_app(variant)
    loop = asyncio.new_event_loop()
    loop.set_default_executor(ThreadPoolExecutor(max_workers=1))

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        return None

    async def serve(loops: int) -> None:
        for _ in range(loops):
            scope = {
                "type": "http",
                "asgi": {"version": "3.0"},
                "http_version": "1.1",
                "method": "GET",
                "scheme": "http",
                "path": "/async/1",
                "raw_path": b"/async/1",
                "query_string": b"",
                "root_path": "",
                "headers": [(b"host", b"127.0.0.1:8080")],
                "client": ("127.0.0.1", 50000),
                "server": ("127.0.0.1", 8080),
            }
            await app(scope, receive, send)

    def run(loops: int) -> None:
        loop.run_until_complete(serve(loops))

    return run


def workload(name: str) -> Callable[[int], None]:
    kind, _, rest = name.partition("-")
    if kind == "wsgi":
        return _wsgi(rest)
    if kind == "asgi":
        return _asgi(rest)
    if kind == "piece":
        from benchmarks import bench_request_path

        which, _, index = rest.partition("-")
        variants = getattr(bench_request_path, f"{which}_variants")()
        return list(variants.values())[int(index)]
    if kind == "record":
        from benchmarks import bench_logging

        names = {
            "bare": bench_logging.BASELINE,
            "instrumentor": "LoggingInstrumentor",
            "filter": bench_logging.FILTER,
            "floor": bench_logging.FLOOR,
        }
        return bench_logging._single(names[rest])
    from benchmarks import bench_asgi

    headers = [(b"x-request-id", bench_asgi.REQUEST_ID)]
    if rest.endswith("-traceparent"):
        rest = rest.removesuffix("-traceparent")
        headers.append((b"traceparent", bench_asgi.TRACEPARENT))
    names = {
        "none": bench_asgi.BASELINE,
        "asgi-correlation-id": bench_asgi.THEIRS,
        "threadctx": bench_asgi.OURS,
    }
    return bench_asgi._requests(names[rest], headers)


def _env(name: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONHASHSEED="0")
    # The stacks without threadctx run on OpenTelemetry's default runtime context, as in bench_service.
    if name.endswith(("-b", "-c")) or name in ("piece-records-1", "piece-pool-1"):
        env.pop("OTEL_PYTHON_CONTEXT", None)
    else:
        env["OTEL_PYTHON_CONTEXT"] = "threadctx"
    return env


def _instructions(name: str, loops: int) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "callgrind.out")
        done = subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={out}",
                sys.executable,
                "-m",
                "benchmarks.callgrind",
                "work",
                name,
                str(loops),
            ],
            capture_output=True,
            text=True,
            env=_env(name),
            check=False,
        )
        found = re.search(r"Collected : (\d+)", done.stderr)
        if done.returncode != 0 or found is None:
            raise RuntimeError(f"callgrind {name} {loops}: {done.stderr[-2000:]}")
        return int(found.group(1))


def count(name: str) -> float:
    """Instructions per operation of workload ``name``."""
    loops = N[name.partition("-")[0]]
    with ThreadPoolExecutor(max_workers=2) as pool:
        once, twice = pool.map(lambda n: _instructions(name, n), (loops, 2 * loops))
    return (twice - once) / loops


def main(names: list[str]) -> dict[str, float]:
    found = {}
    for name in names or WORKLOADS:
        found[name] = count(name)
        print(f"{name:28} {found[name]:>14,.0f} instructions per operation", flush=True)
    return found


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "work":
        run = workload(sys.argv[2])
        run(5)  # warm-up: caches, first-call paths, lazy imports
        # No cyclic collection inside the counted loop: when one falls depends on every allocation
        # since start-up, and would move a before/after comparison by more than the change.
        gc.collect()
        gc.disable()
        run(int(sys.argv[3]))
    else:
        main(sys.argv[1:])
