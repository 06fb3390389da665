"""The golden test of the piped ring: greedy tokens and logits of a 1-rank run equal, bit for
bit, those of 2-, 3- and 4-rank rings of real processes on loopback (windows repeated k times,
uneven splits, rank 0 with no layers), started with prima.cpp's flags or with a plan file.

Same layers in the same order with the same kernels and the same prompt batches (-b 8) give
identical float32 results whatever the split, so equality is exact (np.array_equal).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from ring_helpers import GEN_FLAGS, PROMPT, Children, cli, free_port_base, load_dump, write_plan

from prima_ref.ring.launch import LocalRing

N_PREDICT = 12


def _reference(tmp_path_factory, model, name):
    d = tmp_path_factory.mktemp(f"ref-{name}")
    with Children(d) as ch:
        p = ch.start("rank0", cli("-m", model, "-p", PROMPT, "-n", N_PREDICT, *GEN_FLAGS,
                                  "--dump-logits", d / "ref.npz"))
        assert p.wait(120) == 0, ch.logs()
    tokens, logits = load_dump(d / "ref.npz")
    assert len(tokens) == N_PREDICT and logits.shape[0] == N_PREDICT
    return tokens, logits


@pytest.fixture(scope="module")
def smollm2_ref(tmp_path_factory, smollm2_path):
    return _reference(tmp_path_factory, smollm2_path, "smollm2")


@pytest.fixture(scope="module")
def gemma3_ref(tmp_path_factory, gemma3_path):
    return _reference(tmp_path_factory, gemma3_path, "gemma3")


def _run_plan_ring(tmp_path, model, sizes, worker_args=(), rank0_args=()):
    plan_path, plan = write_plan(tmp_path, model, sizes)
    with LocalRing(model, plan_path, worker_args=["-t", "1", *worker_args],
                   log_dir=tmp_path) as ring, Children(tmp_path) as ch:
        p = ch.start("rank0", cli("-m", model, "--plan", plan_path, "--rank", 0, "-p", PROMPT,
                                  "-n", N_PREDICT, *GEN_FLAGS, *rank0_args,
                                  "--dump-logits", tmp_path / "ring.npz"))
        rc = p.wait(180)
        codes = ring.wait(10)
        logs = ch.logs() + "".join(f"\n--- rank {r}\n{ring.log(r)[-2000:]}" for r in ring.procs)
        assert rc == 0, logs
        assert codes == {r: 0 for r in range(1, len(sizes))}, logs  # every worker left on STOP
    return (*load_dump(tmp_path / "ring.npz"), ch.err("rank0"), plan)


def _assert_same(ref, tokens, logits):
    ref_tokens, ref_logits = ref
    assert tokens.tolist() == ref_tokens.tolist()
    assert logits.dtype == np.float32 and np.array_equal(logits, ref_logits)


@pytest.mark.parametrize("sizes", [
    [2, 3],  # 2 ranks, W=5: k=6 rounds, rank 1 holds more
    [4, 3, 3],  # 3 ranks, k=3
    [1, 4, 7, 3],  # 4 ranks, W=15, k=2, very uneven
    [0, 2, 1, 2],  # rank 0 holds no layers: embedding and head only, k=6
], ids=lambda s: "lw" + "-".join(map(str, s)))
def test_ring_of_plan_equals_one_rank_smollm2(tmp_path, smollm2_path, smollm2_ref, sizes):
    tokens, logits, log0, _ = _run_plan_ring(tmp_path, smollm2_path, sizes)
    _assert_same(smollm2_ref, tokens, logits)
    assert "ring formed" in log0


def test_ring_with_prima_cpp_flags_equals_one_rank(tmp_path, smollm2_path, smollm2_ref):
    """No plan: --world/--rank/--master/--next/-lw/--data-port/--signal-port as in prima.cpp."""
    data, sig = free_port_base(3), free_port_base(3)
    ports = ["--data-port", data, "--signal-port", sig, "--world", 3]
    with Children(tmp_path) as ch:
        for r in (1, 2):
            ch.start(f"rank{r}", cli("-m", smollm2_path, *ports, "--rank", r, "--master",
                                     "127.0.0.1", "--next", "127.0.0.1", "-t", 1))
        p = ch.start("rank0", cli("-m", smollm2_path, *ports, "--rank", 0, "--next", "127.0.0.1",
                                  "-lw", "6,3,1", "-ngl", 0, "-p", PROMPT, "-n", N_PREDICT,
                                  *GEN_FLAGS, "--dump-logits", tmp_path / "ring.npz"))
        assert p.wait(180) == 0, ch.logs()
        assert ch.wait_all(10) == {"rank0": 0, "rank1": 0, "rank2": 0}, ch.logs()
    _assert_same(smollm2_ref, *load_dump(tmp_path / "ring.npz"))
    assert "k=3" in ch.err("rank0")


def test_prefetch_force_release_do_not_change_output(tmp_path, smollm2_path, smollm2_ref):
    flags = ["--prefetch", "--force", "--release", "always"]
    stats = tmp_path / "rank1.json"
    tokens, logits, log0, _ = _run_plan_ring(tmp_path, smollm2_path, [3, 2],
                                             worker_args=[*flags, "--stats-json", stats],
                                             rank0_args=flags)
    _assert_same(smollm2_ref, tokens, logits)
    s = json.loads(stats.read_text())
    assert s["release_active"] and s["prefetch"]
    assert s["steps"] > 0


@pytest.mark.slow
def test_ring_of_plan_equals_one_rank_gemma3(tmp_path, gemma3_path, gemma3_ref):
    """gemma3: sliding-window and global layers split across 3 ranks, k=3, uneven."""
    tokens, logits, _, _ = _run_plan_ring(tmp_path, gemma3_path, [2, 3, 1])
    _assert_same(gemma3_ref, tokens, logits)
