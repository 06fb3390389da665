"""Whole decode steps: what one layer and rank 0's fixed work really cost in prima_ref.

Matvec speeds alone predict a Python engine's token latency 2x too low (reports/ring.md): a
decode step also runs norms, rope, attention, the KV store, activations and the interpreter
between kernels. Timing those pieces one by one still priced a real generation ~20 % low on
a VNNI machine (reports/ring.md of 2026-12-02 00:01: 10.0 ms predicted, 12.0 measured at
1 rank, CPU time equal to wall time): a piece timed alone, over and over, leaves out what a
real step adds around it: the loop's checks and streaming, fresh logits for the sampler, and
caches that the rest of the step has filled. The likeliest part of it (not verified: on a
2-core VM without VNNI, whose kernels are compute-bound, pieces and real steps agree within
1 %) is the cache: that znver4 guest shares a 260 MiB host L3 (reports/profile.md: the 29 MiB
Q8_0 head alone ran at 23 GB/s, the layers at 6.7), and the pieces' working sets (63 MiB of
layers, then the head alone) stay cached better than a real step's 92 MiB in turn. So the
figures the planner uses come from a real generation:

- generation (`step`): `Engine.generate` with prima-cli's default sampling chain on a real
  prompt, text streamed through the tokenizer's StreamDecoder as prima-cli streams it, the
  whole model on this device. Every step from one sampled token to the next is timed, and
  inside it `Transformer.forward_layers`: layer_ms = the layers' time / n_layers, fixed_ms =
  the rest of the step (embedding, output norm and head, sampling, the loop's own work).
  Only for models whose layers fit `max_bytes` (a large model's real step takes too long).
- pieces, kept beside it (and used alone for larger models): `Transformer.forward_layers`
  for one token at position `pos` over the model's layers of each quant mix (the tuple of its
  tensors' types: a Q4_K_M file has two or three mixes), in decode order up to a byte cap, so
  the working set streams as in a real step, the average layer the layer-count-weighted mean
  over the mixes; the embedding row with the output norm and head; the sampler (default chain
  and greedy) over one token's logits.

Samples last min_seconds of wall time each (a generation sample: `gen_tokens` steps); with
one thread they are timed by the process's CPU time, which on an idle device equals the wall
time and on a shared one leaves out the time slices other processes take (the mean of
wall-clock samples on this project's shared 2-core VM ran 1.7x the CPU time). With more
threads wall time is all there is.

The figures go into the device profile's `cpu.decode` (planner/profiles.py), where the
planner takes a_m and kappa from them for this model instead of from matvec speeds.
Every figure is what the code does today: a faster kernel shows up in the next profile.
"""

from __future__ import annotations

import os
import re
import time
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from profiler.stats import Stat, repeat

DECODE_POS = 32  # position the pieces' token is decoded at: a short context, after a prompt
GEN_PROMPT = "Once upon a time, in a small village by the sea, there lived"
GEN_TOKENS = 16  # steps per generation sample: each repeat is one generation
SEED_TRIES = 5  # seeds tried per sample before giving up on a model that ends at once
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


class GenerationTooShort(RuntimeError):
    """Every seed tried drew an end-of-generation token before one decode step."""


@dataclass(frozen=True)
class StepResult:
    """Real generation steps (Engine.generate): per token, the whole step and its layers."""

    step_ms: Stat  # one sampled token to the next: sampling, loop, embedding, layers, head
    layers_ms: Stat  # of that, Transformer.forward_layers over every layer
    n_layers: int
    tokens: int  # steps per sample
    mean_pos: float  # mean position of the timed steps' tokens

    @property
    def layer_ms(self) -> float:
        return self.layers_ms.mean / self.n_layers

    @property
    def fixed_ms(self) -> float:
        return self.step_ms.mean - self.layers_ms.mean


@dataclass(frozen=True)
class DecodeResult:
    mixes: tuple[MixResult, ...]
    head_ms: Stat  # embedding row + output norm + output matrix
    sample_ms: Stat  # prima-cli's default sampling chain over the logits
    sample_greedy_ms: Stat
    pos: int
    threads: int
    clock: str = "wall"  # "cpu": one thread, timed by the process's CPU time
    step: StepResult | None = None  # real generation steps (None: the model is over max_bytes)

    @property
    def mix_layer_ms(self) -> float:
        """The average layer timed alone: layer-count-weighted mean over the quant mixes."""
        n = sum(m.n_layers for m in self.mixes)
        return sum(m.layer_ms.mean * m.n_layers for m in self.mixes) / n

    @property
    def layer_ms(self) -> float:
        return self.step.layer_ms if self.step is not None else self.mix_layer_ms

    @property
    def fixed_ms(self) -> float:
        if self.step is not None:
            return self.step.fixed_ms
        return self.head_ms.mean + self.sample_ms.mean

    @property
    def n_ctx(self) -> int:
        """KV entries the timed tokens' attention read, on average (position + 1)."""
        return round(self.step.mean_pos) + 1 if self.step is not None else self.pos + 1


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
                   min_seconds: float, pos: int = DECODE_POS, generation: bool = True,
                   gen_tokens: int = GEN_TOKENS) -> DecodeResult:
    """generation: also time real generation steps when the model's layers fit max_bytes."""
    from prima_ref import repacked
    from prima_ref.gguf_file import GGUFModel
    from prima_ref.quants import set_num_threads

    set_num_threads(threads)
    with GGUFModel.open(model_path) as g:
        ranges, mix_ids = g.layer_ranges(), layer_mixes(g)
    chosen = {mix: _chosen(ids, ranges, max_bytes) for mix, ids in mix_ids.items()}
    # the file the engine maps (the repacked copy where the CPU reads one), for these layers
    with repacked.open_model(model_path, set().union(*chosen.values()), head=True) as g:
        mixes = [_time_mix(g, mix, ids, chosen[mix], ranges, repeats, min_seconds, pos, threads)
                 for mix, ids in mix_ids.items()]
        head, sample, greedy = _time_head(g, repeats, min_seconds, threads == 1)
    layers_bytes = sum(hi - lo for lo, hi in ranges.values())
    step = None
    if generation and layers_bytes <= max_bytes:
        try:
            step = time_generation(model_path, tokens=gen_tokens, repeats=repeats,
                                   cpu_clock=threads == 1)
        except GenerationTooShort:  # the model ends every try at once: the pieces then
            step = None
    return DecodeResult(mixes=tuple(mixes), head_ms=head, sample_ms=sample,
                        sample_greedy_ms=greedy, pos=pos, threads=threads,
                        clock="cpu" if threads == 1 else "wall", step=step)


def time_generation(model_path, *, tokens: int, repeats: int, cpu_clock: bool,
                    prompt: str = GEN_PROMPT) -> StepResult:
    """Engine.generate as prima-cli runs it (default chain, text streamed), one warm-up
    generation then `repeats` timed ones; each reuses the prompt's cached prefix, as a chat's
    next turn does, so only decode steps and the prompt's last token run."""
    from prima_ref.engine import Engine
    from prima_ref.sampling import Sampler, SamplingParams

    clock = time.process_time if cpu_clock else time.perf_counter
    engine = Engine(model_path, n_ctx=256 + tokens, n_batch=64)
    ids = engine.tokenizer.encode(prompt, add_special=True, parse_special=True)
    model, layers_s = engine.model, [0.0]
    forward_layers = model.forward_layers

    def timed_layers(*args, **kw):  # the real method, its time added up
        t0 = clock()
        try:
            return forward_layers(*args, **kw)
        finally:
            layers_s[0] += clock() - t0

    model.forward_layers = timed_layers
    sink = open(os.devnull, "w")  # noqa: SIM115  (closed below)

    def emit(text: str) -> None:  # prima-cli's _emit, to nowhere
        sink.write(text)
        sink.flush()

    def one(seed: int) -> tuple[float, float, float]:
        marks = []  # (clock, layers so far) before each sampling: one step between two marks

        def mark(_logits) -> None:
            marks.append((clock(), layers_s[0]))

        out, _ = engine.generate(ids, tokens + 1, Sampler(SamplingParams(seed=seed)),
                                 on_text=emit, on_logits=mark)
        if len(marks) < 2:
            raise GenerationTooShort(f"the generation ended after {len(out)} tokens")
        (c0, l0), (c1, l1) = marks[0], marks[-1]
        n = len(marks) - 1
        return (c1 - c0) * 1e3 / n, (l1 - l0) * 1e3 / n, len(ids) + (n - 1) / 2

    def some(seed: int) -> tuple[float, float, float]:
        """one(seed), or with the next seeds where the model ends at once (EOG first)."""
        for s in range(seed, seed + 100 * SEED_TRIES, 100):
            try:
                return one(s)
            except GenerationTooShort:
                last = s
        raise GenerationTooShort(f"{SEED_TRIES} generations up to seed {last} ended before "
                                 "a decode step")

    try:
        some(0)  # warm-up: kernels loaded, pages in
        runs = [some(1 + r) for r in range(max(1, repeats))]
    finally:
        sink.close()
        engine.close()
    return StepResult(step_ms=Stat(tuple(r[0] for r in runs)),
                      layers_ms=Stat(tuple(r[1] for r in runs)), n_layers=model.cfg.n_layer,
                      tokens=tokens, mean_pos=sum(r[2] for r in runs) / len(runs))


def _chosen(ids: list[int], ranges, max_bytes: int) -> list[int]:
    """The mix's layers timed: in decode order, up to max_bytes (at least one)."""
    chosen, total = [], 0
    for il in ids:
        n = ranges[il][1] - ranges[il][0]
        if chosen and total + n > max_bytes:
            break
        chosen.append(il)
        total += n
    return chosen


def _time_mix(g, mix, ids: list[int], chosen: list[int], ranges, repeats: int,
              min_seconds: float, pos: int, threads: int) -> MixResult:
    from prima_ref.model.transformer import Transformer

    layer_bytes = [ranges[il][1] - ranges[il][0] for il in ids]
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
            "fixed_ms": result.fixed_ms, "n_ctx": result.n_ctx, "n_threads": result.threads}


def decode_extra(result: DecodeResult) -> dict:
    step = result.step
    if step is not None:
        definition = ("real generation steps (Engine.generate, prima-cli's default sampling "
                      "chain, text streamed): layer_ms = Transformer.forward_layers' time per "
                      "step / n_layers; fixed_ms = the rest of the step (embedding, output "
                      "norm and head, sampling, the loop); n_ctx = mean position + 1")
    else:
        definition = ("pieces timed alone (the model's layers are over the byte cap for a "
                      "real generation): layer_ms: Transformer.forward_layers for one token "
                      "at position pos, per quant mix over its layers in order; fixed_ms: "
                      "embedding row + output norm and head + default sampling chain")
    out = {"definition": definition,
           "clock": result.clock + (" (1 thread: CPU time, so other processes' time slices "
                                    "do not count)" if result.clock == "cpu" else ""),
           "pieces_layer_ms": result.mix_layer_ms, "n_ctx_pieces": result.pos + 1,
           "head_ms": result.head_ms.mean, "head_ms_std": result.head_ms.std,
           "sample_ms": result.sample_ms.mean, "sample_ms_std": result.sample_ms.std,
           "sample_greedy_ms": result.sample_greedy_ms.mean,
           "mixes": [{"types": sorted({q for _, q in m.mix}), "n_layers": m.n_layers,
                      "n_timed": m.n_timed, "layer_bytes": m.layer_bytes,
                      "layer_ms": m.layer_ms.mean, "layer_ms_std": m.layer_ms.std}
                     for m in result.mixes]}
    if step is not None:
        out["generation"] = {"step_ms": step.step_ms.mean, "step_ms_std": step.step_ms.std,
                             "layers_ms": step.layers_ms.mean,
                             "layers_ms_std": step.layers_ms.std, "n_tokens": step.tokens,
                             "repeats": len(step.step_ms.samples),
                             "n_ctx_mean": step.mean_pos + 1}
    return out
