"""Interleaved, paired timing: every method runs in every round, in a rotating order,
so a slow moment of a shared machine hits both sides of a ratio."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def interleaved(
    steps: dict[str, Callable[[int], object]], rounds: int, per_round: int = 1
) -> dict[str, list[float]]:
    """ms per call of each `steps[name](i)`, `per_round` calls per round, `rounds` rounds."""
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            for i in range(per_round):
                steps[name](r * per_round + i)
            times[name].append(1000 * (time.perf_counter() - t0) / per_round)
    return times


def paired_ratio(a: list[float], b: list[float]) -> float:
    """Median over rounds of `a / b`, both measured in the same round."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True))
