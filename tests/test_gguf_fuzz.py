"""Fuzzing the GGUF loader: mutated files either load cleanly or raise GGUFFormatError.

Never another exception, a crash, a hang or an allocation sized by a lie (anchors.md c1). A
SIGALRM timer turns a hang into a failure, since hypothesis' deadline only reports slowness
after the example returns.
"""

import contextlib
import math
import os
import signal
import struct
import tracemalloc

import gguf
import numpy as np
import pytest
from gguf_craft import (
    KV,
    SCALAR_FORMATS,
    Q,
    Tensor,
    V,
    assert_metadata_equals_reader,
    assert_views_equal_reader,
    build,
    small_model,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prima_ref.gguf_file import GGUFFormatError, GGUFModel

BASE = small_model()  # 9 KB: 18 KVs of every type, 9 tensors, 2 layers
BASE_BYTES = bytes(BASE.data)
HEADER_END = BASE.data_offset  # mutations mostly land here; tensor data is opaque bytes
DATA_END = BASE.data_end
EXAMPLE_TIME_LIMIT_S = 2.0

FUZZ = settings(deadline=1000, suppress_health_check=[HealthCheck.too_slow])

INTERESTING_U64 = [0, 1, 2, 7, 31, 32, 33, 63, 64, 255, 2**16, 2**30, 2**30 + 1, 2**31, 2**32 - 1,
                   2**32, 2**62, 2**63 - 1, 2**63, 2**64 - 32, 2**64 - 1, len(BASE_BYTES),
                   len(BASE_BYTES) - HEADER_END, HEADER_END]
u64s = st.sampled_from(INTERESTING_U64) | st.integers(0, 2**64 - 1)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("gguf_fuzz") / "mutant.gguf"


@contextlib.contextmanager
def time_limit(seconds: float):
    def on_alarm(signum, frame):
        raise TimeoutError(f"GGUF open took longer than {seconds} s (hang?)")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def write_fresh(path, data: bytes) -> None:
    """A new inode per example, so no earlier map can see the file change under it."""
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def load_or_reject(path, data: bytes) -> bool:
    """The only allowed outcomes: a load whose views all lie in the file, or GGUFFormatError."""
    write_fresh(path, data)
    try:
        with time_limit(EXAMPLE_TIME_LIMIT_S), GGUFModel.open(path) as model:
            check_loaded(model, len(data))
        return True
    except GGUFFormatError as e:
        assert e.offset is None or 0 <= e.offset <= len(data)
        return False


def check_loaded(model: GGUFModel, size: int) -> None:
    assert model.version in (2, 3)
    assert model.data_offset <= size or not model.tensors
    end = model.data_offset
    for info in sorted(model.tensors.values(), key=lambda t: t.offset):
        assert end <= info.offset and info.end <= size, info  # in the file, no overlap
        assert info.offset % model.alignment == 0
        end = info.end
        rows = model.tensor_rows(info.name)
        assert rows.shape[0] == info.n_rows and rows.size == info.n_bytes
        assert math.prod(info.shape) >= 1
    for start, stop in model.layer_ranges().values():
        assert model.data_offset <= start < stop <= size


# ---------------------------------------------------------------------------------------------
# Mutations of a valid file

positions = st.integers(0, HEADER_END - 1) | st.integers(0, len(BASE_BYTES) - 1)


@settings(FUZZ, max_examples=1500)
@given(flips=st.lists(st.tuples(positions, st.integers(0, 255)), min_size=1, max_size=8))
def test_byte_flips_load_or_raise_format_error(scratch, flips):
    data = bytearray(BASE_BYTES)
    for pos, byte in flips:
        data[pos] = byte
    load_or_reject(scratch, bytes(data))


@settings(FUZZ, max_examples=400)
@given(length=st.integers(0, DATA_END - 1))
def test_truncated_files_raise_format_error(scratch, length):
    assert not load_or_reject(scratch, BASE_BYTES[:length])


FIELD_NAMES = sorted(BASE.fields)


@settings(FUZZ, max_examples=1500)
@given(field=st.sampled_from(FIELD_NAMES), value=u64s, width=st.sampled_from(["<Q", "<I"]))
def test_grown_counts_and_lengths_load_or_raise_with_bounded_memory(scratch, field, value, width):
    """A count, length, type, dim or offset replaced: the allocation-bomb vector, so memory too."""
    data = bytearray(BASE_BYTES)
    struct.pack_into(width, data, BASE.fields[field], value % 2 ** (8 * struct.calcsize(width)))
    tracemalloc.start()
    try:
        load_or_reject(scratch, bytes(data))
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak_bytes < 4 * len(data) + 256 * 1024  # never sized by a declared count


@settings(FUZZ, max_examples=800)
@given(pos=st.integers(0, HEADER_END - 8), value=u64s)
def test_random_u64_in_header_region_loads_or_raises(scratch, pos, value):
    data = bytearray(BASE_BYTES)
    struct.pack_into("<Q", data, pos, value)
    load_or_reject(scratch, bytes(data))


@settings(FUZZ, max_examples=300)
@given(cut=st.integers(24, HEADER_END), tail=st.binary(max_size=64))
def test_garbage_after_a_cut_loads_or_raises(scratch, cut, tail):
    load_or_reject(scratch, BASE_BYTES[:cut] + tail)


# ---------------------------------------------------------------------------------------------
# Random valid files round-trip, and equal gguf-py's reader

SCALAR_VALUES = {
    V.UINT8: st.integers(0, 2**8 - 1), V.INT8: st.integers(-(2**7), 2**7 - 1),
    V.UINT16: st.integers(0, 2**16 - 1), V.INT16: st.integers(-(2**15), 2**15 - 1),
    V.UINT32: st.integers(0, 2**32 - 1), V.INT32: st.integers(-(2**31), 2**31 - 1),
    V.UINT64: st.integers(0, 2**64 - 1), V.INT64: st.integers(-(2**63), 2**63 - 1),
    V.FLOAT32: st.floats(width=32, allow_nan=False), V.FLOAT64: st.floats(allow_nan=False),
    V.BOOL: st.booleans(), V.STRING: st.text(max_size=24),
}
ELEMENT_TYPES = list(SCALAR_VALUES)


@st.composite
def kv_values(draw):
    vtype = draw(st.sampled_from(ELEMENT_TYPES + [V.ARRAY]))
    if vtype != V.ARRAY:
        return vtype, draw(SCALAR_VALUES[vtype]), None
    etype = draw(st.sampled_from(ELEMENT_TYPES))
    return vtype, draw(st.lists(SCALAR_VALUES[etype], max_size=12)), etype


TENSOR_TYPES = [Q.F32, Q.F16, Q.BF16, Q.I8, Q.I32, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q4_K,
                Q.Q6_K, Q.IQ4_NL]


@st.composite
def tensor_specs(draw):
    names = draw(st.lists(st.text(min_size=1, max_size=12) | st.builds(
        "blk.{}.{}".format, st.integers(0, 3), st.sampled_from(["attn_q", "ffn_up"])),
        max_size=6, unique=True))
    tensors = []
    for name in names:
        qtype = draw(st.sampled_from(TENSOR_TYPES))
        block_size = gguf.GGML_QUANT_SIZES[qtype][0]
        ne0 = block_size * draw(st.integers(1, 2 if block_size > 1 else 40))
        rest = draw(st.lists(st.integers(1, 3), max_size=3))
        tensors.append(Tensor(name, qtype, (ne0, *rest)))
    return tensors


@settings(FUZZ, max_examples=200)
@given(kvs=st.dictionaries(st.text(min_size=1, max_size=16), kv_values(), max_size=8),
       tensors=tensor_specs(), alignment=st.sampled_from([1, 8, 32, 64, 256]),
       version=st.sampled_from([2, 3]))
def test_random_valid_files_round_trip_and_equal_gguf_reader(scratch, kvs, tensors, alignment,
                                                             version):
    specs = [KV(key, *value) for key, value in kvs.items() if key != "general.alignment"]
    specs.append(KV("general.alignment", V.UINT32, alignment))
    crafted = build(specs, tensors, alignment=alignment, version=version)
    assert load_or_reject(scratch, bytes(crafted.data)), "a valid file was rejected"
    with GGUFModel.open(scratch) as model:
        for spec in specs:
            assert_value_round_trips(model.metadata[spec.key], spec)
        assert {n: t.offset for n, t in model.tensors.items()} == crafted.tensor_offsets
        for t in tensors:
            start = crafted.tensor_offsets[t.name]
            expected = crafted.data[start:start + model.tensors[t.name].n_bytes]
            assert model.tensor_bytes(t.name).tobytes() == expected
        reader = gguf.GGUFReader(scratch)
        assert_metadata_equals_reader(model, reader)
        assert_views_equal_reader(model, reader)


def assert_value_round_trips(ours, spec: KV) -> None:
    if spec.vtype == V.ARRAY and spec.elem_type == V.STRING:
        assert ours == spec.value
    elif spec.vtype == V.ARRAY:
        expected = np.array(spec.value, dtype=np.dtype(SCALAR_FORMATS[spec.elem_type]))
        assert ours.dtype == expected.dtype and np.array_equal(ours, expected)
    elif spec.vtype == V.FLOAT32:
        assert ours == float(np.float32(spec.value))
    else:
        assert ours == spec.value and type(ours) is type(spec.value)
