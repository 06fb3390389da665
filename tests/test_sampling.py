import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prima_ref.sampling import Sampler, SamplingParams, top_k_candidates


def test_greedy_picks_argmax():
    logits = np.array([0.1, 3.0, 2.9, -1.0], dtype=np.float32)
    assert Sampler(SamplingParams(temperature=0)).sample(logits) == 1


def test_same_seed_same_tokens_different_seed_differs():
    logits = np.zeros(1000, dtype=np.float32)
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=7)
    a = [Sampler(params).sample(logits) for _ in range(1)] + [0]
    s1, s2 = Sampler(params), Sampler(params)
    seq1 = [s1.sample(logits) for _ in range(20)]
    seq2 = [s2.sample(logits) for _ in range(20)]
    s3 = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=8))
    assert seq1 == seq2 and seq1 != [s3.sample(logits) for _ in range(20)] and a


def test_top_k_top_p_min_p_cut_the_distribution():
    logits = np.log(np.array([0.5, 0.2, 0.15, 0.1, 0.05]))
    probs = Sampler(SamplingParams(temperature=1.0, top_k=3, top_p=1.0, min_p=0.0)).probs(logits)
    assert np.count_nonzero(probs) == 3 and probs.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(probs[:3], np.array([0.5, 0.2, 0.15]) / 0.85)
    probs = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=0.6, min_p=0.0)).probs(logits)
    assert np.flatnonzero(probs).tolist() == [0, 1]  # 0.5 < 0.6 <= 0.7
    probs = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.35)).probs(logits)
    assert np.flatnonzero(probs).tolist() == [0, 1]  # kept: p >= 0.35 * 0.5


def test_temperature_sharpens_and_sampling_follows_probs():
    logits = np.log(np.array([0.6, 0.3, 0.1]))
    params = SamplingParams(temperature=0.5, top_k=0, top_p=1.0, min_p=0.0, seed=3)
    probs = Sampler(params).probs(logits)
    expected = np.array([0.36, 0.09, 0.01]) / 0.46
    np.testing.assert_allclose(probs, expected, rtol=1e-9)
    s = Sampler(params)
    counts = np.bincount([s.sample(logits) for _ in range(4000)], minlength=3) / 4000
    assert np.abs(counts - expected).max() < 0.03


def test_repeat_penalty_lowers_recent_tokens():
    logits = np.array([2.0, 1.9, -1.0])
    s = Sampler(SamplingParams(temperature=0, repeat_penalty=1.5))
    s.accept(0)
    assert s.sample(logits) == 1  # 2.0 / 1.5 < 1.9
    probs = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=2.0))
    probs.accept(2)
    p = probs.probs(logits)
    assert p[2] < np.exp(-1.0) / np.exp(logits).sum()  # negative logit multiplied, not divided


def test_bad_parameters_are_rejected():
    with pytest.raises(ValueError):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError):
        SamplingParams(repeat_penalty=0.0)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_top_k_candidates_equal_a_partition(data):
    """The heap selection keeps exactly what a partition keeps: ties at the k-th value all in,
    -inf logits (masked tokens) ranked last, float32 and float64."""
    n = data.draw(st.integers(1, 3000))
    k = data.draw(st.one_of(st.integers(1, n), st.integers(1, 8).map(lambda v: min(v, n))))
    dtype = data.draw(st.sampled_from([np.float32, np.float64]))
    values = st.one_of(st.integers(-4, 4).map(float), st.floats(-1e30, 1e30),
                       st.just(-np.inf))  # small integers: many ties
    z = np.array(data.draw(st.lists(values, min_size=n, max_size=n)), dtype=dtype)
    expected = np.flatnonzero(z >= np.partition(z, n - k)[n - k])
    np.testing.assert_array_equal(top_k_candidates(z, k), expected)
