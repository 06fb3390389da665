"""Low-level helpers shared by the quant kernels: CPU features, int8 activations, SIMD intrinsics.

Stable API (other quant families build on it):

- ``has_vnni()``, ``has_f16c()``: what the host CPU can run (llvmlite's host feature list).
- ``quantize_x_q8(x) -> (qx, dx, sx, dsx)``: x float32 (..., n) to int8 blocks of 32 exactly as
  llama.cpp's Q8_0/Q8_1 activations (ggml-cpu quantize_row_q8_0/q8_1, AVX2 path): ``qx`` int8
  (..., n); ``dx`` float32 (..., n//32), the f16-rounded scale amax/127; ``sx`` int32 block sums
  of ``qx``; ``dsx`` float32, Q8_1's ``s`` = f16(unrounded d * sx), what Q4_1/Q5_1 mins meet.
- ``q8_k_iscale(x, lo, n)``, ``q8_k_quant(iscale, v)``: njit-callable quantize_row_q8_K_ref.
- ``q8_0_values(x)``, ``q8_k_values(x, 256)``: x as d * q of those activations, for float
  kernels that must see llama.cpp's activation values. ``round_f16(v)``: njit f32 -> f16 -> f32.
- ``f16_bits(v) -> uint16``: njit; the bits of v rounded to f16 (numpy's astype(float16)).
- ``load_f16(raw, off) -> float32``: njit-callable; the f16 at byte ``off`` of a uint8 array.
- 256-bit vector values for njit kernels, written like C intrinsics (one x86 instruction or a
  few each). A kernel holds them in locals; LLVM keeps them in ymm registers:
    ``U8x32`` (32 x u8), ``I8x32`` (32 x i8), ``I32x8`` (8 x i32), ``F32x8`` (8 x f32)
    ``load_u8x32(a, off)``      32 bytes at byte offset off of any 1-D C-contiguous int8/uint8 array
    ``load_q8_as_u8x32(a, off)``  32 int8 weights + 128, so they fit vpdpbusd's unsigned operand
    ``load_i8x32(a, off)``      32 int8 of a quantized activation
    ``load_nibbles_u8x32(a, off)`` 16 bytes -> their 16 low nibbles then their 16 high nibbles
    ``load_bits_u8x32(a, off, v)`` 32 bits (u32 at off) -> 32 bytes, v where the bit is set else 0
    ``or_u8x32(a, b)``
    ``dot_u8i8_i32x8(acc, u, s)``  acc + 4-byte group sums of u*s: VNNI vpdpbusd (only call it
                                when ``has_vnni()``; LLVM cannot select it otherwise)
    ``load_i32x8(a, i)`` a[i:i+8] of an int32 array, ``shl_i32x8(v, n)`` lanes << n
    ``i32x8_zero()``, ``f32x8_zero()``, ``splat_f32x8(s)``, ``mul_f32x8(a, s)``
    ``fma_i32x8(acc, v, s)``    acc + float(v) * s; s is an F32x8 or a scalar float (splat)
    ``fma_i32x8_store(out, i, v, s)``  out[i:i+8] += float(v) * s (out float32 1-D)
    ``hsum_f32x8(v) -> float32``, ``axpy_f32x8(y, i, a, x, j)``: y[i:i+8] += a * x[j:j+8]

- 512-bit twins for two blocks or two tokens per instruction: ``U8x64``, ``I8x64``, ``I32x16``,
  ``F32x16``; ``dup_u8x64(u)`` (u, u), ``load_i8x64``, ``i32x16_zero``, ``dot_u8i8_i32x16``,
  ``load_f32x16(a, i)``, ``splat_f32x16``, ``mul_f32x16``, ``fma_i32x16_store(out, i, v, s)``.

- float64 x 8 for attention: ``F64x8``, ``f64x8_zero``, ``load_f64x8(a, i)``,
  ``fma_f32_f64x8(a, x, j, acc)`` (a * widened x.flat[j:j+8] + acc), ``hsum_f64x8`` (a fixed
  tree), ``axpy4_f64x8(y, i, p, x, j, step)`` (four widened rows of x, weights p, into y).

Everything except the ``dot_u8i8_*`` pair is plain LLVM IR and compiles on any CPU.
"""

from __future__ import annotations

import os

import llvmlite.binding as llvm
import numpy as np
from llvmlite import ir
from numba import njit
from numba.core import cgutils, types
from numba.extending import intrinsic, models, register_model

from prima_ref.quants.layouts import QK_LEGACY

# --- CPU features -------------------------------------------------------------------------------

_FEATURES: dict[str, bool] | None = None


def cpu_features() -> dict[str, bool]:
    """The features Numba compiles for: NUMBA_CPU_FEATURES when set (as Numba does, e.g. to
    build for an older CPU), else the host's."""
    global _FEATURES
    if _FEATURES is None:
        forced = os.environ.get("NUMBA_CPU_FEATURES")
        if forced is not None:
            flags = [f.strip() for f in forced.split(",") if f.strip()]
            _FEATURES = {f[1:]: f[0] == "+" for f in flags}
        else:
            _FEATURES = dict(llvm.get_host_cpu_features())
    return _FEATURES


def has_vnni() -> bool:
    """256-bit vpdpbusd: AVX512-VNNI with AVX512VL, or AVX-VNNI (VEX encoded)."""
    f = cpu_features()
    return bool((f.get("avx512vnni") and f.get("avx512vl")) or f.get("avxvnni"))


def has_f16c() -> bool:
    """Whether fpext half->float compiles to vcvtph2ps (else LLVM would call a libgcc helper)."""
    return bool(cpu_features().get("f16c"))


# --- activations quantized as llama.cpp quantizes them -------------------------------------------
# ggml quantizes x to the weight type's vec_dot_type before every quantized product; matching
# its integers and its f16 roundings is what makes our logits match llama.cpp's to ~1e-4.


@intrinsic
def f32_bits(typingctx, x):
    """The IEEE bits of a float32 as uint32 (no conversion)."""
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(x), codegen


@intrinsic
def _bits_f32(typingctx, bits):
    """The low 32 bits of an integer as float32 (Numba widens uint32 arithmetic to 64 bits)."""
    if not isinstance(bits, types.Integer) or bits.bitwidth < 32:
        return None

    def codegen(context, builder, sig, args):
        word = builder.trunc(args[0], ir.IntType(32)) if bits.bitwidth > 32 else args[0]
        return builder.bitcast(word, ir.FloatType())

    return types.float32(bits), codegen


@intrinsic
def _round_f16_f16c(typingctx, x):
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.fpext(builder.fptrunc(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(x), codegen


@njit(cache=True, inline="always")
def _round_f16_portable(x):
    """x rounded to the nearest f16 (ties to even), as float32: GGML_FP32_TO_FP16 then back."""
    bits = f32_bits(x)
    mag_bits = bits & np.uint32(0x7FFFFFFF)
    if mag_bits >= np.uint32(0x7F800000):  # inf, nan
        return x
    if mag_bits >= np.uint32(0x477FF000):  # >= 65520: rounds to inf
        return _bits_f32((bits & np.uint32(0x80000000)) | np.uint32(0x7F800000))
    if mag_bits < np.uint32(0x38800000):  # below 2**-14: f16 subnormal, steps of 2**-24
        return np.float32(np.rint(x * np.float32(2.0**24))) * np.float32(2.0**-24)
    odd = (bits >> np.uint32(13)) & np.uint32(1)
    return _bits_f32((bits + np.uint32(0xFFF) + odd) & np.uint32(0xFFFFE000))


round_f16 = _round_f16_f16c if has_f16c() else _round_f16_portable


@njit(cache=True, inline="always")
def f16_bits(x):
    """x float32 -> the bits of x rounded to f16 (numpy's astype(float16).view(uint16))."""
    r = round_f16(x)
    bits = f32_bits(r)
    sign = (bits >> np.uint32(16)) & np.uint32(0x8000)
    mag = bits & np.uint32(0x7FFFFFFF)
    if mag > np.uint32(0x7F800000):
        return np.uint16(sign | np.uint32(0x7E00))
    if mag >= np.uint32(0x47800000):  # >= 65536 after rounding: inf
        return np.uint16(sign | np.uint32(0x7C00))
    if mag < np.uint32(0x38800000):  # f16 subnormal or zero: exact multiple of 2**-24
        return np.uint16(sign | np.uint32(abs(r) * np.float32(2.0**24)))
    exp = (mag >> np.uint32(23)) - np.uint32(112)
    return np.uint16(sign | (exp << np.uint32(10)) | ((mag >> np.uint32(13)) & np.uint32(0x3FF)))


@njit(cache=True)
def _quantize_rows_q8(x, qx, dx, sx, dsx):
    """x (n_rows, n) -> qx (n_rows, n), dx, sx, dsx (n_rows, n // 32): quantize_row_q8_0 /
    q8_1 of ggml-cpu's AVX2 path (id = 127/amax, round half to even, f16 d and s)."""
    for r in range(x.shape[0]):
        for b in range(dx.shape[1]):
            lo = b * QK_LEGACY
            amax = np.float32(0.0)
            for j in range(QK_LEGACY):
                amax = max(amax, abs(x[r, lo + j]))
            d = amax / np.float32(127.0)
            inv = np.float32(127.0) / amax if amax != 0 else np.float32(0.0)
            total = 0
            for j in range(QK_LEGACY):
                q = np.int32(np.rint(x[r, lo + j] * inv))
                qx[r, lo + j] = q
                total += q
            dx[r, b] = round_f16(d)
            sx[r, b] = total
            dsx[r, b] = round_f16(d * np.float32(total))


def quantize_x_q8(x: np.ndarray):
    """x float32 (..., n) -> (qx, dx, sx, dsx) as llama.cpp's Q8_0/Q8_1 activations."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = x.shape[-1]
    if n % QK_LEGACY:
        raise ValueError(f"int8 activations need a multiple of {QK_LEGACY} values, got {n}")
    rows = x.reshape(-1, n)
    n_blocks = n // QK_LEGACY
    qx = np.empty(rows.shape, np.int8)  # (n_rows, n)
    dx = np.empty((rows.shape[0], n_blocks), np.float32)  # (n_rows, n_blocks)
    sx = np.empty((rows.shape[0], n_blocks), np.int32)  # (n_rows, n_blocks)
    dsx = np.empty((rows.shape[0], n_blocks), np.float32)  # (n_rows, n_blocks)
    _quantize_rows_q8(rows, qx, dx, sx, dsx)
    lead = x.shape[:-1]
    return qx.reshape(x.shape), dx.reshape(*lead, -1), sx.reshape(*lead, -1), dsx.reshape(*lead, -1)


@njit(cache=True, inline="always")
def q8_k_iscale(x, lo, n):
    """quantize_row_q8_K_ref's scale for x[lo:lo+n]: -127 / (the first x of largest |x|),
    0 when all are zero. Then q = min(127, rint(iscale * x)) and d = 1 / iscale."""
    amax, xmax = np.float32(0.0), np.float32(0.0)
    for j in range(n):
        ax = abs(x[lo + j])
        if ax > amax:
            amax, xmax = ax, x[lo + j]
    return np.float32(-127.0) / xmax if amax != 0 else np.float32(0.0)


@njit(cache=True, inline="always")
def q8_k_quant(iscale, v):
    return min(np.int32(127), np.int32(np.rint(iscale * v)))


@njit(cache=True)
def _q8_k_values(x, out, qk):
    for r in range(x.shape[0]):
        for lo in range(0, x.shape[1], qk):
            iscale = q8_k_iscale(x[r], lo, qk)
            d = np.float32(1.0) / iscale if iscale != 0 else np.float32(0.0)
            for j in range(qk):
                out[r, lo + j] = d * np.float32(q8_k_quant(iscale, x[r, lo + j]))


def q8_0_values(x: np.ndarray) -> np.ndarray:
    """x float32 (..., n) as the values d * q of its Q8_0 activation (float32, same shape): for
    products that keep float kernels but must see what llama.cpp's int8 dot sees."""
    qx, dx, _, _ = quantize_x_q8(x)
    return (qx.reshape(*dx.shape, QK_LEGACY) * dx[..., None]).reshape(qx.shape)


def q8_k_values(x: np.ndarray, qk: int) -> np.ndarray:
    """x float32 (..., n) as the values d * q of its Q8_K activation (blocks of qk = 256)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.shape[-1] % qk:
        raise ValueError(f"Q8_K activations need a multiple of {qk} values, got {x.shape[-1]}")
    rows = x.reshape(-1, x.shape[-1])
    out = np.empty_like(rows)  # (n_rows, n)
    _q8_k_values(rows, out, qk)
    return out.reshape(x.shape)


# --- f16 scales ---------------------------------------------------------------------------------


@njit(cache=True, inline="always")
def _f16_bits_to_f32(h):
    # Portable exact conversion for CPUs without F16C.
    h = np.uint32(h)
    sign = (h >> np.uint32(15)) << np.uint32(31)
    exp = (h >> np.uint32(10)) & np.uint32(0x1F)
    mant = h & np.uint32(0x3FF)
    if exp == 0:  # zero or subnormal: mant * 2^-24 is exact in float32
        mag = np.float32(mant) * np.float32(2.0**-24)
        return -mag if sign else mag
    if exp == 31:
        bits = sign | np.uint32(0x7F800000) | (mant << np.uint32(13))
    else:
        bits = sign | ((exp + np.uint32(112)) << np.uint32(23)) | (mant << np.uint32(13))
    return np.array([bits], np.uint32).view(np.float32)[0]


def _ptr(context, builder, sig, args, i_arr=0, i_off=1):
    """i8* to byte args[i_off] of the C-contiguous 1-D byte array args[i_arr]."""
    data = cgutils.create_struct_proxy(sig.args[i_arr])(context, builder, value=args[i_arr]).data
    off = context.cast(builder, args[i_off], sig.args[i_off], types.int64)
    return builder.gep(builder.bitcast(data, ir.IntType(8).as_pointer()), [off])


def _load(builder, ptr, ty):
    return builder.load(builder.bitcast(ptr, ty.as_pointer()), align=1)


def _is_byte_array(t) -> bool:
    return isinstance(t, types.Array) and t.dtype in (types.uint8, types.int8) and t.ndim == 1


@intrinsic
def _load_f16_f16c(typingctx, raw, off):
    if not (_is_byte_array(raw) and isinstance(off, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        h = _load(builder, _ptr(context, builder, sig, args), ir.IntType(16))
        return builder.fpext(builder.bitcast(h, ir.HalfType()), ir.FloatType())

    return types.float32(raw, off), codegen


@njit(cache=True, inline="always")
def _load_f16_portable(raw, off):
    return _f16_bits_to_f32(np.uint16(raw[off]) | (np.uint16(raw[off + 1]) << np.uint16(8)))


load_f16 = _load_f16_f16c if has_f16c() else _load_f16_portable


# --- 256-bit vectors ----------------------------------------------------------------------------

_ELEM = {"u8": ir.IntType(8), "i8": ir.IntType(8), "i32": ir.IntType(32), "f32": ir.FloatType()}


class Vec(types.Type):
    def __init__(self, kind: str, count: int):
        self.kind, self.count = kind, count
        super().__init__(name=f"{kind}x{count}")


@register_model(Vec)
class _VecModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, ir.VectorType(_ELEM[fe_type.kind], fe_type.count))


U8x32, I8x32, I32x8, F32x8 = Vec("u8", 32), Vec("i8", 32), Vec("i32", 8), Vec("f32", 8)
_V32I8 = ir.VectorType(ir.IntType(8), 32)
_V8I32 = ir.VectorType(ir.IntType(32), 8)
_V8F32 = ir.VectorType(ir.FloatType(), 8)


def _splat(builder, value, vec_ty):
    v = builder.insert_element(ir.Constant(vec_ty, None), value, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(v, v, _mask([0] * vec_ty.count))


def _fma(builder, vec_ty=_V8F32):
    fnty = ir.FunctionType(vec_ty, [vec_ty] * 3)
    return cgutils.get_or_insert_function(builder.module, fnty, f"llvm.fma.v{vec_ty.count}f32")


def _mask(indices):
    return ir.Constant(ir.VectorType(ir.IntType(32), len(indices)), list(indices))


def _f32_ptr(context, builder, sig, args, k_arr, k_off, vec_ty):
    data = cgutils.create_struct_proxy(sig.args[k_arr])(context, builder, value=args[k_arr]).data
    off = context.cast(builder, args[k_off], sig.args[k_off], types.int64)
    return builder.bitcast(builder.gep(data, [off]), vec_ty.as_pointer())


def _ld(builder, ptr):
    return builder.load(ptr, align=4)  # float arrays are only 4-byte aligned


def _is_f32_1d(t) -> bool:
    return isinstance(t, types.Array) and t.dtype == types.float32 and t.ndim == 1


def _byte_loader(result_ty, body):
    """An intrinsic (array, byte offset) -> vector whose IR is body(builder, i8* ptr)."""

    @intrinsic
    def load(typingctx, arr, off):
        if not (_is_byte_array(arr) and isinstance(off, types.Integer)):
            return None

        def codegen(context, builder, sig, args):
            return body(builder, _ptr(context, builder, sig, args))

        return result_ty(arr, off), codegen

    return load


def _nibbles(builder, ptr):
    # Broadcast the 16 bytes to both 128-bit halves (a load, no shuffle), shift the upper half
    # right by 4, mask: low nibbles then high nibbles without a cross-lane insert.
    b = _load(builder, ptr, ir.VectorType(ir.IntType(8), 16))
    both = builder.shuffle_vector(b, b, _mask(list(range(16)) * 2))
    v4i64 = ir.VectorType(ir.IntType(64), 4)
    shifted = builder.lshr(builder.bitcast(both, v4i64), ir.Constant(v4i64, [0, 0, 4, 4]))
    return builder.and_(builder.bitcast(shifted, _V32I8), ir.Constant(_V32I8, [0x0F] * 32))


load_u8x32 = _byte_loader(U8x32, lambda b, p: _load(b, p, _V32I8))
load_i8x32 = _byte_loader(I8x32, lambda b, p: _load(b, p, _V32I8))
load_q8_as_u8x32 = _byte_loader(
    U8x32, lambda b, p: b.xor(_load(b, p, _V32I8), ir.Constant(_V32I8, [0x80] * 32))
)
load_nibbles_u8x32 = _byte_loader(U8x32, _nibbles)


@intrinsic
def load_bits_u8x32(typingctx, arr, off, value):
    if not (_is_byte_array(arr) and isinstance(off, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        bits = _load(builder, _ptr(context, builder, sig, args), ir.IntType(32))
        # Bits to bytes with vector ops (vpbroadcastd, vpshufb, vptestnmb). Bitcasting the u32
        # to a mask let LLVM fold it into `kmovd k, m32`, and Q5_0's matvec from RAM then ran
        # at 5-7 GB/s on one thread (11-13 GB/s with this; about 14 either way from cache).
        words = _splat(builder, bits, _V8I32)
        byte_of = builder.shuffle_vector(builder.bitcast(words, _V32I8), ir.Constant(_V32I8, None),
                                         _mask([0] * 8 + [1] * 8 + [18] * 8 + [19] * 8))
        one_bit = ir.Constant(_V32I8, [1 << (j & 7) for j in range(32)])
        mask = builder.icmp_unsigned("!=", builder.and_(byte_of, one_bit),
                                     ir.Constant(_V32I8, None))
        v = _splat(builder, context.cast(builder, args[2], sig.args[2], types.uint8), _V32I8)
        return builder.select(mask, v, ir.Constant(_V32I8, None))

    return U8x32(arr, off, value), codegen


@intrinsic
def or_u8x32(typingctx, a, b):
    if a != U8x32 or b != U8x32:
        return None
    return U8x32(a, b), lambda context, builder, sig, args: builder.or_(*args)


@intrinsic
def dot_u8i8_i32x8(typingctx, acc, u, s):
    if (acc, u, s) != (I32x8, U8x32, I8x32):
        return None

    def codegen(context, builder, sig, args):
        fnty = ir.FunctionType(_V8I32, [_V8I32, _V8I32, _V8I32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.avx512.vpdpbusd.256")
        acc_v, u_v, s_v = args
        return builder.call(fn, [acc_v, builder.bitcast(u_v, _V8I32), builder.bitcast(s_v, _V8I32)])

    return I32x8(acc, u, s), codegen


@intrinsic
def load_i32x8(typingctx, a, i):
    """a[i:i+8] of an int32 1-D array."""
    if not (isinstance(a, types.Array) and a.dtype == types.int32 and a.ndim == 1
            and isinstance(i, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        return builder.load(_f32_ptr(context, builder, sig, args, 0, 1, _V8I32), align=4)

    return I32x8(a, i), codegen


@intrinsic
def shl_i32x8(typingctx, v, n):
    """v << n in every lane; n a compile-time constant in practice (one vpslld)."""
    if v != I32x8 or not isinstance(n, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        n32 = context.cast(builder, args[1], sig.args[1], types.int32)
        return builder.shl(args[0], _splat(builder, n32, _V8I32))

    return I32x8(v, n), codegen


@intrinsic
def i32x8_zero(typingctx):
    return I32x8(), lambda context, builder, sig, args: ir.Constant(_V8I32, None)


@intrinsic
def f32x8_zero(typingctx):
    return F32x8(), lambda context, builder, sig, args: ir.Constant(_V8F32, None)


def _as_f32x8(context, builder, ty, value):
    """A scale argument: an F32x8 as is, a scalar float splat to all lanes."""
    if ty == F32x8:
        return value
    return _splat(builder, context.cast(builder, value, ty, types.float32), _V8F32)


def _is_scale(t) -> bool:
    return t == F32x8 or isinstance(t, types.Float)


@intrinsic
def mul_f32x8(typingctx, a, s):
    """a * s for s an F32x8 or a scalar (splat): a scalar loaded from memory becomes an
    embedded broadcast operand, no shuffle."""
    if a != F32x8 or not _is_scale(s):
        return None

    def codegen(context, builder, sig, args):
        return builder.fmul(args[0], _as_f32x8(context, builder, sig.args[1], args[1]))

    return F32x8(a, s), codegen


@intrinsic
def splat_f32x8(typingctx, s):
    if not isinstance(s, types.Float):
        return None

    def codegen(context, builder, sig, args):
        return _as_f32x8(context, builder, sig.args[0], args[0])

    return F32x8(s), codegen


@intrinsic
def fma_i32x8(typingctx, acc, v, s):
    if (acc, v) != (F32x8, I32x8) or not _is_scale(s):
        return None

    def codegen(context, builder, sig, args):
        acc_v, v_v, s_v = args
        scale = _as_f32x8(context, builder, sig.args[2], s_v)
        return builder.call(_fma(builder), [builder.sitofp(v_v, _V8F32), scale, acc_v])

    return F32x8(acc, v, s), codegen


@intrinsic
def fma_i32x8_store(typingctx, out, i, v, s):
    """out[i:i+8] += float(v) * s, for accumulators kept in a small (L1) float32 array."""
    if not (_is_f32_1d(out) and isinstance(i, types.Integer) and v == I32x8 and _is_scale(s)):
        return None

    def codegen(context, builder, sig, args):
        ptr = _f32_ptr(context, builder, sig, args, 0, 1, _V8F32)
        scale = _as_f32x8(context, builder, sig.args[3], args[3])
        products = builder.sitofp(args[2], _V8F32)
        total = builder.call(_fma(builder), [products, scale, _ld(builder, ptr)])
        builder.store(total, ptr, align=4)
        return context.get_dummy_value()

    return types.none(out, i, v, s), codegen


@intrinsic
def hsum_f32x8(typingctx, v):
    if v != F32x8:
        return None

    def codegen(context, builder, sig, args):
        total = ir.Constant(ir.FloatType(), 0.0)
        for i in range(8):
            lane = builder.extract_element(args[0], ir.Constant(ir.IntType(32), i))
            total = builder.fadd(total, lane)
        return total

    return types.float32(v), codegen


@intrinsic
def axpy_f32x8(typingctx, y, i, a, x, j):
    """y[i:i+8] += a * x[j:j+8] (float32 1-D arrays, a scalar): small per-token sums, 8 at once."""
    indices = isinstance(i, types.Integer) and isinstance(j, types.Integer)
    if not (_is_f32_1d(y) and _is_f32_1d(x) and indices and isinstance(a, types.Float)):
        return None

    def codegen(context, builder, sig, args):
        y_ptr = _f32_ptr(context, builder, sig, args, 0, 1, _V8F32)
        x_ptr = _f32_ptr(context, builder, sig, args, 3, 4, _V8F32)
        scale = _as_f32x8(context, builder, sig.args[2], args[2])
        total = builder.call(_fma(builder), [scale, _ld(builder, x_ptr), _ld(builder, y_ptr)])
        builder.store(total, y_ptr, align=4)
        return context.get_dummy_value()

    return types.none(y, i, a, x, j), codegen


# --- 512-bit vectors: two 32-weight blocks (or one block against two tokens) per instruction ----
# On a CPU with AVX-VNNI but no AVX-512, LLVM splits these into 256-bit halves.

U8x64, I8x64, I32x16, F32x16 = Vec("u8", 64), Vec("i8", 64), Vec("i32", 16), Vec("f32", 16)
_V64I8 = ir.VectorType(ir.IntType(8), 64)
_V16I32 = ir.VectorType(ir.IntType(32), 16)
_V16F32 = ir.VectorType(ir.FloatType(), 16)

load_i8x64 = _byte_loader(I8x64, lambda b, p: _load(b, p, _V64I8))


@intrinsic
def dup_u8x64(typingctx, u):
    """(u, u): one weight block against two tokens' activations."""
    if u != U8x32:
        return None

    def codegen(context, builder, sig, args):
        return builder.shuffle_vector(args[0], args[0], _mask(list(range(32)) * 2))

    return U8x64(u), codegen


@intrinsic
def i32x16_zero(typingctx):
    return I32x16(), lambda context, builder, sig, args: ir.Constant(_V16I32, None)


@intrinsic
def dot_u8i8_i32x16(typingctx, acc, u, s):
    """dot_u8i8_i32x8 on 64 bytes; only when has_vnni()."""
    if (acc, u, s) != (I32x16, U8x64, I8x64):
        return None

    def codegen(context, builder, sig, args):
        acc_v, u_v, s_v = args = [builder.bitcast(a, _V16I32) for a in args]
        if cpu_features().get("avx512vnni"):
            fnty = ir.FunctionType(_V16I32, [_V16I32] * 3)
            name = "llvm.x86.avx512.vpdpbusd.512"
            return builder.call(cgutils.get_or_insert_function(builder.module, fnty, name), args)
        fnty = ir.FunctionType(_V8I32, [_V8I32] * 3)  # AVX-VNNI: two 256-bit halves
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.avx512.vpdpbusd.256")
        halves = [builder.call(fn, [builder.shuffle_vector(a, a, _mask(range(lo, lo + 8)))
                                    for a in (acc_v, u_v, s_v)]) for lo in (0, 8)]
        return builder.shuffle_vector(*halves, _mask(range(16)))

    return I32x16(acc, u, s), codegen


@intrinsic
def load_f32x16(typingctx, a, i):
    """a[i:i+16] of a float32 1-D array."""
    if not (_is_f32_1d(a) and isinstance(i, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        return builder.load(_f32_ptr(context, builder, sig, args, 0, 1, _V16F32), align=4)

    return F32x16(a, i), codegen


@intrinsic
def splat_f32x16(typingctx, s):
    if not isinstance(s, types.Float):
        return None

    def codegen(context, builder, sig, args):
        return _splat(builder, context.cast(builder, args[0], sig.args[0], types.float32), _V16F32)

    return F32x16(s), codegen


@intrinsic
def mul_f32x16(typingctx, a, b):
    if (a, b) != (F32x16, F32x16):
        return None
    return F32x16(a, b), lambda context, builder, sig, args: builder.fmul(*args)


@intrinsic
def fma_i32x16_store(typingctx, out, i, v, s):
    """out[i:i+16] += float(v) * s, s an F32x16."""
    if not (_is_f32_1d(out) and isinstance(i, types.Integer) and (v, s) == (I32x16, F32x16)):
        return None

    def codegen(context, builder, sig, args):
        ptr = _f32_ptr(context, builder, sig, args, 0, 1, _V16F32)
        products = builder.sitofp(args[2], _V16F32)
        total = builder.call(_fma(builder, _V16F32), [products, args[3], _ld(builder, ptr)])
        builder.store(total, ptr, align=4)
        return context.get_dummy_value()

    return types.none(out, i, v, s), codegen


# --- eight blocks' scales at once ----------------------------------------------------------------


@intrinsic
def load_f16x8_strided(typingctx, raw, off, stride):
    """The 8 f16 at byte off + i * stride (i < 8) of a byte array, as F32x8: one block field
    of 8 consecutive blocks, gathered by inserts and converted by one vcvtph2ps."""
    if not (_is_byte_array(raw) and isinstance(off, types.Integer)
            and isinstance(stride, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        base = _ptr(context, builder, sig, args)
        step = context.cast(builder, args[2], sig.args[2], types.int64)
        v = ir.Constant(ir.VectorType(ir.IntType(16), 8), None)
        for i in range(8):
            ptr = builder.gep(base, [builder.mul(step, ir.Constant(ir.IntType(64), i))])
            v = builder.insert_element(v, _load(builder, ptr, ir.IntType(16)),
                                       ir.Constant(ir.IntType(32), i))
        halves = builder.bitcast(v, ir.VectorType(ir.HalfType(), 8))
        return builder.fpext(halves, _V8F32)

    return F32x8(raw, off, stride), codegen


@intrinsic
def load_f32x8(typingctx, a, i):
    """a[i:i+8] of a float32 1-D array."""
    if not (_is_f32_1d(a) and isinstance(i, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        return _ld(builder, _f32_ptr(context, builder, sig, args, 0, 1, _V8F32))

    return F32x8(a, i), codegen


@intrinsic
def fma_f32x8(typingctx, a, b, c):
    """a * b + c, lane by lane."""
    if (a, b, c) != (F32x8, F32x8, F32x8):
        return None
    return F32x8(a, b, c), lambda context, builder, sig, args: builder.call(_fma(builder), args)


@intrinsic
def lane_f32x8(typingctx, v, i):
    """Lane i (a literal) of v in every lane."""
    if v != F32x8 or not isinstance(i, types.IntegerLiteral):
        return None
    lane = i.literal_value

    def codegen(context, builder, sig, args):
        return builder.shuffle_vector(args[0], args[0], _mask([lane] * 8))

    return F32x8(v, i), codegen


# --- float64 x 8 (one zmm, two ymm without AVX-512): attention's dot products and sums ----------
# Plain LLVM IR: every x86 target lowers it. The float32 operands are C-contiguous arrays of any
# rank, indexed by flat element offset (a KV cache row is a run of d floats).

F64x8 = Vec("f64", 8)
_ELEM["f64"] = ir.DoubleType()
_V8F64 = ir.VectorType(ir.DoubleType(), 8)


def _is_f32_c(t) -> bool:
    return isinstance(t, types.Array) and t.dtype == types.float32 and t.layout == "C"


def _is_f64_1d(t) -> bool:
    return isinstance(t, types.Array) and t.dtype == types.float64 and t.ndim == 1


def _elem_ptr(context, builder, ty, arr, off, off_ty, vec_ty):
    data = cgutils.create_struct_proxy(ty)(context, builder, value=arr).data
    i = context.cast(builder, off, off_ty, types.int64)
    return builder.bitcast(builder.gep(data, [i]), vec_ty.as_pointer())


def _fma64(builder):
    fnty = ir.FunctionType(_V8F64, [_V8F64] * 3)
    return cgutils.get_or_insert_function(builder.module, fnty, "llvm.fma.v8f64")


@intrinsic
def f64x8_zero(typingctx):
    return F64x8(), lambda context, builder, sig, args: ir.Constant(_V8F64, None)


@intrinsic
def load_f64x8(typingctx, a, i):
    """a[i:i+8] of a float64 1-D array."""
    if not (_is_f64_1d(a) and isinstance(i, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        p = _elem_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1], _V8F64)
        return builder.load(p, align=8)

    return F64x8(a, i), codegen


@intrinsic
def fma_f32_f64x8(typingctx, a, x, j, acc):
    """a * float64(x.flat[j:j+8]) + acc, x a C-contiguous float32 array."""
    if not (a == F64x8 and _is_f32_c(x) and isinstance(j, types.Integer) and acc == F64x8):
        return None

    def codegen(context, builder, sig, args):
        p = _elem_ptr(context, builder, sig.args[1], args[1], args[2], sig.args[2], _V8F32)
        xv = builder.fpext(builder.load(p, align=4), _V8F64)
        return builder.call(_fma64(builder), [args[0], xv, args[3]])

    return F64x8(a, x, j, acc), codegen


@intrinsic
def hsum_f64x8(typingctx, v):
    """The sum of v's lanes as a fixed tree: (0+4, 1+5, 2+6, 3+7), then pairs, then the two."""
    if v != F64x8:
        return None

    def codegen(context, builder, sig, args):
        x = args[0]
        for width in (4, 2, 1):
            upper = [width + i for i in range(width)] + [0] * (8 - width)
            hi = builder.shuffle_vector(x, x, _mask(upper))
            x = builder.fadd(x, hi)
        return builder.extract_element(x, ir.Constant(ir.IntType(32), 0))

    return types.float64(v), codegen


@intrinsic
def axpy4_f64x8(typingctx, y, i, p, x, j, step):
    """y[i:i+8] += p[0] x[j:] + p[1] x[j+step:] + p[2] x[j+2 step:] + p[3] x[j+3 step:] (each
    the 8 floats there, widened), four FMAs in that order; y float64 1-D, p a float64 4-tuple, x
    a C-contiguous float32 array indexed by flat offset."""
    ints = all(isinstance(t, types.Integer) for t in (i, j, step))
    four = isinstance(p, types.UniTuple) and p.count == 4 and p.dtype == types.float64
    if not (_is_f64_1d(y) and _is_f32_c(x) and ints and four):
        return None

    def codegen(context, builder, sig, args):
        yp = _elem_ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1], _V8F64)
        data = cgutils.create_struct_proxy(sig.args[3])(context, builder, value=args[3]).data
        j0 = context.cast(builder, args[4], sig.args[4], types.int64)
        st = context.cast(builder, args[5], sig.args[5], types.int64)
        fma = _fma64(builder)
        acc = builder.load(yp, align=8)
        for k in range(4):
            off = builder.add(j0, builder.mul(st, ir.Constant(ir.IntType(64), k)))
            xp = builder.bitcast(builder.gep(data, [off]), _V8F32.as_pointer())
            xv = builder.fpext(builder.load(xp, align=4), _V8F64)
            pk = builder.extract_value(args[2], k)
            acc = builder.call(fma, [_splat(builder, pk, _V8F64), xv, acc])
        builder.store(acc, yp, align=8)
        return context.get_dummy_value()

    return types.none(y, i, p, x, j, step), codegen
