"""Batched decode in process: what a forward of 1, 2, 4 or 8 rows costs, and where it goes.

    python bench/decode_batch.py [--threads 2] [--steps 20]

A server with -np N steps its N requests' next tokens in one forward (Engine.decode). This
times that forward on SmolLM2-135M Q4_1 (the model bench/server.py serves), without HTTP,
sampling or the scheduler, so reports/server.md's totals can be read against it: aggregate
tok/s at n clients can be at most n / step(n) against 1 / step(1).

Each slot first reads a 55-token prompt. Then the n-row step runs --steps times at growing
positions (median and best). The kernels doing the work are timed by wrapping the module
functions the transformer calls (prima_ref.quants.batched / fused), so their sum is
per-step time inside Numba and the rest is Python between them.
Writes reports/decode_batch.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("GOMP_SPINCOUNT", "30000")  # as prima-server sets it (prima_ref.server)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_lines, write_report  # noqa: E402

ROWS = (1, 2, 4, 8)
PROMPT = list(range(5, 60))  # 55 tokens of context per slot before the timed steps
# the kernel entry points a decode step goes through, by module
PARTS = {"batched": ("group", "gate_up"),
         "fused": ("attention_step", "attention_rows", "matvec_group", "ffn_gate_up", "kq_matvec")}


class PartTimer:
    """Wraps module functions so each call's wall time adds to a per-name total."""

    def __init__(self, modules: dict):
        self.total: dict[str, float] = {}
        for module, names in modules.items():
            for name in names:
                setattr(module, name, self._timed(name, getattr(module, name)))

    def _timed(self, name, fn):
        def call(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.total[name] = self.total.get(name, 0.0) + time.perf_counter() - t0
        return call


def fill_slots(eng, n: int) -> None:
    """Slots 0..n-1 each hold PROMPT's context."""
    for s in range(n):
        eng.kv_remove(0, s)
        eng.eval(PROMPT, slot=s)


def step_times(eng, n: int, steps: int, clock=time.perf_counter, warm: int = 3) -> list[float]:
    """Seconds (by clock) of each of `steps` Engine.decode forwards of n rows (slots 0..n-1,
    one token each), after `warm` untimed ones. bench/server.py's CPU-cost table uses it."""
    slots = list(range(n))
    for _ in range(warm):
        eng.decode(slots, [100] * n)
    times = []
    for _ in range(steps):
        t0 = clock()
        eng.decode(slots, [100] * n)
        times.append(clock() - t0)
    return times


def measure(threads: int, steps: int) -> list[dict]:
    from prima_ref import fetch
    from prima_ref.engine import Engine
    from prima_ref.quants import batched, fused, set_num_threads

    set_num_threads(threads)
    eng = Engine(fetch.fetch(), n_ctx=512, n_slots=max(ROWS))
    for n in range(1, max(ROWS) + 1):  # every kernel compiled or loaded, pages mapped, before
        eng.decode(list(range(n)), [1] * n)  # the wrappers: a kernel calling another needs it
    timer = PartTimer({batched: PARTS["batched"], fused: PARTS["fused"]})
    rows = []
    for n in ROWS:
        fill_slots(eng, n)
        step_times(eng, n, 3, warm=0)
        timer.total.clear()
        times = sorted(step_times(eng, n, steps, warm=0))
        rows.append({"rows": n, "median_ms": times[len(times) // 2] * 1e3,
                     "best_ms": times[0] * 1e3,
                     "parts_ms": {k: v / steps * 1e3 for k, v in sorted(timer.total.items())}})
    return rows


def render(rows: list[dict], threads: int, steps: int) -> str:
    one = rows[0]["median_ms"]
    names = sorted({k for r in rows for k in r["parts_ms"]})
    lines = ["# Batched decode step (in process)", "",
             "Written by `bench/decode_batch.py`: one Engine.decode forward of n rows, "
             f"SmolLM2-135M Q4_1, {threads} threads, median of {steps} steps at positions "
             f"{len(PROMPT) + 4}..{len(PROMPT) + 3 + steps}; no HTTP, sampling or scheduler.", "",
             *machine_lines(), "",
             "| rows | step ms (median) | best | rows/s | vs 1 row | ms per row | "
             + " | ".join(f"{n} ms" for n in names) + " | Python ms |",
             "|---|---|---|---|---|---|" + "---|" * len(names) + "---|"]
    for r in rows:
        parts = [r["parts_ms"].get(n, 0.0) for n in names]
        # logits' head product is a matvec_group call too: kernels never nest, so the sum holds
        rest = r["median_ms"] - sum(parts)
        lines.append(
            f"| {r['rows']} | {r['median_ms']:.2f} | {r['best_ms']:.2f} | "
            f"{r['rows'] / r['median_ms'] * 1e3:.0f} | {r['rows'] * one / r['median_ms']:.2f}x | "
            f"{r['median_ms'] / r['rows']:.2f} | " + " | ".join(f"{p:.2f}" for p in parts)
            + f" | {rest:.2f} |")
    lines += ["", "Part columns are per step, summed over the step's calls (the 1-row step "
              "uses the fused one-row kernels, 2-8 rows the batched ones); 'Python ms' is the "
              "step's median less the parts' means, so it is approximate. 'vs 1 row' is the "
              "throughput gain n * step(1) / step(n): the ceiling for bench/server.py's "
              "aggregate tok/s at n clients before HTTP and sampling.", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args(argv)
    if args.steps < 1 or args.threads < 1:
        raise SystemExit("--steps and --threads must be >= 1")
    text = render(measure(args.threads, args.steps), args.threads, args.steps)
    write_report("decode_batch.md", text)
    print(text)


if __name__ == "__main__":
    main()
