"""Metrics through the OpenTelemetry metrics API: threads serving a span, and the oldest span's age."""

from __future__ import annotations

import contextlib
import threading
import time
import weakref
from collections.abc import Iterable

from opentelemetry import metrics

from threadctx._ops.watchdog import Ages
from threadctx._snapshot import snapshot, warn_if_foreign_runtime
from threadctx._version import __version__

__all__ = ["instrument_metrics"]

_instrumented: weakref.WeakSet[metrics.MeterProvider] = weakref.WeakSet()
_lock = threading.Lock()  # instrument_metrics() only: never taken on a request path


class _Observer:
    """Both instruments' callbacks; each reads a snapshot of its own, with one memory of first sightings."""

    def __init__(self) -> None:
        self._ages = Ages()

    def busy(self, options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
        return [metrics.Observation(len(self._ages.busy(snapshot(), time.time())))]

    def oldest_age(self, options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
        ages = [age for _, _, age in self._ages.busy(snapshot(), time.time())]
        return [metrics.Observation(max(ages, default=0.0))]


def instrument_metrics(meter_provider: metrics.MeterProvider | None = None) -> None:
    """Report how busy the threads are, through OpenTelemetry metrics.

    Registers two observable instruments on the meter ``threadctx`` of
    ``meter_provider`` (default: the global one), read on each collection:

    - ``threadctx.threads.busy`` (an up-down counter, unit ``{thread}``): the
      number of threads serving a span;
    - ``threadctx.span.oldest_age`` (a gauge, unit ``s``): how long the
      oldest span in service has run, ``0`` when no thread serves one.

    A pool filling up shows as ``busy`` rising to the pool's size, and a
    stuck one as ``oldest_age`` rising past the request timeout::

        threadctx.instrument_metrics()

    Calling it again for the same provider does nothing.  The callbacks read
    what :func:`snapshot` reads; nothing runs on the request path.

    .. versionadded:: 0.1.0
    """
    warn_if_foreign_runtime()
    provider = meter_provider if meter_provider is not None else metrics.get_meter_provider()
    with _lock:
        if provider in _instrumented:
            return
        with contextlib.suppress(TypeError):  # a provider without weak references: no memory of it
            _instrumented.add(provider)
    meter = provider.get_meter("threadctx", __version__)
    observer = _Observer()
    meter.create_observable_up_down_counter(
        "threadctx.threads.busy",
        callbacks=[observer.busy],
        unit="{thread}",
        description="Threads serving a span",
    )
    meter.create_observable_gauge(
        "threadctx.span.oldest_age",
        callbacks=[observer.oldest_age],
        unit="s",
        description="How long the oldest span in service has run (0 when no thread serves one)",
    )
