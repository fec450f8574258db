"""Decide a target from paired rounds: a bootstrap confidence interval and met / missed / undecided.

Every benchmark here runs its variants side by side in rounds, so each round gives
one paired observation (all variants under the same machine load). A target of
the form "A costs at most ``limit`` times what B costs" is decided on the paired
excess ``A - limit * B`` of each round: its median over the rounds, with a
percentile bootstrap interval (rounds resampled as pairs, so the pairing
survives). An interval entirely at or below zero is **met**, entirely above zero
**missed**, and one that straddles zero **undecided** (the run could not tell,
and says so rather than quote a median). Beside it the ratio of the medians is
shown with its own interval (left out where B's interval reaches zero: a ratio
to nearly nothing means nothing).
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

RESAMPLES = 2000
LEVEL = 0.95


def interval(
    rounds: int,
    statistic: Callable[[Sequence[int]], float],
    *,
    resamples: int = RESAMPLES,
    seed: int = 20261205,
) -> tuple[float, float]:
    """The percentile bootstrap interval of ``statistic`` over resampled round indices."""
    rng = random.Random(seed)
    values = sorted(statistic(rng.choices(range(rounds), k=rounds)) for _ in range(resamples))
    tail = (1 - LEVEL) / 2
    return values[int(tail * resamples)], values[min(int((1 - tail) * resamples), resamples - 1)]


def median_of(samples: Sequence[float], picks: Sequence[int]) -> float:
    return statistics.median(samples[i] for i in picks)


@dataclass(frozen=True)
class Estimate:
    """A median over rounds and its bootstrap interval."""

    value: float
    low: float
    high: float

    def show(self, unit: str = "", digits: int = 0) -> str:
        return (
            f"{self.value:,.{digits}f}{unit} (95% CI {self.low:,.{digits}f} to {self.high:,.{digits}f}{unit})"
        )


def estimate(samples: Sequence[float]) -> Estimate:
    """The median of per-round ``samples`` and its interval."""
    low, high = interval(len(samples), lambda picks: median_of(samples, picks))
    return Estimate(statistics.median(samples), low, high)


def ratio(numerator: Sequence[float], denominator: Sequence[float]) -> Estimate:
    """median(numerator) / median(denominator), rounds resampled as pairs."""

    def of(picks: Sequence[int]) -> float:
        below = median_of(denominator, picks)
        return median_of(numerator, picks) / below if below > 0 else float("inf")

    low, high = interval(len(numerator), of)
    return Estimate(of(range(len(numerator))), low, high)


def verdict(excess: Estimate) -> str:
    """``met``, ``missed`` or ``undecided``: where the interval of ``A - limit * B`` lies against zero."""
    if excess.high <= 0:
        return "met"
    if excess.low > 0:
        return "missed"
    return "undecided"


def target_line(what: str, numerator: Sequence[float], denominator: Sequence[float], limit: float) -> str:
    """One line: the ratio with its interval, the target, the verdict in bold, and by how much.

    ``numerator`` and ``denominator`` hold one value per round (paired).
    """
    excess = estimate([a - limit * b for a, b in zip(numerator, denominator, strict=True)])
    return (
        f"{what}: {ratio_text(numerator, denominator)}; target at most {limit:.2f}x: **{verdict(excess)}** "
        f"(A - {limit:.2f} B per round: {excess.show(digits=1 if abs(excess.value) < 10 else 0)})."
    )


def ratio_text(numerator: Sequence[float], denominator: Sequence[float]) -> str:
    """median(numerator) / median(denominator) with its interval, where the denominator is clear of zero."""
    found = ratio(numerator, denominator)
    if estimate(denominator).low > 0:
        return f"{found.value:.2f}x (95% CI {found.low:.2f}x to {found.high:.2f}x)"
    return f"{found.value:.2f}x (the denominator's interval reaches zero: no interval for the ratio)"


def added(variant: Sequence[float], base: Sequence[float]) -> list[float]:
    """Per-round added cost of ``variant`` over ``base`` (paired within each round)."""
    return [v - b for v, b in zip(variant, base, strict=True)]
