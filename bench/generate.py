"""Single-device generation speed: prima-cli vs llama.cpp in the same run.

    python bench/generate.py [--repeats 3] [--threads 2] [--llama-python PATH]

Per model: prefill tok/s on a 64-token prompt, decode tok/s over 128 greedy tokens, time to
first token and peak RSS, median of the repeats, each run in a fresh process so RSS is its own.
llama.cpp (llama-cpp-python) is measured when it is installed (in this interpreter or the one
--llama-python names). Then, for the default model: the wall time from starting a fresh
process to its first generated token, with an empty JIT cache and again with the cache the
first start wrote (issue 3: under 3 s), and a cProfile of the decode loop saying where the
time goes. Writes reports/generation.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_lines, write_report  # noqa: E402

PROMPT_TOKENS = 64
# Both engines are warmed by one prompt of WARM tokens and a few decode steps before the timed
# run: more than 8 tokens, so prima-ref's prefill kernels (quants/tiled.py) are loaded from
# Numba's cache before the clock starts, as its decode kernels already were (the first such
# batch in a process costs 50-65 ms more on this VM; the start-up table below counts it).
WARM = 16
DECODE_TOKENS = 128

PRIMA_RUN = r"""
WARM = @WARM@
import json, sys, time
import prima_ref
from prima_ref.quants import set_num_threads
from prima_ref.engine import Engine
from prima_ref.sampling import Sampler, SamplingParams
path, threads, n_prompt, n_gen, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
set_num_threads(threads)
eng = Engine(path, n_ctx=512)
text = "The history of the city began when the first settlers arrived at the river. " * 20
ids = eng.tokenizer.encode(text, add_special=True)[:n_prompt]
eng.generate(ids[:WARM], 4, Sampler(SamplingParams(temperature=0)))  # compile / warm
eng.tokens.clear()
out_ids, t = eng.generate(ids, n_gen, Sampler(SamplingParams(temperature=0)))
json.dump(dict(prompt_tps=t.prompt_tps, eval_tps=t.eval_tps, ttft_ms=t.ttft_ms,
               eval_tokens=t.eval_tokens, peak_rss_mib=t.peak_rss_mib), open(out, "w"))
"""

LLAMA_RUN = r"""
WARM = @WARM@
import json, resource, sys, time
import numpy as np
import llama_cpp
path, threads, n_prompt, n_gen, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
llm = llama_cpp.Llama(path, n_ctx=512, n_threads=threads, n_threads_batch=threads, n_batch=512, verbose=False)
text = "The history of the city began when the first settlers arrived at the river. " * 20
ids = llm.tokenize(text.encode(), add_bos=True)[:n_prompt]
llm.eval(ids[:WARM]); llm.reset()
n_vocab = llm.n_vocab()
def greedy():
    return int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))))
t0 = time.perf_counter(); llm.eval(ids); t1 = time.perf_counter()
tok = greedy(); t_first = time.perf_counter()
for _ in range(n_gen - 1):
    llm.eval([tok])
    tok = greedy()
t2 = time.perf_counter()
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
json.dump(dict(prompt_tps=len(ids) / (t1 - t0), eval_tps=(n_gen - 1) / (t2 - t_first),
               ttft_ms=(t_first - t0) * 1e3, eval_tokens=n_gen, peak_rss_mib=rss), open(out, "w"))
"""
PRIMA_RUN, LLAMA_RUN = (r.replace("@WARM@", str(WARM)) for r in (PRIMA_RUN, LLAMA_RUN))


START_RUN = r"""
import sys
from prima_ref.quants import set_num_threads
from prima_ref.engine import Engine
from prima_ref.sampling import Sampler, SamplingParams
path, threads = sys.argv[1], int(sys.argv[2])
set_num_threads(threads)
eng = Engine(path, n_ctx=512)
ids = eng.tokenizer.encode("The history of the city began when", add_special=True)
def first(_text):
    sys.stdout.write("FIRST\n"); sys.stdout.flush()
eng.generate(ids, 1, Sampler(SamplingParams(temperature=0)), on_text=first)
"""

PROFILE_RUN = r"""
import cProfile, json, pstats, sys, time
from prima_ref.quants import set_num_threads
from prima_ref.engine import Engine
path, threads, n_tok, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
set_num_threads(threads)
eng = Engine(path, n_ctx=512)
ids = eng.tokenizer.encode("The history of the city began when the first settlers", add_special=True)
logits = eng.eval(ids)
eng.eval([int(logits.argmax())])  # warm every decode kernel
prof = cProfile.Profile()
t0 = time.perf_counter()
prof.enable()
for _ in range(n_tok):
    logits = eng.eval([int(logits.argmax())])
prof.disable()
wall = time.perf_counter() - t0
st = pstats.Stats(prof).stats
rows = [dict(file=f, line=l, func=fn, calls=v[1], tottime=v[2]) for (f, l, fn), v in st.items()]
json.dump(dict(wall_s=wall, n_tok=n_tok, rows=rows), open(out, "w"))
"""


def models() -> list[tuple[str, Path]]:
    from prima_ref import fetch
    from prima_ref.derived import smollm2_q8_0

    return [
        ("SmolLM2-135M Q4_1", fetch.fetch(fetch.SMOLLM2_Q4_1)),
        ("SmolLM2-135M Q8_0", smollm2_q8_0()),
        ("Gemma-3-270M Q4_K_M", fetch.fetch(fetch.GEMMA3_270M)),
    ]


def run_once(code: str, path: Path, threads: int, python: str = sys.executable) -> dict | None:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [python, "-c", code, str(path), str(threads), str(PROMPT_TOKENS),
               str(DECODE_TOKENS), out.name]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            print(res.stderr[-2000:], file=sys.stderr)
            how = (f"killed by signal {-res.returncode}" if res.returncode < 0
                   else f"exit status {res.returncode}")
            engine = "llama.cpp" if "llama_cpp" in code else "prima-ref"
            FAILURES.append(f"{engine} on {Path(path).name} ({python}): {how}")
            return None
        return json.loads(Path(out.name).read_text())


FAILURES: list[str] = []  # runs that did not finish, named in the report


def median_of(code, path, threads, repeats, python=sys.executable) -> dict | None:
    runs = [r for r in (run_once(code, path, threads, python) for _ in range(repeats)) if r]
    if not runs:
        return None
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def have_llama_cpp(python: str) -> bool:
    return subprocess.run([python, "-c", "import llama_cpp"], capture_output=True).returncode == 0


def seconds_to_first_token(path: Path, threads: int, env: dict) -> float | None:
    """Wall seconds from starting a fresh interpreter to its first generated token."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", START_RUN, str(path), str(threads)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        elapsed = time.perf_counter() - t0
        _, err = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        proc.kill()
        return None
    if line.strip() != "FIRST" or proc.returncode:
        print(err[-2000:], file=sys.stderr)
        return None
    return elapsed


def start_times(path: Path, threads: int) -> tuple[float | None, float | None]:
    """(cold, warm): first token of a fresh process with an empty Numba cache, then of a
    second fresh process that finds the cache the first one wrote."""
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache}
        cold = seconds_to_first_token(path, threads, env)
        warm = seconds_to_first_token(path, threads, env)
    return cold, warm


# Where cProfile's flat profile puts a decode step's time: the compiled kernels by name, the
# rest (Python between them: layer bookkeeping, numpy glue, dispatch) as one figure.
PROFILE_GROUPS = [
    ("fused q/k/v, W_o, W_down (matvec_group)", "matvec_group"),
    ("fused gate/up + activation (ffn_gate_up)", "ffn_gate_up"),
    ("K-quant W_o/W_down/head (kq_matvec) and unfused quantized matvecs",
     ("kq_matvec", "matvec", "_products_vnni", "_quantize_x_q8k", "quantize_x_q8",
      "_quantize_rows_q8")),
    ("q/k/v + RoPE + KV store + attention (attention_step), or attention alone",
     ("attention_step", "attention")),
    ("RMS norm, RoPE, activations (serial kernels)",
     ("rms_norm", "rope_inplace", "_silu_mul_serial", "_silu_mul_parallel", "_gelu_mul")),
]


def profile_decode(path: Path, threads: int, n_tok: int = 32) -> list[str]:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [sys.executable, "-c", PROFILE_RUN, str(path), str(threads), str(n_tok), out.name]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            print(res.stderr[-2000:], file=sys.stderr)
            return ["(profile failed)"]
        data = json.loads(Path(out.name).read_text())
    total_ms = data["wall_s"] * 1e3 / n_tok
    calls = sum(r["calls"] for r in data["rows"]) / n_tok
    lines = [f"cProfile over {n_tok} decode steps at {threads} threads: {total_ms:.2f} ms per "
             f"token (wall, with the profiler's own cost), {calls:.0f} Python-level calls per "
             "token.", "",
             "| where | ms per token | share | calls per token |", "|---|---|---|---|"]
    used = 0.0
    for label, names in PROFILE_GROUPS:
        names = (names,) if isinstance(names, str) else names
        rows = [r for r in data["rows"] if r["func"] in names and "prima_ref" in r["file"]]
        ms = sum(r["tottime"] for r in rows) * 1e3 / n_tok
        used += ms
        calls = sum(r["calls"] for r in rows) / n_tok
        lines.append(f"| {label} | {ms:.2f} | {ms / total_ms:.0%} | {calls:.0f} |")
    rest = total_ms - used
    lines.append(f"| Python and numpy between the kernels | {rest:.2f} | {rest / total_ms:.0%} | |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--llama-python", default=sys.executable,
                    help="interpreter that has llama_cpp installed (default: this one)")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    llama = have_llama_cpp(args.llama_python)
    rows = []
    all_models = models()
    for name, path in all_models:
        ours = median_of(PRIMA_RUN, path, args.threads, args.repeats)
        ref = median_of(LLAMA_RUN, path, args.threads, args.repeats, args.llama_python) if llama else None
        rows.append((name, ours, ref))
        print(f"[bench] {name}: prima {ours} llama.cpp {ref}", file=sys.stderr)
    lines = ["# Single-device generation", "", *machine_lines(),
             f"- threads: {args.threads}; prompt {PROMPT_TOKENS} tokens, {DECODE_TOKENS} greedy tokens; "
             f"median of {args.repeats} runs, each in a fresh process; before the timed run each "
             f"engine evaluates a {WARM}-token prompt and 4 decode steps (prima-ref's first "
             "prompt of more than 8 tokens in a process loads its tiled prefill kernels from "
             "Numba's cache; the start-up table counts such loads)",
             f"- llama.cpp: {'llama-cpp-python ' + _llama_version(args.llama_python) if llama else 'not installed in this run'}",
             "", "| model | engine | prefill tok/s | decode tok/s | TTFT ms | peak RSS MiB | decode vs llama.cpp | prefill vs llama.cpp |",
             "|---|---|---|---|---|---|---|---|"]
    for name, ours, ref in rows:
        for engine, r in (("prima-ref", ours), ("llama.cpp", ref)):
            if r is None:
                continue
            ratio_d = f"{ours['eval_tps'] / ref['eval_tps']:.2f}x" if engine == "prima-ref" and ref else ""
            ratio_p = f"{ours['prompt_tps'] / ref['prompt_tps']:.2f}x" if engine == "prima-ref" and ref else ""
            lines.append(f"| {name} | {engine} | {r['prompt_tps']:.1f} | {r['eval_tps']:.1f} | "
                         f"{r['ttft_ms']:.1f} | {r['peak_rss_mib']:.0f} | {ratio_d} | {ratio_p} |")
    if FAILURES:
        lines += ["", "Runs that failed (no figure above for them): "
                  + "; ".join(sorted(set(FAILURES))) + "."]
    name, path = all_models[0]
    cold, warm = start_times(path, args.threads)
    fmt = lambda v: f"{v:.2f} s" if v is not None else "failed"  # noqa: E731
    lines += ["", f"## Start to first token ({name}, fresh processes)", "",
              "Wall time from starting the interpreter to the first generated token (imports, model "
              "map, tokenizer, JIT or cache load, a 9-token prompt, one sampled token).", "",
              "| start | seconds |", "|---|---|",
              f"| first start, empty Numba cache (compiles every kernel) | {fmt(cold)} |",
              f"| second start, cache=True kernels loaded from that cache | {fmt(warm)} |"]
    for name, path in all_models:
        lines += ["", f"## Where decode time goes: {name}", "", *profile_decode(path, args.threads)]
    lines += ["", f"This run of bench/generate.py took {time.perf_counter() - t_start:.0f} s; "
              f"load average at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}."]
    write_report("generation.md", "\n".join(lines) + "\n")
    return 0


def _llama_version(python: str) -> str:
    res = subprocess.run([python, "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                         capture_output=True, text=True)
    return res.stdout.strip()


if __name__ == "__main__":
    raise SystemExit(main())
