import numpy as np
import pytest

from npgpt.sampling import next_token_probs, sample_next


def test_greedy_is_argmax():
    logits = np.array([[0.1, 3.0, -1.0], [5.0, 1.0, 4.9]])
    assert sample_next(logits, np.random.default_rng(0), temperature=0).tolist() == [1, 0]


def test_temperature_softmax_closed_form():
    logits = np.array([[1.0, 2.0, 3.0]])
    p = next_token_probs(logits, temperature=2.0)
    e = np.exp(np.array([0.5, 1.0, 1.5]))
    np.testing.assert_allclose(p[0], e / e.sum(), rtol=1e-12)


def test_top_k_keeps_k_tokens():
    p = next_token_probs(np.array([[1.0, 4.0, 3.0, 2.0]]), top_k=2)
    assert (p[0] > 0).tolist() == [False, True, True, False]
    np.testing.assert_allclose(p.sum(), 1.0)


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    p = next_token_probs(np.log(probs)[None], top_p=0.75)
    assert (p[0] > 0).tolist() == [True, True, False, False]  # 0.5 < 0.75 <= 0.8
    np.testing.assert_allclose(p[0, :2], [0.5 / 0.8, 0.3 / 0.8])
    p1 = next_token_probs(np.log(probs)[None], top_p=0.4)
    assert (p1[0] > 0).tolist() == [True, False, False, False]  # the top token is always kept


def test_sampling_frequencies_follow_the_probabilities():
    probs = np.array([0.1, 0.6, 0.3])
    rng = np.random.default_rng(0)
    draws = np.concatenate([sample_next(np.log(np.tile(probs, (1000, 1))), rng) for _ in range(20)])
    freq = np.bincount(draws, minlength=3) / draws.size
    assert np.all(np.abs(freq - probs) < 5 * np.sqrt(probs * (1 - probs) / draws.size))


@pytest.mark.parametrize("kw", [dict(temperature=-1), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5)])
def test_bad_sampling_arguments(kw):
    with pytest.raises(ValueError):
        next_token_probs(np.zeros((1, 3)), **{"temperature": 1.0, **kw})
