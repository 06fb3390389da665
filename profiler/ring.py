"""What the ring itself costs this device: a rank's work per window beyond its layers.

A token on a ring of M devices and k rounds makes k*M hops, and every hop costs more than the
network: the receiving rank wakes, receives and decodes the multipart message, checks its
header, runs its window, frames the result and sends it on; rank 0 frames, sends and waits
k times per token. In this Python engine that work (a ZeroMQ receive and send, header checks,
the window's bookkeeping, the ranks' control and I/O threads) costs about as much CPU as a few
layers of a small model, and the planner's network term (latency + bytes / bandwidth) leaves
it out. So this module runs the engine's own ring on loopback and measures it:

    rank 0 (this process, prima_ref's Head)  -- DATA (1 x n_embd) -->  rank 1 (`prima-cli
    --rank 1`, a child process)  runs one layer, sends back;  -lw 0,1: k = n_layers rounds
    a token, rank 0 holding no layer, so each round is one window on rank 1 and one round trip

    window_ms  rank 1's CPU time per window (user + system, every thread of the process)
               minus the layer it ran (the model's average layer at one thread, CPU time,
               timed by the decode profile's code in rank 0's process before and after)
    round_ms   rank 0's CPU time per round (every thread of this process) minus the
               embedding and output head (head_ms, timed here right after)

CPU time, not wall time: the two processes take turns on this device's cores, so the wall
time of a loopback ring is their sum plus whatever else runs; on an idle device the two agree.
Both ranks run one kernel thread: the work measured is the runtime's single-threaded Python,
and CPU time at one thread leaves out the time slices of other processes (threads > 1 are
timed by wall clock, which on a shared device is not the code's). Rank 0 runs in a child
process too (`python -m profiler.ring`), started with GOMP_SPINCOUNT=0 as prima-cli starts
every rank of a ring: profile-tool's own OpenMP threads, spinning after its matvec tests,
would otherwise take the cores the worker's turn needs.
The ranks of this ring do not spin before they block on a receive (PRIMA_RING_SPIN_MS=0, see
prima_ref.ring.protocol.wait_readable): spinning is waiting, which CPU time would count as work.
The figures go into the device profile's `ring` (schema v3), where planner.latency adds
window_ms to every worker's hop term and round_ms to rank 0's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from profiler.stats import Stat

RING_CTX = 256  # KV positions: warm-up plus every timed token fits, at a short context


@dataclass(frozen=True)
class RingResult:
    window_ms: Stat  # a worker's CPU per window beyond its layers
    round_ms: Stat  # rank 0's CPU per round beyond the embedding and output head
    k: int  # rounds (windows of one layer) per token
    tokens: int  # tokens per sample
    n_embd: int
    layer_ms: float  # what was subtracted per window
    head_ms: float  # what was subtracted per token


class RingUnavailable(RuntimeError):
    pass


def _cpu_s(pid: int | None = None) -> float:
    """CPU seconds (user + system, all threads) of this process, or of child `pid`: the sum of
    its threads' schedstat run times (nanoseconds), else /proc/PID/stat's clock ticks."""
    if pid is None:
        return time.process_time()
    try:
        return sum(int((t / "schedstat").read_text().split()[0])
                   for t in Path(f"/proc/{pid}/task").iterdir()) / 1e9
    except (OSError, ValueError, IndexError):  # a thread that just ended, or no schedstat
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def ring_overhead(model_path, *, tokens: int, repeats: int, max_bytes: int,
                  min_seconds: float, timeout_s: float = 600.0) -> RingResult:
    """Run a 2-rank loopback ring (-lw 0,1) on this model, rank 0 in a child process started
    as prima-cli starts a ring's ranks; see the module docstring."""
    cmd = [sys.executable, "-m", "profiler.ring", str(model_path), "--tokens", str(tokens),
           "--repeats", str(repeats), "--max-bytes", str(max_bytes), "--min-seconds",
           repr(min_seconds)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                              env={**os.environ, "GOMP_SPINCOUNT": "0",
                                   "PRIMA_RING_SPIN_MS": "0"})
    except subprocess.TimeoutExpired:
        raise RingUnavailable(f"the loopback ring took over {timeout_s:.0f} s") from None
    if proc.returncode != 0:
        raise RingUnavailable(f"the loopback ring failed (exit {proc.returncode}): "
                              f"{proc.stderr[-600:]}")
    d = json.loads(proc.stdout)
    return RingResult(window_ms=Stat(tuple(d["window_ms"])), round_ms=Stat(tuple(d["round_ms"])),
                      k=d["k"], tokens=d["tokens"], n_embd=d["n_embd"],
                      layer_ms=d["layer_ms"], head_ms=d["head_ms"])


def _measure(model_path, *, layer_ms: float, tokens: int, repeats: int) -> RingResult:
    """Rank 0's side, in this process; rank 1 a prima-cli child."""
    from prima_ref.engine import Engine
    from prima_ref.ring.launch import LocalRing, free_port_base
    from prima_ref.ring.topology import Layout, RingOptions, load_plan, make_plan

    tmp = Path(tempfile.mkdtemp(prefix="profile-ring-"))
    engine = None
    try:
        from prima_ref.gguf_file import GGUFModel
        from prima_ref.model.config import ModelConfig

        with GGUFModel.open(model_path) as g:
            cfg = ModelConfig.from_gguf(g)
        layout = Layout.from_window_sizes([0, 1], cfg.n_layer)
        base = free_port_base(2)
        plan = make_plan(model_path, layout, ctx=RING_CTX, data_port=base,
                         signal_port=free_port_base(2))
        (tmp / "plan.json").write_text(json.dumps(plan))
        p = load_plan(tmp / "plan.json")
        with LocalRing(model_path, tmp / "plan.json", worker_args=["-t", "1"],
                       log_dir=tmp) as ring:
            worker = ring.procs[1].pid
            engine = Engine(model_path, n_ctx=RING_CTX, n_batch=1,
                            ring=RingOptions(p.endpoints(0), p.layout, p.sha256))
            n_vocab = engine.model.tok_embd.rows.shape[0]
            ids = np.random.default_rng(0).integers(0, n_vocab, 1 + tokens * (repeats + 1))
            engine.eval([int(ids[0])])
            engine.eval([int(t) for t in ids[1:1 + tokens]])  # warm-up: pages in, kernels loaded
            windows, rounds = [], []
            for r in range(repeats):
                batch = [int(t) for t in ids[1 + tokens * (r + 1):1 + tokens * (r + 2)]]
                w0, c0 = _cpu_s(worker), _cpu_s()
                for tok in batch:
                    engine.eval([tok])
                w1, c1 = _cpu_s(worker), _cpu_s()
                windows.append((w1 - w0) * 1e3 / (tokens * layout.k) - layer_ms)
                rounds.append((c1 - c0) * 1e3 / tokens)
            head_ms = _head_ms(engine, ids, tokens)
            engine.close()
            engine = None
            codes = ring.wait(10)
            if codes.get(1) != 0:
                raise RingUnavailable(f"rank 1 exited with {codes.get(1)}: "
                                      f"{ring.log(1)[-400:]}")
    except (OSError, RuntimeError) as e:
        raise RingUnavailable(f"loopback ring failed: {e}") from e
    finally:
        if engine is not None:
            engine.close()
    return RingResult(window_ms=Stat(tuple(windows)),
                      round_ms=Stat(tuple((r - head_ms) / layout.k for r in rounds)),
                      k=layout.k, tokens=tokens, n_embd=cfg.n_embd, layer_ms=layer_ms,
                      head_ms=head_ms)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m profiler.ring",
                                 description="profile-tool's loopback ring (rank 0's side)")
    ap.add_argument("model")
    ap.add_argument("--tokens", type=int, required=True)
    ap.add_argument("--repeats", type=int, required=True)
    ap.add_argument("--max-bytes", type=int, required=True)
    ap.add_argument("--min-seconds", type=float, required=True)
    args = ap.parse_args(argv)
    from profiler.decode import decode_profile

    def layer_ms() -> float:  # one thread, CPU time: a layer alone, as each window runs one
        return decode_profile(args.model, threads=1, repeats=1, max_bytes=args.max_bytes,
                              min_seconds=args.min_seconds, generation=False).mix_layer_ms

    before = layer_ms()
    r = _measure(args.model, layer_ms=0.0, tokens=args.tokens, repeats=args.repeats)
    layer = (before + layer_ms()) / 2
    print(json.dumps({"window_ms": [w - layer for w in r.window_ms.samples],
                      "round_ms": r.round_ms.samples, "k": r.k, "tokens": r.tokens,
                      "n_embd": r.n_embd, "head_ms": r.head_ms, "layer_ms": layer}))
    return 0


def _head_ms(engine, ids, tokens: int) -> float:
    """CPU ms of rank 0's embedding + output head for one token, as the timed loop ran them."""
    model = engine.model
    c0 = time.process_time()
    for tok in ids[:tokens]:
        model.logits(model.embed([int(tok)]))
    return (time.process_time() - c0) * 1e3 / tokens


def ring_entry(result: RingResult, model_name: str) -> dict:
    """The device profile's `ring` (planner/profiles.py reads it)."""
    return {"window_ms": max(0.0, result.window_ms.mean),
            "round_ms": max(0.0, result.round_ms.mean), "n_embd": result.n_embd,
            "model": model_name, "n_threads": 1}


def ring_extra(result: RingResult) -> dict:
    return {"definition": "2-rank loopback ring of prima_ref, 1 thread per rank (-lw 0,1: "
                          "k = n_layers rounds of one layer on rank 1); window_ms = rank 1's "
                          "CPU time per window - layer_ms (the average layer, 1 thread, CPU "
                          "time); round_ms = (rank 0's CPU time per token - head_ms) / k; "
                          "CPU time of every thread of each process",
            "window_ms_std": result.window_ms.std, "round_ms_std": result.round_ms.std,
            "window_ms_samples": list(result.window_ms.samples),
            "round_ms_samples": list(result.round_ms.samples),
            "n_windows_per_token": result.k, "n_tokens_per_sample": result.tokens,
            "layer_ms_subtracted": result.layer_ms,
            "head_ms_subtracted": result.head_ms}


if __name__ == "__main__":
    raise SystemExit(main())
