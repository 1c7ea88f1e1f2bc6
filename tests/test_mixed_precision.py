"""Mixed precision (precision.py, the fast engine's 16-bit path, `npgpt train --precision`).

The expectations are independent of the code under test: the float64 engine is the truth, float32 must
match it closely, bf16/fp16 within their rounding (and measurably worse than float32, so a 16-bit path
that secretly computed in float32 would fail), loss scaling by its closed-form rules.
"""

import json
import sys

import numpy as np
import pytest

from npgpt.checkpoint import STATE_FILE
from npgpt.config import GPTConfig
from npgpt.engine import FastLossAndGrads
from npgpt.model import GPT, make_rng
from npgpt.precision import LossScaler, compute_dtype
from npgpt.safetensors_io import load_safetensors
from npgpt.checkpoint import latest_checkpoint
from npgpt.train import TrainConfig, train

pytest.importorskip("ml_dtypes")

CFG = GPTConfig(vocab_size=97, context_length=32, emb_dim=64, n_heads=4, n_layers=2, drop_rate=0.0, qkv_bias=True,
                tie_weights=True)  # fmt: skip
TINY = dict(preset="nano", emb_dim=32, n_heads=2, n_layers=1, context_length=32, batch_size=2, progress=False,
            sample_tokens=2, eval_batches=1)  # fmt: skip


def batch(seed=0, B=3, T=16, V=97):
    rng = np.random.default_rng(seed)
    return rng.integers(0, V, size=(B, T)), rng.integers(0, V, size=(B, T))


def step_grads(precision, dtype=np.float32, cfg=CFG, dloss=1.0, seed=0, training=False, rng_seed=5):
    """(loss, float64 copy of the flat gradient / dloss, step) of one fast-engine step from seed-1 weights."""
    model = GPT(cfg, seed=1, dtype=dtype)
    model.flatten_params_()
    step = FastLossAndGrads(model, 3, 16, precision=precision)
    x, y = batch(seed)
    loss = step(x, y, training=training, rng=make_rng(rng_seed, np) if training else None, dloss=dloss)
    return loss, step.grad_flat.astype(np.float64) / dloss, step


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# --- LossScaler: the closed-form rules ------------------------------------------------------------


def test_loss_scaler_halves_on_overflow_and_grows_after_clean_steps():
    s = LossScaler(scale=1024.0, growth_interval=3)
    assert s.update(False) is False and s.scale == 512.0 and s.good_steps == 0
    assert [s.update(True) for _ in range(2)] == [True, True] and s.scale == 512.0
    assert s.update(True) is True and s.scale == 1024.0 and s.good_steps == 0  # third clean step: doubled
    s.update(True)
    s.update(False)  # an overflow resets the count of clean steps
    assert s.scale == 512.0 and s.good_steps == 0


def test_loss_scaler_bounds_and_state():
    s = LossScaler(scale=2.0, min_scale=1.0, growth_interval=1, max_scale=4.0)
    s.update(False)
    assert s.scale == 1.0 and not s.overflowed_at_min
    s.update(False)
    assert s.scale == 1.0 and s.overflowed_at_min  # cannot go lower: a real divergence
    for _ in range(5):
        s.update(True)
    assert s.scale == 4.0  # capped
    t = LossScaler()
    t.load_state_dict(json.loads(json.dumps(s.state_dict())))
    assert t == s
    with pytest.raises(ValueError, match="loss scale"):
        LossScaler(scale=0.5)


# --- the engine in 16 bits against float64 -------------------------------------------------------


def test_16_bit_engine_tracks_float64_within_its_rounding():
    loss64, g64, _ = step_grads("fp32", np.float64)
    loss32, g32, _ = step_grads("fp32")
    lossbf, gbf, _ = step_grads("bf16")
    lossh, gh, _ = step_grads("fp16", dloss=1024.0)  # fp16 as training runs it: with a loss scale
    errs = {"fp32": rel(g32, g64), "bf16": rel(gbf, g64), "fp16": rel(gh, g64)}
    assert errs["fp32"] < 1e-5
    assert errs["bf16"] < 2e-2 and abs(lossbf - loss64) / loss64 < 1e-3
    assert errs["fp16"] < 3e-3 and abs(lossh - loss64) / loss64 < 1e-4
    # 16-bit rounding is really there (bfloat16 has 8 mantissa bits, float16 11, float32 24)
    assert errs["bf16"] > 4 * errs["fp16"] > 40 * errs["fp32"], errs


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_16_bit_step_keeps_float32_weights_and_gradients(precision):
    model = GPT(CFG, seed=1)
    before = {k: v.copy() for k, v in model.params.items()}
    step = FastLossAndGrads(model, 3, 16, precision=precision)  # params not flattened: copied key by key
    assert step.dtype == compute_dtype(precision) and step.param_flat.dtype == step.dtype
    x, y = batch()
    step(x, y)
    assert step.grad_flat.dtype == np.float32 and all(g.dtype == np.float32 for g in step.grads.values())
    assert all(np.array_equal(before[k], model.params[k]) for k in before)  # the step never writes the weights
    # the 16-bit copy follows the float32 weights: after an update, the next loss is that of the new weights
    for k, v in model.params.items():
        v -= 0.05 * step.grads[k]
    fresh = GPT(CFG, seed=1)
    for k, v in fresh.params.items():
        v[...] = model.params[k]
    assert step.loss(x, y) == FastLossAndGrads(fresh, 3, 16, precision=precision).loss(x, y)


def test_dropout_masks_match_between_precisions():
    cfg = CFG.replace(drop_rate=0.2)
    loss32, g32, _ = step_grads("fp32", cfg=cfg, training=True)
    lossbf, gbf, _ = step_grads("bf16", cfg=cfg, training=True)
    loss_other, _, _ = step_grads("fp32", cfg=cfg, training=True, rng_seed=6)
    assert abs(lossbf - loss32) / loss32 < 1e-3 and rel(gbf, g32) < 2e-2
    assert abs(loss_other - loss32) > 1e-2  # other masks, another loss: dropout is really on


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_gradient_accumulation_adds_in_float32(precision):
    model = GPT(CFG, seed=1)
    model.flatten_params_()
    step = FastLossAndGrads(model, 3, 16, precision=precision)
    (x1, y1), (x2, y2) = batch(1), batch(2)
    step(x1, y1, dloss=0.5)
    g1 = step.grad_flat.copy()
    step(x2, y2, dloss=0.5)
    g2 = step.grad_flat.copy()
    step(x1, y1, dloss=0.5)
    step(x2, y2, dloss=0.5, accumulate=True)
    # float32 sums of the same 16-bit products (threads' partial sums may associate differently: float32
    # rounding, 1e-7; a 16-bit accumulator would be off by 1e-3)
    np.testing.assert_allclose(step.grad_flat, g1 + g2, rtol=1e-5, atol=1e-9)


def test_fp16_small_gradients_need_the_loss_scale_and_overflow_shows_as_inf():
    _, g64, _ = step_grads("fp32", np.float64)
    _, g_tiny, _ = step_grads("fp16", dloss=2.0**-14)  # gradients as small as a 16k-token batch's: subnormal in fp16
    _, g_scaled, _ = step_grads("fp16", dloss=2.0**-14 * 2.0**16)  # the same, times the default loss scale
    assert rel(g_tiny, g64) > 10 * rel(g_scaled, g64), (rel(g_tiny, g64), rel(g_scaled, g64))
    assert rel(g_scaled, g64) < 3e-3
    _, g_huge, _ = step_grads("fp16", dloss=2.0**30)  # dlogits ~ 2^30 / 48: past float16's 65504
    assert not np.isfinite(g_huge).all()


def test_precision_errors_name_the_fix(monkeypatch):
    with pytest.raises(ValueError, match="float32 master weights"):
        FastLossAndGrads(GPT(CFG, seed=1, dtype=np.float64), 3, 16, precision="bf16")
    with pytest.raises(ValueError, match="precision must be one of"):
        FastLossAndGrads(GPT(CFG, seed=1), 3, 16, precision="fp8")
    with pytest.raises(ValueError, match=r"precision 'fp16' \(float16\) cannot use the CUDA kernel\(s\) attention \(float32 only\)"):
        FastLossAndGrads(GPT(CFG, seed=1), 3, 16, precision="fp16", kernels=["layernorm", "attention"])
    with pytest.raises(ValueError, match="fast engine"):
        TrainConfig(precision="bf16", engine="reference").validate()
    with pytest.raises(ValueError, match="--loss-scale"):
        TrainConfig(precision="fp16", loss_scale=0.5).validate()
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)  # as if not installed
    with pytest.raises(ValueError, match="pip install ml_dtypes"):
        compute_dtype("bf16")


# --- training ------------------------------------------------------------------------------------------


def step_losses(out_dir):
    return [r["loss"] for r in map(json.loads, (out_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "step"]


def test_mixed_precision_training_tracks_float32_and_saves_float32(tmp_path):
    runs = {}
    for precision in ("fp32", "bf16", "fp16"):
        out = tmp_path / precision
        train(TrainConfig(**TINY, max_steps=20, lr=1e-2, eval_interval=20, precision=precision, out_dir=str(out)))
        runs[precision] = np.array(step_losses(out))
    assert runs["fp32"][-1] < runs["fp32"][0] - 0.5  # it learns
    for precision in ("bf16", "fp16"):
        assert np.abs(runs[precision] / runs["fp32"] - 1).max() < 2e-3, (precision, runs[precision], runs["fp32"])
    ckpt = latest_checkpoint(tmp_path / "fp16")
    tensors = load_safetensors(next(ckpt.glob("model*.safetensors")))
    assert {v.dtype for v in tensors.values()} == {np.dtype(np.float32)}  # master weights, not the 16-bit copy
    state = json.loads((ckpt / STATE_FILE).read_text())
    assert state["loss_scaler"]["scale"] == 2.0**16


def test_fp16_overflow_lowers_the_scale_skips_and_resumes_with_it(tmp_path):
    out = tmp_path / "run"
    kw = dict(TINY, precision="fp16", loss_scale=2.0**24, eval_interval=50, out_dir=str(out))
    r = train(TrainConfig(**kw, max_steps=6))  # 2^24 / 64 tokens: dlogits overflow float16 until the scale drops
    assert not r.interrupted and 0 < r.skipped_steps < 6
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    skips = [rec for rec in records if rec["kind"] == "skip"]
    assert len(skips) == r.skipped_steps and all(s["reason"] == "fp16 overflow" for s in skips)
    assert [s["loss_scale"] for s in skips] == [2.0**24 / 2 ** (i + 1) for i in range(len(skips))]
    scale = json.loads((latest_checkpoint(out) / STATE_FILE).read_text())["loss_scaler"]["scale"]
    assert scale == 2.0**24 / 2 ** len(skips)
    train(TrainConfig(**kw, max_steps=8, resume=True))
    resumed = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    later = [rec["loss_scale"] for rec in resumed if rec["kind"] == "skip" and rec["step"] >= 6]
    assert all(s <= scale / 2 for s in later), later  # restarting from 2^24 would overflow and record 2^23


# --- AdamW keeps the 16-bit copy of the weights (update.Updater) -----------------------------------------


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_updater_keeps_the_16bit_weights_as_a_refresh_would(precision):
    """With 16-bit compute AdamW rounds the new weights into the engine's 16-bit copy in its own pass and
    the next update's forward does not refresh it: three updates (the weights rescaled in between, which
    weights_changed() announces) give bitwise the losses, weights and copy of the same updates with the copy
    refreshed before every forward (the updater's copy switched off)."""
    from npgpt.optim import AdamW
    from npgpt.update import Updater

    runs = []
    for keep_copy in (True, False):
        model = GPT(CFG, seed=1)
        model.flatten_params_()
        engine = FastLossAndGrads(model, 3, 16, precision=precision)
        scaler = LossScaler(scale=1024.0) if precision == "fp16" else None
        updater = Updater(engine, AdamW(model.params, lr=1e-3), grad_clip=1.0, scaler=scaler)
        assert updater.copy is engine.param_flat
        if not keep_copy:
            updater.copy = None  # AdamW leaves the copy alone; every forward refreshes it
        losses = []
        for i in range(3):
            x, y = batch(seed=i)
            losses.append(updater([(x, y, None)]).loss)
            assert not engine.weights_copy_current  # outside an update every forward refreshes
            if i == 0:  # weights written by someone else: the updater is told
                model.params["wte.weight"][...] *= np.float32(0.5)
                updater.weights_changed()
        engine._refresh_low_precision_weights()
        runs.append((losses, engine.param_flat.view(np.uint16).copy(), np.concatenate([p.ravel() for p in model.params.values()])))
    (l1, c1, w1), (l2, c2, w2) = runs
    assert l1 == l2
    np.testing.assert_array_equal(c1, c2)
    np.testing.assert_array_equal(w1, w2)


def test_adamw_copy_must_match_the_weights():
    from npgpt.optim import AdamW

    params = {"a": np.ones((2, 3), np.float32), "b": np.ones(4, np.float32)}
    opt = AdamW(params, lr=0.1)
    grads = {k: np.full_like(p, 0.5) for k, p in params.items()}
    with pytest.raises(ValueError, match="copy must be a 1-D bfloat16/float16 array of 10 elements"):
        opt.step(grads, copy=np.zeros(9, np.float16))
    with pytest.raises(ValueError, match="got float32"):
        opt.step(grads, copy=np.zeros(10, np.float32))
    assert opt.t == 0  # nothing was updated
    copy = np.zeros(10, np.float16)
    opt.step(grads, copy=copy)
    np.testing.assert_array_equal(copy, np.concatenate([params["a"].ravel(), params["b"]]).astype(np.float16))
    # first step: p (1 - lr wd) - lr m_hat / (sqrt(v_hat) + eps) = 0.999 - 0.1 for the matrix (it decays), 1 - 0.1 for b
    assert copy[0] == np.float16(0.899) and copy[6] == np.float16(0.9)
