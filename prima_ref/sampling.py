"""Token sampling with llama.cpp's default chain:
repetition penalty -> top-k -> top-p -> min-p -> temperature -> draw. Greedy when temp <= 0.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8  # llama.cpp's default
    top_k: int = 40  # 0 = off
    top_p: float = 0.95  # 1.0 = off
    min_p: float = 0.05  # 0.0 = off
    repeat_penalty: float = 1.0  # 1.0 = off
    repeat_last_n: int = 64
    seed: int | None = None  # None = a random seed

    def __post_init__(self):
        if self.top_k < 0 or not 0.0 < self.top_p <= 1.0 or not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"invalid sampling parameters: top_k={self.top_k} "
                             f"top_p={self.top_p} min_p={self.min_p}")
        if self.repeat_penalty <= 0:
            raise ValueError(f"repeat_penalty must be > 0, got {self.repeat_penalty}")


class Sampler:
    def __init__(self, params: SamplingParams = SamplingParams()):
        self.params = params
        self.rng = np.random.default_rng(params.seed)
        self.recent: deque[int] = deque(maxlen=max(params.repeat_last_n, 0) or None)

    def accept(self, token: int) -> None:
        """Record a token (prompt or generated) for the repetition penalty."""
        if self.params.repeat_last_n > 0:
            self.recent.append(int(token))

    def penalized(self, logits: np.ndarray) -> np.ndarray:
        """The logits as float64, with the repetition penalty applied to recent tokens."""
        p = self.params
        z = np.asarray(logits, dtype=np.float64).copy()
        if p.repeat_penalty != 1.0 and self.recent:
            ids = np.fromiter(set(self.recent), dtype=np.int64)
            z[ids] = np.where(z[ids] > 0, z[ids] / p.repeat_penalty, z[ids] * p.repeat_penalty)
        return z

    def truncate(self, z: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """top-k candidates `keep` (best first) through top-p, min-p and the temperature:
        the kept ids (best first) and their probabilities."""
        p = self.params
        probs = _softmax(z[keep])
        if p.top_p < 1.0:
            cut = int(np.searchsorted(np.cumsum(probs), p.top_p)) + 1
            keep, probs = keep[:cut], probs[:cut]
        if p.min_p > 0.0:
            mask = probs >= p.min_p * probs[0]
            keep, probs = keep[mask], probs[mask]
        return keep, _softmax(z[keep] / p.temperature)

    def probs(self, logits: np.ndarray) -> np.ndarray:
        """Final distribution over the vocabulary after the whole chain (float64)."""
        p = self.params
        z = self.penalized(logits)
        if p.temperature <= 0:
            out = np.zeros_like(z)
            out[int(np.argmax(z))] = 1.0
            return out
        keep = np.argsort(-z, kind="stable")
        if p.top_k > 0:
            keep = keep[: p.top_k]
        keep, probs = self.truncate(z, keep)
        out = np.zeros_like(z)
        out[keep] = probs
        return out

    def sample(self, logits: np.ndarray) -> int:
        """Draw a token from probs() with one numpy choice(). With top-k on only the k best
        logits can be drawn, so they are found by a partition rather than a sort of the whole
        vocabulary (~5 ms a token for SmolLM2's 49k) and drawn over in token-id order: the
        cumulative sums, their normalisation and the one uniform number are then exactly those
        of the full-vocabulary draw (sample_full), so a seed gives the same tokens."""
        p = self.params
        n = logits.shape[-1]
        if p.temperature <= 0 or p.top_k <= 0 or p.top_k >= n:
            return self.sample_full(logits)
        # without a penalty the vocabulary is ranked in the logits' own float32 (float64 holds
        # them exactly, so the same order); only the candidates are widened: a float64 copy
        # and partition of 49k logits cost several times a float32 partition
        penalty = p.repeat_penalty != 1.0 and self.recent
        z = self.penalized(logits) if penalty else np.asarray(logits)
        # the first top_k of a stable descending argsort: everything >= the k-th largest value,
        # ties in ascending id order (ascending ids here, and the sort below is stable)
        cand = top_k_candidates(z, p.top_k)
        zc = z[cand].astype(np.float64)  # (n_candidates,)
        kept, probs = self.truncate(zc, np.argsort(-zc, kind="stable")[: p.top_k])
        keep = cand[kept]
        order = np.argsort(keep)  # token-id order, as the full-vocabulary array has them
        token = int(keep[order][self.rng.choice(keep.size, p=probs[order])])
        self.accept(token)
        return token

    def sample_full(self, logits: np.ndarray) -> int:
        """The plain draw over the whole vocabulary's distribution (the reference for sample)."""
        if self.params.temperature <= 0 and self.params.repeat_penalty == 1.0:
            token = int(np.argmax(logits))
        else:
            probs = self.probs(logits)
            token = int(self.rng.choice(probs.size, p=probs))
        self.accept(token)
        return token


_GROUP = 64  # values per group of top_k_candidates' first pass


def top_k_candidates(z: np.ndarray, k: int) -> np.ndarray:
    """The ids of every value >= the k-th largest of z (1 <= k <= z.size), ascending:
    np.flatnonzero(z >= np.partition(z, z.size - k)[z.size - k]) for z without NaN, about 5x
    faster on a 49k vocabulary.

    z is cut into groups (column j of z viewed as _GROUP rows: z[j], z[j + n_cols], ..; the
    tail past the full rows is one more group). The k largest group maxima are k of z's
    values, so the k-th largest value is at least the k-th largest group maximum t, and every
    value that counts sits in a group whose maximum is >= t: only those groups (about k of
    them) are partitioned. The column maxima are one vectorized pass over z."""
    n = z.size
    cols = n // _GROUP
    if cols < 4 * k:
        return np.flatnonzero(z >= np.partition(z, n - k)[n - k])
    maxima = z[: _GROUP * cols].reshape(_GROUP, cols).max(axis=0)  # (cols,)
    tail = n > _GROUP * cols
    if tail:
        maxima = np.append(maxima, z[_GROUP * cols :].max())
    t = np.partition(maxima, maxima.size - k)[maxima.size - k]
    picked = np.flatnonzero(maxima[:cols] >= t)
    ids = (np.arange(_GROUP)[:, None] * cols + picked).reshape(-1)
    if tail and maxima[cols] >= t:
        ids = np.concatenate((ids, np.arange(_GROUP * cols, n)))
    vals = z[ids]
    return np.sort(ids[vals >= np.partition(vals, vals.size - k)[vals.size - k]])


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()
