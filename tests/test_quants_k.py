"""K-quant kernels beyond the shared contract: the int8 fast path is exact given its own x
quantization, the float fallback is exact given the same Q8_K values, bad input fails with a
clear error."""

import numpy as np
import pytest
from gguf import quants as gq
from gguf.constants import GGMLQuantizationType as T
from test_quants import nse, random_rows, realistic_rows

from prima_ref.quants import k_quants as kq
from prima_ref.quants import simd
from prima_ref.quants.layouts import LAYOUTS, QK_K

K_TYPES = [T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]
needs_vnni = pytest.mark.skipif(not kq.has_avx512_vnni(), reason="CPU lacks AVX512-VNNI/BW")


def quantized_x(qtype, xs):
    """The kernel's own Q8_K view of xs, back in weight order, as float64; checks its sums."""
    n_tokens, n_cols = xs.shape
    n_blocks = n_cols // QK_K
    slots = kq._slots(qtype)
    sum_lane, n_lanes, factor = kq._x_sums(qtype)
    xq = np.empty((n_tokens, n_cols), np.int8)
    xd = np.empty((n_tokens, n_blocks), np.float32)
    xsum = np.empty((n_tokens, n_blocks, n_lanes), np.int32)
    kq._quantize_x_q8k(xs, slots, sum_lane, factor, xq, xd, xsum)
    by_slot = xq.reshape(n_tokens, n_blocks, QK_K).astype(np.int64)
    expected = np.zeros((n_tokens, n_blocks, n_lanes), np.int64)
    np.add.at(expected, (slice(None), slice(None), sum_lane), factor * by_slot)
    assert (xsum == expected).all()
    natural = np.empty_like(by_slot)
    natural[:, :, slots] = by_slot
    return natural.astype(np.float64) * xd[..., None]


@needs_vnni
@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("n_tokens", [1, 3, 4, 9])  # 4 = one token group, 9 = 2 groups + 1
def test_int8_products_exact_for_their_quantized_x(qtype, n_tokens):
    """Any bit pattern: every lane, scale, min and high bit lands on its own weight."""
    rng = np.random.default_rng(int(qtype) * 100 + n_tokens)
    raw = random_rows(qtype, rng, 7, 3)
    xs = rng.standard_normal((n_tokens, 3 * QK_K)).astype(np.float32)
    w64 = gq.dequantize(raw, qtype).reshape(7, -1).astype(np.float64)
    ref = quantized_x(qtype, xs).reshape(n_tokens, -1) @ w64.T
    ys = kq.KERNELS[qtype].matmul(raw, xs)
    assert ys.shape == (n_tokens, 7)
    assert nse(ys, ref) <= 1e-11
    one = kq.KERNELS[qtype].matvec(raw, xs[-1])
    if n_tokens <= kq.TILED_MIN_TOKENS or qtype not in (T.Q4_K, T.Q5_K, T.Q6_K):
        assert np.array_equal(one, ys[-1])
    else:  # prefill's register tiles (quants/tiled.py) sum in another float32 order
        assert nse(ys[-1], one) <= 1e-11


@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda t: t.name)
def test_float_fallback_products_exact_for_llama_cpps_q8_k_values(qtype):
    """The no-VNNI path dots float weights with x's Q8_K values d * q (llama.cpp's view of x),
    so it agrees with the float64 product on those values and with the int8 path."""
    rng = np.random.default_rng(int(qtype))
    raw = realistic_rows(qtype, rng, 24, 2 * QK_K)
    xs = rng.standard_normal((5, 2 * QK_K)).astype(np.float32)
    w64 = gq.dequantize(raw, qtype).reshape(24, -1).astype(np.float64)
    ys = kq._float_products(qtype)(raw, xs)
    assert nse(ys, simd.q8_k_values(xs, QK_K).astype(np.float64) @ w64.T) <= 1e-11
    assert nse(ys, xs.astype(np.float64) @ w64.T) <= 5e-4
    if kq.has_avx512_vnni():
        assert nse(ys, kq.KERNELS[qtype].matmul(raw, xs)) <= 1e-11


@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda t: t.name)
def test_zero_x_gives_zero(qtype):
    raw = random_rows(qtype, np.random.default_rng(1), 5, 2)
    assert not kq.KERNELS[qtype].matvec(raw, np.zeros(2 * QK_K, np.float32)).any()


@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda t: t.name)
def test_bad_shapes_fail_with_type_and_sizes(qtype):
    k = kq.KERNELS[qtype]
    ts = LAYOUTS[qtype].type_size
    with pytest.raises(kq.KQuantInputError, match=f"{qtype.name}.*multiple of {ts} bytes"):
        k.dequantize(np.zeros((2, ts + 1), np.uint8))
    with pytest.raises(kq.KQuantInputError, match="uint8"):
        k.dequantize(np.zeros((2, ts), np.int16))
    with pytest.raises(kq.KQuantInputError, match=f"n_cols={QK_K}"):
        k.matvec(np.zeros((2, ts), np.uint8), np.zeros(QK_K + 1, np.float32))
    with pytest.raises(kq.KQuantInputError, match="n_tokens"):
        k.matmul(np.zeros((2, ts), np.uint8), np.zeros(QK_K, np.float32))
