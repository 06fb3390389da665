"""The layer's non-product GPU kernels (prima_ref.gpu.kernels) against the CPU ops they mirror
(prima_ref.model.ops): RMS norm (also as gemma3's per-head q/k norm), NEOX and NORM rope,
the f16 KV store, GQA attention with a sliding window and a softcap, SiLU and GELU gates.
On a CUDA device when there is one, else under numba's CUDA simulator (tests/gpu_env.py)."""

import gpu_env  # noqa: F401  (picks the simulator or the device before numba.cuda loads)
import numpy as np
import pytest
from numba import cuda  # noqa: E402

from prima_ref.gpu import kernels as K  # noqa: E402
from prima_ref.model import ops  # noqa: E402
from prima_ref.model.config import ROPE_NEOX, ROPE_NORM  # noqa: E402
from prima_ref.model.ops import _GELU_TABLE_F16  # noqa: E402

SIM = "simulator" in getattr(cuda.to_device, "__module__", "")
if not SIM and not cuda.is_available():
    pytest.skip("no CUDA device, and numba.cuda was loaded before the simulator was chosen",
                allow_module_level=True)

LUT = K.f16_table()


def nse(a, b):
    b = np.asarray(b, np.float64)
    return float(np.sum((np.asarray(a, np.float64) - b) ** 2) / np.sum(b**2))


def test_rms_norm_rows_and_per_head():
    rng = np.random.default_rng(1)
    for shape in ((3, 200), (12, 32)):  # rows of a hidden state; per-head rows (q/k norm)
        x = (rng.standard_normal(shape) * 3).astype(np.float32)
        w = rng.standard_normal(shape[1]).astype(np.float32)
        ref = np.empty_like(x)
        ops.rms_norm(x, w, np.float32(1e-6), ref)
        out = np.zeros_like(x)
        K.rms_norm_kernel[shape[0], K.NORM_THREADS](x, w, np.float32(1e-6), out)
        assert nse(out, ref) < 1e-12


@pytest.mark.parametrize("rope_type", [ROPE_NEOX, ROPE_NORM])
def test_rope(rope_type):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 2, 16)).astype(np.float32)
    pos = np.array([0, 7, 300], np.int64)
    ref = x.copy()
    ops.rope_inplace(ref, pos, 16, 10000.0, 1.0, rope_type)
    half = 8
    theta_scale = np.float32(10000.0 ** (-2.0 / 16))
    K.rope_kernel[1, 3 * 2 * half](x, pos, 16, theta_scale, np.float32(1.0),
                                   rope_type == ROPE_NEOX)
    assert nse(x, ref) < 1e-12


def test_kv_store_rounds_to_f16_and_clear():
    rng = np.random.default_rng(3)
    k = (rng.standard_normal((2, 2, 8)) * 100).astype(np.float32)
    v = rng.standard_normal((2, 2, 8)).astype(np.float32)
    kc, vc = np.zeros((6, 2, 8), np.float32), np.zeros((6, 2, 8), np.float32)
    pos = np.array([4, 1], np.int64)
    K.kv_store_kernel[1, 32](k, v, pos, kc, vc, LUT)
    np.testing.assert_array_equal(kc[pos], k.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(vc[pos], v.astype(np.float16).astype(np.float32))
    assert not kc[[0, 2, 3, 5]].any()
    K.kv_clear_kernel[1, 64](kc, vc, 1, 5)
    assert not kc.any() and not vc.any()


@pytest.mark.parametrize("window,softcap", [(0, 0.0), (3, 0.0), (0, 5.0)])
def test_attention_gqa_window_softcap(window, softcap):
    rng = np.random.default_rng(4)
    n_ctx, n_head, n_kv, d = 9, 4, 2, 16
    q = rng.standard_normal((3, n_head, d)).astype(np.float32)
    kc = rng.standard_normal((n_ctx, n_kv, d)).astype(np.float32)
    vc = rng.standard_normal((n_ctx, n_kv, d)).astype(np.float32)
    pos = np.array([2, 5, 8], np.int64)
    scale = np.float32(0.25)
    ref = np.empty_like(q)
    ops.attention(q, kc, vc, pos, window, scale, np.float32(softcap), ref)
    out = np.zeros_like(q)
    K.attention_kernel[(3, n_head), K.ATTN_THREADS](q, kc, vc, pos, window, float(scale),
                                                    float(softcap), out)
    assert nse(out, ref) < 1e-12


def test_gelu_and_silu_gates():
    rng = np.random.default_rng(5)
    g = np.concatenate([rng.standard_normal(90) * 4, [-12.0, -10.0, 10.0, 11.5, 0.0, 1e-9]])
    g = g.astype(np.float32).reshape(2, 48)
    up = rng.standard_normal(g.shape).astype(np.float32)
    ref = g.copy()
    ops.gelu_mul(ref, up)
    out = g.copy()
    K.gelu_mul_kernel[1, 96](out, up, _GELU_TABLE_F16.astype(np.float32), LUT)
    np.testing.assert_array_equal(out, ref)  # a table lookup: bit for bit
    ref = g.copy()
    ops.silu_mul(ref, up)
    out = g.copy()
    K.silu_mul_kernel[1, 96](out, up)
    assert nse(out, ref) < 1e-12
