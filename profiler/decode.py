"""Whole decode steps: what one layer and rank 0's fixed work really cost in prima_ref.

Matvec speeds alone predict a Python engine's token latency 2x too low (reports/ring.md): a
decode step also runs norms, rope, attention, the KV store, activations and the interpreter
between kernels. So this module times the engine's own code on the model's own layers:

- layer_ms: `Transformer.forward_layers` for one token at position `pos`, over the model's
  layers of each quant mix (the tuple of its tensors' types: a Q4_K_M file has two or three
  mixes), in decode order up to a byte cap, so the working set streams as in a real step; the
  average layer is the layer-count-weighted mean over the mixes.
- fixed_ms: rank 0's once-per-token work: the embedding row, the output norm and head, and
  the sampler (prima-cli's default chain, and greedy, both recorded).

Samples last min_seconds of wall time each; with one thread they are timed by the process's
CPU time, which on an idle device equals the wall time and on a shared one leaves out the
time slices other processes take (the mean of wall-clock samples on this project's shared
2-core VM ran 1.7x the CPU time). With more threads wall time is all there is.

The figures go into the device profile's `cpu.decode` (planner/profiles.py, schema version 2),
where the planner takes a_m and kappa from them for this model instead of from matvec speeds.
Every figure is what the code does today: a faster kernel shows up in the next profile.
"""

from __future__ import annotations

import re
import time
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from profiler.stats import Stat, repeat

DECODE_POS = 32  # position the token is decoded at: a short context, as after a prompt
_LAYER = re.compile(r"^blk\.(\d+)\.")


def _sample_ms(fn, min_seconds: float, cpu_clock: bool) -> float:
    """ms per call of fn over calls lasting min_seconds of wall time; cpu_clock: the process's
    CPU time instead (one thread: the code's own cost, not the time slices of neighbours)."""
    clock = time.process_time if cpu_clock else time.perf_counter
    passes, w0, c0 = 0, time.perf_counter(), clock()
    while True:
        fn()
        passes += 1
        if time.perf_counter() - w0 >= min_seconds:
            return (clock() - c0) / passes * 1e3


@dataclass(frozen=True)
class MixResult:
    mix: tuple[tuple[str, str], ...]  # (role, quant type) of the layer's tensors
    n_layers: int  # layers of the model with this mix
    n_timed: int  # of those, timed per pass
    layer_bytes: float  # weight bytes of one such layer
    layer_ms: Stat


@dataclass(frozen=True)
class DecodeResult:
    mixes: tuple[MixResult, ...]
    head_ms: Stat  # embedding row + output norm + output matrix
    sample_ms: Stat  # prima-cli's default sampling chain over the logits
    sample_greedy_ms: Stat
    pos: int
    threads: int
    clock: str = "wall"  # "cpu": one thread, timed by the process's CPU time

    @property
    def layer_ms(self) -> float:
        """The average layer: layer-count-weighted mean over the quant mixes."""
        n = sum(m.n_layers for m in self.mixes)
        return sum(m.layer_ms.mean * m.n_layers for m in self.mixes) / n

    @property
    def fixed_ms(self) -> float:
        return self.head_ms.mean + self.sample_ms.mean


def layer_mixes(gguf_model) -> dict[tuple[tuple[str, str], ...], list[int]]:
    """Quant mix -> layer ids with it, in layer order."""
    roles: dict[int, list[tuple[str, str]]] = defaultdict(list)
    for t in gguf_model.tensors.values():
        m = _LAYER.match(t.name)
        if m:
            roles[int(m.group(1))].append((t.name[m.end():], t.qtype.name))
    mixes: dict[tuple, list[int]] = defaultdict(list)
    for il in sorted(roles):
        mixes[tuple(sorted(roles[il]))].append(il)
    return dict(mixes)


def decode_profile(model_path, *, threads: int, repeats: int, max_bytes: int,
                   min_seconds: float, pos: int = DECODE_POS) -> DecodeResult:
    from prima_ref.gguf_file import GGUFModel
    from prima_ref.quants import set_num_threads

    set_num_threads(threads)
    with GGUFModel.open(model_path) as g:
        ranges = g.layer_ranges()
        mixes = []
        for mix, ids in layer_mixes(g).items():
            mixes.append(_time_mix(g, mix, ids, ranges, repeats, max_bytes, min_seconds, pos,
                                   threads))
        head, sample, greedy = _time_head(g, repeats, min_seconds, threads == 1)
    return DecodeResult(mixes=tuple(mixes), head_ms=head, sample_ms=sample,
                        sample_greedy_ms=greedy, pos=pos, threads=threads,
                        clock="cpu" if threads == 1 else "wall")


def _time_mix(g, mix, ids: list[int], ranges, repeats: int, max_bytes: int,
              min_seconds: float, pos: int, threads: int) -> MixResult:
    from prima_ref.model.transformer import Transformer

    layer_bytes = [ranges[il][1] - ranges[il][0] for il in ids]
    chosen, total = [], 0
    for il, n in zip(ids, layer_bytes, strict=True):
        if chosen and total + n > max_bytes:
            break
        chosen.append(il)
        total += n
    tr = Transformer(g, pos + 1, layers=chosen, head=False)
    x = np.random.default_rng(0).standard_normal((1, tr.cfg.n_embd)).astype(np.float32)
    positions = np.array([pos], dtype=np.int64)

    def one_pass():
        for il in chosen:  # each layer sees the same input: the cost, not the values, matters
            tr.forward_layers(x, positions, il, il + 1)

    one_pass()  # compiled kernels loaded, pages in
    cpu_clock = threads == 1

    def ms_per_layer() -> float:
        return _sample_ms(one_pass, min_seconds, cpu_clock) / len(chosen)

    return MixResult(mix=mix, n_layers=len(ids), n_timed=len(chosen),
                     layer_bytes=sum(layer_bytes) / len(ids),
                     layer_ms=repeat(ms_per_layer, repeats))


def _time_head(g, repeats: int, min_seconds: float, cpu_clock: bool) -> tuple[Stat, Stat, Stat]:
    from prima_ref.model.transformer import Transformer
    from prima_ref.sampling import Sampler, SamplingParams

    tr = Transformer(g, 1, layers=[], head=True)
    n_vocab = tr.tok_embd.rows.shape[0]
    tokens = np.random.default_rng(0).integers(0, n_vocab, 4096)
    i = [0]

    def head():
        tok = int(tokens[i[0] % tokens.size])
        i[0] += 1
        return tr.logits(tr.embed([tok]))[0]

    logits = head()
    default, greedy = Sampler(SamplingParams(seed=0)), Sampler(SamplingParams(temperature=0))

    def ms(fn) -> Stat:
        fn()
        return repeat(lambda: _sample_ms(fn, min_seconds, cpu_clock), repeats)

    return ms(head), ms(lambda: default.sample(logits)), ms(lambda: greedy.sample(logits))


def decode_entry(result: DecodeResult, profile) -> dict:
    """The profile's `cpu.decode` entry for one model (planner/profiles.py reads it)."""
    return {"model": profile.name, "n_layers": profile.n_layers,
            "layer_bytes": profile.layer.n_bytes, "layer_ms": result.layer_ms,
            "fixed_ms": result.fixed_ms, "n_ctx": result.pos + 1, "n_threads": result.threads}


def decode_extra(result: DecodeResult) -> dict:
    return {"definition": "layer_ms: Transformer.forward_layers for one token at position pos, "
                          "per quant mix over its layers in order; fixed_ms: embedding row + "
                          "output norm and head + default sampling chain",
            "clock": result.clock + (" (1 thread: CPU time, so other processes' time slices "
                                     "do not count)" if result.clock == "cpu" else ""),
            "head_ms": result.head_ms.mean, "head_ms_std": result.head_ms.std,
            "sample_ms": result.sample_ms.mean, "sample_ms_std": result.sample_ms.std,
            "sample_greedy_ms": result.sample_greedy_ms.mean,
            "mixes": [{"types": sorted({q for _, q in m.mix}), "n_layers": m.n_layers,
                       "n_timed": m.n_timed, "layer_bytes": m.layer_bytes,
                       "layer_ms": m.layer_ms.mean, "layer_ms_std": m.layer_ms.std}
                      for m in result.mixes]}
