"""The plan file: the contract between prima-plan and every rank's runtime (issue 6).

Schema "prima-ref/plan", version 1 (planner/README.md documents each field). Ranks are
renumbered over the devices that stay in the ring; rank 0 is always the first device given.
Within a round the order is rank 1, 2, ..., R-1, then rank 0, so each rank's layers are given
as explicit index lists per round, with the last `gpu_layers_per_window` of each window on its
GPU. Ports follow prima.cpp: data 9000 + rank, signal/control 10000 + rank.
"""

from __future__ import annotations

from dataclasses import dataclass

from planner import latency
from planner.halda import HaldaResult
from planner.latency import DeviceCost, Split
from planner.profiles import SCHEMA_VERSION, DeviceProfile, ModelProfile

PLAN_SCHEMA = "prima-ref/plan"
DATA_PORT_BASE = 9000
SIGNAL_PORT_BASE = 10000


@dataclass(frozen=True)
class Baseline:
    name: str
    split: Split
    prediction: latency.Prediction
    violations: list[str]


def ring_ranks(split: Split) -> list[int]:
    """Device indices in rank order: rank 0 first, then every other device holding layers."""
    return [0] + [i for i in range(1, len(split.w)) if split.w[i] > 0]


def layer_lists(split: Split) -> dict[int, tuple[list[list[int]], list[list[int]]]]:
    """Device index -> (layers per round, GPU layers per round), in ring order."""
    order = ring_ranks(split)[1:] + [0]
    W = sum(split.w)
    out = {i: ([], []) for i in order}
    for r in range(split.k):
        start = r * W
        for i in order:
            window = list(range(start, start + split.w[i]))
            out[i][0].append(window)
            out[i][1].append(window[len(window) - split.n[i]:] if split.n[i] else [])
            start += split.w[i]
    return out


def build_plan(devices: list[DeviceProfile], model: ModelProfile, costs: list[DeviceCost],
               result: HaldaResult, *, ctx: int, n_predict: int, options: dict,
               baselines: list[Baseline]) -> dict:
    split, pred = result.split, result.prediction
    lists = layer_lists(split)
    ranks = [_rank_entry(rank, i, devices[i], costs[i], split, pred, lists[i])
             for rank, i in enumerate(ring_ranks(split))]
    kept = set(ring_ranks(split))
    removed = [{"device": d.name, "host": d.host,
                "reason": "removing it lowers the predicted token latency"}
               for i, d in enumerate(devices) if i not in kept]
    return {
        "schema": PLAN_SCHEMA, "schema_version": SCHEMA_VERSION, "created_by": "prima-plan",
        "model": {"name": model.name, "file": model.file, "sha256": model.sha256,
                  "n_layers": model.n_layers, "n_embd": model.n_embd,
                  "total_gib": model.total_bytes / latency.GIB},
        "ctx": ctx, "n_predict": n_predict, "k": split.k, "layers_per_round": sum(split.w),
        "ranks": ranks, "removed": removed,
        "latency_ms": _latency_entry(pred, n_predict),
        "solver": _solver_entry(result, options),
        "baselines": {b.name: _baseline_entry(b, devices) for b in baselines},
    }


def _rank_entry(rank: int, i: int, d: DeviceProfile, c: DeviceCost, split: Split,
                pred: latency.Prediction, lists) -> dict:
    t = pred.per_device[i]
    return {"rank": rank, "device": d.name, "host": d.host, "os": d.os,
            "data_port": DATA_PORT_BASE + rank, "signal_port": SIGNAL_PORT_BASE + rank,
            "window": split.w[i], "gpu_layers_per_window": split.n[i],
            "n_layers": split.k * split.w[i], "n_gpu_layers": split.k * split.n[i],
            "gpu_backend": c.gpu_backend if split.n[i] else "none",
            "layers": lists[0], "gpu_layers": lists[1],
            "os_case": t.case, "ram_need_gib": t.ram_need_gib, "ram_budget_gib": c.ram_budget_gib,
            "vram_need_gib": t.vram_need_gib, "vram_budget_gib": c.vram_budget_gib,
            "reread_gib_per_token": t.reread_gib,
            "latency_ms": {"cpu": t.cpu_ms, "gpu": t.gpu_ms, "disk": t.disk_ms,
                           "hop": t.hop_ms, "total": t.total_ms}}


def _latency_entry(pred: latency.Prediction, n_predict: int) -> dict:
    return {"per_token": pred.total_ms, "tokens_per_s": 1e3 / pred.total_ms,
            "n_predict_s": n_predict * pred.total_ms / 1e3,
            "terms": {k: v for k, v in pred.terms_ms.items()}}


def _solver_entry(result: HaldaResult, options: dict) -> dict:
    return {**options, "status": result.status, "time_s": result.solve_s,
            "ilps_solved": result.n_ilps, "case_iterations": result.case_iterations,
            "objective_ms_by_k": {str(r.k): r.objective for r in result.by_k},
            "status_by_k": {str(r.k): r.status for r in result.by_k}}


def _baseline_entry(b: Baseline, devices: list[DeviceProfile]) -> dict:
    return {"k": b.split.k, "windows": {d.name: w for d, w in zip(devices, b.split.w, strict=True)},
            "gpu_layers": {d.name: n for d, n in zip(devices, b.split.n, strict=True)},
            "latency_ms": b.prediction.total_ms, "feasible": not b.violations,
            "violations": b.violations}


# ---------------------------------------------------------------------------------------------
# Checking a plan file (what the runtime relies on)


def check_plan(plan: dict) -> list[str]:
    """Structural promises of a plan: every layer once, ports unique, rank 0 first."""
    problems = []
    if plan.get("schema") != PLAN_SCHEMA or plan.get("schema_version") != SCHEMA_VERSION:
        problems.append("schema: not a prima-ref/plan version 1 document")
    ranks = plan.get("ranks", [])
    if [r["rank"] for r in ranks] != list(range(len(ranks))):
        problems.append("ranks: not numbered 0..R-1 in order")
    seen = sorted(x for r in ranks for window in r["layers"] for x in window)
    if seen != list(range(plan["model"]["n_layers"])):
        problems.append("ranks.layers: do not cover every layer exactly once")
    ports = [r["data_port"] for r in ranks] + [r["signal_port"] for r in ranks]
    if len(set(ports)) != len(ports):
        problems.append("ranks: ports collide")
    for r in ranks:
        if any(not set(g) <= set(w) for g, w in zip(r["gpu_layers"], r["layers"], strict=True)):
            problems.append(f"rank {r['rank']}: GPU layers outside its window")
        if len(r["layers"]) != plan["k"]:
            problems.append(f"rank {r['rank']}: {len(r['layers'])} windows for k={plan['k']}")
    return problems
