"""Per-token operations of a transformer layer, as Numba kernels.

Each mirrors ggml's CPU arithmetic where that decides rounding (RMS norm sums in float64, RoPE
angles advanced by repeated float32 multiplication), so logits track llama.cpp's closely.
Shapes: activations are (n_tokens, n_embd); heads are (n_tokens, n_head, head_dim).
"""

import math

import numba as nb
import numpy as np

from prima_ref.model.config import ROPE_NEOX
from prima_ref.quants.simd import (
    axpy4_f64x8,
    f16_bits,
    f64x8_zero,
    fma_f32_f64x8,
    hsum_f64x8,
    load_f64x8,
)

ATTN_TILE = 64  # KV positions per online-softmax step


# Element-wise kernels stay serial: a parallel region costs more to start than they cost to run.


@nb.njit(cache=True)
def rms_norm(x, weight, eps, out):
    """out = x / rms(x) * weight, row by row; x (n_rows, n), weight (n,)."""
    n = x.shape[1]
    for r in range(x.shape[0]):
        acc = 0.0  # float64, as ggml_float
        for i in range(n):
            acc += np.float64(x[r, i] * x[r, i])
        mean = np.float32(acc / n)
        scale = np.float32(1.0) / np.sqrt(mean + np.float32(eps))
        for i in range(n):
            out[r, i] = (x[r, i] * scale) * weight[i]


@nb.njit(cache=True)
def rope_inplace(x, positions, n_rot, base, freq_scale, rope_type):
    """Rotate the first n_rot dims of every head; x (n_tokens, n_head, head_dim)."""
    theta_scale = np.float32(base ** (-2.0 / n_rot))
    half = n_rot // 2
    for t in range(x.shape[0]):
        theta = np.float32(positions[t])
        for i in range(half):
            angle = np.float32(freq_scale) * theta
            c, s = np.float32(math.cos(angle)), np.float32(math.sin(angle))
            if rope_type == ROPE_NEOX:
                a, b = i, i + half
            else:
                a, b = 2 * i, 2 * i + 1
            for h in range(x.shape[1]):
                x0, x1 = x[t, h, a], x[t, h, b]
                x[t, h, a] = x0 * c - x1 * s
                x[t, h, b] = x0 * s + x1 * c
            theta = theta * theta_scale


def attention(q, k_cache, v_cache, positions, window, scale, softcap, out, kv_row0=None):
    """Causal attention with an online softmax over KV tiles (never the full score matrix).

    q (n_tokens, n_head, d); k_cache, v_cache (n_rows, n_head_kv, d): row kv_row0[t] + p holds
    position p of token t's sequence (kv_row0 None: every token reads rows 0.., one sequence);
    positions (n_tokens,); window > 0 keeps only keys with pos - key_pos < window;
    softcap > 0 applies softcap * tanh(score / softcap). Grouped-query: head h reads kv head
    h // (n_head / n_head_kv).
    """
    if kv_row0 is None:
        kv_row0 = np.zeros(q.shape[0], dtype=np.int64)
    _attention(q, k_cache, v_cache, np.asarray(positions), np.asarray(kv_row0, dtype=np.int64),
               window, scale, softcap, out)


@nb.njit(cache=True, inline="always")
def _score(q64, kc, o, d, wide):
    """sum_i q64[i] * kc.flat[o + i] in float64; wide (d % 8 == 0): 8 lanes, lane l summing
    i = l, l + 8, .. in order, then hsum_f64x8's fixed tree."""
    if wide:
        a = f64x8_zero()
        for c in range(0, d, 8):
            a = fma_f32_f64x8(load_f64x8(q64, c), kc, o + c, a)
        return hsum_f64x8(a)
    s = 0.0
    flat = kc.reshape(-1)
    for i in range(d):
        s += q64[i] * np.float64(flat[o + i])
    return s


@nb.njit(cache=True, parallel=True)
def _attention(q, k_cache, v_cache, positions, kv_row0, window, scale, softcap, out):
    n_tok, n_head, d = q.shape
    n_kv = k_cache.shape[1]
    group = n_head // n_kv
    stride = n_kv * d  # floats from one cache row to the next
    wide = d % 8 == 0
    for job in nb.prange(n_tok * n_head):
        t, h = job // n_head, job % n_head
        kv = h // group
        pos = positions[t]
        row0 = kv_row0[t]
        first = 0 if window <= 0 else max(0, pos - window + 1)
        # float64 products and sums (8 SIMD lanes, each in order, then a fixed tree): summing
        # hundreds of terms in float32 would lose to a BLAS-backed naive implementation
        q64 = np.empty(d, dtype=np.float64)
        for i in range(d):
            q64[i] = q[t, h, i]
        acc = np.zeros(d, dtype=np.float64)
        scores = np.empty(ATTN_TILE, dtype=np.float64)
        run_max, run_sum = -np.inf, 0.0
        for start in range(first, pos + 1, ATTN_TILE):
            stop = min(start + ATTN_TILE, pos + 1)
            base = ((row0 + start) * n_kv + kv) * d  # flat offset of key `start`
            j = start
            while j + 4 <= stop:  # four keys at once: four independent FMA chains
                o = base + (j - start) * stride
                if wide:
                    a0, a1, a2, a3 = f64x8_zero(), f64x8_zero(), f64x8_zero(), f64x8_zero()
                    for c in range(0, d, 8):
                        qv = load_f64x8(q64, c)
                        a0 = fma_f32_f64x8(qv, k_cache, o + c, a0)
                        a1 = fma_f32_f64x8(qv, k_cache, o + stride + c, a1)
                        a2 = fma_f32_f64x8(qv, k_cache, o + 2 * stride + c, a2)
                        a3 = fma_f32_f64x8(qv, k_cache, o + 3 * stride + c, a3)
                    scores[j - start] = hsum_f64x8(a0)
                    scores[j - start + 1] = hsum_f64x8(a1)
                    scores[j - start + 2] = hsum_f64x8(a2)
                    scores[j - start + 3] = hsum_f64x8(a3)
                else:
                    for u in range(4):
                        scores[j - start + u] = _score(q64, k_cache, o + u * stride, d, wide)
                j += 4
            for j in range(j, stop):
                scores[j - start] = _score(q64, k_cache, base + (j - start) * stride, d, wide)
            tile_max = -np.inf
            for j in range(start, stop):
                s = scores[j - start] * scale
                if softcap > 0:
                    s = softcap * np.tanh(s / softcap)
                scores[j - start] = s
                tile_max = max(tile_max, s)
            new_max = max(run_max, tile_max)
            correction = np.exp(run_max - new_max)
            run_sum *= correction
            for i in range(d):
                acc[i] *= correction
            j = start
            while j + 4 <= stop:  # four keys per pass over acc, added in key order
                o = base + (j - start) * stride
                p0 = np.exp(scores[j - start] - new_max)
                p1 = np.exp(scores[j - start + 1] - new_max)
                p2 = np.exp(scores[j - start + 2] - new_max)
                p3 = np.exp(scores[j - start + 3] - new_max)
                run_sum = run_sum + p0 + p1 + p2 + p3
                _add_values(acc, (p0, p1, p2, p3), v_cache, o, stride, d, wide)
                j += 4
            for j in range(j, stop):
                p = np.exp(scores[j - start] - new_max)
                run_sum += p
                _add_values(acc, (p, 0.0, 0.0, 0.0), v_cache, base + (j - start) * stride, 0,
                            d, wide)
            run_max = new_max
        for i in range(d):
            out[t, h, i] = np.float32(acc[i] / run_sum)


@nb.njit(cache=True, inline="always")
def _add_values(acc, p, vc, o, stride, d, wide):
    """acc += p[0] v[o] + p[1] v[o + stride] + ..: four value rows (flat offsets) as FMAs in
    that order; a zero weight on a repeated row (stride 0) adds exactly nothing."""
    if wide:
        for c in range(0, d, 8):
            axpy4_f64x8(acc, c, p, vc, o + c, stride)
        return
    flat = vc.reshape(-1)
    for i in range(d):
        a = acc[i]
        for u in range(4):
            a += p[u] * np.float64(flat[o + u * stride + i])
        acc[i] = a


def attention_naive(q, k_cache, v_cache, positions, window, scale, softcap, dtype=np.float32):
    """softmax(QK^T)V with the full score matrix, in numpy; the reference for tests."""
    q, k, v = (a.astype(dtype) for a in (q, k_cache, v_cache))
    n_tok, n_head, d = q.shape
    group = n_head // k.shape[1]
    out = np.zeros((n_tok, n_head, d), dtype=dtype)
    for t in range(n_tok):
        pos = int(positions[t])
        lo = 0 if window <= 0 else max(0, pos - window + 1)
        for h in range(n_head):
            s = (k[lo : pos + 1, h // group, :] @ q[t, h]) * dtype(scale)
            if softcap > 0:
                s = dtype(softcap) * np.tanh(s / dtype(softcap))
            p = np.exp(s - s.max())
            out[t, h] = (p / p.sum()) @ v[lo : pos + 1, h // group, :]
    return out


@nb.njit(cache=True, inline="always")
def _silu_row(gate, up, t):
    for i in range(gate.shape[1]):
        g = gate[t, i]
        gate[t, i] = g / (np.float32(1.0) + np.exp(-g)) * up[t, i]


@nb.njit(cache=True)
def _silu_mul_serial(gate, up):
    for t in range(gate.shape[0]):
        _silu_row(gate, up, t)


@nb.njit(cache=True, parallel=True)
def _silu_mul_parallel(gate, up):
    for t in nb.prange(gate.shape[0]):
        _silu_row(gate, up, t)


def silu_mul(gate, up):
    """gate <- silu(gate) * up, in place; (n_tokens, n_ff). Several tokens (prefill) run in
    parallel over tokens; one token (decode) stays serial."""
    (_silu_mul_parallel if gate.shape[0] > 1 else _silu_mul_serial)(gate, up)


def _gelu_f32(x):
    c = np.float32(math.sqrt(2.0 / math.pi))
    x = x.astype(np.float32)
    with np.errstate(invalid="ignore", over="ignore"):  # the table's inf/nan entries
        inner = c * x * (np.float32(1.0) + np.float32(0.044715) * x * x)
        return np.float32(0.5) * x * (np.float32(1.0) + np.tanh(inner))


# ggml's CPU GELU reads a table indexed by the input rounded to f16 (GGML_GELU_FP16).
_GELU_TABLE_F16 = _gelu_f32(np.arange(1 << 16, dtype=np.uint16).view(np.float16)).astype(np.float16)


GELU_TABLE_F32 = _GELU_TABLE_F16.astype(np.float32)  # indexed by the f16 bits of the input


@nb.njit(cache=True, inline="always")
def gelu_f16_table(g, table):
    """ggml's CPU GELU: the table at g rounded to f16, 0 at or below -10, g at or above 10."""
    if g <= np.float32(-10.0):
        return np.float32(0.0)
    if g >= np.float32(10.0):
        return g
    return table[f16_bits(g)]


@nb.njit(cache=True, parallel=True)
def _gelu_mul(gate, up, table):
    for t in nb.prange(gate.shape[0]):
        for i in range(gate.shape[1]):
            gate[t, i] = gelu_f16_table(gate[t, i], table) * up[t, i]


def gelu_mul(gate, up):
    """gate <- gelu(gate) * up, in place, with ggml's f16 table and its +-10 clamps (parallel
    over tokens; decode uses the fused kernel instead)."""
    _gelu_mul(gate, up, GELU_TABLE_F32)


def gelu_mul_ref(gate, up):
    """gelu_mul in numpy, the readable reference."""
    idx = gate.astype(np.float16).view(np.uint16)
    g = _GELU_TABLE_F16[idx].astype(np.float32)
    g = np.where(gate <= -10.0, np.float32(0.0), np.where(gate >= 10.0, gate, g))
    np.multiply(g, up, out=gate)
