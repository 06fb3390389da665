"""Attention by FlashAttention's rule: the online-softmax kernel's error against a float64
reference is at most twice that of a naive float32 softmax(QK^T)V."""

import numpy as np
import pytest

from prima_ref.model import ops

CASES = [
    # n_tok, n_head, n_kv, d, first_pos, window, softcap
    (1, 9, 3, 64, 0, 0, 0.0),  # first decode step
    (1, 9, 3, 64, 300, 0, 0.0),  # decode deep in the context (several KV tiles)
    (17, 4, 1, 256, 0, 0, 0.0),  # prefill, gemma3 head shape
    (8, 4, 1, 256, 700, 512, 0.0),  # sliding window cuts off early keys
    (5, 8, 8, 32, 100, 0, 30.0),  # soft-capped logits, no GQA
]


def _err(a, ref):
    return float(np.abs(a.astype(np.float64) - ref).max())


@pytest.mark.parametrize("case", CASES, ids=lambda c: "tok{}_h{}_kv{}_d{}_pos{}_win{}_cap{}".format(*c))
def test_online_softmax_attention_error_at_most_twice_naive_float32(case):
    n_tok, n_head, n_kv, d, first, window, cap = case
    rng = np.random.default_rng(n_tok * 1000 + first)
    n_ctx = first + n_tok
    q = (rng.standard_normal((n_tok, n_head, d)) * 2).astype(np.float32)
    k = rng.standard_normal((n_ctx, n_kv, d)).astype(np.float32)
    v = rng.standard_normal((n_ctx, n_kv, d)).astype(np.float32)
    pos = np.arange(first, first + n_tok)
    scale = 1.0 / np.sqrt(d)
    ref = ops.attention_naive(q, k, v, pos, window, scale, cap, dtype=np.float64)
    naive = ops.attention_naive(q, k, v, pos, window, scale, cap, dtype=np.float32)
    out = np.empty_like(q)
    ops.attention(q, k, v, pos, window, np.float32(scale), np.float32(cap), out)
    assert _err(out, ref) <= 2 * max(_err(naive, ref), 1e-7)


def test_attention_respects_causality_and_window():
    rng = np.random.default_rng(1)
    q = rng.standard_normal((1, 2, 16)).astype(np.float32)
    k = rng.standard_normal((50, 1, 16)).astype(np.float32)
    v = rng.standard_normal((50, 1, 16)).astype(np.float32)
    out_a, out_b = np.empty_like(q), np.empty_like(q)
    ops.attention(q, k, v, np.array([30]), 10, np.float32(0.25), np.float32(0), out_a)
    k2, v2 = k.copy(), v.copy()
    k2[31:], v2[31:] = 99.0, 99.0  # the future
    k2[:21], v2[:21] = -99.0, -99.0  # outside the window (positions 21..30 are kept)
    ops.attention(q, k2, v2, np.array([30]), 10, np.float32(0.25), np.float32(0), out_b)
    np.testing.assert_array_equal(out_a, out_b)
