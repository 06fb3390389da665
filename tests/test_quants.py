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


# --- the activations and products llama.cpp computes -------------------------------------------
# ggml-cpu quantizes x to the weight type's vec_dot_type before every product. These numpy
# references transcribe its C (ggml-cpu/arch/x86/quants.c quantize_row_q8_0 / q8_1, AVX2 path;
# ggml-quants.c quantize_row_q8_K_ref; ggml_compute_fp32_to_bf16) so the kernels are checked
# against llama.cpp's integers and f16 roundings without llama.cpp installed.

LEGACY_Q8_1 = (T.Q4_1, T.Q5_1)  # vec_dot_type Q8_1; Q8_0, Q4_0, Q5_0 and IQ4_NL use Q8_0
Q8_K_TYPES = (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ1_S, T.IQ1_M)


def f16_round(v):
    return np.asarray(v, np.float32).astype(np.float16).astype(np.float32)


def quantize_row_q8_ref(x):
    """quantize_row_q8_0/q8_1 (AVX2): amax; d = amax/127.f stored as f16; id = 127.f/amax;
    q = round half to even (x * id); Q8_1's s = f16(d * sum(q)) with the unrounded d."""
    xb = np.asarray(x, np.float32).reshape(-1, 32)
    amax = np.abs(xb).max(axis=1)  # (n_blocks,)
    d = amax / np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(amax != 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    q = np.rint(xb * inv[:, None]).astype(np.int32)
    s = q.sum(axis=1)
    return q.astype(np.int8).reshape(-1), f16_round(d), s, f16_round(d * s.astype(np.float32))


def quantize_row_q8_k_ref(x):
    """quantize_row_q8_K_ref: max = the first x of largest |x|; iscale = -127.f/max;
    q = MIN(127, nearest_int(iscale * x)); d = 1/iscale; an all-zero block is d = 0, q = 0."""
    xb = np.asarray(x, np.float32).reshape(-1, 256)
    q = np.zeros(xb.shape, np.int32)
    d = np.zeros(xb.shape[0], np.float32)
    for i, blk in enumerate(xb):
        amax, vmax = np.float32(0), np.float32(0)
        for v in blk:
            if abs(v) > amax:
                amax, vmax = abs(v), v
        if amax == 0:
            continue
        iscale = np.float32(-127) / vmax
        q[i] = np.minimum(127, np.rint(iscale * blk))  # nearest_int: +1.5*2^23, ties to even
        d[i] = np.float32(1) / iscale
    return q.astype(np.int8).reshape(-1), d


def bf16_round_ref(x):
    u = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    bits = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
    return bits.astype(np.uint32).view(np.float32)


def llama_x_values(qtype, x):
    """x as the float values llama.cpp's dot products see for this weight type."""
    if qtype == T.F16:
        return f16_round(x)
    if qtype == T.BF16:
        return bf16_round_ref(x)
    if qtype == T.F32:
        return np.asarray(x, np.float32)
    if qtype in Q8_K_TYPES:
        q, d = quantize_row_q8_k_ref(x)
        return (q.reshape(-1, 256) * d[:, None].astype(np.float64)).reshape(-1)
    q, d, _, _ = quantize_row_q8_ref(x)
    return (q.reshape(-1, 32) * d[:, None].astype(np.float64)).reshape(-1)


def activation_with_ties(rng, n):
    """Random x plus the cases the roundings decide: exact .5 ties of x * id (blocks whose
    amax is 127 have id = 1), an all-zero block, equal +-amax, a negative max, tiny values."""
    x = (rng.standard_normal(n) * rng.exponential(1.0, n)).astype(np.float32)
    x[:32] = np.arange(-15.5, 16.5, 1.0, dtype=np.float32)
    x[0] = 127.0
    x[32:64] = 0
    x[64:96] *= np.float32(1e-30)
    if n >= 512:
        x[256:512] = np.round(rng.standard_normal(256) * 20) + 0.5
        x[300], x[301] = -200.0, 200.0  # first of the equal |x| wins: max is negative
    return x


def test_q8_0_and_q8_1_activations_equal_llama_cpp_bytes():
    from prima_ref.quants import simd

    rng = np.random.default_rng(7)
    xs = np.stack([activation_with_ties(rng, 1024) for _ in range(3)])  # (3, 1024)
    qx, dx, sx, dsx = simd.quantize_x_q8(xs)
    for t in range(xs.shape[0]):
        q, d, s, ds = quantize_row_q8_ref(xs[t])
        assert np.array_equal(qx[t], q)
        assert np.array_equal(dx[t].view(np.uint32), d.view(np.uint32))
        assert np.array_equal(sx[t], s)
        assert np.array_equal(dsx[t].view(np.uint32), ds.view(np.uint32))


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q6_K, T.Q2_K], ids=lambda t: t.name)
def test_q8_k_activations_equal_llama_cpp_ref(qtype):
    """The K-quant kernels' Q8_K quantization (stored in their slot order) and the values the
    float paths use are quantize_row_q8_K_ref's, sign convention included."""
    from prima_ref.quants import k_quants as kq
    from prima_ref.quants import simd

    rng = np.random.default_rng(int(qtype))
    xs = np.stack([activation_with_ties(rng, 1024) for _ in range(2)])  # (2, 1024)
    slots = kq._slots(qtype)
    sum_lane, n_lanes, factor = kq._x_sums(qtype)
    xq = np.empty(xs.shape, np.int8)
    xd = np.empty((2, 4), np.float32)
    xsum = np.empty((2, 4, n_lanes), np.int32)
    kq._quantize_x_q8k(xs, slots, sum_lane, factor, xq, xd, xsum)
    values = simd.q8_k_values(xs, 256)
    for t in range(2):
        q, d = quantize_row_q8_k_ref(xs[t])
        natural = np.empty((4, 256), np.int8)
        natural[:, slots] = xq[t].reshape(4, 256)
        assert np.array_equal(natural.reshape(-1), q)
        assert np.array_equal(xd[t].view(np.uint32), d.view(np.uint32))
        assert np.array_equal(values[t], (q.reshape(4, 256) * d[:, None]).reshape(-1))


def llama_legacy_products(qtype, raw, x):
    """ggml_vec_dot_q*_q8_0 / q*_1_q8_1 in float64 from the block fields: per block
    d_w * d_x * (integer dot of the signed quants), plus m_w * s_x for the types with a min."""
    from prima_ref.quants import legacy

    kind = int(qtype)
    blocks = raw.reshape(-1, legacy.BLOCK_BYTES[kind])
    n_blocks = raw.shape[1] // legacy.BLOCK_BYTES[kind]
    u = legacy._unsigned_quants_ref(kind, blocks).astype(np.int64).reshape(raw.shape[0], n_blocks, 32)
    d_w = legacy._f16(blocks, 0).astype(np.float64).reshape(raw.shape[0], n_blocks)
    q, d_x, _, s_x = quantize_row_q8_ref(x)
    isum = ((u - legacy.K_OFFSET[kind]) * q.reshape(1, n_blocks, 32)).sum(axis=2)
    y = (d_w * d_x.astype(np.float64) * isum).sum(axis=1)
    if legacy.HAS_MIN[kind]:
        m_w = legacy._f16(blocks, 2).astype(np.float64).reshape(raw.shape[0], n_blocks)
        y += (m_w * s_x.astype(np.float64)).sum(axis=1)
    return y


def llama_products(qtype, raw, x):
    if qtype in (T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1):
        return llama_legacy_products(qtype, raw, x)
    return gguf_dequant(raw, qtype).astype(np.float64) @ llama_x_values(qtype, x)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_products_are_llama_cpps_up_to_float32_summation(qtype):
    """Same integers, same f16 roundings as ggml: only the float32 summation order differs,
    so each y is within float32 rounding of llama.cpp's product computed in float64."""
    rng = np.random.default_rng(int(qtype) + 1000)
    n_rows, n_cols = 40, 1024
    raw = realistic_rows(qtype, rng, n_rows, n_cols)
    xs = np.stack([activation_with_ties(rng, n_cols) for _ in range(5)])  # (5, n_cols)
    ref = np.stack([llama_products(qtype, raw, x) for x in xs])  # (5, n_rows)
    w_abs = np.abs(gguf_dequant(raw, qtype).astype(np.float64))
    scale = np.stack([w_abs @ np.abs(llama_x_values(qtype, x)) for x in xs])  # sum |w x|
    k = kernels(qtype)
    assert np.all(np.abs(k.matmul(raw, xs) - ref) <= 2e-6 * scale + 1e-30)
    assert np.all(np.abs(k.matmul(raw, xs[:1])[0] - ref[0]) <= 2e-6 * scale[0] + 1e-30)
    assert np.all(np.abs(k.matvec(raw, xs[2]) - ref[2]) <= 2e-6 * scale[2] + 1e-30)
