import math

import numpy as np
import pytest

from npgpt import AdamW, LRSchedule, clip_grad_norm, grad_norm


def reference_adamw(p, grads, lr, b1, b2, eps, wd):
    """AdamW written per scalar in plain Python floats, step by step: the independent expectation."""
    p = list(p)
    m = [0.0] * len(p)
    v = [0.0] * len(p)
    for t, g in enumerate(grads, start=1):
        for i in range(len(p)):
            m[i] = b1 * m[i] + (1 - b1) * g[i]
            v[i] = b2 * v[i] + (1 - b2) * g[i] ** 2
            mhat = m[i] / (1 - b1**t)
            vhat = v[i] / (1 - b2**t)
            p[i] = p[i] - lr * wd * p[i] - lr * mhat / (math.sqrt(vhat) + eps)
    return p


def test_matches_scalar_reference_over_several_steps():
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal(6)
    grads = [rng.standard_normal(6) for _ in range(7)]
    params = {"w": w0.reshape(2, 3).copy()}
    opt = AdamW(params, lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    for g in grads:
        opt.step({"w": g.reshape(2, 3)})
    expected = reference_adamw(w0, grads, 0.01, 0.8, 0.95, 1e-6, 0.1)
    np.testing.assert_allclose(params["w"].ravel(), expected, rtol=1e-13, atol=1e-15)
    assert opt.t == 7


def test_constant_gradient_closed_form():
    """With a constant gradient g, m_hat = g and v_hat = g^2 at every step, so without decay each step
    moves p by exactly lr * g / (|g| + eps): after t steps p = p0 - t * lr * g / (|g| + eps)."""
    params = {"b": np.array([1.0, -2.0])}
    opt = AdamW(params, lr=0.05, eps=1e-8, weight_decay=0.5)  # ndim 1: not decayed by default
    g = np.array([0.3, -4.0])
    for _ in range(10):
        opt.step({"b": g})
    np.testing.assert_allclose(params["b"], [1.0, -2.0] - 10 * 0.05 * g / (np.abs(g) + 1e-8), rtol=1e-12)


def test_decoupled_weight_decay_closed_form():
    """Zero gradient: Adam's update is 0 and a decayed tensor shrinks by (1 - lr*wd) per step, exactly."""
    params = {"w": np.full((2, 2), 3.0), "bias": np.full(2, 3.0)}
    opt = AdamW(params, lr=0.1, weight_decay=0.2)
    for _ in range(5):
        opt.step({"w": np.zeros((2, 2)), "bias": np.zeros(2)})
    np.testing.assert_allclose(params["w"], 3.0 * (1 - 0.1 * 0.2) ** 5, rtol=1e-14)
    assert np.all(params["bias"] == 3.0)  # biases and LayerNorm (ndim 1) are not decayed


def test_decay_filter_and_lr_override():
    params = {"a": np.ones((2, 2)), "b": np.ones((2, 2))}
    opt = AdamW(params, lr=1.0, weight_decay=0.5, decay_filter=lambda name, p: name == "a")
    opt.step({"a": np.zeros((2, 2)), "b": np.zeros((2, 2))}, lr=0.1)
    assert np.allclose(params["a"], 0.95) and np.all(params["b"] == 1.0)


def test_updates_in_place_and_state_round_trip():
    rng = np.random.default_rng(1)
    params = {"w": rng.standard_normal((3, 3))}
    view = params["w"]
    opt = AdamW(params, lr=0.01)
    grads = [{"w": rng.standard_normal((3, 3))} for _ in range(4)]
    for g in grads[:2]:
        opt.step(g)
    assert params["w"] is view  # the model's array itself moved
    state = opt.state_dict()
    twin_params = {"w": params["w"].copy()}
    twin = AdamW(twin_params, lr=0.5)
    twin.load_state_dict({k: (dict(v) if isinstance(v, dict) else v) for k, v in state.items()})
    for g in grads[2:]:
        opt.step(g)
        twin.step(g)
    assert twin.t == 4 and twin.lr == 0.01
    assert np.array_equal(params["w"], twin_params["w"])


def test_missing_gradient_is_named():
    opt = AdamW({"a": np.ones(2), "b": np.ones(2)})
    with pytest.raises(ValueError, match=r"missing for \['b'\]"):
        opt.step({"a": np.ones(2)})


@pytest.mark.parametrize("kw", [dict(lr=-1), dict(betas=(1.0, 0.9)), dict(eps=0), dict(weight_decay=-0.1)])
def test_bad_hyperparameters(kw):
    with pytest.raises(ValueError):
        AdamW({"a": np.ones(2)}, **kw)


def test_clip_grad_norm_scales_to_max_norm():
    grads = {"a": np.array([3.0]), "b": np.array([[4.0]])}
    norm = clip_grad_norm(grads, 1.0)
    assert norm == pytest.approx(5.0)
    assert grad_norm(grads) == pytest.approx(1.0, rel=1e-6)
    np.testing.assert_allclose(grads["a"], [3.0 / (5.0 + 1e-6)])


def test_clip_grad_norm_leaves_small_gradients():
    grads = {"a": np.array([0.3, 0.4])}
    assert clip_grad_norm(grads, 1.0) == pytest.approx(0.5)
    assert np.array_equal(grads["a"], [0.3, 0.4])


def test_clip_grad_norm_reports_non_finite_without_scaling():
    grads = {"a": np.array([np.nan, 1.0])}
    assert math.isnan(clip_grad_norm(grads, 1.0))
    assert grads["a"][1] == 1.0


def test_schedule_warmup_then_cosine():
    s = LRSchedule(max_lr=1e-3, total_steps=110, warmup_steps=10, min_lr=1e-4)
    assert s(0) == pytest.approx(1e-4) and s(0) > 0  # never zero at step 0
    assert s(9) == pytest.approx(1e-3)  # end of warmup
    assert s(10) == pytest.approx(1e-3)
    assert s(60) == pytest.approx((1e-3 + 1e-4) / 2)  # cosine midpoint
    assert s(110) == pytest.approx(1e-4) and s(500) == pytest.approx(1e-4)
    lrs = [s(i) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_schedule_without_warmup_starts_at_max_and_defaults_min():
    s = LRSchedule(max_lr=2e-3, total_steps=100)
    assert s(0) == pytest.approx(2e-3) and s.min_lr == pytest.approx(2e-4)
    assert LRSchedule(1e-3, 100, kind="constant")(77) == 1e-3


def test_schedule_validation():
    with pytest.raises(ValueError):
        LRSchedule(max_lr=0)
    with pytest.raises(ValueError):
        LRSchedule(max_lr=1e-3, min_lr=1e-2)


def test_flat_parameters_keep_values_and_share_one_buffer():
    import npgpt
    from npgpt.backend import flat_base

    model = npgpt.GPT(npgpt.GPTConfig(vocab_size=20, context_length=4, emb_dim=8, n_heads=2, n_layers=1), seed=0)
    before = {k: v.copy() for k, v in model.params.items()}
    flat = model.flatten_params_()
    assert flat_base(model.params) is flat and flat.size == model.num_params()
    assert all(np.array_equal(model.params[k], before[k]) for k in before)
    opt = AdamW(model.params)
    assert opt.flat is flat and flat_base(opt.m) is opt.m_flat


@pytest.mark.skipif(__import__("shutil").which("g++") is None, reason="the CUDA emulation needs g++")
def test_adamw_kernel_path_equals_per_tensor_path(monkeypatch):
    """AdamW over one flat buffer through kernels/adamw.cu (emulated on the CPU) against the per-tensor
    NumPy update, decay mask included; and the gradient norm through the sq_norm kernel."""
    import npgpt
    import npgpt.optim as optim
    from npgpt.engine import FastLossAndGrads

    def build():
        model = npgpt.GPT(npgpt.GPTConfig(vocab_size=23, context_length=4, emb_dim=16, n_heads=2, n_layers=1), seed=1)
        model.flatten_params_()
        step = FastLossAndGrads(model, 2, 4)
        x = np.random.default_rng(0).integers(0, 23, (2, 4))
        step(x, x)
        return model, step.grads

    m_ref, g_ref = build()
    ref = AdamW(m_ref.params, lr=0.01, weight_decay=0.1)
    norm_ref = grad_norm(g_ref)
    m_k, g_k = build()
    monkeypatch.setattr(optim, "_kernel_enabled", lambda array, name: True)
    fast = AdamW(m_k.params, lr=0.01, weight_decay=0.1)
    assert grad_norm(g_k) == pytest.approx(norm_ref, rel=1e-6)
    for _ in range(3):
        ref.step(g_ref)
        fast.step(g_k)
    for k in m_ref.params:
        np.testing.assert_allclose(m_k.params[k], m_ref.params[k], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(fast.v[k], ref.v[k], rtol=1e-6, atol=1e-12)
