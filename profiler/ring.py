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
               minus the layer it ran (the decode profile's layer_ms, timed just before)
    round_ms   rank 0's CPU time per round (every thread of this process) minus the
               embedding and output head (head_ms, timed here right after)

CPU time, not wall time: the two processes take turns on this device's cores, so the wall
time of a loopback ring is their sum plus whatever else runs; on an idle device the two agree.
The figures go into the device profile's `ring` (schema v3), where planner.latency adds
window_ms to every worker's hop term and round_ms to rank 0's.
"""

from __future__ import annotations

import json
import os
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


def ring_overhead(model_path, *, threads: int, layer_ms: float, tokens: int, repeats: int,
                  log=print) -> RingResult:
    """Run a 2-rank loopback ring (-lw 0,1) on this model; see the module docstring."""
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
        with LocalRing(model_path, tmp / "plan.json", worker_args=["-t", str(threads)],
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


def _head_ms(engine, ids, tokens: int) -> float:
    """CPU ms of rank 0's embedding + output head for one token, as the timed loop ran them."""
    model = engine.model
    c0 = time.process_time()
    for tok in ids[:tokens]:
        model.logits(model.embed([int(tok)]))
    return (time.process_time() - c0) * 1e3 / tokens


def ring_entry(result: RingResult, model_name: str, threads: int) -> dict:
    """The device profile's `ring` (planner/profiles.py reads it)."""
    return {"window_ms": max(0.0, result.window_ms.mean),
            "round_ms": max(0.0, result.round_ms.mean), "n_embd": result.n_embd,
            "model": model_name, "n_threads": threads}


def ring_extra(result: RingResult) -> dict:
    return {"definition": "2-rank loopback ring of prima_ref (-lw 0,1: k = n_layers rounds of "
                          "one layer on rank 1); window_ms = rank 1's CPU time per window - "
                          "layer_ms; round_ms = (rank 0's CPU time per token - head_ms) / k; "
                          "CPU time of every thread of each process",
            "window_ms_std": result.window_ms.std, "round_ms_std": result.round_ms.std,
            "window_ms_samples": list(result.window_ms.samples),
            "round_ms_samples": list(result.round_ms.samples),
            "n_windows_per_token": result.k, "n_tokens_per_sample": result.tokens,
            "layer_ms_subtracted": result.layer_ms,
            "head_ms_subtracted": result.head_ms}
