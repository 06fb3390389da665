"""Float tensors: F32, F16, BF16 (one weight per "block").

Byte layout of one element (little-endian, as in ggml):

    F32   4 bytes  IEEE binary32
    F16   2 bytes  IEEE binary16: sign | 5-bit exponent | 10-bit mantissa
    BF16  2 bytes  the top half of a binary32: sign | 8-bit exponent | 7-bit mantissa

Rows are viewed, without copying, as words: F32 as float32, F16 as uint16 and BF16 as int16
(gguf-py's view of it), so the word dtype alone selects the widening in ``_widen``.
The products first round x as llama.cpp does (to f16 for F16 weights, to bf16 for BF16:
ggml's vec_dot_type), then multiply in float32.

Also home of the f16/bit-cast helpers that the other families use to read their scales.
"""

from __future__ import annotations

import numpy as np
from gguf.constants import GGMLQuantizationType as T
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload

from prima_ref.quants import QuantKernels
from prima_ref.quants.layouts import n_cols as layout_n_cols
from prima_ref.quants.simd import has_f16c

U64 = np.uint64
LANES = 32  # weights per reduction step: two 512-bit vectors of float32
MATMUL_CHUNK = 512  # weights of one row decoded at once for matmul (2 KiB of float32, in L1)
_WORD_DTYPE = {T.F32: np.float32, T.F16: np.uint16, T.BF16: np.int16}
# fastmath for the products only: reassociation lets LLVM keep the per-chunk sums in vectors.
_PRODUCT_MATH = {"reassoc", "contract", "nsz", "arcp"}


# ---------------------------------------------------------------- bit casts (LLVM intrinsics)


@intrinsic
def u32_bits_to_f32(typingctx, bits):
    """Reinterpret the low 32 bits of an integer as float32 (no conversion)."""
    if not isinstance(bits, types.Integer) or bits.bitwidth < 32:
        return None
    sig = types.float32(bits)

    def codegen(context, builder, signature, args):
        word = builder.trunc(args[0], ir.IntType(32)) if bits.bitwidth > 32 else args[0]
        return builder.bitcast(word, ir.FloatType())

    return sig, codegen


@intrinsic
def _f16_bits_to_f32_f16c(typingctx, bits):
    """Exact binary16 -> binary32 of the low 16 bits of an integer; compiles to vcvtph2ps.
    NaNs come out quiet."""
    if not isinstance(bits, types.Integer):
        return None
    sig = types.float32(bits)

    def codegen(context, builder, signature, args):
        word = builder.trunc(args[0], ir.IntType(16)) if bits.bitwidth > 16 else args[0]
        return builder.fpext(builder.bitcast(word, ir.HalfType()), ir.FloatType())

    return sig, codegen


@njit(cache=True, inline="always")
def _f16_bits_to_f32_portable(h):
    """Exact binary16 -> binary32 in integer and float32 arithmetic, for CPUs without F16C."""
    h = np.uint32(h) & np.uint32(0xFFFF)
    em = h & np.uint32(0x7FFF)
    if em < 0x0400:  # zero or subnormal: em * 2**-24 is exact, and immune to denormals-as-zero
        mag = np.float32(em) * np.float32(2.0**-24)
    elif em >= 0x7C00:  # inf / nan: all-ones exponent, mantissa kept
        mag = u32_bits_to_f32(np.uint32(0x7F800000) | ((em & np.uint32(0x3FF)) << np.uint32(13)))
    else:  # rebias the exponent from 15 to 127
        mag = u32_bits_to_f32((em << np.uint32(13)) + np.uint32((127 - 15) << 23))
    return -mag if h & np.uint32(0x8000) else mag


# vcvtph2ps where the CPU has it (as simd.load_f16 decides), else the portable conversion.
f16_bits_to_f32 = _f16_bits_to_f32_f16c if has_f16c() else _f16_bits_to_f32_portable


@njit(cache=True, inline="always")
def f16_bits_to_f32_exact(h):
    """As numpy's float16 -> float32 also for NaN payloads (hardware quiets signalling NaNs)."""
    if (h & 0x7C00) == 0x7C00 and (h & 0x03FF) != 0:
        sign = np.uint32(h & 0x8000) << np.uint32(16)
        mant = np.uint32(h & 0x03FF) << np.uint32(13)
        return u32_bits_to_f32(sign | np.uint32(0x7F800000) | mant)
    return f16_bits_to_f32(h)


@njit(cache=True, inline="always")
def bf16_bits_to_f32(h):
    return u32_bits_to_f32(np.uint32(np.uint16(h)) << np.uint32(16))


def _widen(w, i):
    """float32 value of word i of a float32 / f16 (uint16) / bf16 (int16) array."""


@overload(_widen, inline="always")
def _widen_impl(w, i):
    if w.dtype == types.float32:
        return lambda w, i: w[i]
    if w.dtype == types.uint16:
        return lambda w, i: f16_bits_to_f32(w[i])
    if w.dtype == types.int16:
        return lambda w, i: bf16_bits_to_f32(w[i])
    return None


def _widen_exact(w, i):
    """As ``_widen``, but f16 NaN payloads kept bit for bit (for dequantize)."""


@overload(_widen_exact, inline="always")
def _widen_exact_impl(w, i):
    if w.dtype == types.uint16:
        return lambda w, i: f16_bits_to_f32_exact(w[i])
    return lambda w, i: _widen(w, i)


# ---------------------------------------------------------------- input checks


class BadTensorShape(ValueError):
    pass


def check_rows(raw: np.ndarray, qtype: T) -> int:
    """Validate ``raw`` per the kernel contract; return the number of weights per row."""
    if not isinstance(raw, np.ndarray) or raw.dtype != np.uint8 or raw.ndim != 2:
        got = f"{getattr(raw, 'dtype', type(raw).__name__)} {getattr(raw, 'shape', '')}"
        raise BadTensorShape(f"{qtype.name} weights must be a 2-D uint8 array of rows, got {got}")
    if not raw.flags.c_contiguous:
        raise BadTensorShape(f"{qtype.name} weights of shape {raw.shape} must be C-contiguous rows")
    return layout_n_cols(qtype, raw.shape[1])


def check_x(x: np.ndarray, n_cols: int, qtype: T, ndim: int) -> np.ndarray:
    """float32 C-contiguous copy-if-needed of x (n_cols,) or xs (n_tokens, n_cols)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != ndim or x.shape[-1] != n_cols:
        want = "(n_cols,)" if ndim == 1 else "(n_tokens, n_cols)"
        raise BadTensorShape(
            f"{qtype.name} product: x has shape {x.shape}, expected {want} with n_cols={n_cols}"
        )
    return x


def _words(raw: np.ndarray, qtype: T) -> tuple[np.ndarray, int]:
    n_cols = check_rows(raw, qtype)
    return raw.reshape(-1).view(_WORD_DTYPE[qtype]), n_cols  # (n_rows * n_cols,)


# ---------------------------------------------------------------- numpy reference


def _dequantize_ref(raw: np.ndarray, qtype: T) -> np.ndarray:
    words = raw.view(_WORD_DTYPE[qtype])  # (n_rows, n_cols)
    if qtype == T.F16:
        return words.view(np.float16).astype(np.float32)
    if qtype == T.BF16:
        return (words.astype(np.int32) << 16).view(np.float32)
    return words.copy()


# ---------------------------------------------------------------- Numba kernels


@njit(cache=True)
def _dequantize_words(w, n_cols):
    out = np.empty(w.size, np.float32)  # (n_rows * n_cols,)
    for i in range(U64(w.size)):
        out[i] = _widen_exact(w, i)
    return out.reshape(w.size // n_cols, n_cols)


@njit(cache=True, inline="always", fastmath=_PRODUCT_MATH)
def dot(w, w_start, x, x_start, n):
    """sum_j widen(w[w_start + j]) * x[x_start + j] for j < n; w_start, x_start, n uint64."""
    total = np.float32(0.0)
    n_full = n // U64(LANES) * U64(LANES)
    for c in range(n_full // U64(LANES)):
        wi = w_start + U64(c) * U64(LANES)
        xi = x_start + U64(c) * U64(LANES)
        part = np.float32(0.0)
        for j in range(LANES):
            part += _widen(w, wi + U64(j)) * x[xi + U64(j)]
        total += part
    for j in range(n_full, n):
        total += _widen(w, w_start + U64(j)) * x[x_start + U64(j)]
    return total


@njit(cache=True, inline="always", fastmath=_PRODUCT_MATH)
def add_token_dots(buf, m, x_flat, col0, n_cols, acc):
    """acc[t] += buf[:m] . x[t, col0:col0 + m] for every token t; x_flat (n_tokens * n_cols,).
    The matmul step shared by all families: buf holds a decoded chunk of one weight row."""
    for t in range(acc.size):
        acc[t] += dot(buf, U64(0), x_flat, U64(t) * n_cols + col0, m)


@njit(cache=True, parallel=True, fastmath=_PRODUCT_MATH)
def _matvec_words(w, x, n_cols):
    n = U64(n_cols)
    n_rows = w.size // n_cols
    y = np.empty(n_rows, np.float32)  # (n_rows,)
    for r in prange(n_rows):
        y[r] = dot(w, U64(r) * n, x, U64(0), n)
    return y


@njit(cache=True, parallel=True, fastmath=_PRODUCT_MATH)
def _matmul_words(w, xs, n_cols):
    """Each chunk of a row is widened once into an L1 buffer, then used by every token."""
    n = U64(n_cols)
    n_tokens = xs.shape[0]
    n_rows = w.size // n_cols
    x_flat = xs.reshape(-1)  # (n_tokens * n_cols,)
    ys = np.empty((n_tokens, n_rows), np.float32)  # (n_tokens, n_rows)
    for r in prange(n_rows):
        buf = np.empty(MATMUL_CHUNK, np.float32)  # (MATMUL_CHUNK,)
        acc = np.zeros(n_tokens, np.float32)  # (n_tokens,)
        row = U64(r) * n
        for c0 in range(U64(0), n, U64(MATMUL_CHUNK)):
            m = min(U64(MATMUL_CHUNK), n - c0)
            for j in range(m):
                buf[j] = _widen(w, row + c0 + U64(j))
            add_token_dots(buf, m, x_flat, c0, n, acc)
        ys[:, r] = acc
    return ys


# ---------------------------------------------------------------- x as llama.cpp rounds it


def bf16_round(x: np.ndarray) -> np.ndarray:
    """float32 x rounded to bf16 and back: ggml_compute_fp32_to_bf16 (ties to even, NaN kept
    quiet), the vec_dot_type conversion of x for BF16 weights."""
    u = x.view(np.uint32)
    nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    rounded = (u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)
    bits = np.where(nan, (u >> np.uint32(16)) | np.uint32(64), rounded) << np.uint32(16)
    return bits.astype(np.uint32).view(np.float32)


def _llama_x(qtype: T, x: np.ndarray) -> np.ndarray:
    """ggml converts x to the weight's vec_dot_type first: F16 for F16, BF16 for BF16."""
    if qtype == T.F16:
        return x.astype(np.float16).astype(np.float32)
    if qtype == T.BF16:
        return bf16_round(x)
    return x


# ---------------------------------------------------------------- public wrappers


def _kernels(qtype: T) -> QuantKernels:
    def dequantize_ref(raw):
        check_rows(raw, qtype)
        return _dequantize_ref(raw, qtype)

    def dequantize(raw):
        w, n_cols = _words(raw, qtype)
        return _dequantize_words(w, n_cols)

    def matvec(raw, x):
        w, n_cols = _words(raw, qtype)
        return _matvec_words(w, _llama_x(qtype, check_x(x, n_cols, qtype, 1)), n_cols)

    def matmul(raw, xs):
        w, n_cols = _words(raw, qtype)
        return _matmul_words(w, _llama_x(qtype, check_x(xs, n_cols, qtype, 2)), n_cols)

    # x rounded to bf16 (8-bit significand) is a quantization of x (bound 5e-4); rounded to
    # f16 it stays within the float bound 1e-6
    return QuantKernels(dequantize_ref, dequantize, matvec, matmul, x_quantized=qtype == T.BF16)


KERNELS = {qtype: _kernels(qtype) for qtype in (T.F32, T.F16, T.BF16)}
