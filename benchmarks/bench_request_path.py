"""Where the service benchmark's added cost per request goes, piece by piece, in one process.

The pieces that (c) and (d) of ``bench_service`` add over OpenTelemetryMiddleware,
each timed beside its counterpart, in the rounds of ``harness.compare``:

- the WSGI layer: ``OpenTelemetryMiddleware(app)`` against
  ``OpenTelemetryMiddleware(ContextMiddleware(app))`` (an app that does nothing);
- five log records inside a span: no injection, ``LoggingInstrumentor``, ``ContextFilter``;
- one pool task: a plain ``ThreadPoolExecutor.submit``, with ``ThreadingInstrumentor``, with
  ``instrument_threading()``.

Runs on threadctx's runtime context (``OTEL_PYTHON_CONTEXT=threadctx``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from typing import Any

from opentelemetry.instrumentation.logging import LoggingInstrumentor
from opentelemetry.instrumentation.threading import ThreadingInstrumentor
from opentelemetry.instrumentation.wsgi import OpenTelemetryMiddleware
from opentelemetry.sdk.trace import TracerProvider

import threadctx
from benchmarks.harness import Result, compare
from threadctx.wsgi import ContextMiddleware

PROVIDER = TracerProvider()
TRACER = PROVIDER.get_tracer("bench")
ENVIRON = {
    "REQUEST_METHOD": "GET",
    "PATH_INFO": "/orders/1",
    "SERVER_NAME": "127.0.0.1",
    "SERVER_PORT": "8080",
    "SERVER_PROTOCOL": "HTTP/1.1",
    "HTTP_HOST": "127.0.0.1:8080",
    "wsgi.url_scheme": "http",
}


def _app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    start_response("200 OK", [("Content-Length", "2")])
    return [b"ok"]


def _serve(app: Any, environ: dict[str, Any] = ENVIRON) -> Callable[[int], None]:
    """``loops`` requests through WSGI ``app``, each with a copy of ``environ``, its body read and closed."""

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
        pass

    def run(loops: int) -> None:
        for _ in range(loops):
            body = app(dict(environ), start_response)
            for _chunk in body:
                pass
            close = getattr(body, "close", None)
            if close is not None:
                close()

    return run


def wsgi_variants() -> dict[str, Callable[[int], None]]:
    return {
        "OpenTelemetryMiddleware": _serve(OpenTelemetryMiddleware(_app, tracer_provider=PROVIDER)),
        "+ ContextMiddleware": _serve(
            OpenTelemetryMiddleware(ContextMiddleware(_app), tracer_provider=PROVIDER)
        ),
    }


def wsgi_layer() -> list[Result]:
    return compare(wsgi_variants(), baseline="OpenTelemetryMiddleware", loops=2000, rounds=21)


def _logger(name: str, fields: str, filt: logging.Filter | None) -> logging.Logger:
    handler = logging.StreamHandler(open(os.devnull, "w"))  # noqa: SIM115 - lives as long as the benchmark
    handler.setFormatter(
        logging.Formatter(f"%(levelname)s [{fields}] %(message)s", defaults={"request_id": "-"})
    )
    if filt is not None:
        handler.addFilter(filt)
    logger = logging.getLogger(f"bench.path.{name}")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger


@contextmanager
def _instrumented(instrumentor: Any, **options: Any) -> Iterator[None]:
    instrumentor.instrument(**options)
    try:
        yield
    finally:
        instrumentor.uninstrument()


def records_variants() -> dict[str, Callable[[int], None]]:
    plain = _logger("plain", "request_id=%(request_id)s", None)
    injected = _logger("instrumentor", "%(otelTraceID)s %(otelSpanID)s request_id=%(request_id)s", None)
    filtered = _logger(
        "filter", "%(trace_id)s %(span_id)s request_id=%(request_id)s", threadctx.ContextFilter()
    )

    def records(logger: logging.Logger, instrument: bool = False) -> Callable[[int], None]:
        def run(loops: int) -> None:
            with (
                _instrumented(LoggingInstrumentor(), inject_trace_context=True, tracer_provider=PROVIDER)
                if instrument
                else nullcontext(),
                TRACER.start_as_current_span("request"),
                threadctx.bound(request_id="r-1"),
            ):
                for _ in range(loops):
                    for _record in range(5):
                        logger.info("handled")

        return run

    return {
        "five records, no injection": records(plain),
        "LoggingInstrumentor": records(injected, instrument=True),
        "ContextFilter": records(filtered),
    }


def logging_records() -> list[Result]:
    return compare(records_variants(), baseline="five records, no injection", loops=1000, rounds=21)


def pool_variants() -> dict[str, Callable[[int], None]]:
    pool = ThreadPoolExecutor(max_workers=1)

    def submit(kind: str) -> Callable[[int], None]:
        def run(loops: int) -> None:
            if kind == "ThreadingInstrumentor":
                ThreadingInstrumentor().instrument()
            elif kind == "instrument_threading()":
                threadctx.instrument_threading()
            try:
                with TRACER.start_as_current_span("request"), threadctx.bound(request_id="r-1"):
                    for _ in range(loops):
                        pool.submit(int).result()
            finally:
                if kind == "ThreadingInstrumentor":
                    ThreadingInstrumentor().uninstrument()
                elif kind == "instrument_threading()":
                    threadctx.uninstrument_threading()

        return run

    return {
        kind: submit(kind) for kind in ("plain submit", "ThreadingInstrumentor", "instrument_threading()")
    }


def pool_task() -> list[Result]:
    return compare(pool_variants(), baseline="plain submit", loops=1000, rounds=21)


def _added(results: list[Result], name: str) -> float:
    by = {r.name: r.per_call_ns for r in results}
    return by[name] - results[0].per_call_ns


def run_all() -> list[tuple[str, list[Result], str]]:
    wsgi, logs, pool = wsgi_layer(), logging_records(), pool_task()
    threadctx_total = (
        _added(wsgi, "+ ContextMiddleware")
        + _added(logs, "ContextFilter")
        + _added(pool, "instrument_threading()")
    )
    otel_total = _added(logs, "LoggingInstrumentor") + _added(pool, "ThreadingInstrumentor")
    summary = (
        f"Summed per request: threadctx's pieces add {threadctx_total / 1000:,.1f} µs, OpenTelemetry's "
        f"(LoggingInstrumentor + ThreadingInstrumentor) {otel_total / 1000:,.1f} µs."
    )
    return [
        ("the WSGI layer, per request", wsgi, ""),
        ("five log records in a span, per request", logs, ""),
        ("one pool task, per request (submit and wait)", pool, summary),
    ]
