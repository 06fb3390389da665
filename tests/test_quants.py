"""Every quant kernel against an outside reference.

- dequantize: bit for bit equal to gguf.quants.dequantize, on random blocks (any bit pattern
  whose f16/bf16/f32 scales are finite) and on real tensors of the two real models.
- matvec / matmul: normalized squared error against float64 products of the dequantized
  weights, <= 5e-4 when the kernel quantizes x, <= 1e-6 when it keeps x in float.
"""

import numpy as np
import pytest
from gguf import GGUFReader
from gguf import quants as gq
from gguf.constants import GGMLQuantizationType as T
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prima_ref.quants import as_rows, kernels
from prima_ref.quants.layouts import LAYOUTS

TYPES = list(LAYOUTS)

# Byte offsets of f16 scale fields inside one block (IQ1_M packs its scale across bytes).
F16_FIELDS = {
    T.Q8_0: [0], T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.IQ4_NL: [0],
    T.Q2_K: [80, 82], T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208],
    T.IQ1_S: [0],
}


def finite_blocks(qtype, data: np.ndarray, n_rows: int) -> np.ndarray:
    """Clear one exponent bit wherever a scale (or a float weight) would be inf/nan."""
    raw = data.copy()
    if qtype == T.F32:
        v = raw.view(np.uint32)
        v[(v & 0x7F800000) == 0x7F800000] &= np.uint32(~0x40000000 & 0xFFFFFFFF)
    elif qtype == T.F16:
        v = raw.view(np.uint16)
        v[(v & 0x7C00) == 0x7C00] &= np.uint16(0xBFFF)
    elif qtype == T.BF16:
        v = raw.view(np.uint16)
        v[(v & 0x7F80) == 0x7F80] &= np.uint16(0xBFFF)
    else:
        blocks = raw.reshape(-1, LAYOUTS[qtype].type_size)
        if qtype == T.IQ1_M:
            hi = blocks[:, 55]  # top byte of the 4th scale u16 holds f16 exponent bits 12-14
            lo = blocks[:, 53]  # top byte of the 3rd holds exponent bits 10-11
            inf = ((hi & 0x70) == 0x70) & ((lo & 0xC0) == 0xC0)
            blocks[inf, 55] &= np.uint8(0xBF)
            return raw.reshape(n_rows, -1)  # no whole f16 field to clean
        for off in F16_FIELDS[qtype]:
            v = blocks[:, off : off + 2].copy().view(np.uint16)[:, 0]
            bad = (v & 0x7C00) == 0x7C00
            blocks[bad, off + 1] &= np.uint8(0xBF)
    return raw.reshape(n_rows, -1)


def random_rows(qtype, rng, n_rows, n_blocks_per_row):
    layout = LAYOUTS[qtype]
    data = rng.integers(0, 256, size=n_rows * n_blocks_per_row * layout.type_size, dtype=np.uint8)
    return finite_blocks(qtype, data, n_rows)


def realistic_rows(qtype, rng, n_rows, n_cols):
    """Weights with the magnitudes real models have: quantize normal data where gguf can,
    otherwise random blocks with small scales."""
    w = (rng.standard_normal((n_rows, n_cols)) * 0.05).astype(np.float32)
    if qtype in (T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1):  # gguf quantizes these
        return np.ascontiguousarray(gq.quantize(w, qtype).view(np.uint8).reshape(n_rows, -1))
    raw = random_rows(qtype, rng, n_rows, n_cols // LAYOUTS[qtype].block_size)
    blocks = raw.reshape(-1, LAYOUTS[qtype].type_size)
    small = (rng.standard_normal(blocks.shape[0]) * 1e-3).astype(np.float16).view(np.uint8).reshape(-1, 2)
    for off in F16_FIELDS.get(qtype, []):
        blocks[:, off : off + 2] = small
    if qtype == T.IQ1_M:  # d = 2**-7: f16 bits 12-15 are the top nibble of byte 55
        blocks[:, 49:56:2] &= np.uint8(0x0F)
        blocks[:, 55] |= np.uint8(0x20)
    return raw


def gguf_dequant(raw, qtype):
    return gq.dequantize(raw, qtype).reshape(raw.shape[0], -1)


def assert_bit_equal(ours, ref):
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    ref = ref.astype(np.float32)
    mismatch = ours.view(np.uint32) != ref.view(np.uint32)
    if mismatch.any():
        i = np.argwhere(mismatch)[0]
        pytest.fail(f"{mismatch.sum()} values differ, first at {tuple(i)}: {ours[tuple(i)]!r} vs {ref[tuple(i)]!r}")


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequantize_random_blocks_bit_equal_to_gguf(qtype):
    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.integers(1, 3), st.integers(1, 4), st.integers(0, 2**32 - 1))
    def check(n_rows, n_blocks, seed):
        blocks = n_blocks if LAYOUTS[qtype].block_size > 1 else n_blocks * 32
        raw = random_rows(qtype, np.random.default_rng(seed), n_rows, blocks)
        ref = gguf_dequant(raw, qtype)
        assert_bit_equal(kernels(qtype).dequantize(raw), ref)
        assert_bit_equal(kernels(qtype).dequantize_ref(raw).astype(np.float32), ref)

    check()


def nse(y, y_ref):
    y_ref = np.asarray(y_ref, dtype=np.float64)
    return float(np.sum((np.asarray(y, np.float64) - y_ref) ** 2) / np.sum(y_ref**2))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_matvec_within_error_bound_of_float64(qtype):
    rng = np.random.default_rng(int(qtype))
    n_rows, n_cols = 96, 1024
    raw = realistic_rows(qtype, rng, n_rows, n_cols)
    x = rng.standard_normal(n_cols).astype(np.float32)
    w64 = gguf_dequant(raw, qtype).astype(np.float64)
    k = kernels(qtype)
    bound = 5e-4 if k.x_quantized else 1e-6
    y = k.matvec(raw, x)
    assert y.dtype == np.float32 and y.shape == (n_rows,)
    assert nse(y, w64 @ x.astype(np.float64)) <= bound


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("n_tokens", [1, 5, 64])
def test_matmul_within_error_bound_of_float64(qtype, n_tokens):
    rng = np.random.default_rng(int(qtype) + n_tokens)
    n_rows, n_cols = 80, 512
    raw = realistic_rows(qtype, rng, n_rows, n_cols)
    xs = rng.standard_normal((n_tokens, n_cols)).astype(np.float32)
    w64 = gguf_dequant(raw, qtype).astype(np.float64)
    k = kernels(qtype)
    bound = 5e-4 if k.x_quantized else 1e-6
    ys = k.matmul(raw, xs)
    assert ys.dtype == np.float32 and ys.shape == (n_tokens, n_rows)
    assert nse(ys, xs.astype(np.float64) @ w64.T) <= bound


def _real_tensors(path, max_rows=64):
    reader = GGUFReader(path)
    for t in reader.tensors:
        if t.name.startswith("blk.0.") or not t.name.startswith("blk."):
            n_rows = int(np.prod(t.shape[1:])) if len(t.shape) > 1 else 1
            rows = as_rows(np.asarray(t.data), T(t.tensor_type), n_rows)
            yield t.name, T(t.tensor_type), rows[:max_rows]


@pytest.mark.parametrize("model", ["smollm2_path", "gemma3_path"])
def test_dequantize_real_tensors_bit_equal_to_gguf(model, request):
    seen = set()
    for name, qtype, rows in _real_tensors(request.getfixturevalue(model)):
        seen.add(qtype)
        assert_bit_equal(kernels(qtype).dequantize(rows), gguf_dequant(rows, qtype))
    assert len(seen) >= 3, seen


@pytest.mark.parametrize("model", ["smollm2_path", "gemma3_path"])
def test_matvec_real_tensors_within_bound(model, request):
    rng = np.random.default_rng(0)
    for name, qtype, rows in _real_tensors(request.getfixturevalue(model)):
        k = kernels(qtype)
        x = rng.standard_normal(rows.shape[1] // LAYOUTS[qtype].type_size * LAYOUTS[qtype].block_size)
        x = x.astype(np.float32)
        ref = gguf_dequant(rows, qtype).astype(np.float64) @ x.astype(np.float64)
        assert nse(k.matvec(rows, x), ref) <= (5e-4 if k.x_quantized else 1e-6), name
