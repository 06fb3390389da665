"""KV slots for prima-server's -np: sequences in different slots do not see each other, a
batched decode of several slots gives bit for bit what each would alone, and the ring's wire format
carries slot ids (single-slot frames stay as they were)."""

from __future__ import annotations

import numpy as np
import pytest

from prima_ref.engine import Engine
from prima_ref.ring import protocol as P

A = [1, 504, 3101, 1129, 253, 6431, 30]
B = [1, 19841, 314, 260, 1789, 28, 2, 216, 4471]


@pytest.fixture(scope="module")
def engines(smollm2_path):
    return Engine(smollm2_path, n_ctx=64, n_batch=8, n_slots=3), Engine(smollm2_path, n_ctx=64, n_batch=8)


def test_slots_are_isolated_and_batched_decode_matches_alone(engines):
    multi, single = engines
    ref_a = single.eval(A)
    single.kv_remove(0)
    ref_b = single.eval(B)
    # B in slot 2, A in slot 1, some other text in slot 0: each prompt's logits as alone
    multi.eval([1, 42, 43, 44], slot=0)
    got_b = multi.eval(B, slot=2)
    got_a = multi.eval(A, slot=1)
    assert np.array_equal(got_a, ref_a) and np.array_equal(got_b, ref_b)
    # one decode step for slots 1 and 2 together vs each sequence stepped alone, one token:
    # the batched decode kernels give every row the one-row path's bits
    assert multi.model.batched_decode
    ta, tb = int(np.argmax(ref_a)), int(np.argmax(ref_b))
    both = multi.decode([1, 2], [ta, tb])
    for row, seq, tok in ((0, A, ta), (1, B, tb)):
        single.kv_remove(0)
        single.eval(seq)
        assert np.array_equal(both[row], single.eval([tok]))
    assert multi.slot_tokens[1] == A + [ta] and multi.slot_tokens[2] == B + [tb]
    # slot 0 untouched by all of it: its next step equals a fresh single-slot run
    single.kv_remove(0)
    single.eval([1, 42, 43, 44])
    assert np.array_equal(multi.decode([0], [45])[0], single.eval([45]))


def test_decode_rejects_a_slot_twice_and_a_full_context(engines):
    multi, _ = engines
    with pytest.raises(ValueError, match="twice"):
        multi.decode([1, 1], [5, 6])


def test_wire_format_carries_slots():
    h = P.Header(P.DATA, 0, 7, 1, 1, 0)
    x = np.ones((3, 4), np.float32)
    pos = np.array([5, 9, 2])
    frames = P.data_frames(h, pos, x)
    assert len(bytes(frames[1])) == 12  # single slot: the frame as before slots existed
    assert P.parse([bytes(f) for f in frames]).slots is None
    frames = P.data_frames(h, pos, x, np.array([0, 2, 1]))
    msg = P.parse([bytes(f) for f in frames])
    assert msg.positions.tolist() == [5, 9, 2] and msg.slots.tolist() == [0, 2, 1]
    kv = P.Header(P.KV, 0, 7, 1, 2, 0, 3, P.KV_END)
    assert P.parse(P.kv_frames(kv)).slot == 0 and len(P.kv_frames(kv)) == 1
    assert P.parse(P.kv_frames(kv, 5)).slot == 5
    with pytest.raises(P.ProtocolError):
        P.parse([kv.pack(), b"\0\0"])


def test_server_flags_refuse_wildcard_cors_and_know_loopback(capsys):
    from prima_ref.server import _check_args, build_parser, is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")
    p = build_parser()
    for argv, why in ((["--cors-origin", "*"], "is refused"), (["-np", "0"], "-np"),
                      (["--rank", "1"], "rank 0")):
        with pytest.raises(SystemExit):
            _check_args(p, p.parse_args(argv))
        assert why in capsys.readouterr().err


@pytest.mark.parametrize("params", [
    dict(),  # llama.cpp's defaults: top-k 40, top-p 0.95, min-p 0.05, temp 0.8
    dict(temperature=1.5, top_p=1.0, min_p=0.0, top_k=5),
    dict(temperature=0.7, repeat_penalty=1.3, top_k=100),
], ids=["defaults", "k5", "penalty"])
def test_top_k_partition_draws_the_tokens_of_the_full_vocabulary_draw(params):
    from prima_ref.sampling import Sampler, SamplingParams

    rng = np.random.default_rng(3)
    sp = SamplingParams(seed=11, **params)
    full, fast = Sampler(sp), Sampler(sp)
    for step in range(300):
        logits = (rng.standard_normal(5000) * rng.uniform(0.5, 6)).astype(np.float32)
        if step % 3 == 0:  # exact ties around the k-th value
            logits = np.round(logits, 1)
        assert fast.sample(logits) == full.sample_full(logits), step


def test_a_prompt_piece_beside_decode_rows_gives_the_prefill_bits(engines, smollm2_path):
    """What the server's mixed steps do (Scheduler._step): slot 2's prompt goes in as
    pieces beside slot 1's decode tokens, one forward each. Where the decode rows run in lanes
    (bit-equal to the prefill tiles) the prompt's last logits equal a whole-prompt prefill and
    each decode row equals that slot stepped alone."""
    from prima_ref.quants import lanes, tiled

    if not (lanes.available() and tiled.enabled()):
        pytest.skip("prompt pieces equal the prefill tiles only where lanes.py runs (AVX512-VNNI)")
    multi, single = engines
    prefill = Engine(smollm2_path, n_ctx=64, n_batch=64)  # B in one tiled prefill
    ref_b = prefill.eval(B)
    for s in (1, 2):
        multi.kv_remove(0, s)
    multi.eval(A, slot=1)
    first = multi.step([1] + [2] * 5, [5] + B[:5], logit_rows=[0])
    second = multi.step([1] + [2] * 4, [6] + B[5:], logit_rows=[0, 4])
    single.kv_remove(0)
    single.eval(A)
    assert np.array_equal(first[0], single.eval([5]))
    assert np.array_equal(second[0], single.eval([6]))
    assert np.array_equal(second[1], ref_b)
    assert multi.slot_tokens[2] == B and multi.slot_tokens[1] == A + [5, 6]
