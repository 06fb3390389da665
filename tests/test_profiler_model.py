"""profile-tool's model half: bytes and FLOPs from GGUF metadata, checked against the file."""

from __future__ import annotations

import pytest

from prima_ref.gguf_file import GGUFModel
from profiler.model import load_model_info, ms_per_layer


@pytest.fixture(params=["smollm2_path", "gemma3_path"])
def model_path(request):
    return request.getfixturevalue(request.param)


def test_model_bytes_sum_to_the_files_tensor_data_size(model_path):
    info = load_model_info(model_path)
    with GGUFModel.open(model_path) as m:
        tensor_data = sum(t.n_bytes for t in m.tensors.values())
        assert m.data_offset + tensor_data <= m.file_size
    p = info.profile
    assert info.tensor_data_bytes == tensor_data
    assert p.total_bytes == pytest.approx(tensor_data, abs=1e-6 * tensor_data)
    by_role = sum(b for types in info.layer_bytes_by_role.values() for b in types.values())
    assert by_role == pytest.approx(p.layer.n_bytes)
    assert by_role * p.n_layers + p.input.n_bytes + p.output.n_bytes == pytest.approx(tensor_data)


def test_smollm2_layer_flops_match_a_hand_count(smollm2_path):
    p = load_model_info(smollm2_path).profile
    d, f, n_head, n_head_kv, head_dim, vocab = 576, 1536, 9, 3, 64, 49152
    assert (p.n_embd, p.n_ff, p.n_head, p.n_head_kv, p.head_dim, p.n_vocab) == (
        d, f, n_head, n_head_kv, head_dim, vocab)
    kv_dim = n_head_kv * head_dim  # 192
    # q and o are d x d, k and v are kv_dim x d, gate/up/down are f x d: one multiply-add each
    hand = 2 * (d * d + kv_dim * d + kv_dim * d + d * d + 3 * f * d)
    assert hand == 7_077_888
    assert p.layer.flops_by_type == {"Q4_1": hand}
    # attention per context token: QK and AV over every head, NOT times n_head_kv (prima.cpp)
    assert p.attn_flops_per_token_per_ctx_per_layer == 2 * 2 * n_head * head_dim
    assert p.kv_bytes_per_token_per_layer == 2 * kv_dim * 2  # K and V, f16
    assert p.output.flops_by_type == {"Q8_0": 2 * vocab * d}  # tied: token_embd is the output


def test_gemma3_tied_output_is_counted_once_as_the_output_layer(gemma3_path):
    info = load_model_info(gemma3_path)
    assert info.tied_output
    assert info.profile.input.n_bytes == 0
    q8 = info.matvec_tensors["Q8_0"]
    assert q8[-1].name == "token_embd.weight"  # decode order: layers first, then the output
    assert (q8[-1].n_rows, q8[-1].n_cols) == (262144, 640)
    assert info.input_row_bytes == 640 // 32 * 34  # one Q8_0 row: the bytes a lookup reads
    assert set(info.matvec_tensors) == {"Q4_K", "Q5_0", "Q6_K", "Q8_0"}


def test_model_profile_reads_no_weights(smollm2_path, monkeypatch):
    def refuse(self, name):
        raise AssertionError(f"model profile read tensor data of {name}")

    monkeypatch.setattr(GGUFModel, "tensor_bytes", refuse)
    monkeypatch.setattr(GGUFModel, "tensor_rows", refuse)
    info = load_model_info(smollm2_path)
    assert info.profile.n_layers == 30


def test_ms_per_layer_charges_each_type_at_its_own_speed():
    assert ms_per_layer({"Q4_K": 2e9, "Q6_K": 1e9}, {"Q4_K": 10.0, "Q6_K": 5.0}) == 400.0
    # an F32 norm has no matvec figure: it is charged at the slowest measured speed
    assert ms_per_layer({"Q4_K": 1e9, "F32": 5e8}, {"Q4_K": 10.0, "Q6_K": 5.0}) == 200.0
