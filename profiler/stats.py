"""Repeated measurements: every figure is the mean ± std of `-r` samples, as llama-bench does."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Stat:
    samples: tuple[float, ...]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.samples)

    @property
    def std(self) -> float:
        return statistics.stdev(self.samples) if len(self.samples) > 1 else 0.0

    def scaled(self, factor: float) -> Stat:
        return Stat(tuple(s * factor for s in self.samples))

    def inverse(self, numerator: float) -> Stat:
        """numerator / each sample: turns seconds into a rate (or a rate into seconds)."""
        return Stat(tuple(numerator / s for s in self.samples))

    def fmt(self, digits: int = 2) -> str:
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"


def repeat(fn: Callable[[], float], repeats: int) -> Stat:
    return Stat(tuple(fn() for _ in range(max(1, repeats))))


def timed_passes(one_pass: Callable[[], object], min_seconds: float) -> tuple[int, float]:
    """Run one_pass until min_seconds have passed (at least once); (passes, seconds)."""
    passes, t0 = 0, time.perf_counter()
    while True:
        one_pass()
        passes += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= min_seconds:
            return passes, elapsed
