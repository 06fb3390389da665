"""The register-tiled prefill kernels (prima_ref.quants.tiled, taken above 8 tokens): every row
lane, token slot, scale, min and high bit lands where it belongs, with tails of rows (not a
multiple of 16) and tokens (not a multiple of 8), and the sums are llama.cpp's."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType as T
from test_quants import gguf_dequant, llama_products, llama_x_values, random_rows, realistic_rows

from prima_ref.quants import kernels, lanes, legacy, tiled
from prima_ref.quants.layouts import LAYOUTS

TILED = [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q4_K, T.Q5_K, T.Q6_K]
K_TYPES = (T.Q4_K, T.Q5_K, T.Q6_K)
needs_tiles = pytest.mark.skipif(not tiled.available(), reason="CPU lacks AVX512-VNNI/BW")


@pytest.fixture(autouse=True)
def _tiled_on(monkeypatch):
    """The tiled prefill kernels are on by default where available; a PRIMA_TILED=0 in the
    environment must not turn these tests into tests of the other path."""
    monkeypatch.delenv("PRIMA_TILED", raising=False)


def nse(y, ref):
    return float(((y - ref) ** 2).sum() / (ref**2).sum())


@needs_tiles
@pytest.mark.parametrize("qtype", TILED, ids=lambda t: t.name)
@pytest.mark.parametrize("n_tokens", [9, 17, 64])
def test_tiled_products_are_llama_cpps_up_to_float32_summation(qtype, n_tokens):
    rng = np.random.default_rng(int(qtype) * 7 + n_tokens)
    n_rows, n_cols = 37, 512  # 2 full row tiles and a tail of 5
    raw = realistic_rows(qtype, rng, n_rows, n_cols)
    xs = rng.standard_normal((n_tokens, n_cols)).astype(np.float32)
    ref = np.stack([llama_products(qtype, raw, x) for x in xs])  # (n_tokens, n_rows)
    w_abs = np.abs(gguf_dequant(raw, qtype).astype(np.float64))
    scale = np.stack([w_abs @ np.abs(llama_x_values(qtype, x)) for x in xs])  # sum |w x|
    ys = kernels(qtype).matmul(raw, xs)
    assert ys.shape == (n_tokens, n_rows)
    assert np.all(np.abs(ys - ref) <= 2e-6 * scale + 1e-30)
    assert nse(ys, xs.astype(np.float64) @ gguf_dequant(raw, qtype).astype(np.float64).T) <= 5e-4


@needs_tiles
@pytest.mark.parametrize("qtype", TILED, ids=lambda t: t.name)
def test_tiled_products_equal_token_by_token_on_any_bit_pattern(qtype):
    rng = np.random.default_rng(int(qtype) + 11)
    n_cols = 512
    raw = random_rows(qtype, rng, 21, n_cols // LAYOUTS[qtype].block_size)
    xs = rng.standard_normal((10, n_cols)).astype(np.float32)
    k = kernels(qtype)
    ys = k.matmul(raw, xs)
    one_by_one = np.stack([k.matvec(raw, x) for x in xs])
    if lanes.available() and (qtype not in K_TYPES or int(qtype) in lanes.K_DECODE_KINDS):
        # decode sums in the tiles' order (prima_ref.quants.lanes)
        assert np.array_equal(ys, one_by_one)
    assert nse(ys, one_by_one) < 1e-10


@needs_tiles
def test_shared_activations_serve_every_legacy_type_in_prefill():
    xs = np.random.default_rng(3).standard_normal((12, 256)).astype(np.float32)
    act = legacy.prepare_activations(xs)
    for qtype in (T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1):
        raw = realistic_rows(qtype, np.random.default_rng(int(qtype)), 19, 256)
        assert np.array_equal(legacy.matmul_prepared(qtype, raw, act),
                              kernels(qtype).matmul(raw, xs))


CACHE_CHILD = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[1])
    import numpy as np
    from gguf.constants import GGMLQuantizationType as T
    from test_quants import realistic_rows
    from prima_ref.quants import kernels, tiled
    rng = np.random.default_rng(0)
    for qtype in (T.Q4_1, T.Q4_K):
        raw = realistic_rows(qtype, rng, 20, 256)
        kernels(qtype).matmul(raw, rng.standard_normal((9, 256)).astype(np.float32))
        key = (int(qtype), False) if qtype == T.Q4_1 else int(qtype)  # legacy: (kind, packed)
        stats = tiled._KERNELS[key].stats
        print(qtype.name, sum(stats.cache_hits.values()), sum(stats.cache_misses.values()))
""")


@needs_tiles
def test_a_second_process_finds_the_tiled_kernels_in_numbas_cache(tmp_path):
    """The drivers close over numbers only (the per-type code is chosen through a literal
    kind), so Numba's cache keys them: a new prima-cli/server must not compile them again."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    env.pop("PRIMA_TILED", None)
    tests = str(Path(__file__).parent)
    runs = [subprocess.run([sys.executable, "-c", CACHE_CHILD, tests], env=env, text=True,
                           capture_output=True, timeout=600) for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr[-3000:]
    assert runs[0].stdout.split() == ["Q4_1", "0", "1", "Q4_K", "0", "1"]  # compiled, stored
    assert runs[1].stdout.split() == ["Q4_1", "1", "0", "Q4_K", "1", "0"]  # found, not compiled
