"""Halda: the layer split that minimises predicted token latency, one small ILP per k.

For a fixed number of rounds k (a divisor of the layer count L, so W = L/k), the latency model
of latency.py is linear in the integer window sizes w_m and GPU layers n_m once three
piecewise parts get their own variables:

    y_m  binary   device m (not rank 0) keeps layers; removal is decided inside the ILP, so a
                  device is dropped exactly when that lowers the latency (rank 0 stays in the
                  ring for tokenizer, embedding, output and sampling, and may hold no layers)
    r_m  GiB >= 0 re-read from disk per token: r_m >= need_m - budget_m (linux, android,
                  windows: only the overflow); macOS re-reads everything mapped once it
                  overflows, so it also gets
    s_m  binary   "over its RAM budget": need_m - budget_m <= bigM * s_m and
                  r_m >= mapped_m - bigM * (1 - s_m)
    u    [0, 1]   rank 0 sends hops only when another device holds layers: u >= y_m

    minimise  sum_m k*cpu_m*w_m + k*(gpu_m - cpu_m)*n_m + disk_m*r_m + k*hop_m*y_m
              + k*hop_0*u + fixed - bonus*sum y_m
    (hop_m: one window's hop, network + the ring runtime's CPU work per window on worker m;
    hop_0: rank 0's, per round; latency.hop_ms)
    windows_sum           sum_m w_m = W
    gpu_in_window_devM    n_m <= w_m
    vram_cap_devM         k*(layer+kv)*n_m <= usable VRAM
    active_devM           y_m <= w_m <= W*y_m
    disk_room_devM        need_m - budget_m <= disk room

With these, every case assignment (prima.cpp's sets M1-M4) is a choice the solver makes, so the
optimum over a k is exact. `cases="loop"` instead runs prima.cpp's set-assignment loop: fix each
device's case, solve with the case pinned (ram_cap_devM or ram_spill_devM rows), re-assign the
cases from the solution, and repeat until they stop changing; it can stop at a worse plan, which
bench/plan.py measures. The search keeps the best k; ties go to the smaller k.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pulp

from planner import latency
from planner.latency import DeviceCost, Split

STATUS_OK = ("Optimal", "Feasible")
MAX_CASE_ITERATIONS = 20
SOLVERS = ("cbc", "highs")


class PlanError(ValueError):
    """No plan exists; the message says why and what to do."""


class SolverUnavailable(PlanError):
    """The requested solver is not installed."""


@dataclass(frozen=True)
class HaldaOptions:
    k: int | None = None  # force this many rounds
    required: frozenset[int] = frozenset()  # device indices that must keep >= 1 layer
    master_priority: float = 1.0  # > 1 favours rank 0 (prima.cpp uses 1.01)
    solver: str = "cbc"
    time_limit_s: float | None = None  # per ILP
    cases: str = "exact"  # or "loop": prima.cpp's set-assignment iteration
    dump_lp_dir: Path | None = None


@dataclass(frozen=True)
class IlpData:
    """The numbers one ILP is built from."""

    costs: list[DeviceCost]
    fixed_ms: float
    n_layers: int
    k: int
    required: frozenset[int]
    master_priority: float
    pinned_cases: tuple[str, ...] | None = None  # loop mode: each device's case, fixed

    @property
    def windows(self) -> int:
        return self.n_layers // self.k


@dataclass
class IlpVars:
    w: list[pulp.LpVariable]
    n: list[pulp.LpVariable | None]
    y: list[pulp.LpVariable | None]  # None: always active (rank 0 or required)
    r: list[pulp.LpVariable | None]  # None: the device can never overflow its RAM
    s: list[pulp.LpVariable | None]
    u: pulp.LpVariable | None


@dataclass(frozen=True)
class KResult:
    k: int
    status: str
    objective: float | None
    split: Split | None
    solve_s: float


@dataclass
class HaldaResult:
    split: Split
    prediction: latency.Prediction
    objective: float
    status: str
    solve_s: float
    n_ilps: int
    by_k: list[KResult] = field(default_factory=list)
    case_iterations: int = 1  # loop mode: how many case assignments were solved


# ---------------------------------------------------------------------------------------------
# build_problem


def build_problem(data: IlpData) -> tuple[pulp.LpProblem, IlpVars]:
    prob = pulp.LpProblem(f"halda_k{data.k}", pulp.LpMinimize)
    v = _variables(data, prob)
    prob += _objective(data, v), "token_latency_ms"
    prob += pulp.lpSum(v.w) == data.windows, "windows_sum"
    for i, c in enumerate(data.costs):
        for name, row in _device_rows(data, v, i, c):
            prob += row, f"{name}_dev{i}"
    if v.u is not None:
        for i, y in enumerate(v.y):
            if y is not None:
                prob += v.u >= y, f"ring_peers_dev{i}"
    return prob, v


def _variables(data: IlpData, prob: pulp.LpProblem) -> IlpVars:
    W, M = data.windows, len(data.costs)
    v = IlpVars(w=[], n=[], y=[], r=[], s=[], u=None)
    var = _variable_maker(prob)
    for i, c in enumerate(data.costs):
        keep = i in data.required
        v.w.append(var(f"w_{i}", 1 if keep else 0, W, "Integer"))
        v.n.append(var(f"n_{i}", 0, W, "Integer") if c.has_gpu else None)
        v.y.append(None if (i == 0 or keep) else var(f"y_{i}", 0, 1, "Binary"))
        may_spill = _max_over_gib(data, c) > 0
        v.r.append(var(f"r_{i}", 0, None, "Continuous") if may_spill else None)
        exact_jump = may_spill and c.unified and data.pinned_cases is None
        v.s.append(var(f"s_{i}", 0, 1, "Binary") if exact_jump else None)
    others_required = any(i in data.required for i in range(1, M))
    if M > 1:
        v.u = var("u", 1 if others_required else 0, 1, "Continuous")
    return v


def _variable_maker(prob: pulp.LpProblem):
    """PuLP >= 3.3 attaches variables to the problem; older PuLP creates them free-standing."""
    if hasattr(prob, "add_variable"):
        return lambda name, low, up, cat: prob.add_variable(name, low, up, cat=cat)
    return lambda name, low, up, cat: pulp.LpVariable(name, low, up, cat=cat)


def _max_over_gib(data: IlpData, c: DeviceCost) -> float:
    return latency.ram_need_gib(c, data.k, data.windows, 0) - c.ram_budget_gib


def _objective(data: IlpData, v: IlpVars):
    k, terms = data.k, []
    for i, c in enumerate(data.costs):
        scale = 1.0 / data.master_priority if i == 0 else 1.0
        terms.append(k * c.cpu_layer_ms * scale * v.w[i])
        if v.n[i] is not None:
            terms.append(k * (c.gpu_layer_ms - c.cpu_layer_ms) * scale * v.n[i])
        if v.r[i] is not None:
            terms.append(c.disk_ms_per_gib * v.r[i])
        if i > 0:
            active = v.y[i] if v.y[i] is not None else 1
            terms.append((k * c.hop_ms - latency.ACTIVE_BONUS_MS) * active)
    if v.u is not None:
        terms.append(k * data.costs[0].hop_ms * v.u)
    return pulp.lpSum(terms) + data.fixed_ms


def _need_gib(data: IlpData, v: IlpVars, i: int, c: DeviceCost):
    """RAM the device needs, as an expression: its layers' weights and KV, head, buffers."""
    in_ram = v.w[i] if (c.unified or v.n[i] is None) else v.w[i] - v.n[i]
    active = v.y[i] if v.y[i] is not None else 1
    return data.k * c.layer_need_gib * in_ram + c.head_gib + c.buffers_gib * active


def _device_rows(data: IlpData, v: IlpVars, i: int, c: DeviceCost):
    k, W = data.k, data.windows
    if v.n[i] is not None:
        yield "gpu_in_window", v.n[i] <= v.w[i]
        yield "vram_cap", k * c.layer_need_gib * v.n[i] <= c.vram_budget_gib
    if v.y[i] is not None:
        yield "active_max", v.w[i] <= W * v.y[i]
        yield "active_min", v.w[i] >= v.y[i]
    if v.r[i] is None:
        return
    need = _need_gib(data, v, i, c)
    yield "disk_room", need <= c.ram_budget_gib + c.disk_room_gib
    if data.pinned_cases is not None:
        yield from _pinned_rows(data, v, i, c, need)
    elif c.unified:
        big_need = _max_over_gib(data, c)
        mapped = k * c.layer_gib * v.w[i] + c.head_gib
        big_mapped = k * c.layer_gib * W + c.head_gib
        yield "ram_cap", need - big_need * v.s[i] <= c.ram_budget_gib
        yield "reread_all", v.r[i] >= mapped - big_mapped * (1 - v.s[i])
    else:
        yield "reread_overflow", v.r[i] >= need - c.ram_budget_gib


def _pinned_rows(data: IlpData, v: IlpVars, i: int, c: DeviceCost, need):
    """Loop mode: the device's case is data; rows keep it in the regime its cost assumes."""
    if data.pinned_cases[i] == "M4":
        yield "ram_cap", need <= c.ram_budget_gib
        yield "no_reread", v.r[i] <= 0
        return
    yield "ram_spill", need >= c.ram_budget_gib
    if c.unified:
        yield "reread_all", v.r[i] >= data.k * c.layer_gib * v.w[i] + c.head_gib
    else:
        yield "reread_overflow", v.r[i] >= need - c.ram_budget_gib


# ---------------------------------------------------------------------------------------------
# solve


def make_solver(name: str, time_limit_s: float | None):
    if name == "cbc":
        coin = pulp.COIN_CMD(msg=False, timeLimit=time_limit_s, threads=1)
        if coin.available():
            return coin
        with warnings.catch_warnings():  # PuLP 3.3 deprecates the bundled CBC it still ships
            warnings.simplefilter("ignore", DeprecationWarning)
            return pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit_s, threads=1)
    if name == "highs":
        solver = pulp.HiGHS(msg=False, timeLimit=time_limit_s)
        if not solver.available():
            raise SolverUnavailable("--solver highs needs the 'highspy' package (pip install "
                                    "highspy); PuLP's bundled CBC needs nothing: --solver cbc")
        return solver
    raise SolverUnavailable(f"unknown solver {name!r}; choose one of {', '.join(SOLVERS)}")


def solve(prob: pulp.LpProblem, solver) -> tuple[str, float]:
    """Solve; return a status word ("Optimal", "Feasible", "Infeasible", ...) and seconds."""
    start = time.perf_counter()
    prob.solve(solver)
    seconds = time.perf_counter() - start
    if prob.sol_status == pulp.LpSolutionOptimal:
        return "Optimal", seconds
    if prob.sol_status == pulp.LpSolutionIntegerFeasible:
        return "Feasible", seconds  # stopped by the time limit with a solution in hand
    return pulp.LpStatus.get(prob.status, "Undefined"), seconds


# ---------------------------------------------------------------------------------------------
# extract_plan


def extract_split(data: IlpData, v: IlpVars) -> Split:
    w = tuple(int(round(x.value())) for x in v.w)
    n = tuple(int(round(x.value())) if x is not None else 0 for x in v.n)
    return Split(k=data.k, w=w, n=n)


def _check_against_model(data: IlpData, split: Split, ilp_value: float) -> None:
    model_value = latency.objective(data.costs, split, data.fixed_ms, data.master_priority)
    if abs(model_value - ilp_value) > 1e-6 * max(1.0, abs(model_value)):
        raise RuntimeError(f"internal: ILP objective {ilp_value} != latency model {model_value} "
                           f"for {split}; the linearisation in halda.py is wrong")


# ---------------------------------------------------------------------------------------------
# The search over k (and, in loop mode, over case assignments)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def solve_k(data: IlpData, options: HaldaOptions, solver, tag: str = "") -> KResult:
    if data.windows < len(data.required):
        return KResult(data.k, "Skipped", None, None, 0.0)  # fewer windows than kept devices
    prob, v = build_problem(data)
    if options.dump_lp_dir is not None:
        options.dump_lp_dir.mkdir(parents=True, exist_ok=True)
        prob.writeLP(str(options.dump_lp_dir / f"halda_k{data.k}{tag}.lp"))
    status, seconds = solve(prob, solver)
    if status not in STATUS_OK:
        return KResult(data.k, status, None, None, seconds)
    split = extract_split(data, v)
    value = pulp.value(prob.objective)
    if status == "Optimal" and data.pinned_cases is None:
        _check_against_model(data, split, value)
    return KResult(data.k, status, value, split, seconds)


def search_k(costs, fixed, n_layers, options, solver, pinned=None, tag="") -> list[KResult]:
    ks = [options.k] if options.k else divisors(n_layers)
    return [solve_k(IlpData(costs, fixed, n_layers, k, options.required,
                            options.master_priority, pinned), options, solver, tag)
            for k in ks]


def best_of(results: list[KResult]) -> KResult | None:
    best = None
    for r in results:  # ascending k: a larger k must be strictly better to win
        if r.split is not None and (best is None or r.objective < best.objective - 1e-9 * max(
                1.0, abs(best.objective))):
            best = r
    return best


def halda(costs: list[DeviceCost], fixed: float, n_layers: int,
          options: HaldaOptions) -> HaldaResult:
    if options.k is not None and (options.k < 1 or n_layers % options.k):
        raise PlanError(f"-k {options.k} does not divide the model's {n_layers} layers; "
                        f"choose one of {divisors(n_layers)}")
    solver = make_solver(options.solver, options.time_limit_s)
    if options.cases == "loop":
        by_k, every = _case_loop(costs, fixed, n_layers, options, solver)
    else:
        by_k = search_k(costs, fixed, n_layers, options, solver)
        every = [by_k]
    best = best_of(by_k)
    if best is None:
        raise PlanError(_no_plan_message(costs, n_layers, by_k, options))
    solved = [r for results in every for r in results]
    return HaldaResult(split=best.split, prediction=latency.predict(costs, best.split, fixed),
                       objective=best.objective, status=best.status,
                       solve_s=sum(r.solve_s for r in solved), n_ilps=len(solved), by_k=by_k,
                       case_iterations=len(every))


def _case_loop(costs, fixed, n_layers, options, solver):
    """prima.cpp's fixed point: assign cases, solve, re-assign from the best plan, repeat.

    Includes prima.cpp's calibration rule: while a GPU has room and some device still runs
    layers off its GPU or re-reads from disk, force the slowest-disk device that still spills
    into M4. Returns the per-k results of the best iteration and those of every iteration.
    """
    from planner.baselines import memory_proportional

    cases, forced = _cases(costs, memory_proportional(costs, n_layers)), set()
    every, kept = [], None
    for it in range(1, MAX_CASE_ITERATIONS + 1):
        results = search_k(costs, fixed, n_layers, options, solver, cases, f"_iter{it}")
        every.append(results)
        best = best_of(results)
        if best is None:  # roll back to the last solvable assignment, as prima.cpp does
            break
        if kept is None or best.objective < best_of(kept).objective:
            kept = results
        to_force = _calibration_target(costs, best.split, cases, forced)
        if to_force is not None:
            forced.add(to_force)
        new_cases = _cases(costs, best.split, forced)
        if new_cases == cases:
            break
        cases = new_cases
    return (kept if kept is not None else every[-1]), every


def _calibration_target(costs, split: Split, cases, forced) -> int | None:
    gpu_cap = [int(c.vram_budget_gib / (split.k * c.layer_need_gib) + 1e-9) if c.has_gpu else 0
               for c in costs]
    weak = any(w == 1 and n == 0 for w, n in zip(split.w, split.n, strict=True))
    free_gpu = any(c.has_gpu and split.n[i] < gpu_cap[i] for i, c in enumerate(costs))
    gpu_overload = any(c.has_gpu and split.w[i] > split.n[i] for i, c in enumerate(costs))
    cpu_overload = any(not c.has_gpu and cases[i] != "M4" for i, c in enumerate(costs))
    if weak or not free_gpu or not (gpu_overload or cpu_overload):
        return None
    spilling = [i for i in range(len(costs)) if cases[i] != "M4" and i not in forced]
    if not spilling:
        return None
    return max(spilling, key=lambda i: (costs[i].disk_ms_per_gib, -i))  # slowest disk


def _cases(costs: list[DeviceCost], split: Split, forced=frozenset()) -> tuple[str, ...]:
    return tuple("M4" if i in forced else latency.case_of(c, split.k, split.w[i], split.n[i])
                 for i, c in enumerate(costs))


def _no_plan_message(costs, n_layers, by_k, options) -> str:
    need, offer = latency.need_gib(costs, n_layers), latency.capacity_gib(costs)
    total_need, total_offer = sum(need.values()), sum(offer.values())
    if total_need > total_offer:
        return (f"model needs {total_need:.1f} GiB (weights {need['weights']:.1f} + KV cache "
                f"{need['kv']:.1f} at this context); the cluster offers {total_offer:.1f} GiB "
                f"of RAM, VRAM and disk budget (RAM {offer['ram']:.1f}, VRAM {offer['vram']:.1f},"
                f" disk {offer['disk']:.1f}); add a device or use a smaller quant or context")
    tried = ", ".join(f"k={r.k}: {r.status}" for r in by_k)
    hint = ""
    if options.required:
        hint = "; --keep-all forces every device to hold a layer: try without it"
    return (f"no split fits although the cluster's total memory would ({total_need:.1f} of "
            f"{total_offer:.1f} GiB): one device's share cannot fit its RAM, VRAM or disk room "
            f"({tried}){hint}")
