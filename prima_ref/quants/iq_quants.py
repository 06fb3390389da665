"""Non-linear and 1-bit "IQ" quants: IQ4_NL, IQ1_S, IQ1_M (ggml-common.h block_iq*).

Block layouts, in on-disk order (``d``: f16; u16 fields little-endian):

    IQ4_NL (32 weights)  d | qs[16]
        q_j = low nibble of qs[j] (j < 16), high nibble of qs[j-16] (j >= 16)
        w_j = d * KVALUES[q_j]                       (KVALUES: 16 non-linear int8 levels)

    IQ1_S (256 weights = 8 sub-blocks of 32 = 4 groups of 8)  d | qs[32] | qh[8] u16
        sub-block s: qh[s] = sign of delta (bit 15) | 3-bit scale (bits 12-14)
                             | 3 high index bits per group (bits 3g..3g+2)
        group g of s: idx = qs[4s+g] | high bits << 8, an 11-bit index into GRID (2048 x 8
        values in {-1, 0, 1});  w = d * (2*scale + 1) * (GRID[idx] + delta), delta = +-1/8

    IQ1_M (256 weights = 32 groups of 8)  qs[32] | qh[16] | scales[4] u16
        group g: nibble (g % 2) of qh[g // 2] = delta sign (bit 3) | 3 high index bits;
        idx = qs[g] | high bits << 8;  3-bit scale per 16 weights: scales[g//8] >> 3*((g//2)%4);
        d (f16) is stored in the top nibbles of the four scale words, scales[0] lowest;
        w = d * (2*scale + 1) * (GRID[idx] + delta)

Dequantization mirrors gguf-py's float32 operation order, so it is bit-equal to
``gguf.quants.dequantize``. The products first replace x by the values d * q of llama.cpp's
activation quantization (Q8_0 for IQ4_NL, Q8_K for IQ1_S/IQ1_M; x_quantized=True), then run
float32 kernels: each sub-block's sum over its weights is taken with x unscaled and multiplied
by its scale once. Same result as ggml's int8 dots up to float32 summation order.
"""

from __future__ import annotations

import numpy as np
from gguf import quants as gq
from gguf.constants import GGMLQuantizationType as T
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from prima_ref.quants import QuantKernels
from prima_ref.quants.float_types import add_token_dots, check_rows, check_x, f16_bits_to_f32
from prima_ref.quants.layouts import LAYOUTS
from prima_ref.quants.simd import (
    F32x8,
    cpu_features,
    f32x8_zero,
    hsum_f32x8,
    load_f16,
    q8_0_values,
    q8_k_values,
)

U64 = np.uint64
F16_BYTES = 2
MATMUL_CHUNK = 512  # weights of one row decoded at once for matmul (2 KiB of float32, in L1)
_PRODUCT_MATH = {"reassoc", "contract", "nsz", "arcp"}

# --- layout constants (from gguf-py's tables and LAYOUTS, never literals) -----------------------

KVALUES = np.array(gq.IQ4_NL.kvalues, dtype=np.int8)  # (16,)
NL_QK = LAYOUTS[T.IQ4_NL].block_size
NL_BYTES = LAYOUTS[T.IQ4_NL].type_size
NL_HALF = NL_QK // 2  # weights per nibble half

gq.IQ1_S.init_grid()
GRID_ROWS, GROUP = gq.IQ1_S.grid_shape  # 2048 grid entries of 8 weights
GRID = gq.IQ1_S.grid.reshape(-1).astype(np.int8)  # (GRID_ROWS * GROUP,) values -1, 0, 1
IQ1_DELTA = np.float32(gq.IQ1_S.delta)

QK1 = LAYOUTS[T.IQ1_S].block_size
S_BYTES = LAYOUTS[T.IQ1_S].type_size
S_SUB = 32  # weights per IQ1_S sub-block (one qh word)
S_QS = F16_BYTES  # qs offset inside an IQ1_S block
S_QH = S_QS + QK1 // GROUP  # qh offset: one index byte per group before it

M_BYTES = LAYOUTS[T.IQ1_M].type_size
M_QH = QK1 // GROUP  # qh offset inside an IQ1_M block (after one index byte per group)
M_SC = M_QH + QK1 // GROUP // 2  # scales offset (qh holds one nibble per group)
M_SCALE_GROUPS = 2  # groups of 8 per 3-bit IQ1_M scale


# --- 8 x float32 vectors (simd.F32x8) for the float-x products ---------------------------------
# LLVM's SLP vectorizer does not see through the grid lookups; these keep the hot loops in ymm.

_V8F32 = ir.VectorType(ir.FloatType(), 8)


def _elem_ptr(context, builder, arr_ty, arr, i, i_ty, elem_ir):
    """Pointer to element i of a C-contiguous 1-D array, as elem_ir*."""
    data = cgutils.create_struct_proxy(arr_ty)(context, builder, value=arr).data
    ptr = builder.gep(data, [context.cast(builder, i, i_ty, types.int64)])
    return builder.bitcast(ptr, elem_ir.as_pointer())


def _is_1d(arr, dtype) -> bool:
    return isinstance(arr, types.Array) and arr.ndim == 1 and arr.dtype == dtype


@intrinsic
def load_i8_as_f32x8(typingctx, arr, i):
    """float(arr[i:i+8]) of an int8 array (a GRID row)."""
    if not (_is_1d(arr, types.int8) and isinstance(i, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        ptr = _elem_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1],
                        ir.VectorType(ir.IntType(8), 8))
        wide = builder.sext(builder.load(ptr, align=1), ir.VectorType(ir.IntType(32), 8))
        return builder.sitofp(wide, _V8F32)

    return F32x8(arr, i), codegen


@intrinsic
def load_f32x8(typingctx, arr, i):
    """arr[i:i+8] of a float32 array."""
    if not (_is_1d(arr, types.float32) and isinstance(i, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        ptr = _elem_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1], _V8F32)
        return builder.load(ptr, align=4)

    return F32x8(arr, i), codegen


def _fma_fn(builder):
    fnty = ir.FunctionType(_V8F32, [_V8F32] * 3)
    return cgutils.get_or_insert_function(builder.module, fnty, "llvm.fma.v8f32")


@intrinsic
def fma_f32x8(typingctx, acc, a, b):
    """acc + a * b, lane by lane."""
    if (acc, a, b) != (F32x8, F32x8, F32x8):
        return None

    def codegen(context, builder, sig, args):
        return builder.call(_fma_fn(builder), [args[1], args[2], args[0]])

    return F32x8(acc, a, b), codegen


@intrinsic
def fma_scalar_f32x8(typingctx, acc, v, s):
    """acc + v * s for a scalar s."""
    if (acc, v) != (F32x8, F32x8) or not isinstance(s, types.Float):
        return None

    def codegen(context, builder, sig, args):
        s32 = context.cast(builder, args[2], sig.args[2], types.float32)
        lane0 = ir.Constant(ir.IntType(32), 0)
        one = builder.insert_element(ir.Constant(_V8F32, None), s32, lane0)
        zeros = ir.Constant(ir.VectorType(ir.IntType(32), 8), None)
        splat = builder.shuffle_vector(one, one, zeros)
        return builder.call(_fma_fn(builder), [args[1], splat, args[0]])

    return F32x8(acc, v, s), codegen


HAS_AVX2 = bool(cpu_features().get("avx2"))  # vpshufb on 32 bytes: the IQ4_NL table lookup


@intrinsic
def iq4_nl_dot_f32x8(typingctx, raw, off, x, xo):
    """Per-lane partial sums of KVALUES[q_j] * x[xo + j] over one IQ4_NL block whose qs start
    at byte off: the 32 nibbles index the 16 levels with one vpshufb (as llama.cpp does)."""
    ok = _is_1d(raw, types.uint8) and _is_1d(x, types.float32)
    if not (ok and isinstance(off, types.Integer) and isinstance(xo, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        v16, v32 = ir.VectorType(ir.IntType(8), 16), ir.VectorType(ir.IntType(8), 32)
        i32 = ir.IntType(32)
        qs = builder.load(_elem_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1],
                                    v16), align=1)
        lo = builder.and_(qs, ir.Constant(v16, [0x0F] * 16))
        hi = builder.lshr(qs, ir.Constant(v16, [4] * 16))
        idx = builder.shuffle_vector(lo, hi, ir.Constant(ir.VectorType(i32, 32), list(range(32))))
        fnty = ir.FunctionType(v32, [v32, v32])
        pshufb = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.avx2.pshuf.b")
        table = ir.Constant(v32, [int(v) & 0xFF for v in KVALUES] * 2)  # same 16 per 128 bits
        levels = builder.call(pshufb, [table, idx])
        acc = ir.Constant(_V8F32, None)
        for k in range(4):
            lanes = ir.Constant(ir.VectorType(i32, 8), list(range(8 * k, 8 * k + 8)))
            part = builder.shuffle_vector(levels, levels, lanes)
            wf = builder.sitofp(builder.sext(part, ir.VectorType(i32, 8)), _V8F32)
            xk = builder.add(context.cast(builder, args[3], sig.args[3], types.int64),
                             ir.Constant(ir.IntType(64), 8 * k))
            xv = builder.load(_elem_ptr(context, builder, sig.args[2], args[2], xk, types.int64,
                                        _V8F32), align=4)
            acc = builder.call(_fma_fn(builder), [wf, xv, acc])
        return acc

    return F32x8(raw, off, x, xo), codegen


# --- numpy references ---------------------------------------------------------------------------


def _f16(blocks: np.ndarray, off: int) -> np.ndarray:
    return blocks[:, off : off + F16_BYTES].copy().view(np.float16).astype(np.float32)  # (n, 1)


def _iq4_nl_ref(blocks: np.ndarray) -> np.ndarray:
    d = _f16(blocks, 0)
    qs = blocks[:, F16_BYTES:]  # (n, 16)
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1)  # (n, 32)
    return d * KVALUES[q].astype(np.float32)


def _grid_values(idx: np.ndarray) -> np.ndarray:
    """(n, n_groups) indices -> (n, n_groups, GROUP) float32 grid values."""
    return GRID.reshape(GRID_ROWS, GROUP)[idx].astype(np.float32)


def _iq1_s_ref(blocks: np.ndarray) -> np.ndarray:
    n = blocks.shape[0]
    d = _f16(blocks, 0)
    qs = blocks[:, S_QS:S_QH].astype(np.uint16).reshape(n, -1, 4)  # (n, 8, 4)
    qh = blocks[:, S_QH:].copy().view(np.uint16)  # (n, 8)
    dl = d * (2 * ((qh >> 12) & 7) + 1).astype(np.float32)  # (n, 8)
    delta = np.where(qh & 0x8000, -IQ1_DELTA, IQ1_DELTA)  # (n, 8)
    idx = qs | ((qh[:, :, None] >> np.array([0, 3, 6, 9], np.uint16)) & 7) << 8  # (n, 8, 4)
    grid = _grid_values(idx.reshape(n, -1)).reshape(n, 8, -1)  # (n, 8, 32)
    return (dl[:, :, None] * (grid + delta[:, :, None])).reshape(n, -1)


def _iq1_m_scale(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(d (n, 1), 3-bit scales (n, 16)) from the four scale words."""
    n = blocks.shape[0]
    sc = blocks[:, M_SC:].copy().view(np.uint16)  # (n, 4)
    d_bits = (sc[:, 0] >> 12) | ((sc[:, 1] >> 8) & 0xF0) | ((sc[:, 2] >> 4) & 0xF00)
    d_bits |= sc[:, 3] & 0xF000
    d = d_bits.view(np.float16).astype(np.float32).reshape(n, 1)
    scales = (sc[:, :, None] >> np.array([0, 3, 6, 9], np.uint16)) & 7  # (n, 4, 4)
    return d, scales.reshape(n, -1)


def _iq1_m_ref(blocks: np.ndarray) -> np.ndarray:
    n = blocks.shape[0]
    d, scales = _iq1_m_scale(blocks)
    dl = d * (2 * scales + 1).astype(np.float32)  # (n, 16)
    qh = blocks[:, M_QH:M_SC]
    nib = np.stack([qh & 0x0F, qh >> 4], axis=2).reshape(n, -1)  # (n, 32): one per group
    idx = blocks[:, :M_QH].astype(np.uint16) | (nib & 7).astype(np.uint16) << 8  # (n, 32)
    delta = np.where(nib & 8, -IQ1_DELTA, IQ1_DELTA)  # (n, 32)
    grid = _grid_values(idx) + delta[:, :, None]  # (n, 32, 8)
    dl = np.repeat(dl, M_SCALE_GROUPS, axis=1)  # (n, 32)
    return (dl[:, :, None] * grid).reshape(n, -1)


_REFS = {T.IQ4_NL: _iq4_nl_ref, T.IQ1_S: _iq1_s_ref, T.IQ1_M: _iq1_m_ref}


# --- Numba: decode one block (bit-exact with the references) ------------------------------------


@njit(cache=True, inline="always")
def _u16(raw, off):
    return np.uint32(raw[off]) | (np.uint32(raw[off + U64(1)]) << np.uint32(8))


@njit(cache=True, inline="always")
def _decode_iq4_nl(raw, off, out, pos):
    d = load_f16(raw, off)
    qs = off + U64(F16_BYTES)
    for j in range(NL_HALF):
        q = raw[qs + U64(j)]
        out[pos + U64(j)] = d * np.float32(KVALUES[q & 0x0F])
        out[pos + U64(j + NL_HALF)] = d * np.float32(KVALUES[q >> 4])


@njit(cache=True, inline="always")
def _decode_group(idx, dl, delta, out, pos):
    g = U64(idx) * U64(GROUP)
    for j in range(GROUP):
        out[pos + U64(j)] = dl * (np.float32(GRID[g + U64(j)]) + delta)


@njit(cache=True, inline="always")
def _decode_iq1_s(raw, off, out, pos):
    d = load_f16(raw, off)
    for s in range(QK1 // S_SUB):
        qh = _u16(raw, off + U64(S_QH + 2 * s))
        dl = d * np.float32(2 * ((qh >> 12) & 7) + 1)
        delta = -IQ1_DELTA if qh & 0x8000 else IQ1_DELTA
        for g in range(S_SUB // GROUP):
            idx = np.uint32(raw[off + U64(S_QS + 4 * s + g)]) | ((qh >> (3 * g)) & 7) << 8
            _decode_group(idx, dl, delta, out, pos + U64(s * S_SUB + g * GROUP))


@njit(cache=True, inline="always")
def _iq1_m_d(raw, off):
    sc = off + U64(M_SC)
    d_bits = (_u16(raw, sc) >> 12) | ((_u16(raw, sc + U64(2)) >> 8) & 0xF0)
    d_bits |= ((_u16(raw, sc + U64(4)) >> 4) & 0xF00) | (_u16(raw, sc + U64(6)) & 0xF000)
    return f16_bits_to_f32(d_bits)


@njit(cache=True, inline="always")
def _decode_iq1_m(raw, off, out, pos):
    d = _iq1_m_d(raw, off)
    for g in range(QK1 // GROUP):
        s = g // M_SCALE_GROUPS  # scale index: 4 per scale word
        scale = (_u16(raw, off + U64(M_SC + 2 * (s // 4))) >> (3 * (s % 4))) & 7
        dl = d * np.float32(2 * scale + 1)
        nib = (raw[off + U64(M_QH + g // 2)] >> (4 * (g % 2))) & 0x0F
        delta = -IQ1_DELTA if nib & 8 else IQ1_DELTA
        idx = np.uint32(raw[off + U64(g)]) | np.uint32(nib & 7) << 8
        _decode_group(idx, dl, delta, out, pos + U64(g * GROUP))


IQ4_NL, IQ1_S, IQ1_M = (int(t) for t in (T.IQ4_NL, T.IQ1_S, T.IQ1_M))


@njit(cache=True, inline="always")
def _decode_block(kind, raw, off, out, pos):
    if kind == IQ4_NL:
        _decode_iq4_nl(raw, off, out, pos)
    elif kind == IQ1_S:
        _decode_iq1_s(raw, off, out, pos)
    else:
        _decode_iq1_m(raw, off, out, pos)


@njit(cache=True, parallel=True)
def _dequantize_rows(kind, raw, row_bytes, block_bytes, block_size):
    """raw flat (n_rows * row_bytes,) -> (n_rows, n_cols) float32."""
    n_rows = raw.size // row_bytes
    n_blocks = row_bytes // block_bytes
    out = np.empty(n_rows * n_blocks * block_size, np.float32)  # (n_rows * n_cols,)
    for r in prange(n_rows):
        for b in range(n_blocks):
            i = U64(r) * U64(n_blocks) + U64(b)
            _decode_block(kind, raw, i * U64(block_bytes), out, i * U64(block_size))
    return out.reshape(n_rows, n_blocks * block_size)


@njit(cache=True, parallel=True, fastmath=_PRODUCT_MATH)
def _matmul_rows(kind, raw, xs, row_bytes, block_bytes, block_size):
    """ys (n_tokens, n_rows): each chunk of blocks is decoded once into an L1 buffer, then
    dotted with every token's slice of x."""
    n_rows = raw.size // row_bytes
    n_blocks = row_bytes // block_bytes
    n_cols = n_blocks * block_size
    per_chunk = max(1, MATMUL_CHUNK // block_size)  # blocks per chunk
    n_tokens = xs.shape[0]
    x_flat = xs.reshape(-1)  # (n_tokens * n_cols,)
    ys = np.empty((n_tokens, n_rows), np.float32)  # (n_tokens, n_rows)
    for r in prange(n_rows):
        buf = np.empty(per_chunk * block_size, np.float32)  # (chunk weights,)
        acc = np.zeros(n_tokens, np.float32)  # (n_tokens,)
        for b0 in range(0, n_blocks, per_chunk):
            nb = min(per_chunk, n_blocks - b0)
            for b in range(nb):
                off = U64(r) * U64(row_bytes) + U64(b0 + b) * U64(block_bytes)
                _decode_block(kind, raw, off, buf, U64(b * block_size))
            add_token_dots(buf, U64(nb * block_size), x_flat, U64(b0 * block_size),
                           U64(n_cols), acc)
        ys[:, r] = acc
    return ys


# --- Numba matvec: one kernel per type, x kept in float32 ---------------------------------------


@njit(cache=True, inline="always")
def _row_dot_iq4_nl_portable(raw, row, x, n_blocks):
    total = np.float32(0.0)
    for b in range(n_blocks):
        off = row + U64(b) * U64(NL_BYTES)
        qs = off + U64(F16_BYTES)
        xo = U64(b) * U64(NL_QK)
        part = np.float32(0.0)
        for j in range(NL_HALF):
            q = raw[qs + U64(j)]
            part += np.float32(KVALUES[q & 0x0F]) * x[xo + U64(j)]
            part += np.float32(KVALUES[q >> 4]) * x[xo + U64(j + NL_HALF)]
        total += load_f16(raw, off) * part
    return total


@njit(cache=True, inline="always")
def _row_dot_iq4_nl_avx2(raw, row, x, n_blocks):
    acc = f32x8_zero()
    for b in range(n_blocks):
        off = row + U64(b) * U64(NL_BYTES)
        part = iq4_nl_dot_f32x8(raw, off + U64(F16_BYTES), x, U64(b) * U64(NL_QK))
        acc = fma_scalar_f32x8(acc, part, load_f16(raw, off))
    return hsum_f32x8(acc)


# Chosen once: LLVM cannot compile vpshufb for a CPU without AVX2.
_row_dot_iq4_nl = _row_dot_iq4_nl_avx2 if HAS_AVX2 else _row_dot_iq4_nl_portable


@njit(cache=True, parallel=True, fastmath=_PRODUCT_MATH)
def _matvec_iq4_nl(raw, x, row_bytes):
    n_rows = raw.size // row_bytes
    y = np.empty(n_rows, np.float32)  # (n_rows,)
    for r in prange(n_rows):
        y[r] = _row_dot_iq4_nl(raw, U64(r) * U64(row_bytes), x, row_bytes // NL_BYTES)
    return y


@njit(cache=True, inline="always")
def _group_fma(acc, idx, x, xo):
    """acc + GRID[idx] * x[xo:xo+8], lane by lane."""
    return fma_f32x8(acc, load_i8_as_f32x8(GRID, U64(idx) * U64(GROUP)), load_f32x8(x, xo))


@njit(cache=True)
def _group_sums(x, n):
    """Sums of x over consecutive groups of n: the delta term of an IQ1 (sub-)block is
    delta * sum(x), computed once per matvec."""
    sums = np.empty(x.size // n, np.float32)  # (n_cols // n,)
    for i in range(sums.size):
        sums[i] = x[i * n : (i + 1) * n].sum()
    return sums


@njit(cache=True, inline="always")
def _row_dot_iq1_s(raw, row, x, x_sub_sums, n_blocks):
    acc = f32x8_zero()  # grid . x per lane, each sub-block scaled by its dl
    delta_total = np.float32(0.0)
    for b in range(n_blocks):
        off = row + U64(b) * U64(S_BYTES)
        d = load_f16(raw, off)
        for s in range(QK1 // S_SUB):
            qh = _u16(raw, off + U64(S_QH + 2 * s))
            xo = U64(b * QK1 + s * S_SUB)
            part = f32x8_zero()
            for g in range(S_SUB // GROUP):
                idx = np.uint32(raw[off + U64(S_QS + 4 * s + g)]) | ((qh >> (3 * g)) & 7) << 8
                part = _group_fma(part, idx, x, xo + U64(g * GROUP))
            dl = d * np.float32(2 * ((qh >> 12) & 7) + 1)
            acc = fma_scalar_f32x8(acc, part, dl)
            delta = -IQ1_DELTA if qh & 0x8000 else IQ1_DELTA
            delta_total += dl * delta * x_sub_sums[b * (QK1 // S_SUB) + s]
    return hsum_f32x8(acc) + delta_total


@njit(cache=True, parallel=True, fastmath=_PRODUCT_MATH)
def _matvec_iq1_s(raw, x, x_sub_sums, row_bytes):
    n_rows = raw.size // row_bytes
    y = np.empty(n_rows, np.float32)  # (n_rows,)
    for r in prange(n_rows):
        y[r] = _row_dot_iq1_s(raw, U64(r) * U64(row_bytes), x, x_sub_sums, row_bytes // S_BYTES)
    return y


@njit(cache=True, inline="always")
def _row_dot_iq1_m(raw, row, x, x_group_sums, n_blocks):
    acc = f32x8_zero()  # grid . x per lane, each pair of groups scaled by its 2*scale+1 and d
    delta_total = np.float32(0.0)
    for b in range(n_blocks):
        off = row + U64(b) * U64(M_BYTES)
        d = _iq1_m_d(raw, off)
        for s in range(QK1 // GROUP // M_SCALE_GROUPS):
            scale = (_u16(raw, off + U64(M_SC + 2 * (s // 4))) >> (3 * (s % 4))) & 7
            dl = d * np.float32(2 * scale + 1)
            qh = raw[off + U64(M_QH + s)]  # one nibble per group of this scale
            part = f32x8_zero()
            delta_part = np.float32(0.0)
            for h in range(M_SCALE_GROUPS):
                g = s * M_SCALE_GROUPS + h
                nib = (qh >> (4 * h)) & 0x0F
                idx = np.uint32(raw[off + U64(g)]) | np.uint32(nib & 7) << 8
                part = _group_fma(part, idx, x, U64(b * QK1 + g * GROUP))
                delta = -IQ1_DELTA if nib & 8 else IQ1_DELTA
                delta_part += delta * x_group_sums[b * (QK1 // GROUP) + g]
            acc = fma_scalar_f32x8(acc, part, dl)
            delta_total += dl * delta_part
    return hsum_f32x8(acc) + delta_total


@njit(cache=True, parallel=True, fastmath=_PRODUCT_MATH)
def _matvec_iq1_m(raw, x, x_group_sums, row_bytes):
    n_rows = raw.size // row_bytes
    y = np.empty(n_rows, np.float32)  # (n_rows,)
    for r in prange(n_rows):
        y[r] = _row_dot_iq1_m(raw, U64(r) * U64(row_bytes), x, x_group_sums, row_bytes // M_BYTES)
    return y


# --- checked entry points -----------------------------------------------------------------------


def _flat(raw: np.ndarray, qtype: T) -> tuple[np.ndarray, int]:
    n_cols = check_rows(raw, qtype)
    return raw.reshape(-1), n_cols  # (n_rows * row_bytes,)


def _llama_x(qtype: T, x: np.ndarray) -> np.ndarray:
    """x as llama.cpp's int8 dot sees it: IQ4_NL meets Q8_0 activations, IQ1_S/IQ1_M Q8_K ones
    (ggml-cpu's vec_dot_type), here as their float values d * q for the float kernels."""
    return q8_0_values(x) if qtype == T.IQ4_NL else q8_k_values(x, QK1)


def _matvec(qtype: T, raw: np.ndarray, x: np.ndarray) -> np.ndarray:
    flat, n_cols = _flat(raw, qtype)
    x = _llama_x(qtype, check_x(x, n_cols, qtype, 1))
    if qtype == T.IQ4_NL:
        return _matvec_iq4_nl(flat, x, raw.shape[1])
    if qtype == T.IQ1_S:
        return _matvec_iq1_s(flat, x, _group_sums(x, S_SUB), raw.shape[1])
    return _matvec_iq1_m(flat, x, _group_sums(x, GROUP), raw.shape[1])


def _kernels(qtype: T) -> QuantKernels:
    kind = int(qtype)
    layout = LAYOUTS[qtype]

    def dequantize_ref(raw):
        check_rows(raw, qtype)
        return _REFS[qtype](raw.reshape(-1, layout.type_size)).reshape(raw.shape[0], -1)

    def dequantize(raw):
        flat, _ = _flat(raw, qtype)
        return _dequantize_rows(kind, flat, raw.shape[1], layout.type_size, layout.block_size)

    def matmul(raw, xs):
        flat, n_cols = _flat(raw, qtype)
        xs = _llama_x(qtype, check_x(xs, n_cols, qtype, 2))
        args = (raw.shape[1], layout.type_size, layout.block_size)
        return _matmul_rows(kind, flat, xs, *args)

    def matvec(raw, x):
        return _matvec(qtype, raw, x)

    return QuantKernels(dequantize_ref, dequantize, matvec, matmul, x_quantized=True)


KERNELS = {qtype: _kernels(qtype) for qtype in (T.IQ4_NL, T.IQ1_S, T.IQ1_M)}
