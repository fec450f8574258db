"""An operator's view of a pool with a stuck task: every thread, its request and its stack.

Run it and follow the instructions, or let it signal itself::

    OTEL_PYTHON_CONTEXT=threadctx python examples/stuck_pool.py          # kill -USR1 <pid>, then Enter
    OTEL_PYTHON_CONTEXT=threadctx python examples/stuck_pool.py --self-signal

``threadctx.install_dump_signal()`` writes the report to standard error when
SIGUSR1 arrives: the stuck worker shows its request id, its span and the line
it is waiting on.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

os.environ.setdefault("OTEL_PYTHON_CONTEXT", "threadctx")  # before OpenTelemetry is imported

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

import threadctx

trace.set_tracer_provider(TracerProvider())
tracer = trace.get_tracer("examples.stuck_pool")
release = threading.Event()
stuck = threading.Event()
all_started = threading.Barrier(4)


def charge_card(order: str) -> None:
    """The stuck call: waits for a payment gateway that never answers (until released)."""
    stuck.set()
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
        "--self-signal", action="store_true", help="send SIGUSR1 to itself instead of waiting"
    )
    args = parser.parse_args(argv)
    if not hasattr(signal, "SIGUSR1"):
        print("SIGUSR1 does not exist on this platform", file=sys.stderr)
        return 2

    threadctx.install_dump_signal(signal.SIGUSR1)
    with threadctx.ContextThreadPoolExecutor(max_workers=3, thread_name_prefix="worker") as pool:
        futures = [pool.submit(handle, f"o{i}", stuck=i == 1) for i in range(3)]
        all_started.wait()  # every worker is inside its request now
        futures[0].result()  # o0 and o2 finish; o1 stays stuck in charge_card
        futures[2].result()
        stuck.wait()
        if args.self_signal:
            os.kill(os.getpid(), signal.SIGUSR1)
        else:
            print(
                f"pid {os.getpid()}: order o1 is stuck. Run `kill -USR1 {os.getpid()}`, then press Enter.",
                flush=True,
            )
            sys.stdin.readline()
        release.set()
        print("done:", ", ".join(future.result() for future in futures), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
