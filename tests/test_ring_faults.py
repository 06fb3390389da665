"""Faults of the ring, with real processes: a worker killed mid-generation, Ctrl-C on rank 0, a
rank that never comes, a wrong model, and malformed or stale messages thrown at live ranks.
No test leaves a process behind, even when it fails."""

from __future__ import annotations

import json
import re
import signal
import time

import numpy as np
import pytest
import zmq
from ring_helpers import GEN_FLAGS, PROMPT, Children, cli, load_dump, write_plan

from prima_ref.ring import protocol as P
from prima_ref.ring.topology import Layout, RingSetupError, load_plan

LONG = ["-n", "400", "-c", "512", "--temp", "0", "-t", "1"]


def _start_ring(ch: Children, model, plan_path, world: int, rank0_args):
    for r in range(1, world):
        ch.start(f"rank{r}", cli("-m", model, "--plan", plan_path, "--rank", r, "-t", 1))
    return ch.start("rank0", cli("-m", model, "--plan", plan_path, "--rank", 0, *rank0_args))


def _wait_generating(ch: Children, n_chars: int = 20, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while len(ch.out("rank0")) < n_chars:
        assert ch.procs["rank0"].poll() is None, ch.logs()
        assert time.monotonic() < deadline, ch.logs()
        time.sleep(0.02)


def test_dead_worker_fails_request_within_5s(tmp_path, smollm2_path):
    plan_path, _ = write_plan(tmp_path, smollm2_path, [4, 3, 3], ctx=512)
    with Children(tmp_path) as ch:
        head = _start_ring(ch, smollm2_path, plan_path, 3, ["-p", "Once upon a time", *LONG])
        _wait_generating(ch)
        ch.procs["rank2"].send_signal(signal.SIGKILL)
        t_kill = time.monotonic()
        rc = head.wait(10)
        elapsed = time.monotonic() - t_kill
        assert rc == 3, ch.logs()
        assert elapsed < 5.0, f"rank 0 took {elapsed:.1f} s"
        err = ch.err("rank0")
        assert re.search(r"request failed: rank 2 at 127\.0\.0\.1 \(data port \d+", err), err
        codes = ch.wait_all(10)  # rank 1 leaves on STOP (or on rank 0's silence)
        assert all(c is not None for c in codes.values()), codes


def test_ctrl_c_on_rank0_stops_every_rank(tmp_path, smollm2_path):
    plan_path, _ = write_plan(tmp_path, smollm2_path, [2, 3], ctx=512)
    with Children(tmp_path) as ch:
        head = _start_ring(ch, smollm2_path, plan_path, 2, ["-p", "Once upon a time", *LONG])
        _wait_generating(ch)
        head.send_signal(signal.SIGINT)
        assert head.wait(10) == 130, ch.logs()
        codes = ch.wait_all(5)
        assert codes["rank1"] == 0, ch.logs()  # it got STOP, not a timeout
        assert "STOP from rank 0" in ch.err("rank1")


def test_unreachable_rank_is_named_with_host_and_port(tmp_path, smollm2_path):
    plan_path, plan = write_plan(tmp_path, smollm2_path, [4, 3, 3])
    with Children(tmp_path) as ch:
        ch.start("rank1", cli("-m", smollm2_path, "--plan", plan_path, "--rank", 1, "--ring-timeout", 4))
        head = ch.start("rank0", cli("-m", smollm2_path, "--plan", plan_path, "--rank", 0,
                                     "--ring-timeout", 3, "-p", "Hi", "-n", 4))
        assert head.wait(30) == 3, ch.logs()
        port = plan["ranks"][2]["data_port"]
        assert f"rank 2 at 127.0.0.1 (data port {port}" in ch.err("rank0")
        assert "never joined (nothing listens there)" in ch.err("rank0")
        assert ch.wait_all(10)["rank1"] is not None


def test_wrong_model_is_refused(tmp_path, smollm2_path):
    plan_path, _ = write_plan(tmp_path, smollm2_path, [2, 3], sha256="0" * 64)
    with Children(tmp_path) as ch:
        w = ch.start("rank1", cli("-m", smollm2_path, "--plan", plan_path, "--rank", 1))
        h = ch.start("rank0", cli("-m", smollm2_path, "--plan", plan_path, "--rank", 0, "-p", "Hi"))
        assert w.wait(30) == 2 and h.wait(30) != 0, ch.logs()
        assert "refusing to join" in ch.err("rank1") and "refusing to run" in ch.err("rank0")


def _session(ch: Children) -> int:
    m = re.search(r"session ([0-9a-f]{8})", ch.err("rank0"))
    return int(m.group(1), 16) if m else 0


def _garbage(session: int, n_embd: int) -> list[list[bytes]]:
    good = P.Header(P.DATA, 0, session, 1, 1, 0, 1, n_embd).pack()
    x = np.ones((1, n_embd), np.float32).tobytes()
    pos = np.zeros(1, np.int32).tobytes()
    return [
        [b"junk"],  # no header
        [b"XXXX" + good[4:], pos, x],  # bad magic
        [P.Header(P.DATA, 0, session, 1, 1, 0, 1, n_embd).pack(), pos, x[:-4]],  # short payload
        [P.Header(P.DATA, 0, session, 1, 1, 0, 9999, n_embd).pack(), pos, x],  # too many tokens
        [P.Header(P.DATA, 0, session ^ 1, 99, 99, 0, 1, n_embd).pack(), pos, x],  # other session
        [P.Header(P.DATA, 0, session, 0, 1, 0, 1, n_embd).pack(), pos, x],  # stale: the join probe's step
        [P.Header(P.KV, 0, session, 0, 0, 0, 0, P.KV_END).pack()],  # stale KV clear: would wipe the cache
        [P.Header(P.STOP, 0, session ^ 1, 0, 0, 0).pack(), b"{}"],  # forged STOP, wrong session
        [P.Header(P.CONFIG, 0, session, 0, 0, 0).pack(), b"{not json"],
    ]


def test_malformed_and_stale_messages_do_not_change_output(tmp_path, smollm2_path):
    from test_ring import N_PREDICT

    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    with Children(ref_dir) as ch:
        p = ch.start("rank0", cli("-m", smollm2_path, "-p", PROMPT, "-n", N_PREDICT, *GEN_FLAGS,
                                  "--dump-logits", ref_dir / "ref.npz"))
        assert p.wait(120) == 0, ch.logs()
    plan_path, plan = write_plan(tmp_path, smollm2_path, [2, 3])
    ctx = zmq.Context()
    socks = []
    try:
        with Children(tmp_path) as ch:
            head = _start_ring(ch, smollm2_path, plan_path, 2,
                               ["-p", PROMPT, "-n", N_PREDICT, *GEN_FLAGS,
                                "--dump-logits", tmp_path / "ring.npz"])
            assert ch.wait_for_text("rank0", "ring formed", 60), ch.logs()
            session = _session(ch)
            for r in (0, 1):
                for port in (plan["ranks"][r]["data_port"], plan["ranks"][r]["signal_port"]):
                    s = ctx.socket(zmq.PUSH)
                    s.setsockopt(zmq.LINGER, 0)
                    s.connect(f"tcp://127.0.0.1:{port}")
                    socks.append(s)
            n_sent = 0
            while head.poll() is None:  # keep throwing garbage at both ranks while they generate
                for s in socks:
                    for frames in _garbage(session, 576):
                        P.send_nowait(s, frames)
                        n_sent += 1
                time.sleep(0.05)
            assert head.wait(60) == 0, ch.logs()
            assert ch.wait_all(10)["rank1"] == 0, ch.logs()
            assert n_sent > 0
            assert "dropped" in ch.err("rank1") and "dropped" in ch.err("rank0")
    finally:
        for s in socks:
            s.close()
        ctx.term()
    ref_tokens, ref_logits = load_dump(ref_dir / "ref.npz")
    tokens, logits = load_dump(tmp_path / "ring.npz")
    assert tokens.tolist() == ref_tokens.tolist() and np.array_equal(logits, ref_logits)


# -- fast checks without processes ------------------------------------------------------------

def test_lw_must_divide_the_layers():
    with pytest.raises(RingSetupError, match="does not divide"):
        Layout.from_window_sizes([4, 4, 4], 30)
    with pytest.raises(RingSetupError, match="at least 1 layer"):
        Layout.from_window_sizes([5, 0, 5], 30)
    lay = Layout.from_window_sizes([0, 2, 1, 2], 30)
    assert lay.k == 6 and lay.windows[1][0] == (0, 1) and lay.windows[3][5] == (28, 29)
    assert lay.layers_of(0) == []


def test_plan_with_overlapping_layers_is_rejected(tmp_path, smollm2_path):
    plan_path, plan = write_plan(tmp_path, smollm2_path, [2, 3])
    plan["ranks"][0]["layers"][0] = [2, 3, 4]  # layer 2 is also rank 1's
    plan_path.write_text(json.dumps(plan))
    with pytest.raises(RingSetupError, match="exactly once"):
        load_plan(plan_path)


@pytest.mark.parametrize("frames,reason", [
    ([b"short"], "header is 5 bytes"),
    ([P.Header(P.DATA, 0, 1, 1, 1, 0, 2, 8).pack(), b"\0" * 8, b"\0" * 60], "disagree"),
    ([P.Header(P.DATA, 0, 1, 1, 1, 0, 2, 16).pack(), b"\0" * 8, b"\0" * 128], "width 16"),
    ([P.Header(P.KV, 0, 1, 1, 1, 0, 5, 3).pack()], "reversed"),
    ([P.Header(P.HELLO, 1, 0, 0, 0, 0).pack(), b"[1]"], "not a JSON object"),
])
def test_protocol_rejects_malformed_frames(frames, reason):
    with pytest.raises(P.ProtocolError, match=reason):
        P.parse(frames, n_embd=8, max_tokens=4)


def test_wait_readable_spins_then_blocks_and_times_out(monkeypatch):
    """A message already queued is seen while spinning; with none, the wait ends after the
    spin plus the blocking poll's timeout, never sooner and never much later."""
    ctx = zmq.Context()
    try:
        pull = ctx.socket(zmq.PULL)
        port = pull.bind_to_random_port("tcp://127.0.0.1")
        push = ctx.socket(zmq.PUSH)
        push.connect(f"tcp://127.0.0.1:{port}")
        t0 = time.perf_counter()
        assert not P.wait_readable(pull, 50, 0.02)
        waited = time.perf_counter() - t0
        assert 0.06 <= waited < 2.0
        push.send(b"x")
        assert P.wait_readable(pull, 2000, 0.5)
        assert pull.recv(zmq.NOBLOCK) == b"x"
        push.send(b"y")
        assert P.wait_readable(pull, 2000, 0.0)  # no spin: a plain poll
        assert pull.recv(zmq.NOBLOCK) == b"y"
    finally:
        ctx.destroy(linger=0)
    monkeypatch.setenv("PRIMA_RING_SPIN_MS", "0")
    assert P.spin_seconds() == 0.0
    monkeypatch.setenv("PRIMA_RING_SPIN_MS", "5")
    assert P.spin_seconds() == 0.005
    for bad in ("soon", "-1", "5000"):
        monkeypatch.setenv("PRIMA_RING_SPIN_MS", bad)
        with pytest.raises(ValueError, match="PRIMA_RING_SPIN_MS"):
            P.spin_seconds()
    monkeypatch.delenv("PRIMA_RING_SPIN_MS")
    assert P.spin_seconds() == P.DEFAULT_SPIN_MS / 1e3
