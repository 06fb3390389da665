"""Speculative decoding over a 3-rank ring of real processes on loopback: the draft runs whole on
rank 0, each verification is one pass round the ring with n_draft + 1 rows (DATA_ROWS: every
rank takes them one at a time, bit-equal to one-token passes), rejected positions leave every
rank's KV cache (a KV command round the ring), and the greedy tokens equal those of the target
alone on one device.
"""

from __future__ import annotations

import json
import re

from ring_helpers import GEN_FLAGS, Children, cli, load_dump, write_plan
from test_speculative import (
    KQUANTS,
    SMOLLM2_PROMPT,
    first_difference,
    synth_draft,  # noqa: F401  (the fixture, shared)
)

from prima_ref.ring.launch import LocalRing

N_PREDICT = 40
PROMPT = SMOLLM2_PROMPT
DRAFT_FLAGS = ["--draft-max", 7, "--draft-min", 1, "--draft-p-min", 0.3]


def _ring_run(tmp_path, target, draft, sizes, n_predict, prompt=PROMPT):
    """Reference (target alone, one device) and a ring with the draft on rank 0: dumps, log."""
    with Children(tmp_path) as ch:
        p = ch.start("ref", cli("-m", target, "-p", prompt, "-n", n_predict, *GEN_FLAGS,
                                "--dump-logits", tmp_path / "ref.npz"))
        assert p.wait(180) == 0, ch.logs()
    plan_path, _ = write_plan(tmp_path, target, sizes)
    stats = tmp_path / "rank1.json"
    with LocalRing(target, plan_path, worker_args=["-t", "1", "--stats-json", stats],
                   log_dir=tmp_path) as ring, Children(tmp_path) as ch:
        p = ch.start("rank0", cli("-m", target, "--plan", plan_path, "--rank", 0, "-md", draft,
                                  *DRAFT_FLAGS, "-p", prompt, "-n", n_predict, *GEN_FLAGS,
                                  "--dump-logits", tmp_path / "ring.npz"))
        rc = p.wait(240)
        codes = ring.wait(10)
        logs = ch.logs() + "".join(f"\n--- rank {r}\n{ring.log(r)[-2000:]}" for r in ring.procs)
        assert rc == 0, logs
        assert codes == {r: 0 for r in range(1, len(sizes))}, logs
    ref_tokens, ref_logits = load_dump(tmp_path / "ref.npz")
    tokens, _ = load_dump(tmp_path / "ring.npz")
    assert tokens.tolist() == ref_tokens.tolist(), first_difference(
        ref_tokens.tolist(), tokens.tolist(), list(ref_logits))
    log0 = ch.err("rank0")
    m = re.search(r"\[spec\] drafted (\d+), accepted (\d+) .*?(\d+) target passes", log0)
    assert m, log0
    drafted, accepted, passes = map(int, m.groups())
    return drafted, accepted, passes, json.loads(stats.read_text()), log0


def test_ring_greedy_with_draft_equals_one_device_without(tmp_path, smollm2_q8_0_path,
                                                          smollm2_path):
    drafted, accepted, passes, stats1, log0 = _ring_run(tmp_path, smollm2_q8_0_path, smollm2_path,
                                                        [4, 3, 3], N_PREDICT)
    assert accepted > 0 and passes < N_PREDICT // 3, log0
    # rank 1 ran its k=3 windows once per pass round the ring: far fewer passes than tokens
    assert stats1["steps"] == 3 * (passes + _prompt_batches(log0))


def test_ring_greedy_with_draft_synthetic_kquant_pair_exact(tmp_path, synth_draft):  # noqa: F811
    """A 3-layer K-quant target, one layer per rank; a Q4_0 requantisation of it drafts
    (accepted and rejected tokens both occur)."""
    drafted, accepted, passes, _, log0 = _ring_run(tmp_path, KQUANTS, synth_draft, [1, 1, 1], 40,
                                                   prompt="Once upon a time, in a small village")
    assert 0 < accepted < drafted, log0


def _prompt_batches(log0: str) -> int:
    n = int(re.search(r"prompt eval time = .*?/\s*(\d+) tokens", log0).group(1))
    return -(-n // 8)  # -b 8
