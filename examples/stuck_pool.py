"""A pool with a stuck task, as an operator sees it: the watchdog's warning, the metrics, the report.

Run it::

    python examples/stuck_pool.py            # runs through and prints what an operator sees
    python examples/stuck_pool.py --wait     # then waits: run `python -m threadctx dump PID`, press Enter

Three workers serve orders o0, o1 and o2; o1 hangs in ``charge_card`` (a
payment gateway that does not answer).  The watchdog logs a WARNING in o1's
trace, the metrics show one busy thread and the age of its span, and
``python -m threadctx dump PID`` (or ``kill -USR1 PID``) prints every thread's
report.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading

os.environ.setdefault("OTEL_PYTHON_CONTEXT", "threadctx")  # before OpenTelemetry is imported

from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider

import threadctx

THRESHOLD = 0.5  # seconds; a service would use its request timeout (the default is 30)

trace.set_tracer_provider(TracerProvider())
tracer = trace.get_tracer("examples.stuck_pool")
release = threading.Event()
all_started = threading.Barrier(4)


class Warned(logging.Handler):
    """Prints the watchdog's warnings with the stuck request's ids, and tells main() one came."""

    def __init__(self) -> None:
        super().__init__()
        ids = "trace_id=%(trace_id)s request_id=%(request_id)s"
        self.setFormatter(logging.Formatter(f"%(levelname)s %(name)s {ids} %(message)s"))
        self.came = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        print(self.format(record), flush=True)
        self.came.set()


def charge_card(order: str) -> None:
    """The stuck call: waits for a payment gateway that never answers (until released)."""
    release.wait()


def handle(order: str, stuck: bool) -> str:
    with (
        tracer.start_as_current_span(f"order {order}"),
        threadctx.bound(request_id=f"req-{order}", tenant="acme"),
    ):
        all_started.wait()
        if stuck:
            charge_card(order)
        return order


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--wait", action="store_true", help="wait for Enter while o1 is stuck, to run the dump command"
    )
    args = parser.parse_args(argv)

    warned = Warned()
    logging.getLogger("threadctx.watchdog").addHandler(warned)
    reader = InMemoryMetricReader()
    threadctx.instrument_metrics(MeterProvider(metric_readers=[reader]))
    threadctx.install_dump_signal()  # for `python -m threadctx dump PID` and `kill -USR1 PID`

    with (
        threadctx.start_watchdog(threshold=THRESHOLD, interval=THRESHOLD / 10),
        threadctx.ContextThreadPoolExecutor(max_workers=3, thread_name_prefix="worker") as pool,
    ):
        futures = [pool.submit(handle, f"o{i}", stuck=i == 1) for i in range(3)]
        all_started.wait()  # every worker is inside its request now
        futures[0].result()  # o0 and o2 finish; o1 stays stuck in charge_card
        futures[2].result()
        warned.came.wait()  # the watchdog has seen o1 stuck for THRESHOLD seconds

        data = reader.get_metrics_data()
        assert data is not None
        for metric in data.resource_metrics[0].scope_metrics[0].metrics:
            value = metric.data.data_points[0].value
            print(
                f"metric {metric.name} = {value:.1f} {metric.unit}"
                if isinstance(value, float)
                else f"metric {metric.name} = {value} {metric.unit}"
            )
        if args.wait:
            pid = os.getpid()
            print(f"pid {pid}: order o1 is stuck. Run `python -m threadctx dump {pid}`, then press Enter.")
            sys.stdout.flush()
            sys.stdin.readline()
        release.set()
        print("done:", ", ".join(future.result() for future in futures), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
