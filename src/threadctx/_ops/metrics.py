"""Metrics through the OpenTelemetry metrics API: threads serving a span, and the oldest span's age."""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Iterable

from opentelemetry import metrics

from threadctx._ops.watchdog import Ages
from threadctx._snapshot import snapshot, warn_if_foreign_runtime
from threadctx._storage import new_locks_in_child
from threadctx._version import __version__

__all__ = ["instrument_metrics", "uninstrument_metrics"]

_lock = threading.Lock()  # instrument_metrics() and uninstrument_metrics() only: never on a request path
new_locks_in_child(globals(), "_lock")


class _Observer:
    """Both instruments' callbacks; each reads a snapshot of its own, with one memory of first sightings.

    OpenTelemetry's metrics API has no way to remove an observable instrument
    or its callbacks: switched off, the callbacks report nothing, so a
    collection has no data point from them.
    """

    def __init__(self) -> None:
        self._ages = Ages()
        self.reporting = True

    def restart(self) -> None:
        """Report again, with no memory of the spans seen before."""
        self._ages = Ages()
        self.reporting = True

    def busy(self, options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
        if not self.reporting:
            return []
        return [metrics.Observation(len(self._ages.busy(snapshot(), time.time())))]

    def oldest_age(self, options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
        if not self.reporting:
            return []
        ages = [age for _, _, age in self._ages.busy(snapshot(), time.time())]
        return [metrics.Observation(max(ages, default=0.0))]


#: The observer registered on each provider, reporting or switched off, kept for the provider's life:
#: a provider keeps the instruments, and creating them again would not register new callbacks.
_observers: weakref.WeakKeyDictionary[metrics.MeterProvider, _Observer] = weakref.WeakKeyDictionary()
#: The same for providers that refuse weak references (kept alive here).
_observers_kept: dict[int, tuple[metrics.MeterProvider, _Observer]] = {}
#: The provider that a call without ``meter_provider`` used (the global one at the time, perhaps
#: OpenTelemetry's proxy for a provider set later), for a later call without one to find it.
_default: list[metrics.MeterProvider] = []


def _observer(provider: metrics.MeterProvider) -> _Observer | None:
    try:
        return _observers.get(provider)
    except TypeError:  # not weakly referenceable
        kept = _observers_kept.get(id(provider))
        return kept[1] if kept is not None else None


def _remember(provider: metrics.MeterProvider, observer: _Observer) -> None:
    try:
        _observers[provider] = observer
    except TypeError:
        _observers_kept[id(provider)] = (provider, observer)


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
    :func:`uninstrument_metrics` stops the reporting.

    .. versionadded:: 0.1.0
    """
    warn_if_foreign_runtime()
    provider = meter_provider if meter_provider is not None else metrics.get_meter_provider()
    with _lock:
        if meter_provider is None and provider not in _default:
            _default.append(provider)
        observer = _observer(provider)
        if observer is not None:  # registered before: report again if switched off
            if not observer.reporting:
                observer.restart()
            return
        observer = _Observer()
        _remember(provider, observer)
        meter = provider.get_meter("threadctx", __version__)
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


def uninstrument_metrics(meter_provider: metrics.MeterProvider | None = None) -> None:
    """Stop the reporting that :func:`instrument_metrics` started for ``meter_provider``.

    Without ``meter_provider``, for the global provider (also when
    :func:`instrument_metrics` ran before the global provider was set).
    Calling it when not instrumented does nothing.

    OpenTelemetry's metrics API cannot remove an instrument: the two
    instruments stay registered with the provider, and their callbacks
    report nothing, so collections carry no ``threadctx.*`` data point.
    :func:`instrument_metrics` for the same provider makes them report
    again.

    .. versionadded:: 0.1.0
    """
    with _lock:
        if meter_provider is not None:
            providers = [meter_provider]
        else:
            providers = [metrics.get_meter_provider(), *_default]
            _default.clear()
        for provider in providers:
            observer = _observer(provider)
            if observer is not None:
                observer.reporting = False
