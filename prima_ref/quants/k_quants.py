"""K-quant kernels: Q2_K, Q3_K, Q4_K, Q5_K, Q6_K (super-blocks of QK_K = 256 weights).

Block layouts, fields in on-disk order (ggml-common.h), sizes in bytes:

    Q2_K  scales[16]  low nibble: 4-bit scale, high nibble: 4-bit min, one per 16 weights
          qs[64]      2-bit quants; byte qs[32*h + l] holds weights 128*h + 32*j + l at bits 2j
          d, dmin     f16 super-block scale for the scales and for the mins
    Q3_K  hmask[32]   high bit of weight 32*j + l at bit j of hmask[l]; a SET bit means +0,
                      a clear bit means -4
          qs[64]      low 2 bits, same arrangement as Q2_K
          scales[12]  16 6-bit signed scales (+32 bias): low nibbles in bytes 0-7, high
                      2 bits in bytes 8-11
          d           f16
    Q4_K  d, dmin     f16
          scales[12]  8 6-bit scales and 8 6-bit mins, one per 32 weights (get_scale_min_k4)
          qs[128]     4-bit quants; byte qs[32*c + l]: low nibble weight 64*c + l,
                      high nibble weight 64*c + 32 + l
    Q5_K  d, dmin, scales[12] as Q4_K
          qh[32]      5th bit of weight 32*j + l at bit j of qh[l]
          qs[128]     low 4 bits as Q4_K
    Q6_K  ql[128]     low 4 bits; byte ql[64*h + m]: low nibble weight 128*h + m,
                      high nibble weight 128*h + 64 + m
          qh[64]      high 2 bits; byte qh[32*h + l] holds weight 128*h + 32*j + l at bits 2j
          scales[16]  int8, one per 16 weights
          d           f16

Value of a weight: Q2_K/Q4_K/Q5_K ``(d * sc) * q - (dmin * m)``; Q3_K/Q6_K ``(d * sc) * q``
with q signed (Q3_K: -4..3, Q6_K: -32..31). The numpy references and the Numba dequantize
keep exactly this float32 order, so both are bit-equal to gguf.quants.dequantize.

matvec/matmul quantize x exactly as llama.cpp's Q8_K does (quantize_row_q8_K_ref: int8 per
256 weights, one float32 scale; x_quantized=True). Where the CPU has AVX512-VNNI (and BW)
they take int8 dot products in LLVM IR emitted here, with integer sums for the mins/offsets.
Elsewhere they decode each block to float32 once, reuse it for every token, and dot it with
the Q8_K values d * q of x (same products up to float32 summation order).
"""

from __future__ import annotations

from dataclasses import dataclass

import llvmlite.binding as llvm
import numpy as np
from gguf.constants import GGMLQuantizationType as T
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from prima_ref.quants import lanes, tiled
from prima_ref.quants.layouts import LAYOUTS, QK_K
from prima_ref.quants.simd import q8_k_iscale, q8_k_quant, q8_k_values


class KQuantInputError(ValueError):
    pass


# ---------------------------------------------------------------------------------------------
# Layouts as data: byte offset of each field, checked against layouts.py


def _offsets(qtype: T, **sizes: int) -> dict[str, int]:
    offsets, at = {}, 0
    for name, size in sizes.items():
        offsets[name] = at
        at += size
    if at != LAYOUTS[qtype].type_size:
        raise RuntimeError(f"{qtype.name} fields sum to {at} bytes, layouts.py says "
                           f"{LAYOUTS[qtype].type_size}")
    return offsets


Q2 = _offsets(T.Q2_K, scales=QK_K // 16, qs=QK_K // 4, d=2, dmin=2)
Q3 = _offsets(T.Q3_K, hmask=QK_K // 8, qs=QK_K // 4, scales=12, d=2)
Q4 = _offsets(T.Q4_K, d=2, dmin=2, scales=12, qs=QK_K // 2)
Q5 = _offsets(T.Q5_K, d=2, dmin=2, scales=12, qh=QK_K // 8, qs=QK_K // 2)
Q6 = _offsets(T.Q6_K, ql=QK_K // 2, qh=QK_K // 4, scales=QK_K // 16, d=2)

# Plain ints so Numba folds them into constants.
Q2_SC, Q2_QS, Q2_D, Q2_DMIN = Q2["scales"], Q2["qs"], Q2["d"], Q2["dmin"]
Q3_HM, Q3_QS, Q3_SC, Q3_D = Q3["hmask"], Q3["qs"], Q3["scales"], Q3["d"]
Q4_D, Q4_DMIN, Q4_SC, Q4_QS = Q4["d"], Q4["dmin"], Q4["scales"], Q4["qs"]
Q5_D, Q5_DMIN, Q5_SC, Q5_QH, Q5_QS = Q5["d"], Q5["dmin"], Q5["scales"], Q5["qh"], Q5["qs"]
Q6_QL, Q6_QH, Q6_SC, Q6_D = Q6["ql"], Q6["qh"], Q6["scales"], Q6["d"]
TS2, TS3, TS4, TS5, TS6 = (LAYOUTS[t].type_size for t in (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K,
                                                          T.Q6_K))


# ---------------------------------------------------------------------------------------------
# numpy references: each weight i of a block gathered from (byte, shift) tables

_I = np.arange(QK_K)  # weight index inside a super-block
# 2 bits at qs[32*(i//128) + i%32] >> 2*((i%128)//32)  (Q2_K, Q3_K, Q6_K high bits)
_CROSS32_BYTE, _CROSS32_SHIFT = 32 * (_I // 128) + _I % 32, 2 * ((_I % 128) // 32)
# 4 bits at qs[32*(i//64) + i%32] >> 4*((i%64)//32)  (Q4_K, Q5_K)
_NIB32_BYTE, _NIB32_SHIFT = 32 * (_I // 64) + _I % 32, 4 * ((_I % 64) // 32)
# 4 bits at ql[64*(i//128) + i%64] >> 4*((i%128)//64)  (Q6_K)
_NIB64_BYTE, _NIB64_SHIFT = 64 * (_I // 128) + _I % 64, 4 * ((_I % 128) // 64)
# 1 bit at h[i%32] >> i//32  (Q3_K hmask, Q5_K qh)
_BIT_BYTE, _BIT_SHIFT = _I % 32, _I // 32


def _blocks(raw: np.ndarray, qtype: T) -> np.ndarray:
    return raw.reshape(-1, LAYOUTS[qtype].type_size)


def _f16_ref(blocks: np.ndarray, off: int) -> np.ndarray:
    """(n_blocks, 1) float32 from the f16 at byte ``off`` of each block."""
    return blocks[:, off : off + 2].copy().view(np.float16).astype(np.float32)


def _bits(field: np.ndarray, byte: np.ndarray, shift: np.ndarray, mask: int) -> np.ndarray:
    return (field[:, byte] >> shift.astype(np.uint8)) & np.uint8(mask)


def _scale_min_k4_ref(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n_blocks, 8) 6-bit scales and mins from the 12 packed bytes of Q4_K/Q5_K."""
    lo, mid, hi = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.concatenate([lo & 63, (hi & 0xF) | ((lo >> 6) << 4)], axis=1)
    mn = np.concatenate([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], axis=1)
    return sc, mn


def _q2_k_ref(raw):
    b = _blocks(raw, T.Q2_K)
    sc = b[:, Q2_SC : Q2_SC + 16][:, _I // 16]  # (n_blocks, 256)
    q = _bits(b[:, Q2_QS:], _CROSS32_BYTE, _CROSS32_SHIFT, 3)
    dl = _f16_ref(b, Q2_D) * (sc & 0xF).astype(np.float32)
    ml = _f16_ref(b, Q2_DMIN) * (sc >> 4).astype(np.float32)
    return dl * q.astype(np.float32) - ml


def _q3_k_ref(raw):
    b = _blocks(raw, T.Q3_K)
    s = b[:, Q3_SC : Q3_SC + 12]
    j = np.arange(16)
    sc6 = ((s[:, j % 8] >> (4 * (j // 8)).astype(np.uint8)) & 0xF) | (
        ((s[:, 8 + j % 4] >> (2 * (j // 4)).astype(np.uint8)) & 3) << 4
    )
    dl = _f16_ref(b, Q3_D) * (sc6.astype(np.int8) - np.int8(32)).astype(np.float32)
    low = _bits(b[:, Q3_QS:], _CROSS32_BYTE, _CROSS32_SHIFT, 3).astype(np.int8)
    high = _bits(b[:, Q3_HM:], _BIT_BYTE, _BIT_SHIFT, 1).astype(np.int8)
    q = low - np.int8(4) * (np.int8(1) - high)
    return dl[:, _I // 16] * q.astype(np.float32)


def _q45_k_ref(raw, qtype):
    o = Q4 if qtype == T.Q4_K else Q5
    b = _blocks(raw, qtype)
    sc, mn = _scale_min_k4_ref(b[:, o["scales"] : o["scales"] + 12])
    d = _f16_ref(b, o["d"]) * sc.astype(np.float32)
    m = _f16_ref(b, o["dmin"]) * mn.astype(np.float32)
    q = _bits(b[:, o["qs"]:], _NIB32_BYTE, _NIB32_SHIFT, 0xF)
    if qtype == T.Q5_K:
        q = q | (_bits(b[:, o["qh"]:], _BIT_BYTE, _BIT_SHIFT, 1) << 4)
    return d[:, _I // 32] * q.astype(np.float32) - m[:, _I // 32]


def _q6_k_ref(raw):
    b = _blocks(raw, T.Q6_K)
    d = _f16_ref(b, Q6_D) * b[:, Q6_SC : Q6_SC + 16].view(np.int8).astype(np.float32)
    low = _bits(b[:, Q6_QL:], _NIB64_BYTE, _NIB64_SHIFT, 0xF)
    high = _bits(b[:, Q6_QH:], _CROSS32_BYTE, _CROSS32_SHIFT, 3)
    q = (low | (high << 4)).astype(np.int8) - np.int8(32)
    return d[:, _I // 16] * q.astype(np.float32)


def _ref(fn, qtype):
    def dequantize_ref(raw: np.ndarray) -> np.ndarray:
        raw = _check_raw(raw, qtype)
        return fn(raw).reshape(raw.shape[0], -1)  # (n_rows, n_cols)

    return dequantize_ref


# ---------------------------------------------------------------------------------------------
# Numba block decoders. w is a flat uint8 array, o the byte offset of the block, out[k:k+256]
# receives the weights. Same float32 operation order as the references. int64 offsets: these
# serve dequantize and the float fallback, not the hot loop.

_POW2 = np.array([2.0**-24] + [2.0 ** (e - 25) for e in range(1, 32)], dtype=np.float32)


@njit(inline="always")
def _f16(w, o):
    """Exact f16 -> f32: the 11-bit significand times a power of two is representable."""
    h = np.int32(w[o]) | (np.int32(w[o + 1]) << 8)
    e = (h >> 10) & 0x1F
    m = h & 0x3FF
    if e == 0:
        v = np.float32(m) * _POW2[0]
    elif e == 31:
        v = np.float32(np.inf) if m == 0 else np.float32(np.nan)
    else:
        v = np.float32(m | 0x400) * _POW2[e]
    return -v if h & 0x8000 else v


@njit(inline="always")
def _scale_min_k4(w, s, j):
    """6-bit scale and min j (0..7) from the 12 bytes at w[s:]."""
    if j < 4:
        return np.int32(w[s + j]) & 63, np.int32(w[s + j + 4]) & 63
    hi = np.int32(w[s + j + 4])
    sc = (hi & 0xF) | ((np.int32(w[s + j - 4]) >> 6) << 4)
    mn = (hi >> 4) | ((np.int32(w[s + j]) >> 6) << 4)
    return sc, mn


@njit(inline="always")
def _decode_q2_k(w, o, out, k):
    d, dmin = _f16(w, o + Q2_D), _f16(w, o + Q2_DMIN)
    for i in range(QK_K // 16):
        s = np.int32(w[o + Q2_SC + i])
        dl = d * np.float32(s & 0xF)
        ml = dmin * np.float32(s >> 4)
        h, j, l0 = i // 8, (i % 8) // 2, 16 * (i % 2)
        for l in range(16):
            q = (np.int32(w[o + Q2_QS + 32 * h + l0 + l]) >> (2 * j)) & 3
            out[k + 16 * i + l] = dl * np.float32(q) - ml


@njit(inline="always")
def _q3_scale(w, s, i):
    lo = (np.int32(w[s + i % 8]) >> (4 * (i // 8))) & 0xF
    hi = (np.int32(w[s + 8 + i % 4]) >> (2 * (i // 4))) & 3
    return (lo | (hi << 4)) - 32


@njit(inline="always")
def _decode_q3_k(w, o, out, k):
    d = _f16(w, o + Q3_D)
    for i in range(QK_K // 16):
        dl = d * np.float32(_q3_scale(w, o + Q3_SC, i))
        h, j, l0 = i // 8, (i % 8) // 2, 16 * (i % 2)
        for l in range(16):
            low = (np.int32(w[o + Q3_QS + 32 * h + l0 + l]) >> (2 * j)) & 3
            high = (np.int32(w[o + Q3_HM + l0 + l]) >> (i // 2)) & 1
            out[k + 16 * i + l] = dl * np.float32(low - 4 + 4 * high)


@njit(inline="always")
def _decode_q45_k(w, o, out, k, has_qh, d_off, sc_off, qh_off, qs_off):
    d, dmin = _f16(w, o + d_off), _f16(w, o + d_off + 2)
    for i in range(QK_K // 32):
        sc, mn = _scale_min_k4(w, o + sc_off, i)
        d1 = d * np.float32(sc)
        m1 = dmin * np.float32(mn)
        c, shift = i // 2, 4 * (i % 2)
        for l in range(32):
            q = (np.int32(w[o + qs_off + 32 * c + l]) >> shift) & 0xF
            if has_qh:
                q |= ((np.int32(w[o + qh_off + l]) >> i) & 1) << 4
            out[k + 32 * i + l] = d1 * np.float32(q) - m1


@njit(inline="always")
def _decode_q4_k(w, o, out, k):
    _decode_q45_k(w, o, out, k, False, Q4_D, Q4_SC, 0, Q4_QS)


@njit(inline="always")
def _decode_q5_k(w, o, out, k):
    _decode_q45_k(w, o, out, k, True, Q5_D, Q5_SC, Q5_QH, Q5_QS)


@njit(inline="always")
def _decode_q6_k(w, o, out, k):
    d = _f16(w, o + Q6_D)
    for i in range(QK_K // 16):
        dl = d * np.float32(np.int8(w[o + Q6_SC + i]))
        h, n = i // 8, 16 * (i % 8)  # half, weight index inside the half
        ql = o + Q6_QL + 64 * h + n % 64
        qh = o + Q6_QH + 32 * h + n % 32
        for l in range(16):
            low = (np.int32(w[ql + l]) >> (4 * (n // 64))) & 0xF
            high = (np.int32(w[qh + l]) >> (2 * (n // 32))) & 3
            out[k + 16 * i + l] = dl * np.float32((low | (high << 4)) - 32)


# Kernels take the type as a small int and branch per block: a function passed as an argument
# would make Numba's on-disk cache miss in every new process.
KIND = {T.Q2_K: 0, T.Q3_K: 1, T.Q4_K: 2, T.Q5_K: 3, T.Q6_K: 4}


@njit(inline="always")
def _decode(kind, w, o, out, k):
    if kind == 0:
        _decode_q2_k(w, o, out, k)
    elif kind == 1:
        _decode_q3_k(w, o, out, k)
    elif kind == 2:
        _decode_q4_k(w, o, out, k)
    elif kind == 3:
        _decode_q5_k(w, o, out, k)
    else:
        _decode_q6_k(w, o, out, k)


# ---------------------------------------------------------------------------------------------
# Generic Numba drivers


@njit(parallel=True, cache=True)
def _dequantize_rows(w, n_rows, row_bytes, type_size, kind):
    n_blocks = row_bytes // type_size
    out = np.empty((n_rows, n_blocks * QK_K), dtype=np.float32)  # (n_rows, n_cols)
    flat = out.reshape(-1)
    for r in prange(n_rows):
        for b in range(n_blocks):
            _decode(kind, w, r * row_bytes + b * type_size, flat, (r * n_blocks + b) * QK_K)
    return out


@njit(parallel=True, cache=True)
def _matmul_decoded(w, xs, row_bytes, type_size, kind):
    """ys = xs @ W.T, each block decoded once to float32 and reused for every token."""
    n_tokens, n_cols = xs.shape
    n_rows = w.size // row_bytes
    n_blocks = row_bytes // type_size
    ys = np.empty((n_tokens, n_rows), dtype=np.float32)  # (n_tokens, n_rows)
    for r in prange(n_rows):
        buf = np.empty(QK_K, dtype=np.float32)  # one decoded block
        acc = np.zeros((n_tokens, 16), dtype=np.float32)  # per-lane sums per token
        for b in range(n_blocks):
            _decode(kind, w, r * row_bytes + b * type_size, buf, 0)
            for t in range(n_tokens):
                x = xs[t, b * QK_K : (b + 1) * QK_K]
                for g in range(QK_K // 16):
                    for lane in range(16):
                        acc[t, lane] += buf[16 * g + lane] * x[16 * g + lane]
        for t in range(n_tokens):
            ys[t, r] = acc[t].sum()
    return ys


# ---------------------------------------------------------------------------------------------
# x as Q8_K: int8 per super-block, one float scale, integer sums for the mins/offsets. The
# int8 values are stored in "slot" order, the order in which a kernel's 64-byte weight vectors
# hold the weights, so each weight vector meets its x bytes in one contiguous load.


def _slots(qtype: T) -> np.ndarray:
    """(256,) weight index held by each slot; vector v = slot // 64 of the block, byte p."""
    v, p = np.divmod(np.arange(QK_K), 64)
    if qtype in (T.Q4_K, T.Q5_K):  # v: low/high nibbles of qs[0:64], then of qs[64:128]
        return 64 * (2 * (v // 2) + p // 32) + 32 * (v % 2) + p % 32
    if qtype == T.Q6_K:  # v: low/high nibbles of ql[0:64], then of ql[64:128]
        return np.arange(QK_K)
    return 128 * (p // 32) + 32 * v + p % 32  # Q2_K, Q3_K: v = bit pair v of qs[0:64]


def _sub_size(qtype: T) -> int:
    return 32 if qtype in (T.Q4_K, T.Q5_K) else 16


_OFFSET = {T.Q3_K: 4, T.Q6_K: 32}  # types whose kernels store q + offset (unsigned)


def _x_sums(qtype: T) -> tuple[np.ndarray, int, int]:
    """How x's integer sums are kept: (lane of each slot, lanes per block, factor).
    Types with mins: the sum per sub-block (16 lanes; the kernel dots them with the mins).
    Types with an offset: -offset * the sum over each 4-byte dot lane (64 lanes), which
    seeds vpdpbusd's accumulators so the dots come out signed."""
    if qtype in _OFFSET:
        return np.arange(QK_K) // 4, 64, -_OFFSET[qtype]
    return _slots(qtype) // _sub_size(qtype), 16, 1


@njit(cache=True)
def _quantize_x_q8k(xs, slots, sum_lane, factor, xq, xd, xsum):
    """xs (n_tokens, n_cols) -> xq int8 (n_tokens, n_cols) in slot order, xd float32
    (n_tokens, n_blocks) scales, xsum int32 (n_tokens, n_blocks, n_lanes) sums. The integers
    and d are quantize_row_q8_K_ref's (d = 1/iscale may be negative, q the matching sign)."""
    for t in range(xs.shape[0]):
        for b in range(xd.shape[1]):
            x = xs[t, b * QK_K : (b + 1) * QK_K]
            iscale = q8_k_iscale(x, 0, QK_K)
            xd[t, b] = np.float32(1.0) / iscale if iscale != 0 else np.float32(0.0)
            xsum[t, b, :] = 0
            for s in range(QK_K):
                q = q8_k_quant(iscale, x[slots[s]])
                xq[t, b * QK_K + s] = q
                xsum[t, b, sum_lane[s]] += factor * q


# ---------------------------------------------------------------------------------------------
# AVX-512 VNNI row kernels, written as LLVM IR (Numba's own codegen never emits vpdpbusd):
# one super-block per loop step: 4 vpdpbusd (u8 weights x s8 x), the dot pairs packed to
# i16 (packssdw) and scaled per sub-block by vpdpwssd, one float FMA per block (two with
# mins) into 16-lane accumulators, one reduction per row; blocks decode once per 4 tokens.
# Measured in-L2, 1 thread: 14.7 (Q4_K) to 18 (Q5_K) cycles per super-block at 2.3 GHz.

_I8, _I16, _I32, _I64, _F32 = (ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64),
                               ir.FloatType())
_U8X64, _I8X32, _I16X32 = ir.VectorType(_I8, 64), ir.VectorType(_I8, 32), ir.VectorType(_I16, 32)
_I32X16, _F32X16 = ir.VectorType(_I32, 16), ir.VectorType(_F32, 16)


def has_avx512_vnni() -> bool:
    f = llvm.get_host_cpu_features()
    return bool(f.get("avx512vnni") and f.get("avx512bw"))


_HAS_GFNI = bool(llvm.get_host_cpu_features().get("gfni"))


def _vconst(ty, values):
    return ir.Constant(ty, [ir.Constant(ty.element, int(v)) for v in values])


def _splat_const(ty, value):
    return _vconst(ty, [value] * ty.count)


class _Emit:
    """The handful of IR operations the block bodies need, on one builder."""

    def __init__(self, builder):
        self.b = builder

    def ptr(self, base, off):
        return self.b.gep(base, [off if isinstance(off, ir.Value) else ir.Constant(_I64, off)])

    def load(self, base, off, ty):
        return self.b.load(self.b.bitcast(self.ptr(base, off), ty.as_pointer()), align=1)

    def f16(self, base, off):
        """The f16 at base[off] as float32, splat to 16 lanes."""
        h = self.load(base, off, _I16)
        return self.splat(self.b.fpext(self.b.bitcast(h, ir.HalfType()), _F32), _F32X16)

    def call(self, name, ret, args):
        fnty = ir.FunctionType(ret, [a.type for a in args])
        return self.b.call(cgutils.get_or_insert_function(self.b.module, fnty, name), args)

    def shuffle(self, v, idx):
        mask = _vconst(ir.VectorType(_I32, len(idx)), idx)
        return self.b.shuffle_vector(v, ir.Constant(v.type, None), mask)

    def prefetch(self, ptr):
        """Read hint for ptr (never faults, so running past the matrix is harmless)."""
        i32 = lambda v: ir.Constant(_I32, v)  # noqa: E731
        self.call("llvm.prefetch.p0", ir.VoidType(),
                  [ptr, i32(0), i32(_PREFETCH_LOCALITY), i32(1)])

    def dup32(self, v):
        """<32 x i8> -> <64 x i8> with both halves equal."""
        return self.shuffle(v, [p % 32 for p in range(64)])

    def dot_u8s8(self, acc, w, x):
        return self.call("llvm.x86.avx512.vpdpbusd.512", _I32X16, [acc, w, x])

    def dot_i16(self, acc, a, b):
        """acc + a*b per i32 lane; exact when b's lanes are 16-bit clean, |a| < 2**15."""
        a16, b16 = self.b.bitcast(a, _I16X32), self.b.bitcast(b, _I16X32)
        return self.call("llvm.x86.avx512.vpdpwssd.512", _I32X16, [acc, a16, b16])

    def bytes_to_i32(self, v, signed):
        """<16 x i8> -> <16 x i32> whose high 16 bits are 0 (what dot_i16 wants as b)."""
        w16 = (self.b.sext if signed else self.b.zext)(v, ir.VectorType(_I16, 16))
        return self.b.zext(w16, _I32X16)

    def field(self, v, lo_bits, width, dst):
        """<64 x i8>: in byte p, bits lo_bits[p // 32] .. + width moved to bits dst .. + width,
        all other bits cleared. One gf2p8affineqb where the CPU has GFNI (its 8x8 bit matrix
        is per 64-bit lane, so each 32-byte half gets its own)."""
        if not _HAS_GFNI:
            b = self.b
            lo = _vconst(_U8X64, [lo_bits[p // 32] for p in range(64)])
            bits = b.and_(b.lshr(v, lo), _splat_const(_U8X64, (1 << width) - 1))
            return b.shl(bits, _splat_const(_U8X64, dst))
        rows = []  # matrix byte 7 - k picks the source bits of result bit k
        for half in range(2):
            qword = sum((1 << (lo_bits[half] + k)) << (8 * (7 - dst - k)) for k in range(width))
            rows += list(qword.to_bytes(8, "little")) * 4
        matrix = _vconst(_U8X64, rows)
        return self.call("llvm.x86.vgf2p8affineqb.512", _U8X64, [v, matrix, ir.Constant(_I8, 0)])

    def splat(self, x, ty):
        v = self.b.insert_element(ir.Constant(ty, None), x, ir.Constant(_I32, 0))
        return self.b.shuffle_vector(v, ir.Constant(ty, None), _splat_const(_I32X16, 0))


@dataclass
class _Block:
    """A decoded super-block: 4 weight vectors (u8), a scale per i16 lane of each packed pair
    of their dots, and the mins as i32 lanes with zero high halves (to meet x's sums). Types
    that store q + offset (Q3_K, Q6_K) have no mins: ms and dmin are None."""

    w: list
    sc: list
    ms: ir.Value | None
    d: ir.Value
    dmin: ir.Value | None  # d, dmin: <16 x float> splats


def _half_subs(qtype: T, v: int) -> list[int]:
    """32-weight sub-block (0-7) held by each 32-byte half of weight vector v."""
    return [int(_slots(qtype)[64 * v + 32 * h]) // 32 for h in range(2)]


def _lane_subs(qtype: T, v: int) -> list[int]:
    """Sub-block of each i32 lane of the dot of weight vector v."""
    return [int(_slots(qtype)[64 * v + 4 * k]) // _sub_size(qtype) for k in range(16)]


def _pair_masks(qtype: T) -> list[list[int]]:
    """For each pair (2p, 2p+1) of weight vectors, the sub-block of each i16 lane of
    packssdw(dot 2p, dot 2p+1). packssdw interleaves the two per 128 bits: i16 lane r comes
    from vector 2p + (r % 8 >= 4), i32 lane 4*(r//8) + r%4."""
    return [[_lane_subs(qtype, 2 * p + (r % 8 >= 4))[4 * (r // 8) + r % 4] for r in range(32)]
            for p in range(2)]


def _pair_scales(e, qtype: T, scales16):
    """<16 x i16> signed scale per sub-block -> <32 x i16> per pair (vpermw)."""
    return [e.shuffle(scales16, mask) for mask in _pair_masks(qtype)]


def _pair_scales_u8(e, qtype: T, sources):
    """Unsigned 8-bit scales -> <32 x i16> per pair by one byte permute with zeros (high
    bytes). sources[p] = (<n x i8> holding scales base.., base) for pair p."""
    out = []
    for (vec, base), mask in zip(sources, _pair_masks(qtype), strict=True):
        n = vec.type.count
        idx = [i for sub in mask for i in (sub - base, n)]  # index n: first byte of zeros
        pair = e.b.shuffle_vector(vec, ir.Constant(vec.type, None), _vconst(
            ir.VectorType(_I32, 64), idx))
        out.append(e.b.bitcast(pair, _I16X32))
    return out


def _words_to_bytes(b, words, n_bytes):
    vec = ir.Constant(ir.VectorType(_I32, len(words)), None)
    for i, word in enumerate(words):
        vec = b.insert_element(vec, word, ir.Constant(_I32, i))
    return b.bitcast(vec, ir.VectorType(_I8, n_bytes))


def _scales_k4(e, wp, off):
    """Q4_K/Q5_K 12 scale bytes -> (scale bytes 0-3, scale bytes 4-7) as <4 x i8> and the
    mins as <16 x i32> lanes 0-7, by llama.cpp's utmp shuffle of get_scale_min_k4."""
    b = e.b
    u = [e.load(wp, off + 4 * i, _I32) for i in range(3)]
    k1, k2, k3 = (ir.Constant(_I32, m) for m in (0x3F3F3F3F, 0x0F0F0F0F, 0x03030303))
    c4, c6 = ir.Constant(_I32, 4), ir.Constant(_I32, 6)
    sc_lo = b.and_(u[0], k1)
    sc_hi = b.or_(b.and_(u[2], k2), b.shl(b.and_(b.lshr(u[0], c6), k3), c4))
    mn_lo = b.and_(u[1], k1)
    mn_hi = b.or_(b.and_(b.lshr(u[2], c4), k2), b.shl(b.and_(b.lshr(u[1], c6), k3), c4))
    # mins: one 64-bit word built in a general register, then one move to a vector
    mn64 = b.or_(b.zext(mn_lo, _I64), b.shl(b.zext(mn_hi, _I64), ir.Constant(_I64, 32)))
    mn = b.insert_element(ir.Constant(ir.VectorType(_I64, 2), None), mn64, ir.Constant(_I32, 0))
    mn = b.bitcast(mn, ir.VectorType(_I8, 16))
    mn = b.shuffle_vector(mn, ir.Constant(mn.type, None),
                          _vconst(_I32X16, list(range(8)) + [8] * 8))  # lanes 8-15: zero
    i8x4 = ir.VectorType(_I8, 4)
    return b.bitcast(sc_lo, i8x4), b.bitcast(sc_hi, i8x4), e.bytes_to_i32(mn, signed=False)


def _nibble_vectors(e, wp, off):
    """128 bytes of 4-bit quants -> [low(0:64), high(0:64), low(64:128), high(64:128)]."""
    out = []
    for h in range(2):
        v = e.load(wp, off + 64 * h, _U8X64)
        out += [e.b.and_(v, _splat_const(_U8X64, 0x0F)), e.b.lshr(v, _splat_const(_U8X64, 4))]
    return out


def _body_q45_k(qtype, e, wp):
    o = Q4 if qtype == T.Q4_K else Q5
    sc_lo, sc_hi, mn = _scales_k4(e, wp, o["scales"])
    w = _nibble_vectors(e, wp, o["qs"])
    if qtype == T.Q5_K:  # 5th bit of sub-block j's weights: bit j of qh
        qh = e.dup32(e.load(wp, o["qh"], _I8X32))
        w = [e.b.or_(w[v], e.field(qh, _half_subs(qtype, v), 1, 4)) for v in range(4)]
    sc = _pair_scales_u8(e, qtype, [(sc_lo, 0), (sc_hi, 4)])
    return _Block(w, sc, mn, e.f16(wp, o["d"]), e.f16(wp, o["dmin"]))


def _body_q6_k(e, wp):
    b = e.b
    w = _nibble_vectors(e, wp, Q6_QL)
    for h in range(2):  # weight 128*h + 32*j + l: high 2 bits at bit 2j of qh[32*h + l]
        qh = e.dup32(e.load(wp, Q6_QH + 32 * h, _I8X32))
        for v in (2 * h, 2 * h + 1):
            j = [sub % 4 for sub in _half_subs(T.Q6_K, v)]
            w[v] = b.or_(w[v], e.field(qh, [2 * jj for jj in j], 2, 4))
    sc16 = b.sext(e.load(wp, Q6_SC, ir.VectorType(_I8, 16)), ir.VectorType(_I16, 16))
    return _Block(w, _pair_scales(e, T.Q6_K, sc16), None, e.f16(wp, Q6_D), None)


def _two_bit_vectors(e, wp, off):
    v = e.load(wp, off, _U8X64)
    return [e.field(v, [2 * j, 2 * j], 2, 0) for j in range(4)]


def _body_q2_k(e, wp):
    s = e.load(wp, Q2_SC, ir.VectorType(_I8, 16))
    sc = e.b.and_(s, _splat_const(s.type, 0x0F))
    mn = e.bytes_to_i32(e.b.lshr(s, _splat_const(s.type, 4)), signed=False)
    w = _two_bit_vectors(e, wp, Q2_QS)
    sc = _pair_scales_u8(e, T.Q2_K, [(sc, 0), (sc, 0)])
    return _Block(w, sc, mn, e.f16(wp, Q2_D), e.f16(wp, Q2_DMIN))


def _scales_q3(e, wp):
    """12 bytes -> <16 x i16> signed 6-bit scales (llama.cpp's aux shuffle)."""
    b = e.b
    a0, a1, tmp = (e.load(wp, Q3_SC + 4 * i, _I32) for i in range(3))
    k1, k2 = ir.Constant(_I32, 0x03030303), ir.Constant(_I32, 0x0F0F0F0F)

    def word(lo, lo_shift, hi_shift):
        low = b.and_(b.lshr(lo, ir.Constant(_I32, lo_shift)), k2)
        high = b.and_(b.lshr(tmp, ir.Constant(_I32, hi_shift)), k1)
        return b.or_(low, b.shl(high, ir.Constant(_I32, 4)))

    words = [word(a0, 0, 0), word(a1, 0, 2), word(a0, 4, 4), word(a1, 4, 6)]
    s = b.sub(_words_to_bytes(b, words, 16), _splat_const(ir.VectorType(_I8, 16), 32))
    return b.sext(s, ir.VectorType(_I16, 16))


def _body_q3_k(e, wp):
    sc16 = _scales_q3(e, wp)
    hm = e.dup32(e.load(wp, Q3_HM, _I8X32))  # high bit of weight 32*j + l: bit j of hm[l]
    w = [e.b.or_(q, e.field(hm, _half_subs(T.Q3_K, v), 1, 2))
         for v, q in enumerate(_two_bit_vectors(e, wp, Q3_QS))]
    return _Block(w, _pair_scales(e, T.Q3_K, sc16), None, e.f16(wp, Q3_D), None)


def _token_terms(e, blk, xp, xd, xsum):
    """[(int lanes, float scale)] to accumulate for one token's x block. The 4 dots fit in
    16 bits (|q| <= 63, |x| <= 127, 4 products), so pairs pack into one vpdpwssd each.
    xsum: the token's x-sum vectors (4 dot seeds for offset types, else 1 of sums)."""
    b = e.b
    zero = ir.Constant(_I32X16, None)
    seeds = xsum if blk.dmin is None else [zero] * 4
    dots = [e.dot_u8s8(seeds[v], blk.w[v], e.load(xp, 64 * v, _U8X64)) for v in range(4)]
    s = zero
    for p in range(2):
        packed = e.call("llvm.x86.avx512.packssdw.512", _I16X32, [dots[2 * p], dots[2 * p + 1]])
        s = e.call("llvm.x86.avx512.vpdpwssd.512", _I32X16, [s, packed, blk.sc[p]])
    if blk.dmin is None:
        return [(s, b.fmul(blk.d, xd))]
    m = e.dot_i16(zero, xsum[0], blk.ms)
    return [(s, b.fmul(blk.d, xd)), (m, b.fmul(blk.dmin, xd))]


def _hsum(b, v):
    for half in (8, 4, 2, 1):
        hi = b.shuffle_vector(v, ir.Constant(v.type, None),
                              _vconst(_I32X16, [(k + half) % 16 for k in range(16)]))
        v = b.fadd(v, hi)
    return b.extract_element(v, ir.Constant(_I32, 0))


# Software prefetch this far ahead of the block being read. Without it the kernel streamed
# ~60 % of a float32 sum's bandwidth from DRAM (the scheduler fills with uops waiting on
# loads, so too few cache lines are in flight); 8 KB ahead gave 80-90 % (shared machine,
# paired runs). Prefetches never fault, so running past the matrix end is harmless.
_PREFETCH_BYTES = 8192
# into L2 (llvm.prefetch locality 1: prefetcht2), not L1 (3: prefetcht0): a 512 MB Q6_K matrix
# from DRAM went 13-15 -> 24 GB/s at 1 thread and 21-24 -> 43-48 GB/s at 2 (44-73 -> 84-96 % of
# the probe; 2026-12-03, 8192-wide rows; 4 KB ahead worse, 16 KB no better)
_PREFETCH_LOCALITY = 1


def _emit_loop(builder, n, n_acc, step):
    """for i in range(n): accs = step(i, accs), accs starting at zero; returns the last accs."""
    zero = ir.Constant(_F32X16, None)
    pre = builder.block
    loop, done = builder.append_basic_block("kq.loop"), builder.append_basic_block("kq.done")
    builder.cbranch(builder.icmp_signed(">", n, ir.Constant(_I64, 0)), loop, done)
    builder.position_at_end(loop)
    i = builder.phi(_I64)
    accs = [builder.phi(_F32X16) for _ in range(n_acc)]
    new = step(i, accs)
    nxt = builder.add(i, ir.Constant(_I64, 1))
    end = builder.block
    i.add_incoming(ir.Constant(_I64, 0), pre)
    i.add_incoming(nxt, end)
    for acc, value in zip(accs, new, strict=True):
        acc.add_incoming(zero, pre)
        acc.add_incoming(value, end)
    builder.cbranch(builder.icmp_signed("<", nxt, n), loop, done)
    builder.position_at_end(done)
    out = []
    for value in new:
        phi = builder.phi(_F32X16)
        phi.add_incoming(zero, pre)
        phi.add_incoming(value, end)
        out.append(phi)
    return out


def _row_dots(body, type_size: int, n_terms: int, n_tok: int, x_vectors: int):
    """Intrinsic (w, row_off, n_blocks, xq, xd, xb, tok0, n_cols) -> n_tok float32 dots of
    one row with tokens tok0.. of the quantized x: each block decoded once for all tokens.
    n_terms = 2 where the mins have their own accumulator, subtracted at the end."""

    @intrinsic
    def row_dots(typingctx, w, row_off, n_blocks, xq, xd, xb, tok0, n_cols):
        sig = types.UniTuple(types.float32, n_tok)(w, row_off, n_blocks, xq, xd, xb, tok0,
                                                   n_cols)

        def codegen(context, builder, sig, args):
            e = _Emit(builder)
            wbase, xqb, xdb, xbb = (
                builder.bitcast(context.make_array(sig.args[i])(context, builder, args[i]).data,
                                t.as_pointer())
                for i, t in ((0, _I8), (3, _I8), (4, _F32), (5, _I32X16)))
            _, row_off, nb, _, _, _, tok0, ncols = args
            fma = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(_F32X16, [_F32X16] * 3), "llvm.fma.v16f32")

            def step(blk_i, accs):
                wp = e.ptr(wbase, builder.add(row_off,
                                              builder.mul(blk_i, ir.Constant(_I64, type_size))))
                for line in range(0, type_size, 64):  # every cache line of the block
                    e.prefetch(e.ptr(wp, _PREFETCH_BYTES + line))
                blk = body(e, wp)
                new = []
                for g in range(n_tok):
                    tok = builder.add(tok0, ir.Constant(_I64, g))
                    t_blk = builder.add(builder.mul(tok, nb), blk_i)  # x block index
                    xp = e.ptr(xqb, builder.add(builder.mul(tok, ncols),
                                                builder.mul(blk_i, ir.Constant(_I64, QK_K))))
                    xd_g = e.splat(builder.load(builder.gep(xdb, [t_blk])), _F32X16)
                    first = builder.mul(t_blk, ir.Constant(_I64, x_vectors))
                    xsum = [builder.load(builder.gep(xbb, [builder.add(first, ir.Constant(
                        _I64, v))]), align=4) for v in range(x_vectors)]
                    terms = _token_terms(e, blk, xp, xd_g, xsum)
                    mine = accs[g * n_terms : (g + 1) * n_terms]
                    for (ivec, scale), acc in zip(terms, mine, strict=True):
                        new.append(builder.call(fma, [builder.sitofp(ivec, _F32X16), scale, acc]))
                return new

            accs = _emit_loop(builder, nb, n_tok * n_terms, step)
            sums = []
            for g in range(n_tok):
                v = accs[g * n_terms]
                if n_terms == 2:
                    v = builder.fsub(v, accs[g * n_terms + 1])
                sums.append(_hsum(builder, v))
            return context.make_tuple(builder, sig.return_type, sums)

        return sig, codegen

    return row_dots


_TOKEN_GROUP = 4  # tokens per pass over a row in prefill: the row's blocks decode once
TILED_MIN_TOKENS = 8  # above this, Q4_K/Q5_K/Q6_K go to prima_ref.quants.tiled's kernels


def _q4_k_body(e, wp):
    return _body_q45_k(T.Q4_K, e, wp)


def _q5_k_body(e, wp):
    return _body_q45_k(T.Q5_K, e, wp)


# (body, terms per token): 2 where the mins go to their own accumulator
_BODIES = {T.Q2_K: (_body_q2_k, 2), T.Q3_K: (_body_q3_k, 1), T.Q4_K: (_q4_k_body, 2),
           T.Q5_K: (_q5_k_body, 2), T.Q6_K: (_body_q6_k, 1)}
_Q2_1, _Q3_1, _Q4_1, _Q5_1, _Q6_1 = (
    _row_dots(b, LAYOUTS[t].type_size, n, 1, _x_sums(t)[1] // 16) for t, (b, n) in _BODIES.items())
_Q2_G, _Q3_G, _Q4_G, _Q5_G, _Q6_G = (
    _row_dots(b, LAYOUTS[t].type_size, n, _TOKEN_GROUP, _x_sums(t)[1] // 16)
    for t, (b, n) in _BODIES.items())


@njit(inline="always")
def _row_dots_group(kind, w, off, n_blocks, xq, xd, xb, t, n_cols):
    if kind == 0:
        return _Q2_G(w, off, n_blocks, xq, xd, xb, t, n_cols)
    if kind == 1:
        return _Q3_G(w, off, n_blocks, xq, xd, xb, t, n_cols)
    if kind == 2:
        return _Q4_G(w, off, n_blocks, xq, xd, xb, t, n_cols)
    if kind == 3:
        return _Q5_G(w, off, n_blocks, xq, xd, xb, t, n_cols)
    return _Q6_G(w, off, n_blocks, xq, xd, xb, t, n_cols)


@njit(inline="always")
def _row_dot_one(kind, w, off, n_blocks, xq, xd, xb, t, n_cols):
    if kind == 0:
        return _Q2_1(w, off, n_blocks, xq, xd, xb, t, n_cols)[0]
    if kind == 1:
        return _Q3_1(w, off, n_blocks, xq, xd, xb, t, n_cols)[0]
    if kind == 2:
        return _Q4_1(w, off, n_blocks, xq, xd, xb, t, n_cols)[0]
    if kind == 3:
        return _Q5_1(w, off, n_blocks, xq, xd, xb, t, n_cols)[0]
    return _Q6_1(w, off, n_blocks, xq, xd, xb, t, n_cols)[0]


@njit(parallel=True, cache=True)
def _products_vnni(kind, w, row_bytes, xq, xd, xb, ys):
    """ys (n_tokens, n_rows) = W @ x for every token of the quantized x; only call where
    has_avx512_vnni() (LLVM cannot select vpdpbusd otherwise)."""
    n_tokens, n_rows = ys.shape
    n_blocks, n_cols = xd.shape[1], xq.shape[1]
    xq, xd, xb = xq.reshape(-1), xd.reshape(-1), xb.reshape(-1)
    n_grouped = n_tokens // _TOKEN_GROUP * _TOKEN_GROUP
    for r in prange(n_rows):
        off = np.uint64(r) * np.uint64(row_bytes)
        for t in range(0, n_grouped, _TOKEN_GROUP):
            dots = _row_dots_group(kind, w, off, n_blocks, xq, xd, xb, t, n_cols)
            for g in range(_TOKEN_GROUP):
                ys[t + g, r] = dots[g]
        for t in range(n_grouped, n_tokens):
            ys[t, r] = _row_dot_one(kind, w, off, n_blocks, xq, xd, xb, t, n_cols)


# ---------------------------------------------------------------------------------------------
# Input checks and the public wrappers


def _check_raw(raw: np.ndarray, qtype: T) -> np.ndarray:
    ts = LAYOUTS[qtype].type_size
    if raw.dtype != np.uint8 or raw.ndim != 2:
        raise KQuantInputError(f"{qtype.name} raw must be uint8 (n_rows, row_bytes), got "
                               f"{raw.dtype} {raw.shape}")
    if raw.shape[1] % ts:
        raise KQuantInputError(f"{qtype.name} rows need a multiple of {ts} bytes, got "
                               f"{raw.shape[1]}")
    return np.ascontiguousarray(raw)


def _check_x(x: np.ndarray, n_cols: int, qtype: T, ndim: int) -> np.ndarray:
    if x.ndim != ndim or x.shape[-1] != n_cols:
        want = "(n_cols,)" if ndim == 1 else "(n_tokens, n_cols)"
        raise KQuantInputError(f"{qtype.name} product: x must be {want} with n_cols={n_cols}, "
                               f"got {x.shape}")
    return np.ascontiguousarray(x, dtype=np.float32)


def _float_products(qtype: T):
    ts = LAYOUTS[qtype].type_size

    def matmul(raw: np.ndarray, xs: np.ndarray) -> np.ndarray:
        raw = _check_raw(raw, qtype)
        xs = _check_x(xs, raw.shape[1] // ts * QK_K, qtype, 2)
        xs = q8_k_values(xs, QK_K)  # what llama.cpp's Q8_K dot sees
        return _matmul_decoded(raw.reshape(-1), xs, raw.shape[1], ts, KIND[qtype])

    return matmul


def _vnni_products(qtype: T):
    ts = LAYOUTS[qtype].type_size
    slots, (sum_lane, n_lanes, factor) = _slots(qtype), _x_sums(qtype)
    tiled_kind = int(qtype) if int(qtype) in tiled.K_KINDS else None

    def matmul(raw: np.ndarray, xs: np.ndarray) -> np.ndarray:
        raw = _check_raw(raw, qtype)
        xs = _check_x(xs, raw.shape[1] // ts * QK_K, qtype, 2)
        n_tokens, n_cols = xs.shape
        if (tiled_kind in lanes.K_DECODE_KINDS and n_tokens <= lanes.MAX_TOKENS
                and lanes.available()):
            return lanes.matmul_k(tiled_kind, raw, xs)  # decode: rows in lanes, 1..8 tokens
        if (tiled_kind is not None and n_tokens > TILED_MIN_TOKENS
                and tiled.enabled()):  # prefill: register tiles (opt-in)
            return tiled.matmul_k(tiled_kind, raw, xs)
        xq = np.empty((n_tokens, n_cols), dtype=np.int8)  # (n_tokens, n_cols), slot order
        xd = np.empty((n_tokens, n_cols // QK_K), dtype=np.float32)  # (n_tokens, n_blocks)
        xb = np.empty((n_tokens, n_cols // QK_K, n_lanes), dtype=np.int32)  # (.., n_blocks, ..)
        _quantize_x_q8k(xs, slots, sum_lane, factor, xq, xd, xb)
        ys = np.empty((n_tokens, raw.shape[0]), dtype=np.float32)  # (n_tokens, n_rows)
        _products_vnni(KIND[qtype], raw.reshape(-1), raw.shape[1], xq, xd, xb, ys)
        return ys

    return matmul


def _make(qtype: T, ref_fn):
    from prima_ref.quants import QuantKernels

    ts = LAYOUTS[qtype].type_size
    vnni = has_avx512_vnni()
    matmul = _vnni_products(qtype) if vnni else _float_products(qtype)

    def dequantize(raw: np.ndarray) -> np.ndarray:
        raw = _check_raw(raw, qtype)
        return _dequantize_rows(raw.reshape(-1), raw.shape[0], raw.shape[1], ts, KIND[qtype])

    def matvec(raw: np.ndarray, x: np.ndarray) -> np.ndarray:
        if x.ndim != 1:
            raise KQuantInputError(f"{qtype.name} matvec: x must be (n_cols,), got {x.shape}")
        return matmul(raw, x.reshape(1, -1))[0]

    return QuantKernels(_ref(ref_fn, qtype), dequantize, matvec, matmul, x_quantized=True)


KERNELS = {
    T.Q2_K: _make(T.Q2_K, _q2_k_ref),
    T.Q3_K: _make(T.Q3_K, _q3_k_ref),
    T.Q4_K: _make(T.Q4_K, lambda raw: _q45_k_ref(raw, T.Q4_K)),
    T.Q5_K: _make(T.Q5_K, lambda raw: _q45_k_ref(raw, T.Q5_K)),
    T.Q6_K: _make(T.Q6_K, _q6_k_ref),
}
