"""Runtime-context benchmarks: threadctx against OpenTelemetry's default ContextVarsRuntimeContext."""

from __future__ import annotations

from collections.abc import Callable

from opentelemetry import context as otel_context
from opentelemetry.context.context import Context, _RuntimeContext
from opentelemetry.context.contextvars_context import ContextVarsRuntimeContext
from opentelemetry.sdk.trace import TracerProvider

from benchmarks.harness import Result, compare
from threadctx import ThreadRuntimeContext, _current


class MirroredRuntimeContext(ThreadRuntimeContext):
    """threadctx as it runs without the compiled reader: attach/detach also write the registry mirror."""

    def __init__(self) -> None:
        """Keeps the class's methods: no switch to the ContextVar's builtins."""


BACKENDS: dict[str, _RuntimeContext] = {"contextvars (default)": ContextVarsRuntimeContext()}
if _current.reader_in_use():
    BACKENDS["threadctx, compiled reader"] = ThreadRuntimeContext()
BACKENDS["threadctx, mirror (pure Python)"] = MirroredRuntimeContext()
BASELINE = "contextvars (default)"


def attach_detach(runtime: _RuntimeContext) -> Callable[[int], None]:
    context = Context({"k": "v"})
    attach, detach = runtime.attach, runtime.detach

    def run(loops: int) -> None:
        for _ in range(loops):
            detach(attach(context))

    return run


def get_current(runtime: _RuntimeContext) -> Callable[[int], None]:
    get = runtime.get_current

    def run(loops: int) -> None:
        for _ in range(loops):
            get()

    return run


def span_start_end(runtime: _RuntimeContext) -> Callable[[int], None]:
    tracer = TracerProvider().get_tracer("bench")

    def run(loops: int) -> None:
        saved = otel_context._RUNTIME_CONTEXT
        otel_context._RUNTIME_CONTEXT = runtime
        try:
            for _ in range(loops):
                with tracer.start_as_current_span("op"):
                    pass
        finally:
            otel_context._RUNTIME_CONTEXT = saved

    return run


def run_all() -> list[tuple[str, list[Result], str]]:
    return [
        (
            "attach + detach",
            compare({n: attach_detach(b) for n, b in BACKENDS.items()}, baseline=BASELINE, loops=50_000),
            "Target: at most 1.0x.",
        ),
        (
            "get_current",
            compare({n: get_current(b) for n, b in BACKENDS.items()}, baseline=BASELINE, loops=100_000),
            "Target: at most 1.3x.",
        ),
        (
            "span start/end through the SDK (start_as_current_span)",
            compare({n: span_start_end(b) for n, b in BACKENDS.items()}, baseline=BASELINE, loops=5_000),
            "Target: at most 1.02x.",
        ),
    ]


def reader_options(attach_detach_results: list[Result]) -> str:
    """The ways snapshot() can see other threads' contexts, with what each costs."""
    ratio = {r.name: f"{r.ratio:.2f}x" for r in attach_detach_results}
    compiled = ratio.get("threadctx, compiled reader", "not built here")
    mirror = ratio["threadctx, mirror (pure Python)"]
    return "\n".join(
        [
            "### How snapshot() sees other threads: the options measured",
            "",
            "| option | attach + detach vs default | snapshot() sees | costs |",
            "|---|---|---|---|",
            f"| compiled reader (chosen where it builds) | {compiled} | the context each thread runs in now: "
            "exact inside and after `contextvars.Context.run` (asyncio `to_thread`/`run_in_executor`, AnyIO "
            "workers), and for threads that inherited a context (3.14 `thread_inherit_context`) "
            "| a C compiler and Python headers at install (0.3 s to compile), or one wheel per CPython "
            "version and platform (about 16 KiB); GIL builds only |",
            f"| registry mirror, pure Python (the fallback) | {mirror} | the context each thread attached "
            "last: stale once a `Context.run` it attached in returns; nothing for a thread that never "
            "attached | none: any interpreter, also free-threaded |",
            "| a profile hook (`sys.setprofile`/`threading.setprofile`) to see `Context.run` return "
            "| not measured | exact | runs a Python function on every call in every thread: rejected |",
            "",
            "The compiled reader walks the interpreter's thread states under the GIL (the public",
            "`PyInterpreterState_ThreadHead`/`PyThreadState_Next`) and reads each state's current context;",
            "its cost is in the scale tables below (well under a microsecond per thread). Where it cannot be",
            "built the install still succeeds, as a pure-Python wheel that uses the mirror.",
            "",
        ]
    )
