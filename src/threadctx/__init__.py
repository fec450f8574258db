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

# Type checkers cannot read the table below: each public name is also imported from its module, as
# ``name as name`` (an explicit re-export). Eagerly only from modules that do not import
# ``opentelemetry.trace`` at import time: this package is loaded through the
# ``opentelemetry_context`` entry point while ``opentelemetry.context`` is still being imported.
from threadctx._correlation import CORRELATION_MAX_IDS as CORRELATION_MAX_IDS
from threadctx._correlation import CORRELATION_MAX_NAME_LENGTH as CORRELATION_MAX_NAME_LENGTH
from threadctx._correlation import CORRELATION_MAX_VALUE_LENGTH as CORRELATION_MAX_VALUE_LENGTH
from threadctx._correlation import bind as bind
from threadctx._correlation import bound as bound
from threadctx._correlation import clear_correlation as clear_correlation
from threadctx._correlation import correlation as correlation
from threadctx._correlation import unbind as unbind
from threadctx._reader import ReaderInfo as ReaderInfo
from threadctx._reader import reader_info as reader_info
from threadctx._runtime import ThreadRuntimeContext as ThreadRuntimeContext
from threadctx._snapshot import ThreadSnapshot as ThreadSnapshot
from threadctx._snapshot import snapshot as snapshot
from threadctx._storage import delete_thread_storage as delete_thread_storage
from threadctx._storage import get_thread_storage as get_thread_storage
from threadctx._version import __version__ as __version__

if TYPE_CHECKING:
    from threadctx._filter import ContextFilter as ContextFilter
    from threadctx._filter import instrument_logging as instrument_logging
    from threadctx._filter import uninstrument_logging as uninstrument_logging
    from threadctx._integrations import loguru_patcher as loguru_patcher
    from threadctx._integrations import structlog_processor as structlog_processor
    from threadctx._ops.metrics import instrument_metrics as instrument_metrics
    from threadctx._ops.metrics import uninstrument_metrics as uninstrument_metrics
    from threadctx._ops.report import dump as dump
    from threadctx._ops.signal import install_dump_signal as install_dump_signal
    from threadctx._ops.watchdog import Watchdog as Watchdog
    from threadctx._ops.watchdog import start_watchdog as start_watchdog
    from threadctx._processes import ContextProcessPoolExecutor as ContextProcessPoolExecutor
    from threadctx._processes import wrap_process as wrap_process
    from threadctx._propagation import BAGGAGE_MAX_BYTES as BAGGAGE_MAX_BYTES
    from threadctx._propagation import BAGGAGE_MAX_MEMBERS as BAGGAGE_MAX_MEMBERS
    from threadctx._propagation import allow_propagation as allow_propagation
    from threadctx._propagation import attached as attached
    from threadctx._propagation import extract as extract
    from threadctx._propagation import inject as inject
    from threadctx._propagation import propagation_allowlist as propagation_allowlist
    from threadctx._propagation import propagation_stats as propagation_stats
    from threadctx._propagation import set_propagation_allowlist as set_propagation_allowlist
    from threadctx._propagator import CorrelationPropagator as CorrelationPropagator
    from threadctx._threads import ContextThread as ContextThread
    from threadctx._threads import ContextThreadPoolExecutor as ContextThreadPoolExecutor
    from threadctx._threads import instrument_threading as instrument_threading
    from threadctx._threads import uninstrument_threading as uninstrument_threading
    from threadctx._threads import wrap_context as wrap_context
    from threadctx._vendors import PRESETS as PRESETS
    from threadctx._vendors import FieldNames as FieldNames

# Every public name and the module that defines it, in one table: it drives lazy loading
# (__getattr__), __all__ and dir(). tests/test_exports.py fails when the imports above and the
# table disagree.
_EXPORTS: dict[str, str] = {
    "__version__": "threadctx._version",
    # Imported eagerly (above).
    "ThreadRuntimeContext": "threadctx._runtime",
    "get_thread_storage": "threadctx._storage",
    "delete_thread_storage": "threadctx._storage",
    "ThreadSnapshot": "threadctx._snapshot",
    "snapshot": "threadctx._snapshot",
    "ReaderInfo": "threadctx._reader",
    "reader_info": "threadctx._reader",
    "CORRELATION_MAX_IDS": "threadctx._correlation",
    "CORRELATION_MAX_NAME_LENGTH": "threadctx._correlation",
    "CORRELATION_MAX_VALUE_LENGTH": "threadctx._correlation",
    "bind": "threadctx._correlation",
    "bound": "threadctx._correlation",
    "clear_correlation": "threadctx._correlation",
    "correlation": "threadctx._correlation",
    "unbind": "threadctx._correlation",
    # Lazy: loaded on first use.
    "BAGGAGE_MAX_BYTES": "threadctx._propagation",
    "BAGGAGE_MAX_MEMBERS": "threadctx._propagation",
    "CorrelationPropagator": "threadctx._propagator",
    "attached": "threadctx._propagation",
    "extract": "threadctx._propagation",
    "inject": "threadctx._propagation",
    "allow_propagation": "threadctx._propagation",
    "propagation_allowlist": "threadctx._propagation",
    "propagation_stats": "threadctx._propagation",
    "set_propagation_allowlist": "threadctx._propagation",
    "ContextThread": "threadctx._threads",
    "ContextThreadPoolExecutor": "threadctx._threads",
    "instrument_threading": "threadctx._threads",
    "uninstrument_threading": "threadctx._threads",
    "wrap_context": "threadctx._threads",
    "ContextProcessPoolExecutor": "threadctx._processes",
    "wrap_process": "threadctx._processes",
    "PRESETS": "threadctx._vendors",
    "FieldNames": "threadctx._vendors",
    "ContextFilter": "threadctx._filter",
    "instrument_logging": "threadctx._filter",
    "uninstrument_logging": "threadctx._filter",
    "loguru_patcher": "threadctx._integrations",
    "structlog_processor": "threadctx._integrations",
    "dump": "threadctx._ops.report",
    "install_dump_signal": "threadctx._ops.signal",
    "Watchdog": "threadctx._ops.watchdog",
    "start_watchdog": "threadctx._ops.watchdog",
    "instrument_metrics": "threadctx._ops.metrics",
    "uninstrument_metrics": "threadctx._ops.metrics",
}

__all__ = sorted(_EXPORTS)  # noqa: PLE0605 - from the table; the imports above re-export explicitly


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'threadctx' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value  # once loaded, a plain module attribute
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
