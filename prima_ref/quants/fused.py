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

Every row's dot is the same inlined code as ``legacy``'s matvec, so results are bit-identical
to calling the matrices one by one, whatever the thread count or grouping.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from prima_ref.model.ops import gelu_f16_table, rms_norm
from prima_ref.quants import legacy as L
from prima_ref.quants.simd import _quantize_rows_q8, has_vnni

_VNNI = has_vnni()
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
def _activate(act, g, u, gelu_table):
    if act == ACT_SILU:  # ops.silu_mul
        return g / (np.float32(1.0) + np.exp(-g)) * u
    return gelu_f16_table(g, gelu_table) * u  # ops.gelu_mul


@njit(cache=True, parallel=True)
def ffn_gate_up(raw_g, kind_g, raw_u, kind_u, x, norm_w, eps, act, gelu_table, out):
    qx, dx, dsx, nls = _prepare(x, norm_w, eps)
    for r in prange(raw_g.shape[0]):
        g = _dot(kind_g, raw_g[r], qx, dx, dsx, nls)
        u = _dot(kind_u, raw_u[r], qx, dx, dsx, nls)
        out[r] = _activate(act, g, u, gelu_table)
