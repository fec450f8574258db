"""threadctx.dask with a real LocalCluster of worker processes on 127.0.0.1, and concurrent submitters.

A worker plugin sets each worker up as a service would (a logging handler with ContextFilter, an
SDK tracer provider); the workers' lines and spans are collected back with ``client.run``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

import pytest

distributed = pytest.importorskip("distributed", reason="threadctx.dask needs distributed (the test group)")

from opentelemetry import trace  # noqa: E402 - after the skip
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402

import threadctx  # noqa: E402
import threadctx.dask  # noqa: E402
from _servers import LINE  # noqa: E402

SUBMITTERS = 4
JOIN = 120


class ServiceSetup(distributed.WorkerPlugin):  # type: ignore[misc]
    """What a service does on each worker: its log handler with ContextFilter, and its tracer."""

    def setup(self, worker: Any) -> None:
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        handler = logging.Handler()
        handler.addFilter(threadctx.ContextFilter())
        handler.setFormatter(
            logging.Formatter(
                "trace=%(trace_id)s span=%(span_id)s request_id=%(request_id)s %(message)s",
                defaults={"request_id": "-"},
            )
        )
        lines: list[str] = []
        handler.emit = lambda record: lines.append(handler.format(record))  # type: ignore[method-assign]
        log = logging.getLogger("daskapp")
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
        worker.threadctx_test = (lines, exporter)


def collected(dask_worker: Any) -> tuple[list[str], list[tuple[str, int, int | None]]]:
    """The worker's lines and finished spans (name, trace id, parent span id) so far; then forgets them."""
    lines, exporter = dask_worker.threadctx_test
    spans = [
        (span.name, span.context.trace_id, span.parent.span_id if span.parent else None)
        for span in exporter.get_finished_spans()
    ]
    taken = list(lines)
    lines.clear()
    exporter.clear()
    return taken, spans


def work(key: str) -> str:
    """A task: one line logged, in a span of its own."""
    with trace.get_tracer("worker").start_as_current_span(f"task {key}"):
        logging.getLogger("daskapp").info("task %s", key)
    return key


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    with (
        distributed.LocalCluster(
            n_workers=2,
            threads_per_worker=2,
            processes=True,
            host="127.0.0.1",
            # The scheduler serves HTTP whatever this says; None means port 8787, which another test
            # run on the machine may hold (Dask then warns, an error here): a free port of loopback.
            dashboard_address="127.0.0.1:0",
            worker_dashboard_address=None,
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        client.register_plugin(ServiceSetup())
        yield client


def worker_output(client: Any) -> tuple[list[str], list[tuple[str, int, int | None]]]:
    lines: list[str] = []
    spans: list[tuple[str, int, int | None]] = []
    for worker_lines, worker_spans in client.run(collected).values():
        lines += worker_lines
        spans += worker_spans
    return lines, spans


@pytest.fixture
def instrumented(client: Any) -> Iterator[Any]:
    worker_output(client)  # what earlier tests left
    threadctx.dask.instrument(client)
    yield client
    threadctx.dask.uninstrument(client)


def test_concurrent_submitters_tasks_carry_their_own_ids_on_the_workers(
    instrumented: Any, tracer_provider: TracerProvider
) -> None:
    """4 threads, each in its own span with its own request id, submit() and map() to 2 worker processes."""
    client = instrumented
    tracer = tracer_provider.get_tracer("submitter")
    sent: dict[str, tuple[int, int, str]] = {}  # submitter -> (trace id, span id, request id)
    results: dict[str, list[str]] = {}
    failures: list[BaseException] = []
    barrier = threading.Barrier(SUBMITTERS)

    def submitter(n: int) -> None:
        name = f"s{n}"
        try:
            with tracer.start_as_current_span(name) as span, threadctx.bound(request_id=f"rid-{name}"):
                ids = span.get_span_context()
                sent[name] = (ids.trace_id, ids.span_id, f"rid-{name}")
                barrier.wait()
                futures = [client.submit(work, f"{name}-submit-{i}") for i in range(3)]
                futures += client.map(work, [f"{name}-map-{i}" for i in range(5)])
                results[name] = client.gather(futures)
        except BaseException as error:
            failures.append(error)

    threads = [threading.Thread(target=submitter, args=(n,)) for n in range(SUBMITTERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(JOIN)
    assert not failures, failures
    assert sum(len(keys) for keys in results.values()) == SUBMITTERS * 8

    lines, spans = worker_output(client)
    assert len(lines) == SUBMITTERS * 8
    misattributed = []
    for line in lines:
        match = LINE.match(line)
        assert match, line
        trace_id, _, request_id = sent[match["message"].split()[1].split("-")[0]]
        if (match["trace"], match["rid"]) != (f"{trace_id:032x}", request_id):
            misattributed.append(line)
    assert misattributed == []
    # Each task's span is a child of its submitter's span, in its trace.
    assert len(spans) == SUBMITTERS * 8
    for name, trace_id, parent in spans:
        submitter_trace, submitter_span, _ = sent[name.split()[1].split("-")[0]]
        assert (trace_id, parent) == (submitter_trace, submitter_span)


def test_keys_keep_the_functions_name_and_pure_tasks_are_shared_within_one_context(instrumented: Any) -> None:
    client = instrumented
    with threadctx.bound(request_id="a"):
        first, again = client.submit(work, "same"), client.submit(work, "same")
        mapped = client.map(work, ["m"])
    with threadctx.bound(request_id="b"):
        other = client.submit(work, "same")
    assert first.key.startswith("work-")
    assert mapped[0].key.startswith("work-")
    assert first.key == again.key  # the same call in the same context: one task, as Dask does
    assert other.key != first.key  # another caller's: its own task, its own lines
    client.gather([first, other, *mapped])
    lines, _ = worker_output(client)
    assert sorted(LINE.match(line)["rid"] for line in lines) == ["a", "a", "b"]  # type: ignore[index]


def test_uninstrument_restores_plain_submission(client: Any) -> None:
    worker_output(client)
    assert not threadctx.dask.is_instrumented(client)
    assert threadctx.dask.instrument(client) is client
    threadctx.dask.instrument(client)  # twice: still one layer
    assert threadctx.dask.is_instrumented(client)
    assert threadctx.dask.uninstrument(client) is client
    assert not threadctx.dask.is_instrumented(client)
    assert "submit" not in vars(client)
    assert "map" not in vars(client)
    with threadctx.bound(request_id="plain"):
        client.gather([client.submit(work, "plain"), *client.map(work, ["plain-map"])])
    lines, _ = worker_output(client)
    assert len(lines) == 2
    assert all(LINE.match(line)["rid"] == "-" for line in lines)  # type: ignore[index]


def test_the_module_names_its_extra_when_distributed_is_missing() -> None:
    import subprocess
    import sys

    code = "import sys; sys.modules['distributed'] = None; import threadctx.dask"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode != 0
    assert "pip install 'threadctx[dask]'" in result.stderr


def test_collections_are_not_instrumented_but_a_wrapped_function_carries_the_context(
    instrumented: Any,
) -> None:
    """A delayed call computed on the client runs plain unless its function is wrapped (the how-to)."""
    dask = pytest.importorskip("dask")
    client = instrumented
    with threadctx.bound(request_id="graph"):
        plain = client.compute(dask.delayed(work)("plain-delayed"))
        wrapped = client.compute(dask.delayed(threadctx.wrap_process(work))("wrapped-delayed"))
        client.gather([plain, wrapped])
    lines, _ = worker_output(client)
    by_message = {match["message"]: match["rid"] for match in map(LINE.match, lines) if match}
    assert by_message == {"task plain-delayed": "-", "task wrapped-delayed": "graph"}


def test_async_functions_and_actors_are_submitted_unchanged(instrumented: Any) -> None:
    async def coroutine_task() -> str:
        return "ran on the event loop"

    client = instrumented
    with threadctx.bound(request_id="r"):
        assert client.submit(coroutine_task).result() == "ran on the event loop"
        counter = client.submit(Counter, actor=True).result()
        assert counter.add(2).result() == 2


class Counter:
    """An actor: its instance lives on a worker."""

    def __init__(self) -> None:
        self.total = 0

    def add(self, n: int) -> int:
        self.total += n
        return self.total
