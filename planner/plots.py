"""Plots of a plan (matplotlib Agg, PNG and SVG): where layers go, memory, latency, k."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from planner.halda import HaldaResult  # noqa: E402
from planner.latency import DeviceCost  # noqa: E402
from planner.plan_file import Baseline  # noqa: E402

COLORS = {"gpu": "#2a9d8f", "ram": "#457b9d", "disk": "#e76f51", "cpu": "#457b9d",
          "hop": "#f4a261", "fixed": "#8d99ae", "budget": "#adb5bd"}


def write_plots(out_dir: Path, names: list[str], costs: list[DeviceCost], result: HaldaResult,
                baselines: list[Baseline], title: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for stem, draw in (("layers", _layers), ("memory", _memory), ("latency", _latency),
                       ("objective_vs_k", _objective_vs_k)):
        fig, subtitle = draw(names, costs, result, baselines)
        fig.suptitle(f"{title}: {subtitle}", fontsize=10)
        fig.tight_layout()
        for ext in ("png", "svg"):
            path = out_dir / f"{stem}.{ext}"
            fig.savefig(path, dpi=110)
            written.append(path)
        plt.close(fig)
    return written


def layer_kinds(c: DeviceCost, k: int, w: int, n: int, reread_gib: float) -> dict[str, float]:
    """Layers on the GPU, in RAM on the CPU, and re-read from disk every token."""
    on_disk = min(k * w, reread_gib / c.layer_gib) if c.layer_gib > 0 else 0.0
    cpu = k * (w - n)
    return {"gpu": k * n - max(0.0, on_disk - cpu), "ram": cpu - min(cpu, on_disk),
            "disk": on_disk}


def _layers(names, costs, result, baselines):
    split, pred = result.split, result.prediction
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(names)), 4))
    bottom = [0.0] * len(names)
    kinds = [layer_kinds(c, split.k, split.w[i], split.n[i], pred.per_device[i].reread_gib)
             for i, c in enumerate(costs)]
    for kind, label in (("gpu", "GPU"), ("ram", "CPU, in RAM"), ("disk", "re-read from disk")):
        values = [kd[kind] for kd in kinds]
        ax.bar(names, values, bottom=bottom, color=COLORS[kind], label=label)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    for i, w in enumerate(split.w):
        if w == 0:
            ax.text(i, 0.2, "removed" if i else "rank 0\n(no layers)", ha="center", fontsize=8)
    ax.set_ylabel("layers per token")
    ax.legend(fontsize=8)
    _rotate(ax)
    return fig, f"layers per device (k={split.k})"


def _memory(names, costs, result, baselines):
    pred = result.prediction
    fig, (ram, vram) = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(names)), 4))
    x = range(len(names))
    ram.bar([i - 0.2 for i in x], [t.ram_need_gib for t in pred.per_device], 0.4,
            color=COLORS["ram"], label="needed")
    ram.bar([i + 0.2 for i in x], [c.ram_budget_gib for c in costs], 0.4,
            color=COLORS["budget"], label="available")
    vram.bar([i - 0.2 for i in x], [t.vram_need_gib for t in pred.per_device], 0.4,
             color=COLORS["gpu"], label="used")
    vram.bar([i + 0.2 for i in x], [c.vram_budget_gib for c in costs], 0.4,
             color=COLORS["budget"], label="usable")
    for ax, label in ((ram, "RAM (GiB)"), (vram, "GPU memory (GiB)")):
        ax.set_xticks(list(x), names)
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
        _rotate(ax)
    return fig, "memory per device"


def _latency(names, costs, result, baselines):
    pred = result.prediction
    fig, (ax, cmp) = plt.subplots(1, 2, figsize=(max(9, 1.6 * len(names)), 4),
                                  gridspec_kw={"width_ratios": [3, 2]})
    labels = names + ["rank 0 fixed"]
    bottom = [0.0] * len(labels)
    for term in ("cpu", "gpu", "disk", "hop"):
        values = [getattr(t, f"{term}_ms") for t in pred.per_device] + [0.0]
        ax.bar(labels, values, bottom=bottom, color=COLORS[term], label=term)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.bar(labels[-1], pred.fixed_ms, color=COLORS["fixed"], label="output+sampling")
    ax.set_ylabel("ms per token")
    ax.legend(fontsize=8)
    _rotate(ax)
    rows = [("Halda", pred.total_ms)] + [(b.name + ("" if not b.violations else " (infeasible)"),
                                           b.prediction.total_ms) for b in baselines]
    cmp.barh([r[0] for r in rows], [r[1] for r in rows],
             color=[COLORS["gpu"]] + [COLORS["budget"]] * len(baselines))
    cmp.set_xlabel("ms per token")
    cmp.invert_yaxis()
    for y, (_, value) in enumerate(rows):
        cmp.text(value, y, f" {value:,.0f}", va="center", fontsize=8)
    return fig, f"predicted latency {pred.total_ms:,.1f} ms/token"


def _objective_vs_k(names, costs, result, baselines):
    fig, ax = plt.subplots(figsize=(6, 4))
    solved = [r for r in result.by_k if r.objective is not None]
    ax.plot([r.k for r in solved], [r.objective for r in solved], "o-", color=COLORS["gpu"],
            label="Halda optimum for this k")
    for r in result.by_k:
        if r.objective is None:
            ax.axvline(r.k, color=COLORS["budget"], ls=":", lw=1)
    for b, style in zip(baselines, ("--", "-.", ":"), strict=False):
        ax.axhline(b.prediction.total_ms, ls=style, color=COLORS["disk"], lw=1, label=b.name)
    ax.set_xscale("log", base=2)
    ks = [r.k for r in result.by_k]
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.minorticks_off()
    ax.set_xlabel("k (rounds per token; dotted: no feasible split)")
    ax.set_ylabel("predicted ms per token")
    ax.legend(fontsize=8)
    return fig, "objective vs k"


def _rotate(ax) -> None:
    for label in ax.get_xticklabels():
        label.set_rotation(30)
        label.set_ha("right")
