"""Single-device generation: prompt processing in batches, then token-by-token decode.

This is what a ring's rank 0 does when it holds every layer, and the reference every ring
configuration must reproduce token for token.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import numpy as np

from prima_ref import repacked
from prima_ref.model.config import ModelConfig
from prima_ref.model.transformer import ContextFullError, Transformer, row_by_row
from prima_ref.sampling import Sampler
from prima_ref.tokenizer import StreamDecoder, Tokenizer


@dataclass
class Timings:
    load_ms: float = 0.0
    prompt_tokens: int = 0
    prompt_ms: float = 0.0
    eval_tokens: int = 0
    eval_ms: float = 0.0
    ttft_ms: float = 0.0  # request start to first generated token
    peak_rss_mib: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_ms * 1e3 if self.prompt_ms else 0.0

    @property
    def eval_tps(self) -> float:
        return self.eval_tokens / self.eval_ms * 1e3 if self.eval_ms else 0.0

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(prompt_tokens_per_s=self.prompt_tps, eval_tokens_per_s=self.eval_tps)
        return d

    def print(self, stream=sys.stderr) -> None:
        def line(label, ms, n, unit):
            per = ms / n if n else 0.0
            tps = n / ms * 1e3 if ms else 0.0
            print(f"[perf] {label:>16} = {ms:10.2f} ms / {n:5d} {unit} ({per:8.2f} ms per token, "
                  f"{tps:8.2f} tokens per second)", file=stream)
        print(f"[perf] {'load time':>16} = {self.load_ms:10.2f} ms", file=stream)
        line("prompt eval time", self.prompt_ms, self.prompt_tokens, "tokens")
        line("eval time", self.eval_ms, self.eval_tokens, "runs  ")
        print(f"[perf] {'peak RSS':>16} = {self.peak_rss_mib:10.1f} MiB", file=stream)


def peak_rss_mib() -> float:
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib / 1024 if sys.platform != "darwin" else kib / 2**20


class Engine:
    """One device holding every layer, or rank 0 of a ring (`ring` given): then it holds the
    embedding, the output head and its own windows, and each forward goes round the ring.

    n_slots > 1 keeps that many independent sequences (a server's requests), n_ctx positions
    each; eval/reuse_prefix take a slot, and decode() steps several slots in one forward."""

    def __init__(self, path, n_ctx: int = 4096, n_batch: int = 512, ring=None, n_slots: int = 1,
                 gpu_layers: int = 0, gpu_mem_gib: float | None = None):
        t0 = time.perf_counter()
        # the repacked copy where the CPU reads it (prima_ref.repacked), filled for our layers
        self.gguf = repacked.open_model(path, None if ring is None else ring.layout.layers_of(0))
        self.tokenizer = Tokenizer.from_metadata(self.gguf.get)
        if n_ctx <= 0:
            n_ctx = ModelConfig.from_gguf(self.gguf).n_ctx_train
        self.n_batch = max(1, n_batch)
        self.ring = None
        if ring is None:
            self.model = Transformer(self.gguf, n_ctx, n_slots=n_slots, gpu_layers=gpu_layers,
                                     gpu_mem_gib=gpu_mem_gib)
            self._forward = self.model.forward
            self._forward_rows = self.model.forward_rows
        else:
            from prima_ref.ring.head import Head
            from prima_ref.ring.topology import model_sha256

            self.model = Transformer(self.gguf, n_ctx, layers=ring.layout.layers_of(0), head=True,
                                     n_slots=n_slots, gpu_layers=gpu_layers, gpu_mem_gib=gpu_mem_gib)
            self.ring = Head(ring, self.gguf, self.model, n_batch=self.n_batch,
                             sha256=ring.sha256 or model_sha256(path))
            self._forward = self.ring.forward
            self._forward_rows = self.ring.forward_rows
        self.n_ctx, self.n_slots = self.model.n_ctx, n_slots
        # what each slot's KV cache holds, position by position
        self.slot_tokens: list[list[int]] = [[] for _ in range(n_slots)]
        self.load_ms = (time.perf_counter() - t0) * 1e3

    @property
    def tokens(self) -> list[int]:
        """What slot 0's KV cache holds (the only slot of a single-sequence engine)."""
        return self.slot_tokens[0]

    @tokens.setter
    def tokens(self, value: list[int]) -> None:
        self.slot_tokens[0] = value

    def close(self) -> None:
        """Stop the ring (every rank leaves); a single device has nothing to stop."""
        if self.ring is not None:
            self.ring.close()
            self.ring = None

    def reuse_prefix(self, tokens: list[int], slot: int = 0) -> int:
        """Keep the slot's cached positions that match the start of `tokens`; returns how many."""
        cached = self.slot_tokens[slot]
        n = 0
        for a, b in zip(cached, tokens):
            if a != b:
                break
            n += 1
        n = min(n, len(tokens) - 1)  # always evaluate at least the last token
        if n < len(cached):
            self.kv_remove(n, slot)
        return n

    def kv_remove(self, p0: int, slot: int = 0) -> None:
        """Forget a slot's positions p0.. (they will be rewritten); on a ring every rank does."""
        if self.ring is not None:
            self.ring.kv_remove(p0, None, slot)
        # one device: stale keys past the end are never read (attention stops at the position)
        del self.slot_tokens[slot][p0:]

    def eval(self, tokens: list[int], all_logits: bool = False, rows: bool = False,
             slot: int = 0) -> np.ndarray:
        """Append tokens to a slot's context in batches; logits (n_vocab,) after the last one,
        or with all_logits those of every token (n_tokens, n_vocab), as a draft's verifier
        needs. rows: each batch row is computed alone (row_by_row), bit-equal to one-token evals."""
        cached = self.slot_tokens[slot]
        if len(cached) + len(tokens) > self.n_ctx:
            raise ContextFullError(
                f"{len(cached) + len(tokens)} tokens do not fit in the context of {self.n_ctx} (use -c)"
            )
        if all_logits and slot != 0:
            raise ValueError("all_logits evaluates slot 0 only (speculative decoding holds one sequence)")
        logits, out = None, []
        for i in range(0, len(tokens), self.n_batch):
            batch = tokens[i : i + self.n_batch]
            if all_logits:
                out.append(self._forward_all(batch, rows))
            elif slot == 0:
                logits = self._forward(batch, len(cached))[-1]
            else:
                positions = np.arange(len(cached), len(cached) + len(batch))
                logits = self._forward_rows(batch, positions, np.full(len(batch), slot),
                                            last_only=True)[-1]
            cached.extend(batch)
        return np.concatenate(out) if all_logits else logits

    def decode(self, slots: list[int], tokens: list[int]) -> np.ndarray:
        """One token for each of several slots in one forward (one pass round a ring);
        logits (len(slots), n_vocab), row i for slots[i]."""
        if len(set(slots)) != len(slots):
            raise ValueError(f"a slot appears twice in one decode step: {slots}")
        return self.step(slots, tokens)

    def step(self, slots: list[int], tokens: list[int], logit_rows=None) -> np.ndarray:
        """One forward of rows from several slots (one pass round a ring): row i appends
        tokens[i] to slots[i]; a slot may have several rows, which take its next positions
        in order (a prompt piece beside other slots' decode tokens). Logits of every row, or
        of the rows logit_rows lists."""
        if len(slots) != len(tokens) or not slots:
            raise ValueError(f"a step needs one slot per token, got {len(slots)} and {len(tokens)}")
        if len(slots) > self.n_batch:
            raise ValueError(f"{len(slots)} rows exceed the batch of {self.n_batch}")
        seen: dict[int, int] = {}
        positions = np.empty(len(slots), dtype=np.int64)
        for i, s in enumerate(slots):  # a slot's rows take its next positions in order
            earlier = seen.get(s, 0)
            positions[i] = len(self.slot_tokens[s]) + earlier
            seen[s] = earlier + 1
        if positions.max() >= self.n_ctx:
            raise ContextFullError(f"a slot's context of {self.n_ctx} is full")
        logits = self._forward_rows(tokens, positions, np.asarray(slots, dtype=np.int64),
                                    logit_rows=logit_rows)
        for s, tok in zip(slots, tokens):
            self.slot_tokens[s].append(int(tok))
        return logits

    def _forward_all(self, batch: list[int], rows: bool) -> np.ndarray:
        """Logits of every token of a batch; rows: each row computed alone (row_by_row)."""
        if self.ring is not None:
            return self.ring.forward(batch, len(self.tokens), all_logits=True, rows=rows)
        with row_by_row() if rows else nullcontext():
            return self.model.forward(batch, len(self.tokens), all_logits=True)

    def truncate(self, n_keep: int) -> None:
        """Forget every cached position of slot 0 from n_keep on, on every rank (a KV command
        round the ring); rejected draft tokens leave the cache this way."""
        n_held = len(self.tokens)
        if not 0 <= n_keep <= n_held:
            raise ValueError(f"cannot keep {n_keep} of the {n_held} cached positions")
        if n_keep < n_held:
            if self.ring is not None:
                self.ring.kv_remove(n_keep, n_held)  # every rank, its own layers
            else:
                self.model.kv_remove(n_keep, n_held)
            del self.tokens[n_keep:]

    def prefill(self, prompt: list[int], sampler: Sampler, timings: Timings, t0: float,
                after=None) -> np.ndarray:
        """A request's start: a new request id round the ring, the cached prefix kept, the
        sampler told of the prompt, the rest evaluated (then `after()`, if given, still counted
        as prompt time); the logits after the prompt. Fills timings' prompt figures from t0."""
        if self.ring is not None:
            self.ring.begin_request()
        start = self.reuse_prefix(prompt)
        for tok in prompt:
            sampler.accept(tok)
        logits = self.eval(prompt[start:])
        if after is not None:
            after()
        timings.prompt_tokens = len(prompt) - start
        timings.prompt_ms = (time.perf_counter() - t0) * 1e3
        return logits

    def generate(self, prompt: list[int], n_predict: int, sampler: Sampler,
                 on_text: Callable[[str], None] | None = None,
                 stop: Callable[[int], bool] | None = None,
                 on_logits: Callable[[np.ndarray], None] | None = None) -> tuple[list[int], Timings]:
        """Greedy or sampled continuation; stops at n_predict tokens (-1: until the context is
        full), an end-of-generation token, or when stop(token) says so. on_logits sees the
        logits (n_vocab,) before each token is sampled."""
        timings = Timings(load_ms=self.load_ms)
        t0 = time.perf_counter()
        logits = self.prefill(prompt, sampler, timings, t0)
        decoder = StreamDecoder(self.tokenizer)
        out: list[int] = []
        n_decode = 0  # forward passes after the prompt, llama.cpp's "runs"
        t1 = time.perf_counter()
        limit = n_predict if n_predict >= 0 else self.n_ctx
        while len(out) < limit:
            if on_logits is not None:
                on_logits(logits)
            token = sampler.sample(logits)
            if not out:
                timings.ttft_ms = (time.perf_counter() - t0) * 1e3
            if self.tokenizer.is_eog(token):
                break
            out.append(token)
            if on_text is not None:
                on_text(decoder.push(token))
            if (stop is not None and stop(token)) or len(out) == limit or len(self.tokens) >= self.n_ctx:
                break
            logits = self.eval([token])
            n_decode += 1
        if on_text is not None:
            on_text(decoder.flush())
        timings.eval_tokens = n_decode
        timings.extra["generated_tokens"] = len(out)
        timings.eval_ms = (time.perf_counter() - t1) * 1e3
        timings.peak_rss_mib = peak_rss_mib()
        return out, timings
