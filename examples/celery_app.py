"""Celery tasks that log with the trace id and request id of the request that published them.

Start Redis and a worker (the threads pool runs several tasks at once), then publish::

    redis-server --port 6379 &
    cd examples && OTEL_PYTHON_CONTEXT=threadctx celery -A celery_app worker --pool threads -c 4
    OTEL_PYTHON_CONTEXT=threadctx python examples/celery_app.py

Each publishing thread serves its own request (a span, a request id, a tenant);
every line the worker writes for a task carries that request's trace id and
ids, plus the task's own id and name. ``CELERY_BROKER_URL`` picks another Redis.

``step`` and ``undo`` show the rest of a task's life, which Celery runs after the
body returned: the next steps of a chain, ``link=`` and ``link_error=``
callbacks, the ``task_*`` signal handlers and ``on_success``/``on_failure``
all log with the publisher's ids too.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from typing import Any

os.environ.setdefault("OTEL_PYTHON_CONTEXT", "threadctx")  # before OpenTelemetry is imported

import redis
from celery import Celery, Task, signals
from celery.utils.dispatch import Signal
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

import threadctx
import threadctx.celery

BROKER = os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0")
FORMAT = (
    "%(threadName)s pid=%(process)d trace_id=%(trace_id)s request_id=%(request_id)s tenant=%(tenant)s "
    "task_id=%(task_id)s task_name=%(task_name)s %(message)s"
)

app = Celery("orders", broker=BROKER, backend=BROKER)
app.conf.update(worker_hijack_root_logger=False, broker_connection_retry_on_startup=True)
threadctx.allow_propagation("tenant")  # request_id travels by default; tenant is added here
threadctx.celery.instrument(app)  # in the publishers and in the worker: this module is imported by both
log = logging.getLogger("orders")


@signals.setup_logging.connect
def configure_logging(**_: Any) -> None:
    """The worker's logging: one handler, with the filter that stamps the ids."""
    handler = logging.StreamHandler(sys.stdout)
    handler.addFilter(threadctx.ContextFilter())
    defaults = {"request_id": "-", "tenant": "-", "task_id": "-", "task_name": "-"}
    handler.setFormatter(logging.Formatter(FORMAT, defaults=defaults))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)


@signals.worker_init.connect
def configure_tracing(**_: Any) -> None:
    """The worker's tracer provider; OpenTelemetry's Celery instrumentation too, if asked for."""
    trace.set_tracer_provider(TracerProvider())
    if os.environ.get("EXAMPLE_OTEL_CELERY"):
        from opentelemetry.instrumentation.celery import CeleryInstrumentor

        CeleryInstrumentor().instrument()


@app.task(name="celery_app.process_order")  # the same name when this file runs as __main__
def process_order(order: str, batch: str | None = None, size: int = 0) -> dict[str, Any]:
    """Log, wait for the rest of the batch to be running too (if given), log again; say what it saw."""
    log.info("processing order=%s", order)
    if batch:  # proves the tasks run at the same time: each waits until the test lets all go
        client = redis.Redis.from_url(BROKER)
        client.rpush(f"{batch}:started", order)
        if client.blpop([f"{batch}:go"], timeout=60) is None:
            raise TimeoutError(f"batch {batch} never started all {size} tasks")
    span = trace.get_current_span()
    span_context = span.get_span_context()
    parent = getattr(span, "parent", None)
    log.info("done order=%s", order)
    return {
        "trace_id": format(span_context.trace_id, "032x"),
        "parent_span_id": format(parent.span_id, "016x") if parent is not None else None,
        "span_kind": str(getattr(span, "kind", "")),
        "ids": dict(threadctx.correlation()),
        "thread": threading.current_thread().name,
        "pid": os.getpid(),
    }


def say(what: str, task: Task[Any, Any]) -> None:
    """One line about ``task``, with every correlation ID the thread has bound (none missing, none extra)."""
    ids = json.dumps(dict(threadctx.correlation()), sort_keys=True)
    log.info("%s of %s[%s] ids=%s", what, task.name, task.request.id, ids)


class Audited(Task):  # type: ignore[type-arg] # celery-types makes Task generic; Celery's own is not
    """A task that logs its outcome: Celery calls these after the body returned."""

    def on_success(self, retval: Any, task_id: str, args: Any, kwargs: Any) -> None:
        say("on_success", self)

    def on_failure(self, exc: Exception, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        say("on_failure", self)


@signals.task_prerun.connect
@signals.task_postrun.connect
@signals.task_success.connect
@signals.task_failure.connect
def audit(sender: Task[Any, Any], signal: Signal, **_: Any) -> None:
    """The task signals of the audited tasks: Celery sends all but task_prerun after the body."""
    if isinstance(sender, Audited):
        say(signal.name, sender)


@app.task(name="celery_app.step", base=Audited, bind=True)
def step(self: Audited, fail: bool = False) -> str:
    """One step of a workflow: a chain, or a task with callbacks; fails if asked to."""
    say("body", self)
    if fail:
        raise ValueError("failed as asked")
    return str(self.request.id)


@app.task(name="celery_app.undo", base=Audited, bind=True)
def undo(self: Audited, failed_task_id: str) -> None:
    """An errback (``link_error=undo.s()``): Celery publishes it after the failed body returned."""
    say("body", self)


def publish(requests: int = 4) -> int:
    """Several threads, each serving its own request, publish a task and wait for its result."""
    trace.set_tracer_provider(TracerProvider())
    tracer = trace.get_tracer("examples.celery")
    wrong: list[str] = []
    done: list[str] = []

    def request(index: int) -> None:
        with (
            tracer.start_as_current_span("checkout") as span,
            threadctx.bound(request_id=f"req-{index}", tenant="acme"),
        ):
            result = process_order.delay(f"o{index}").get(timeout=60)
            if result["trace_id"] != format(span.get_span_context().trace_id, "032x"):
                wrong.append(f"o{index}")
            done.append(f"o{index}")
            print(f"o{index}: {result}", flush=True)

    threads = [threading.Thread(target=request, args=(i,), name=f"request-{i}") for i in range(requests)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print(f"tasks done: {len(done)} of {requests}; with another request's trace: {len(wrong)}")
    return 1 if wrong or len(done) != requests else 0


if __name__ == "__main__":
    sys.exit(publish())
