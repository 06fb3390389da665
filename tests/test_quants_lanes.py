"""The row-in-lane decode kernels (prima_ref.quants.lanes), which take every legacy-quant decode
product on 512-bit VNNI CPUs: each of 1..8 tokens bit-equal to the prefill tiles, whatever the
row count (tails of 1..15 rows, whose lanes must not be stored), the token count (padded to 1,
2, 4 or 8) or the entry point (legacy matvec, fused one-row, batched rows); llama.cpp's sums
up to float32 order; and found in Numba's cache by a second process."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType as T
from test_quants import gguf_dequant, llama_products, llama_x_values, random_rows, realistic_rows

from prima_ref.quants import batched, fused, kernels, lanes, legacy, tiled
from prima_ref.quants.layouts import LAYOUTS

LEGACY = [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1]
needs_lanes = pytest.mark.skipif(not lanes.available(), reason="CPU lacks AVX512-VNNI/BW")
_EMPTY = np.zeros(0, np.float32)


def _bits(a):
    return np.ascontiguousarray(a, np.float32).view(np.uint32)


@needs_lanes
@pytest.mark.parametrize("qtype", LEGACY, ids=lambda t: t.name)
@pytest.mark.parametrize("n_rows", [1, 15, 37])
def test_every_token_count_equals_the_prefill_tiles_bit_for_bit(qtype, n_rows):
    """Any bit pattern with finite scales; 37 rows = 2 groups of 16 and a tail of 5."""
    rng = np.random.default_rng(int(qtype) * 31 + n_rows)
    n_cols = 96  # 3 blocks: odd, so nothing pairs blocks by accident
    raw = random_rows(qtype, rng, n_rows, n_cols // LAYOUTS[qtype].block_size)
    raw.flags.writeable = False
    xs = rng.standard_normal((8, n_cols)).astype(np.float32)
    ref = tiled.matmul(int(qtype), raw, legacy.prepare_activations(xs))  # (8, n_rows)
    for n in range(1, 9):  # the 1-, 2-, 4- and 8-token kernels, padded for 3 and 5-7
        got = batched.group(int(qtype), (raw,), xs[:n])
        assert got.shape == (n, n_rows)
        assert np.array_equal(_bits(got), _bits(ref[:n])), n
    assert np.array_equal(_bits(kernels(qtype).matvec(raw, xs[0])), _bits(ref[0]))


@needs_lanes
@pytest.mark.parametrize("qtype", LEGACY, ids=lambda t: t.name)
def test_decode_entry_points_agree_with_each_other_and_llama_cpp(qtype):
    rng = np.random.default_rng(int(qtype) + 5)
    n_rows, n_cols = 53, 512
    raw = realistic_rows(qtype, rng, n_rows, n_cols)
    raw.flags.writeable = False
    xs = rng.standard_normal((7, n_cols)).astype(np.float32)
    ref = tiled.matmul(int(qtype), raw, legacy.prepare_activations(xs))
    kinds = np.array([int(qtype)], np.int64)
    for t, x in enumerate(xs):
        y = np.empty(n_rows, np.float32)
        fused.matvec_group((raw,), kinds, x, _EMPTY, np.float32(0), _EMPTY, y)
        assert np.array_equal(_bits(y), _bits(ref[t]))
        assert np.array_equal(_bits(kernels(qtype).matvec(raw, x)), _bits(ref[t]))
        llama = llama_products(qtype, raw, x)
        scale = np.abs(gguf_dequant(raw, qtype).astype(np.float64)) @ np.abs(
            llama_x_values(qtype, x))
        assert np.all(np.abs(y - llama) <= 2e-6 * scale + 1e-30)
    for n in range(2, 8):
        assert np.array_equal(_bits(batched.group(int(qtype), (raw,), xs[:n])), _bits(ref[:n]))


@needs_lanes
@pytest.mark.parametrize("qtype", LEGACY, ids=lambda t: t.name)
@pytest.mark.parametrize("n_rows", [16, 48])
def test_a_repacked_matrix_gives_the_row_major_bits(qtype, n_rows):
    """repack interleaves each 16-row group's blocks (a permutation of the bytes: undone by
    the inverse transpose), and matmul_packed (any token count, 8 a pass) over it gives
    matvec's and the prefill tiles' bits; any bit pattern with finite scales, 5 blocks
    a row (odd, as a row's next block is 16 blocks on)."""
    rng = np.random.default_rng(int(qtype) * 13 + n_rows)
    bb, nb = LAYOUTS[qtype].type_size, 5
    raw = random_rows(qtype, rng, n_rows, nb)
    raw.flags.writeable = False
    packed = lanes.repack(raw, bb)
    assert packed.shape == raw.shape
    back = packed.reshape(n_rows // 16, nb, 16, bb).transpose(0, 2, 1, 3).reshape(raw.shape)
    assert np.array_equal(back, raw)
    assert np.array_equal(lanes.unpack(packed, bb), raw)  # what the GPU upload takes
    assert np.array_equal(packed[0, :bb], raw[0, :bb])
    assert np.array_equal(packed[0, bb:2 * bb], raw[1, :bb])  # row 1's block 0 next
    x = rng.standard_normal(nb * 32).astype(np.float32)
    ref = tiled.matmul(int(qtype), raw, legacy.prepare_activations(x[None, :]))[0]
    y = lanes.matmul_packed(int(qtype), packed, x[None, :])[0]
    assert np.array_equal(_bits(y), _bits(ref))
    assert np.array_equal(_bits(y), _bits(kernels(qtype).matvec(raw, x)))
    xs = rng.standard_normal((19, nb * 32)).astype(np.float32)
    ref = tiled.matmul(int(qtype), raw, legacy.prepare_activations(xs))  # (19, n_rows)
    for n in (1, 3, 8, 19):  # the 1-, 4- and 8-token kernels; 19 = 8 + 8 + 3 (padded to 4)
        got = lanes.matmul_packed(int(qtype), packed, xs[:n])
        assert np.array_equal(_bits(got), _bits(ref[:n])), n
    tiles = tiled.matmul(int(qtype), packed, legacy.prepare_activations(xs), packed=True)
    assert np.array_equal(_bits(tiles), _bits(ref))  # prefill over the repacked layout


@needs_lanes
def test_repack_takes_whole_16_row_groups_only():
    raw = np.zeros((17, 34), np.uint8)
    with pytest.raises(ValueError, match="16-row groups"):
        lanes.repack(raw, 34)
    with pytest.raises(ValueError, match="16-row groups"):
        lanes.repack(np.zeros((16, 35), np.uint8), 34)
    with pytest.raises(ValueError, match="16-row groups"):
        lanes.matmul_packed(int(T.Q8_0), raw, np.zeros((2, 32), np.float32))
    with pytest.raises(ValueError, match="16-row groups"):
        tiled.matmul(int(T.Q8_0), raw, legacy.prepare_activations(np.zeros((9, 32), np.float32)),
                     packed=True)
    with pytest.raises(ValueError, match="34-byte rows"):
        lanes.matmul_packed(int(T.Q8_0), np.zeros((16, 34), np.uint8),
                            np.zeros((2, 64), np.float32))


@needs_lanes
@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q5_K], ids=lambda t: t.name)
@pytest.mark.parametrize("n_rows", [1, 15, 37])
def test_k_quant_decode_equals_the_prefill_tiles_bit_for_bit(qtype, n_rows):
    """lanes' K kernels for 1..8 tokens, and the decode products they are where decode takes
    them (k_quants' matmul, fused.kq_matvec; not on Zen 5: lanes.K_DECODE_KINDS), against the
    K prefill tiles, on any bit pattern with finite scales; 3 super-blocks a row."""
    rng = np.random.default_rng(int(qtype) * 17 + n_rows)
    n_cols = 768
    raw = random_rows(qtype, rng, n_rows, n_cols // LAYOUTS[qtype].block_size)
    raw.flags.writeable = False
    xs = rng.standard_normal((8, n_cols)).astype(np.float32)
    ref = tiled.matmul_k(int(qtype), raw, xs)  # (8, n_rows)
    decodes = int(qtype) in lanes.K_DECODE_KINDS
    for n in range(1, 9):
        got = lanes.matmul_k(int(qtype), raw, xs[:n])
        assert got.shape == (n, n_rows)
        assert np.array_equal(_bits(got), _bits(ref[:n])), n
        if decodes:
            assert np.array_equal(_bits(kernels(qtype).matmul(raw, xs[:n])), _bits(got)), n
    if not decodes:
        return
    y = np.empty(n_rows, np.float32)
    fused.kq_matvec(raw, int(qtype), xs[0], _EMPTY, np.float32(0), _EMPTY, _EMPTY, y)
    assert np.array_equal(_bits(y), _bits(ref[0]))


@needs_lanes
def test_matrices_of_a_group_do_not_overwrite_each_other():
    """Several matrices in one call, each ending in a partial group of 16 rows: a tail lane
    stored would land on the next matrix's first rows. Mixed types in the one-row kernel."""
    rng = np.random.default_rng(9)
    n_cols = 256
    types = (T.Q5_0, T.Q8_0, T.Q4_1)
    raws = tuple(realistic_rows(q, rng, n, n_cols) for q, n in zip(types, (21, 3, 18), strict=True))
    for r in raws:
        r.flags.writeable = False
    x = rng.standard_normal(n_cols).astype(np.float32)
    residual = rng.standard_normal(42).astype(np.float32)
    y = np.full(42, np.nan, np.float32)
    fused.matvec_group(raws, np.array([int(q) for q in types], np.int64), x, _EMPTY,
                       np.float32(0), residual, y)
    alone = np.concatenate([kernels(q).matvec(r, x) for q, r in zip(types, raws, strict=True)])
    assert np.array_equal(_bits(y), _bits(residual + alone))
    same = tuple(realistic_rows(T.Q4_0, rng, n, n_cols) for n in (21, 3, 18))
    for r in same:
        r.flags.writeable = False
    xs = rng.standard_normal((3, n_cols)).astype(np.float32)
    res = rng.standard_normal((3, 42)).astype(np.float32)
    got = batched.group(int(T.Q4_0), same, xs, residual=res)
    for t in range(3):
        one = np.concatenate([kernels(T.Q4_0).matvec(r, xs[t]) for r in same])
        assert np.array_equal(_bits(got[t]), _bits(res[t] + one))


@needs_lanes
def test_padded_token_counts_store_only_the_real_rows():
    """3, 5, 6 and 7 rows run the 4- and 8-token kernels; the result must hold exactly n rows
    and no write may go past them (ys is exactly (n, n_rows), so a stray store would corrupt
    the heap or the neighbour checked here)."""
    rng = np.random.default_rng(4)
    raw = realistic_rows(T.Q4_1, rng, 40, 128)
    raw.flags.writeable = False
    big = rng.standard_normal((8, 128)).astype(np.float32)
    full = batched.group(int(T.Q4_1), (raw,), big)
    for n in (3, 5, 6, 7):
        got = batched.group(int(T.Q4_1), (raw,), big[:n].copy())
        assert got.shape == (n, 40)
        assert np.array_equal(_bits(got), _bits(full[:n]))


CACHE_CHILD = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[1])
    import numpy as np
    from gguf.constants import GGMLQuantizationType as T
    from test_quants import realistic_rows
    from prima_ref.quants import batched, lanes
    rng = np.random.default_rng(0)
    raw = realistic_rows(T.Q4_0, rng, 20, 256)
    raw.flags.writeable = False
    x = rng.standard_normal(256).astype(np.float32)
    y = np.empty(20, np.float32)
    lanes.matvec(raw, int(T.Q4_0), 18, x, y)
    batched.group(int(T.Q4_0), (raw,), rng.standard_normal((3, 256)).astype(np.float32))
    group = batched._KERNELS[(int(T.Q4_0), True)][0]
    for fn in (lanes.matvec, group):
        print(sum(fn.stats.cache_hits.values()), sum(fn.stats.cache_misses.values()))
""")


@needs_lanes
def test_a_second_process_finds_the_lanes_kernels_in_numbas_cache(tmp_path):
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    tests = str(Path(__file__).parent)
    runs = [subprocess.run([sys.executable, "-c", CACHE_CHILD, tests], env=env, text=True,
                           capture_output=True, timeout=600) for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr[-3000:]
    assert runs[0].stdout.split() == ["0", "1", "0", "1"]  # compiled, stored
    assert runs[1].stdout.split() == ["1", "0", "1", "0"]  # found, not compiled


VNNI_ONLY_TYPES = (T.Q4_1, T.Q5_0, T.Q5_1, T.Q5_K)  # every changed path
VNNI_ONLY_CHILD = textwrap.dedent("""
    import hashlib, sys
    sys.path.insert(0, sys.argv[1])
    import numpy as np
    from test_quants_lanes import VNNI_ONLY_TYPES, products_digests
    from prima_ref.quants import tiled
    print(int(tiled.VBMI), int(tiled.GFNI))
    for qtype in VNNI_ONLY_TYPES:
        print(*products_digests(qtype))
""")


def products_digests(qtype):
    """sha1 of a prefill (tiles) and a decode (lanes) product of one fixed matrix."""
    import hashlib

    raw = realistic_rows(qtype, np.random.default_rng(int(qtype)), 21, 512)
    xs = np.random.default_rng(1).standard_normal((9, 512)).astype(np.float32)
    k = kernels(qtype)
    return [hashlib.sha1(np.ascontiguousarray(ys).tobytes()).hexdigest()
            for ys in (k.matmul(raw, xs), k.matvec(raw, xs[0]))]


@needs_lanes
@pytest.mark.skipif(not (tiled.VBMI or tiled.GFNI), reason="CPU lacks AVX512-VBMI and GFNI")
def test_plain_vnni_code_gives_the_bits_of_the_vbmi_and_gfni_code(tmp_path):
    """PRIMA_VNNI_ONLY=1 (what a CPU with AVX512-VNNI but without VBMI / GFNI gets) moves Q5's
    5th bits with a shift and a vpermd table instead of vpmultishiftqb, and nibbles and bits
    with shifts and masks instead of vgf2p8affineqb: prefill and decode keep every bit."""
    tests = str(Path(__file__).parent)
    env = {**os.environ, "PRIMA_VNNI_ONLY": "1", "NUMBA_CACHE_DIR": str(tmp_path)}
    run = subprocess.run([sys.executable, "-c", VNNI_ONLY_CHILD, tests], env=env, text=True,
                         capture_output=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.strip().splitlines()
    assert lines[0] == "0 0"
    assert lines[1:] == [" ".join(products_digests(q)) for q in VNNI_ONLY_TYPES]
