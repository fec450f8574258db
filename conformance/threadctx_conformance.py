"""Pytest plugin that swaps threadctx's runtime context into OpenTelemetry's own test suites.

Loaded with ``-p threadctx_conformance`` before any conftest, it selects
``OTEL_PYTHON_CONTEXT=threadctx`` and imports ``opentelemetry.context`` so the
choice is fixed before a suite's conftest can change the variable (then it
unsets the variable again, as the suites expect).  It then
checks, at the start and at the end of the session, that threadctx really is
the runtime context: a run that silently used the default would prove nothing.
"""

from __future__ import annotations

import os

os.environ["OTEL_PYTHON_CONTEXT"] = "threadctx"

from opentelemetry import context

import threadctx

# The choice is made; the suites' own tests of that choice expect the variable unset.
del os.environ["OTEL_PYTHON_CONTEXT"]


def _check() -> None:
    runtime = context._RUNTIME_CONTEXT
    if not isinstance(runtime, threadctx.ThreadRuntimeContext):
        raise RuntimeError(f"threadctx is not the runtime context: {runtime!r}")


_check()


def pytest_sessionstart() -> None:
    _check()


def pytest_report_header() -> str:
    return f"runtime context: threadctx {threadctx.__version__} (ThreadRuntimeContext)"


def pytest_sessionfinish() -> None:
    _check()
