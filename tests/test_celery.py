"""threadctx.celery with a real Redis and a real Celery worker (threads and prefork pools)."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import threadctx
import threadctx.celery
from threadctx import _propagation

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
JOIN = 60

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None, reason="redis-server is not installed (.ci/run installs it)"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    """A Redis server of its own on a free port of 127.0.0.1, without persistence."""
    port = free_port()
    command = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as server:
        assert server.stdout is not None
        output = ""
        while "Ready to accept connections" not in output:
            line = server.stdout.readline()
            assert line, f"redis-server did not start: {output}"
            output += line
        try:
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            server.terminate()
            server.wait(JOIN)


@pytest.fixture(scope="module")
def example(redis_url: str) -> Iterator[ModuleType]:
    """examples/celery_app.py, imported as the publishing side, pointed at the test's Redis."""
    allowlist = _propagation._allowlist
    sys.path.insert(0, str(EXAMPLES))
    try:
        import celery_app
    finally:
        sys.path.remove(str(EXAMPLES))
        _propagation._allowlist = allowlist  # the import added "tenant"; each test adds it itself
    celery_app.app.conf.update(broker_url=redis_url, result_backend=redis_url)
    celery_app.BROKER = redis_url
    yield celery_app
    threadctx.celery.uninstrument(celery_app.app)


class Worker:
    """`celery -A celery_app worker` in a process of its own."""

    def __init__(self, redis_url: str, pool: str, concurrency: int, otel: bool = False) -> None:
        env = {
            **os.environ,
            "CELERY_BROKER_URL": redis_url,
            "PYTHONPATH": str(EXAMPLES),
            "OTEL_PYTHON_CONTEXT": "threadctx",
        }
        if otel:
            env["EXAMPLE_OTEL_CELERY"] = "1"
        command = [sys.executable, "-m", "celery", "-A", "celery_app", "worker", "--pool", pool]
        command += [
            "--concurrency",
            str(concurrency),
            "--loglevel",
            "INFO",
            "-n",
            f"{pool}-{secrets.token_hex(3)}@test",
        ]
        command += ["--without-heartbeat", "--without-mingle", "--without-gossip"]
        self.process = subprocess.Popen(
            command, cwd=EXAMPLES, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )

    def stop(self) -> list[str]:
        self.process.terminate()  # warm shutdown
        out, _ = self.process.communicate(timeout=JOIN)
        return out.splitlines()


def run_batch(
    example: ModuleType, redis_url: str, tracer_provider: TracerProvider, worker: Worker, size: int
) -> tuple[dict[str, tuple[str, str, Any]], dict[str, dict[str, Any]], list[str]]:
    """Publish `size` tasks from as many threads, each in its own request; all run at once."""
    import redis

    client = redis.Redis.from_url(redis_url)
    batch = f"batch-{secrets.token_hex(4)}"
    tracer = tracer_provider.get_tracer("publisher")
    published: dict[str, tuple[str, str, Any]] = {}
    barrier = threading.Barrier(size)

    def publisher(index: int) -> None:
        barrier.wait(JOIN)
        with (
            tracer.start_as_current_span("checkout") as span,
            threadctx.bound(request_id=f"req-{index}", tenant="acme", secret="never-sent"),
        ):
            async_result = example.process_order.delay(f"o{index}", batch, size)
            span_context = span.get_span_context()
            published[f"o{index}"] = (format(span_context.trace_id, "032x"), f"req-{index}", async_result)

    threads = [threading.Thread(target=publisher, args=(index,)) for index in range(size)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(JOIN)
        # Every task is running (and waiting) at the same time before any may finish.
        started = [client.blpop([f"{batch}:started"], timeout=JOIN) for _ in range(size)]
        assert None not in started, "the worker did not run every task of the batch at once"
        client.rpush(f"{batch}:go", *["go"] * size)
        results = {order: async_result.get(timeout=JOIN) for order, (_, _, async_result) in published.items()}
    finally:
        lines = worker.stop()
        client.close()
    return published, results, lines


def check(
    published: dict[str, tuple[str, str, Any]], results: dict[str, dict[str, Any]], lines: list[str]
) -> None:
    """Every task saw its publisher's trace and ids and its own task id; so does every line it logged."""
    line_pattern = re.compile(
        r"trace_id=(?P<trace>\w+) request_id=(?P<rid>\S+) tenant=(?P<tenant>\S+) "
        r"task_id=(?P<task>\S+) task_name=(?P<name>\S+) (processing|done) order=(?P<order>o\d+)$"
    )
    for order, (trace_id, request_id, async_result) in published.items():
        result = results[order]
        assert result["trace_id"] == trace_id, order
        assert result["ids"] == {
            "request_id": request_id,
            "tenant": "acme",
            "task_id": async_result.id,
            "task_name": "celery_app.process_order",
        }, "allowlisted ids travel, 'secret' does not; the task's own id and name are bound"
    task_lines = [line for line in lines if " order=o" in line]
    assert len(task_lines) == 2 * len(published), "\n".join(lines)
    for line in task_lines:
        match = line_pattern.search(line)
        assert match, line
        trace_id, request_id, async_result = published[match["order"]]
        assert (match["trace"], match["rid"], match["tenant"], match["task"], match["name"]) == (
            trace_id,
            request_id,
            "acme",
            async_result.id,
            "celery_app.process_order",
        ), line


def test_threads_pool_each_task_thread_logs_with_its_publishers_context(
    example: ModuleType, redis_url: str, tracer_provider: TracerProvider
) -> None:
    threadctx.propagate("tenant")
    worker = Worker(redis_url, "threads", concurrency=4)
    published, results, lines = run_batch(example, redis_url, tracer_provider, worker, size=4)
    check(published, results, lines)
    assert len({result["thread"] for result in results.values()}) == 4, "four threads ran the four tasks"
    assert len({result["pid"] for result in results.values()}) == 1


def test_prefork_pool_children_log_with_their_publishers_context(
    example: ModuleType, redis_url: str, tracer_provider: TracerProvider
) -> None:
    threadctx.propagate("tenant")
    worker = Worker(redis_url, "prefork", concurrency=2)
    published, results, lines = run_batch(example, redis_url, tracer_provider, worker, size=2)
    check(published, results, lines)
    assert len({result["pid"] for result in results.values()}) == 2, "two child processes ran the two tasks"


def test_beside_opentelemetrys_celery_instrumentation(
    example: ModuleType, redis_url: str, tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    """The worker's task span is a child of the publish span; the ids are bound under it."""
    celery_instrumentation = pytest.importorskip(
        "opentelemetry.instrumentation.celery", reason="opentelemetry-instrumentation-celery is not installed"
    )
    threadctx.propagate("tenant")
    instrumentor = celery_instrumentation.CeleryInstrumentor()
    instrumentor.instrument(tracer_provider=tracer_provider)
    try:
        worker = Worker(redis_url, "threads", concurrency=2, otel=True)
        published, results, lines = run_batch(example, redis_url, tracer_provider, worker, size=2)
    finally:
        instrumentor.uninstrument()
    check(published, results, lines)
    producers = {
        format(span.context.trace_id, "032x"): format(span.context.span_id, "016x")
        for span in exporter.get_finished_spans()
        if span.kind == trace.SpanKind.PRODUCER
    }
    for order, (trace_id, _, _) in published.items():
        assert results[order]["span_kind"] == "SpanKind.CONSUMER"
        assert results[order]["parent_span_id"] == producers[trace_id], order


def test_instrument_is_idempotent_and_uninstrument_restores(example: ModuleType) -> None:
    from celery import Celery
    from celery.app.task import Task

    other = Celery("other")
    patched = Task.__call__
    threadctx.celery.instrument(other)
    threadctx.celery.instrument(other)
    assert Task.__call__ is patched
    assert threadctx.celery.is_instrumented(other)
    threadctx.celery.uninstrument(other)
    assert not threadctx.celery.is_instrumented(other)
    assert threadctx.celery.is_instrumented(example.app), "another app's uninstrument leaves this one"
    assert Task.__call__ is patched


def test_a_direct_call_is_a_plain_function_call(example: ModuleType) -> None:
    """Calling the task function in-process binds nothing and needs no worker."""
    with threadctx.bound(request_id="r-direct"):
        result = example.process_order("o-direct")
    assert result["ids"] == {"request_id": "r-direct"}


def test_the_example_publisher_against_a_threads_worker(redis_url: str) -> None:
    """`python examples/celery_app.py`, as the how-to runs it, with a worker of four threads."""
    worker = Worker(redis_url, "threads", concurrency=4)
    try:
        env = {**os.environ, "CELERY_BROKER_URL": redis_url, "OTEL_PYTHON_CONTEXT": "threadctx"}
        result = subprocess.run(
            [sys.executable, str(EXAMPLES / "celery_app.py")],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    finally:
        lines = worker.stop()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "tasks done: 4 of 4; with another request's trace: 0" in result.stdout
    for index in range(4):
        (processing,) = [line for line in lines if line.endswith(f"processing order=o{index}")]
        assert f"request_id=req-{index} tenant=acme task_id=" in processing
