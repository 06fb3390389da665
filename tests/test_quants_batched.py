"""The batched decode kernels (prima_ref.quants.batched): row t of an n-row call is bit for bit
what the one-row fused kernel gives on row t alone, on SmolLM2's real weights (Q4_1 layers
and Q8_0 embedding/head; the Q8_0 file's layers) and on random matrices of the other legacy
types; so a server's greedy answer per slot does not depend on how many slots share a step."""

import numpy as np
import pytest
from gguf import quants as gq
from gguf.constants import GGMLQuantizationType as T

from prima_ref.gguf_file import GGUFModel
from prima_ref.model import ops
from prima_ref.model.transformer import _GELU_TABLE_F32, _readonly
from prima_ref.quants import batched, fused, kernels, legacy

EMPTY = np.zeros(0, np.float32)
EPS = np.float32(1e-5)
ROWS = (2, 3, 5, 8)


def activations(n_rows, n_cols, seed, scale=1.0):
    rng = np.random.default_rng(seed)
    xs = (rng.standard_normal((n_rows, n_cols)) * scale).astype(np.float32)
    xs[0, :40] = 0.0  # an all-zero block: dx 0, as llama.cpp quantizes it
    return xs


def layer_weights(path, il=0):
    with GGUFModel.open(path) as g:
        names = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
        mats = {n: (int(g.tensors[f"blk.{il}.{n}.weight"].qtype),
                    _readonly(np.array(g.tensor_rows(f"blk.{il}.{n}.weight")))) for n in names}
        head = (int(g.tensors["token_embd.weight"].qtype),
                _readonly(np.array(g.tensor_rows("token_embd.weight")[:2048])))
        norm = kernels(g.tensors[f"blk.{il}.attn_norm.weight"].qtype).dequantize(
            g.tensor_rows(f"blk.{il}.attn_norm.weight")).reshape(-1)
    return mats, head, norm


def one_row_group(raws, kinds, x, norm_w, residual):
    y = np.empty(sum(r.shape[0] for r in raws), np.float32)
    fused.matvec_group(raws, np.array(kinds, np.int64), x, norm_w, EPS, residual, y)
    return y


def check_layer(mats, head, norm, n):
    """Every product a layer's decode step makes, n rows against n one-row calls."""
    qkv = [mats[k] for k in ("attn_q", "attn_k", "attn_v")]
    kind = qkv[0][0]
    raws = tuple(r for _, r in qkv)
    n_embd = raws[0].shape[1] // legacy.BLOCK_BYTES[kind] * legacy.QK
    xs = activations(n, n_embd, n)
    ys = batched.group(kind, raws, xs, norm, EPS)
    for t in range(n):
        assert np.array_equal(ys[t], one_row_group(raws, [kind] * 3, xs[t], norm, EMPTY)), t
    kind_o, wo = mats["attn_output"]
    residual = activations(n, wo.shape[0], 100 + n)
    ys = batched.group(kind_o, (wo,), xs, residual=residual)
    for t in range(n):
        assert np.array_equal(ys[t], one_row_group((wo,), [kind_o], xs[t], EMPTY, residual[t]))
    (kind_g, gate), (_, up) = mats["ffn_gate"], mats["ffn_up"]
    out = batched.gate_up(kind_g, gate, up, xs, norm, EPS, fused.ACT_SILU, _GELU_TABLE_F32)
    for t in range(n):
        want = np.empty(gate.shape[0], np.float32)
        fused.ffn_gate_up(gate, kind_g, up, kind_g, xs[t], norm, EPS, fused.ACT_SILU,
                          _GELU_TABLE_F32, want)
        assert np.array_equal(out[t], want), t
    kind_d, down = mats["ffn_down"]
    hs = activations(n, gate.shape[0], 200 + n, 0.1)
    ys = batched.group(kind_d, (down,), hs, residual=residual)
    for t in range(n):
        assert np.array_equal(ys[t], one_row_group((down,), [kind_d], hs[t], EMPTY, residual[t]))
    kind_h, rows = head  # the output head goes through legacy's plain matvec in a one-row step
    ys = batched.group(kind_h, (rows,), xs)
    for t in range(n):
        assert np.array_equal(ys[t], kernels(T(kind_h)).matvec(rows, xs[t])), t


@pytest.mark.parametrize("n", ROWS)
def test_rows_equal_one_row_fused_kernels_on_smollm2_q4_1(smollm2_path, n):
    mats, head, norm = layer_weights(smollm2_path)
    assert mats["attn_q"][0] == int(T.Q4_1) and head[0] == int(T.Q8_0)
    check_layer(mats, head, norm, n)


@pytest.mark.parametrize("n", (2, 7))
def test_rows_equal_one_row_fused_kernels_on_smollm2_q8_0(smollm2_q8_0_path, n):
    mats, head, norm = layer_weights(smollm2_q8_0_path, il=5)
    assert mats["attn_q"][0] == int(T.Q8_0)
    check_layer(mats, head, norm, n)


def quantized(qtype, n_rows, n_cols, seed):
    w = (np.random.default_rng(seed).standard_normal((n_rows, n_cols)) * 0.05).astype(np.float32)
    return _readonly(np.ascontiguousarray(gq.quantize(w, qtype).view(np.uint8).reshape(n_rows, -1)))


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q5_0, T.Q5_1])
def test_other_legacy_types_equal_one_row_and_the_float_reference(qtype):
    n_cols = 320  # 10 blocks: one group of 8, then a tail of 2
    raws = tuple(quantized(qtype, n, n_cols, i) for i, n in enumerate((70, 33, 8)))
    xs = activations(6, n_cols, 3)
    norm_w = np.random.default_rng(4).standard_normal(n_cols).astype(np.float32)
    ys = batched.group(int(qtype), raws, xs, norm_w, EPS)
    dense = np.concatenate([kernels(qtype).dequantize(r) for r in raws]).astype(np.float64)
    h = np.empty_like(xs)
    ops.rms_norm(xs, norm_w, EPS, h)
    for t in range(xs.shape[0]):
        assert np.array_equal(ys[t], one_row_group(raws, [int(qtype)] * 3, xs[t], norm_w, EMPTY))
        ref = dense @ h[t].astype(np.float64)
        assert np.sum((ys[t] - ref) ** 2) / np.sum(ref**2) <= 5e-4
    up = quantized(qtype, 70, n_cols, 5)
    out = batched.gate_up(int(qtype), raws[0], up, xs, norm_w, EPS, fused.ACT_GELU, _GELU_TABLE_F32)
    for t in range(xs.shape[0]):
        want = np.empty(70, np.float32)
        fused.ffn_gate_up(raws[0], int(qtype), up, int(qtype), xs[t], norm_w, EPS, fused.ACT_GELU,
                          _GELU_TABLE_F32, want)
        assert np.array_equal(out[t], want), t


def test_portable_kernel_equals_the_portable_matvec():
    """The path for CPUs without VNNI: each row as legacy's portable matvec computes it."""
    raw = quantized(T.Q4_1, 40, 320, 6)
    xs = activations(3, 320, 7)
    ys = batched.group(int(T.Q4_1), (raw,), xs, vnni=False)
    portable = legacy.make_kernels(T.Q4_1, vnni=False)
    for t in range(3):
        assert np.array_equal(ys[t], portable.matvec(raw, xs[t]))


def test_bad_shapes_are_refused():
    raw = quantized(T.Q8_0, 8, 64, 8)
    with pytest.raises(ValueError, match="rows must be"):
        batched.group(int(T.Q8_0), (raw,), np.zeros((9, 64), np.float32))
    with pytest.raises(ValueError, match="rows must be"):
        batched.group(int(T.Q8_0), (raw,), np.zeros((2, 96), np.float32))
    with pytest.raises(ValueError, match="no batched decode kernel"):
        batched.kernels(int(T.Q4_K))
