"""Planner benchmark: Halda's solve time by cluster size, and its plans against the baselines.

Writes reports/planner.md and plots under reports/planner/ (and prints the report).

    .venv/bin/python bench/plan.py            # full run (about two minutes on 2 cores)
    .venv/bin/python bench/plan.py --quick    # fewer random clusters
"""

from __future__ import annotations

import argparse
import datetime
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import pulp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from planner.cli import make_plan  # noqa: E402
from planner.halda import HaldaOptions, PlanError  # noqa: E402
from planner.model_profile import LLAMA3_8B, LLAMA3_70B, llama_like  # noqa: E402
from planner.plots import write_plots  # noqa: E402
from planner.profiles import cluster_from_dict, load_devices  # noqa: E402

REPORT = ROOT / "reports" / "planner.md"
PLOTS = ROOT / "reports" / "planner"
HOME = ROOT / "planner" / "examples" / "prima-home-cluster.toml"

# Defaults, each with its reason
CTX = 4096  # a usual chat context; the KV cache is part of every device's memory
SIZES = (4, 16, 64)  # the solve-time targets: < 1 s for 4, < 10 s for 64 devices
SEEDS = 5  # random clusters per size: enough to show the spread, cheap enough for 2 cores
QUICK_SEEDS = 2
REPEATS = 3  # per cluster, keep the fastest (other jobs share this machine's 2 cores)
LOOP_SEEDS = 20  # random clusters for exact cases vs prima.cpp's case loop

# Device archetypes for random clusters: (os, cpu GB/s, RAM GiB avail range, disk seq/rnd GB/s,
# GPU kind or None, VRAM GiB range, GPU GB/s). Drawn with +-30% jitter.
ARCHETYPES = {
    "phone": ("android", 10, (1.5, 4), (1.2, 0.25), None, None, None),
    "pi": ("linux", 4, (2, 7), (0.3, 0.05), None, None, None),
    "laptop": ("linux", 22, (3, 12), (2.5, 0.5), None, None, None),
    "gaming-pc": ("linux", 35, (6, 24), (3.2, 0.6), "cuda", (6, 16), 450),
    "mac": ("macos", 45, (2, 12), (2.5, 0.7), "metal", (5, 20), 100),
    "win-desktop": ("windows", 30, (6, 24), (3.0, 0.5), "cuda", (8, 24), 600),
}


FAMILIES = {"mixed": tuple(ARCHETYPES), "cpu-only": ("phone", "pi", "laptop"),
            "phones and boards": ("phone", "pi")}


def random_cluster(n: int, seed: int, kinds: tuple[str, ...] = tuple(ARCHETYPES)) -> list:
    rng = random.Random(seed)
    devices = [_random_device(rng, i, rng.choice(kinds)) for i in range(n)]
    doc = {"schema": "prima-ref/cluster", "schema_version": 1, "devices": devices}
    return cluster_from_dict(doc, f"random(n={n}, seed={seed})")


def _random_device(rng: random.Random, i: int, kind: str) -> dict:
    os_name, cpu, ram, (seq, rnd), gpu, vram, gpu_gbps = ARCHETYPES[kind]

    def j(x):
        return x * rng.uniform(0.7, 1.3)

    entry = {"name": f"{kind}-{i}", "os": os_name, "cpu_cores": 8, "cpu_gbps": j(cpu),
             "cpu_gflops": j(cpu * 8), "ram_read_gbps": j(cpu * 1.4),
             "ram_avail_gib": rng.uniform(*ram), "disk_seq_gbps": j(seq), "disk_rnd_gbps": j(rnd),
             "link_latency_ms": rng.uniform(0.5, 5), "link_gbps": rng.uniform(0.02, 0.12)}
    if gpu:
        entry["gpu"] = {"kind": gpu, "vram_free_gib": rng.uniform(*vram),
                        "bandwidth_gbps": j(gpu_gbps), "gpu_gbps": j(gpu_gbps * 0.8),
                        "gpu_gflops": j(gpu_gbps * 40)}
    return entry


# ---------------------------------------------------------------------------------------------
# Measurements


def solve_times(model, seeds: int) -> list[dict]:
    rows = []
    for n in SIZES:
        for family, kinds in FAMILIES.items():
            times, ilps, statuses, active = [], [], set(), []
            for seed in range(seeds):
                devices = random_cluster(n, 1000 * n + seed, kinds)
                try:
                    seconds, planned = _best_time(devices, model)
                except PlanError:
                    statuses.add("no plan")
                    continue
                times.append(seconds)
                ilps.append(planned.result.n_ilps)
                statuses.add(planned.result.status)
                active.append(len(planned.plan["ranks"]))
            rows.append({"devices": n, "family": family, "times": times, "ilps": ilps,
                         "statuses": statuses, "active": active})
    return rows


def _best_time(devices, model):
    """Fastest of REPEATS runs: the machine is shared, and a slow run measures the neighbours."""
    best = None
    for _ in range(REPEATS):
        start = time.perf_counter()
        planned = make_plan(devices, model, ctx=CTX)
        seconds = time.perf_counter() - start
        best = seconds if best is None else min(best, seconds)
    return best, planned


def compare_cases(model, n_clusters: int) -> dict:
    """Exact case variables vs prima.cpp's set-assignment loop on the same clusters."""
    gaps, loop_s, exact_s = [], [], []
    for seed in range(n_clusters):
        devices = random_cluster(4 + seed % 5, 77 + seed)
        try:
            exact = make_plan(devices, model, ctx=CTX)
            loop = make_plan(devices, model, ctx=CTX, options=HaldaOptions(cases="loop"))
        except PlanError:
            continue
        e, lp = exact.result.prediction.total_ms, loop.result.prediction.total_ms
        gaps.append(lp / e - 1.0)
        exact_s.append(exact.result.solve_s)
        loop_s.append(loop.result.solve_s)
    return {"gaps": gaps, "loop_s": loop_s, "exact_s": exact_s}


def clusters_for_comparison():
    home = load_devices([HOME])
    return [("prima.cpp home cluster", home),
            ("8 single-board computers", random_cluster(8, 8, ("pi",))),
            ("2 Macs + gaming PC + 2 phones", random_cluster(5, 11, ("mac", "gaming-pc",
                                                                        "phone"))),
            ("16 mixed devices", random_cluster(16, 16))]


def comparisons(models) -> list[dict]:
    rows = []
    for cluster_name, devices in clusters_for_comparison():
        for model in models:
            try:
                planned = make_plan(devices, model, ctx=CTX)
            except PlanError as e:
                rows.append({"cluster": cluster_name, "model": model.name, "error": str(e)})
                continue
            loop = make_plan(devices, model, ctx=CTX, options=HaldaOptions(cases="loop"))
            rows.append({"cluster": cluster_name, "model": model.name, "planned": planned,
                         "loop_ms": loop.result.prediction.total_ms, "n_devices": len(devices)})
    return rows


# ---------------------------------------------------------------------------------------------
# Report


def render(solve_rows, cmp_rows, cases, plot_links, args) -> str:
    lines = [
        "# Planner (Halda) benchmark", "",
        f"Generated by `bench/plan.py{' --quick' if args.quick else ''}` on "
        f"{datetime.date.today()}, {platform.machine()} {platform.system()}, Python "
        f"{platform.python_version()}, PuLP {pulp.__version__} with its bundled CBC, one solver "
        f"thread; the machine was shared with other jobs, so times are upper bounds. Model: "
        f"synthetic Llama-3-70B Q4_K profile (80 layers, so 10 values of k, one ILP each), "
        f"context {CTX}. Everything below is the planner's *prediction* from its latency model "
        "(planner/latency.py), not a measured token latency.", "",
        "## Solve time", "",
        "Wall time of the whole `make_plan` (profiles to costs, one ILP per divisor k of 80 with "
        "device removal inside the ILP, baselines, plan document), fastest of "
        f"{REPEATS} runs per cluster, over random clusters per size and kind.", "",
        "| devices | cluster kind | clusters | median s | max s | ILPs | solver status | "
        "devices kept (median) | target |",
        "|---:|---|---:|---:|---:|---:|---|---:|---|"]
    for r in solve_rows:
        t = r["times"]
        target = {4: "< 1 s", 64: "< 10 s"}.get(r["devices"], "")
        ok = "" if not t or not target else (" met" if max(t) < float(target[2:-2]) else
                                             " **missed**")
        lines.append(
            f"| {r['devices']} | {r['family']} | {len(t)} | "
            f"{statistics.median(t) if t else float('nan'):.2f} | "
            f"{max(t) if t else float('nan'):.2f} | {r['ilps'][0] if r['ilps'] else '-'} | "
            f"{', '.join(sorted(r['statuses']))} | "
            f"{statistics.median(r['active']) if r['active'] else '-'} | {target}{ok} |")
    lines += ["", "## Halda against the baselines", "",
              "Same latency model for every split. *memory-proportional* is exo's default "
              "(layers in proportion to RAM + usable VRAM); *even* gives every device the same "
              "number of layers; both put as many layers on a GPU as fit. *prima loop* is "
              "Halda with prima.cpp's case-assignment loop (with its calibration rule) instead "
              "of exact case variables. An infeasible baseline (over a device's disk room or "
              "VRAM) is marked.", "",
              "| cluster | model | Halda ms/token | k | devices used | memory-proportional | "
              "even | prima loop | Halda speed-up vs best baseline |",
              "|---|---|---:|---:|---|---:|---:|---:|---:|"]
    for r in cmp_rows:
        if "error" in r:
            lines.append(f"| {r['cluster']} | {r['model']} | no plan: {r['error']} | | | | | | |")
            continue
        p = r["planned"]
        halda_ms = p.result.prediction.total_ms
        base = {b.name: b for b in p.baselines}

        def fmt(b):
            return f"{b.prediction.total_ms:,.1f}" + ("" if not b.violations else " (infeasible)")

        best_base = min(b.prediction.total_ms for b in p.baselines if not b.violations) \
            if any(not b.violations for b in p.baselines) else float("nan")
        used = f"{sum(1 for x in p.result.split.w if x > 0)} of {r['n_devices']}"
        lines.append(f"| {r['cluster']} | {r['model']} | {halda_ms:,.1f} | {p.plan['k']} | "
                     f"{used} | {fmt(base['memory_proportional'])} | {fmt(base['even'])} | "
                     f"{r['loop_ms']:,.1f} | {best_base / halda_ms:.1f}x |")
    gaps = cases["gaps"]
    worse = [g for g in gaps if g > 1e-9]
    lines += ["", "## Exact OS cases vs prima.cpp's case loop", "",
              f"{len(gaps)} random clusters of 4-8 devices, 70B model: the loop's plan was worse "
              f"on {len(worse)} ({100 * len(worse) / max(1, len(gaps)):.0f} %)"
              + (f", by a median of {100 * statistics.median(worse):.0f} % and up to "
                 f"{100 * max(worse):.0f} %" if worse else "")
              + f"; it was never better (the property tests check this). Solve time: exact "
              f"median {statistics.median(cases['exact_s']):.2f} s, loop median "
              f"{statistics.median(cases['loop_s']):.2f} s (the loop repeats the k search per "
              "case assignment, with no binary case variables).", ""]
    lines += _published_section(cmp_rows)
    lines += ["## Plots", ""] + plot_links + [""]
    return "\n".join(lines)


def _published_section(cmp_rows) -> list[str]:
    home = {r["model"]: r for r in cmp_rows
            if r["cluster"] == "prima.cpp home cluster" and "planned" in r}
    out = ["## The published home cluster", "",
           "prima.cpp reports 674 ms/token for Llama-3-70B Q4_K on this cluster and 15 ms/token "
           "for Llama-3-8B (run on one device). Our device figures beyond the published RAM, "
           "disk and GPU numbers are guesses (planner/examples/prima-home-cluster.toml), the "
           "model profiles are synthetic pure-Q4_K, and our model has no prefetch overlap, so "
           "the comparison is of shape, not of value:", ""]
    for name, r in home.items():
        p = r["planned"].plan
        holders = [f"{x['device']} ({x['n_layers']} layers, {x['n_gpu_layers']} on GPU, "
                   f"{x['os_case']})" for x in p["ranks"] if x["n_layers"]]
        terms = ", ".join(f"{k} {v:,.0f}" for k, v in p["latency_ms"]["terms"].items())
        out.append(f"- {name}: {p['latency_ms']['per_token']:,.1f} ms/token predicted "
                   f"({terms} ms); layers on {'; '.join(holders)}; removed: "
                   f"{', '.join(x['device'] for x in p['removed']) or 'none'}.")
    return out + [""]


def write_home_plots(models) -> list[str]:
    devices = load_devices([HOME])
    links = []
    for model in models:
        planned = make_plan(devices, model, ctx=CTX)
        stem = "home-70b" if "70B" in model.name else "home-8b"
        write_plots(PLOTS / stem, [d.name for d in devices], planned.costs, planned.result,
                    planned.baselines, f"home cluster, {model.name}")
        for plot in ("layers", "memory", "latency", "objective_vs_k"):
            links.append(f"![{stem} {plot}](planner/{stem}/{plot}.png)")
    return links


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer random clusters")
    args = parser.parse_args(argv)
    m70 = llama_like("Llama-3-70B Q4_K", **LLAMA3_70B)
    m8 = llama_like("Llama-3-8B Q4_K", **LLAMA3_8B)
    seeds = QUICK_SEEDS if args.quick else SEEDS
    print(f"[bench] solve times, {seeds} clusters per size ...", file=sys.stderr)
    solve_rows = solve_times(m70, seeds)
    print("[bench] exact cases vs case loop ...", file=sys.stderr)
    cases = compare_cases(m70, 6 if args.quick else LOOP_SEEDS)
    print("[bench] comparisons and plots ...", file=sys.stderr)
    cmp_rows = comparisons([m8, m70])
    links = write_home_plots([m8, m70])
    report = render(solve_rows, cmp_rows, cases, links, args)
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
