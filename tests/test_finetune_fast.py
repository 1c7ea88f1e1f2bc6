"""The fine-tuning steps on the fast engine (npgpt/finetune/fast_steps.py) against the readable ones
(steps.py), and what the fast engine does for them: gradients of the trainable parameters only, no
weight-gradient GEMM for a frozen layer, no backward below the lowest trainable layer, no LM head
(and no logits buffer) at lambda = 0, batches narrower and shorter than the buffers.

Equal means a relative error max|a - b| / max(|a| + |b|) below 1e-12 in float64 and 1e-5 in float32,
with padded batches, dropout on (one generator, the same masks on both paths) and off."""

import numpy as np
import pytest

import npgpt
from npgpt import fast
from npgpt.backend import to_numpy
from npgpt.engine import FastLossAndGrads
from npgpt.finetune.classifier import SCORE, Classifier
from npgpt.finetune.config import TRAINABLE, trainable_names
from npgpt.finetune.fast_steps import FastClassifierStep, FastInstructStep
from npgpt.finetune.gradchecks import PAD, padded_batch
from npgpt.finetune.steps import ClassifierStep, InstructStep
from npgpt.gradcheck import HostRandom, relative_error
from npgpt.model_check import random_params, tiny_config
from npgpt.optim import AdamW

DTYPES = [pytest.param(np.float64, 1e-12, id="float64"), pytest.param(np.float32, 1e-5, id="float32")]
SHAPES = [(3, 8), (2, 5), (1, 3)]  # full buffers, then narrower and shorter batches in the same buffers
B, T = 3, 8


def make_classifier(dtype, k=3, **cfg_kw):
    cfg = tiny_config(**cfg_kw)
    rng = np.random.default_rng(0)
    params = {n: v.astype(dtype) for n, v in random_params(cfg, rng).items()}
    model = npgpt.GPT(cfg, params=params)
    score = (0.5 * rng.standard_normal((k, cfg.emb_dim))).astype(dtype)
    return Classifier(model, score, tuple(f"c{i}" for i in range(k)), PAD)


def assert_same_grads(got: dict, want: dict, tol, what):
    assert list(got) == list(want), f"{what}: {list(got)} != {list(want)}"
    for name in want:
        err = relative_error(to_numpy(got[name]), to_numpy(want[name]))
        assert err < tol, f"{what} {name}: relative error {err:.2e}"


@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize("drop", [0.0, 0.2], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("lam", [0.0, 0.5], ids=["lambda0", "lambda0.5"])
@pytest.mark.parametrize("choice", TRAINABLE)
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_fast_classifier_step_equals_the_readable_one(choice, lam, drop, tied, dtype, tol):
    clf = make_classifier(dtype, n_layers=3, drop_rate=drop, tie_weights=tied)
    names = trainable_names("classify", choice, clf.params, 3, tied, lam)
    ref, fst = ClassifierStep(clf, names, lam), FastClassifierStep(clf, names, lam, B, T)
    rng = np.random.default_rng(1)
    for b, t in SHAPES:
        batch = (padded_batch(rng, b, t, 37), rng.integers(0, 3, size=b))
        ref(batch, HostRandom(5))
        fst(batch, HostRandom(5))
        what = f"{choice} lambda {lam} drop {drop} {b}x{t}"
        for key in ("loss", "ft_loss", "lm_loss"):
            assert getattr(fst, key) == pytest.approx(getattr(ref, key), rel=tol, abs=tol), f"{what} {key}"
        assert relative_error(fst.logits, ref.logits) < tol, what
        assert_same_grads(fst.grads, ref.grads, tol, what)
        (ref_sum, ref_logits), (fst_sum, fst_logits) = ref.evaluate(batch), fst.evaluate(batch)
        assert fst_sum == pytest.approx(ref_sum, rel=tol) and relative_error(fst_logits, ref_logits) < tol


@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize("drop", [0.0, 0.2], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("choice", TRAINABLE)
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_fast_instruct_step_equals_the_readable_one(choice, drop, tied, dtype, tol):
    """The masked LM loss: prompt and padding targets at -100; with a tied head, --trainable head
    trains the embedding table, so the backward runs through every (frozen) block to reach it."""
    clf = make_classifier(dtype, n_layers=3, drop_rate=drop, tie_weights=tied)
    model = clf.model
    names = trainable_names("instruct", choice, model.params, 3, tied, 0.0)
    ref, fst = InstructStep(model, names), FastInstructStep(model, names, B, T)
    rng = np.random.default_rng(2)
    for b, t in SHAPES:
        x = padded_batch(rng, b, t, 37)
        y = rng.integers(0, 37, size=(b, t))
        y[:, : t // 2] = -100  # the prompt
        y[x == PAD] = -100  # the padding
        y[0, -1] = 5  # at least one target counts
        ref((x, y), HostRandom(7))
        fst((x, y), HostRandom(7))
        what = f"{choice} drop {drop} {b}x{t}"
        assert fst.loss == pytest.approx(ref.loss, rel=tol), what
        assert_same_grads(fst.grads, ref.grads, tol, what)
        (ref_sum, ref_n), (fst_sum, fst_n) = ref.evaluate((x, y)), fst.evaluate((x, y))
        assert fst_n == ref_n and fst_sum == pytest.approx(ref_sum, rel=tol)


def test_one_token_texts_give_a_zero_lm_term_on_the_fast_path_too():
    clf = make_classifier(np.float64)
    names = list(clf.params)
    idx, labels = np.array([[3, PAD], [4, PAD]]), np.array([0, 1])
    ref, fst = ClassifierStep(clf, names, 0.5)((idx, labels)), FastClassifierStep(clf, names, 0.5, 2, 2)((idx, labels))
    assert fst.lm_loss == 0.0 and fst.loss == pytest.approx(ref.loss, rel=1e-13)
    assert_same_grads(fst.grads, ref.grads, 1e-12, "one-token texts")


def test_frozen_layers_get_no_gradient_buffer_and_no_weight_gemm(monkeypatch):
    """last-block: only the last block, ln_f and the head have gradient buffers; the frozen LM head's
    (C, V) weight-gradient GEMM is skipped, and no GEMM touches a lower block (the backward stops)."""
    clf = make_classifier(np.float64, n_layers=3, tie_weights=False)
    names = trainable_names("classify", "last-block", clf.params, 3, False, 0.5)
    step = FastClassifierStep(clf, names, 0.5, B, T)
    trunk = [n for n in names if n != SCORE]
    assert list(step.engine.grads) == trunk
    assert step.engine.grad_flat.size == sum(clf.params[n].size for n in trunk)
    seen = []
    real = fast.linear_backward

    def spy(dx, dweight, dbias, dout, x, weight, *args, **kwargs):
        seen.append((tuple(weight.shape), dx is None, dweight is None))
        return real(dx, dweight, dbias, dout, x, weight, *args, **kwargs)

    monkeypatch.setattr(fast, "linear_backward", spy)  # the engine's calls
    monkeypatch.setattr(fast.classifier_head, "linear_backward", spy)  # the classification head's (fast/classifier_head.py)
    rng = np.random.default_rng(3)
    step((padded_batch(rng, 3, 8, 37), np.array([0, 1, 2])), HostRandom(1))
    C, V = 8, 37
    assert seen[0] == ((C, 3), False, False)  # the classification head: dh and dscore
    assert seen[1] == ((C, V), False, True)  # the LM head: dx only, its frozen weight's GEMM skipped
    # then block 2's four linear layers, with their weight gradients, and nothing below them
    assert [s for s, _, _ in seen[2:]] == [(4 * C, C), (C, 4 * C), (C, C), (C, 3 * C)]
    assert not any(no_dw for _, _, no_dw in seen[2:])


def test_head_only_runs_no_trunk_backward_and_lambda_0_allocates_no_logits():
    clf = make_classifier(np.float32, n_layers=2)
    step = FastClassifierStep(clf, [SCORE], 0.0, B, T)
    assert step.engine.acts.logits is None and step.engine.grad_flat.size == 0
    assert list(step.grads) == [SCORE]
    with_lm = FastClassifierStep(clf, list(clf.params), 0.5, B, T)
    assert with_lm.engine.nbytes() - step.engine.nbytes() >= B * T * 37 * 4  # the (B*T, V) logits, and gradients
    rng = np.random.default_rng(4)
    batch = (padded_batch(rng, 3, 8, 37), np.array([2, 0, 1]))
    step(batch)
    assert step.engine._pending is None  # the forward left nothing for a backward: nothing in the trunk trains
    ref = ClassifierStep(clf, [SCORE], 0.0)(batch)
    assert relative_error(step.grads[SCORE], ref.grads[SCORE]) < 1e-5


def test_engine_trainable_and_hidden_interface():
    """The engine's fine-tuning half-steps, against GPT.forward/backward with the same trainable list."""
    cfg = tiny_config(n_layers=3, tie_weights=False)
    model = npgpt.GPT(cfg, params=random_params(cfg, np.random.default_rng(6)))
    rng = np.random.default_rng(7)
    x, y = rng.integers(0, 37, (2, 6)), rng.integers(0, 37, (2, 6))
    dh = rng.standard_normal((2, 6, cfg.emb_dim))
    for names in (["h.1.attn.c_proj.bias", "ln_f.weight"], ["wpe.weight"], ["lm_head.weight"], ["ln_f.bias"]):
        engine = FastLossAndGrads(model, 2, 6, trainable=names)
        _, _, cache = model.forward(x, y)
        want = model.backward(cache, dloss=0.3, dhidden=dh, trainable=names)
        engine.forward(x, y, dloss=0.3)
        assert relative_error(engine.hidden, cache.hidden) < 1e-12
        engine.backward(dhidden=dh)
        assert_same_grads(engine.grads, want, 1e-12, str(names))
    engine = FastLossAndGrads(model, 2, 6, trainable=["h.2.ln_2.bias"], lm_head=False)
    engine.forward(x, None, lm_head=False)
    _, _, cache = model.forward(x, None, lm_head=False)
    engine.backward(dhidden=dh)
    assert_same_grads(engine.grads, model.backward(cache, dhidden=dh, trainable=["h.2.ln_2.bias"]), 1e-12, "dhidden only")
    with pytest.raises(ValueError, match="lm_head=False"):
        engine.forward(x, y)
    with pytest.raises(ValueError, match="pass dhidden"):
        engine.forward(x, None, lm_head=False)
        engine.backward()
    with pytest.raises(ValueError, match="not parameters"):
        FastLossAndGrads(model, 2, 6, trainable=["score.weight"])


def test_engine_takes_a_logits_gradient_of_the_callers_loss():
    """forward(lm_head=True) without targets leaves the logits in engine.logits; backward(dlogits=, dhidden=)
    sends back a loss of the caller's (the fine-tuning step's mixed loss) with a head's gradient, as
    GPT.backward(dlogits=, dhidden=) does. dlogits may be engine.logits itself, written in place."""
    cfg = tiny_config(n_layers=2, drop_rate=0.1, tie_weights=False)
    model = npgpt.GPT(cfg, params=random_params(cfg, np.random.default_rng(10)))
    rng = np.random.default_rng(11)
    x, dl, dh = rng.integers(0, 37, (2, 6)), rng.standard_normal((12, 37)), rng.standard_normal((2, 6, cfg.emb_dim))
    for names in (None, ["h.1.mlp.c_fc.weight", "lm_head.weight"]):
        logits, _, cache = model.forward(x, None, training=True, rng=HostRandom(3))
        want = model.backward(cache, dloss=None, dlogits=dl.reshape(2, 6, 37), dhidden=dh, trainable=names)
        engine = FastLossAndGrads(model, 3, 6, trainable=names)
        engine.forward(x, None, training=True, rng=HostRandom(3))
        assert relative_error(engine.logits, logits.reshape(12, 37)) < 1e-12
        engine.logits[...] = dl  # the caller's loss writes its gradient in place
        engine.backward(dhidden=dh, dlogits=engine.logits)
        assert_same_grads(engine.grads, want, 1e-12, f"dlogits {names}")
        engine.forward(x, None, training=True, rng=HostRandom(3))
        engine.backward(dlogits=dl)  # a copy is taken in
        want = model.backward(cache, dloss=None, dlogits=dl.reshape(2, 6, 37), trainable=names)
        assert_same_grads(engine.grads, want, 1e-12, f"dlogits only {names}")
    with pytest.raises(ValueError, match="dlogits has shape"):
        engine.forward(x, None)
        engine.backward(dlogits=dl[:5])
    with pytest.raises(ValueError, match="no targets"):
        engine.forward(x, rng.integers(0, 37, (2, 6)))
        engine.backward(dlogits=dl)


def test_pretraining_step_is_unchanged_by_the_fine_tuning_options():
    """trainable=None, lm_head=True (the defaults): every gradient, the same buffers as before."""
    cfg = tiny_config()
    model = npgpt.GPT(cfg, params=random_params(cfg, np.random.default_rng(8)))
    engine = FastLossAndGrads(model, 2, 6)
    assert list(engine.grads) == list(model.params) and engine.gradients.sink is None and engine.lowest == -1
    everything = FastLossAndGrads(model, 2, 6, trainable=list(model.params))
    assert everything.nbytes() == engine.nbytes()


@pytest.mark.skipif(__import__("shutil").which("g++") is None, reason="the CUDA emulation needs g++")
@pytest.mark.parametrize("task", ["classify", "instruct"])
def test_cuda_kernel_path_of_the_fast_steps_in_emulation(task):
    """Every kernel of kernels/*.cu (run by npgpt.cuda.emulate on the CPU): the cross-entropy kernel on
    targets at -100, the LayerNorm kernel on frozen LayerNorms (a tied head trains the embedding table,
    so every frozen block is passed through), the flash-attention kernel on shorter batches."""
    from npgpt.cuda import KERNEL_NAMES

    clf = make_classifier(np.float32, emb_dim=32, n_heads=2, n_layers=2)  # head size 16: the kernel's smallest
    model = clf.model
    rng = np.random.default_rng(9)
    if task == "classify":
        names = trainable_names("classify", "last-block", clf.params, 2, True, 0.5)
        ref, fst = ClassifierStep(clf, names, 0.5), FastClassifierStep(clf, names, 0.5, B, T, kernels=KERNEL_NAMES)
    else:
        names = trainable_names("instruct", "head", model.params, 2, True, 0.0)
        assert names == ["wte.weight"]
        ref, fst = InstructStep(model, names), FastInstructStep(model, names, B, T, kernels=KERNEL_NAMES)
    assert "attention" in fst.engine.kernels
    for b, t in [(3, 8), (2, 5)]:
        x = padded_batch(rng, b, t, 37)
        if task == "classify":
            batch = (x, rng.integers(0, 3, size=b))
        else:
            y = rng.integers(0, 37, size=(b, t))
            y[:, :2] = -100
            y[x == PAD] = -100
            batch = (x, y)
        ref(batch)
        fst(batch)
        assert fst.loss == pytest.approx(ref.loss, rel=1e-5)
        assert_same_grads(fst.grads, ref.grads, 3e-5, f"{task} {b}x{t}")


@pytest.mark.parametrize("choice", ["last-block", "head"])
def test_frozen_parameters_stay_bit_identical_through_fast_training(choice):
    cfg = tiny_config(n_layers=2, drop_rate=0.1)
    clf = Classifier.new(npgpt.GPT(cfg, seed=1), ["a", "b", "c"], pad_token_id=PAD)
    trainable = trainable_names("classify", choice, clf.params, cfg.n_layers, cfg.tie_weights, 0.5)
    before = {n: v.copy() for n, v in clf.params.items()}
    step = FastClassifierStep(clf, trainable, 0.5, 4, 6)
    opt = AdamW({n: clf.params[n] for n in trainable}, lr=1e-2, weight_decay=0.1)
    rng = np.random.default_rng(0)
    for _ in range(3):
        s = step((padded_batch(rng, 4, 6, 37), rng.integers(0, 3, size=4)), np.random.default_rng(1))
        assert list(s.grads) == trainable
        opt.step(s.grads)
    for n, v in clf.params.items():
        if n in trainable:
            assert not np.array_equal(v, before[n]), f"{n} should have moved"
        else:
            assert np.array_equal(v, before[n]), f"frozen {n} changed"
