"""threadctx: per-thread trace context and correlation IDs for threaded Python services.

Each worker thread logs with its own trace/span context and correlation IDs,
and the OpenTelemetry API sees the same per-thread context::

    import threadctx

    with threadctx.bound(request_id="r-42", tenant="acme"):
        log.info("handled")  # with ContextFilter: trace_id, span_id, request_id, tenant

Select the runtime context with ``OTEL_PYTHON_CONTEXT=threadctx``.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

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
from threadctx._storage import (
    ThreadSnapshot,
    delete_thread_storage,
    get_thread_storage,
    snapshot,
)

try:
    __version__ = version("threadctx")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0+unknown"

__all__ = [
    "MAX_IDS",
    "MAX_NAME_LENGTH",
    "MAX_VALUE_LENGTH",
    "ThreadRuntimeContext",
    "ThreadSnapshot",
    "__version__",
    "bind",
    "bound",
    "clear",
    "correlation",
    "delete_thread_storage",
    "get_thread_storage",
    "snapshot",
    "unbind",
]
