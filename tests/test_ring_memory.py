"""A ring rank under a cgroup v1 memory limit well below its share of the weights completes
with the same tokens and logits as a 1-rank run: its weights sit in the page cache, so the
limit evicts and re-reads them instead of killing the rank (issue 6, memory pressure).

The model is tests/ring_helpers.big_model (~490 MB synthetic llama, built once into the model
cache), so the weights, not the interpreter's own ~80 MB, are what the limit squeezes.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from ring_helpers import (
    GEN_FLAGS,
    PROMPT,
    Children,
    big_model,
    cgroup_remove,
    cgroup_v1_child,
    cli,
    drop_page_cache,
    in_cgroup,
    load_dump,
    write_plan,
)

from prima_ref.ring.launch import LocalRing

N_PREDICT = 6
LIMIT_MIB = 200  # rank 1 serves 24 of 32 layers, ~370 MB


@pytest.fixture
def cgroup():
    cg = cgroup_v1_child("prima-ring-test")
    if cg is None:
        pytest.skip("no writable cgroup v1 memory controller at /sys/fs/cgroup/memory "
                    "(containers and CI runners often lack one)")
    yield cg
    cgroup_remove(cg)


@pytest.mark.slow
def test_rank_under_memory_limit_gives_same_tokens(tmp_path, cgroup):
    model = big_model()
    with Children(tmp_path) as ch:
        p = ch.start("ref", cli("-m", model, "-p", PROMPT, "-n", N_PREDICT, *GEN_FLAGS,
                                "--dump-logits", tmp_path / "ref.npz"))
        assert p.wait(180) == 0, ch.logs()
    ref_tokens, ref_logits = load_dump(tmp_path / "ref.npz")
    assert len(set(ref_tokens.tolist())) > 1  # a model that says something, not one token

    (cgroup / "memory.limit_in_bytes").write_text(str(LIMIT_MIB << 20))
    drop_page_cache(model)  # cold: rank 1's pages are charged to its cgroup as it reads them
    plan_path, _ = write_plan(tmp_path, model, [1, 3])  # k=8, rank 1: 8 windows of 3 layers
    stats_path = tmp_path / "rank1.json"
    with LocalRing(model, plan_path, ranks=[], log_dir=tmp_path) as ring, Children(tmp_path) as ch:
        ring.start(1, ["-t", "1", "--release", "--prefetch", "--stats-json", str(stats_path)],
                   prefix=in_cgroup(cgroup))
        p = ch.start("rank0", cli("-m", model, "--plan", plan_path, "--rank", 0, "-p", PROMPT,
                                  "-n", N_PREDICT, *GEN_FLAGS,
                                  "--dump-logits", tmp_path / "ring.npz"))
        rc = p.wait(300)
        codes = ring.wait(15)
        logs = ch.logs() + f"\n--- rank 1\n{ring.log(1)[-3000:]}"
    assert rc == 0 and codes == {1: 0}, logs
    tokens, logits = load_dump(tmp_path / "ring.npz")
    assert tokens.tolist() == ref_tokens.tolist()
    assert np.array_equal(logits, ref_logits)

    stats = json.loads(stats_path.read_text())
    assert stats["share_bytes"] > 1.5 * (LIMIT_MIB << 20)  # the limit is well below the share
    assert stats["release_active"] and stats["prefetch"]
    assert int((cgroup / "memory.failcnt").read_text()) > 0  # the limit was hit, not idle
    assert int((cgroup / "memory.max_usage_in_bytes").read_text()) <= LIMIT_MIB << 20
