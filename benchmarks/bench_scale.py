"""How snapshot() and dump() grow with the number of live threads, and what they cost request threads.

Each of N threads is parked inside a span with a request id bound, as a
stuck pool would be. Both readers are measured in the same process: the
compiled reader (``threadctx._ctxread``) and the pure-Python mirror, switched
between the runs (new threads for each, so that the mirror is filled).
"""

from __future__ import annotations

import gc
import statistics
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from opentelemetry.sdk.trace import TracerProvider
from tests._helpers import use_reader

import threadctx
from threadctx import _current, _runtime

TRACER = TracerProvider().get_tracer("bench")
SIZES = (10, 100, 1000)
READERS = ("compiled reader", "mirror (pure Python)")


@contextmanager
def parked_threads(count: int) -> Iterator[list[threading.Thread]]:
    """``count`` threads, each parked inside a span with a request id bound."""
    ready = threading.Semaphore(0)
    release = threading.Event()

    def park(index: int) -> None:
        with TRACER.start_as_current_span(f"request {index}"), threadctx.bound(request_id=f"r-{index}"):
            ready.release()
            release.wait()

    threads = [threading.Thread(target=park, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    for _ in threads:
        ready.acquire()
    try:
        yield threads
    finally:
        release.set()
        for thread in threads:
            thread.join()


@contextmanager
def reader(name: str) -> Iterator[None]:
    use_reader(name == READERS[0])
    try:
        yield
    finally:
        use_reader(True)


def _median_seconds(func: Callable[[], object], repeat: int) -> float:
    """Median CPU time of a call: the parked threads use none, and the machine's other load moves it less."""
    times = []
    for _ in range(repeat):
        start = time.process_time()
        func()
        times.append(time.process_time() - start)
    return statistics.median(times)


def _peak_bytes(func: Callable[[], object]) -> int:
    """Memory a call allocates at its peak (tracemalloc), over what was allocated before it."""
    gc.collect()
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        func()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak - before


def available_readers() -> list[str]:
    return list(READERS) if _current.LOADED_READER is not None else [READERS[1]]


def growth() -> str:
    """snapshot()/dump() time and peak memory at 10, 100 and 1,000 threads, per thread too."""
    rows = []
    for size in SIZES:
        for name in available_readers():
            with reader(name), parked_threads(size):
                entries = len(threadctx.snapshot())
                assert entries >= size, f"{name}: {entries} entries for {size} threads"
                repeat = max(5, 2000 // size)
                snap = _median_seconds(threadctx.snapshot, repeat)
                dump = _median_seconds(lambda: threadctx.dump(source=False), max(3, repeat // 4))
                snap_mem = _peak_bytes(threadctx.snapshot)
                dump_mem = _peak_bytes(lambda: threadctx.dump(source=False))
                rows.append(
                    f"| {size:,} | {name} | {snap * 1e3:,.2f} ms | {snap / size * 1e6:,.1f} µs "
                    f"| {snap_mem / 1024:,.0f} KiB | {snap_mem / size:,.0f} B "
                    f"| {dump * 1e3:,.1f} ms | {dump / size * 1e6:,.0f} µs | {dump_mem / 1024:,.0f} KiB |"
                )
    return "\n".join(
        [
            "### snapshot() and dump(source=False) with N threads parked in a request",
            "",
            "| threads | reader | snapshot() | per thread | snapshot() peak memory | per thread "
            "| dump() | per thread | dump() peak memory |",
            "|---|---|---|---|---|---|---|---|---|",
            *rows,
            "",
            "Times are CPU time (medians). Linear growth shows as a constant per-thread column. Peak memory",
            "is what one call allocates (tracemalloc), all of it freed when the result is dropped. `dump()`",
            "is dominated by walking and formatting each thread's stack (8 frames).",
            "",
        ]
    )


def entry_memory(count: int = 500) -> str:
    """Bytes a thread's registry entry costs: state, liveness marker, weak reference, registry slot."""
    ready = threading.Semaphore(0)
    touch, release = threading.Event(), threading.Event()

    def work() -> None:
        ready.release()
        touch.wait()
        threadctx.get_thread_storage()  # creates the state and its registry entry (and the empty dict)
        threadctx.delete_thread_storage()  # the dict goes; the entry stays for the thread's life
        ready.release()
        release.wait()

    threads = [threading.Thread(target=work, daemon=True) for _ in range(count)]
    for thread in threads:
        thread.start()
    for _ in threads:
        ready.acquire()
    gc.collect()
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        touch.set()
        for _ in threads:
            ready.acquire()
        gc.collect()
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        release.set()
        for thread in threads:
            thread.join()
    per_entry = (after - before) / count
    return (
        f"A thread's registry entry costs {per_entry:,.0f} bytes (measured over {count} threads with "
        "tracemalloc: its state, liveness marker, weak reference and registry slot). With the compiled "
        "reader a thread gets one only when it uses `get_thread_storage()`; with the mirror, on its "
        "first `attach`.\n"
    )


def _latencies(
    requests: int, threads: int, background: Callable[[threading.Event], None] | None
) -> list[float]:
    """Per-request latency (seconds) of ``threads`` request threads while ``background`` runs."""
    stop = threading.Event()
    samples: list[float] = []
    lock = threading.Lock()
    start_line = threading.Barrier(threads + 1)

    def serve() -> None:
        mine = []
        start_line.wait()
        for index in range(requests):
            began = time.perf_counter()
            with TRACER.start_as_current_span("request"), threadctx.bound(request_id=f"q-{index}"):
                sum(range(2000))  # the request's own work, about 20-50 µs
            mine.append(time.perf_counter() - began)
        with lock:
            samples.extend(mine)

    helper = None
    if background is not None:
        helper = threading.Thread(target=background, args=(stop,), daemon=True)
        helper.start()
    servers = [threading.Thread(target=serve) for _ in range(threads)]
    for server in servers:
        server.start()
    start_line.wait()
    for server in servers:
        server.join()
    stop.set()
    if helper is not None:
        helper.join()
    return samples


def latency_under_snapshot(parked: int = 1000, requests: int = 300, threads: int = 8) -> str:
    """Request latency alone, beside snapshot() in a loop, and beside plain Python in a loop."""
    sweeps: list[float] = []

    def snapshots(stop: threading.Event) -> None:
        while not stop.is_set():
            threadctx.snapshot()

    def busy(stop: threading.Event) -> None:
        while not stop.is_set():
            sum(range(10_000))

    variants: dict[str, Callable[[threading.Event], None] | None] = {
        "nothing else": None,
        "snapshot() in a loop": snapshots,
        "plain Python in a loop": busy,
    }
    results: dict[str, list[float]] = {name: [] for name in variants}
    with parked_threads(parked):
        for _round in range(3):  # interleaved rounds
            for name, background in variants.items():
                results[name] += _latencies(requests, threads, background)
        if _current.LOADED_READER is not None:
            from threadctx._current import CURRENT

            read = _current.LOADED_READER
            for _ in range(50):
                began = time.perf_counter()
                read(CURRENT)
                sweeps.append(time.perf_counter() - began)
        snapshot_time = _median_seconds(threadctx.snapshot, 20)
    rows = []
    for name, samples in results.items():
        samples.sort()
        p50 = samples[len(samples) // 2]
        p99 = samples[int(len(samples) * 0.99)]
        rows.append(f"| {name} | {p50 * 1e6:,.0f} µs | {p99 * 1e6:,.0f} µs | {samples[-1] * 1e3:,.1f} ms |")
    lines = [
        f"### Request latency while snapshot() runs over {parked:,} threads",
        "",
        f"{threads} request threads, {requests} requests each per round, 3 interleaved rounds; each request",
        "is one SDK span, one bound request id and about 2,000 additions. One snapshot() over these",
        f"threads takes {snapshot_time * 1e3:,.1f} ms of CPU. The third row is the yardstick: any thread",
        "running Python code beside the requests shares the GIL with them.",
        "",
        "| beside the requests | p50 | p99 | max |",
        "|---|---|---|---|",
        *rows,
        "",
    ]
    if sweeps:
        lines += [
            "The only stretch in which snapshot() cannot give the GIL up is the compiled reader's walk over",
            f"the thread states: {statistics.median(sweeps) * 1e6:,.0f} µs median, "
            f"{max(sweeps) * 1e6:,.0f} µs at most (50 walks over {parked + threads + 1:,} threads);",
            "the rest is ordinary Python, which hands the GIL over every switch interval (5 ms) like any",
            "other thread.",
            "",
        ]
    return "\n".join(lines)


def run_all() -> list[str]:
    from opentelemetry import context as otel_context

    if not isinstance(otel_context._RUNTIME_CONTEXT, _runtime.ThreadRuntimeContext):
        raise SystemExit("the scale benchmarks need OTEL_PYTHON_CONTEXT=threadctx (make bench sets it)")
    return [growth(), entry_memory(), latency_under_snapshot()]
