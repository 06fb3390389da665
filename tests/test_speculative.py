"""Speculative decoding on one device: greedy output equals the target's own, sampled output
follows the target's distribution, and a draft with another vocabulary is refused.

Exactness: the target checks a draft in one pass. A batched matrix product sums in another order
than the one-token product for the legacy types (Q8_0, Q4_1: rounding that SmolLM2's 30 layers
grow to ~1 logit, enough to flip a near-tie; 2 of 4 chat prompts parted within 40 tokens), so by
default the verifier takes its rows one at a time (--draft-verify rows, row_by_row), each
bit-equal to a one-token pass: greedy equality then holds by construction, for every type.
"""

from __future__ import annotations

import dataclasses
import statistics
from pathlib import Path

import numpy as np
import pytest

from prima_ref.derived import SYNTHETIC_SPECS, make_synthetic
from prima_ref.engine import Engine
from prima_ref.quants import set_num_threads
from prima_ref.sampling import Sampler, SamplingParams
from prima_ref.speculative import (
    DraftParams,
    SpeculativeDecoder,
    VocabMismatchError,
    accept_or_resample,
    check_vocab,
)

KQUANTS = Path(__file__).parent / "data" / "models" / "synth-qwen2-kquants.gguf"
GREEDY = SamplingParams(temperature=0.0, seed=0)
EAGER = DraftParams(n_max=4, n_min=1, p_min=0.0)  # always draft: every path runs


def _chi2_critical(df: int, alpha: float = 1e-3) -> float:
    """Wilson-Hilferty: the chi-square quantile to ~1 % for df >= 3 (no scipy needed)."""
    z = statistics.NormalDist().inv_cdf(1.0 - alpha)
    h = 2.0 / (9.0 * df)
    return df * (1.0 - h + z * h**0.5) ** 3


def _chi2(counts: np.ndarray, probs: np.ndarray, n: int) -> tuple[float, int]:
    """Pearson's statistic over cells with expected count >= 5 (the rest pooled) and its df."""
    expected = probs * n
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    return float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()), int(keep.sum()) - 1


# -- the acceptance rule alone -----------------------------------------------------------------

def _rule_outputs(rule, p, q, n, seed=0):
    rng = np.random.default_rng(seed)
    out = np.empty(n, dtype=np.int64)
    for i in range(n):
        x = int(rng.choice(q.size, p=q))
        y = rule(p, q, x, rng)
        out[i] = x if y is None else y
    return out


P_TOY = np.array([0.05, 0.4, 0.25, 0.2, 0.1, 0.0])
Q_TOY = np.array([0.3, 0.1, 0.3, 0.0, 0.2, 0.1])  # mass where p has none, none where p has some


def test_rejection_rule_output_follows_p():
    n = 20000
    counts = np.bincount(_rule_outputs(accept_or_resample, P_TOY, Q_TOY, n), minlength=6)
    assert counts[5] == 0  # p(5) = 0: never emitted although q proposes it
    stat, df = _chi2(counts, P_TOY, n)
    assert stat < _chi2_critical(df), (counts, stat)


def test_chi_square_catches_a_rule_that_always_accepts():
    """The statistic has the power to see a wrong rule: emitting the draft's samples fails."""
    n = 20000
    counts = np.bincount(_rule_outputs(lambda p, q, x, rng: None, P_TOY, Q_TOY, n), minlength=6)
    stat, df = _chi2(counts, P_TOY, n)
    assert stat > _chi2_critical(df)


def test_rule_with_a_draft_vocabulary_larger_than_the_target():
    p = np.array([0.5, 0.5])
    q = np.array([0.0, 0.0, 1.0])  # the draft always proposes id 2, outside the target's range
    out = _rule_outputs(accept_or_resample, p, q, 4000)
    assert set(out.tolist()) <= {0, 1} and abs(np.mean(out) - 0.5) < 0.05


def test_row_by_row_batch_is_bit_equal_to_one_token_passes(smollm2_q8_0_path):
    from prima_ref.gguf_file import GGUFModel
    from prima_ref.model.transformer import Transformer, row_by_row
    from prima_ref.quants import lanes

    g = GGUFModel.open(smollm2_q8_0_path)
    one, batch = Transformer(g, 32), Transformer(g, 32)
    # more rows than the batched decode kernels take (2..8 rows, each bit-equal to a one-row
    # pass): a plain batch of these goes through the prefill matmul
    tokens = [1, 504, 2365, 6354, 16438, 30, 253, 6431, 3101, 1129]
    seq = np.concatenate([one.forward([t], i) for i, t in enumerate(tokens)])
    with row_by_row():
        rows = batch.forward(tokens, 0, all_logits=True)
    assert np.array_equal(rows, seq)
    plain = Transformer(g, 32).forward(tokens, 0, all_logits=True)
    # with 512-bit VNNI the decode kernels (quants.lanes) sum in the prefill tiles' order, so
    # even the plain batch is bit-equal; without it the prefill matmul sums in another order
    assert np.array_equal(plain, seq) == lanes.available()


# -- models ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def synth_draft(tmp_path_factory) -> Path:
    """The K-quant target's weights (same seed) quantized to Q4_0: close, not equal."""
    spec = dataclasses.replace(SYNTHETIC_SPECS["synth-qwen2-kquants"], name="synth-kquants-draft",
                               layer_types=("Q4_0",), embd_type="Q4_0")
    return make_synthetic(tmp_path_factory.mktemp("draft") / "draft.gguf", spec)


def _tokens(engine, text):
    return engine.tokenizer.encode(text, add_special=True, parse_special=True)


def test_greedy_with_draft_equals_target_only_synthetic_pair(synth_draft):
    target = Engine(KQUANTS, n_ctx=256, n_batch=64)
    prompt = _tokens(target, "Once upon a time, in a small village by the sea")
    ref, _ = target.generate(prompt, 40, Sampler(GREEDY))
    spec = SpeculativeDecoder(target, Engine(synth_draft, n_ctx=256, n_batch=64), EAGER)
    out, t = spec.generate(prompt, 40, Sampler(GREEDY))
    assert out == ref
    x = t.extra
    assert x["spec_drafted"] > 0 and 0 < x["spec_accepted"] < x["spec_drafted"], x  # both paths
    assert len(target.tokens) == len(prompt) + len(out) - 1  # the rejected rows left the cache


def test_draft_equal_to_target_is_always_accepted():
    target, draft = Engine(KQUANTS, n_ctx=256), Engine(KQUANTS, n_ctx=256)
    prompt = _tokens(target, "The quick brown fox")
    ref, _ = target.generate(prompt, 30, Sampler(GREEDY))
    out, t = SpeculativeDecoder(target, draft, EAGER).generate(prompt, 30, Sampler(GREEDY))
    assert out == ref
    assert t.extra["spec_accepted"] == t.extra["spec_drafted"] > 0
    assert t.extra["spec_steps"] <= -(-29 // 5)  # up to 4 drafted + 1 per pass


SMOLLM2_PROMPT = ("<|im_start|>user\nExplain what a computer is.<|im_end|>\n"
                  "<|im_start|>assistant\n")
SMOLLM2_DRAFT = DraftParams(n_max=7, n_min=1, p_min=0.3)  # 7 + 1 rows: one -b 8 batch


def first_difference(ref: list[int], out: list[int], rows: list[np.ndarray]) -> str:
    """Where two greedy runs part, and the reference's top-2 margin there (a near-tie or not)."""
    i = next((i for i, (a, b) in enumerate(zip(ref, out, strict=False)) if a != b),
             min(len(ref), len(out)))
    if i >= len(rows):
        return f"lengths {len(ref)} and {len(out)}"
    top2 = np.sort(rows[i])[-2:]
    return f"first difference at token {i}: reference margin {top2[1] - top2[0]:.3f}"


def test_greedy_with_draft_equals_target_only_smollm2(smollm2_q8_0_path, smollm2_path):
    """40 tokens, 33 drafted and accepted in 6 passes (measured); with --draft-verify batched
    this prompt parts from the reference at token 33 (a 0.06 near-tie)."""
    n = 40
    ref_engine = Engine(smollm2_q8_0_path, n_ctx=256, n_batch=8)
    prompt = _tokens(ref_engine, SMOLLM2_PROMPT)
    rows = []
    ref, _ = ref_engine.generate(prompt, n, Sampler(GREEDY), on_logits=rows.append)
    spec = SpeculativeDecoder(Engine(smollm2_q8_0_path, n_ctx=256, n_batch=8),
                              Engine(smollm2_path, n_ctx=256, n_batch=8), SMOLLM2_DRAFT)
    out, t = spec.generate(prompt, n, Sampler(GREEDY))
    assert out == ref, first_difference(ref, out, rows)
    assert len(out) == n and t.extra["spec_accepted"] >= n // 2 and t.extra["spec_steps"] < n // 3


def test_draft_with_another_vocabulary_is_refused(smollm2_path, gemma3_path):
    target, draft = Engine(smollm2_path, n_ctx=64), Engine(gemma3_path, n_ctx=64)
    with pytest.raises(VocabMismatchError,
                       match="does not share the target's vocabulary: its tokenizer is 'llama'"):
        SpeculativeDecoder(target, draft)


def test_vocab_check_names_the_first_differing_token(smollm2_path):
    a, b = Engine(smollm2_path, n_ctx=16).tokenizer, Engine(smollm2_path, n_ctx=16).tokenizer
    check_vocab(a, b)
    b.tokens = list(b.tokens)
    b.tokens[300] = "not-the-same"
    with pytest.raises(VocabMismatchError, match="token 300 differs"):
        check_vocab(a, b)


# -- sampled output follows the target's distribution -------------------------------------------

def _spread_pair(tmp_path: Path) -> tuple[Path, Path]:
    """A target whose next-token distribution is broad (small head weights) and a draft with the
    same weights quantized to Q4_0: its top 2 often differ from the target's, so both the
    acceptance and the resampling path run often."""
    base = dataclasses.replace(SYNTHETIC_SPECS["synth-qwen2-f16-q8_0-q4_0"], output_std=0.08,
                               layer_types=("F16",), embd_type="F16", output_type="F16")
    target = make_synthetic(tmp_path / "target.gguf", base)
    draft = dataclasses.replace(base, layer_types=("Q4_0",), embd_type="Q8_0", output_type="Q4_0")
    return target, make_synthetic(tmp_path / "draft.gguf", draft)


SAMPLED = dict(temperature=1.0, top_k=2, top_p=1.0, min_p=0.0)
N_SEEDS = 800


def test_sampled_first_tokens_follow_target_distribution(tmp_path):
    """Tokens 1-3 over N_SEEDS seeds: token 1 is the target's own draw, 2 and 3 go through the
    draft (accept min(1, p/q) or resample from max(0, p - q)); their joint frequencies must fit
    the product of the target's conditional distributions (chi-square, alpha 1e-3)."""
    target_path, draft_path = _spread_pair(tmp_path)
    target = Engine(target_path, n_ctx=64)
    spec = SpeculativeDecoder(target, Engine(draft_path, n_ctx=64),
                              DraftParams(n_max=3, n_min=0, p_min=0.0))
    prompt = _tokens(target, "Once upon a time")
    set_num_threads(1)  # tiny matrices: a parallel region costs more than it saves
    n = N_SEEDS
    seqs = {}
    accepted = drafted = 0
    for seed in range(n):
        out, t = spec.generate(prompt, 4, Sampler(SamplingParams(**SAMPLED, seed=seed)))
        key = tuple(out[:3])
        seqs[key] = seqs.get(key, 0) + 1
        accepted += t.extra["spec_accepted"]
        drafted += t.extra["spec_drafted"]
    probs = _joint_target_probs(Engine(target_path, n_ctx=64), prompt, 3)
    cells = sorted(probs)
    assert set(seqs) <= set(cells), "an output outside the target's support"
    counts = np.array([seqs.get(c, 0) for c in cells], dtype=np.float64)
    stat, df = _chi2(counts, np.array([probs[c] for c in cells]), n)
    assert df >= 5 and stat < _chi2_critical(df), (stat, df)
    rate = accepted / drafted
    assert 0.1 < rate < 0.9, rate  # both paths ran many times (measured: 0.24)


def _joint_target_probs(engine: Engine, prompt: list[int], depth: int) -> dict[tuple, float]:
    """P(t1..t_depth) = prod p(t_i | prompt, t_<i) with the target alone, one token per pass."""
    params = SamplingParams(**SAMPLED, seed=0)
    out: dict[tuple, float] = {}

    def walk(prefix: tuple, prob: float):
        if len(prefix) == depth:
            out[prefix] = prob
            return
        ctx = prompt + list(prefix)
        n = engine.reuse_prefix(ctx)
        p = Sampler(params).probs(engine.eval(ctx[n:]))
        for tok in np.flatnonzero(p):
            walk(prefix + (int(tok),), prob * float(p[tok]))

    walk((), 1.0)
    return out


def test_cli_refuses_a_draft_with_another_vocabulary(smollm2_path, gemma3_path):
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "prima_ref.cli", "-m", str(smollm2_path), "-md",
                        str(gemma3_path), "-p", "Hi", "-n", "2"], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 1
    assert "cannot use the draft model" in p.stderr and "vocabulary" in p.stderr
