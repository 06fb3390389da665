"""GPU kernels (prima_ref.gpu) against the CPU kernels and float64 references.

With a CUDA device these run on it; without one they run under numba's CUDA simulator
(tests/gpu_env.py sets NUMBA_ENABLE_CUDASIM=1 before numba.cuda loads), small shapes only:
the simulator runs every thread in Python, so it checks indexing and arithmetic, not speed.
"""


import gpu_env  # noqa: F401  (picks the simulator or the device before numba.cuda loads)
import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType as T  # noqa: E402
from numba import cuda  # noqa: E402

from prima_ref.quants import kernels  # noqa: E402
from prima_ref.quants.simd import q8_k_values, quantize_x_q8  # noqa: E402

SIM = "simulator" in getattr(cuda.to_device, "__module__", "")  # numba.cuda was loaded as it
if not SIM and not cuda.is_available():
    pytest.skip("no CUDA device, and numba.cuda was loaded before NUMBA_ENABLE_CUDASIM=1 took "
                "effect", allow_module_level=True)

from prima_ref.gpu import kernels as K  # noqa: E402
from prima_ref.gpu.layer import Activation, GpuWeight, workspace  # noqa: E402
from tests.test_quants import nse, realistic_rows  # noqa: E402

QTYPES = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q6_K, T.F32, T.F16]


def _gpu_products(qtype, raw, xs, table=None):
    ws = workspace()
    w = GpuWeight("w", int(qtype), raw)
    act = Activation(ws, "t", cuda.to_device(xs))
    return w(act, "y", table).copy_to_host()


@pytest.mark.parametrize("qtype", [T.Q4_1, T.Q5_0, T.Q8_0, T.Q4_K, T.Q6_K], ids=lambda t: t.name)
def test_item_kernels_agree_with_coalesced(qtype):
    """The first product kernels (a thread per block, PRIMA_GPU_PRODUCTS=item) stay correct."""
    rng = np.random.default_rng(int(qtype))
    n_cols = 512 if qtype in (T.Q4_K, T.Q6_K) else 64
    raw = realistic_rows(qtype, rng, 2, n_cols)
    xs = rng.standard_normal((5, n_cols)).astype(np.float32)
    a, b = _gpu_products(qtype, raw, xs, K.PRODUCTS_BY_ITEM), _gpu_products(qtype, raw, xs)
    assert nse(a, b) <= 1e-10


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("n_tok", [1, 5])
def test_products_match_cpu_kernels(qtype, n_tok):
    rng = np.random.default_rng(int(qtype) * 10 + n_tok)
    n_rows = 3
    n_cols = 1024 if qtype in (T.Q4_K, T.Q6_K) else 64
    raw = realistic_rows(qtype, rng, n_rows, n_cols)
    xs = rng.standard_normal((n_tok, n_cols)).astype(np.float32)
    ys = _gpu_products(qtype, raw, xs)
    kern = kernels(qtype)
    cpu = kern.matmul(raw, xs)
    w64 = kern.dequantize(raw).astype(np.float64)
    ref = xs.astype(np.float64) @ w64.T
    bound = 5e-4 if kern.x_quantized else 1e-6
    assert nse(ys, ref) <= bound
    # same integers as the CPU: only the float summation order differs
    assert nse(ys, cpu) <= 1e-10
    if qtype in (T.Q4_K, T.Q6_K):
        xq = q8_k_values(xs, 256).astype(np.float64)
        assert nse(ys, xq @ w64.T) <= 1e-10


def test_q8_activations_are_the_cpus():
    rng = np.random.default_rng(7)
    xs = (rng.standard_normal((2, 64)) * rng.uniform(0.01, 100, (2, 1))).astype(np.float32)
    xs[1, 3] = 0.5 * xs[1].max() / 127 * 2 + 0.0  # stress rounding points
    ws = workspace()
    qx, dx, dsx = (a.copy_to_host() for a in Activation(ws, "a", cuda.to_device(xs)).q8())
    qx_c, dx_c, sx_c, dsx_c = quantize_x_q8(xs)
    np.testing.assert_array_equal(qx, qx_c)
    np.testing.assert_array_equal(dx.view(np.uint32), dx_c.view(np.uint32))
    np.testing.assert_array_equal(dsx.view(np.uint32), dsx_c.view(np.uint32))


def test_f16_rounding_is_exact():
    rng = np.random.default_rng(3)
    v = np.concatenate([rng.standard_normal(200) * 10.0 ** rng.integers(-9, 5, 200),
                        [0.0, 65504.0, 65519.0, 1e-8, 6.1e-5, -3.0e-7, 2049.0, 2051.0]])
    v = v.astype(np.float32)

    @cuda.jit
    def bits(x, out):
        i = cuda.grid(1)
        if i < x.size:
            out[i] = K.f16_bits(x[i])

    out = np.zeros(v.size, np.int32)
    bits[1 + v.size // 64, 64](v, out)
    np.testing.assert_array_equal(out.astype(np.uint16), v.astype(np.float16).view(np.uint16))
