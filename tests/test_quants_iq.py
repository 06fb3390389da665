"""Float and IQ kernels beyond the shared contract: every f16/bf16 bit pattern, IQ blocks built
by hand against ggml's C formulas, odd row lengths, the vector/portable paths, bad input."""

import numpy as np
import pytest
from gguf import quants as gq
from gguf.constants import GGMLQuantizationType as T
from numba import njit
from test_quants import nse

from prima_ref.quants import float_types as ft
from prima_ref.quants import iq_quants as iq
from prima_ref.quants.layouts import LAYOUTS

ALL_WORDS = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)  # (65536,) every 16-bit word


def bits(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, np.float32).view(np.uint32)


# --- float types ------------------------------------------------------------------------------


def test_f16_dequantize_exact_for_every_bit_pattern_including_nan_payloads():
    raw = ALL_WORDS.view(np.uint8).reshape(256, -1)
    ours = ft.KERNELS[T.F16].dequantize(raw)
    np.testing.assert_array_equal(bits(ours), bits(gq.dequantize(raw, T.F16)))


@njit
def _convert_all(words, out_f16c, out_portable):
    for i in range(words.size):
        out_f16c[i] = ft._f16_bits_to_f32_f16c(words[i])
        out_portable[i] = ft._f16_bits_to_f32_portable(words[i])


def test_f16_conversions_hardware_and_portable_agree_with_numpy():
    ref = ALL_WORDS.view(np.float16).astype(np.float32)
    hw, portable = np.empty_like(ref), np.empty_like(ref)
    _convert_all(ALL_WORDS, hw, portable)
    np.testing.assert_array_equal(bits(portable), bits(ref))  # NaN payloads too
    finite = np.isfinite(ref)
    np.testing.assert_array_equal(bits(hw)[finite], bits(ref)[finite])
    assert np.isnan(hw[~np.isfinite(ref) & np.isnan(ref)]).all()
    assert bits(hw)[ALL_WORDS == 0x8000][0] == 0x80000000  # -0.0 keeps its sign


def test_bf16_dequantize_is_the_top_half_of_float32_for_every_bit_pattern():
    raw = ALL_WORDS.view(np.uint8).reshape(64, -1)
    ours = ft.KERNELS[T.BF16].dequantize(raw)
    np.testing.assert_array_equal(bits(ours).reshape(-1), ALL_WORDS.astype(np.uint32) << 16)


@pytest.mark.parametrize("qtype", [T.F32, T.F16, T.BF16], ids=lambda t: t.name)
@pytest.mark.parametrize("n_cols", [1, 31, 33, 577])
def test_float_products_handle_rows_not_a_multiple_of_the_vector_width(qtype, n_cols):
    rng = np.random.default_rng(n_cols)
    w = rng.standard_normal((7, n_cols)).astype(np.float32)
    if qtype == T.F16:
        w = w.astype(np.float16)
    elif qtype == T.BF16:
        w = (w.view(np.uint32) >> 16).astype(np.uint16)
    raw = w.view(np.uint8)
    k = ft.KERNELS[qtype]
    w64 = k.dequantize(raw).astype(np.float64)
    xs = rng.standard_normal((3, n_cols)).astype(np.float32)
    x64 = ft._llama_x(qtype, xs).astype(np.float64)  # F16/BF16: x rounded as llama.cpp does
    np.testing.assert_allclose(k.matvec(raw, xs[0]), w64 @ x64[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(k.matmul(raw, xs), x64 @ w64.T, rtol=1e-5, atol=1e-5)


def test_matmul_chunks_longer_rows_than_its_buffer():
    rng = np.random.default_rng(7)
    n_cols = 3 * ft.MATMUL_CHUNK + 5
    raw = rng.standard_normal((4, n_cols)).astype(np.float16).view(np.uint8)
    xs = rng.standard_normal((2, n_cols)).astype(np.float32)
    w64 = ft.KERNELS[T.F16].dequantize(raw).astype(np.float64)
    x64 = xs.astype(np.float16).astype(np.float64)  # F16 weights meet x rounded to f16
    np.testing.assert_allclose(ft.KERNELS[T.F16].matmul(raw, xs), x64 @ w64.T, rtol=1e-5)


def test_real_f32_tensors_match_gguf(smollm2_path, gemma3_path):
    from gguf import GGUFReader

    n_seen = 0
    for path in (smollm2_path, gemma3_path):
        for t in GGUFReader(path).tensors:
            if t.tensor_type != T.F32:
                continue
            raw = np.asarray(t.data).view(np.uint8).reshape(1, -1)
            assert (bits(ft.KERNELS[T.F32].dequantize(raw)) == bits(t.data.reshape(1, -1))).all()
            x = np.ones(raw.shape[1] // 4, np.float32)
            np.testing.assert_allclose(ft.KERNELS[T.F32].matvec(raw, x)[0],
                                       t.data.astype(np.float64).sum(), rtol=1e-5)
            n_seen += 1
    assert n_seen > 10


# --- IQ types: hand-built blocks against ggml-quants.c's formulas ------------------------------


def _grid_row(idx: int) -> np.ndarray:
    return iq.GRID.reshape(-1, iq.GROUP)[idx].astype(np.float32)  # (8,)


def test_iq4_nl_block_by_hand():
    d = np.float16(0.5)
    qs = np.arange(16, dtype=np.uint8) | (np.arange(16, dtype=np.uint8)[::-1] << 4)
    raw = np.concatenate([np.frombuffer(d.tobytes(), np.uint8), qs]).reshape(1, -1)
    want = np.float32(0.5) * np.array(
        [iq.KVALUES[j] for j in range(16)] + [iq.KVALUES[15 - j] for j in range(16)], np.float32
    )
    np.testing.assert_array_equal(iq.KERNELS[T.IQ4_NL].dequantize(raw)[0], want)


def test_iq1_s_block_by_hand():
    rng = np.random.default_rng(1)
    block = rng.integers(0, 256, LAYOUTS[T.IQ1_S].type_size, dtype=np.uint8)
    block[:2] = np.frombuffer(np.float16(0.25).tobytes(), np.uint8)
    want = []
    qh = block[iq.S_QH :].copy().view(np.uint16)
    for ib in range(8):  # dequantize_row_iq1_s
        dl = np.float32(0.25) * np.float32(2 * ((qh[ib] >> 12) & 7) + 1)
        delta = -0.125 if qh[ib] & 0x8000 else 0.125
        for l in range(4):
            idx = int(block[iq.S_QS + 4 * ib + l]) | ((int(qh[ib]) >> (3 * l)) & 7) << 8
            want.append(dl * (_grid_row(idx) + np.float32(delta)))
    ours = iq.KERNELS[T.IQ1_S].dequantize(block.reshape(1, -1))[0]
    np.testing.assert_array_equal(ours, np.concatenate(want))


def test_iq1_m_block_by_hand():
    rng = np.random.default_rng(2)
    block = rng.integers(0, 256, LAYOUTS[T.IQ1_M].type_size, dtype=np.uint8)
    sc = block[iq.M_SC :].copy().view(np.uint16)
    d_bits = np.uint16(np.float16(0.03125).view(np.uint16))
    sc = (sc & 0x0FFF) | np.array([(d_bits >> s) & 0xF for s in (0, 4, 8, 12)], np.uint16) << 12
    block[iq.M_SC :] = sc.view(np.uint8)
    qs, qh = block[: iq.M_QH], block[iq.M_QH : iq.M_SC]
    want = []
    for ib in range(8):  # dequantize_row_iq1_m: 2 scales, 4 groups of 8 per 32 weights
        s = sc[ib // 2] >> (6 * (ib % 2))
        dl = [np.float32(0.03125) * np.float32(2 * ((s >> (3 * h)) & 7) + 1) for h in (0, 1)]
        for l in range(4):
            nib = (int(qh[2 * ib + l // 2]) >> (4 * (l % 2))) & 0xF
            idx = int(qs[4 * ib + l]) | (nib & 7) << 8
            delta = np.float32(-0.125 if nib & 8 else 0.125)
            want.append(dl[l // 2] * (_grid_row(idx) + delta))
    ours = iq.KERNELS[T.IQ1_M].dequantize(block.reshape(1, -1))[0]
    np.testing.assert_array_equal(ours, np.concatenate(want))


@pytest.mark.parametrize("qtype", [T.IQ4_NL, T.IQ1_S, T.IQ1_M], ids=lambda t: t.name)
@pytest.mark.parametrize("n_tokens", [1, 3, 70])
def test_iq_products_with_small_scales_against_float64(qtype, n_tokens):
    rng = np.random.default_rng(int(qtype) * 100 + n_tokens)
    lay = LAYOUTS[qtype]
    n_blocks = 3 * max(1, 512 // lay.block_size) + 1  # crosses matmul chunks, ragged end
    raw = rng.integers(0, 256, (9, n_blocks * lay.type_size), dtype=np.uint8)
    blocks = raw.reshape(-1, lay.type_size)
    if qtype == T.IQ1_M:
        blocks[:, 49:56:2] &= np.uint8(0x0F)  # d = 2**-7 in the scales' top nibbles
        blocks[:, 55] |= np.uint8(0x20)
    else:
        blocks[:, :2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    xs = rng.standard_normal((n_tokens, n_blocks * lay.block_size)).astype(np.float32)
    w64 = gq.dequantize(raw, qtype).astype(np.float64).reshape(raw.shape[0], -1)
    k = iq.KERNELS[qtype]
    # the products see x as llama.cpp's activation quantization leaves it (Q8_0 / Q8_K)
    ref = iq._llama_x(qtype, xs).astype(np.float64) @ w64.T
    np.testing.assert_allclose(k.matmul(raw, xs), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    assert nse(k.matmul(raw, xs), xs.astype(np.float64) @ w64.T) <= 5e-4
    np.testing.assert_allclose(k.matvec(raw, xs[0]), ref[0], rtol=1e-4,
                               atol=1e-4 * np.abs(ref).max())


@pytest.mark.skipif(not iq.HAS_AVX2, reason="vpshufb path needs AVX2")
def test_iq4_nl_vector_and_portable_rows_agree():
    rng = np.random.default_rng(3)
    raw = rng.integers(0, 256, 40 * iq.NL_BYTES, dtype=np.uint8)
    raw.reshape(-1, iq.NL_BYTES)[:, 1] = 0x20
    x = rng.standard_normal(40 * iq.NL_QK).astype(np.float32)
    vec = iq._row_dot_iq4_nl_avx2(raw, np.uint64(0), x, 40)
    portable = iq._row_dot_iq4_nl_portable(raw, np.uint64(0), x, 40)
    assert abs(vec - portable) <= 1e-5 * max(1.0, abs(portable))


# --- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", [T.F16, T.IQ1_S], ids=lambda t: t.name)
def test_bad_input_raises_value_error_naming_the_type(qtype):
    k = ft.KERNELS.get(qtype) or iq.KERNELS[qtype]
    lay = LAYOUTS[qtype]
    raw = np.zeros((4, 2 * lay.type_size), np.uint8)
    n_cols = 2 * lay.block_size
    with pytest.raises(ValueError, match=qtype.name):
        k.matvec(np.zeros((4, lay.type_size + 1), np.uint8), np.zeros(n_cols, np.float32))
    with pytest.raises(ValueError, match=qtype.name):
        k.matvec(raw, np.zeros(n_cols + 1, np.float32))  # wrong x length
    with pytest.raises(ValueError, match=qtype.name):
        k.matmul(raw, np.zeros(n_cols, np.float32))  # xs must be 2-D
    with pytest.raises(ValueError, match=qtype.name):
        k.dequantize(raw.astype(np.int16))
    with pytest.raises(ValueError, match="C-contiguous"):
        k.dequantize(np.zeros((4, 4 * lay.type_size), np.uint8)[:, ::2])
