"""Ring benchmark on loopback: decode speed for 1, 2 and 4 ranks, per-hop overhead, and the
measured token latency next to the planner's prediction for the same plan.

Writes reports/ring.md (and prints it).

    .venv/bin/python bench/ring.py            # about two minutes on 2 cores
    .venv/bin/python bench/ring.py --quick    # fewer tokens and probes
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("GOMP_SPINCOUNT", "0")  # ranks share the cores: no idle spinning (cli.py)
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import prima_ref  # noqa: E402,F401
from bench._common import machine_lines, write_report  # noqa: E402
from prima_ref import fetch  # noqa: E402
from prima_ref.ring import protocol as P  # noqa: E402

# Defaults, each with its reason
# SmolLM2's 30 layers: k=1 near-even for 1, 2 and 4 ranks, and one k=3 ring (hops x 3)
SPLITS = {"1": [30], "2": [15, 15], "4": [8, 8, 7, 7], "2, k=3": [5, 5]}
N_LAYERS = 30
N_PREDICT = 64  # enough decode steps for a stable median per token
REPEATS = 3  # measured generations per split (after a warm-up); the median is reported
PROMPT = "Once upon a time, in a small village by the sea, there lived"
CTX = 512
THREADS = 1  # one thread per rank: the ranks share 2 cores and take turns
PROBES = 500  # round trips per payload size for the hop overhead
HOP_FLOATS = (576, 3584)  # SmolLM2's n_embd, and the issue's 3584-float activation (Qwen2-7B)
SAMPLING = {"seed": 0}  # prima-cli's default chain (temp 0.8, top-k 40, ...), seeded: what the
# planner prices; the same logits give the same tokens, so ring runs still compare to 1 rank


def decode_run(model, sizes, n_predict) -> dict:
    from prima_ref.engine import Engine
    from prima_ref.ring.launch import LocalRing
    from prima_ref.ring.topology import Layout, RingOptions, load_plan, make_plan
    from prima_ref.sampling import Sampler, SamplingParams
    from tests.ring_helpers import free_port_base

    pids: list[int] = []  # the workers, whose CPU time counts too

    def generate(engine):
        ids = engine.tokenizer.encode(PROMPT, add_special=True, parse_special=True)
        engine.eval(ids)  # the prompt first, so the CPU time below is decode's
        cpu0 = _cpu_s(pids)
        out, t = engine.generate(ids, n_predict, Sampler(SamplingParams(**SAMPLING)),
                                 on_text=_emit)
        cpu_s = _cpu_s(pids) - cpu0
        return {"tokens": out, "ms_per_token": t.eval_ms / max(t.eval_tokens, 1),
                # decode's forwards plus the last prompt token's, each with its sampling
                "cpu_ms_per_token": cpu_s * 1e3 / (t.eval_tokens + 1),
                "eval_tps": t.eval_tps, "prompt_ms": t.prompt_ms,
                "mean_ctx": len(ids) + t.eval_tokens / 2}

    def measured(engine) -> dict:
        generate(engine)  # warm-up: compiled kernels loaded, pages in
        runs = [generate(engine) for _ in range(REPEATS)]
        if any(r["tokens"] != runs[0]["tokens"] for r in runs):
            raise RuntimeError(f"{sizes}: repeated runs gave different tokens")
        res = sorted(runs, key=lambda r: r["ms_per_token"])[len(runs) // 2]  # the median run
        return {**res, "ms_all": [r["ms_per_token"] for r in runs], "load": os.getloadavg()[0]}

    if len(sizes) == 1:
        return measured(Engine(model, n_ctx=CTX))
    layout = Layout.from_window_sizes(sizes, N_LAYERS)
    tmp = Path(tempfile.mkdtemp(prefix="bench-ring-"))
    plan = make_plan(model, layout, ctx=CTX, data_port=free_port_base(len(sizes)),
                     signal_port=free_port_base(len(sizes)))
    (tmp / "plan.json").write_text(json.dumps(plan))
    p = load_plan(tmp / "plan.json")
    with LocalRing(model, tmp / "plan.json", worker_args=["-t", str(THREADS)], log_dir=tmp) as ring:
        pids[:] = [p.pid for p in ring.procs.values()]
        engine = Engine(model, n_ctx=CTX, ring=RingOptions(p.endpoints(0), p.layout, p.sha256))
        try:
            res = measured(engine)
            res["hop_ms"] = {n: _hop_ms(engine.ring, n, len(sizes)) for n in HOP_FLOATS}
        finally:
            engine.close()
    return res


_SINK = open(os.devnull, "w")  # noqa: SIM115  (the process's lifetime)


def _emit(text: str) -> None:
    """prima-cli's _emit (text streamed as it comes), to nowhere: its cost counts, as there."""
    _SINK.write(text)
    _SINK.flush()


def _cpu_s(pids: list[int]) -> float:
    """CPU seconds of this process and of the given children so far (user + system)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = time.process_time()
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def _hop_ms(head, n_floats: int, world: int) -> dict:
    for _ in range(20):
        head.probe(n_floats)
    rtts = [head.probe(n_floats) for _ in range(PROBES)]
    per_hop = sorted(r * 1e3 / world for r in rtts)
    return {"median": statistics.median(per_hop), "p90": per_hop[int(0.9 * len(per_hop))]}


# ---------------------------------------------------------------------------------------------
# The planner's prediction for the same plans, from profile-tool's profile of this machine


def measure_profile(model, tmp: Path, quick: bool = False) -> dict:
    """profile-tool on this machine at THREADS threads, the network measured to a
    `profile-tool --listen` on loopback (what the ring's hops cross here); quick: its --quick."""
    import subprocess

    from profiler.cli import main as profile_tool
    from tests.ring_helpers import free_port_base

    port = free_port_base(1)
    listener = subprocess.Popen([sys.executable, "-m", "profiler.cli", "--listen", str(port),
                                 "--bind", "127.0.0.1", "--listen-timeout", "60"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.0)  # the listener binds
        out = tmp / "box.json"
        rc = profile_tool(["-m", str(model), "-t", str(THREADS), "--no-disk", "--no-gpu",
                           "--peer", f"127.0.0.1:{port}", "--name", "box", "-o", str(out)]
                          + (["--quick"] if quick else []))
        if rc not in (0, 1):  # 1: disk not measured, which --no-disk asks for
            raise SystemExit(f"profile-tool failed with exit status {rc}")
    finally:
        listener.terminate()
        listener.wait(10)
    return json.loads(out.read_text())


def predicted(model_path, profile: dict, sizes, ctx: int, matvec_only: bool = False):
    """planner.latency.predict for the plan's split, every rank this machine's profile.
    matvec_only: the profile as schema v1 had it (no measured decode steps)."""
    from planner.latency import Split, device_costs, fixed_ms, predict
    from planner.model_profile import load_model
    from planner.profiles import device_from_dict

    model = load_model(model_path)
    doc = json.loads(json.dumps(profile))
    if matvec_only:
        doc["cpu"]["decode"] = []
        doc["ring"] = None
    devices = [device_from_dict({**doc, "name": f"rank{r}"}, "bench") for r in range(len(sizes))]
    split = Split(k=N_LAYERS // sum(sizes), w=tuple(sizes), n=tuple(0 for _ in sizes))
    return predict(device_costs(devices, model, ctx), split, fixed_ms(devices[0], model))


# ---------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    global PROBES, REPEATS
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-cgroup", action="store_true", help="skip the cgroup memory-limit runs")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    n_predict = 24 if args.quick else N_PREDICT
    PROBES = 100 if args.quick else PROBES
    REPEATS = 1 if args.quick else REPEATS
    from prima_ref.quants import set_num_threads

    set_num_threads(THREADS)
    model = fetch.fetch(fetch.SMOLLM2_Q4_1)
    lines = ["# Piped ring on loopback", "", *machine_lines(),
             f"- model: {model.name}; {n_predict} tokens with prima-cli's default sampling "
             f"chain seeded ({SAMPLING}), ctx {CTX}, {THREADS} thread per rank, every rank a "
             "process on this machine (they take turns on the same cores)",
             "- command: `flock /tmp/prima-bench.lock .venv/bin/python bench/ring.py"
             + "".join(f" {a}" for a in (sys.argv[1:] if argv is None else argv)) + "`", ""]
    tmp = Path(tempfile.mkdtemp(prefix="bench-ring-prof-"))
    profile = measure_profile(model, tmp, quick=args.quick)
    profile["extra"]["bench_load_1min"] = os.getloadavg()[0]  # at the end of profiling
    results = {m: decode_run(model, sizes, n_predict) for m, sizes in SPLITS.items()}
    ref = results["1"]["tokens"]
    lines += ["## Decode speed", "",
              f"Median of {REPEATS} generations after a warm-up (all of them in the last column).",
              "",
              "CPU ms per token: user + system time of every rank's process over the "
              "generation, per token: what the ranks computed, whatever else ran on the cores, "
              f"and each waiting rank's spin before it sleeps (PRIMA_RING_SPIN_MS="
              f"{P.spin_seconds() * 1e3:g} ms here: a rank polls its socket that long, yielding "
              "the core between checks, so a 2-rank ring on 2 cores shows about twice the "
              "CPU time of its wall time).",
              "",
              "| ranks | windows (-lw) | ms per token | tok/s | same tokens as 1 rank | ms per "
              "token, every run | CPU ms per token (all ranks) | load (1 min) |",
              "|---|---|---|---|---|---|---|---|"]
    for m, r in results.items():
        lines.append(f"| {m} | {','.join(map(str, SPLITS[m]))} | {r['ms_per_token']:.2f} | "
                     f"{r['eval_tps']:.1f} | {'yes' if r['tokens'] == ref else 'NO'} | "
                     f"{', '.join(f'{x:.1f}' for x in r['ms_all'])} | "
                     f"{r['cpu_ms_per_token']:.2f} | {r['load']:.2f} |")
    lines += ["", "## Per-hop overhead (probe round trip / ranks, no compute)", "",
              "| ranks | floats | median ms per hop | p90 ms |", "|---|---|---|---|"]
    for m, r in results.items():
        for n, h in r.get("hop_ms", {}).items():
            lines.append(f"| {m} | {n} | {h['median']:.3f} | {h['p90']:.3f} |")
    lines += ["", "Target: < 0.5 ms per hop for a 3584-float activation.", ""]
    lines += prediction_lines(model, profile, results)
    if not args.no_cgroup:
        lines.append(cgroup_main(n_predict=8 if args.quick else 16))
    lines += [f"Bench run time: {time.perf_counter() - t_start:.0f} s "
              f"(load average at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}).", ""]
    text = "\n".join(lines)
    print(text)
    write_report("ring.md", text)
    return 0


def prediction_lines(model, profile: dict, results: dict) -> list[str]:
    dec = profile["cpu"]["decode"][0]
    ex = profile["extra"]["models"][0]["cpu_decode"]
    ring = profile.get("ring") or {"window_ms": 0.0, "round_ms": 0.0}
    gen = ex.get("generation")
    if gen is not None:
        how = (f"real generation steps (Engine.generate with the default chain, text streamed, "
               f"{gen['n_tokens']} steps x {gen['repeats']}, mean context "
               f"{gen['n_ctx_mean']:.0f}): "
               f"{gen['step_ms']:.2f} ms a step, {gen['layers_ms']:.2f} of it in "
               "Transformer.forward_layers; the planner gets")
    else:
        how = "the pieces timed alone (no real generation in this profile):"
    lines = ["## Measured token latency vs the planner's prediction (same plan)", "",
             "The device profile is profile-tool's, run on this machine just before "
             f"(`profile-tool -m {model.name} -t {THREADS} --no-disk --peer 127.0.0.1:PORT"
             f"{' --quick' if profile['extra'].get('quick') else ''}`, "
             "the peer a `profile-tool --listen` on loopback; load average "
             f"{profile['extra']['bench_load_1min']:.2f} when it ended). Its `cpu.decode` "
             f"holds {how} {dec['layer_ms']:.3f} ms per layer (the layers' time / "
             f"{N_LAYERS}) and fixed {dec['fixed_ms']:.2f} ms per token (the rest of the "
             f"step), timed at context {dec['n_ctx']}; {ex['clock']}. The pieces timed alone, "
             f"for comparison: a layer {ex.get('pieces_layer_ms', dec['layer_ms']):.3f} ms "
             f"(context {ex.get('n_ctx_pieces', dec['n_ctx'])}), embedding + output head "
             f"{ex['head_ms']:.2f} ms, sampling {ex['sample_ms']:.2f} ms. Network "
             f"{profile['network']['latency_ms']:.3f} ms one way. Schema v3's `ring` holds "
             "the ring runtime's own CPU work, timed by profile-tool on a 2-rank loopback ring "
             f"(-lw 0,1: one window of one layer per round): {ring['window_ms']:.3f} ms per "
             "window on a worker beyond its layers (receive, decode, checks, frame, send, "
             f"bookkeeping, its threads), {ring['round_ms']:.3f} ms per round on rank 0 "
             "beyond its head; the planner adds them to each hop term (a worker's per window, "
             "rank 0's per round). Every rank is given this profile; the prediction is "
             "planner.latency.predict for the plan's split at the run's mean decode context "
             "(prompt + half the generated tokens). The bench's generations stream their text "
             "as prima-cli does (StreamDecoder, written to /dev/null).", "",
             "Matvec-only columns: the same profile without `cpu.decode` and `ring` (a v1 "
             "profile: layers priced from matvec speeds, hops by the network alone).", "",
             "CPU columns: the ranks' CPU time per token (Decode speed above) against the same "
             "prediction; with the spin off (PRIMA_RING_SPIN_MS=0) and an idle machine it "
             "equals the wall time, on a shared one it shows whether a miss is the model's or "
             "the neighbours' (with the load average above 2 on 2 cores, wall time is mostly "
             "other processes' turns); with the spin on it counts the spinning too. profile-tool "
             "measures the ring's CPU work with the spin off. The profile's figures "
             "are CPU time at one thread too; their own drift with load (the average layer "
             "moves by 10-20 % between runs on this VM) is the error that remains.", "",
             "| ranks | windows | k | measured ms | predicted ms | error | cpu / hop / fixed ms "
             "| predicted ms (matvec only) | error | measured CPU ms | error |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for m, r in results.items():
        sizes = SPLITS[m]
        ctx = round(r["mean_ctx"])
        p2 = predicted(model, profile, sizes, ctx)
        p1 = predicted(model, profile, sizes, ctx, matvec_only=True)
        t = p2.terms_ms
        meas = r["ms_per_token"]
        err2 = (meas - p2.total_ms) / p2.total_ms * 100
        lines.append(f"| {m} | {','.join(map(str, sizes))} | {N_LAYERS // sum(sizes)} | "
                     f"{meas:.2f} | {p2.total_ms:.2f} | {err2:+.0f} % | "
                     f"{t['cpu']:.1f} / {t['hop']:.2f} / {t['fixed']:.1f} | {p1.total_ms:.2f} | "
                     f"{(meas - p1.total_ms) / p1.total_ms * 100:+.0f} % | "
                     f"{r['cpu_ms_per_token']:.2f} | "
                     f"{(r['cpu_ms_per_token'] - p2.total_ms) / p2.total_ms * 100:+.0f} % |")
    lines += ["", "Error = (measured - predicted) / predicted. Target: within 25 %.", "",
              "What a hop costs the ring beyond the layers: (ring - 1 rank) / hops per token "
              "(k x ranks), from the medians above, against the planner's hop term per hop "
              "(profile latency + activation / bandwidth + the ring's CPU work per window or "
              "round).", "",
              "| ranks | hops per token | extra wall ms per hop | extra CPU ms per hop | "
              "planner's ms per hop |", "|---|---|---|---|---|"]
    one = results["1"]
    for m, r in results.items():
        sizes = SPLITS[m]
        if len(sizes) < 2:
            continue
        hops = N_LAYERS // sum(sizes) * len(sizes)
        p2 = predicted(model, profile, sizes, round(r["mean_ctx"]))
        lines.append(f"| {m} | {hops} | {(r['ms_per_token'] - one['ms_per_token']) / hops:.2f} | "
                     f"{(r['cpu_ms_per_token'] - one['cpu_ms_per_token']) / hops:.2f} | "
                     f"{p2.terms_ms['hop'] / hops:.3f} |")
    return lines + [""]


# ---------------------------------------------------------------------------------------------
# A worker under a cgroup v1 memory limit well below its share of the weights

CG_WINDOWS = [1, 3]  # 32 layers: k=8, rank 1 serves 24 layers in 8 windows of 3
CG_LIMIT_MIB = 200  # well below rank 1's ~370 MB share (and above Python's ~80 MB of its own)


def cgroup_run(model, n_predict: int, limit_mib: int | None, prefetch: bool) -> dict:
    """One 2-rank ring on the big synthetic model; rank 1 inside a fresh memory cgroup limited
    to limit_mib (None: no cgroup), --release on, --prefetch as asked, page cache cold."""
    import gc

    from prima_ref.engine import Engine
    from prima_ref.ring.launch import LocalRing
    from prima_ref.ring.topology import Layout, RingOptions, load_plan, make_plan
    from prima_ref.sampling import Sampler, SamplingParams
    from tests.ring_helpers import (
        cgroup_remove,
        cgroup_v1_child,
        drop_page_cache,
        free_port_base,
        in_cgroup,
    )

    cg = None
    if limit_mib is not None:
        cg = cgroup_v1_child("prima-ring-bench")
        if cg is None:
            raise RuntimeError("no writable cgroup v1 memory controller here")
        (cg / "memory.limit_in_bytes").write_text(str(limit_mib << 20))
    tmp = Path(tempfile.mkdtemp(prefix="bench-ring-cg-"))
    layout = Layout.from_window_sizes(CG_WINDOWS, 32)
    plan = make_plan(model, layout, ctx=CTX, data_port=free_port_base(2),
                     signal_port=free_port_base(2))
    (tmp / "plan.json").write_text(json.dumps(plan))
    p = load_plan(tmp / "plan.json")
    flags = ["-t", str(THREADS), "--stats-json", str(tmp / "rank1.json"), "--release"]
    flags += ["--prefetch"] if prefetch else []
    gc.collect()
    drop_page_cache(model)  # start cold: every run reads its weights from disk
    try:
        with LocalRing(model, tmp / "plan.json", ranks=[], log_dir=tmp) as ring:
            ring.start(1, flags, prefix=in_cgroup(cg) if cg else ())
            engine = Engine(model, n_ctx=CTX, ring=RingOptions(p.endpoints(0), p.layout, p.sha256))
            try:
                ids = engine.tokenizer.encode(PROMPT, add_special=True, parse_special=True)
                out, t = engine.generate(ids, n_predict, Sampler(SamplingParams(temperature=0)))
            finally:
                engine.close()
            codes = ring.wait(10)
            if codes.get(1) != 0:
                raise RuntimeError(f"rank 1 exited with {codes.get(1)}: {ring.log(1)[-2000:]}")
        stats = json.loads((tmp / "rank1.json").read_text())
        res = {"tokens": out, "ms_per_token": t.eval_ms / max(t.eval_tokens, 1), "stats": stats}
        if cg is not None:
            mstat = dict(line.split() for line in (cg / "memory.stat").read_text().splitlines())
            res.update(max_usage_mib=int((cg / "memory.max_usage_in_bytes").read_text()) / 2**20,
                       failcnt=int((cg / "memory.failcnt").read_text()),
                       pgmajfault=int(mstat.get("total_pgmajfault", 0)))
        return res
    finally:
        if cg is not None:
            cgroup_remove(cg)


def cgroup_main(n_predict: int) -> str:
    from tests.ring_helpers import BIG_SPEC, big_model, cgroup_v1_child

    model = big_model()
    probe = cgroup_v1_child("prima-ring-probe")
    if probe is None:
        return ("## One rank under a cgroup v1 memory limit\n\nSkipped: no writable cgroup v1 "
                "memory controller at /sys/fs/cgroup/memory on this machine.\n")
    probe.rmdir()
    free = cgroup_run(model, n_predict, None, False)
    runs = {pf: cgroup_run(model, n_predict, CG_LIMIT_MIB, pf) for pf in (False, True)}
    share = free["stats"]["share_bytes"] / 2**20
    lines = ["## One rank under a cgroup v1 memory limit", "",
             f"Model: {model.name} ({model.stat().st_size / 2**20:.0f} MiB; built by "
             "tests/ring_helpers.big_model with prima_ref.derived.make_synthetic: llama, "
             f"{BIG_SPEC['n_layer']} layers, n_embd {BIG_SPEC['n_embd']}, n_ff {BIG_SPEC['n_ff']}, "
             f"every matrix Q8_0, SmolLM2's tokenizer cut to 4096 tokens). 2 ranks, -lw "
             f"{','.join(map(str, CG_WINDOWS))} (k=8): rank 1 serves 24 layers ({share:.0f} MiB "
             f"of weights) in 8 windows of 3. Limited runs: rank 1 inside a fresh memory cgroup "
             f"(v1, `memory.limit_in_bytes` = {CG_LIMIT_MIB} MiB, which counts its anonymous "
             "memory and the page cache it brings in). --release on (it activates when the "
             f"share exceeds free memory); page cache dropped before each run; greedy, "
             f"{n_predict} tokens, 1 thread per rank.", "",
             "| run | prefetch | release active | same tokens as unlimited | ms per token | "
             "anon RSS max MiB | weights served MiB | anon / served | model pages resident at "
             "end MiB | cgroup max usage MiB | failcnt | major faults |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, pf, r in [("no limit", False, free)] + [(f"{CG_LIMIT_MIB} MiB", pf, r)
                                                        for pf, r in runs.items()]:
        st = r["stats"]
        lines.append(
            f"| {label} | {'on' if pf else 'off'} | {st['release_active']} | "
            f"{'yes' if r['tokens'] == free['tokens'] else 'NO'} | {r['ms_per_token']:.1f} | "
            f"{st['anon_rss_max_bytes'] / 2**20:.1f} | {share:.0f} | "
            f"{st['anon_rss_max_bytes'] / st['share_bytes']:.2f} | "
            f"{st['file_rss_end_bytes'] / 2**20:.1f} | "
            f"{r.get('max_usage_mib', float('nan')):.0f} | {r.get('failcnt', '-')} | "
            f"{r.get('pgmajfault', '-')} |")
    lines += ["", f"The limit is {CG_LIMIT_MIB / share * 100:.0f} % of the weights rank 1 serves; "
              "the weights live in the page cache (never in anonymous memory), so the limit "
              "evicts and re-reads them instead of killing the rank. tests/test_ring_memory.py "
              "checks the token equality.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
