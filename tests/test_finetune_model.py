"""Fine-tuning's math: the new layers against closed forms, the whole classifier and the masked LM loss
against float64 finite differences, and freezing (what is not computed, what does not move)."""

import numpy as np
import pytest

import npgpt
import npgpt.layers as L
from npgpt.finetune.classifier import SCORE, Classifier, lm_targets_for
from npgpt.finetune.config import trainable_names
from npgpt.finetune.gradchecks import PAD, finetune_model_checks, padded_batch
from npgpt.finetune.steps import ClassifierStep
from npgpt.model_check import random_params, tiny_config
from npgpt.optim import AdamW

from conftest import needs_cuda

CHECKS = finetune_model_checks()


@pytest.mark.parametrize("check", CHECKS, ids=[c.layer for c in CHECKS])
def test_whole_model_gradients_float64(check):
    results = check.run(seed=0)
    assert results
    for r in results:
        assert r.n_checked > 0
        assert r.passed and r.max_rel_error < 1e-6, r.describe()


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("check", CHECKS, ids=[c.layer for c in CHECKS])
def test_cupy_matches_numpy(check, dtype):
    import cupy

    for r in check.run_on(cupy, dtype=dtype):
        assert r.passed, r.describe()


def test_last_token_index_is_the_rightmost_non_padding_token():
    rng = np.random.default_rng(0)
    idx = rng.integers(0, 5, size=(40, 7))  # pad = 0 appears anywhere: left, right and inner padding
    idx[3] = 0  # a row of padding only
    expected = []
    for row in idx:  # the rule written as a loop
        real = [t for t, v in enumerate(row) if v != 0]
        expected.append(real[-1] if real else 0)
    assert L.last_token_index(idx, 0).tolist() == expected


def test_classifier_head_and_mixed_loss_closed_forms():
    rng = np.random.default_rng(1)
    B, T, C, k, V = 4, 6, 5, 3, 11
    x = rng.standard_normal((B, T, C))
    idx = padded_batch(rng, B, T, V, pad=10)
    W = rng.standard_normal((k, C))
    logits, _ = L.classifier_head_forward(x, idx, W, 10)
    lengths = (idx != 10).sum(axis=1)
    for b in range(B):
        np.testing.assert_allclose(logits[b], W @ x[b, lengths[b] - 1], rtol=1e-13)

    labels = rng.integers(0, k, size=B)
    lm_logits = rng.standard_normal((B, T, V))
    targets = rng.integers(0, V, size=(B, T))
    targets[0, :3] = -100

    def nll(z, t):
        return -(z[t] - np.log(np.exp(z).sum()))

    ft = np.mean([nll(logits[b], labels[b]) for b in range(B)])
    pt = np.mean([nll(lm_logits[b, t], targets[b, t]) for b in range(B) for t in range(T) if targets[b, t] != -100])
    loss, cache = L.mixed_loss_forward(logits, labels, lm_logits, targets, lm_weight=0.3)
    assert float(loss) == pytest.approx(ft + 0.3 * pt, rel=1e-13)
    assert float(cache.ft_loss) == pytest.approx(ft, rel=1e-13) and float(cache.lm_loss) == pytest.approx(pt, rel=1e-13)
    dcls, dlm = L.mixed_loss_backward(1.0, cache)
    assert np.all(dlm[0, :3] == 0)  # masked positions get an exact zero
    assert L.mixed_loss_backward(1.0, L.mixed_loss_forward(logits, labels)[1])[1] is None  # no LM logits: no gradient


def test_mixed_loss_with_lambda_0_gives_the_lm_logits_a_zero_gradient():
    """L = L_FT does not depend on lm_logits when lambda = 0: their gradient is 0, a (B, T, V) array of zeros
    (it used to be None, which a caller must special-case and a gradient checker reports as missing)."""
    rng = np.random.default_rng(2)
    cls, labels = rng.standard_normal((3, 4)), np.array([0, 3, 1])
    lm, targets = rng.standard_normal((3, 5, 7)), rng.integers(0, 7, size=(3, 5))
    loss, cache = L.mixed_loss_forward(cls, labels, lm, targets, lm_weight=0.0)
    ft, _ = L.softmax_cross_entropy_forward(cls, labels)
    assert float(loss) == float(ft) and float(cache.lm_loss) == 0.0
    dcls, dlm = L.mixed_loss_backward(0.7, cache)
    assert isinstance(dlm, np.ndarray) and dlm.shape == lm.shape and dlm.dtype == lm.dtype and not dlm.any()
    np.testing.assert_array_equal(dcls, L.softmax_cross_entropy_backward(0.7, L.softmax_cross_entropy_forward(cls, labels)[1]))
    results = npgpt.gradcheck(lambda cls_logits, lm_logits: L.mixed_loss_forward(cls_logits, labels, lm_logits, targets, lm_weight=0.0),
                              L.mixed_loss_backward, [cls, lm])  # fmt: skip
    assert [r.input for r in results] == ["cls_logits", "lm_logits"] and all(r.passed for r in results), results
    assert results[1].max_rel_error == 0.0  # exact zeros against finite differences of a constant


def test_mixed_loss_refuses_lambda_outside_0_1():
    z, y = np.zeros((2, 3)), np.array([0, 1])
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
            L.mixed_loss_forward(z, y, lm_weight=bad)


def test_lm_targets_are_next_tokens_up_to_each_texts_end():
    idx = np.array([[5, 6, 7, 9, 9], [1, 2, 3, 4, 8], [3, 9, 9, 9, 9]])
    expected = np.array([[6, 7, -100, -100, -100], [2, 3, 4, 8, -100], [-100] * 5])
    np.testing.assert_array_equal(lm_targets_for(idx, 9), expected)


def test_one_token_texts_give_a_zero_lm_term():
    clf = Classifier.new(npgpt.GPT(tiny_config(), dtype=np.float64), ["a", "b"], pad_token_id=PAD)
    idx = np.array([[3, PAD], [4, PAD]])
    _, loss, cache = clf.forward(idx, np.array([0, 1]), lm_weight=0.5)
    assert float(cache.loss.lm_loss) == 0.0 and float(loss) == float(cache.loss.ft_loss)
    grads = clf.backward(cache)
    assert set(grads) == set(clf.params)


def test_masked_lm_loss_is_the_mean_over_unmasked_targets():
    model = npgpt.GPT(tiny_config(), dtype=np.float64)
    rng = np.random.default_rng(3)
    idx = rng.integers(0, 37, size=(2, 6))
    targets = rng.integers(0, 37, size=(2, 6))
    targets[0, :4] = -100
    targets[1, 5] = -100
    logits, loss, _ = model.forward(idx, targets)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    kept = [(b, t) for b in range(2) for t in range(6) if targets[b, t] != -100]
    assert float(loss) == pytest.approx(-np.mean([logp[b, t, targets[b, t]] for b, t in kept]), rel=1e-13)


def _trunk_grads_with_spy(monkeypatch, trainable):
    """Run a classifier backward with `trainable`, recording which layer backwards ran and how."""
    calls = {"block": [], "linear_weight_grad": [], "embedding": 0}
    real_block, real_linear, real_emb = L.block_backward, L.linear_backward, L.embedding_backward

    def block(dout, cache, weight_grads=True):
        calls["block"].append(weight_grads)
        return real_block(dout, cache, weight_grads=weight_grads)

    def linear(dout, cache, weight_grad=True):
        calls["linear_weight_grad"].append((cache.weight.shape, weight_grad))
        return real_linear(dout, cache, weight_grad)

    def emb(dout, cache):
        calls["embedding"] += 1
        return real_emb(dout, cache)

    monkeypatch.setattr(L, "block_backward", block)
    monkeypatch.setattr(L, "linear_backward", linear)
    monkeypatch.setattr(L, "embedding_backward", emb)
    cfg = tiny_config(n_layers=3, tie_weights=False)
    clf = Classifier.new(npgpt.GPT(cfg, dtype=np.float64), ["a", "b", "c"], pad_token_id=PAD)
    rng = np.random.default_rng(0)
    clf.model.params = random_params(cfg, rng)
    idx = padded_batch(rng, 2, 5, 37)
    _, _, cache = clf.forward(idx, np.array([0, 2]), lm_weight=0.5)
    full = clf.backward(cache)
    for key in calls:
        calls[key] = [] if key != "embedding" else 0
    grads = clf.backward(cache, trainable=trainable)
    return grads, full, calls


def test_frozen_layers_are_not_differentiated(monkeypatch):
    # head only: nothing below the classification head runs
    grads, full, calls = _trunk_grads_with_spy(monkeypatch, ["score.weight"])
    assert list(grads) == ["score.weight"] and calls["block"] == [] and calls["embedding"] == 0
    np.testing.assert_array_equal(grads["score.weight"], full["score.weight"])
    # the last block: one block backward, the LM head's (C, V) weight-gradient GEMM skipped, no embedding
    last = ["score.weight", "ln_f.weight", "ln_f.bias"] + [n for n in full if n.startswith("h.2.")]
    grads, full, calls = _trunk_grads_with_spy(monkeypatch, last)
    assert sorted(grads) == sorted(last)
    assert calls["block"] == [True] and calls["embedding"] == 0
    lm_head_calls = [wg for shape, wg in calls["linear_weight_grad"] if shape == (8, 37)]
    assert lm_head_calls == [False]
    for n in last:
        np.testing.assert_allclose(grads[n], full[n], rtol=1e-12, atol=1e-15)
    # a trainable block below frozen ones: the frozen block is passed through without weight gradients
    grads, full, calls = _trunk_grads_with_spy(monkeypatch, ["h.0.ln_1.weight", "score.weight"])
    assert calls["block"] == [False, False, True] and calls["embedding"] == 0
    np.testing.assert_allclose(grads["h.0.ln_1.weight"], full["h.0.ln_1.weight"], rtol=1e-12)


def test_gpt_backward_trainable_matches_the_full_backward_and_refuses_unknown_names():
    cfg = tiny_config()
    model = npgpt.GPT(cfg, dtype=np.float64)
    rng = np.random.default_rng(5)
    model.params = random_params(cfg, rng)
    idx, tgt = rng.integers(0, 37, size=(2, 5)), rng.integers(0, 37, size=(2, 5))
    _, _, cache = model.forward(idx, tgt)
    full = model.backward(cache)
    for names in (["wte.weight"], ["wpe.weight", "h.1.mlp.c_fc.bias"], ["ln_f.bias"]):
        part = model.backward(cache, trainable=names)
        assert sorted(part) == sorted(names)
        for n in names:
            np.testing.assert_allclose(part[n], full[n], rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match="not parameters"):
        model.backward(cache, trainable=["score.weight"])


def test_frozen_parameters_stay_bit_identical_through_training():
    cfg = tiny_config(n_layers=2, drop_rate=0.1)
    clf = Classifier.new(npgpt.GPT(cfg, seed=1), ["a", "b", "c"], pad_token_id=PAD)
    trainable = trainable_names("classify", "last-block", clf.params, cfg.n_layers, cfg.tie_weights, 0.5)
    assert trainable[0] == "h.1.ln_1.weight" and trainable[-1] == SCORE and "wte.weight" not in trainable
    before = {n: v.copy() for n, v in clf.params.items()}
    opt = AdamW({n: clf.params[n] for n in trainable}, lr=1e-2, weight_decay=0.1)
    step = ClassifierStep(clf, trainable, lm_weight=0.5)
    rng = np.random.default_rng(0)
    for _ in range(3):
        s = step((padded_batch(rng, 4, 6, 37), rng.integers(0, 3, size=4)), np.random.default_rng(1))
        assert sorted(s.grads) == sorted(trainable)
        opt.step(s.grads)
    for n, v in clf.params.items():
        if n in trainable:
            assert not np.array_equal(v, before[n]), f"{n} should have moved"
        else:
            assert np.array_equal(v, before[n]), f"frozen {n} changed"


def test_trainable_choices():
    cfg = tiny_config(n_layers=2, tie_weights=False)
    params = {**npgpt.GPT(cfg).params, SCORE: None}
    assert trainable_names("classify", "head", params, 2, False, 0.5) == [SCORE]
    every = trainable_names("classify", "all", params, 2, False, 0.5)
    assert set(every) == set(params)
    assert "lm_head.weight" not in trainable_names("classify", "all", params, 2, False, 0.0)
    lm = {k: v for k, v in params.items() if k != SCORE}
    assert trainable_names("instruct", "head", lm, 2, False, 0.0) == ["lm_head.weight"]
    assert trainable_names("instruct", "head", lm, 2, True, 0.0) == ["wte.weight"]
    assert set(trainable_names("instruct", "last-block", lm, 2, False, 0.0)) == {
        "lm_head.weight", "ln_f.weight", "ln_f.bias", *[k for k in lm if k.startswith("h.1.")]}


def test_defaults_follow_the_starting_point(tmp_path):
    from npgpt.finetune import FinetuneConfig

    new = FinetuneConfig(task="classify").resolved()
    assert (new.lm_weight, new.lr, new.trainable, new.data, new.epochs) == (0.0, 5e-4, "all", "tang-forms", 5)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "config.json").write_text("{}")  # --init-from must exist (only its listing is read here)
    tuned = FinetuneConfig(task="classify", init_from=str(tmp_path / "x")).resolved()
    assert (tuned.lm_weight, tuned.lr, tuned.trainable) == (0.5, 5e-5, "last-block")
    inst = FinetuneConfig(task="instruct", lr=3e-3, trainable="head").resolved()
    assert (inst.lm_weight, inst.lr, inst.trainable, inst.data) == (0.0, 3e-3, "head", "tang-instruct")
    with pytest.raises(ValueError, match="cannot be combined with --init-from"):
        FinetuneConfig(init_from=str(tmp_path / "x"), n_layers=2).resolved()
    assert new.engine == "fast"  # the fast engine trains by default; "reference" runs the readable layers
    with pytest.raises(ValueError, match="--engine must be one of fast, reference"):
        FinetuneConfig(engine="gpu").resolved()
