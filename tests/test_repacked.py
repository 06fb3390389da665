"""The repacked copy the engine maps (prima_ref.repacked): the source's header and byte ranges,
each product matrix lanes.repack()ed, filled only for the layers asked for, rebuilt when the
source changes; and a model over it computes the source's logits bit for bit, in every path
(prefill, one-token decode, batched decode, row by row)."""

import os
import shutil

import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType as T
from test_quants_fused import EMPTY, EPS, quantized

from prima_ref import repacked
from prima_ref.gguf_file import GGUFModel
from prima_ref.model.transformer import Transformer, row_by_row
from prima_ref.quants import batched, fused, lanes, legacy

needs_lanes = pytest.mark.skipif(not lanes.available(), reason="CPU lacks AVX512-VNNI/BW: "
                                 "the engine maps the source there")
pytestmark = needs_lanes


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    """A model file of our own and an empty cache for its copies."""
    monkeypatch.setenv("PRIMA_REF_CACHE", str(tmp_path / "cache"))
    return tmp_path


def test_the_copy_has_the_source_header_and_each_product_repacked(smollm2_path):
    copy = repacked.open_model(smollm2_path)
    src = GGUFModel.open(smollm2_path)
    assert copy.path != src.path and copy.file_size == src.file_size
    assert copy._mm[: src.data_offset] == src._mm[: src.data_offset]
    assert "blk.3.ffn_down.weight" in copy.packed and "token_embd.weight" not in copy.packed
    assert not copy.absent
    for name, info in src.tensors.items():
        rows = src.tensor_rows(name)
        bb = legacy.BLOCK_BYTES.get(int(info.qtype))
        want = lanes.repack(rows, bb) if name in copy.packed else rows
        assert np.array_equal(copy.tensor_rows(name), want), name
    assert len(copy.packed) == 7 * 30  # every layer's 7 products (the output is token_embd)


def _logits(model):
    tokens = [1, 504, 3458, 282, 1979, 314, 253, 1345, 28, 17, 90, 3, 44, 55]
    tr = Transformer(model, 64, n_slots=3)
    out = [tr.forward(tokens, 0, all_logits=True)]  # prefill: 14 tokens
    out.append(tr.forward([77], len(tokens)))  # one-token decode
    out.append(tr.forward_rows([5, 6, 7], [20, 0, 0], [0, 1, 2]))  # batched decode, 3 slots
    out.append(tr.forward(tokens[:5], 21, all_logits=True))  # 5 rows: the batched kernels
    with row_by_row():
        out.append(tr.forward([9, 10, 11], 26, all_logits=True))
    return out


@pytest.mark.parametrize("which", ["smollm2_path", "gemma3_path"])
def test_logits_over_the_copy_equal_the_source_bit_for_bit(which, request):
    """SmolLM2 Q4_1 (every product repacked) and gemma 3 Q4_K_M (Q5_0 / Q8_0 products beside
    K-quant ones, so q/k/v and gate/up mix layouts in one fused call)."""
    path = request.getfixturevalue(which)
    copy = repacked.open_model(path)
    assert copy.packed
    for got, want in zip(_logits(copy), _logits(GGUFModel.open(path)), strict=True):
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


def test_fused_and_batched_kernels_take_packed_kinds_beside_row_major_ones():
    n_cols, rng = 256, np.random.default_rng(5)
    types = (T.Q4_0, T.Q8_0, T.Q5_1)
    shapes = enumerate(zip(types, (64, 32, 48), strict=True))
    raws = tuple(quantized(t, n, n_cols, i) for i, (t, n) in shapes)
    packs = tuple(lanes.repack(r, legacy.BLOCK_BYTES[int(t)])
                  for t, r in zip(types, raws, strict=True))
    for p in packs:
        p.flags.writeable = False
    x = rng.standard_normal(n_cols).astype(np.float32)
    want = np.empty(144, np.float32)
    fused.matvec_group(raws, np.array([int(t) for t in types]), x, EMPTY, EPS, EMPTY, want)
    mixed = (packs[0], raws[1], packs[2])  # q and v repacked, k not
    kinds = np.array([int(types[0]) + lanes.PACKED, int(types[1]), int(types[2]) + lanes.PACKED])
    got = np.empty(144, np.float32)
    fused.matvec_group(mixed, kinds, x, EMPTY, EPS, EMPTY, got)
    assert np.array_equal(got, want)
    xs = rng.standard_normal((3, n_cols)).astype(np.float32)
    kind = int(T.Q5_1)
    rows = batched.group(kind, (raws[2],), xs)
    assert np.array_equal(batched.group(kind + lanes.PACKED, (packs[2],), xs), rows)
    assert np.array_equal(lanes.matmul_packed(kind, packs[2], xs), rows)


def test_a_copy_filled_for_some_layers_holds_only_those(own_cache, smollm2_path):
    path = shutil.copy(smollm2_path, own_cache / "model.gguf")
    part = repacked.open_model(path, layers={0, 1}, head=False)
    assert part.tensor_rows("blk.1.ffn_up.weight").any()
    with pytest.raises(ValueError, match="does not hold 'blk.2.attn_q.weight'"):
        part.tensor_rows("blk.2.attn_q.weight")
    with pytest.raises(ValueError, match="token_embd"):
        part.tensor_rows("token_embd.weight")
    size = os.stat(part.path)
    assert size.st_size == os.path.getsize(path)
    assert size.st_blocks * 512 < size.st_size / 4  # a sparse file: 2 of 30 layers written
    more = repacked.open_model(path, layers={2}, head=False)  # another rank's turn
    assert more.tensor_rows("blk.2.attn_q.weight").any()
    assert np.array_equal(more.tensor_rows("blk.0.attn_k.weight"),
                          part.tensor_rows("blk.0.attn_k.weight"))
    assert "blk.3.attn_q.weight" in more.absent


def test_a_changed_source_gets_a_new_copy_and_a_deleted_one_loses_its_copy(own_cache,
                                                                           smollm2_path,
                                                                           monkeypatch):
    monkeypatch.setattr(repacked, "_CHUNK", 8192)  # many chunks a tensor, each whole groups
    path = shutil.copy(smollm2_path, own_cache / "model.gguf")
    first = repacked.open_model(path, layers={0}, head=False)
    name = "blk.0.attn_v.weight"
    info = first.tensors[name]
    before = first.tensor_rows(name).copy()
    with open(path, "r+b") as f:  # the source changes: the block scale of row 0, block 0
        f.seek(info.offset)
        f.write(b"\x00\x3c")  # f16 1.0
    again = repacked.open_model(path, layers={0}, head=False)
    src = GGUFModel.open(path)
    want = lanes.repack(src.tensor_rows(name), legacy.BLOCK_BYTES[int(info.qtype)])
    assert np.array_equal(again.tensor_rows(name), want)
    assert not np.array_equal(want, before)
    other = shutil.copy(smollm2_path, own_cache / "other.gguf")
    os.remove(path)
    repacked.open_model(other, layers={0}, head=False)  # a new copy clears the orphans
    assert not repacked.copy_path(path).exists()
    assert repacked.copy_path(other).exists()


def test_no_repack_maps_the_source(own_cache, smollm2_path, monkeypatch):
    monkeypatch.setenv("PRIMA_REF_REPACK", "0")
    model = repacked.open_model(smollm2_path)
    assert model.path == smollm2_path and not model.packed
    assert not (own_cache / "cache" / "packed").exists()


def test_the_gpu_upload_gets_the_row_major_bytes(smollm2_path):
    from prima_ref.gpu.layer import _row_major

    layer = Transformer(repacked.open_model(smollm2_path), 8, layers=[0], head=False).layers[0]
    src = GGUFModel.open(smollm2_path)
    assert layer.wq.packed and layer.w_down.packed
    for w in (layer.wq, layer.w_down):
        assert np.array_equal(_row_major(w), src.tensor_rows(w.name))
