"""The fused decode kernels (prima_ref.quants.fused) give bit for bit what the per-matrix
kernels and the element-wise ops give: the ring's golden test and the oracle tests rely on a
layer computing the same floats whichever path runs it."""

import numpy as np
import pytest
from gguf import quants as gq
from gguf.constants import GGMLQuantizationType as T

from test_quants import realistic_rows

from prima_ref.model import ops
from prima_ref.model.transformer import _GELU_TABLE_F32
from prima_ref.quants import fused, kernels, legacy, simd

EMPTY = np.zeros(0, np.float32)
EPS = np.float32(1e-5)


def quantized(qtype, n_rows, n_cols, seed):
    w = (np.random.default_rng(seed).standard_normal((n_rows, n_cols)) * 0.05).astype(np.float32)
    raw = np.ascontiguousarray(gq.quantize(w, qtype).view(np.uint8).reshape(n_rows, -1))
    raw.flags.writeable = False
    return raw


def normed(x, weight):
    out = np.empty((1, x.size), np.float32)
    ops.rms_norm(x[None, :], weight, EPS, out)
    return out[0]


@pytest.mark.parametrize("types", [(T.Q4_1, T.Q4_1, T.Q4_1), (T.Q5_0, T.Q5_0, T.Q8_0),
                                   (T.Q4_0, T.Q5_1, T.Q8_0)])
def test_matvec_group_equals_the_matrices_one_by_one(types):
    n_cols, rng = 320, np.random.default_rng(1)
    shapes = zip(types, (96, 33, 64), strict=True)
    raws = tuple(quantized(t, n, n_cols, i) for i, (t, n) in enumerate(shapes))
    kinds = np.array([int(t) for t in types], np.int64)
    x = rng.standard_normal(n_cols).astype(np.float32)
    norm_w = rng.standard_normal(n_cols).astype(np.float32)
    h = normed(x, norm_w)
    want = np.concatenate([kernels(t).matvec(r, h) for t, r in zip(types, raws, strict=True)])
    y = np.empty(want.size, np.float32)
    fused.matvec_group(raws, kinds, x, norm_w, EPS, EMPTY, y)
    assert np.array_equal(y, want)
    residual = rng.standard_normal(want.size).astype(np.float32)
    plain = np.concatenate([kernels(t).matvec(r, x) for t, r in zip(types, raws, strict=True)])
    fused.matvec_group(raws, kinds, x, EMPTY, EPS, residual, y)
    assert np.array_equal(y, residual + plain)


@pytest.mark.parametrize("act", [fused.ACT_SILU, fused.ACT_GELU])
def test_ffn_gate_up_equals_matvecs_then_activation(act):
    n_cols, n_ff, rng = 256, 160, np.random.default_rng(2)
    g_raw, u_raw = quantized(T.Q5_0, n_ff, n_cols, 3), quantized(T.Q4_1, n_ff, n_cols, 4)
    x = rng.standard_normal(n_cols).astype(np.float32) * 3
    norm_w = rng.standard_normal(n_cols).astype(np.float32) * 4  # gate values past +-10 too
    h = normed(x, norm_w)
    gate = kernels(T.Q5_0).matvec(g_raw, h)[None, :]
    up = kernels(T.Q4_1).matvec(u_raw, h)[None, :]
    (ops.gelu_mul_ref if act == fused.ACT_GELU else ops.silu_mul)(gate, up)
    out = np.empty(n_ff, np.float32)
    fused.ffn_gate_up(g_raw, int(T.Q5_0), u_raw, int(T.Q4_1), x, norm_w, EPS, act,
                      _GELU_TABLE_F32, out)
    assert np.array_equal(out, gate[0])


def test_f16_bits_equal_numpy_on_every_magnitude():
    from numba import njit

    @njit
    def bits_all(v, out):
        for i in range(v.size):
            out[i] = simd.f16_bits(v[i])

    rng = np.random.default_rng(5)
    v = np.concatenate([rng.standard_normal(20000) * 10.0 ** rng.integers(-9, 6, 20000),
                        [0.0, -0.0, 65504.0, 65519.0, 65520.0, 1e9, -1e9, 2.0**-24, 2.0**-25,
                         3 * 2.0**-26, 6.1e-5, np.inf, -np.inf]]).astype(np.float32)
    out = np.empty(v.size, np.uint16)
    bits_all(v, out)
    with np.errstate(over="ignore"):
        assert np.array_equal(out, v.astype(np.float16).view(np.uint16))


def test_gelu_mul_equals_its_numpy_reference():
    rng = np.random.default_rng(6)
    gate = (rng.standard_normal((3, 700)) * 6).astype(np.float32)
    gate[0, :4] = [-10.0, 10.0, 0.0, 1e-9]
    up = rng.standard_normal((3, 700)).astype(np.float32)
    want = gate.copy()
    ops.gelu_mul_ref(want, up)
    ops.gelu_mul(gate, up)
    assert np.array_equal(gate, want)


@pytest.mark.parametrize("n_tokens", [2, 9])
def test_shared_prefill_activations_give_each_matmul_its_own_floats(n_tokens):
    xs = np.random.default_rng(7).standard_normal((n_tokens, 256)).astype(np.float32)
    act = legacy.prepare_activations(xs)
    for i, qtype in enumerate((T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1)):
        raw = quantized(qtype, 40, 256, 10 + i)
        ys = legacy.matmul_prepared(qtype, raw, act)
        assert np.array_equal(ys, kernels(qtype).matmul(raw, xs))
        dense = kernels(qtype).dequantize(raw).astype(np.float64)
        ref = xs.astype(np.float64) @ dense.T
        assert np.sum((ys - ref) ** 2) / np.sum(ref**2) <= 5e-4


@pytest.mark.skipif(not fused.KQ_FUSABLE_KINDS, reason="K-quant fused decode needs AVX512-VNNI")
@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q5_K, T.Q6_K])
def test_kq_matvec_equals_matvec_then_post_norm_and_residual(qtype):
    n_rows, n_cols, rng = 96, 512, np.random.default_rng(5)
    raw = realistic_rows(qtype, rng, n_rows, n_cols)
    raw.flags.writeable = False
    x = rng.standard_normal(n_cols).astype(np.float32)
    norm_w, post_w = (rng.standard_normal(n).astype(np.float32) for n in (n_cols, n_rows))
    residual = rng.standard_normal(n_rows).astype(np.float32)
    y = np.empty(n_rows, np.float32)
    fused.kq_matvec(raw, int(qtype), x, EMPTY, EPS, EMPTY, EMPTY, y)
    assert np.array_equal(y, kernels(qtype).matvec(raw, x))
    fused.kq_matvec(raw, int(qtype), x, norm_w, EPS, EMPTY, EMPTY, y)
    assert np.array_equal(y, kernels(qtype).matvec(raw, normed(x, norm_w)))
    fused.kq_matvec(raw, int(qtype), x, EMPTY, EPS, post_w, residual, y)
    assert np.array_equal(y, residual + normed(kernels(qtype).matvec(raw, x), post_w))


def _plain_decode(tr):
    """Turn the fused decode steps off: every product and op runs on its own."""
    for layer in tr.layers.values():
        layer.decode.qkv = layer.decode.wo = layer.decode.down = None
        layer.decode.ffn = layer.decode.wo_kq = layer.decode.down_kq = False
    tr._head = None


@pytest.mark.parametrize("fixture", ["smollm2_q8_0_path",
                                     pytest.param("gemma3_path", marks=pytest.mark.slow)])
def test_fused_decode_steps_give_the_plain_path_logits_bit_for_bit(fixture, request):
    from prima_ref.gguf_file import GGUFModel
    from prima_ref.model.transformer import Transformer

    model = GGUFModel.open(request.getfixturevalue(fixture))
    fused_tr, plain_tr = Transformer(model, 64), Transformer(model, 64)
    _plain_decode(plain_tr)
    prompt = [2, 651, 3303, 576, 1105, 6343, 1185]
    a, b = fused_tr.forward(prompt, 0), plain_tr.forward(prompt, 0)
    for i in range(6):  # decode steps, each token fed to both
        tok = int(np.argmax(a[-1]))
        a, b = fused_tr.forward([tok], len(prompt) + i), plain_tr.forward([tok], len(prompt) + i)
        assert np.array_equal(a, b), f"decode step {i}"
