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

# Defaults, each with its reason
SPLITS = {1: [30], 2: [15, 15], 4: [8, 8, 7, 7]}  # SmolLM2's 30 layers, k=1, near-even
N_PREDICT = 64  # enough decode steps for a stable median per token
PROMPT = "Once upon a time, in a small village by the sea, there lived"
CTX = 512
THREADS = 1  # one thread per rank: the ranks share 2 cores and take turns
PROBES = 500  # round trips per payload size for the hop overhead
HOP_FLOATS = (576, 3584)  # SmolLM2's n_embd, and the issue's 3584-float activation (Qwen2-7B)
RAM_READ_GBPS = 17.0  # shared/MODELS.md: one-thread memory read on this machine kind


def decode_run(model, sizes, n_predict) -> dict:
    from prima_ref.engine import Engine
    from prima_ref.ring.launch import LocalRing
    from prima_ref.ring.topology import Layout, RingOptions, load_plan, make_plan
    from prima_ref.sampling import Sampler, SamplingParams
    from tests.ring_helpers import free_port_base

    def generate(engine):
        ids = engine.tokenizer.encode(PROMPT, add_special=True, parse_special=True)
        out, t = engine.generate(ids, n_predict, Sampler(SamplingParams(temperature=0)))
        return {"tokens": out, "ms_per_token": t.eval_ms / max(t.eval_tokens, 1),
                "eval_tps": t.eval_tps, "prompt_ms": t.prompt_ms}

    if len(sizes) == 1:
        engine = Engine(model, n_ctx=CTX)
        generate(engine)  # warm-up: compiled kernels loaded, pages in
        return generate(engine)
    layout = Layout.from_window_sizes(sizes, 30)
    tmp = Path(tempfile.mkdtemp(prefix="bench-ring-"))
    plan = make_plan(model, layout, ctx=CTX, data_port=free_port_base(len(sizes)),
                     signal_port=free_port_base(len(sizes)))
    (tmp / "plan.json").write_text(json.dumps(plan))
    p = load_plan(tmp / "plan.json")
    with LocalRing(model, tmp / "plan.json", worker_args=["-t", str(THREADS)], log_dir=tmp):
        engine = Engine(model, n_ctx=CTX, ring=RingOptions(p.endpoints(0), p.layout, p.sha256))
        try:
            generate(engine)
            res = generate(engine)
            res["hop_ms"] = {n: _hop_ms(engine.ring, n, len(sizes)) for n in HOP_FLOATS}
        finally:
            engine.close()
    return res


def _hop_ms(head, n_floats: int, world: int) -> dict:
    for _ in range(20):
        head.probe(n_floats)
    rtts = [head.probe(n_floats) for _ in range(PROBES)]
    per_hop = sorted(r * 1e3 / world for r in rtts)
    return {"median": statistics.median(per_hop), "p90": per_hop[int(0.9 * len(per_hop))]}


# ---------------------------------------------------------------------------------------------
# The planner's prediction for the same plans, from a profile of this machine


def measured_device(model_path, name: str, hop_ms: float) -> dict:
    """A device profile of this machine: matvec speed per quant type on the model's own
    tensors with prima_ref's kernels at THREADS threads, loopback as the network."""
    import numpy as np

    from prima_ref.gguf_file import GGUFModel
    from prima_ref.quants import kernels

    g = GGUFModel.open(model_path)
    matvec = {}
    for qtype in sorted({t.qtype.name for t in g.tensors.values() if t.n_rows > 1}):
        info = max((t for t in g.tensors.values() if t.qtype.name == qtype), key=lambda t: t.n_bytes)
        kern, rows = kernels(info.qtype), g.tensor_rows(info.name)
        x = np.random.default_rng(0).standard_normal(info.n_cols).astype(np.float32)
        kern.matvec(rows, x)
        times = []
        for _ in range(30):
            t0 = time.perf_counter()
            kern.matvec(rows, x)
            times.append(time.perf_counter() - t0)
        s = statistics.median(times)
        matvec[qtype] = {"gbps": info.n_bytes / s / 1e9, "gflops": 2 * info.n_rows * info.n_cols / s / 1e9}
    return {"schema": "prima-ref/device-profile", "schema_version": 1, "name": name,
            "host": "127.0.0.1", "os": "linux",
            "cpu": {"name": "this machine", "cores": THREADS, "kv_copy_ms_per_layer": 0.0,
                    "matvec": matvec},
            "memory": {"total_gib": 20, "available_gib": 16, "read_gbps": RAM_READ_GBPS},
            "disk": {"seq_read_gbps": 2.0, "rnd_read_gbps": 0.4, "free_gib": 10},
            "network": {"latency_ms": hop_ms, "bandwidth_gbps": 10.0}}


def whole_layer_device(model_path, name: str, hop_ms: float) -> dict:
    """The same profile, but each quant type's speed taken from a whole decode step of the
    engine (a layer's bytes over the time of one token through it; the output head for its
    type), so Python and the non-matvec ops are counted as the engine pays them."""
    import numpy as np

    from prima_ref.gguf_file import GGUFModel
    from prima_ref.model.transformer import Transformer

    g = GGUFModel.open(model_path)
    tr = Transformer(g, CTX)
    ranges = g.layer_ranges()
    layer_bytes = statistics.mean(e - s for s, e in ranges.values())
    x = tr.embed([1])
    pos = np.array([32])

    def timed(f):
        f()
        ts = []
        for _ in range(10):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    layer_s = timed(lambda: tr.forward_layers(x, pos, 0, tr.cfg.n_layer)) / tr.cfg.n_layer
    head_s = timed(lambda: tr.logits(x))
    doc = measured_device(model_path, name, hop_ms)
    layer_q = g.tensors["blk.0.ffn_down.weight"].qtype.name
    head_info = g.tensors["output.weight" if "output.weight" in g.tensors else "token_embd.weight"]
    doc["cpu"]["matvec"][layer_q] = {"gbps": layer_bytes / layer_s / 1e9,
                                     "gflops": doc["cpu"]["matvec"][layer_q]["gflops"]}
    doc["cpu"]["matvec"][head_info.qtype.name] = {
        "gbps": head_info.n_bytes / head_s / 1e9,
        "gflops": doc["cpu"]["matvec"][head_info.qtype.name]["gflops"]}
    return doc


def predicted_ms(model_path, sizes, hop_ms: float, profile=measured_device) -> float:
    from planner.latency import Split, device_costs, fixed_ms, predict
    from planner.model_profile import load_model
    from planner.profiles import device_from_dict

    model = load_model(model_path)
    one = profile(model_path, "box", hop_ms)
    devices = [device_from_dict({**one, "name": f"rank{r}"}, "bench") for r in range(len(sizes))]
    split = Split(k=30 // sum(sizes), w=tuple(sizes), n=tuple(0 for _ in sizes))
    return predict(device_costs(devices, model, CTX), split, fixed_ms(devices[0], model)).total_ms


# ---------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    global PROBES
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--cgroup-mib", type=int, default=90,
                    help="memory limit for the cgroup run (0: skip it)")
    args = ap.parse_args(argv)
    n_predict = 24 if args.quick else N_PREDICT
    PROBES = 100 if args.quick else PROBES
    from prima_ref.quants import set_num_threads

    set_num_threads(THREADS)
    model = fetch.fetch(fetch.SMOLLM2_Q4_1)
    lines = ["# Piped ring on loopback", "", *machine_lines(),
             f"- model: {model.name}; greedy, {n_predict} tokens, ctx {CTX}, {THREADS} thread per rank, "
             "every rank a process on this machine (they take turns on the same cores)", ""]
    results = {m: decode_run(model, sizes, n_predict) for m, sizes in SPLITS.items()}
    ref = results[1]["tokens"]
    lines += ["## Decode speed", "",
              "| ranks | windows (-lw) | ms per token | tok/s | same tokens as 1 rank |",
              "|---|---|---|---|---|"]
    for m, r in results.items():
        lines.append(f"| {m} | {','.join(map(str, SPLITS[m]))} | {r['ms_per_token']:.2f} | "
                     f"{r['eval_tps']:.1f} | {'yes' if r['tokens'] == ref else 'NO'} |")
    lines += ["", "## Per-hop overhead (probe round trip / ranks, no compute)", "",
              "| ranks | floats | median ms per hop | p90 ms |", "|---|---|---|---|"]
    for m, r in results.items():
        for n, h in r.get("hop_ms", {}).items():
            lines.append(f"| {m} | {n} | {h['median']:.3f} | {h['p90']:.3f} |")
    lines += ["", "Target: < 0.5 ms per hop for a 3584-float activation.", "",
              "## Measured token latency vs the planner's prediction (same plan)", "",
              "The device profile is measured here: matvec GB/s and GFLOP/s per quant type on the "
              "model's own tensors with prima_ref's kernels, loopback hop latency from the probe, "
              f"RAM read {RAM_READ_GBPS} GB/s (shared/MODELS.md, one thread).", "",
              "Second column set: the profile's speeds taken from whole decode steps of the "
              "engine instead (what a profiler of a Python engine should measure).", "",
              "| ranks | measured ms | predicted ms (matvec profile) | error | predicted ms "
              "(whole-layer profile) | error |", "|---|---|---|---|---|---|"]
    for m, r in results.items():
        hop = r["hop_ms"][576]["median"] if "hop_ms" in r else 0.0
        row = f"| {m} | {r['ms_per_token']:.2f} "
        for profile in (measured_device, whole_layer_device):
            pred = predicted_ms(model, SPLITS[m], hop, profile)
            row += f"| {pred:.2f} | {(r['ms_per_token'] - pred) / pred * 100:+.0f} % "
        lines.append(row + "|")
    lines += ["", "Target: within 25 %.", ""]
    if args.cgroup_mib:
        lines.append(cgroup_main(args.cgroup_mib, n_predict))
    text = "\n".join(lines)
    print(text)
    write_report("ring.md", text)
    return 0



# ---------------------------------------------------------------------------------------------
# A worker under a cgroup v1 memory limit well below its share of the weights


def cgroup_dir() -> Path | None:
    """A fresh child of this process's cgroup v1 memory controller, or None where not allowed."""
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, ctrl, path = line.split(":", 2)
            if "memory" in ctrl.split(","):
                d = Path("/sys/fs/cgroup/memory") / path.lstrip("/") / f"prima-ring-{os.getpid()}"
                d.mkdir(exist_ok=True)
                return d
    except OSError:
        return None
    return None


def cgroup_run(model, limit_mib: int, prefetch: bool, n_predict: int) -> dict:
    """2 ranks, -lw 1,4 (k=6): rank 1 holds 24 layers in 6 windows, run inside the cgroup."""
    from prima_ref.engine import Engine
    from prima_ref.ring.launch import LocalRing
    from prima_ref.ring.topology import Layout, RingOptions, load_plan, make_plan
    from prima_ref.sampling import Sampler, SamplingParams
    from tests.ring_helpers import free_port_base

    cg = cgroup_dir()
    if cg is None:
        raise SystemExit("no writable cgroup v1 memory controller here")
    (cg / "memory.limit_in_bytes").write_text(str(limit_mib << 20))
    tmp = Path(tempfile.mkdtemp(prefix="bench-ring-cg-"))
    layout = Layout.from_window_sizes([1, 4], 30)
    plan = make_plan(model, layout, ctx=CTX, data_port=free_port_base(2), signal_port=free_port_base(2))
    (tmp / "plan.json").write_text(json.dumps(plan))
    p = load_plan(tmp / "plan.json")
    flags = ["-t", str(THREADS), "--stats-json", str(tmp / "rank1.json"), "--release"]
    flags += ["--prefetch"] if prefetch else []
    os.posix_fadvise(os.open(model, os.O_RDONLY), 0, 0, os.POSIX_FADV_DONTNEED)  # start cold
    with LocalRing(model, tmp / "plan.json", ranks=[], log_dir=tmp) as ring:
        ring.start(1, flags, prefix=["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(cg)])
        engine = Engine(model, n_ctx=CTX, ring=RingOptions(p.endpoints(0), p.layout, p.sha256))
        try:
            ids = engine.tokenizer.encode(PROMPT, add_special=True, parse_special=True)
            out, t = engine.generate(ids, n_predict, Sampler(SamplingParams(temperature=0)))
        finally:
            engine.close()
        ring.wait(10)
    stats = json.loads((tmp / "rank1.json").read_text())
    mstat = dict(line.split() for line in (cg / "memory.stat").read_text().splitlines())
    res = {"tokens": out, "ms_per_token": t.eval_ms / max(t.eval_tokens, 1), "stats": stats,
           "max_usage_mib": int((cg / "memory.max_usage_in_bytes").read_text()) / 2**20,
           "failcnt": int((cg / "memory.failcnt").read_text()),
           "pgmajfault": int(mstat.get("total_pgmajfault", 0)), "limit_mib": limit_mib}
    cg.rmdir()
    return res


def cgroup_main(limit_mib: int, n_predict: int) -> str:
    model = fetch.fetch(fetch.SMOLLM2_Q4_1)
    from prima_ref.quants import set_num_threads

    set_num_threads(THREADS)
    free = cgroup_free_ref(model, n_predict)
    runs = {pf: cgroup_run(model, limit_mib, pf, n_predict) for pf in (False, True)}
    share = runs[False]["stats"]["share_bytes"] / 2**20
    lines = ["## One rank under a cgroup v1 memory limit", "",
             f"2 ranks, -lw 1,4 (k=6): rank 1 serves 24 layers ({share:.1f} MiB of weights) in 6 "
             f"windows of 4, inside a memory cgroup limited to {limit_mib} MiB (anonymous memory "
             "of the process plus its page cache). The Python process itself holds "
             f"{runs[False]['stats']['anon_rss_max_bytes'] / 2**20:.0f} MiB of anonymous memory, "
             f"which leaves ~{limit_mib - runs[False]['stats']['anon_rss_max_bytes'] / 2**20:.0f} MiB "
             "of page cache for "
             f"{share:.1f} MiB of weights; --release is on (it activates: share > free).", "",
             "| prefetch | release active | same tokens as unlimited | ms per token | anon RSS max MiB | model pages "
             "resident at end MiB | weights served MiB | cgroup max usage MiB | failcnt | major faults |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for pf, r in runs.items():
        s = r["stats"]
        lines.append(f"| {'on' if pf else 'off'} | {s['release_active']} | "
                     f"{'yes' if r['tokens'] == free else 'NO'} | "
                     f"{r['ms_per_token']:.1f} | {s['anon_rss_max_bytes'] / 2**20:.1f} | "
                     f"{s['file_rss_end_bytes'] / 2**20:.1f} | {share:.1f} | {r['max_usage_mib']:.0f} | "
                     f"{r['failcnt']} | {r['pgmajfault']} |")
    lines += ["", "Memory pressure (anonymous RSS / weights served): "
              + ", ".join(f"prefetch {'on' if pf else 'off'} "
                          f"{r['stats']['anon_rss_max_bytes'] / r['stats']['share_bytes']:.2f}"
                          for pf, r in runs.items())
              + ". The weights live in the page cache, so the limit evicts and re-reads them "
              "instead of killing the rank.", ""]
    return "\n".join(lines)


def cgroup_free_ref(model, n_predict: int) -> list[int]:
    from prima_ref.engine import Engine
    from prima_ref.sampling import Sampler, SamplingParams

    engine = Engine(model, n_ctx=CTX)
    ids = engine.tokenizer.encode(PROMPT, add_special=True, parse_special=True)
    return engine.generate(ids, n_predict, Sampler(SamplingParams(temperature=0)))[0]


if __name__ == "__main__":
    raise SystemExit(main())
