"""prima-plan: device profiles + a model -> the best split, a plan file, a table and plots.

    prima-plan -d profiles/ -m model.gguf -c 4096 -o plan.json --plot plots/
    prima-plan -d planner/examples/prima-home-cluster.toml \
               -m planner/examples/llama3-70b-q4k.model.json

Exit status: 0 plan written; 1 no plan fits the cluster (the message says why); 2 bad input.
Logs go to stderr prefixed "[plan]"; the summary table goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from planner import baselines, latency
from planner.halda import SOLVERS, HaldaOptions, HaldaResult, PlanError, SolverUnavailable, halda
from planner.model_profile import load_model
from planner.plan_file import Baseline, build_plan, ring_ranks
from planner.profiles import DeviceProfile, ModelProfile, ProfileError, load_devices

# Defaults, one line of reason each.
DEFAULT_CTX = 4096  # llama.cpp's usual -c; the KV cache is always counted (prima ignores it at 0)
DEFAULT_N_PREDICT = 128  # only scales the reported generation time
DEFAULT_TIME_LIMIT_S = 60.0  # per ILP: a stuck solve returns its best split instead of hanging
DEFAULT_MASTER_PRIORITY = 1.0  # neutral, so the objective is the predicted latency (prima: 1.01)
DEFAULT_OUTPUT = "plan.json"


@dataclass
class Planned:
    plan: dict
    costs: list[latency.DeviceCost]
    result: HaldaResult
    baselines: list[Baseline]


def make_plan(devices: list[DeviceProfile], model: ModelProfile, *, ctx: int = DEFAULT_CTX,
              n_predict: int = DEFAULT_N_PREDICT, keep_all: bool = False,
              options: HaldaOptions | None = None) -> Planned:
    """The whole pipeline without I/O: costs, Halda, baselines, plan document."""
    options = options or HaldaOptions()
    if keep_all:
        options = replace(options, required=frozenset(range(len(devices))))
    costs = latency.device_costs(devices, model, ctx)
    fixed = latency.fixed_ms(devices[0], model)
    result = halda(costs, fixed, model.n_layers, options)
    compare = [_baseline(name, fn(costs, model.n_layers), costs, fixed, model.n_layers)
               for name, fn in (("memory_proportional", baselines.memory_proportional),
                                ("even", baselines.even))]
    solver_info = {"name": options.solver, "case_mode": options.cases,
                   "master_priority": options.master_priority, "keep_all": keep_all,
                   "forced_k": options.k, "time_limit_s": options.time_limit_s}
    plan = build_plan(devices, model, costs, result, ctx=ctx, n_predict=n_predict,
                      options=solver_info, baselines=compare)
    return Planned(plan, costs, result, compare)


def _baseline(name, split, costs, fixed, n_layers) -> Baseline:
    return Baseline(name, split, latency.predict(costs, split, fixed),
                    latency.violations(costs, split, n_layers))


# ---------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="prima-plan", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", "--devices", nargs="+", required=True, metavar="PATH",
                   help="device profiles (files or folders, rank 0 first) or a what-if "
                        "cluster file (.json/.toml)")
    p.add_argument("-m", "--model", required=True, help="GGUF file or model-profile JSON")
    p.add_argument("-c", "--ctx-size", type=int, default=DEFAULT_CTX, help="context length")
    p.add_argument("-n", "--n-predict", type=int, default=DEFAULT_N_PREDICT,
                   help="tokens to generate (for the reported generation time)")
    p.add_argument("-k", type=int, default=None, help="force this many rounds per token")
    p.add_argument("--time-limit", type=float, default=DEFAULT_TIME_LIMIT_S,
                   help="seconds per ILP solve")
    p.add_argument("--solver", choices=SOLVERS, default="cbc",
                   help="cbc (bundled with PuLP) or highs (needs highspy)")
    p.add_argument("--master-priority", type=float, default=DEFAULT_MASTER_PRIORITY,
                   help="> 1 favours rank 0 (its layer cost is divided by this)")
    p.add_argument("--keep-all", action="store_true", help="never remove a device")
    p.add_argument("--cases", choices=("exact", "loop"), default="exact",
                   help="exact: OS cases are ILP variables; loop: prima.cpp's fixed-point")
    p.add_argument("--dump-lp", type=Path, default=None, metavar="DIR",
                   help="write every ILP as an .lp file here")
    p.add_argument("-o", "--output", type=Path, default=Path(DEFAULT_OUTPUT),
                   help="plan file to write")
    p.add_argument("--plot", type=Path, default=None, metavar="DIR",
                   help="write PNG and SVG plots here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _check_args(args)
        devices = load_devices(args.devices)
        log(f"{len(devices)} devices: {', '.join(d.name for d in devices)} (rank 0: "
            f"{devices[0].name})")
        model = load_model(args.model)
        log(f"model {model.name}: {model.n_layers} layers, {model.total_bytes / latency.GIB:.2f}"
            f" GiB" + (f", sha256 {model.sha256[:12]}" if model.sha256 else ""))
        options = HaldaOptions(k=args.k, master_priority=args.master_priority,
                               solver=args.solver, time_limit_s=args.time_limit,
                               cases=args.cases, dump_lp_dir=args.dump_lp)
        planned = make_plan(devices, model, ctx=args.ctx_size, n_predict=args.n_predict,
                            keep_all=args.keep_all, options=options)
    except (ProfileError, SolverUnavailable) as e:
        log(f"error: {e}")
        return 2
    except PlanError as e:
        log(f"no plan: {e}")
        return 1
    _write_outputs(args, devices, model, planned)
    return 0


def _check_args(args) -> None:
    if args.ctx_size < 1:
        raise ProfileError(f"-c/--ctx-size must be >= 1, found {args.ctx_size}")
    if args.n_predict < 0:
        raise ProfileError(f"-n/--n-predict must be >= 0, found {args.n_predict}")
    if args.master_priority <= 0:
        raise ProfileError(f"--master-priority must be > 0, found {args.master_priority}")
    if args.time_limit is not None and args.time_limit <= 0:
        raise ProfileError(f"--time-limit must be > 0 seconds, found {args.time_limit}")


def _write_outputs(args, devices, model, planned: Planned) -> None:
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(planned.plan, indent=2) + "\n")
    log(f"wrote {args.output}")
    print(summary_table(planned, devices))
    if args.plot is not None:
        from planner.plots import write_plots

        paths = write_plots(args.plot, [d.name for d in devices], planned.costs, planned.result,
                            planned.baselines, model.name)
        log(f"wrote {len(paths)} plots to {args.plot}")
    if args.dump_lp is not None:
        log(f"wrote {planned.result.n_ilps} .lp files to {args.dump_lp}")


def summary_table(planned: Planned, devices: list[DeviceProfile]) -> str:
    plan, result = planned.plan, planned.result
    head = (f"{'rank':>4}  {'device':<18} {'os':<8} {'case':<4} {'window':>6} {'gpu':>4} "
            f"{'layers':>6} {'RAM need/avail GiB':>19} {'re-read GiB':>11} {'ms/token':>9}")
    lines = [f"k={plan['k']} rounds, {plan['layers_per_round']} layers per round, "
             f"ctx {plan['ctx']}", head, "-" * len(head)]
    for r in plan["ranks"]:
        ram = f"{r['ram_need_gib']:.2f}/{r['ram_budget_gib']:.2f}"
        lines.append(f"{r['rank']:>4}  {r['device']:<18} {r['os']:<8} {r['os_case']:<4} "
                     f"{r['window']:>6} {r['gpu_layers_per_window']:>4} {r['n_layers']:>6} "
                     f"{ram:>19} {r['reread_gib_per_token']:>11.2f} "
                     f"{r['latency_ms']['total']:>9.1f}")
    for r in plan["removed"]:
        lines.append(f"{'-':>4}  {r['device']:<18} removed: {r['reason']}")
    t = plan["latency_ms"]
    terms = ", ".join(f"{k} {v:.1f}" for k, v in t["terms"].items())
    lines.append(f"predicted {t['per_token']:.1f} ms/token ({t['tokens_per_s']:.2f} tok/s): "
                 f"{terms}")
    for name, b in plan["baselines"].items():
        note = "" if b["feasible"] else " (violates memory limits)"
        lines.append(f"  vs {name}: {b['latency_ms']:.1f} ms/token{note}")
    active = len(ring_ranks(result.split))
    lines.append(f"solver {plan['solver']['name']}: {result.status}, {result.n_ilps} ILPs in "
                 f"{result.solve_s:.2f} s, {active} of {len(devices)} devices in the ring")
    return "\n".join(lines)


def log(message: str) -> None:
    print(f"[plan] {message}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
