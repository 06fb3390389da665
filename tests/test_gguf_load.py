"""Loading GGUF files: real models against gguf-py's reader, and one test per corruption class."""

import time
import tracemalloc

import gguf
import numpy as np
import pytest
from gguf_craft import (
    KV,
    Q,
    Tensor,
    V,
    assert_metadata_equals_reader,
    assert_views_equal_reader,
    build,
    file_view,
    small_model,
    small_model_kvs,
    tensor_n_bytes,
)

from prima_ref.gguf_file import (
    MAX_ARRAY_ELEMENTS,
    MAX_STRING_BYTES,
    GGUFFormatError,
    GGUFModel,
)

REAL_MODELS = [
    "smollm2_path",
    # gguf-py's reader needs ~30 s for gemma's 262k-token vocab; ours needs ~0.3 s.
    pytest.param("gemma3_path", marks=pytest.mark.slow),
]


def write(tmp_path, data, name="model.gguf"):
    path = tmp_path / name
    path.write_bytes(bytes(data))
    return path


# ---------------------------------------------------------------------------------------------
# Real models


@pytest.fixture(scope="module")
def readers():
    cache = {}

    def get(path):
        if path not in cache:
            cache[path] = gguf.GGUFReader(path)
        return cache[path]

    return get


@pytest.mark.parametrize("fixture", REAL_MODELS)
def test_real_model_metadata_and_tensors_equal_gguf_reader(request, readers, fixture):
    path = request.getfixturevalue(fixture)
    reader = readers(path)
    with GGUFModel.open(path) as model:
        assert (model.version, model.alignment, model.data_offset) == (
            3, reader.alignment, reader.data_offset)
        assert_metadata_equals_reader(model, reader)
        assert_views_equal_reader(model, reader)


@pytest.mark.parametrize("fixture", ["smollm2_path", "gemma3_path"])
def test_real_model_opens_fast_without_reading_tensors(request, fixture):
    path = request.getfixturevalue(fixture)
    start = time.perf_counter()
    with GGUFModel.open(path) as model:
        elapsed_s = time.perf_counter() - start
        # Parsing the vocab in Python dominates: ~0.2 s for gemma's 262k strings on an idle
        # 2-core box; the bound leaves room for a loaded CI machine.
        assert elapsed_s < 2.0
        assert model.architecture in ("llama", "gemma3")
        assert model.file_size == path.stat().st_size


@pytest.mark.parametrize("fixture", ["smollm2_path", "gemma3_path"])
def test_real_model_layer_ranges_cover_exactly_the_block_tensors(request, fixture):
    with GGUFModel.open(request.getfixturevalue(fixture)) as model:
        ranges = model.layer_ranges()
        n_layers = model.require(f"{model.architecture}.block_count", int)
        assert list(ranges) == list(range(n_layers))
        for layer, (start, end) in ranges.items():
            own = [t for t in model.tensors.values() if t.name.startswith(f"blk.{layer}.")]
            others = [t for t in model.tensors.values() if not t.name.startswith(f"blk.{layer}.")]
            assert start == min(t.offset for t in own) and end == max(t.end for t in own)
            assert sum(t.n_bytes for t in own) <= end - start
            assert not [t.name for t in others if t.offset < end and start < t.end]
        non_layer = model.non_layer_tensors()
        assert "token_embd.weight" in non_layer and "output_norm.weight" in non_layer
        assert not [n for n in non_layer if n.startswith("blk.")]
        assert len(non_layer) + sum(1 for n in model.tensors if n.startswith("blk.")) == len(
            model.tensors)


@pytest.mark.parametrize("fixture", ["smollm2_path", "gemma3_path"])
def test_real_model_tensors_fit_in_the_data_section(request, fixture):
    with GGUFModel.open(request.getfixturevalue(fixture)) as model:
        total = sum(t.n_bytes for t in model.tensors.values())
        assert total <= model.file_size - model.data_offset
        assert all(t.offset >= model.data_offset for t in model.tensors.values())
        q = model.tensors["blk.0.attn_q.weight"]
        rows = model.tensor_rows(q.name)
        assert rows.shape == (q.n_rows, q.n_bytes // q.n_rows) and q.n_cols == q.shape[-1]
        assert np.shares_memory(rows, file_view(model))


# ---------------------------------------------------------------------------------------------
# Valid crafted files


def test_crafted_file_values_round_trip_and_equal_gguf_reader(tmp_path):
    crafted = small_model()
    path = write(tmp_path, crafted)
    with GGUFModel.open(path) as model:
        assert_metadata_equals_reader(model, gguf.GGUFReader(path))
        assert_views_equal_reader(model, gguf.GGUFReader(path))
        md = model.metadata
        assert md["general.name"] == "crafted ünïcode" and md["test.bool"] is True
        assert md["test.u64"] == 2**64 - 1 and md["test.i64"] == -(2**63)
        assert md["tokenizer.ggml.tokens"] == ["<s>", "</s>", "a", "", "▁the"]
        assert md["tokenizer.ggml.scores"].dtype == np.float32
        assert md["test.bools"].tolist() == [True, False, True]
        assert md["test.empty"].shape == (0,)
        assert {n: t.offset for n, t in model.tensors.items()} == crafted.tensor_offsets
        assert model.layer_ranges() == {
            0: (crafted.tensor_offsets["blk.0.attn_norm.weight"],
                model.tensors["blk.0.ffn_down.weight"].end),
            1: (crafted.tensor_offsets["blk.1.attn_norm.weight"],
                model.tensors["blk.1.ffn_down.weight"].end),
        }
        assert model.non_layer_tensors() == ["token_embd.weight", "output_norm.weight",
                                             "output.weight"]


def test_gguf_writer_file_loads_like_gguf_reader(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "writer.gguf"
    weights = rng.standard_normal((3, 64)).astype(np.float32)  # (n_rows, n_cols)
    q8 = rng.integers(0, 256, (4, 2 * 34), dtype=np.uint8)  # (n_rows, row_bytes) of Q8_0
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(1)
    w.add_token_list(["a", "b", "cc"])
    w.add_token_scores([0.5, -1.0, 2.0])
    w.add_float64("test.f64", 2.5)
    w.add_tensor("blk.0.attn_q.weight", weights)
    w.add_tensor("blk.0.ffn_up.weight", q8, raw_dtype=Q.Q8_0)
    w.add_tensor("output_norm.weight", rng.standard_normal(64).astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    reader = gguf.GGUFReader(path)
    with GGUFModel.open(path) as model:
        assert_metadata_equals_reader(model, reader)
        assert_views_equal_reader(model, reader)
        assert np.array_equal(model.tensor_rows("blk.0.attn_q.weight").view(np.float32), weights)
        assert np.array_equal(model.tensor_rows("blk.0.ffn_up.weight"), q8)
        assert model.tensors["blk.0.ffn_up.weight"].shape == (4, 64)


def test_version_2_and_alignment_64_are_accepted(tmp_path):
    crafted = small_model(alignment=64)
    crafted.patch_u32("header.version", 2)
    with GGUFModel.open(write(tmp_path, crafted)) as model:
        assert (model.version, model.alignment) == (2, 64)
        assert model.data_offset % 64 == 0
        assert all(t.offset % 64 == 0 for t in model.tensors.values())


def test_tensor_rows_of_1d_and_3d_tensors(tmp_path):
    crafted = build([], [Tensor("norm", Q.F32, (8,)), Tensor("experts", Q.Q4_0, (64, 3, 2))])
    with GGUFModel.open(write(tmp_path, crafted)) as model:
        norm, experts = model.tensors["norm"], model.tensors["experts"]
        assert (norm.shape, norm.n_rows, norm.n_cols) == ((8,), 1, 8)
        assert (experts.shape, experts.n_rows, experts.n_cols) == ((2, 3, 64), 6, 64)
        assert model.tensor_rows("experts").shape == (6, 2 * 18)
        assert model.tensor_rows("norm").shape == (1, 32)


def test_10_gib_model_opens_fast_without_touching_tensor_data(tmp_path):
    layer_ne = (4096, 65536)  # F32: 1 GiB per layer, 10 layers
    tensors = [Tensor(f"blk.{i}.ffn_up.weight", Q.F32, layer_ne, data=b"") for i in range(10)]
    crafted = build([KV("general.architecture", V.STRING, "llama")], tensors)
    layer_bytes = tensor_n_bytes(Q.F32, layer_ne)
    for i in range(10):
        crafted.patch_u64(f"tensor[{i}].offset", i * layer_bytes)
    path = write(tmp_path, crafted.data[:crafted.data_offset])
    with open(path, "r+b") as f:
        f.truncate(crafted.data_offset + 10 * layer_bytes)  # sparse: no disk, no page cache
    start = time.perf_counter()
    with GGUFModel.open(path) as model:
        elapsed_s = time.perf_counter() - start
        assert model.file_size >= 10 * 2**30
        assert model.layer_ranges()[9] == (crafted.data_offset + 9 * layer_bytes, model.file_size)
        assert model.tensor_bytes("blk.9.ffn_up.weight").size == layer_bytes
    assert elapsed_s < 0.5


def test_require_names_the_missing_or_mistyped_key(tmp_path):
    with GGUFModel.open(write(tmp_path, small_model())) as model:
        assert model.require("llama.block_count", int) == 2
        assert model.get("no.such.key", 7) == 7
        with pytest.raises(GGUFFormatError, match="'llama.context_length' is missing"):
            model.require("llama.context_length", int)
        with pytest.raises(GGUFFormatError, match="general.name.*expected int, found str"):
            model.require("general.name", int)
        with pytest.raises(GGUFFormatError, match="test.bool.*expected int, found bool"):
            model.require("test.bool", int)
        with pytest.raises(GGUFFormatError, match="token_type.*expected an array of float32"):
            model.require("tokenizer.ggml.token_type", np.ndarray, dtype=np.float32)
        assert model.require("tokenizer.ggml.scores", np.ndarray, dtype=np.float32).size == 5


def test_closed_model_refuses_new_views_but_old_views_stay_valid(tmp_path):
    crafted = small_model()
    model = GGUFModel.open(write(tmp_path, crafted))
    view = model.tensor_bytes("output.weight")
    start = crafted.tensor_offsets["output.weight"]
    expected = bytes(crafted.data[start:start + view.size])
    model.close()
    with pytest.raises(ValueError, match="closed"):
        model.tensor_bytes("output.weight")
    assert view.tobytes() == expected
    model.close()  # idempotent


def test_unknown_tensor_name_raises_key_error_naming_it(tmp_path):
    with GGUFModel.open(write(tmp_path, small_model())) as model:
        with pytest.raises(KeyError, match="blk.7.attn_q.weight"):
            model.tensor_bytes("blk.7.attn_q.weight")


# ---------------------------------------------------------------------------------------------
# Corrupt files: one case per class (llama.cpp tests/test-gguf.cpp, anchors.md c1)

ARCH = KV("general.architecture", V.STRING, "llama")
W = Tensor("blk.0.w", Q.Q8_0, (32, 2))  # 2 rows of one Q8_0 block
W2 = Tensor("blk.0.w2", Q.Q8_0, (32, 2))


def one_kv(kv, field=None, value=None, fmt="<Q"):
    crafted = build([kv], [W])
    return crafted.patch(field, fmt, value) if field else crafted


def one_tensor(field=None, value=None, fmt="<Q", tensors=(W, W2)):
    crafted = build([ARCH], list(tensors))
    return crafted.patch(field, fmt, value) if field else crafted


def truncated(crafted, field, extra=0):
    return crafted.data[:crafted.fields[field] + extra]


BIG_ENDIAN_3 = int.from_bytes((3).to_bytes(4, "big"), "little")
EXABYTE_I8 = 0x7FFF_FFFF_FFFF_FFC0  # test-gguf.cpp's mem-size overflow case

CORRUPT = {
    # header
    "empty_file": (lambda: b"", "shorter than the 24-byte header"),
    "header_truncated": (lambda: bytes(small_model().data[:20]), "shorter than the 24-byte"),
    "bad_magic": (lambda: build([], [], magic=b"GGML"), r"bad magic.*b'GGML'"),
    "version_0": (lambda: build([], [], version=0), "unsupported version 0"),
    "version_1": (lambda: build([], [], version=1), "unsupported version 1"),
    "version_future": (lambda: build([], [], version=4), "unsupported version 4"),
    "big_endian": (lambda: build([], [], version=BIG_ENDIAN_3), "big-endian"),
    "n_tensors_minus_1": (lambda: small_model().patch_u64("header.n_tensors", 2**64 - 1),
                          r"n_tensors at byte 8: tensor count 18446744073709551615 exceeds"),
    "n_kv_minus_1": (lambda: small_model().patch_u64("header.n_kv", 2**64 - 1),
                     r"n_kv at byte 16: key-value count \d+ exceeds the limit"),
    "n_tensors_past_end": (lambda: small_model().patch_u64("header.n_tensors", 2**16),
                           r"tensor count 65536 needs at least 2097152 bytes"),
    "n_kv_past_end": (lambda: small_model().patch_u64("header.n_kv", 60000),
                      "key-value count 60000 needs at least"),
    # key-value pairs
    "key_length_minus_1": (lambda: one_kv(ARCH, "kv[0].key.len", 2**64 - 1),
                           r"kv\[0\].key at byte 24: string length \d+ exceeds the limit"),
    "key_length_past_end": (lambda: one_kv(ARCH, "kv[0].key.len", 4096),
                            r"kv\[0\].key.*string length 4096 needs"),
    "empty_key": (lambda: one_kv(KV("", V.UINT8, 1)), r"kv\[0\].key.*empty key"),
    "key_not_utf8": (lambda: one_kv(KV(b"a\xff", V.UINT8, 1)), "not valid UTF-8"),
    "bad_value_type": (lambda: one_kv(ARCH, "kv[0].type", 13, "<I"),
                       "general.architecture.*unknown value type 13"),
    "duplicate_key": (lambda: build([ARCH, ARCH], []), "duplicate key 'general.architecture'"),
    "alignment_13": (lambda: one_kv(KV("general.alignment", V.UINT32, 13)),
                     "general.alignment.*non-zero power of two, found 13"),
    "alignment_0": (lambda: one_kv(KV("general.alignment", V.UINT32, 0)),
                    "power of two, found 0"),
    "alignment_int32": (lambda: one_kv(KV("general.alignment", V.INT32, 32)),
                        "must be UINT32, found INT32"),
    "string_over_1_gib": (lambda: one_kv(ARCH, "kv[0].value.len", MAX_STRING_BYTES + 1),
                          r"string length 1073741825 exceeds the limit 1073741824"),
    "string_past_end": (lambda: one_kv(ARCH, "kv[0].value.len", 10**6),
                        "general.architecture.*string length 1000000 needs"),
    "string_not_utf8": (lambda: one_kv(KV("k", V.STRING, b"\xc3\x28")),
                        "k at byte 37: string is not valid UTF-8"),
    "array_length_2_63": (lambda: one_kv(KV("a", V.ARRAY, [], V.UINT8), "kv[0].value.count",
                                         2**63), "array length 9223372036854775808 exceeds"),
    "array_length_over_cap": (lambda: one_kv(KV("a", V.ARRAY, [], V.UINT8), "kv[0].value.count",
                                             MAX_ARRAY_ELEMENTS + 1), "exceeds the limit"),
    "array_past_end": (lambda: one_kv(KV("a", V.ARRAY, [1, 2], V.UINT32), "kv[0].value.count",
                                      300), "array length 300 needs at least 1200 bytes"),
    "string_array_element_past_end": (
        lambda: one_kv(KV("t", V.ARRAY, ["x", "y"], V.STRING), "kv[0].value[1].len", 2**20),
        r"t\[1\].*string length 1048576 needs"),
    "string_array_element_over_1_gib": (
        lambda: one_kv(KV("t", V.ARRAY, ["x", "y"], V.STRING), "kv[0].value[0].len", 2**31),
        r"t\[0\].*string length 2147483648 exceeds the limit"),
    "array_of_arrays": (lambda: one_kv(KV("a", V.ARRAY, [(V.UINT8, [1])], V.ARRAY)),
                        "array of arrays"),
    "array_bad_element_type": (lambda: one_kv(KV("a", V.ARRAY, [1], V.UINT8),
                                              "kv[0].value.etype", 99, "<I"),
                               "unknown value type 99"),
    # tensor infos
    "tensor_name_too_long": (lambda: one_tensor(tensors=[Tensor("x" * 64, Q.F32, (4,))]),
                             "tensor name length 64 exceeds the limit 63"),
    "tensor_name_not_utf8": (lambda: one_tensor(tensors=[Tensor(b"\xff", Q.F32, (4,))]),
                             "not valid UTF-8"),
    "n_dims_0": (lambda: one_tensor("tensor[0].n_dims", 0, "<I"),
                 "'blk.0.w'.*n_dims must be 1..4, found 0"),
    "n_dims_5": (lambda: one_tensor("tensor[0].n_dims", 5, "<I"), "n_dims must be 1..4, found 5"),
    "zero_dim": (lambda: one_tensor("tensor[1].ne[1]", 0), "'blk.0.w2'.*dimension must be >= 1"),
    "elements_overflow_int64": (
        lambda: one_tensor("tensor[0].ne[1]", 2**58), "'blk.0.w'.*elements overflow int64"),
    "n_bytes_past_end": (lambda: one_tensor("tensor[1].ne[1]", 2**40), "ends past the end"),
    "bad_ggml_type": (lambda: one_tensor("tensor[0].type", 4, "<I"), "unknown ggml type 4"),
    "ggml_type_minus_1": (lambda: one_tensor("tensor[0].type", 2**32 - 1, "<I"),
                          "unknown ggml type 4294967295"),
    "row_not_block_multiple": (lambda: one_tensor("tensor[0].ne[0]", 48),
                               "ne0=48 is not a multiple of the Q8_0 block size 32"),
    "offset_unaligned": (lambda: one_tensor("tensor[1].offset", 97),
                         "'blk.0.w2'.*offset 97 is not a multiple of the alignment 32"),
    "offset_past_end": (lambda: one_tensor("tensor[1].offset", 2**20), "ends past the end"),
    "offset_wraps_u64": (lambda: one_tensor("tensor[1].offset", 2**64 - 32), "ends past the end"),
    "overlapping_tensors": (lambda: one_tensor("tensor[1].offset", 64),
                            "overlaps tensor 'blk.0.w'"),
    "same_offset_tensors": (lambda: one_tensor("tensor[1].offset", 0), "overlaps tensor"),
    "duplicate_tensor_name": (lambda: one_tensor(tensors=[W, W]), "duplicate tensor name"),
    "mem_size_overflow": (lambda: one_tensor(tensors=[
        Tensor("a", Q.I8, (EXABYTE_I8,), data=b""), Tensor("b", Q.I8, (EXABYTE_I8,), data=b"")]),
        "ends past the end"),
    "data_section_past_end": (
        lambda: build([KV("general.alignment", V.UINT32, 2**31)], [W]),
        "data section starts at byte 2147483648"),
    # truncation
    "truncated_in_kv": (lambda: truncated(build(small_model_kvs(), []), "kv[16]", 5),
                        r"kv\[16\].key.*truncated"),
    "truncated_in_string_array": (
        lambda: one_kv(KV("t", V.ARRAY, ["x" * 40] * 3, V.STRING)).data[:100],
        r"t\[1\].*truncated"),
    "truncated_in_tensor_info": (lambda: truncated(small_model(), "tensor[2].ne[0]", 4),
                                 r"blk.0.attn_q.weight'.ne\[0\].*truncated"),
    "truncated_data": (lambda: small_model().data[:-600], "'output.weight'.*ends past the end"),
}


@pytest.mark.parametrize("case", CORRUPT)
def test_corrupt_file_raises_gguf_format_error_within_1s(tmp_path, case):
    make, message = CORRUPT[case]
    path = write(tmp_path, make())
    start = time.perf_counter()
    with pytest.raises(GGUFFormatError, match=message) as raised:
        GGUFModel.open(path)
    assert time.perf_counter() - start < 1.0
    error = raised.value
    assert str(path) in str(error) and error.offset is not None and error.field is not None


def test_array_length_2_63_bomb_fails_fast_with_bounded_memory(tmp_path):
    """gguf 0.19.0's reader loops forever on this file, growing RAM by ~120 MB/s (PR #27188)."""
    bomb = one_kv(KV("a", V.ARRAY, [], V.UINT8), "kv[0].value.count", 2**63)
    bomb = bomb.data[:bomb.fields["kv[0].value.count"] + 8]  # nothing after the count
    path = write(tmp_path, bomb)
    tracemalloc.start()
    try:
        start = time.perf_counter()
        with pytest.raises(GGUFFormatError, match="array length 9223372036854775808"):
            GGUFModel.open(path)
        elapsed_s = time.perf_counter() - start
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(bomb) < 64 and elapsed_s < 1.0
    assert peak_bytes < len(bomb) + 64 * 1024
