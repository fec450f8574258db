"""An interleaved timing harness: variants alternate within each round, in one process.

Each round times every variant once (in a rotating order, so none always runs
first), and each variant's figure is the median over rounds. Ratios against
the baseline are taken per round, then the median ratio is reported: slow
drifts of the machine affect both sides of a ratio alike.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Result:
    name: str
    per_call_ns: float
    ratio: float  # median of per-round ratios against the baseline
    times: list[float] = field(default_factory=list)  # ns per call, one per round (paired across variants)


def compare(
    variants: dict[str, Callable[[int], None]],
    *,
    baseline: str,
    loops: int = 20_000,
    rounds: int = 31,
) -> list[Result]:
    """Time ``variants`` (each runs its operation ``loops`` times) side by side."""
    names = list(variants)
    times: dict[str, list[float]] = {name: [] for name in names}
    for func in variants.values():  # warm-up
        func(loops // 10 or 1)
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for round_index in range(rounds):
            order = names[round_index % len(names) :] + names[: round_index % len(names)]
            for name in order:
                start = time.perf_counter_ns()
                variants[name](loops)
                times[name].append((time.perf_counter_ns() - start) / loops)
    finally:
        if gc_was_enabled:
            gc.enable()
    base = times[baseline]
    return [
        Result(
            name=name,
            per_call_ns=statistics.median(times[name]),
            ratio=statistics.median(t / b for t, b in zip(times[name], base, strict=True)),
            times=times[name],
        )
        for name in names
    ]


def table(title: str, results: list[Result], *, target: str = "") -> str:
    lines = [
        f"### {title}",
        "",
        "| variant | ns per operation (median) | ratio to baseline |",
        "|---|---|---|",
    ]
    lines += [f"| {r.name} | {r.per_call_ns:,.0f} | {r.ratio:.2f}x |" for r in results]
    if target:
        lines += ["", target]
    return "\n".join(lines) + "\n"
