"""Activation recompute (--recompute, engine.FastLossAndGrads): keeping less in the forward and recomputing
it in the backward gives the same losses and gradients as keeping everything (float64, to 1e-12), and
the step's buffers shrink."""

import numpy as np
import pytest

import npgpt.fast.attention as fast_attention
from npgpt import GPT, GPTConfig
from npgpt.engine import make_engine
from npgpt.model import make_rng


def _run(cfg, recompute, x, y, dtype=np.float64):
    model = GPT(cfg, seed=0, dtype=dtype)
    engine = make_engine("fast", model, x.shape[0], x.shape[1], recompute=recompute)
    first = engine(x, y, training=True, rng=make_rng(5, np))
    g1 = engine.grad_flat.copy()
    # a smaller batch accumulated on top (the buffers' first rows), with other dropout draws
    second = engine(x[:2, :11], y[:2, :11], training=True, rng=make_rng(6, np), accumulate=True)
    return first, second, g1, engine.grad_flat.copy(), engine.nbytes()


@pytest.mark.parametrize("drop_rate", [0.0, 0.1])
def test_recompute_gives_the_same_losses_and_gradients(monkeypatch, drop_rate):
    # 4 query rows per block, so the recomputed attention runs over several blocks of a 19-token window
    monkeypatch.setattr(fast_attention, "ATTENTION_ROWS", 4)
    cfg = GPTConfig(vocab_size=97, context_length=20, emb_dim=32, n_heads=4, n_layers=3, drop_rate=drop_rate)
    x = np.random.default_rng(0).integers(0, 97, (3, 19))
    y = np.random.default_rng(1).integers(0, 97, (3, 19))
    base = _run(cfg, "none", x, y)
    sizes = {"none": base[4]}
    for mode in ("attention", "mlp", "block"):
        got = _run(cfg, mode, x, y)
        sizes[mode] = got[4]
        for i in (0, 1):
            assert abs(got[i] - base[i]) <= 1e-12 * abs(base[i]), (mode, i, got[i], base[i])
        for i in (2, 3):
            err = np.abs(got[i] - base[i]).max() / np.abs(base[i]).max()
            assert err < 1e-12, (mode, i, err)
            assert np.abs(base[i]).max() > 0
    assert sizes["block"] < sizes["mlp"] < sizes["none"] and sizes["attention"] < sizes["none"], sizes


def test_recompute_float32_matches_within_rounding(monkeypatch):
    monkeypatch.setattr(fast_attention, "ATTENTION_ROWS", 8)
    cfg = GPTConfig(vocab_size=97, context_length=32, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)
    x = np.random.default_rng(2).integers(0, 97, (2, 32))
    base = _run(cfg, "none", x, x, dtype=np.float32)
    got = _run(cfg, "block", x, x, dtype=np.float32)
    assert abs(got[0] - base[0]) < 1e-5 * abs(base[0])
    assert np.abs(got[2] - base[2]).max() < 1e-5 * np.abs(base[2]).max()


def test_recompute_is_refused_where_it_does_not_run():
    cfg = GPTConfig(vocab_size=97, context_length=20, emb_dim=32, n_heads=4, n_layers=1)
    with pytest.raises(ValueError, match="fast engine only"):
        make_engine("reference", GPT(cfg), 2, 8, recompute="block")
    with pytest.raises(ValueError, match="recompute must be one of none, attention, mlp, block"):
        make_engine("fast", GPT(cfg), 2, 8, recompute="everything")


@pytest.mark.skipif(__import__("shutil").which("g++") is None, reason="the CUDA emulation needs g++")
@pytest.mark.parametrize("recompute", ["attention", "block"])
def test_recompute_under_the_flash_kernel_with_dropout(recompute):
    """The flash kernel has no dropout, so a training step with dropout runs the attention path under it:
    with recompute that is the recomputing path (nothing T x T kept, the mask drawn again from the kept
    generator state). It used to be the probability-keeping path, which kept (B, NH, T, T) per layer
    and, under "block", failed in the backward's replay for want of a generator. Every kernel runs in
    npgpt.cuda.emulate on the CPU; against the readable reference."""
    from npgpt.cuda import KERNEL_NAMES
    from npgpt.engine import FastLossAndGrads
    from npgpt.gradcheck import relative_error

    cfg = GPTConfig(vocab_size=61, context_length=16, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.1)  # hs 16: the kernel's
    model = GPT(cfg, seed=0, dtype=np.float32)
    engine = FastLossAndGrads(model, 3, 12, kernels=KERNEL_NAMES, recompute=recompute)
    x, y = np.random.default_rng(0).integers(0, 61, (3, 12)), np.random.default_rng(1).integers(0, 61, (3, 12))
    _, loss, cache = model.forward(x, y, training=True, rng=make_rng(5, np))
    ref = model.backward(cache)
    assert engine(x, y, training=True, rng=make_rng(5, np)) == pytest.approx(float(loss), rel=1e-5)
    assert engine.used_flash == [False, False] and engine.acts.att == [None, None]
    for k in ref:
        assert relative_error(engine.grads[k], ref[k]) < 3e-5, k
    assert engine(x, y) == pytest.approx(float(model.forward(x, y)[1]), rel=1e-5) and engine.used_flash == [True, True]
