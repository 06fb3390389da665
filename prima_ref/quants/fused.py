"""Fused decode kernels for the legacy 32-weight types: fewer calls, fewer parallel regions.

A decode step multiplies a handful of small matrices by the same vector (q, k and v by the
normed input; gate and up by the normed residual). Called one by one, each product pays a
Python call, an activation quantization with its allocations, and an OpenMP fork/join; at
SmolLM2's size that overhead is as large as the kernels. These entry points do the whole
step in one call and one parallel region:

- ``matvec_group(raws, kinds, x, norm_w, eps, residual, y)``: optionally RMS-normalize x
  (``ops.rms_norm``'s arithmetic), quantize it once into both Q8_0 and Q8_1 activations, then
  one ``prange`` over the rows of every matrix in ``raws`` (a tuple of same-width legacy
  matrices, any mix of Q8_0/Q4_0/Q4_1/Q5_0/Q5_1), writing their products one after another
  into ``y`` (plus ``residual`` when it is non-empty).
- ``ffn_gate_up(raw_g, kind_g, raw_u, kind_u, x, norm_w, eps, act, gelu_table, out)``: norm,
  quantize, then per output row both the gate and the up dot and the activation
  (``act`` 0: silu, 1: gelu with ggml's f16 table), as ``ops.silu_mul`` / ``ops.gelu_mul``.

- ``kq_matvec(raw, kind, x, norm_w, eps, post_w, residual, y)``: one K-quant matrix (Q2_K..Q6_K,
  ``kind`` its ggml type id): optional pre-norm, x quantized to Q8_K in the type's slot order,
  the rows in one ``prange``, then optionally the post-norm (gemma3's post_attention_norm /
  post_ffw_norm) and the residual add: W_o / W_down of a K-quant layer in one call.
- ``attention_step(...)``: a decode step's attention half: fused q/k/v, biases, q/k norms,
  RoPE, the f16 KV store and the attention itself, one Python call per layer.

A legacy matrix's kind may be ``kind + lanes.PACKED``: the same type over ``lanes.repack``ed
bytes (the engine's repacked copy, prima_ref.repacked), read by the same kernel, same bits.

Every row's dot is the same inlined code as ``legacy``'s / ``k_quants``' matvec (for the legacy
types on 512-bit VNNI CPUs, ``lanes``' 16-rows-in-lanes kernel, which legacy's matvec and the
batched and prefill kernels share) and every element-wise step is ``ops``' own kernel, so
results are bit-identical to calling the matrices and ops one by one, whatever the thread
count or grouping.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from prima_ref.model.ops import _attention, gelu_f16_table, rms_norm, rope_inplace
from prima_ref.quants import k_quants as K
from prima_ref.quants import lanes
from prima_ref.quants import legacy as L
from prima_ref.quants.layouts import QK_K
from prima_ref.quants.simd import _quantize_rows_q8, has_vnni, round_f16

_VNNI = has_vnni()
_LANES = lanes.available()  # 512-bit VNNI: the row-in-lane kernels (lanes) take the products
FUSABLE_KINDS = frozenset((L.Q8_0, L.Q4_0, L.Q4_1, L.Q5_0, L.Q5_1))
ACT_SILU, ACT_GELU = 0, 1


def _make_dot(kind: int):
    """legacy's row dot for one type, kind a compile-time constant (a closure cell is typed as
    a literal, which legacy's per-kind tables need)."""

    @njit(cache=True, inline="always")
    def dot(row, qx, dx, dsx, nls):
        if _VNNI:
            return L._row_dot_vnni(kind, row, qx, dx, dsx, nls)
        return L._row_dot_portable(kind, row, qx, dx, dsx, nls)

    return dot


_dot_q8_0, _dot_q4_0, _dot_q4_1, _dot_q5_0, _dot_q5_1 = (
    _make_dot(k) for k in (L.Q8_0, L.Q4_0, L.Q4_1, L.Q5_0, L.Q5_1))
_K8_0, _K4_0, _K4_1, _K5_0 = L.Q8_0, L.Q4_0, L.Q4_1, L.Q5_0


@njit(cache=True, inline="always")
def _dot(kind, row, qx, dx, dsx, nls):
    """One weight row against the quantized x; kind is a runtime value, each branch a
    specialized, inlined copy of legacy's row dot."""
    if kind == _K8_0:
        return _dot_q8_0(row, qx, dx, dsx, nls)
    if kind == _K4_0:
        return _dot_q4_0(row, qx, dx, dsx, nls)
    if kind == _K4_1:
        return _dot_q4_1(row, qx, dx, dsx, nls)
    if kind == _K5_0:
        return _dot_q5_0(row, qx, dx, dsx, nls)
    return _dot_q5_1(row, qx, dx, dsx, nls)


@njit(cache=True, inline="always")
def _prepare(x, norm_w, eps):
    """x (n,) -> optionally normed, then quantized: qx int8 (n,), dx, dsx (n//32,), and the
    negated lane sums of qx (n//4,) that legacy's row dot starts from."""
    n = x.shape[0]
    x2 = x.reshape((1, n))
    if norm_w.shape[0]:
        h = np.empty((1, n), np.float32)
        rms_norm(x2, norm_w, eps, h)
        x2 = h
    n_blocks = n // L.QK
    qx = np.empty((1, n), np.int8)
    dx = np.empty((1, n_blocks), np.float32)
    sx = np.empty((1, n_blocks), np.int32)
    dsx = np.empty((1, n_blocks), np.float32)
    _quantize_rows_q8(x2, qx, dx, sx, dsx)
    nls = np.empty(n // 4, np.int32)
    L.neg_lane_sums(qx[0], nls)
    return qx[0], dx[0], dsx[0], nls


@njit(cache=True, parallel=True)
def matvec_group(raws, kinds, x, norm_w, eps, residual, y):
    if _LANES:
        _matvec_group_lanes(raws, kinds, x, norm_w, eps, residual, y)
        return
    qx, dx, dsx, nls = _prepare(x, norm_w, eps)
    n_mat = len(raws)
    starts = np.zeros(n_mat + 1, np.int64)
    for m in range(n_mat):
        starts[m + 1] = starts[m] + raws[m].shape[0]
    add = residual.shape[0] > 0
    for r in prange(starts[n_mat]):
        m = 0
        while r >= starts[m + 1]:
            m += 1
        v = _dot(kinds[m], raws[m][r - starts[m]], qx, dx, dsx, nls)
        y[r] = residual[r] + v if add else v


@njit(cache=True, inline="always")
def _matvec_group_lanes(raws, kinds, x, norm_w, eps, residual, y):
    qxb, dxb, nsxb, dsxb = lanes.prepare(x.reshape((1, x.shape[0])), norm_w, eps, 1)
    gs, rs = lanes.group_starts(raws)
    n_mat = len(raws)
    for g in prange(gs[n_mat]):
        m, r0, nv = lanes.locate(raws, gs, g)
        rb = raws[m].shape[1]
        nb = rb // L._BB[lanes.ggml_kind(kinds[m])]
        lanes.rows_one(kinds[m], raws[m].reshape(-1), r0 * rb, rb, nv, nb, qxb, dxb, nsxb,
                       dsxb, y, rs[m] + r0)
    if residual.shape[0] > 0:
        for r in range(y.shape[0]):
            y[r] = residual[r] + y[r]


@njit(cache=True, inline="always")
def _activate(act, g, u, gelu_table):
    if act == ACT_SILU:  # ops.silu_mul
        return g / (np.float32(1.0) + np.exp(-g)) * u
    return gelu_f16_table(g, gelu_table) * u  # ops.gelu_mul


@njit(cache=True, parallel=True)
def ffn_gate_up(raw_g, kind_g, raw_u, kind_u, x, norm_w, eps, act, gelu_table, out):
    if _LANES:
        qxb, dxb, nsxb, dsxb = lanes.prepare(x.reshape((1, x.shape[0])), norm_w, eps, 1)
        up = np.empty(out.shape[0], np.float32)
        n_rows = raw_g.shape[0]
        rbg, rbu = raw_g.shape[1], raw_u.shape[1]
        fg, fu = raw_g.reshape(-1), raw_u.reshape(-1)
        nbg = rbg // L._BB[lanes.ggml_kind(kind_g)]
        nbu = rbu // L._BB[lanes.ggml_kind(kind_u)]
        for g in prange((n_rows + lanes.ROWS - 1) // lanes.ROWS):
            r0 = g * lanes.ROWS
            nv = min(lanes.ROWS, n_rows - r0)
            lanes.rows_one(kind_g, fg, r0 * rbg, rbg, nv, nbg, qxb, dxb, nsxb, dsxb, out, r0)
            lanes.rows_one(kind_u, fu, r0 * rbu, rbu, nv, nbu, qxb, dxb, nsxb, dsxb, up, r0)
            for r in range(r0, r0 + nv):
                out[r] = _activate(act, out[r], up[r], gelu_table)
        return
    qx, dx, dsx, nls = _prepare(x, norm_w, eps)
    for r in prange(raw_g.shape[0]):
        g = _dot(kind_g, raw_g[r], qx, dx, dsx, nls)
        u = _dot(kind_u, raw_u[r], qx, dx, dsx, nls)
        out[r] = _activate(act, g, u, gelu_table)


# --- K-quants: one matrix per call (W_o, W_down, a K-quant output head) ----------------------

_KQ_TYPES = tuple(K.KIND)  # Q2_K..Q6_K, ggml ids consecutive
_KQ_BASE = int(_KQ_TYPES[0])
if [int(t) - _KQ_BASE for t in _KQ_TYPES] != [K.KIND[t] for t in _KQ_TYPES]:
    raise RuntimeError("k_quants.KIND no longer follows the ggml type ids")
KQ_FUSABLE_KINDS = frozenset(int(t) for t in _KQ_TYPES) if K.has_avx512_vnni() else frozenset()
# Q8_K activation layout per kind (k_quants._slots / _x_sums), as constant tables
_KQ_SLOTS = np.stack([K._slots(t) for t in _KQ_TYPES]).astype(np.int64)  # (5, 256)
_KQ_SUM_LANE = np.stack([K._x_sums(t)[0] for t in _KQ_TYPES]).astype(np.int64)  # (5, 256)
_KQ_LANES = np.array([K._x_sums(t)[1] for t in _KQ_TYPES], np.int64)  # (5,)
_KQ_FACTOR = np.array([K._x_sums(t)[2] for t in _KQ_TYPES], np.int64)  # (5,)
# per kind of _KQ_TYPES: its decode runs in the lanes kernels (lanes.K_DECODE_KINDS)
_KQ_IN_LANES = np.array([int(t) in lanes.K_DECODE_KINDS for t in _KQ_TYPES])  # (5,)


@njit(cache=True, inline="always")
def _finish(y, post_w, eps, residual):
    """y <- residual + rms_norm(y) * post_w, each step optional: transformer's
    ``x + self._norm(out, post_w)`` in the same float32 operations."""
    n = y.shape[0]
    if post_w.shape[0]:
        y2 = y.reshape((1, n))
        rms_norm(y2, post_w, eps, y2)
    if residual.shape[0]:
        for i in range(n):
            y[i] = residual[i] + y[i]


@njit(cache=True, parallel=True)
def kq_matvec(raw, kind, x, norm_w, eps, post_w, residual, y):
    k = kind - _KQ_BASE
    n = x.shape[0]
    h = x.reshape((1, n))
    if norm_w.shape[0]:
        h = np.empty((1, n), np.float32)
        rms_norm(x.reshape((1, n)), norm_w, eps, h)
    if _LANES and _KQ_IN_LANES[k]:  # as k_quants' matvec
        xq, xd, xs32, xs16 = lanes.prepare_k(h, 1)
        flat, rb, nsb = raw.reshape(-1), raw.shape[1], n // QK_K
        for g in prange((raw.shape[0] + lanes.ROWS - 1) // lanes.ROWS):
            r0 = g * lanes.ROWS
            lanes.rows_k_one(kind, flat, r0 * rb, rb, min(lanes.ROWS, raw.shape[0] - r0), nsb,
                             xq, xd, xs32, xs16, y, r0)
        _finish(y, post_w, eps, residual)
        return
    n_blocks = n // QK_K
    xq = np.empty((1, n), np.int8)  # slot order
    xd = np.empty((1, n_blocks), np.float32)
    xb = np.empty((1, n_blocks, _KQ_LANES[k]), np.int32)
    K._quantize_x_q8k(h, _KQ_SLOTS[k], _KQ_SUM_LANE[k], _KQ_FACTOR[k], xq, xd, xb)
    w, row_bytes = raw.reshape(-1), np.uint64(raw.shape[1])
    xq1, xd1, xb1 = xq.reshape(-1), xd.reshape(-1), xb.reshape(-1)
    for r in prange(raw.shape[0]):
        y[r] = K._row_dot_one(k, w, np.uint64(r) * row_bytes, n_blocks, xq1, xd1, xb1, 0, n)
    _finish(y, post_w, eps, residual)


# --- the attention half of a decode step ------------------------------------------------------


@njit(cache=True, inline="always")
def _head_norm(t, weight, eps):
    """rms_norm over each head of t (n_rows, n_heads, d), in place."""
    if weight.shape[0]:
        flat = t.reshape((t.shape[0] * t.shape[1], t.shape[2]))
        rms_norm(flat, weight, eps, flat)


@njit(cache=True)
def attention_step(raws, kinds, x, norm_w, eps, bias, q_norm, k_norm, positions, n_rot, base,
                   freq_scale, rope_type, k_cache, v_cache, f16, window, scale, softcap, att):
    """One token (x (n_embd,), at positions[0]) through q/k/v (legacy matrices, one fused
    region), the biases (bias: bq|bk|bv or empty), per-head q/k norms, RoPE, the KV store
    (rounded to f16 when f16, as KVCache.store) and attention into att (1, n_head, d):
    Transformer._layer's steps up to W_o with the same kernels, in one call."""
    n_head, d = att.shape[1], att.shape[2]
    n_kv = k_cache.shape[1]
    nq, nk = n_head * d, n_kv * d
    y = np.empty(nq + 2 * nk, np.float32)
    matvec_group(raws, kinds, x, norm_w, eps, np.empty(0, np.float32), y)
    if bias.shape[0]:
        for i in range(y.shape[0]):
            y[i] += bias[i]
    q = y[:nq].copy().reshape((1, n_head, d))
    k = y[nq : nq + nk].copy().reshape((1, n_kv, d))
    _head_norm(q, q_norm, eps)
    _head_norm(k, k_norm, eps)
    rope_inplace(q, positions, n_rot, base, freq_scale, rope_type)
    rope_inplace(k, positions, n_rot, base, freq_scale, rope_type)
    p = positions[0]
    for h in range(n_kv):
        for i in range(d):
            kv, vv = k[0, h, i], y[nq + nk + h * d + i]
            k_cache[p, h, i] = round_f16(kv) if f16 else kv
            v_cache[p, h, i] = round_f16(vv) if f16 else vv
    _attention(q, k_cache, v_cache, positions, np.zeros(1, np.int64), window, scale, softcap, att)


@njit(cache=True)
def attention_rows(y, bias, q_norm, k_norm, eps, positions, kv_row0, n_rot, base, freq_scale,
                   rope_type, k_cache, v_cache, f16, window, scale, softcap, att):
    """attention_step after its products, for several rows in one call: y (n_rows, nq + 2 nk)
    holds each row's q|k|v (batched.group's output); row t sits at positions[t] of the sequence
    whose KV rows start at kv_row0[t]. Biases, q/k norms, RoPE, the f16 KV store of every row,
    then attention into att (n_rows, n_head, d): Transformer._layer's numpy steps, same kernels,
    so each row is bit-equal to a one-row attention_step."""
    n_rows, n_head, d = att.shape
    n_kv = k_cache.shape[1]
    nq, nk = n_head * d, n_kv * d
    q = np.empty((n_rows, n_head, d), np.float32)
    k = np.empty((n_rows, n_kv, d), np.float32)
    v = np.empty((n_rows, n_kv, d), np.float32)
    has_bias = bias.shape[0] > 0
    for t in range(n_rows):
        for i in range(nq + 2 * nk):
            val = y[t, i] + bias[i] if has_bias else y[t, i]
            if i < nq:
                q[t, i // d, i % d] = val
            elif i < nq + nk:
                k[t, (i - nq) // d, (i - nq) % d] = val
            else:
                v[t, (i - nq - nk) // d, (i - nq - nk) % d] = val
    _head_norm(q, q_norm, eps)
    _head_norm(k, k_norm, eps)
    rope_inplace(q, positions, n_rot, base, freq_scale, rope_type)
    rope_inplace(k, positions, n_rot, base, freq_scale, rope_type)
    for t in range(n_rows):
        row = kv_row0[t] + positions[t]
        for h in range(n_kv):
            for i in range(d):
                kv, vv = k[t, h, i], v[t, h, i]
                k_cache[row, h, i] = round_f16(kv) if f16 else kv
                v_cache[row, h, i] = round_f16(vv) if f16 else vv
    _attention(q, k_cache, v_cache, positions, kv_row0, window, scale, softcap, att)
