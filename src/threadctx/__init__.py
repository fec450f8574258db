"""threadctx: per-thread trace context and correlation IDs for threaded Python services.

Each worker thread logs with its own trace/span context and correlation IDs,
and the OpenTelemetry API sees the same per-thread context::

    import threadctx

    with threadctx.bound(request_id="r-42", tenant="acme"):
        log.info("handled")  # with ContextFilter: trace_id, span_id, request_id, tenant

Select the runtime context with ``OTEL_PYTHON_CONTEXT=threadctx``.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

# Only modules that do not import ``opentelemetry.trace`` at import time are
# imported eagerly: this package is loaded through the
# ``opentelemetry_context`` entry point while ``opentelemetry.context`` is
# still being imported.
from threadctx._correlation import (
    MAX_IDS,
    MAX_NAME_LENGTH,
    MAX_VALUE_LENGTH,
    bind,
    bound,
    clear,
    correlation,
    unbind,
)
from threadctx._runtime import ThreadRuntimeContext
from threadctx._snapshot import ThreadSnapshot, snapshot
from threadctx._storage import delete_thread_storage, get_thread_storage
from threadctx._version import __version__

if TYPE_CHECKING:
    from threadctx._filter import ContextFilter, instrument_logging, uninstrument_logging
    from threadctx._integrations import loguru_patcher, structlog_processor
    from threadctx._ops.metrics import instrument_metrics
    from threadctx._ops.report import dump
    from threadctx._ops.signal import install_dump_signal
    from threadctx._ops.watchdog import Watchdog, start_watchdog
    from threadctx._processes import ContextProcessPoolExecutor, wrap_process
    from threadctx._propagation import (
        BAGGAGE_MAX_BYTES,
        BAGGAGE_MAX_MEMBERS,
        attached,
        extract,
        inject,
        propagate,
        propagated,
        propagation_stats,
    )
    from threadctx._threads import (
        ContextThreadPoolExecutor,
        Thread,
        instrument_threading,
        uninstrument_threading,
        wrap,
    )
    from threadctx._vendors import PRESETS, FieldNames

# Names whose modules import opentelemetry.trace: loaded on first use.
_LAZY = {
    "dump": "threadctx._ops.report",
    "install_dump_signal": "threadctx._ops.signal",
    "PRESETS": "threadctx._vendors",
    "ContextFilter": "threadctx._filter",
    "FieldNames": "threadctx._vendors",
    "instrument_logging": "threadctx._filter",
    "uninstrument_logging": "threadctx._filter",
    "loguru_patcher": "threadctx._integrations",
    "structlog_processor": "threadctx._integrations",
    "instrument_metrics": "threadctx._ops.metrics",
    "ContextProcessPoolExecutor": "threadctx._processes",
    "wrap_process": "threadctx._processes",
    "BAGGAGE_MAX_BYTES": "threadctx._propagation",
    "BAGGAGE_MAX_MEMBERS": "threadctx._propagation",
    "attached": "threadctx._propagation",
    "extract": "threadctx._propagation",
    "inject": "threadctx._propagation",
    "propagate": "threadctx._propagation",
    "propagated": "threadctx._propagation",
    "propagation_stats": "threadctx._propagation",
    "ContextThreadPoolExecutor": "threadctx._threads",
    "Thread": "threadctx._threads",
    "instrument_threading": "threadctx._threads",
    "uninstrument_threading": "threadctx._threads",
    "wrap": "threadctx._threads",
    "Watchdog": "threadctx._ops.watchdog",
    "start_watchdog": "threadctx._ops.watchdog",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'threadctx' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value  # once loaded, a plain module attribute
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "BAGGAGE_MAX_BYTES",
    "BAGGAGE_MAX_MEMBERS",
    "MAX_IDS",
    "MAX_NAME_LENGTH",
    "MAX_VALUE_LENGTH",
    "PRESETS",
    "ContextFilter",
    "ContextProcessPoolExecutor",
    "ContextThreadPoolExecutor",
    "FieldNames",
    "Thread",
    "ThreadRuntimeContext",
    "ThreadSnapshot",
    "Watchdog",
    "__version__",
    "attached",
    "bind",
    "bound",
    "clear",
    "correlation",
    "delete_thread_storage",
    "dump",
    "extract",
    "get_thread_storage",
    "inject",
    "install_dump_signal",
    "instrument_logging",
    "instrument_metrics",
    "instrument_threading",
    "loguru_patcher",
    "propagate",
    "propagated",
    "propagation_stats",
    "snapshot",
    "start_watchdog",
    "structlog_processor",
    "unbind",
    "uninstrument_logging",
    "uninstrument_threading",
    "wrap",
    "wrap_process",
]
