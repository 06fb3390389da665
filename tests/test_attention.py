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
    (3, 4, 2, 20, 70, 0, 0.0),  # a head size that is not a multiple of 8: the scalar loops
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


@pytest.mark.parametrize("extras", [False, True], ids=["plain", "bias_qknorm_window_cap"])
def test_attention_rows_is_the_numpy_layer_path_bit_for_bit(extras):
    """fused.attention_rows (a batched decode step's attention half: one call for every row)
    against Transformer._layer's step-by-step path (bias add, ops.rms_norm per head, ops.rope,
    KVCache.store's f16 rounding, ops.attention): three rows in different slots at different
    positions, the caches filled with earlier positions."""
    from prima_ref.model.config import ROPE_NEOX
    from prima_ref.model.transformer import KVCache
    from prima_ref.quants import fused

    n_head, n_kv, d, n_ctx = 6, 2, 32, 80
    nq, nk = n_head * d, n_kv * d
    rng = np.random.default_rng(7 + extras)
    positions, slots = np.array([5, 70, 0]), np.array([2, 0, 1])
    y = rng.standard_normal((3, nq + 2 * nk)).astype(np.float32)
    none = np.empty(0, np.float32)
    bias = rng.standard_normal(nq + 2 * nk).astype(np.float32) if extras else none
    q_norm = (rng.random(d) + 0.5).astype(np.float32) if extras else none
    k_norm = (rng.random(d) + 0.5).astype(np.float32) if extras else none
    window, cap = (16, 20.0) if extras else (0, 0.0)
    eps, scale, base, freq = np.float32(1e-6), np.float32(1 / np.sqrt(d)), 10000.0, 1.0
    rope_type = ROPE_NEOX if extras else 0
    ref_cache = KVCache(n_ctx, n_kv, d, n_slots=3)
    ref_cache.k[:] = rng.standard_normal(ref_cache.k.shape).astype(np.float16)
    ref_cache.v[:] = rng.standard_normal(ref_cache.v.shape).astype(np.float16)
    k_cache, v_cache = ref_cache.k.copy(), ref_cache.v.copy()

    qkv = y + bias if extras else y.copy()
    q = qkv[:, :nq].reshape(3, n_head, d).copy()
    k = qkv[:, nq : nq + nk].reshape(3, n_kv, d).copy()
    v = qkv[:, nq + nk :].reshape(3, n_kv, d).copy()
    if extras:
        ops.rms_norm(q.reshape(-1, d), q_norm, eps, q.reshape(-1, d))
        ops.rms_norm(k.reshape(-1, d), k_norm, eps, k.reshape(-1, d))
    ops.rope_inplace(q, positions, d, base, freq, rope_type)
    ops.rope_inplace(k, positions, d, base, freq, rope_type)
    ref_cache.store(positions, k, v, slots)
    ref = np.empty_like(q)
    ops.attention(q, ref_cache.k, ref_cache.v, positions, window, scale, np.float32(cap), ref,
                  ref_cache.rows(np.zeros_like(slots), slots))

    att = np.empty_like(q)
    fused.attention_rows(y, bias, q_norm, k_norm, eps, positions, slots * n_ctx, d, base, freq,
                         rope_type, k_cache, v_cache, True, window, scale, np.float32(cap), att)
    np.testing.assert_array_equal(k_cache, ref_cache.k)
    np.testing.assert_array_equal(v_cache, ref_cache.v)
    np.testing.assert_array_equal(att, ref)
