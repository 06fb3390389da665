"""Speculative decoding benchmark: SmolLM2 Q4_1 drafts for SmolLM2 Q8_0, on one device and on a
3-rank loopback ring; acceptance rate and decode tok/s with and without the draft, and the
per-hop cost that a verification pass pays once for several tokens.

Writes reports/speculative.md (and prints it). Run it alone on the machine:

    flock /tmp/prima-bench.lock .venv/bin/python bench/speculative.py
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

# Defaults, each with its reason
PROMPTS = [  # chat prompts: what a server sees; two, so one lucky prompt does not decide
    "Write a short story about a fox.",
    "What is machine learning?",
]
N_PREDICT = 48  # decode steps enough for several draft/verify cycles per prompt
CTX = 512
N_BATCH = 64  # prompt batch; a verification batch of up to 17 rows fits
THREADS = 1  # one thread per process: the ranks take turns on 2 shared cores
SPLIT = [10, 10, 10]  # 3 ranks, k=1: one ring pass per verification
PROBES = 200
REPEATS = 3  # interleaved runs per variant, the fastest kept (the machine is shared)
DRAFTS = {  # name -> (draft_max, draft_min, draft_p_min, verify)
    "defaults 16/5/0.9": (16, 5, 0.9, "rows"),
    "tuned 8/1/0.3": (8, 1, 0.3, "rows"),  # this 135M draft is rarely 90 % sure of 5 tokens
    "tuned 8/1/0.3, batched": (8, 1, 0.3, "batched"),
}


def _chat(tokenizer, q: str) -> list[int]:
    text = f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"
    return tokenizer.encode(text, add_special=True, parse_special=True)


def run(target, spec, temperature: float = 0.0) -> dict:
    """Generate for every prompt (after one warm-up); decode tok/s counts tokens after the first."""
    from prima_ref.sampling import Sampler, SamplingParams

    gen = spec.generate if spec is not None else target.generate
    params = SamplingParams(temperature=temperature, seed=1)
    gen(_chat(target.tokenizer, "Hi"), 4, Sampler(params))  # warm-up: kernels and pages
    r = {"tokens": [], "rows": [], "ms": 0.0, "cpu_ms": 0.0, "n_gen": 0, "passes": 0, "drafted": 0,
         "accepted": 0, "draft_ms": 0.0, "verify_ms": 0.0, "kv_removes": 0}
    for q in PROMPTS:
        rows = []
        cpu0 = time.process_time()
        out, t = gen(_chat(target.tokenizer, q), N_PREDICT, Sampler(params),
                     on_logits=rows.append if spec is None else None)
        r["cpu_ms"] += (time.process_time() - cpu0) * 1e3  # prefill included
        r["tokens"].append(out)
        r["rows"].append(rows)
        r["ms"] += t.eval_ms
        r["n_gen"] += len(out) - 1
        r["passes"] += t.eval_tokens
        for key in ("drafted", "accepted", "draft_ms", "verify_ms", "kv_removes"):
            r[key] += t.extra.get(f"spec_{key}", 0)
    r["tps"], r["ms_per_token"] = r["n_gen"] / r["ms"] * 1e3, r["ms"] / r["n_gen"]
    r["cpu_ms_per_token"] = r["cpu_ms"] / r["n_gen"]
    return r


def verify_pass_ms(target_path) -> dict:
    """One device: CPU ms of one target forward of n rows (all logits), batched and row by row."""

    from prima_ref.gguf_file import GGUFModel
    from prima_ref.model.transformer import Transformer, row_by_row

    m = Transformer(GGUFModel.open(target_path), CTX)
    m.forward(list(range(100, 140)), 0)

    def best(n):
        ts = []
        for _ in range(5):
            t0 = time.process_time()
            m.forward(list(range(200, 200 + n)), 40, all_logits=True)
            ts.append(time.process_time() - t0)
        return min(ts) * 1e3

    out = {}
    for n in (1, 2, 4, 6, 9, 17):
        batched = best(n)
        with row_by_row():
            out[n] = (batched, best(n))
    return out


def single_device(target_path, draft_path) -> dict:
    from prima_ref.engine import Engine

    target = Engine(target_path, n_ctx=CTX, n_batch=N_BATCH)
    return _variants(target, draft_path)


def ring(target_path, draft_path) -> dict:
    from prima_ref.engine import Engine
    from prima_ref.ring.launch import LocalRing
    from prima_ref.ring.topology import Layout, RingOptions, load_plan, make_plan
    from tests.ring_helpers import free_port_base

    tmp = Path(tempfile.mkdtemp(prefix="bench-spec-"))
    layout = Layout.from_window_sizes(SPLIT, 30)
    plan = make_plan(target_path, layout, ctx=CTX, data_port=free_port_base(len(SPLIT)),
                     signal_port=free_port_base(len(SPLIT)))
    (tmp / "plan.json").write_text(json.dumps(plan))
    p = load_plan(tmp / "plan.json")
    with LocalRing(target_path, tmp / "plan.json", worker_args=["-t", str(THREADS)], log_dir=tmp):
        target = Engine(target_path, n_ctx=CTX, n_batch=N_BATCH,
                        ring=RingOptions(p.endpoints(0), p.layout, p.sha256))
        try:
            res = _variants(target, draft_path)
            n_embd = target.model.cfg.n_embd
            res["hop_ms"] = {rows: _hop_ms(target.ring, rows * n_embd) for rows in (1, 9, 17)}
        finally:
            target.close()
    return res


def _variants(target, draft_path) -> dict:
    """Every variant REPEATS times, interleaved; per variant the fastest run (wall) is kept: the
    other load only ever adds time."""
    from prima_ref.engine import Engine
    from prima_ref.speculative import DraftParams, SpeculativeDecoder

    variants = {"target alone": (None, 0.0)}
    for name, (n_max, n_min, p_min, verify) in DRAFTS.items():
        draft = Engine(draft_path, n_ctx=CTX, n_batch=N_BATCH)
        spec = SpeculativeDecoder(target, draft, DraftParams(n_max, n_min, p_min, verify))
        variants[name] = (spec, 0.0)
        if name == "tuned 8/1/0.3":
            variants[name + ", temp 0.8"] = (spec, 0.8)
    variants["target alone, temp 0.8"] = (None, 0.8)
    res: dict = {}
    for _ in range(REPEATS):
        for name, (spec, temp) in variants.items():
            r = run(target, spec, temperature=temp)
            if name not in res or r["ms"] < res[name]["ms"]:
                res[name] = r
    return res


def _hop_ms(head, n_floats: int) -> float:
    for _ in range(10):
        head.probe(n_floats)
    return statistics.median(head.probe(n_floats) * 1e3 / head.M for _ in range(PROBES))


def draft_alone_ms(draft_path) -> float:
    """The draft's own CPU ms per generated token (prefill included, as for the target)."""
    from prima_ref.engine import Engine

    draft = Engine(draft_path, n_ctx=CTX, n_batch=N_BATCH)
    r = run(draft, None)
    return r["cpu_ms_per_token"]


def _same(alone: dict, r: dict) -> str:
    for k, (a, b) in enumerate(zip(alone["tokens"], r["tokens"], strict=True)):
        if a != b:
            i = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                     min(len(a), len(b)))
            top2 = sorted(alone["rows"][k][i])[-2:] if i < len(alone["rows"][k]) else [0, 0]
            return f"no: prompt {k + 1} from token {i} (target's top-2 margin {top2[1] - top2[0]:.3f})"
    return "yes"


def table(title: str, res: dict) -> list[str]:
    lines = [f"## {title}", "",
             "| run | decode tok/s (wall) | ms per token | rank 0 CPU ms per token | vs target "
             "alone (wall) | vs target alone (rank 0 CPU) | target passes / token | "
             "drafted | accepted | acceptance | draft ms / pass | verify ms / pass | "
             "greedy tokens = target alone |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in res.items():
        if name == "hop_ms":
            continue
        greedy = "temp" not in name
        alone = res["target alone" if greedy else "target alone, temp 0.8"]
        acc = f"{100 * r['accepted'] / r['drafted']:.0f} %" if r["drafted"] else "-"
        same = _same(alone, r) if greedy else "(sampled)"
        per_pass = (f"{r['draft_ms'] / r['passes']:.1f} | {r['verify_ms'] / r['passes']:.1f}"
                    if r["passes"] and name != alone_name(name) else "- | -")
        lines.append(f"| {name} | {r['tps']:.1f} | {r['ms_per_token']:.1f} | "
                     f"{r['cpu_ms_per_token']:.1f} | {r['tps'] / alone['tps']:.2f}x | "
                     f"{alone['cpu_ms_per_token'] / r['cpu_ms_per_token']:.2f}x | "
                     f"{r['passes'] / r['n_gen']:.2f} | "
                     f"{r['drafted']} | {r['accepted']} | {acc} | {per_pass} | {same} |")
    return lines + [""]


def alone_name(name: str) -> str:
    return "target alone" + (", temp 0.8" if "temp" in name else "")


def what_if(res: dict, verify_ms: dict, hop_ms_measured: float) -> list[str]:
    """Predicted ms per token, target alone vs with the draft, as the hop cost grows: each pass
    round an M-rank ring pays M hops once, for every token it yields."""
    r = res["tuned 8/1/0.3"]
    tokens_per_pass = r["n_gen"] / r["passes"]
    pass_cpu = r["cpu_ms"] / r["passes"]  # drafting + verifying + bookkeeping, one device
    kv_share = r["kv_removes"] / r["passes"]  # passes that also send a KV command round
    t1 = res["target alone"]["cpu_ms_per_token"]
    lines = ["## Why the ring gains more: the hop cost is paid once per pass", "",
             f"Measured on one device (tuned 8/1/0.3, greedy, CPU time): {tokens_per_pass:.2f} "
             f"tokens per target pass, {r['drafted'] / r['passes']:.2f} drafted, {pass_cpu:.1f} ms "
             f"per pass (drafting and verifying); the target alone takes {t1:.1f} ms per token. A "
             f"ring of M = 3 ranks adds 3 hops to every pass, and {100 * kv_share:.0f} % of the "
             "passes reject a row and send a KV command round the ring (3 more hops). Predicted "
             "ms per token, target alone: t1 + 3 hop; with the draft: (pass + 3 hop x (1 + KV "
             "share)) / tokens per pass; the compute is the same wherever the layers run:", "",
             "| ms per hop | target alone | with draft | speed-up |", "|---|---|---|---|"]
    for hop in (hop_ms_measured, 2.0, 5.0, 10.0, 30.0):
        alone = t1 + 3 * hop
        spec = (pass_cpu + 3 * hop * (1 + kv_share)) / tokens_per_pass
        label = f"{hop:.2f} (measured loopback)" if hop == hop_ms_measured else f"{hop:.0f}"
        lines.append(f"| {label} | {alone:.1f} | {spec:.1f} | {alone / spec:.2f}x |")
    pass_table = ["One target forward on one device with every row's logits, batched matmul vs "
                  "row by row (CPU ms, min of 5):", "",
                  "| rows | batched ms | row by row ms |", "|---|---|---|"]
    pass_table += [f"| {n} | {b:.1f} | {w:.1f} |" for n, (b, w) in verify_ms.items()]
    return lines + [""] + pass_table + [""]


def findings(one: dict, three: dict, draft_ms: float) -> list[str]:
    t = one["tuned 8/1/0.3"]
    same = all(_same(res["target alone"], res[k]) == "yes" for res in (one, three)
               for k in ("defaults 16/5/0.9", "tuned 8/1/0.3"))
    return [
        "## Reading", "",
        f"- Exactness: greedy with the draft (row-by-row verification, the default) "
        f"{'equals' if same else 'does NOT equal'} the target alone token for token, on one "
        "device and on the ring. `--draft-verify batched` (one matmul for all rows) can part at "
        "a near-tie of the target, as the batched row shows when it says no.",
        f"- Acceptance: the Q4_1 draft agrees with its Q8_0 parent on "
        f"{100 * t['accepted'] / max(t['drafted'], 1):.0f} % of drafted tokens (greedy), "
        f"{t['n_gen'] / t['passes']:.1f} tokens per target pass.",
        f"- Cost (CPU time, robust to the other load): a draft token costs {draft_ms:.1f} ms, "
        f"{100 * draft_ms / one['target alone']['cpu_ms_per_token']:.0f} % of a target token "
        f"({one['target alone']['cpu_ms_per_token']:.1f} ms); both are the same 135M model, "
        "whose decode on this CPU is bound by compute and per-call overhead more than by "
        "reading weights, and a verify pass of n rows costs several one-token passes (table "
        "above). So drafting ~5 tokens and verifying them costs more than the ~5 target tokens "
        "they replace: no speed-up here. Speculation pays when a draft token is much cheaper "
        "than a target token and n rows cost about one pass (a large, memory-bound target: "
        "prima.cpp's 70B over Wi-Fi with a small draft).",
        "- The defaults 16/5/0.9 (llama.cpp's) draft nothing useful with this draft: it is "
        "rarely 90 % sure of 5 tokens in a row, so every draft is dropped as shorter than "
        "--draft-min and its cost is pure loss. Tune --draft-min/--draft-p-min per draft.",
        f"- Ring: its overhead beyond compute (target alone on the ring minus on one device, "
        f"wall) is {three['target alone']['ms_per_token'] - one['target alone']['ms_per_token']:.1f}"
        " ms per pass: 3 loopback hops of ~0.1 ms and, mostly, each rank process waking in "
        "turn. With the draft it is paid once per pass of "
        f"{t['n_gen'] / t['passes']:.1f} tokens. Measured relative speed of the draft (tuned, "
        f"wall, fastest of {REPEATS}): {three['tuned 8/1/0.3']['tps'] / three['target alone']['tps']:.2f}x "
        f"on the ring, {t['tps'] / one['target alone']['tps']:.2f}x on one device. The table "
        "above predicts the effect for slower links from the measured pass cost.",
        "- Sampling (temp 0.8) costs more per row than greedy: Sampler.probs sorts the whole "
        "49152-token vocabulary for every target and draft row.", ""]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.parse_args(argv)
    from prima_ref.derived import smollm2_q8_0
    from prima_ref.fetch import SMOLLM2_Q4_1, fetch
    from prima_ref.quants import set_num_threads

    set_num_threads(THREADS)
    target_path, draft_path = smollm2_q8_0(), fetch(SMOLLM2_Q4_1)
    load0 = os.getloadavg()
    one = single_device(target_path, draft_path)
    draft_ms = draft_alone_ms(draft_path)
    verify_ms = verify_pass_ms(target_path)
    three = ring(target_path, draft_path)
    load1 = os.getloadavg()
    hop = three["hop_ms"]
    lines = ["# Speculative decoding", "",
             *[x for x in machine_lines() if not x.startswith("- load average")],
             f"- load average (1, 5, 15 min) before the runs: {', '.join(f'{x:.2f}' for x in load0)}; "
             f"after: {', '.join(f'{x:.2f}' for x in load1)} (2 cores shared with other "
             "engineers' work: wall times are noisy, CPU times less so)",
             f"- target {target_path.name}, draft {draft_path.name} (same 135M model, Q4_1); "
             f"{len(PROMPTS)} chat prompts x {N_PREDICT} tokens, ctx {CTX}, -b {N_BATCH}, "
             f"{THREADS} thread per process; ring: 3 ranks on loopback, -lw "
             f"{','.join(map(str, SPLIT))} (k=1), every rank a process on this machine",
             f"- each variant run {REPEATS} times, interleaved, the fastest kept; "
             "decode tok/s = tokens after the first / decode wall time (drafting included); "
             "rank 0 CPU ms per token = process CPU time of the generation (prefill included) / "
             "tokens after the first; on the ring it leaves out the workers' CPU",
             "- command: `flock /tmp/prima-bench.lock .venv/bin/python bench/speculative.py`", ""]
    lines += table("One device", one)
    lines += table("3-rank ring on loopback", three)
    lines += ["## Per-hop cost (probe round trip / 3 ranks, no compute)", "",
              "| rows (activations of n tokens) | ms per hop |", "|---|---|"]
    lines += [f"| {rows} | {ms:.3f} |" for rows, ms in hop.items()]
    one_tok = one["target alone"]["ms_per_token"]
    ring_tok = three["target alone"]["ms_per_token"]
    lines += ["", f"Draft alone: {draft_ms:.1f} ms per token on rank 0; target alone: "
              f"{one_tok:.1f} ms per token on one device, {ring_tok:.1f} ms on the ring "
              f"({ring_tok - one_tok:+.1f} ms: {3} hops and the turn-taking of 3 processes).", ""]
    lines += what_if(one, verify_ms, hop[1])
    lines += findings(one, three, draft_ms)
    text = "\n".join(lines) + "\n"
    print(text)
    write_report("speculative.md", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
