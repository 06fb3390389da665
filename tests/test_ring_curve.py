"""CurveZMQ on the ring (--curve KEYFILE): the same tokens and logits as a 1-rank run, and a
rank holding another key is refused at once with a message that says so, on both sides."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest
from ring_helpers import GEN_FLAGS, PROMPT, Children, cli, load_dump, write_plan

from prima_ref.ring.curve import CurveKeyError, load_key_file
from prima_ref.ring.worker import EXIT_REFUSED

N_PREDICT = 6


def _key(tmp_path, name):
    path = tmp_path / name
    out = subprocess.run([sys.executable, "-m", "prima_ref.ring.curve", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert path.stat().st_mode & 0o077 == 0  # the secret key is readable by its owner only
    return path


def _ring(tmp_path, model, key0, key1, timeout_s=120):
    plan_path, _ = write_plan(tmp_path, model, [10, 20])
    with Children(tmp_path) as ch:
        w = ch.start("rank1", cli("-m", model, "--plan", plan_path, "--rank", 1, "-t", "1",
                                  "--ring-timeout", "10", *(["--curve", key1] if key1 else [])))
        t0 = time.monotonic()
        h = ch.start("rank0", cli("-m", model, "--plan", plan_path, "--rank", 0, "-p", PROMPT,
                                  "-n", N_PREDICT, *GEN_FLAGS, "--ring-timeout", "60",
                                  *(["--curve", key0] if key0 else []),
                                  "--dump-logits", tmp_path / "ring.npz"))
        rc0 = h.wait(timeout_s)
        elapsed = time.monotonic() - t0
        rc1 = w.wait(30)
        return rc0, rc1, elapsed, ch.err("rank0"), ch.err("rank1")


def test_curve_ring_gives_the_same_tokens(tmp_path, smollm2_path):
    key = _key(tmp_path, "ring.key")
    with Children(tmp_path) as ch:
        p = ch.start("ref", cli("-m", smollm2_path, "-p", PROMPT, "-n", N_PREDICT, *GEN_FLAGS,
                                "--dump-logits", tmp_path / "ref.npz"))
        assert p.wait(120) == 0, ch.logs()
    ref_tokens, ref_logits = load_dump(tmp_path / "ref.npz")
    rc0, rc1, _, err0, err1 = _ring(tmp_path, smollm2_path, key, key)
    assert (rc0, rc1) == (0, 0), err0 + err1
    tokens, logits = load_dump(tmp_path / "ring.npz")
    assert tokens.tolist() == ref_tokens.tolist()
    assert np.array_equal(logits, ref_logits)


@pytest.mark.parametrize("worker_key", ["other", None])
def test_rank_with_another_key_is_refused_at_once(tmp_path, smollm2_path, worker_key):
    key = _key(tmp_path, "ring.key")
    other = _key(tmp_path, "other.key") if worker_key else None
    rc0, rc1, elapsed, err0, err1 = _ring(tmp_path, smollm2_path, key, other)
    assert rc0 != 0 and elapsed < 20, err0  # not the 60 s join timeout
    assert "CurveZMQ handshake" in err0 and "same key file" in err0, err0
    if worker_key:  # the rank with the wrong key leaves by itself, saying why
        assert rc1 == EXIT_REFUSED, err1
        assert "refusing to join" in err1 and "CurveZMQ" in err1, err1


def test_missing_or_broken_key_file_is_a_clear_error(tmp_path, smollm2_path):
    with pytest.raises(CurveKeyError, match="no CurveZMQ key file"):
        load_key_file(tmp_path / "absent.key")
    bad = tmp_path / "bad.key"
    bad.write_text('{"schema": "prima-ref/curve-key", "public": "x", "secret": "y"}')
    with pytest.raises(CurveKeyError, match="bad key fields|does not belong"):
        load_key_file(bad)
    plan_path, _ = write_plan(tmp_path, smollm2_path, [10, 20])
    out = subprocess.run(cli("-m", smollm2_path, "--plan", plan_path, "--rank", 1,
                             "--curve", tmp_path / "absent.key"),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "no CurveZMQ key file" in out.stderr, out.stderr
