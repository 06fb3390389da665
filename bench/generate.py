"""Single-device generation speed: prima-cli vs llama.cpp in the same run.

    python bench/generate.py [--repeats 3] [--threads 2]

Per model: prefill tok/s on a 64-token prompt, decode tok/s over 128 greedy tokens, time to
first token and peak RSS, median of the repeats, each run in a fresh process so RSS is its own.
llama.cpp (llama-cpp-python) is measured when it is installed. Writes reports/generation.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_lines, write_report  # noqa: E402

PROMPT_TOKENS = 64
DECODE_TOKENS = 128

PRIMA_RUN = r"""
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
eng.generate(ids[:8], 4, Sampler(SamplingParams(temperature=0)))  # compile / warm
eng.tokens.clear()
out_ids, t = eng.generate(ids, n_gen, Sampler(SamplingParams(temperature=0)))
json.dump(dict(prompt_tps=t.prompt_tps, eval_tps=t.eval_tps, ttft_ms=t.ttft_ms,
               eval_tokens=t.eval_tokens, peak_rss_mib=t.peak_rss_mib), open(out, "w"))
"""

LLAMA_RUN = r"""
import json, resource, sys, time
import numpy as np
import llama_cpp
path, threads, n_prompt, n_gen, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
llm = llama_cpp.Llama(path, n_ctx=512, n_threads=threads, n_threads_batch=threads, n_batch=512, verbose=False)
text = "The history of the city began when the first settlers arrived at the river. " * 20
ids = llm.tokenize(text.encode(), add_bos=True)[:n_prompt]
llm.eval(ids[:8]); llm.reset()
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


def models() -> list[tuple[str, Path]]:
    from prima_ref import fetch
    from prima_ref.derived import smollm2_q8_0

    return [
        ("SmolLM2-135M Q4_1", fetch.fetch(fetch.SMOLLM2_Q4_1)),
        ("SmolLM2-135M Q8_0", smollm2_q8_0()),
        ("Gemma-3-270M Q4_K_M", fetch.fetch(fetch.GEMMA3_270M)),
    ]


def run_once(code: str, path: Path, threads: int) -> dict | None:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [sys.executable, "-c", code, str(path), str(threads), str(PROMPT_TOKENS),
               str(DECODE_TOKENS), out.name]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            print(res.stderr[-2000:], file=sys.stderr)
            return None
        return json.loads(Path(out.name).read_text())


def median_of(code, path, threads, repeats) -> dict | None:
    runs = [r for r in (run_once(code, path, threads) for _ in range(repeats)) if r]
    if not runs:
        return None
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def have_llama_cpp() -> bool:
    return subprocess.run([sys.executable, "-c", "import llama_cpp"], capture_output=True).returncode == 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    llama = have_llama_cpp()
    rows = []
    for name, path in models():
        ours = median_of(PRIMA_RUN, path, args.threads, args.repeats)
        ref = median_of(LLAMA_RUN, path, args.threads, args.repeats) if llama else None
        rows.append((name, ours, ref))
        print(f"[bench] {name}: prima {ours} llama.cpp {ref}", file=sys.stderr)
    lines = ["# Single-device generation", "", *machine_lines(),
             f"- threads: {args.threads}; prompt {PROMPT_TOKENS} tokens, {DECODE_TOKENS} greedy tokens; "
             f"median of {args.repeats} runs, each in a fresh process",
             f"- llama.cpp: {'llama-cpp-python ' + _llama_version() if llama else 'not installed in this run'}",
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
    write_report("generation.md", "\n".join(lines) + "\n")
    return 0


def _llama_version() -> str:
    res = subprocess.run([sys.executable, "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                         capture_output=True, text=True)
    return res.stdout.strip()


if __name__ == "__main__":
    raise SystemExit(main())
