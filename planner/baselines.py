"""Splits other systems would choose, priced with the same latency model for comparison.

memory_proportional  exo's default: layers in proportion to each device's memory (here the RAM
                     budget plus usable CUDA VRAM), one round, rounding by largest remainder;
                     prima.cpp's fallback without HiGHS is the same idea.
even                 distributed-llama's spirit: the same number of layers on every device.
Both put as many of a device's layers on its GPU as fit in usable VRAM.
"""

from __future__ import annotations

import math

from planner.latency import DeviceCost, Split


def memory_proportional(costs: list[DeviceCost], n_layers: int) -> Split:
    memory = [c.ram_budget_gib + (c.vram_budget_gib if c.gpu_backend == "cuda" else 0.0)
              for c in costs]
    if sum(memory) <= 0:
        memory = [1.0] * len(costs)
    return _with_gpu_layers(costs, _largest_remainder(memory, n_layers))


def even(costs: list[DeviceCost], n_layers: int) -> Split:
    return _with_gpu_layers(costs, _largest_remainder([1.0] * len(costs), n_layers))


def _largest_remainder(weights: list[float], total: int) -> list[int]:
    exact = [total * x / sum(weights) for x in weights]
    counts = [math.floor(e) for e in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def _with_gpu_layers(costs: list[DeviceCost], layers: list[int]) -> Split:
    gpu = [min(w, math.floor(c.vram_budget_gib / c.layer_need_gib + 1e-9)) if c.has_gpu else 0
           for c, w in zip(costs, layers, strict=True)]
    return Split(k=1, w=tuple(layers), n=tuple(gpu))
