"""Sampler.sample at a fraction of the cost, drawing the very same token.

prima_ref.sampling.Sampler sorts the whole vocabulary (49k entries for SmolLM2) and draws
from a full-vocabulary distribution: ~5 ms a token on this machine, as much as a batched
decode row costs. With top-k on, only the k best logits can be drawn, so this one picks them
with a partition, runs the same chain on those k, and draws over the kept tokens in token-id
order: the cumulative sums, the normalisation and the one uniform number numpy's choice()
uses are then exactly those of the full-vocabulary draw, so seeds give identical tokens
(tests/test_server_slots.py checks it against Sampler).
"""

from __future__ import annotations

import numpy as np

from prima_ref.sampling import Sampler


class FastSampler(Sampler):
    def sample(self, logits: np.ndarray) -> int:
        p = self.params
        n = logits.shape[-1]
        if p.temperature <= 0 or p.top_k <= 0 or p.top_k >= n:
            return super().sample(logits)
        z = self.penalized(logits)
        # the first top_k of a stable descending argsort: everything >= the k-th largest value,
        # ties in ascending id order (flatnonzero is ascending, the sort below is stable)
        kth = np.partition(z, n - p.top_k)[n - p.top_k]
        cand = np.flatnonzero(z >= kth)
        keep, probs = self.truncate(z, cand[np.argsort(-z[cand], kind="stable")][: p.top_k])
        order = np.argsort(keep)  # token-id order, as the full-vocabulary array has them
        token = int(keep[order][self.rng.choice(keep.size, p=probs[order])])
        self.accept(token)
        return token
