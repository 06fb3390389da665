"""Write small GGUF files byte by byte, recording where every integer field sits.

Tests build a valid file, then corrupt it at a named field (`crafted.patch_u64("kv[0].len",
2**63)`), so every corruption class is "valid file + one change" as in llama.cpp's
tests/test-gguf.cpp. Deliberately independent of gguf-py's writer, and permissive: it will
write arrays of arrays, duplicate keys and anything else a test asks for.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import gguf
import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

V = GGUFValueType
Q = GGMLQuantizationType

SCALAR_FORMATS = {
    V.UINT8: "<B", V.INT8: "<b", V.UINT16: "<H", V.INT16: "<h", V.UINT32: "<I", V.INT32: "<i",
    V.FLOAT32: "<f", V.BOOL: "<?", V.UINT64: "<Q", V.INT64: "<q", V.FLOAT64: "<d",
}


@dataclass(frozen=True)
class KV:
    key: str | bytes
    vtype: GGUFValueType | int
    value: object
    elem_type: GGUFValueType | int | None = None  # arrays; ARRAY elements are (etype, values)


@dataclass(frozen=True)
class Tensor:
    name: str | bytes
    qtype: GGMLQuantizationType | int
    ne: tuple[int, ...]  # GGUF order: ne0 (innermost) first
    data: bytes | None = None  # None: deterministic filler of the right size


def tensor_n_bytes(qtype: GGMLQuantizationType, ne: tuple[int, ...]) -> int:
    block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
    return int(np.prod(ne, dtype=object)) // block_size * type_size


@dataclass
class Crafted:
    data: bytearray
    fields: dict[str, int] = field(default_factory=dict)  # field name -> byte offset
    tensor_offsets: dict[str, int] = field(default_factory=dict)  # name -> absolute data offset
    data_offset: int = 0
    data_end: int = 0  # end of the last tensor's bytes, before the final padding

    def patch(self, name: str, fmt: str, value) -> Crafted:
        struct.pack_into(fmt, self.data, self.fields[name], value)
        return self

    def patch_u32(self, name: str, value: int) -> Crafted:
        return self.patch(name, "<I", value)

    def patch_u64(self, name: str, value: int) -> Crafted:
        return self.patch(name, "<Q", value)

    def __bytes__(self) -> bytes:
        return bytes(self.data)


class _Writer:
    def __init__(self):
        self.buf = bytearray()
        self.fields: dict[str, int] = {}

    def put(self, fmt: str, value, name: str | None = None) -> None:
        if name is not None:
            self.fields[name] = len(self.buf)
        self.buf += struct.pack(fmt, value)

    def string(self, s: str | bytes, name: str) -> None:
        raw = s.encode() if isinstance(s, str) else s
        self.put("<Q", len(raw), name + ".len")
        self.buf += raw

    def value(self, vtype, value, elem_type, name: str) -> None:
        if vtype == V.STRING:
            self.string(value, name)
        elif vtype == V.ARRAY:
            self.put("<I", elem_type, name + ".etype")
            self.put("<Q", len(value), name + ".count")
            for i, item in enumerate(value):
                sub_type, sub_value = (item if elem_type == V.ARRAY else (None, item))
                self.value(elem_type, sub_value, sub_type, f"{name}[{i}]")
        else:
            self.put(SCALAR_FORMATS[V(vtype)], value, name)

    def pad_to(self, alignment: int) -> None:
        self.buf += bytes(-len(self.buf) % alignment)


def build(kvs: list[KV], tensors: list[Tensor], *, version: int = 3, magic: bytes = b"GGUF",
          alignment: int = 32) -> Crafted:
    """A GGUF file; tensors are laid out in order, each at the next aligned offset.

    `alignment` only places the data; add a general.alignment KV to declare anything but 32.
    """
    w = _Writer()
    w.buf += magic
    w.put("<I", version, "header.version")
    w.put("<Q", len(tensors), "header.n_tensors")
    w.put("<Q", len(kvs), "header.n_kv")
    for i, kv in enumerate(kvs):
        w.fields[f"kv[{i}]"] = len(w.buf)
        w.string(kv.key, f"kv[{i}].key")
        w.put("<I", kv.vtype, f"kv[{i}].type")
        w.value(kv.vtype, kv.value, kv.elem_type, f"kv[{i}].value")
    rel_offsets = _layout(tensors, alignment)
    for i, (t, rel) in enumerate(zip(tensors, rel_offsets, strict=True)):
        w.fields[f"tensor[{i}]"] = len(w.buf)
        w.string(t.name, f"tensor[{i}].name")
        w.put("<I", len(t.ne), f"tensor[{i}].n_dims")
        for d, n in enumerate(t.ne):
            w.put("<Q", n, f"tensor[{i}].ne[{d}]")
        w.put("<I", t.qtype, f"tensor[{i}].type")
        w.put("<Q", rel, f"tensor[{i}].offset")
    w.pad_to(alignment)
    data_offset = len(w.buf)
    for t, rel in zip(tensors, rel_offsets, strict=True):
        w.buf += bytes(data_offset + rel - len(w.buf))
        w.buf += _tensor_data(t)
    data_end = len(w.buf)
    w.pad_to(alignment)
    placed = zip(tensors, rel_offsets, strict=True)
    offsets = {_text(t.name): data_offset + rel for t, rel in placed}
    return Crafted(w.buf, w.fields, offsets, data_offset, data_end)


def _layout(tensors: list[Tensor], alignment: int) -> list[int]:
    offsets, pos = [], 0
    for t in tensors:
        offsets.append(pos)
        pos += len(_tensor_data(t))
        pos += -pos % alignment
    return offsets


def _tensor_data(t: Tensor) -> bytes:
    if t.data is not None:
        return t.data
    n_bytes = tensor_n_bytes(t.qtype, t.ne)
    return bytes((i * 7 + len(t.ne)) & 0xFF for i in range(n_bytes))


def _text(s: str | bytes) -> str:
    return s if isinstance(s, str) else s.decode("utf-8", "replace")


def small_model_kvs(n_layers: int = 2) -> list[KV]:
    """Llama-ish metadata with one KV of every value type, arrays of strings, floats, bools."""
    return [
        KV("general.architecture", V.STRING, "llama"),
        KV("general.name", V.STRING, "crafted ünïcode"),
        KV("llama.block_count", V.UINT32, n_layers),
        KV("test.u8", V.UINT8, 200), KV("test.i8", V.INT8, -100),
        KV("test.u16", V.UINT16, 60000), KV("test.i16", V.INT16, -30000),
        KV("test.i32", V.INT32, -(2**31)), KV("test.f32", V.FLOAT32, 0.1),
        KV("test.bool", V.BOOL, True), KV("test.u64", V.UINT64, 2**64 - 1),
        KV("test.i64", V.INT64, -(2**63)), KV("test.f64", V.FLOAT64, -1.5e300),
        KV("tokenizer.ggml.tokens", V.ARRAY, ["<s>", "</s>", "a", "", "▁the"], V.STRING),
        KV("tokenizer.ggml.scores", V.ARRAY, [0.0, -1.5, 2.25, 3.0, 1e-3], V.FLOAT32),
        KV("tokenizer.ggml.token_type", V.ARRAY, [3, 3, 1, 1, 1], V.INT32),
        KV("test.bools", V.ARRAY, [True, False, True], V.BOOL),
        KV("test.empty", V.ARRAY, [], V.UINT64),
    ]


def small_model(n_layers: int = 2, alignment: int = 32) -> Crafted:
    """A 9 KB llama-shaped file: every value type, quantized and float tensors, 2 layers."""
    kvs = small_model_kvs(n_layers)
    if alignment != 32:
        kvs.append(KV("general.alignment", V.UINT32, alignment))
    tensors = [Tensor("token_embd.weight", Q.Q8_0, (64, 5))]
    for layer in range(n_layers):
        tensors += [
            Tensor(f"blk.{layer}.attn_norm.weight", Q.F32, (64,)),
            Tensor(f"blk.{layer}.attn_q.weight", Q.Q4_1, (64, 64)),
            Tensor(f"blk.{layer}.ffn_down.weight", Q.Q4_K, (256, 2)),
        ]
    tensors += [Tensor("output_norm.weight", Q.F16, (64,)),
                Tensor("output.weight", Q.Q6_K, (256, 5))]
    return build(kvs, tensors, alignment=alignment)


# ---------------------------------------------------------------------------------------------
# Checks shared by the load and fuzz tests


def file_view(model) -> np.ndarray:
    return np.frombuffer(model._mm, np.uint8)  # (file_size,) the whole map, to check addresses


def assert_metadata_equals_reader(model, reader: gguf.GGUFReader) -> None:
    keys = [k for k in reader.fields if not k.startswith("GGUF.")]  # reader's header pseudo-keys
    assert list(model.metadata) == keys
    for key in keys:
        expected, ours = reader.fields[key].contents(), model.metadata[key]
        if isinstance(ours, np.ndarray):
            assert ours.tolist() == expected, key
        else:
            assert ours == expected and type(ours) is type(expected), key


def assert_views_equal_reader(model, reader: gguf.GGUFReader) -> None:
    whole = file_view(model)
    assert list(model.tensors) == [t.name for t in reader.tensors]
    for rt in reader.tensors:
        info, view = model.tensors[rt.name], model.tensor_bytes(rt.name)
        expected = (rt.data_offset, rt.n_bytes, rt.tensor_type)
        assert (info.offset, info.n_bytes, info.qtype) == expected
        assert info.shape == tuple(reversed(rt.shape.tolist()))
        assert np.array_equal(view, rt.data.reshape(-1).view(np.uint8)), rt.name
        assert np.shares_memory(view, whole) and view.ctypes.data - whole.ctypes.data == info.offset
        assert not view.flags.writeable
