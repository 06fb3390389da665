"""Legacy quants beyond the shared contract: the SIMD helpers, the portable (no-VNNI) path, and
that a CPU without VNNI (or without F16C) never gets an instruction it cannot run."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from gguf import quants as gq
from gguf.constants import GGMLQuantizationType as T

from prima_ref.quants import legacy, simd
from prima_ref.quants.layouts import QK_LEGACY

LEGACY = (T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1)
needs_vnni = pytest.mark.skipif(not simd.has_vnni(), reason="this CPU has no VNNI")


def nse(y, y_ref):
    y_ref = np.asarray(y_ref, np.float64)
    return float(np.sum((np.asarray(y, np.float64) - y_ref) ** 2) / np.sum(y_ref**2))


def quantized(qtype, n_rows, n_cols, seed):
    w = (np.random.default_rng(seed).standard_normal((n_rows, n_cols)) * 0.05).astype(np.float32)
    return np.ascontiguousarray(gq.quantize(w, qtype).view(np.uint8).reshape(n_rows, -1))


def test_quantize_x_q8_reconstructs_x_within_half_a_step():
    x = np.random.default_rng(0).standard_normal((3, 256)).astype(np.float32) * 4
    x[1, :32] = 0  # an all-zero block gets scale 0, not a division by zero
    qx, dx, sx, dsx = simd.quantize_x_q8(x)
    assert qx.dtype == np.int8 and qx.shape == (3, 256)
    assert dx.shape == sx.shape == dsx.shape == (3, 256 // QK_LEGACY)
    step = np.repeat(dx, QK_LEGACY, axis=1)
    # q is rounded with the exact step amax/127; dx is that step rounded to f16 (2**-11
    # relative), which moves q * dx by at most 127 * 2**-11 steps
    assert np.all(np.abs(qx * step - x) <= step * (0.5 + 127 * 2.0**-11) * (1 + 1e-6))
    assert np.array_equal(sx, qx.reshape(3, -1, QK_LEGACY).sum(axis=2, dtype=np.int32))
    assert np.allclose(dsx, dx * sx, rtol=2**-10, atol=0)  # s = f16(d * sum q)
    assert np.abs(qx).max() == 127 and dx[1, 0] == 0 and not qx[1, :32].any()
    assert np.array_equal(dx, dx.astype(np.float16).astype(np.float32))


@pytest.mark.parametrize("rounder", ["_round_f16_portable", "_round_f16_f16c"])
def test_round_f16_equals_numpy_on_every_float32_exponent(rounder):
    """The f16 rounding of d and s (GGML_FP32_TO_FP16: nearest, ties to even), on values of
    every magnitude, exact ties and the overflow and subnormal edges."""
    if rounder == "_round_f16_f16c" and not simd.has_f16c():
        pytest.skip("this CPU has no F16C")
    from numba import njit

    fn = getattr(simd, rounder)

    @njit
    def round_all(v, out):
        for i in range(v.size):
            out[i] = fn(v[i])

    rng = np.random.default_rng(5)
    bits = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32)
    halves = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)
    ties = (halves.view(np.uint32) | np.uint32(0x1000)).view(np.float32)  # mantissa ...1000
    v = np.concatenate([bits.view(np.float32), halves, ties,
                        np.float32([65504, 65519.99, 65520, 2.0**-25, 2.0**-24, 3 * 2.0**-26])])
    out = np.empty_like(v)
    round_all(v, out)
    with np.errstate(over="ignore"):
        ref = v.astype(np.float16).astype(np.float32)
    nan = np.isnan(ref)
    assert np.array_equal(out[~nan].view(np.uint32), ref[~nan].view(np.uint32))
    assert np.isnan(out[nan]).all()


def test_quantize_x_q8_rejects_partial_block():
    with pytest.raises(ValueError, match="multiple of 32"):
        simd.quantize_x_q8(np.zeros(40, np.float32))


@pytest.mark.parametrize("loader", ["_load_f16_portable", "_load_f16_f16c"])
def test_load_f16_bit_equal_to_numpy_for_every_pattern(loader):
    if loader == "_load_f16_f16c" and not simd.has_f16c():
        pytest.skip("this CPU has no F16C")
    from numba import njit

    load = getattr(simd, loader)

    @njit
    def convert_all(raw, out):
        for i in range(out.shape[0]):
            out[i] = load(raw, 2 * i)

    bits = np.arange(1 << 16, dtype=np.uint16)
    out = np.empty(bits.size, np.float32)
    convert_all(bits.view(np.uint8), out)
    ref = bits.view(np.float16).astype(np.float32)
    nan = np.isnan(ref)
    assert np.array_equal(out[~nan].view(np.uint32), ref[~nan].view(np.uint32))
    assert np.isnan(out[nan]).all()


@pytest.mark.parametrize("qtype", LEGACY, ids=lambda t: t.name)
def test_portable_path_matches_float64_and_dequantize(qtype):
    k = legacy.make_kernels(qtype, vnni=False)
    raw = quantized(qtype, 40, 320, seed=int(qtype))  # 10 blocks: odd-length tails covered
    w64 = gq.dequantize(raw, qtype).reshape(40, -1).astype(np.float64)
    assert np.array_equal(k.dequantize(raw), legacy.KERNELS[qtype].dequantize(raw))
    xs = np.random.default_rng(1).standard_normal((9, 320)).astype(np.float32)
    assert nse(k.matvec(raw, xs[0]), w64 @ xs[0]) <= 5e-4
    assert nse(k.matmul(raw, xs), xs @ w64.T) <= 5e-4


@needs_vnni
@pytest.mark.parametrize("qtype", LEGACY, ids=lambda t: t.name)
def test_vnni_and_portable_paths_compute_the_same_sums(qtype):
    # Same integers, different float summation order: agreement to float32 rounding.
    raw = quantized(qtype, 33, 416, seed=7)  # 13 blocks per row, 33 rows: odd everywhere
    xs = np.random.default_rng(2).standard_normal((11, 416)).astype(np.float32)
    fast, slow = legacy.make_kernels(qtype, vnni=True), legacy.make_kernels(qtype, vnni=False)
    assert nse(fast.matvec(raw, xs[3]), slow.matvec(raw, xs[3])) < 1e-10
    assert nse(fast.matmul(raw, xs), slow.matmul(raw, xs)) < 1e-10
    assert nse(fast.matmul(raw, xs[3:4])[0], fast.matvec(raw, xs[3])) < 1e-10


def test_bad_input_raises_clear_error():
    k = legacy.KERNELS[T.Q4_0]
    raw = quantized(T.Q4_0, 4, 64, seed=0)
    with pytest.raises(legacy.LegacyKernelInputError, match="n_cols=64"):
        k.matvec(raw, np.zeros(96, np.float32))
    with pytest.raises(legacy.LegacyKernelInputError, match="18-byte blocks"):
        k.dequantize(raw[:, :20].copy())
    with pytest.raises(ValueError, match="uint8"):
        k.matvec(raw.view(np.int8), np.zeros(64, np.float32))


# Build for another CPU in a fresh process: an instruction that CPU lacks (VNNI, AVX-512, F16C)
# in any kernel makes LLVM fail to compile it ("Cannot select") instead of running.
AVX2 = ("+64bit,+avx,+avx2,+bmi,+bmi2,+cmov,+cx16,+f16c,+fma,+lzcnt,+movbe,+popcnt,+sse,+sse2,"
        "+sse3,+sse4.1,+sse4.2,+ssse3,+xsave")
OTHER_CPUS = {  # name: (features, has_vnni, has_f16c)
    "haswell": (AVX2, False, True),
    "x86-64": ("+64bit,+cmov,+cx8,+fxsr,+mmx,+sse,+sse2", False, False),
    # AVX-VNNI without AVX-512: the 512-bit matmul dot must split into 256-bit halves
    "alderlake": (AVX2 + ",+avxvnni", True, True),
}

CHILD = textwrap.dedent("""
    import prima_ref, numpy as np
    from gguf import quants as gq
    from gguf.constants import GGMLQuantizationType as T
    from prima_ref.quants import legacy, simd

    def llama_dot(qtype, raw, x):  # ggml_vec_dot_q4_0_q8_0 / q5_1_q8_1 in float64
        kind, n = int(qtype), raw.shape[0]
        blocks = raw.reshape(-1, legacy.BLOCK_BYTES[kind])
        u = legacy._unsigned_quants_ref(kind, blocks).astype(np.int64) - legacy.K_OFFSET[kind]
        d = legacy._f16(blocks, 0).astype(np.float64).reshape(n, -1)
        qx, dx, sx, dsx = simd.quantize_x_q8(x)
        y = (d * dx * (u.reshape(n, -1, 32) * qx.reshape(-1, 32)).sum(2)).sum(1)
        if legacy.HAS_MIN[kind]:
            y += (legacy._f16(blocks, 2).astype(np.float64).reshape(n, -1) * dsx).sum(1)
        return y

    for qtype in (T.Q4_0, T.Q5_1):
        w = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
        raw = np.ascontiguousarray(gq.quantize(w, qtype).view(np.uint8).reshape(8, -1))
        ref = gq.dequantize(raw, qtype).reshape(8, -1)
        k = legacy.KERNELS[qtype]
        assert np.array_equal(k.dequantize(raw), ref)
        x = np.ones((2, 64), np.float32)
        x[1] = np.random.default_rng(1).standard_normal(64)
        want = np.stack([llama_dot(qtype, raw, xt) for xt in x])
        tol = 1e-5 * np.abs(want).max()  # float32 sums; the offset -k*sx is summed apart
        assert np.allclose(k.matvec(raw, x[0]), want[0], rtol=0, atol=tol)
        assert np.allclose(k.matmul(raw, x), want, rtol=0, atol=tol)
        assert np.array_equal(simd.quantize_x_q8(x[:1])[1][0], np.float16([1 / 127] * 2))  # f16 d
    print("vnni", simd.has_vnni(), "f16c", simd.has_f16c())
""")


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.uname().machine != "x86_64",
                    reason="builds for older x86-64 CPUs")
@pytest.mark.parametrize("cpu", OTHER_CPUS)
def test_kernels_build_and_run_for_cpus_without_avx512_vnni(cpu, tmp_path):
    if cpu == "alderlake" and not simd.cpu_features().get("avxvnni"):
        pytest.skip("running AVX-VNNI code needs a CPU that has it")
    features, vnni, f16c = OTHER_CPUS[cpu]
    env = dict(os.environ, NUMBA_CPU_NAME=cpu, NUMBA_CPU_FEATURES=features,
               NUMBA_CACHE_DIR=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"vnni {vnni} f16c {f16c}" in done.stdout
