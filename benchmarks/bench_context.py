"""Runtime-context benchmarks: threadctx against OpenTelemetry's default ContextVarsRuntimeContext."""

from __future__ import annotations

from collections.abc import Callable

from opentelemetry import context as otel_context
from opentelemetry.context.context import Context, _RuntimeContext
from opentelemetry.context.contextvars_context import ContextVarsRuntimeContext
from opentelemetry.sdk.trace import TracerProvider

from benchmarks.harness import Result, compare
from threadctx import ThreadRuntimeContext

BACKENDS: dict[str, _RuntimeContext] = {
    "contextvars (default)": ContextVarsRuntimeContext(),
    "threadctx": ThreadRuntimeContext(),
}
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
