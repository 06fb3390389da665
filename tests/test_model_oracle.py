"""Whole models against llama.cpp (oracle JSON made by scripts/make_oracle.py).

llama.cpp quantizes every activation vector before each quantized product, so logits carry
rounding noise of its own: its batched and token-by-token passes differ by up to ~2 logits on
SmolLM2 Q4_1. Hence the rules:
- greedy: our decode (prompt batched, then one token at a time, as llama.cpp's oracle ran, fed
  llama.cpp's tokens) picks llama.cpp's token at every step where llama.cpp's own top-2 margin
  is at least MARGIN (the issue asks 0.5 for gemma3). Measured 2026-11-22: every divergence we see
  sits on such a near-tie (SmolLM2 margins 0.018-0.132, gemma3 0.291, the IQ model 0.23); the
  synthetic qwen2 models agree on all 32 tokens of every prompt.
- top-5: in one batched pass over prompt + continuation, llama.cpp's top-5 logits are within TOL
  of ours, and at every position whose top-5 boundary is clear (our 5th and 6th logits at least
  GAP apart) our top-5 ids are llama.cpp's.
Our activation quantization equals llama.cpp's byte for byte and every product agrees with
ggml's vec_dot to ~3e-7 (tests/test_quants*.py); what remains is float32 summation order, which
int8 re-quantization between layers amplifies (one flipped rounding moves logits by ~1).
"""

import json
from pathlib import Path

import numpy as np
import pytest

from prima_ref.gguf_file import GGUFModel
from prima_ref.model.transformer import Transformer

DATA = Path(__file__).resolve().parent / "data"

# oracle name -> (greedy MARGIN, logit TOL, top-5 GAP, how to find the file)
CASES = {
    "smollm2-135m-q4_1": (0.2, 2.5, 0.5, "smollm2_path"),
    "smollm2-135m-q8_0": (0.2, 2.5, 0.5, "smollm2_q8_0_path"),
    "gemma3-270m-q4_k_m": (0.5, 3.5, 0.75, "gemma3_path"),
    "synth-qwen2-f16-q8_0-q4_0": (0.1, 0.5, 0.25, None),
    "synth-qwen2-kquants": (0.1, 0.5, 0.25, None),
    "synth-llama-iq": (0.3, 1.0, 0.5, None),
}
SLOW = {"gemma3-270m-q4_k_m"}


def _oracle(name):
    return json.loads((DATA / "oracle" / f"{name}.json").read_text())


def _model_path(name, fixture, request, tmp_path):
    if fixture:
        return request.getfixturevalue(fixture)
    from test_derived import synthetic_model_path

    return synthetic_model_path(_oracle(name), tmp_path)


def _margin(top5):
    return top5[0][1] - top5[1][1]


def _params():
    for name, (margin, tol, gap, fixture) in CASES.items():
        marks = [pytest.mark.slow] if name in SLOW else []
        yield pytest.param(name, margin, tol, gap, fixture, id=name, marks=marks)


@pytest.mark.parametrize("name,margin,tol,gap,fixture", list(_params()))
def test_greedy_matches_llama_cpp_until_its_own_near_tie(name, margin, tol, gap, fixture, request,
                                                         tmp_path):
    oracle = _oracle(name)
    model = GGUFModel.open(_model_path(name, fixture, request, tmp_path))
    compared = 0
    for g in oracle["generation"]:
        tr = Transformer(model, 256, kv_f16=False)
        prompt, ref = g["prompt_ids"], g["greedy_ids"]
        # llama.cpp's distribution for greedy token i: after the prompt, then after token i-1
        dists = [g["top5_batched"][len(prompt) - 1]] + g["top5_decode_after_greedy"]
        logits = tr.forward(prompt, 0)[-1]
        for i, want in enumerate(ref):
            if _margin(dists[i]) >= margin:
                got = int(np.argmax(logits))
                assert got == want, f"{g['name']}: token {i}: ours {got}, llama.cpp {want}"
                compared += 1
            logits = tr.forward([want], len(prompt) + i)[-1]
    assert compared >= len(oracle["generation"]) * 16, f"only {compared} greedy steps were compared"


@pytest.mark.parametrize("name,margin,tol,gap,fixture", list(_params()))
def test_top5_and_logits_match_llama_cpp_at_every_clear_position(name, margin, tol, gap, fixture,
                                                                 request, tmp_path):
    oracle = _oracle(name)
    model = GGUFModel.open(_model_path(name, fixture, request, tmp_path))
    compared = 0
    for g in oracle["generation"]:
        tr = Transformer(model, 256, kv_f16=False)
        logits = tr.forward(g["prompt_ids"] + g["greedy_ids"], 0, all_logits=True)
        for pos, top in enumerate(g["top5_batched"]):
            ids = [t for t, _ in top]
            ref = np.array([v for _, v in top])
            np.testing.assert_allclose(logits[pos][ids], ref, atol=tol,
                                       err_msg=f"{g['name']} position {pos}")
            order = np.argsort(-logits[pos])
            if logits[pos][order[4]] - logits[pos][order[5]] < gap:
                continue
            assert set(order[:5].tolist()) == set(ids), f"{g['name']} position {pos}"
            compared += 1
    assert compared >= 8, f"only {compared} positions were clear enough to compare"
