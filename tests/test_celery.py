"""threadctx.celery with a real Redis and a real Celery worker (threads and prefork pools)."""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import warnings
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
from _helpers import Records

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
            # The module's tests and fixtures closed every connection they opened: none is left to
            # the garbage collector (whose ResourceWarning, raised in a finalizer, would fail
            # whichever later test it lands in), and none is still open.
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ResourceWarning)
                gc.collect()
            assert [str(warning.message) for warning in caught] == []
            assert connections_to(port) == 0
        finally:
            server.terminate()
            server.wait(JOIN)


def connections_to(port: int) -> int | None:
    """How many of this process's sockets are connected to 127.0.0.1:``port``; None without Linux's /proc."""
    if not os.path.exists("/proc/self/net/tcp"):
        return None
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # closed meanwhile
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    remote = f"0100007F:{port:04X}"  # 127.0.0.1, as /proc/net/tcp writes it
    with open("/proc/self/net/tcp") as table:
        rows = [line.split() for line in table.readlines()[1:]]
    return sum(row[2] == remote and row[9] in inodes for row in rows)


@pytest.fixture(scope="module")
def example(redis_url: str) -> Iterator[ModuleType]:
    """examples/celery_app.py, imported as the publishing side, pointed at the test's Redis."""
    allowlist = threadctx.propagation_allowlist()
    sys.path.insert(0, str(EXAMPLES))
    try:
        import celery_app
    finally:
        sys.path.remove(str(EXAMPLES))
        threadctx.set_propagation_allowlist(allowlist)  # the import added "tenant"; each test adds it itself
    app = celery_app.app
    # One result backend for every publishing thread (not one per thread), so there is one to close.
    app.conf.update(broker_url=redis_url, result_backend=redis_url, result_backend_thread_safe=True)
    celery_app.BROKER = redis_url
    yield celery_app
    threadctx.celery.uninstrument(app)
    # Every connection the publishing side opened: the broker's (producers and pool), the result
    # backend's (its pub/sub consumer and its client's pool).
    app.amqp.producer_pool.force_close_all()
    app.pool.force_close_all()
    app.backend.result_consumer.stop()
    app.backend.client.connection_pool.disconnect()


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
    threadctx.allow_propagation("tenant")
    worker = Worker(redis_url, "threads", concurrency=4)
    published, results, lines = run_batch(example, redis_url, tracer_provider, worker, size=4)
    check(published, results, lines)
    assert len({result["thread"] for result in results.values()}) == 4, "four threads ran the four tasks"
    assert len({result["pid"] for result in results.values()}) == 1


def test_prefork_pool_children_log_with_their_publishers_context(
    example: ModuleType, redis_url: str, tracer_provider: TracerProvider
) -> None:
    threadctx.allow_propagation("tenant")
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
    threadctx.allow_propagation("tenant")
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


def patched_functions() -> tuple[Any, ...]:
    """Task.__call__ and every build_tracer that Celery calls."""
    import celery.app.trace
    import celery.worker.consumer.consumer
    from celery.app.task import Task

    return Task.__call__, celery.app.trace.build_tracer, celery.worker.consumer.consumer.build_tracer


def test_instrument_is_idempotent_and_uninstrument_restores(example: ModuleType) -> None:
    from celery import Celery

    other = Celery("other")
    patched = patched_functions()
    assert patched[1] is patched[2], "one hook in both places"
    threadctx.celery.instrument(other)
    threadctx.celery.instrument(other)
    assert patched_functions() == patched
    assert threadctx.celery.is_instrumented(other)
    threadctx.celery.uninstrument(other)
    assert not threadctx.celery.is_instrumented(other)
    assert threadctx.celery.is_instrumented(example.app), "another app's uninstrument leaves this one"
    assert patched_functions() == patched
    threadctx.celery.uninstrument(example.app)
    try:
        call, build_tracer, consumers_build_tracer = patched_functions()
        assert call.__module__ == "celery.app.task", "the last uninstrument puts Celery's own back"
        assert build_tracer.__module__ == "celery.app.trace"
        assert consumers_build_tracer is build_tracer
    finally:
        threadctx.celery.instrument(example.app)
    assert patched_functions() == patched


def test_an_eager_task_runs_whole_in_its_callers_context_with_its_own_ids(example: ModuleType) -> None:
    """Task.apply: the signal handlers and on_success see the task's id and name too, as the body does."""
    log = logging.getLogger("orders")
    handler, level = Records(), log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        with threadctx.bound(request_id="r-eager"):
            result = example.step.apply(task_id="eager-1")
            after = dict(threadctx.correlation())
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    assert result.get() == "eager-1"
    assert after == {"request_id": "r-eager"}, "the caller's context is as it was"
    ids = json.dumps(
        {"request_id": "r-eager", "task_id": "eager-1", "task_name": "celery_app.step"}, sort_keys=True
    )
    whats = ("task_prerun", "body", "on_success", "task_success", "task_postrun")
    assert handler.messages() == [f"{what} of celery_app.step[eager-1] ids={ids}" for what in whats]


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


NO_TRACE = "0" * 32
PREFIX = re.compile(
    r"pid=\d+ trace_id=(?P<trace>\w+) request_id=(?P<rid>\S+) tenant=(?P<tenant>\S+) "
    r"task_id=(?P<task>\S+) task_name=(?P<name>\S+) (?P<message>.*)$"
)
SAID = re.compile(r"(?P<what>\w+) of (?P<name>\S+)\[(?P<id>[^\]]+)\] ids=(?P<ids>\{.*\})$")
CELERY_SAID = re.compile(r"Task (?P<name>\S+)\[(?P<id>[^\]]+)\] (?P<what>succeeded|raised)")
SUCCEEDED = ("task_prerun", "body", "on_success", "task_success", "task_postrun", "succeeded")
FAILED = ("task_prerun", "body", "on_failure", "task_failure", "task_postrun", "raised")


def run_workflow(
    example: ModuleType, redis_url: str, tracer_provider: TracerProvider, pool: str, otel: bool
) -> tuple[str, dict[str, str], list[str]]:
    """Run a workflow under one request, then a probe task outside any; return trace id, task ids, lines.

    The workflow: a chain of three steps, a step with a ``link=`` callback, a failing step with a
    ``link_error=`` errback. The worker has one thread (or child) that runs every task, so the probe
    runs after all the others finished there.
    """
    from celery import chain

    step, undo = example.step, example.undo
    run = secrets.token_hex(4)
    names = ("chain-1", "chain-2", "chain-3", "parent", "link", "failing", "errback", "probe")
    task_ids = {name: f"{run}-{name}" for name in names}
    worker = Worker(redis_url, pool, concurrency=1, otel=otel)
    try:
        with (
            tracer_provider.get_tracer("publisher").start_as_current_span("checkout") as span,
            threadctx.bound(request_id="r-1", tenant="acme", secret="never-sent"),
        ):
            trace_id = format(span.get_span_context().trace_id, "032x")
            chained = chain(*[step.si().set(task_id=task_ids[f"chain-{n}"]) for n in (1, 2, 3)]).apply_async()
            link = step.si().set(task_id=task_ids["link"])
            linked = step.apply_async(task_id=task_ids["parent"], link=link)
            errback = undo.s().set(task_id=task_ids["errback"])
            failing = step.apply_async((True,), task_id=task_ids["failing"], link_error=errback)
        assert chained.get(timeout=JOIN) == task_ids["chain-3"]
        assert linked.get(timeout=JOIN) == task_ids["parent"]
        assert example.app.AsyncResult(task_ids["link"]).get(timeout=JOIN) == task_ids["link"]
        with pytest.raises(ValueError, match="failed as asked"):
            failing.get(timeout=JOIN)
        example.app.AsyncResult(task_ids["errback"]).get(timeout=JOIN)
        assert step.apply_async(task_id=task_ids["probe"]).get(timeout=JOIN) == task_ids["probe"]
    finally:
        lines = worker.stop()
    return trace_id, task_ids, lines


@pytest.mark.parametrize(
    ("pool", "otel"),
    [("threads", False), ("prefork", False), ("threads", True)],
    ids=["threads", "prefork", "threads-beside-opentelemetry"],
)
def test_chains_callbacks_errbacks_signal_handlers_and_on_success_keep_the_publishers_context(
    example: ModuleType, redis_url: str, tracer_provider: TracerProvider, pool: str, otel: bool
) -> None:
    """What Celery runs after a task's body returned logs with the publisher's trace and ids.

    Every line about a task (its signal handlers, on_success/on_failure, Celery's own "succeeded"
    line) carries the trace id and allowlisted ids of the request that published the workflow, and
    the task's own id and name; the next task on that thread or child, and the worker's own lines,
    carry none of them. Also with OpenTelemetry's Celery instrumentation on the worker, which
    attaches its task span in a context of its own, without the correlation IDs.
    """
    threadctx.allow_propagation("tenant")
    if otel:
        pytest.importorskip(
            "opentelemetry.instrumentation.celery",
            reason="opentelemetry-instrumentation-celery is not installed",
        )
    trace_id, task_ids, lines = run_workflow(example, redis_url, tracer_provider, pool, otel)
    output = "\n".join(lines)
    assert "never-sent" not in output, "a correlation ID that is not on the allowlist never travels"
    by_id = {task_id: name for name, task_id in task_ids.items()}
    expected = [
        (what, task_id)
        for name, task_id in task_ids.items()
        for what in (FAILED if name == "failing" else SUCCEEDED)
    ]
    seen: list[tuple[str, str]] = []
    wrong: list[str] = []
    for line in lines:
        prefix = PREFIX.search(line)
        if prefix is None:
            continue  # a traceback's lines
        fields = (prefix["trace"], prefix["rid"], prefix["tenant"], prefix["task"], prefix["name"])
        said = SAID.fullmatch(prefix["message"]) or CELERY_SAID.match(prefix["message"])
        if said is None or said["id"] not in by_id:
            # The worker's own lines, "Task ... received" among them (logged before the task runs).
            if fields != (NO_TRACE, "-", "-", "-", "-"):
                wrong.append(line)
            continue
        seen.append((said["what"], said["id"]))
        task = {"task_id": said["id"], "task_name": said["name"]}
        if by_id[said["id"]] == "probe":  # published outside any request: nothing from before leaks in
            # (OpenTelemetry's instrumentation gives it a trace of its own from the body on.)
            trace_ok = prefix["trace"] == NO_TRACE or (otel and prefix["trace"] != trace_id)
            want_ids = task
        else:
            trace_ok = prefix["trace"] == trace_id
            want_ids = {"request_id": "r-1", "tenant": "acme", **task}
        ids = json.loads(said["ids"]) if "ids" in said.groupdict() else want_ids
        bound = {
            name: value
            for name, value in zip(("request_id", "tenant", *task), fields[1:], strict=True)
            if value != "-"
        }
        if not trace_ok or bound != want_ids or ids != want_ids:
            wrong.append(line)
    assert sorted(seen) == sorted(expected), output
    assert wrong == [], "\n".join(wrong)
