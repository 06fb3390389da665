"""Small-batch decode kernels: 2..8 rows (one per server slot) through the legacy 32-weight
matrices, each weight block loaded and unpacked once and dotted with every row's activation.

A server stepping n slots multiplies each matrix by n vectors. Calling the one-row fused
kernels n times reads and unpacks every weight n times. These do what ``fused`` does for one
row (norm, int8 quantization and the products in one call and one parallel region; q/k/v in
one call, gate/up with the activation in another, residual adds inside) for n <= MAX_ROWS:

- ``group(raws, xs, norm_w, eps, residual, ys)``: xs (n, n_in) optionally RMS-normed row by
  row, quantized, then ys[t] = the products of every matrix in ``raws`` (a tuple of same-type
  matrices) with row t, one matrix after another (plus residual[t] when it is non-empty).
- ``gate_up(raw_g, raw_u, xs, norm_w, eps, act, gelu_table, out)``: as ``fused.ffn_gate_up``.

On CPUs with 512-bit VNNI the products are ``lanes``' kernels: 16 weight rows in the vector
lanes, every token's dot of a block one convert and one FMA per 16 rows, the rows padded to 1,
2, 4 or 8 tokens. The one-row decode kernels (``fused``, ``legacy``'s matvec) and the prefill
tiles (``tiled``) sum in the same order, so row t of every result is bit-identical to a
one-row step on row t alone, and to the same token in a prefill.

Without VNNI, each (weight row, token) dot keeps ``legacy``'s portable row dot arithmetic:
a group of 8 blocks is unpacked once, then every token's accumulators (in a small per-thread
scratch) take those 8 blocks; the final horizontal sums run across the 8 tokens at once. Row t
is again bit-identical to the portable one-row kernels.
So greedy output per slot does not depend on how many slots share a step.

``kernels(qtype)`` gives a type's kernels, compiled on first use (a server loads the types its
model has); types outside LEGACY_KINDS keep the generic products. A kind + ``lanes.PACKED``
takes that type's repack()ed matrices (the lanes path only), with the same bits.
"""

from __future__ import annotations

import numba
import numpy as np
from gguf.constants import GGMLQuantizationType as T
from llvmlite import ir
from numba import njit, prange
from numba.core import cgutils, types
from numba.extending import intrinsic

from prima_ref.model.ops import rms_norm
from prima_ref.quants import lanes
from prima_ref.quants import legacy as L
from prima_ref.quants.fused import _activate
from prima_ref.quants.simd import (
    F32x8,
    _f32_ptr,
    _is_f32_1d,
    _mask,
    _quantize_rows_q8,
    dot_u8i8_i32x8,
    f32x8_zero,
    fma_f32x8,
    fma_i32x8,
    has_vnni,
    i32x8_zero,
    load_f16,
    load_f16x8_strided,
    load_f32x8,
    load_i8x32,
    load_i32x8,
    mul_f32x8,
    shl_i32x8,
)

MAX_ROWS = 8
LEGACY_KINDS = frozenset(int(t) for t in (T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1))
_VNNI = has_vnni()

# per-thread scratch, float32: per token an (8-lane acc0, acc1, min offsets) triple, then
# per token the scalar min offset of the tail blocks and two result slots
# (uint64: Numba types int64 + uint64 as float64); then 8 block scales of the current token
_ACC_STRIDE = 24
SCRATCH = MAX_ROWS * (_ACC_STRIDE + 4)
_OFF, _OUT_A, _OUT_B, _SC = (np.uint64(MAX_ROWS * (_ACC_STRIDE + k)) for k in range(4))
U0, U1, U8, U16, U24 = (np.uint64(i) for i in (0, 1, 8, 16, _ACC_STRIDE))
UQK = np.uint64(L.QK)


@intrinsic
def store_f32x8(typingctx, out, i, v):
    """out[i:i+8] = v (out float32 1-D)."""
    if not (_is_f32_1d(out) and isinstance(i, types.Integer) and v == F32x8):
        return None

    def codegen(context, builder, sig, args):
        builder.store(args[2], _f32_ptr(context, builder, sig, args, 0, 1, args[2].type), align=4)
        return context.get_dummy_value()

    return types.none(out, i, v), codegen


@intrinsic
def hsum_f32x8_tokens(typingctx, s, a, stride):
    """Lane t = hsum_f32x8(s[a + t * stride : ... + 8]) for t < 8, summed in hsum_f32x8's
    order ((0 + l0) + l1) ... + l7: eight horizontal sums as one 8x8 transpose and 8 adds."""
    if not (_is_f32_1d(s) and isinstance(a, types.Integer) and isinstance(stride, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        vty = ir.VectorType(ir.FloatType(), 8)
        base = context.cast(builder, args[1], sig.args[1], types.int64)
        step = context.cast(builder, args[2], sig.args[2], types.int64)
        data = cgutils.create_struct_proxy(sig.args[0])(context, builder, value=args[0]).data
        v = []
        for t in range(8):
            off = builder.add(base, builder.mul(step, ir.Constant(ir.IntType(64), t)))
            v.append(builder.load(builder.bitcast(builder.gep(data, [off]), vty.as_pointer()),
                                  align=4))

        def shuf(x, y, idx):
            return builder.shuffle_vector(x, y, _mask(idx))

        lo, hi = [0, 8, 1, 9, 4, 12, 5, 13], [2, 10, 3, 11, 6, 14, 7, 15]
        t = [shuf(v[i], v[i + 1], m) for i in range(0, 8, 2) for m in (lo, hi)]
        even, odd = [0, 1, 8, 9, 4, 5, 12, 13], [2, 3, 10, 11, 6, 7, 14, 15]
        tt = [shuf(t[i], t[i + 2], m) for i in (0, 1, 4, 5) for m in (even, odd)]
        low, high = [0, 1, 2, 3, 8, 9, 10, 11], [4, 5, 6, 7, 12, 13, 14, 15]
        cols = [None] * 8  # cols[i] = lane i of every token's vector
        for k in range(4):
            cols[k], cols[k + 4] = shuf(tt[k], tt[k + 4], low), shuf(tt[k], tt[k + 4], high)
        total = ir.Constant(vty, None)
        for c in cols:
            total = builder.fadd(total, c)
        return total

    return F32x8(s, a, stride), codegen


@intrinsic
def add_f32x8(typingctx, a, b):
    if (a, b) != (F32x8, F32x8):
        return None
    return F32x8(a, b), lambda context, builder, sig, args: builder.fadd(*args)


# --- activations: fused._prepare, row by row -----------------------------------------------------


@njit(cache=True, inline="always")
def _prepare_rows(xs, norm_w, eps):
    """xs (n, n_in) -> optionally normed, then quantized, flat: qx int8 (n * n_in,), dx, dsx
    (n * n_in // 32,), the negated lane sums of qx (n * n_in // 4,)."""
    n, n_in = xs.shape
    h = xs
    if norm_w.shape[0]:
        h = np.empty((n, n_in), np.float32)
        rms_norm(xs, norm_w, eps, h)
    n_blocks = n_in // L.QK
    qx = np.empty((n, n_in), np.int8)
    dx = np.empty((n, n_blocks), np.float32)
    sx = np.empty((n, n_blocks), np.int32)
    dsx = np.empty((n, n_blocks), np.float32)
    _quantize_rows_q8(h, qx, dx, sx, dsx)
    nls = np.empty((n, n_in // 4), np.int32)
    for t in range(n):
        L.neg_lane_sums(qx[t], nls[t])
    return qx.reshape(-1), dx.reshape(-1), dsx.reshape(-1), nls.reshape(-1)


# --- one weight row against n tokens ------------------------------------------------------------


@njit(cache=True, inline="always")
def _tok_block(kind, u, qx, nls, i, scale, acc):
    """legacy._dot_init / _dot_scaled for the block u against activation block i (token-major
    flat index: token t, block b is t * n_blocks + b)."""
    if L._MIN[kind]:
        init = i32x8_zero()
    else:
        init = shl_i32x8(load_i32x8(nls, i * U8), L._SH[kind])
    return fma_i32x8(acc, dot_u8i8_i32x8(init, u, load_i8x32(qx, i * UQK)), scale)


@njit(cache=True, inline="always")
def _tok_group(kind, us, qx, nls, i, s, a):
    """Token accumulators at s[a:a+16] += 8 blocks us (legacy._row_dot_vnni's loop body:
    acc0 takes the even blocks, acc1 the odd ones, each its scale from s[_SC:_SC+8], read
    back one at a time: a broadcast load, where taking a vector lane costs a shuffle)."""
    acc0, acc1 = load_f32x8(s, a), load_f32x8(s, a + U8)
    c = _SC
    acc0 = _tok_block(kind, us[0], qx, nls, i, s[c], acc0)
    acc1 = _tok_block(kind, us[1], qx, nls, i + U1, s[c + U1], acc1)
    acc0 = _tok_block(kind, us[2], qx, nls, i + np.uint64(2), s[c + np.uint64(2)], acc0)
    acc1 = _tok_block(kind, us[3], qx, nls, i + np.uint64(3), s[c + np.uint64(3)], acc1)
    acc0 = _tok_block(kind, us[4], qx, nls, i + np.uint64(4), s[c + np.uint64(4)], acc0)
    acc1 = _tok_block(kind, us[5], qx, nls, i + np.uint64(5), s[c + np.uint64(5)], acc1)
    acc0 = _tok_block(kind, us[6], qx, nls, i + np.uint64(6), s[c + np.uint64(6)], acc0)
    acc1 = _tok_block(kind, us[7], qx, nls, i + np.uint64(7), s[c + np.uint64(7)], acc1)
    store_f32x8(s, a, acc0)
    store_f32x8(s, a + U8, acc1)


@njit(cache=True, inline="always")
def _unpack8(kind, row, o, bb):
    k = np.uint64
    return (L._block_vnni(kind, row, o), L._block_vnni(kind, row, o + bb),
            L._block_vnni(kind, row, o + k(2) * bb), L._block_vnni(kind, row, o + k(3) * bb),
            L._block_vnni(kind, row, o + k(4) * bb), L._block_vnni(kind, row, o + k(5) * bb),
            L._block_vnni(kind, row, o + k(6) * bb), L._block_vnni(kind, row, o + k(7) * bb))


@njit(cache=True, inline="always")
def _row_dots_vnni(kind, row, qx, dx, dsx, nls, n_tok, n_blocks, s, out):
    """s[out + t] = legacy._row_dot_vnni(kind, row, token t's qx, dx, dsx, nls), t < n_tok;
    s is this thread's scratch (SCRATCH floats)."""
    bb, field = np.uint64(L._BB[kind]), np.uint64(L.F16_BYTES)
    zero = f32x8_zero()
    for t in range(U0, n_tok, U1):
        a = t * U24
        store_f32x8(s, a, zero)
        store_f32x8(s, a + U8, zero)
        store_f32x8(s, a + U16, zero)
        s[_OFF + t] = np.float32(0)
    n_wide = n_blocks & ~np.uint64(7)
    for b in range(U0, n_wide, U8):
        o = b * bb
        us = _unpack8(kind, row, o, bb)
        d8 = load_f16x8_strided(row, o, bb)
        m8 = load_f16x8_strided(row, o + field, bb) if L._MIN[kind] else zero
        for t in range(U0, n_tok, U1):
            i, a = t * n_blocks + b, t * U24
            if L._MIN[kind]:
                store_f32x8(s, a + U16, fma_f32x8(m8, load_f32x8(dsx, i), load_f32x8(s, a + U16)))
            store_f32x8(s, _SC, mul_f32x8(d8, load_f32x8(dx, i)))
            _tok_group(kind, us, qx, nls, i, s, a)
    for b in range(n_wide, n_blocks):  # the tail goes to acc0, scalar scales and offsets
        o = b * bb
        u, d = L._block_vnni(kind, row, o), load_f16(row, o)
        m = load_f16(row, o + field) if L._MIN[kind] else np.float32(0)
        for t in range(U0, n_tok, U1):
            i, a = t * n_blocks + b, t * U24
            store_f32x8(s, a, _tok_block(kind, u, qx, nls, i, d * dx[i], load_f32x8(s, a)))
            if L._MIN[kind]:
                s[_OFF + t] += m * dsx[i]
    # every token's hsum(acc0) + hsum(acc1) (+ (hsum(offs) + off)) at once, lane t: token t
    # (tokens past n_tok add up stale scratch, never read)
    v = add_f32x8(hsum_f32x8_tokens(s, U0, U24), hsum_f32x8_tokens(s, U8, U24))
    if L._MIN[kind]:
        v = add_f32x8(v, add_f32x8(hsum_f32x8_tokens(s, U16, U24), load_f32x8(s, _OFF)))
    store_f32x8(s, out, v)


@njit(cache=True, inline="always")
def _row_dots_portable(kind, row, qx, dx, dsx, nls, n_tok, n_blocks, s, out):
    """legacy._row_dot_portable per token, for CPUs without VNNI."""
    n_in = n_blocks * UQK
    for t in range(U0, n_tok, U1):
        q, x, n = t * n_in, t * n_blocks, t * (n_in // np.uint64(4))
        s[out + t] = L._row_dot_portable(kind, row, qx[q : q + n_in], dx[x : x + n_blocks],
                                         dsx[x : x + n_blocks], nls[n : n + n_in // np.uint64(4)])


# --- the kernels, per type ----------------------------------------------------------------------


@njit(cache=True, inline="always")
def _row_dots(kind, vnni, row, qx, dx, dsx, nls, n_tok, n_blocks, s, out):
    if vnni:  # a literal: the other branch is pruned, never compiled
        _row_dots_vnni(kind, row, qx, dx, dsx, nls, n_tok, n_blocks, s, out)
    else:
        _row_dots_portable(kind, row, qx, dx, dsx, nls, n_tok, n_blocks, s, out)


def _compile(kind: int, vnni: bool):
    """The two kernels for one type (kind and vnni closure constants: legacy's per-kind
    tables need a literal, and Numba's cache keys on closure values, so they must be plain
    numbers); the VNNI ones only where the CPU has it."""

    lanes_path = vnni and lanes.available()
    packed = kind >= lanes.PACKED  # kind - PACKED over repack()ed bytes (lanes path only)
    kind = kind - lanes.PACKED if packed else kind
    bb = L.BLOCK_BYTES[kind]

    @njit(cache=True, parallel=True)
    def group_lanes(raws, xs, norm_w, eps, residual, ys, n_pad):
        n = xs.shape[0]
        qxb, dxb, nsxb, dsxb = lanes.prepare(xs, norm_w, eps, n_pad)
        gs, rs = lanes.group_starts(raws)
        n_mat = len(raws)
        n_out = ys.shape[1]
        yf = ys.reshape(-1)
        add = residual.shape[0] > 0
        for g in prange(gs[n_mat]):
            m, r0, nv = lanes.locate(raws, gs, g)
            rb = raws[m].shape[1]
            if packed:
                lanes.rows_n_packed(kind, n, n_pad, raws[m].reshape(-1), r0 * rb, rb // bb,
                                    qxb, dxb, nsxb, dsxb, yf, rs[m] + r0, n_out)
            else:
                lanes.rows_n(kind, n, n_pad, raws[m].reshape(-1), r0 * rb, rb, nv, rb // bb,
                             qxb, dxb, nsxb, dsxb, yf, rs[m] + r0, n_out)
            if add:
                for t in range(n):
                    for r in range(rs[m] + r0, rs[m] + r0 + nv):
                        ys[t, r] = residual[t, r] + ys[t, r]

    @njit(cache=True, parallel=True)
    def gate_up_lanes(raw_g, raw_u, xs, norm_w, eps, act, gelu_table, out, n_pad):
        n = xs.shape[0]
        qxb, dxb, nsxb, dsxb = lanes.prepare(xs, norm_w, eps, n_pad)
        n_rows, rb = raw_g.shape
        up = np.empty((n, n_rows), np.float32)
        of, uf = out.reshape(-1), up.reshape(-1)
        fg, fu = raw_g.reshape(-1), raw_u.reshape(-1)
        for g in prange((n_rows + lanes.ROWS - 1) // lanes.ROWS):
            r0 = g * lanes.ROWS
            nv = min(lanes.ROWS, n_rows - r0)
            if packed:
                lanes.rows_n_packed(kind, n, n_pad, fg, r0 * rb, rb // bb, qxb, dxb, nsxb,
                                    dsxb, of, r0, n_rows)
                lanes.rows_n_packed(kind, n, n_pad, fu, r0 * rb, rb // bb, qxb, dxb, nsxb,
                                    dsxb, uf, r0, n_rows)
            else:
                lanes.rows_n(kind, n, n_pad, fg, r0 * rb, rb, nv, rb // bb, qxb, dxb, nsxb,
                             dsxb, of, r0, n_rows)
                lanes.rows_n(kind, n, n_pad, fu, r0 * rb, rb, nv, rb // bb, qxb, dxb, nsxb,
                             dsxb, uf, r0, n_rows)
            for t in range(n):
                for r in range(r0, r0 + nv):
                    out[t, r] = _activate(act, out[t, r], up[t, r], gelu_table)

    @njit(cache=True, parallel=True)
    def group(raws, xs, norm_w, eps, residual, ys, n_threads):
        n_tok = np.uint64(xs.shape[0])
        n_blocks = np.uint64(xs.shape[1] // L.QK)
        qx, dx, dsx, nls = _prepare_rows(xs, norm_w, eps)
        n_mat = len(raws)
        starts = np.zeros(n_mat + 1, np.int64)
        for m in range(n_mat):
            starts[m + 1] = starts[m] + raws[m].shape[0]
        add = residual.shape[0] > 0
        scratch = np.zeros((n_threads, SCRATCH), np.float32)
        for r in prange(starts[n_mat]):
            m = 0
            while r >= starts[m + 1]:
                m += 1
            s = scratch[numba.get_thread_id()]
            row = raws[m][r - starts[m]]
            _row_dots(kind, vnni, row, qx, dx, dsx, nls, n_tok, n_blocks, s, _OUT_A)
            for t in range(U0, n_tok, U1):
                v = s[_OUT_A + t]
                ys[t, r] = residual[t, r] + v if add else v

    @njit(cache=True, parallel=True)
    def gate_up(raw_g, raw_u, xs, norm_w, eps, act, gelu_table, out, n_threads):
        n_tok = np.uint64(xs.shape[0])
        n_blocks = np.uint64(xs.shape[1] // L.QK)
        qx, dx, dsx, nls = _prepare_rows(xs, norm_w, eps)
        scratch = np.zeros((n_threads, SCRATCH), np.float32)
        for r in prange(raw_g.shape[0]):
            s = scratch[numba.get_thread_id()]
            _row_dots(kind, vnni, raw_g[r], qx, dx, dsx, nls, n_tok, n_blocks, s, _OUT_A)
            _row_dots(kind, vnni, raw_u[r], qx, dx, dsx, nls, n_tok, n_blocks, s, _OUT_B)
            for t in range(U0, n_tok, U1):
                out[t, r] = _activate(act, s[_OUT_A + t], s[_OUT_B + t], gelu_table)

    if lanes_path:
        return group_lanes, gate_up_lanes, True
    return group, gate_up, False


_KERNELS: dict = {}
_EMPTY_ROWS = np.zeros((0, 0), np.float32)
_EMPTY_VEC = np.zeros(0, np.float32)


def kernels(kind: int, vnni: bool | None = None):
    """(group, gate_up, lanes) for a legacy type, compiled on first use. Their last argument
    is _last_arg(lanes, n): the lanes kernels' padded token count for n rows, or the thread
    count for the per-thread scratch of the row-at-a-time ones."""
    vnni = _VNNI if vnni is None else vnni
    if vnni and not _VNNI:
        raise ValueError("this CPU has no VNNI; use vnni=False")
    key = (int(kind), vnni)
    if key not in _KERNELS:
        if lanes.ggml_kind(key[0]) not in LEGACY_KINDS:
            raise ValueError(f"no batched decode kernel for quant type {kind}")
        if key[0] >= lanes.PACKED and not (vnni and lanes.available()):
            raise ValueError("repacked matrices need the lanes kernels (512-bit VNNI)")
        _KERNELS[key] = _compile(key[0], vnni)
    return _KERNELS[key]


def _last_arg(lanes_path: bool, n_rows: int) -> int:
    return lanes.padded_tokens(n_rows) if lanes_path else numba.config.NUMBA_NUM_THREADS


def _check(xs: np.ndarray, n_in: int) -> None:
    if not (xs.dtype == np.float32 and xs.ndim == 2 and xs.flags.c_contiguous
            and 1 <= xs.shape[0] <= MAX_ROWS and xs.shape[1] == n_in):
        raise ValueError(f"rows must be C-contiguous float32 (1..{MAX_ROWS}, {n_in}), got "
                         f"{xs.dtype} {xs.shape}")


def group(kind: int, raws: tuple, xs: np.ndarray, norm_w=None, eps=0.0,
          residual=None, vnni: bool | None = None) -> np.ndarray:
    """ys (n, sum of the matrices' rows): every matrix of raws (read-only views of one type)
    times every row of xs, after an RMS norm by norm_w when given, plus residual (n, ...)
    when given; row t bit-equal to fused.matvec_group on xs[t]."""
    _check(xs, raws[0].shape[1] // L.BLOCK_BYTES[lanes.ggml_kind(int(kind))] * L.QK)
    ys = np.empty((xs.shape[0], sum(r.shape[0] for r in raws)), np.float32)  # (n, n_out)
    fn, _, uses_lanes = kernels(kind, vnni)
    fn(raws, xs, _EMPTY_VEC if norm_w is None else norm_w, np.float32(eps),
       _EMPTY_ROWS if residual is None else residual, ys, _last_arg(uses_lanes, xs.shape[0]))
    return ys


def gate_up(kind: int, raw_g, raw_u, xs: np.ndarray, norm_w, eps, act: int, gelu_table,
            vnni: bool | None = None) -> np.ndarray:
    """act(W_gate h) * (W_up h) for h = rms_norm(xs) row by row, (n, n_ff); row t bit-equal
    to fused.ffn_gate_up on xs[t]."""
    _check(xs, raw_g.shape[1] // L.BLOCK_BYTES[lanes.ggml_kind(int(kind))] * L.QK)
    out = np.empty((xs.shape[0], raw_g.shape[0]), np.float32)  # (n, n_ff)
    _, fn, uses_lanes = kernels(kind, vnni)
    fn(raw_g, raw_u, xs, norm_w, np.float32(eps), act, gelu_table, out,
       _last_arg(uses_lanes, xs.shape[0]))
    return out
