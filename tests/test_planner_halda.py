"""Halda against brute force over the same latency model, on random small clusters."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from planner import latency
from planner.baselines import even, memory_proportional
from planner.cli import make_plan
from planner.halda import HaldaOptions, PlanError, divisors, halda
from planner.latency import Split
from planner.model_profile import llama_like
from planner.plan_file import check_plan
from planner.profiles import cluster_from_dict, load_devices, load_model_profile

EXAMPLES = Path(__file__).resolve().parents[1] / "planner" / "examples"
HOME = EXAMPLES / "prima-home-cluster.toml"


# ---------------------------------------------------------------------------------------------
# Random small clusters


def tiny_model(n_layers: int):
    return llama_like(f"tiny-{n_layers}", n_layers=n_layers, n_embd=256, n_ff=512, n_head=4,
                      n_head_kv=2, n_vocab=1024)


@st.composite
def clusters(draw, max_devices=3):
    n_layers = draw(st.integers(1, 12))
    model = tiny_model(n_layers)
    layer_gib = model.layer.n_bytes / latency.GIB
    ctx = draw(st.sampled_from([16, 256, 2048]))
    devices = [draw(device_entry(i, layer_gib, n_layers))
               for i in range(draw(st.integers(1, max_devices)))]
    doc = {"schema": "prima-ref/cluster", "schema_version": 1, "devices": devices}
    return cluster_from_dict(doc, "hypothesis"), model, ctx


def _speed(lo, hi):
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False)


@st.composite
def device_entry(draw, i, layer_gib, n_layers):
    os_name = draw(st.sampled_from(["linux", "macos", "android", "windows"]))
    # memory from "nothing" to "the whole model", so every OS case shows up
    entry = {"name": f"dev{i}", "os": os_name, "cpu_cores": 4,
             "cpu_gbps": draw(_speed(0.05, 50)), "cpu_gflops": draw(_speed(1, 500)),
             "ram_read_gbps": draw(_speed(0.05, 80)),
             "ram_avail_gib": draw(_speed(0, 1.5 * n_layers)) * layer_gib,
             "disk_seq_gbps": draw(_speed(0.001, 4)), "disk_rnd_gbps": draw(_speed(0.001, 1)),
             "disk_free_gib": draw(st.sampled_from([0.0, 2.0 * layer_gib, 100.0, 100.0])),
             "link_latency_ms": draw(_speed(0, 10)), "link_gbps": draw(_speed(0.001, 1))}
    if os_name == "android":
        entry["swappable_gib"] = draw(_speed(0, 2)) * layer_gib
    if draw(st.booleans()):  # the ring runtime's own work: a worker's per window, rank 0's
        entry["ring_window_ms"] = draw(_speed(0, 5))
        entry["ring_round_ms"] = draw(_speed(0, 5))
    gpu_kind = {"linux": "cuda", "windows": "cuda", "macos": "metal"}.get(os_name)
    if gpu_kind and draw(st.booleans()):
        reserve = latency.CUDA_RESERVE_GIB if gpu_kind == "cuda" else latency.METAL_RESERVE_GIB
        entry["gpu"] = {"kind": gpu_kind,
                        "vram_free_gib": reserve + draw(_speed(0, n_layers)) * layer_gib,
                        "bandwidth_gbps": draw(_speed(0.1, 900)),
                        "gpu_gbps": draw(_speed(0.1, 700)), "gpu_gflops": draw(_speed(1, 1e4))}
    return entry


def brute_force(costs, fixed, n_layers, required=frozenset(), master_priority=1.0,
                forced_k=None):
    """Every integer split of every k: the optimum objective and its split, or (None, None)."""
    best, best_split = None, None
    for k in [forced_k] if forced_k else divisors(n_layers):
        W = n_layers // k
        for w in _compositions(W, len(costs)):
            if any(w[i] < 1 for i in required):
                continue
            ranges = [range(wi + 1) if c.has_gpu else range(1)
                      for c, wi in zip(costs, w, strict=True)]
            for n in itertools.product(*ranges):
                split = Split(k, w, tuple(n))
                if latency.violations(costs, split, n_layers, required):
                    continue
                value = latency.objective(costs, split, fixed, master_priority)
                if best is None or value < best:
                    best, best_split = value, split
    return best, best_split


def _compositions(total, parts):
    if parts == 1:
        yield (total,)
        return
    for first in range(total + 1):
        for rest in _compositions(total - first, parts - 1):
            yield (first, *rest)


def _solve(devices, model, ctx, **kw):
    costs = latency.device_costs(devices, model, ctx)
    fixed = latency.fixed_ms(devices[0], model)
    try:
        return costs, fixed, halda(costs, fixed, model.n_layers, HaldaOptions(**kw))
    except PlanError:
        return costs, fixed, None


def _close(a, b):
    return abs(a - b) <= 1e-6 * max(1.0, abs(a), abs(b))


PROPERTY = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------------------------
# Properties


@PROPERTY
@given(clusters(), st.sampled_from([1.0, 1.3]), st.integers(0, 5))
def test_ilp_plan_equals_brute_force_optimum(case, master_priority, k_choice):
    devices, model, ctx = case
    ks = divisors(model.n_layers)
    k = ks[k_choice % len(ks)] if k_choice else None  # None: search every k
    costs, fixed, result = _solve(devices, model, ctx, master_priority=master_priority, k=k)
    best, best_split = brute_force(costs, fixed, model.n_layers, master_priority=master_priority,
                                   forced_k=k)
    if best is None:
        assert result is None, f"ILP found {result.split} where no split is valid"
        return
    assert result is not None, f"ILP found no plan; brute force found {best_split}"
    got = latency.objective(costs, result.split, fixed, master_priority)
    assert _close(got, best), f"ILP {result.split} -> {got}, brute force {best_split} -> {best}"


@PROPERTY
@given(clusters(), st.booleans())
def test_every_constraint_holds_in_every_returned_plan(case, keep_all):
    devices, model, ctx = case
    required = frozenset(range(len(devices))) if keep_all else frozenset()
    costs, fixed, result = _solve(devices, model, ctx, required=required)
    if result is None:
        assert brute_force(costs, fixed, model.n_layers, required)[0] is None
        return
    assert latency.violations(costs, result.split, model.n_layers, required) == []
    planned = make_plan(devices, model, ctx=ctx, keep_all=keep_all)
    assert check_plan(planned.plan) == []
    assert json.loads(json.dumps(planned.plan)) == planned.plan  # plain JSON, no NaN


@PROPERTY
@given(clusters())
def test_a_device_is_removed_only_when_that_lowers_predicted_latency(case):
    devices, model, ctx = case
    costs, fixed, result = _solve(devices, model, ctx)
    if result is None:
        return
    active = {i for i, w in enumerate(result.split.w) if w > 0 and i > 0}
    for removed in set(range(1, len(devices))) - active:
        _, _, kept = _solve(devices, model, ctx, required=frozenset(active | {removed}))
        if kept is not None:
            assert result.prediction.total_ms < kept.prediction.total_ms, (
                f"dropping {devices[removed].name} does not lower latency")


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(clusters())
def test_same_input_gives_the_same_plan(case):
    devices, model, ctx = case
    try:
        first = make_plan(devices, model, ctx=ctx).plan
    except PlanError:
        with pytest.raises(PlanError):
            make_plan(devices, model, ctx=ctx)
        return
    second = make_plan(devices, model, ctx=ctx).plan
    for plan in (first, second):
        plan["solver"].pop("time_s")
    assert first == second


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(clusters())
def test_prima_case_loop_is_never_better_than_exact_cases(case):
    devices, model, ctx = case
    costs, fixed, exact = _solve(devices, model, ctx)
    _, _, loop = _solve(devices, model, ctx, cases="loop")
    if loop is not None:
        assert exact is not None
        assert latency.violations(costs, loop.split, model.n_layers) == []
        assert exact.objective <= loop.objective + 1e-6 * max(1.0, abs(loop.objective))


# ---------------------------------------------------------------------------------------------
# The published home cluster


@pytest.fixture(scope="module")
def home():
    return load_devices([HOME])


def test_home_cluster_runs_an_8b_model_on_one_device(home):
    model = load_model_profile(EXAMPLES / "llama3-8b-q4k.model.json")
    planned = make_plan(home, model, ctx=4096)
    holders = [r["device"] for r in planned.plan["ranks"] if r["n_layers"] > 0]
    assert holders == ["desktop-2080ti"]
    assert planned.plan["ranks"][0]["device"] == "mac-m1"  # rank 0 keeps tokenizer, sampling
    assert {r["device"] for r in planned.plan["removed"]} == {"laptop-3070", "phone-kirin9000"}
    kept = make_plan(home, model, ctx=4096, keep_all=True)
    assert kept.result.prediction.total_ms > planned.result.prediction.total_ms


def test_home_cluster_runs_a_70b_model_on_all_four_devices(home):
    model = load_model_profile(EXAMPLES / "llama3-70b-q4k.model.json")
    planned = make_plan(home, model, ctx=4096)
    assert [r["n_layers"] > 0 for r in planned.plan["ranks"]] == [True] * 4
    assert planned.plan["removed"] == []
    halda_ms = planned.result.prediction.total_ms
    for b in planned.baselines:
        assert halda_ms < b.prediction.total_ms, b.name


def test_impossible_cluster_says_how_much_memory_is_missing(home):
    model = load_model_profile(EXAMPLES / "llama3-70b-q4k.model.json")
    doc = {"schema": "prima-ref/cluster", "schema_version": 1, "devices": [
        {"name": "small", "os": "linux", "cpu_cores": 4, "cpu_gbps": 10, "cpu_gflops": 100,
         "ram_read_gbps": 20, "ram_avail_gib": 8, "disk_seq_gbps": 1, "disk_rnd_gbps": 0.2,
         "disk_free_gib": 4, "link_latency_ms": 1, "link_gbps": 0.1}]}
    with pytest.raises(PlanError, match=r"model needs 3\d\.\d GiB .* the cluster offers "
                                        r"12\.0 GiB of RAM, VRAM and disk budget"):
        make_plan(cluster_from_dict(doc, "x"), model, ctx=4096)


def test_forced_k_must_divide_the_layer_count(home):
    model = load_model_profile(EXAMPLES / "llama3-70b-q4k.model.json")
    with pytest.raises(PlanError, match=r"-k 3 does not divide the model's 80 layers"):
        make_plan(home, model, options=HaldaOptions(k=3))
    planned = make_plan(home, model, options=HaldaOptions(k=4))
    assert planned.plan["k"] == 4 and all(len(r["layers"]) == 4 for r in planned.plan["ranks"])


def test_baselines_split_every_layer():
    devices = load_devices([HOME])
    costs = latency.device_costs(devices, tiny_model(7), 64)
    for split in (memory_proportional(costs, 7), even(costs, 7)):
        assert sum(split.w) == 7 and all(n <= w for n, w in zip(split.n, split.w, strict=True))
    assert even(costs, 7).w == (2, 2, 2, 1)
