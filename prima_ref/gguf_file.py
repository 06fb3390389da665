"""Open a GGUF model by mmap, after validating every byte the header claims.

GGUF files come from untrusted hubs, so this parser is the front door (anchors.md c1). gguf-py's
own ``GGUFReader`` (0.19.0) trusts declared sizes: a file of a few dozen bytes declaring an
array of 2^63 elements makes it loop forever while RAM grows, and nested arrays recurse. So we
parse the header, metadata and tensor infos ourselves, with every count and length checked
against a hard cap *and* against the bytes actually left before anything is allocated, and
build the zero-copy tensor views from that parse. On valid files the metadata equals GGUFReader's.

File layout (v2/v3, little-endian):
    header      magic "GGUF" | version u32 | n_tensors u64 | n_kv u64
    n_kv x      key string | value type u32 | value      (string = u64 length + utf-8 bytes,
                                                          array = elem type u32 + u64 count + elems)
    n_tensors x name string | n_dims u32 | ne u64 x n_dims | ggml type u32 | offset u64
    padding     to general.alignment (default 32); data_offset is here
    data        each tensor at data_offset + offset, offset aligned

Opening reads only the header region; tensor bytes are never touched until a view is used, so
a ring rank pays page-ins only for the layers it runs.
"""

from __future__ import annotations

import math
import mmap
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf.constants import (
    GGML_QUANT_SIZES,
    GGUF_DEFAULT_ALIGNMENT,
    GGUF_MAGIC,
    GGMLQuantizationType,
    GGUFValueType,
)

# Hard caps, checked before the bytes-left check (anchors.md c1 rule 1; llama.cpp PR #19856).
MAX_STRING_BYTES = 1 << 30
MAX_ARRAY_ELEMENTS = 1 << 30
MAX_TENSORS = 1 << 16
MAX_KV = 1 << 16
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_TENSOR_NAME_BYTES = 63  # GGML_MAX_NAME = 64 including the NUL
MAX_ELEMENTS = 1 << 63  # ggml counts elements in int64
SUPPORTED_VERSIONS = (2, 3)

HEADER_BYTES = 4 + 4 + 8 + 8  # magic, version, n_tensors, n_kv
# Smallest possible records, to reject counts that cannot fit in the bytes left.
MIN_KV_BYTES = 8 + 1 + 4 + 1  # key length, 1-byte key, value type, u8 value
MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8  # name length, n_dims, one dim, type, offset

# struct format per scalar value type (little-endian); arrays of these become numpy arrays.
_SCALAR_FORMATS: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<B",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}
_ARRAY_DTYPES: dict[GGUFValueType, np.dtype] = {
    vtype: np.dtype(fmt) for vtype, fmt in _SCALAR_FORMATS.items()
}

_U64 = struct.Struct("<Q")
_LAYER_NAME = re.compile(r"blk\.([0-9]+)\.")


class GGUFFormatError(ValueError):
    """The file is not a GGUF file we can trust: says what, where, expected vs found."""

    def __init__(self, what: str, *, offset: int | None = None, field: str | None = None,
                 path: str | os.PathLike | None = None):
        self.what, self.offset, self.field, self.path = what, offset, field, path
        message = "invalid GGUF"
        if field is not None:
            message += f", {field}"
        if offset is not None:
            message += f" at byte {offset}"
        if path is not None:
            message = f"{path}: {message}"
        super().__init__(f"{message}: {what}")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # numpy order: GGUF ne reversed, innermost (ne0) last
    offset: int  # absolute byte offset in the file
    n_bytes: int

    @property
    def n_cols(self) -> int:
        return self.shape[-1]

    @property
    def n_rows(self) -> int:
        return math.prod(self.shape[:-1])

    @property
    def end(self) -> int:
        return self.offset + self.n_bytes


# ---------------------------------------------------------------------------------------------
# Bounded reading: the one place that slices the file


class _Span:
    """Bounds-checked reads over the mapped file; every slice of the file goes through take()."""

    def __init__(self, buf: memoryview, path: Path):
        self.buf = buf
        self.size = len(buf)
        self.path = path

    def take(self, offset: int, n_bytes: int, field: str) -> memoryview:
        if offset < 0 or n_bytes < 0 or offset + n_bytes > self.size:
            raise self.error(_truncated(n_bytes, offset, self.size), offset=offset, field=field)
        return self.buf[offset:offset + n_bytes]

    def strings(self, offset: int, n: int, field: str) -> tuple[list[str], int]:
        """n consecutive GGUF strings from offset: the vocab (262k strings in gemma 3).

        The checks of _Cursor.string inlined with local names, because this loop is most of
        the open time (~1 us per string). A numba length scan plus one bulk decode measured at
        most 1.5x faster: building 262k str objects dominates either way.
        """
        buf, size, cap, out = self.buf, self.size, MAX_STRING_BYTES, []
        unpack, append = _U64.unpack_from, out.append
        for i in range(n):
            if offset + 8 > size:
                raise self._string_error(offset, None, f"{field}[{i}]")
            (n_bytes,) = unpack(buf, offset)
            start = offset + 8
            offset = start + n_bytes
            if n_bytes > cap or offset > size:
                raise self._string_error(start - 8, n_bytes, f"{field}[{i}]")
            try:
                append(str(buf[start:offset], "utf-8"))
            except UnicodeDecodeError as e:
                raise self.error(f"string is not valid UTF-8 ({e.reason} at char {e.start})",
                                 offset=start - 8, field=f"{field}[{i}]") from None
        return out, offset

    def _string_error(self, at: int, n_bytes: int | None, field: str) -> GGUFFormatError:
        if n_bytes is None:
            return self.error(_truncated(8, at, self.size), offset=at, field=field)
        if n_bytes > MAX_STRING_BYTES:
            what = f"string length {n_bytes} exceeds the limit {MAX_STRING_BYTES}"
            return self.error(what, offset=at, field=field)
        what = (f"string length {n_bytes} needs at least {n_bytes} bytes but only "
                f"{self.size - at - 8} are left in the file")
        return self.error(what, offset=at, field=field)

    def left(self, offset: int) -> int:
        return self.size - offset

    def error(self, what: str, *, offset: int | None = None, field: str | None = None):
        return GGUFFormatError(what, offset=offset, field=field, path=self.path)


def _truncated(n_bytes: int, offset: int, size: int) -> str:
    return (f"needs {n_bytes} bytes but only {max(size - offset, 0)} are left in the "
            f"{size}-byte file (truncated or corrupt)")


class _Cursor:
    """Sequential reader over a _Span, tracking the offset for error messages."""

    def __init__(self, span: _Span, offset: int = 0):
        self.span = span
        self.pos = offset

    def unpack(self, fmt: str, field: str):
        n_bytes = struct.calcsize(fmt)
        value = struct.unpack(fmt, self.span.take(self.pos, n_bytes, field))[0]
        self.pos += n_bytes
        return value

    def raw(self, n_bytes: int, field: str) -> memoryview:
        view = self.span.take(self.pos, n_bytes, field)
        self.pos += n_bytes
        return view

    def count(self, field: str, cap: int, min_item_bytes: int, what: str) -> int:
        """A u64 count, checked against its cap and the bytes left, before anything uses it."""
        at = self.pos
        n = self.unpack("<Q", field)
        if n > cap:
            raise self.span.error(f"{what} {n} exceeds the limit {cap}", offset=at, field=field)
        if n * min_item_bytes > self.span.left(self.pos):
            raise self.span.error(
                f"{what} {n} needs at least {n * min_item_bytes} bytes but only "
                f"{self.span.left(self.pos)} are left in the file", offset=at, field=field)
        return n

    def string(self, field: str, cap: int = MAX_STRING_BYTES, what: str = "string length") -> str:
        at = self.pos
        n_bytes = self.count(field, cap, 1, what)
        try:
            return str(self.raw(n_bytes, field), "utf-8")
        except UnicodeDecodeError as e:
            raise self.span.error(f"string is not valid UTF-8 ({e.reason} at char {e.start})",
                                  offset=at, field=field) from None

    def value_type(self, field: str) -> GGUFValueType:
        at = self.pos
        raw = self.unpack("<I", field)
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise self.span.error(f"unknown value type {raw} (expected 0..12)",
                                  offset=at, field=field) from None


# ---------------------------------------------------------------------------------------------
# Header and metadata


def _read_header(cur: _Cursor) -> tuple[int, int, int]:
    span = cur.span
    if span.size < HEADER_BYTES:
        raise span.error(f"file is {span.size} bytes, shorter than the {HEADER_BYTES}-byte header",
                         offset=0, field="header")
    magic = cur.unpack("<I", "magic")
    if magic != GGUF_MAGIC:
        found = struct.pack("<I", magic)
        raise span.error(f"bad magic: expected b'GGUF', found {found!r}", offset=0, field="magic")
    version = cur.unpack("<I", "version")
    if version not in SUPPORTED_VERSIONS:
        hint = (" (looks like a big-endian file; only little-endian GGUF is supported)"
                if version & 0xFFFF == 0 and version else "")
        raise span.error(f"unsupported version {version}, expected 2 or 3{hint}",
                         offset=4, field="version")
    n_tensors = cur.count("header.n_tensors", MAX_TENSORS, MIN_TENSOR_INFO_BYTES, "tensor count")
    n_kv = cur.count("header.n_kv", MAX_KV, MIN_KV_BYTES, "key-value count")
    return version, n_tensors, n_kv


def _read_scalar(cur: _Cursor, vtype: GGUFValueType, field: str):
    if vtype == GGUFValueType.STRING:
        return cur.string(field)
    value = cur.unpack(_SCALAR_FORMATS[vtype], field)
    return bool(value) if vtype == GGUFValueType.BOOL else value


def _read_array(cur: _Cursor, field: str) -> list[str] | np.ndarray:
    at = cur.pos
    etype = cur.value_type(field + " (array element type)")
    if etype == GGUFValueType.ARRAY:
        raise cur.span.error("array of arrays (GGUF forbids nesting)", offset=at, field=field)
    if etype == GGUFValueType.STRING:
        n = cur.count(field, MAX_ARRAY_ELEMENTS, 8, "array length")  # 8: each string's length
        strings, cur.pos = cur.span.strings(cur.pos, n, field)
        return strings
    dtype = _ARRAY_DTYPES[etype]
    n = cur.count(field, MAX_ARRAY_ELEMENTS, dtype.itemsize, "array length")
    values = np.frombuffer(cur.raw(n * dtype.itemsize, field), dtype=dtype)  # (n,) view
    if etype == GGUFValueType.BOOL:
        return values != 0
    return values.astype(dtype.newbyteorder("="))  # a copy, so metadata does not pin the map


def _read_metadata(cur: _Cursor, n_kv: int) -> dict[str, object]:
    metadata: dict[str, object] = {}
    for i in range(n_kv):
        at = cur.pos
        key = cur.string(f"kv[{i}].key")
        if not key:
            raise cur.span.error("empty key", offset=at, field=f"kv[{i}].key")
        if key in metadata:
            raise cur.span.error(f"duplicate key {key!r}", offset=at, field=f"kv[{i}].key")
        vtype = cur.value_type(key)
        if vtype == GGUFValueType.ARRAY:
            metadata[key] = _read_array(cur, key)
        else:
            metadata[key] = _read_scalar(cur, vtype, key)
        if key == "general.alignment":
            _check_alignment(cur.span, metadata[key], vtype, at)
    return metadata


def _check_alignment(span: _Span, value: object, vtype: GGUFValueType, at: int) -> None:
    field = "general.alignment"
    if vtype != GGUFValueType.UINT32:
        raise span.error(f"type must be UINT32, found {vtype.name}", offset=at, field=field)
    if value == 0 or value & (value - 1):
        raise span.error(f"must be a non-zero power of two, found {value}", offset=at, field=field)


# ---------------------------------------------------------------------------------------------
# Tensor infos


@dataclass(frozen=True)
class _RawTensorInfo:
    name: str
    qtype: GGMLQuantizationType
    ne: tuple[int, ...]  # GGUF order, ne0 innermost
    rel_offset: int  # relative to data_offset, as stored
    info_offset: int  # where this record starts, for error messages


def _read_tensor_info(cur: _Cursor, index: int) -> _RawTensorInfo:
    at = cur.pos
    name = cur.string(f"tensor[{index}].name", MAX_TENSOR_NAME_BYTES, "tensor name length")
    field = f"tensor {name!r}"
    n_dims_at = cur.pos
    n_dims = cur.unpack("<I", field + ".n_dims")
    if not 1 <= n_dims <= MAX_DIMS:
        raise cur.span.error(f"n_dims must be 1..{MAX_DIMS}, found {n_dims}",
                             offset=n_dims_at, field=field)
    ne = tuple(cur.unpack("<Q", f"{field}.ne[{d}]") for d in range(n_dims))
    type_at = cur.pos
    raw_type = cur.unpack("<I", field + ".type")
    try:
        qtype = GGMLQuantizationType(raw_type)
    except ValueError:
        raise cur.span.error(f"unknown ggml type {raw_type}", offset=type_at, field=field) from None
    rel_offset = cur.unpack("<Q", field + ".offset")
    return _RawTensorInfo(name, qtype, ne, rel_offset, at)


def _tensor_n_bytes(span: _Span, raw: _RawTensorInfo) -> int:
    field = f"tensor {raw.name!r}"
    if any(d < 1 for d in raw.ne):
        raise span.error(f"every dimension must be >= 1, found ne={list(raw.ne)}",
                         offset=raw.info_offset, field=field)
    n_elements = 1
    for d in raw.ne:
        n_elements *= d  # Python ints: no overflow before the check below
    if n_elements >= MAX_ELEMENTS:
        raise span.error(f"{n_elements} elements overflow int64 (ne={list(raw.ne)})",
                         offset=raw.info_offset, field=field)
    block_size, type_size = GGML_QUANT_SIZES[raw.qtype]
    if raw.ne[0] % block_size:
        raise span.error(
            f"row length ne0={raw.ne[0]} is not a multiple of the {raw.qtype.name} block size "
            f"{block_size}", offset=raw.info_offset, field=field)
    return n_elements // block_size * type_size


def _place_tensor(span: _Span, raw: _RawTensorInfo, data_offset: int, alignment: int) -> TensorInfo:
    field = f"tensor {raw.name!r}"
    n_bytes = _tensor_n_bytes(span, raw)
    if raw.rel_offset % alignment:
        raise span.error(f"data offset {raw.rel_offset} is not a multiple of the alignment "
                         f"{alignment}", offset=raw.info_offset, field=field)
    start = data_offset + raw.rel_offset
    if start + n_bytes > span.size:
        raise span.error(
            f"data [{start}, {start + n_bytes}) ends past the end of the {span.size}-byte file",
            offset=raw.info_offset, field=field)
    shape = tuple(reversed(raw.ne))
    return TensorInfo(raw.name, raw.qtype, shape, start, n_bytes)


def _check_no_overlap(span: _Span, tensors: list[TensorInfo]) -> None:
    previous = None
    for t in sorted(tensors, key=lambda t: (t.offset, t.end)):
        if previous is not None and t.offset < previous.end:
            raise span.error(
                f"data [{t.offset}, {t.end}) overlaps tensor {previous.name!r} "
                f"[{previous.offset}, {previous.end})", offset=t.offset, field=f"tensor {t.name!r}")
        previous = t


def _read_tensors(cur: _Cursor, n_tensors: int,
                  alignment: int) -> tuple[dict[str, TensorInfo], int]:
    raws: list[_RawTensorInfo] = []
    seen: set[str] = set()
    for i in range(n_tensors):
        raw = _read_tensor_info(cur, i)
        if raw.name in seen:
            raise cur.span.error(f"duplicate tensor name {raw.name!r}", offset=raw.info_offset,
                                 field=f"tensor[{i}].name")
        seen.add(raw.name)
        raws.append(raw)
    data_offset = -(-cur.pos // alignment) * alignment
    if raws and data_offset > cur.span.size:
        raise cur.span.error(f"data section starts at byte {data_offset}, past the end of the "
                             f"{cur.span.size}-byte file", offset=cur.pos, field="padding")
    tensors = [_place_tensor(cur.span, raw, data_offset, alignment) for raw in raws]
    _check_no_overlap(cur.span, tensors)
    return {t.name: t for t in tensors}, data_offset


# ---------------------------------------------------------------------------------------------
# The model file


class GGUFModel:
    """A validated, read-only, memory-mapped GGUF file with zero-copy tensor views."""

    def __init__(self, path: Path, mm: mmap.mmap | None):
        self.path = path
        self._mm = mm
        self._span: _Span | None = _Span(memoryview(mm if mm is not None else b""), path)
        self.file_size = self._span.size
        self.version = 0
        self.alignment = GGUF_DEFAULT_ALIGNMENT
        self.data_offset = 0
        self.metadata: dict[str, object] = {}
        self.tensors: dict[str, TensorInfo] = {}
        # a repacked copy (prima_ref.repacked): the tensors whose bytes are repacked, and those
        # the copy does not hold (its holes: another rank's layers)
        self.packed: frozenset[str] = frozenset()
        self.absent: frozenset[str] = frozenset()

    @classmethod
    def open(cls, path: str | os.PathLike) -> GGUFModel:
        path = Path(path)
        model = cls(path, _map_read_only(path))
        try:
            model._parse()
        except BaseException:
            model.close()
            raise
        return model

    def _parse(self) -> None:
        cur = _Cursor(self._span)
        self.version, n_tensors, n_kv = _read_header(cur)
        self.metadata = _read_metadata(cur, n_kv)
        self.alignment = int(self.metadata.get("general.alignment", GGUF_DEFAULT_ALIGNMENT))
        self.tensors, self.data_offset = _read_tensors(cur, n_tensors, self.alignment)

    # --- metadata ---

    @property
    def architecture(self) -> str:
        return self.require("general.architecture", str)

    def get(self, key: str, default=None):
        return self.metadata.get(key, default)

    def require(self, key: str, types: type | tuple[type, ...] = object, *, dtype=None):
        """Metadata value that must exist and be of `types` (and, for numeric arrays, `dtype`)."""
        if key not in self.metadata:
            raise GGUFFormatError(f"required key {key!r} is missing", field=key, path=self.path)
        value = self.metadata[key]
        if not _is_instance(value, types):
            raise GGUFFormatError(f"expected {_type_names(types)}, found "
                                  f"{_describe(value)}", field=key, path=self.path)
        if dtype is not None and (not isinstance(value, np.ndarray) or value.dtype != dtype):
            raise GGUFFormatError(f"expected an array of {np.dtype(dtype)}, found "
                                  f"{_describe(value)}", field=key, path=self.path)
        return value

    # --- tensors ---

    def tensor_info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {name!r}") from None

    def tensor_bytes(self, name: str) -> np.ndarray:
        """uint8 (n_bytes,) read-only view into the file map; no copy, no read until used."""
        info = self.tensor_info(name)
        if name in self.absent:
            raise ValueError(f"{self.path}: this repacked copy does not hold {name!r} (it was "
                             f"filled for other layers); open it for the layers you use")
        return np.frombuffer(self._live_span().take(info.offset, info.n_bytes, name), np.uint8)

    def tensor_rows(self, name: str) -> np.ndarray:
        """uint8 (n_rows, row_bytes) read-only view into the file map."""
        info = self.tensor_info(name)
        return self.tensor_bytes(name).reshape(info.n_rows, info.n_bytes // info.n_rows)

    def layer_ranges(self) -> dict[int, tuple[int, int]]:
        """Layer index -> absolute [start, end) byte range covering all its blk.N.* tensors."""
        ranges: dict[int, tuple[int, int]] = {}
        for info in self.tensors.values():
            layer = _layer_of(info.name)
            if layer is None:
                continue
            start, end = ranges.get(layer, (info.offset, info.end))
            ranges[layer] = (min(start, info.offset), max(end, info.end))
        return dict(sorted(ranges.items()))

    def non_layer_tensors(self) -> list[str]:
        return [name for name in self.tensors if _layer_of(name) is None]

    # --- lifetime ---

    def _live_span(self) -> _Span:
        if self._span is None:
            raise ValueError(f"{self.path}: GGUF file is closed")
        return self._span

    def close(self) -> None:
        """Unmap; views handed out earlier keep their pages mapped until they are dropped."""
        span, mm, self._span, self._mm = self._span, self._mm, None, None
        try:
            if span is not None:
                span.buf.release()
            if mm is not None:
                mm.close()
        except BufferError:
            pass  # views handed out still reference the map; it is unmapped when they go

    def __enter__(self) -> GGUFModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._span is None else f"{len(self.tensors)} tensors"
        return f"GGUFModel({str(self.path)!r}, v{self.version}, {state})"


def _map_read_only(path: Path) -> mmap.mmap | None:
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return None  # mmap refuses empty files; the header check reports it
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def _layer_of(name: str) -> int | None:
    match = _LAYER_NAME.match(name)
    return int(match.group(1)) if match else None


def _is_instance(value: object, types: type | tuple[type, ...]) -> bool:
    types = types if isinstance(types, tuple) else (types,)
    if isinstance(value, bool) and bool not in types and object not in types:
        return False  # a BOOL value is not an acceptable int
    return isinstance(value, types)


def _type_names(types: type | tuple[type, ...]) -> str:
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join(t.__name__ for t in types)


def _describe(value: object) -> str:
    if isinstance(value, np.ndarray):
        return f"an array of {len(value)} {value.dtype}"
    if isinstance(value, list):
        return f"a list of {len(value)} strings"
    return f"{type(value).__name__} {value!r}"[:80]
