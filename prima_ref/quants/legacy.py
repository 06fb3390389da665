"""Legacy 32-weight quants: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 (ggml-common.h block_q*).

Block layouts, in on-disk order (``d``, ``m``: f16; weight ``j`` of the block, j < 32):

    Q8_0  d | qs[32] int8                      w_j = d * qs[j]
    Q4_0  d | qs[16] (low nibble: j, high: j+16)  w_j = d * (q_j - 8)
    Q4_1  d | m | qs[16]                       w_j = d * q_j + m
    Q5_0  d | qh u32 (bit j: 5th bit of q_j) | qs[16]    w_j = d * (q_j - 16)
    Q5_1  d | m | qh u32 | qs[16]              w_j = d * q_j + m

Every type is written as w_j = d * (u_j - k) + m with unsigned quants u_j < 256 and a
constant k (Q8_0 stores u_j = qs[j] + 128), so one int8 dot product serves all five:
x is quantized to int8 blocks exactly as llama.cpp quantizes it (``simd.quantize_x_q8``: Q8_0
for Q4_0/Q5_0/Q8_0, Q8_1 for Q4_1/Q5_1: qx, f16 scale dx, block sum sx, f16 s) and

    sum_j w_j x_j  ~=  d * dx * (sum_j u_j qx_j - k * sx)  +  m * s

the same integers and f16 roundings as ggml_vec_dot_q*_q8_*, so products match llama.cpp's to
float32 summation order.

The integer part is one VNNI ``vpdpbusd`` per block on CPUs that have it (``simd.has_vnni``),
else a portable Numba loop computes the same integers. The error against float x is the int8
rounding of x (bound 5e-4, so ``x_quantized=True``). ``dequantize`` mirrors gguf-py's float32
operation order per type, so it is bit-equal to ``gguf.quants.dequantize``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from gguf.constants import GGMLQuantizationType as T
from numba import njit, prange

from prima_ref.quants import QuantKernels, lanes, tiled
from prima_ref.quants.layouts import LAYOUTS, QK_LEGACY
from prima_ref.quants.simd import (
    _quantize_rows_q8,
    axpy_f32x8,
    dot_u8i8_i32x8,
    dot_u8i8_i32x16,
    dup_u8x64,
    f32x8_zero,
    fma_f32x8,
    fma_i32x8,
    fma_i32x16_store,
    has_vnni,
    hsum_f32x8,
    i32x8_zero,
    i32x16_zero,
    lane_f32x8,
    load_bits_u8x32,
    load_f16,
    load_f16x8_strided,
    load_f32x8,
    load_f32x16,
    load_i8x32,
    load_i8x64,
    load_i32x8,
    load_nibbles_u8x32,
    load_q8_as_u8x32,
    mul_f32x8,
    mul_f32x16,
    or_u8x32,
    quantize_x_q8,
    shl_i32x8,
    splat_f32x16,
)


class LegacyKernelInputError(ValueError):
    pass


# --- layout constants (from the field sizes, never literals) ------------------------------------

QK = QK_LEGACY
UQK = np.uint64(QK)
F16_BYTES = 2
QH_BYTES = QK // 8  # one high bit per weight (Q5)
Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 = (int(t) for t in (T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1))
BLOCK_BYTES = {k: LAYOUTS[T(k)].type_size for k in (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1)}
HAS_MIN = {Q8_0: False, Q4_0: False, Q4_1: True, Q5_0: False, Q5_1: True}
HAS_QH = {Q8_0: False, Q4_0: False, Q4_1: False, Q5_0: True, Q5_1: True}
# byte offset of qs / qh inside a block
QS_OFF = {k: F16_BYTES * (1 + HAS_MIN[k]) + QH_BYTES * HAS_QH[k] for k in BLOCK_BYTES}
QH_OFF = {k: F16_BYTES * (1 + HAS_MIN[k]) for k in BLOCK_BYTES}
U0, U1, U2, U3, U4, U5, U6, U7 = (np.uint64(i) for i in range(8))
K_OFFSET = {Q8_0: 128, Q4_0: 8, Q4_1: 0, Q5_0: 16, Q5_1: 0}  # u_j - k is the signed quant
K_SHIFT = {k: int(v).bit_length() - 1 if v else 0 for k, v in K_OFFSET.items()}  # k = 1 << shift



def _by_kind(table: dict) -> tuple:
    """Numba indexes tuples by a constant kind and folds the lookup; it cannot index dicts."""
    return tuple(table.get(k, 0) for k in range(max(table) + 1))


_BB, _QS, _QH, _K, _MIN, _SH = map(_by_kind, (BLOCK_BYTES, QS_OFF, QH_OFF, K_OFFSET, HAS_MIN,
                                               K_SHIFT))


# --- numpy reference (gguf-py's operation order) ------------------------------------------------


def _f16(blocks: np.ndarray, off: int) -> np.ndarray:
    return blocks[:, off : off + F16_BYTES].copy().view(np.float16).astype(np.float32)  # (n, 1)


def _unsigned_quants_ref(kind: int, blocks: np.ndarray) -> np.ndarray:
    """u_j as uint8 (n_blocks, 32): the quant without its offset k."""
    qs = blocks[:, QS_OFF[kind] :]
    if kind == Q8_0:
        return qs[:, :QK].view(np.int8).astype(np.int16) + K_OFFSET[Q8_0]
    u = np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=1)
    if HAS_QH[kind]:
        qh = blocks[:, QH_OFF[kind] : QH_OFF[kind] + QH_BYTES].copy().view(np.uint32)
        bits = (qh >> np.arange(QK, dtype=np.uint32)) & np.uint32(1)  # (n, 32)
        u = u | (bits.astype(np.uint8) << np.uint8(4))
    return u


def dequantize_ref(kind: int, raw: np.ndarray) -> np.ndarray:
    n_rows = raw.shape[0]
    blocks = raw.reshape(-1, BLOCK_BYTES[kind])
    d = _f16(blocks, 0)
    u = _unsigned_quants_ref(kind, blocks)
    if HAS_MIN[kind]:  # gguf: (d * q) + m
        w = d * u.astype(np.float32) + _f16(blocks, F16_BYTES)
    else:  # gguf: d * float(q - k); Q8_0: float(q) * d, the same product
        w = d * (u.astype(np.int16) - K_OFFSET[kind]).astype(np.float32)
    return w.reshape(n_rows, -1)


# --- Numba dequantize ---------------------------------------------------------------------------


@njit(cache=True, inline="always")
def _quant(kind, row, o, j):
    """Unsigned quant u_j of the block at byte o of a row (u_j - k is the signed quant)."""
    if kind == Q8_0:
        return np.int32(row[o + _QS[kind] + j]) ^ 128  # int8 bits + 128
    byte = np.int32(row[o + _QS[kind] + (j & 15)])
    u = (byte >> 4) if j >= 16 else (byte & 15)
    if _QH[kind] != _QS[kind]:
        qh = o + _QH[kind]
        u |= ((np.int32(row[qh + (j >> 3)]) >> (j & 7)) & 1) << 4
    return u


@njit(cache=True, inline="always")
def _dequantize_rows(kind, raw, out):
    bb = _BB[kind]
    for r in prange(raw.shape[0]):
        row = raw[r]
        for b in range(raw.shape[1] // bb):
            o = b * bb
            d = load_f16(row, o)
            m = load_f16(row, o + F16_BYTES) if _MIN[kind] else np.float32(0)
            for j in range(QK):
                u = _quant(kind, row, o, j)
                if _MIN[kind]:
                    out[r, b * QK + j] = d * np.float32(u) + m
                else:
                    out[r, b * QK + j] = d * np.float32(u - _K[kind])


# --- int8 dot products: VNNI and portable -------------------------------------------------------


@njit(cache=True, inline="always")
def _block_vnni(kind, row, o):
    """The block's unsigned quants as 32 bytes, for vpdpbusd."""
    qs = o + np.uint64(_QS[kind])
    if kind == Q8_0:
        return load_q8_as_u8x32(row, qs)
    u = load_nibbles_u8x32(row, qs)
    if _QH[kind] != _QS[kind]:
        u = or_u8x32(u, load_bits_u8x32(row, o + np.uint64(_QH[kind]), 16))
    return u


@njit(cache=True, inline="always")
def _block_dot_vnni(kind, row, o, qx, b, dx, acc, nls):
    """acc + (d * dx_b) * (the block's 8 lane sums of (u_j - k) * qx_j), for types without a
    min: the -k * sum(qx) term enters as the dot's starting value, -k times the lane sums of
    qx (nls, negated), so each lane holds llama.cpp's exact integer, as its AVX2 dot does."""
    init = shl_i32x8(load_i32x8(nls, b * U8), _SH[kind])
    dot = dot_u8i8_i32x8(init, _block_vnni(kind, row, o), load_i8x32(qx, b * UQK))
    return fma_i32x8(acc, dot, load_f16(row, o) * dx[b])


@njit(cache=True, inline="always")
def neg_lane_sums(qx, nls):
    """nls[l] = -(qx[4l] + ... + qx[4l+3]): int8 x (n,) -> int32 (n // 4,)."""
    for i in range(nls.shape[0]):
        o = 4 * i
        total = np.int32(qx[o]) + np.int32(qx[o + 1]) + np.int32(qx[o + 2]) + np.int32(qx[o + 3])
        nls[i] = -total


@njit(cache=True, inline="always")
def _block_dot_min_vnni(kind, row, o, qx, b, dx, acc):
    dot = dot_u8i8_i32x8(i32x8_zero(), _block_vnni(kind, row, o), load_i8x32(qx, b * UQK))
    return fma_i32x8(acc, dot, load_f16(row, o) * dx[b])


@njit(cache=True, inline="always")
def _dot_scaled(kind, row, o, qx, b, scale, acc):
    dot = dot_u8i8_i32x8(i32x8_zero(), _block_vnni(kind, row, o), load_i8x32(qx, b * UQK))
    return fma_i32x8(acc, dot, scale)


@njit(cache=True, inline="always")
def _row_dot_min_vnni(kind, row, qx, dx, dsx):
    """Q4_1 / Q5_1: each block adds m * dsx_b (Q8_1's s) to the integer part. Eight blocks'
    d and m are loaded and converted at once (two vcvtph2ps), their scales d * dx and min
    terms m * s computed 8 wide; each block's dot then takes its lane of the scales."""
    bb, n_blocks = np.uint64(_BB[kind]), np.uint64(dx.shape[0])
    field = np.uint64(F16_BYTES)  # m
    acc0, acc1 = f32x8_zero(), f32x8_zero()  # two chains each hide the FMA latency
    offs = f32x8_zero()
    n_wide = n_blocks & ~np.uint64(7)
    for b in range(U0, n_wide, U8):
        o = b * bb
        scales = mul_f32x8(load_f16x8_strided(row, o, bb), load_f32x8(dx, b))
        offs = fma_f32x8(load_f16x8_strided(row, o + field, bb), load_f32x8(dsx, b), offs)
        acc0 = _dot_scaled(kind, row, o, qx, b, lane_f32x8(scales, 0), acc0)
        acc1 = _dot_scaled(kind, row, o + bb, qx, b + U1, lane_f32x8(scales, 1), acc1)
        acc0 = _dot_scaled(kind, row, o + 2 * bb, qx, b + U2, lane_f32x8(scales, 2), acc0)
        acc1 = _dot_scaled(kind, row, o + 3 * bb, qx, b + U3, lane_f32x8(scales, 3), acc1)
        acc0 = _dot_scaled(kind, row, o + 4 * bb, qx, b + U4, lane_f32x8(scales, 4), acc0)
        acc1 = _dot_scaled(kind, row, o + 5 * bb, qx, b + U5, lane_f32x8(scales, 5), acc1)
        acc0 = _dot_scaled(kind, row, o + 6 * bb, qx, b + U6, lane_f32x8(scales, 6), acc0)
        acc1 = _dot_scaled(kind, row, o + 7 * bb, qx, b + U7, lane_f32x8(scales, 7), acc1)
    off = np.float32(0)
    for b in range(n_wide, n_blocks):
        o = b * bb
        acc0 = _block_dot_min_vnni(kind, row, o, qx, b, dx, acc0)
        off += load_f16(row, o + field) * dsx[b]
    return hsum_f32x8(acc0) + hsum_f32x8(acc1) + (hsum_f32x8(offs) + off)


@njit(cache=True, inline="always")
def _row_dot_vnni(kind, row, qx, dx, dsx, nls):
    """sum_j w_j x_j for one weight row; qx int8 (n,), dx f32 (n // 32,); types with a min
    add m * dsx per block (Q8_1's s), the others start each block dot at nls << log2(k)."""
    if _MIN[kind]:
        return _row_dot_min_vnni(kind, row, qx, dx, dsx)
    # uint64 indices: Numba adds negative-index wraparound code to every signed array index
    bb, n_blocks = np.uint64(_BB[kind]), np.uint64(dx.shape[0])
    acc0, acc1 = f32x8_zero(), f32x8_zero()  # two chains each hide the FMA latency
    n_wide = n_blocks & ~np.uint64(7)
    for b in range(U0, n_wide, U8):  # 8 blocks' scales d * dx at once, as the min types
        o = b * bb
        scales = mul_f32x8(load_f16x8_strided(row, o, bb), load_f32x8(dx, b))
        acc0 = _dot_init(kind, row, o, qx, b, lane_f32x8(scales, 0), acc0, nls)
        acc1 = _dot_init(kind, row, o + bb, qx, b + U1, lane_f32x8(scales, 1), acc1, nls)
        acc0 = _dot_init(kind, row, o + 2 * bb, qx, b + U2, lane_f32x8(scales, 2), acc0, nls)
        acc1 = _dot_init(kind, row, o + 3 * bb, qx, b + U3, lane_f32x8(scales, 3), acc1, nls)
        acc0 = _dot_init(kind, row, o + 4 * bb, qx, b + U4, lane_f32x8(scales, 4), acc0, nls)
        acc1 = _dot_init(kind, row, o + 5 * bb, qx, b + U5, lane_f32x8(scales, 5), acc1, nls)
        acc0 = _dot_init(kind, row, o + 6 * bb, qx, b + U6, lane_f32x8(scales, 6), acc0, nls)
        acc1 = _dot_init(kind, row, o + 7 * bb, qx, b + U7, lane_f32x8(scales, 7), acc1, nls)
    for b in range(n_wide, n_blocks):
        acc0 = _block_dot_vnni(kind, row, b * bb, qx, b, dx, acc0, nls)
    return hsum_f32x8(acc0) + hsum_f32x8(acc1)


@njit(cache=True, inline="always")
def _dot_init(kind, row, o, qx, b, scale, acc, nls):
    init = shl_i32x8(load_i32x8(nls, b * U8), _SH[kind])
    dot = dot_u8i8_i32x8(init, _block_vnni(kind, row, o), load_i8x32(qx, b * UQK))
    return fma_i32x8(acc, dot, scale)


@njit(cache=True, inline="always")
def _row_dot_portable(kind, row, qx, dx, dsx, nls):
    """_row_dot_vnni's arithmetic in plain Numba, for CPUs without VNNI."""
    bb = _BB[kind]
    acc, off = np.float32(0), np.float32(0)
    for b in range(dx.shape[0]):
        o = b * bb
        dot = np.int32(0)
        for j in range(QK):
            dot += _quant(kind, row, o, j) * np.int32(qx[b * QK + j])
        if not _MIN[kind]:
            for i in range(8):
                dot += nls[b * 8 + i] << _SH[kind]
        acc += np.float32(dot) * (load_f16(row, o) * dx[b])
        if _MIN[kind]:
            off += load_f16(row, o + F16_BYTES) * dsx[b]
    return acc + off


# --- matmul: each weight block decoded once, reused over all tokens ------------------------------
# Activations are block-major (n_blocks, n_tokens_padded, ...) so a block's token loop reads
# contiguous bytes, and tokens pad with zeros to TOKEN_LANES so no loop has a tail. A task
# takes ROW_TILE rows: each activation load from L2 then serves 4 weight rows, which is what
# keeps the loop from being L2-bandwidth bound.

ROW_TILE = 4
TILED_MIN_TOKENS = 8  # above this many tokens, prima_ref.quants.tiled's register tiles
TOKEN_LANES = 8  # offset sums run 8 tokens wide, the 512-bit dot 2 tokens wide
U8 = np.uint64(8)


@njit(cache=True, inline="always")
def _matmul_rows(kind, vnni, raw, qxb, dx8, dxsxb, ys):
    """ys (n_tokens, n_rows); qxb int8 (n_blocks * padded * 32,), dx8 f32 (n_blocks * padded
    * 8,): each dx 8 times, dxsxb f32 (n_blocks * padded,): BlockMajorQ8's offset factor for
    the type."""
    bb, n_rows = np.uint64(_BB[kind]), raw.shape[0]
    n_blocks = np.uint64(raw.shape[1]) // bb
    padded = np.uint64(dxsxb.shape[0]) // n_blocks
    field = np.uint64(F16_BYTES if _MIN[kind] else 0)
    scale_off = np.float32(1) if _MIN[kind] else np.float32(-_K[kind])
    for task in prange((n_rows + ROW_TILE - 1) // ROW_TILE):
        r0 = task * ROW_TILE
        last = n_rows - 1  # a short last tile repeats its last row and drops the copies
        rows = (raw[r0], raw[min(r0 + 1, last)], raw[min(r0 + 2, last)], raw[min(r0 + 3, last)])
        acc = np.zeros(ROW_TILE * padded * U8, np.float32)  # (ROW_TILE, padded, 8 lanes)
        off = np.zeros(ROW_TILE * padded, np.float32)  # (ROW_TILE, padded)
        for b in range(U0, n_blocks, U1):
            o = b * bb
            if vnni:
                _tile_block_vnni(kind, rows, o, qxb, dx8, b * padded, padded, acc)
            for k in range(ROW_TILE):
                if not vnni:
                    _block_tokens_portable(kind, rows[k], o, qxb, dx8, b * padded, padded,
                                           acc[k * padded * U8 :])
                f = load_f16(rows[k], o + field)
                for t in range(U0, padded, U8):
                    axpy_f32x8(off, k * padded + t, f, dxsxb, b * padded + t)
        for k in range(min(ROW_TILE, n_rows - r0)):
            for t in range(ys.shape[0]):
                lanes = (k * padded + t) * U8
                ys[t, r0 + k] = acc[lanes : lanes + U8].sum() + scale_off * off[k * padded + t]


@njit(cache=True, inline="always")
def _tile_block_vnni(kind, rows, o, qxb, dx8, i0, padded, acc):
    """acc[k, t] += d_k * dx[t] * (lane sums of u_k . qx[t]) for 4 rows k and all tokens t."""
    u0, u1 = dup_u8x64(_block_vnni(kind, rows[0], o)), dup_u8x64(_block_vnni(kind, rows[1], o))
    u2, u3 = dup_u8x64(_block_vnni(kind, rows[2], o)), dup_u8x64(_block_vnni(kind, rows[3], o))
    d0, d1 = splat_f32x16(load_f16(rows[0], o)), splat_f32x16(load_f16(rows[1], o))
    d2, d3 = splat_f32x16(load_f16(rows[2], o)), splat_f32x16(load_f16(rows[3], o))
    stride = padded * U8  # one row's accumulators
    for t in range(U0, padded, U2):  # two tokens per 512-bit step
        qx, dx = load_i8x64(qxb, (i0 + t) * UQK), load_f32x16(dx8, (i0 + t) * U8)
        a = t * U8
        fma_i32x16_store(acc, a, dot_u8i8_i32x16(i32x16_zero(), u0, qx), mul_f32x16(d0, dx))
        a += stride
        fma_i32x16_store(acc, a, dot_u8i8_i32x16(i32x16_zero(), u1, qx), mul_f32x16(d1, dx))
        a += stride
        fma_i32x16_store(acc, a, dot_u8i8_i32x16(i32x16_zero(), u2, qx), mul_f32x16(d2, dx))
        a += stride
        fma_i32x16_store(acc, a, dot_u8i8_i32x16(i32x16_zero(), u3, qx), mul_f32x16(d3, dx))


@njit(cache=True, inline="always")
def _block_tokens_portable(kind, row, o, qxb, dx8, i0, padded, acc):
    u = np.empty(QK, np.int32)  # (32,) the decoded block
    for j in range(QK):
        u[j] = _quant(kind, row, o, j)
    d = load_f16(row, o)
    for t in range(U0, padded, U1):
        i = i0 + t
        dot = np.int32(0)
        for j in range(QK):
            dot += u[j] * np.int32(qxb[i * UQK + j])
        acc[t * U8] += np.float32(dot) * (d * dx8[i * U8])


# --- per-type kernels and the checked Python entry points ---------------------------------------


def _compile(kind: int, vnni: bool):
    """Top-level Numba kernels for one type. The VNNI ones are built only on VNNI CPUs: LLVM
    cannot select vpdpbusd elsewhere, so they must never be compiled there."""

    @njit(cache=True, parallel=True)
    def dequantize(raw, out):
        _dequantize_rows(kind, raw, out)

    if vnni:

        @njit(cache=True, parallel=True)
        def matvec(raw, qx, dx, dsx, y):
            nls = np.empty(qx.shape[0] // 4, np.int32)
            neg_lane_sums(qx, nls)
            for r in prange(raw.shape[0]):
                y[r] = _row_dot_vnni(kind, raw[r], qx, dx, dsx, nls)

        @njit(cache=True, parallel=True)
        def matmul(raw, qxb, dx8, dxsxb, ys):
            _matmul_rows(kind, True, raw, qxb, dx8, dxsxb, ys)

    else:

        @njit(cache=True, parallel=True)
        def matvec(raw, qx, dx, dsx, y):
            nls = np.empty(qx.shape[0] // 4, np.int32)
            neg_lane_sums(qx, nls)
            for r in prange(raw.shape[0]):
                y[r] = _row_dot_portable(kind, raw[r], qx, dx, dsx, nls)

        @njit(cache=True, parallel=True)
        def matmul(raw, qxb, dx8, dxsxb, ys):
            _matmul_rows(kind, False, raw, qxb, dx8, dxsxb, ys)

    return dequantize, matvec, matmul


def _check_raw(qtype: T, raw: np.ndarray) -> int:
    """Validate a (n_rows, row_bytes) uint8 tensor; return n_cols."""
    bb = LAYOUTS[qtype].type_size
    if raw.dtype != np.uint8 or raw.ndim != 2 or not raw.flags.c_contiguous:
        raise LegacyKernelInputError(
            f"{qtype.name}: raw must be a C-contiguous uint8 (n_rows, row_bytes) array, "
            f"got {raw.dtype} {raw.shape}")
    if raw.shape[1] % bb or raw.shape[1] == 0:  # the kernels count down from n_blocks - 1
        raise LegacyKernelInputError(
            f"{qtype.name}: row of {raw.shape[1]} bytes is not a whole, non-zero number of "
            f"{bb}-byte blocks")
    return raw.shape[1] // bb * QK


def _check_x(qtype: T, x: np.ndarray, n_cols: int, ndim: int) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != ndim or x.shape[-1] != n_cols:
        want = "(n_cols,)" if ndim == 1 else "(n_tokens, n_cols)"
        raise LegacyKernelInputError(
            f"{qtype.name}: x must have shape {want} with n_cols={n_cols}, got {x.shape}")
    return x


class BlockMajorQ8(NamedTuple):
    """Tokens' int8 activations laid out for the matmul kernels, block-major and zero-padded
    to TOKEN_LANES tokens (zero tokens add nothing); one preparation serves every legacy type,
    so matrices that multiply the same input (q/k/v, gate/up) share it."""

    qxb: np.ndarray  # int8 (n_blocks * padded * 32,)
    dx8: np.ndarray  # f32 (n_blocks * padded * 8,): each dx 8 times
    dxsxb: np.ndarray  # f32 (n_blocks * padded,): dx * sx, the offset factor without a min
    dsxb: np.ndarray  # f32 (n_blocks * padded,): Q8_1's s, the offset factor with a min
    n_tokens: int
    n_cols: int
    dxb: np.ndarray  # f32 (n_blocks * padded,): dx (the tiled kernels, more than 8 tokens)
    nsxb: np.ndarray  # int32 (n_blocks * padded,): -sx
    shifted: dict  # log2(k) -> nsxb << log2(k), the tiled kernels' dot seeds, made on demand

    def seeds(self, shift: int) -> np.ndarray:
        if shift not in self.shifted:
            self.shifted[shift] = self.nsxb << np.int32(shift)
        return self.shifted[shift]


@njit(cache=True, parallel=True)
def _block_major_q8(xs, padded, qxb, dx8, dxsxb, dsxb, dxb, nsxb):
    n_tokens, n = xs.shape
    n_blocks = n // QK
    qx = np.empty((n_tokens, n), np.int8)
    dx = np.empty((n_tokens, n_blocks), np.float32)
    sx = np.empty((n_tokens, n_blocks), np.int32)
    dsx = np.empty((n_tokens, n_blocks), np.float32)
    for t in prange(n_tokens):
        lo, hi = t, t + 1
        _quantize_rows_q8(xs[lo:hi], qx[lo:hi], dx[lo:hi], sx[lo:hi], dsx[lo:hi])
    for b in prange(n_blocks):
        for t in range(padded):
            i = b * padded + t
            real = t < n_tokens
            d = dx[t, b] if real else np.float32(0)
            for j in range(QK):
                qxb[i * QK + j] = qx[t, b * QK + j] if real else 0
            for lane in range(8):
                dx8[i * 8 + lane] = d
            dxsxb[i] = d * np.float32(sx[t, b]) if real else np.float32(0)
            dsxb[i] = dsx[t, b] if real else np.float32(0)
            dxb[i] = d
            nsxb[i] = -sx[t, b] if real else 0


def prepare_activations(xs: np.ndarray) -> BlockMajorQ8:
    """xs float32 (n_tokens, n_cols) -> the int8 activations every legacy matmul reads."""
    xs = np.ascontiguousarray(xs, dtype=np.float32)
    if xs.ndim != 2 or xs.shape[1] % QK or xs.shape[0] == 0:
        raise LegacyKernelInputError(
            f"activations must be (n_tokens > 0, n_cols multiple of {QK}), got {xs.shape}")
    n_tokens, n_cols = xs.shape
    padded = -(-n_tokens // TOKEN_LANES) * TOKEN_LANES
    n_slots = n_cols // QK * padded
    act = BlockMajorQ8(np.empty(n_slots * QK, np.int8), np.empty(n_slots * 8, np.float32),
                       np.empty(n_slots, np.float32), np.empty(n_slots, np.float32),
                       n_tokens, n_cols, np.empty(n_slots, np.float32),
                       np.empty(n_slots, np.int32), {})
    _block_major_q8(xs, padded, act.qxb, act.dx8, act.dxsxb, act.dsxb, act.dxb, act.nsxb)
    return act


def matmul_prepared(qtype, raw: np.ndarray, act: BlockMajorQ8) -> np.ndarray:
    """ys (n_tokens, n_rows) = xs @ W.T for activations from prepare_activations; the same
    floats as KERNELS[qtype].matmul(raw, xs) for n_tokens > 1. Above TILED_MIN_TOKENS
    tokens (prefill) the register-tiled kernels of prima_ref.quants.tiled take it."""
    qtype = T(qtype)
    if _check_raw(qtype, raw) != act.n_cols:
        raise LegacyKernelInputError(
            f"{qtype.name}: activations have {act.n_cols} columns, the matrix {raw.shape}")
    if act.n_tokens > TILED_MIN_TOKENS and tiled.enabled():
        return tiled.matmul(int(qtype), raw, act)
    ys = np.empty((act.n_tokens, raw.shape[0]), np.float32)  # (n_tokens, n_rows)
    offsets = act.dsxb if HAS_MIN[int(qtype)] else act.dxsxb
    _MATMUL[int(qtype)](raw, act.qxb, act.dx8, offsets, ys)
    return ys


_MATMUL: dict = {}


def make_kernels(qtype: T, vnni: bool) -> QuantKernels:
    """QuantKernels for one legacy type; vnni=False gives the portable path on any CPU."""
    kind = int(qtype)
    if vnni and not has_vnni():
        raise LegacyKernelInputError(f"{qtype.name}: this CPU has no VNNI; use vnni=False")
    dequant_nb, matvec_nb, matmul_nb = _compile(kind, vnni)
    if vnni == has_vnni():
        _MATMUL[kind] = matmul_nb

    def dequantize(raw):
        n_cols = _check_raw(qtype, raw)
        out = np.empty((raw.shape[0], n_cols), np.float32)  # (n_rows, n_cols)
        dequant_nb(raw, out)
        return out

    def matvec(raw, x):
        x = _check_x(qtype, x, _check_raw(qtype, raw), 1)
        y = np.empty(raw.shape[0], np.float32)  # (n_rows,)
        if vnni and lanes.available():  # rows in lanes: the decode kernels' arithmetic
            lanes.matvec(raw, kind, BLOCK_BYTES[kind], x, y)
            return y
        qx, dx, sx, dsx = quantize_x_q8(x)
        matvec_nb(raw, qx, dx, dsx, y)
        return y

    def matmul(raw, xs):
        xs = _check_x(qtype, xs, _check_raw(qtype, raw), 2)
        ys = np.empty((xs.shape[0], raw.shape[0]), np.float32)  # (n_tokens, n_rows)
        if xs.shape[0] == 1:  # padding one token to TOKEN_LANES would cost 8x
            ys[0] = matvec(raw, xs[0])
        elif vnni and xs.shape[0] > TILED_MIN_TOKENS and tiled.enabled():
            ys = tiled.matmul(kind, raw, prepare_activations(xs))
        elif xs.shape[0]:
            act = prepare_activations(xs)
            matmul_nb(raw, act.qxb, act.dx8, act.dsxb if HAS_MIN[kind] else act.dxsxb, ys)
        return ys

    return QuantKernels(
        dequantize_ref=lambda raw: dequantize_ref(kind, _check_raw(qtype, raw) and raw),
        dequantize=dequantize, matvec=matvec, matmul=matmul, x_quantized=True)


KERNELS = {t: make_kernels(t, has_vnni()) for t in (T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1)}
