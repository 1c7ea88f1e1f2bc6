"""Forward values against independent expectations, and the properties each layer must have.

The gradients themselves are checked in test_gradients.py against finite differences.
"""

import math

import numpy as np
import pytest

from npgpt import layers as L
from npgpt.backend import to_numpy
from npgpt.gradcheck import HostRandom


def close(a, b, rtol=1e-10, atol=1e-12):
    np.testing.assert_allclose(to_numpy(a), to_numpy(b), rtol=rtol, atol=atol)


# --- embedding ------------------------------------------------------------------------------------


def test_embedding_forward_is_row_lookup(xp, rng):
    W = xp.asarray(rng.standard_normal((7, 3)))
    ids = xp.asarray([[0, 6, 2], [2, 2, 5]])
    out, _ = L.embedding_forward(ids, W)
    assert out.shape == (2, 3, 3)
    for b in range(2):
        for t in range(3):
            close(out[b, t], W[int(ids[b, t])])


def test_embedding_backward_accumulates_repeated_ids(xp, rng):
    W = xp.asarray(rng.standard_normal((5, 4)))
    ids = xp.asarray([[1, 1, 3], [1, 0, 3]])
    _, cache = L.embedding_forward(ids, W)
    dout = xp.asarray(rng.standard_normal((2, 3, 4)))
    dW = to_numpy(L.embedding_backward(dout, cache))
    d = to_numpy(dout)
    expected = np.zeros((5, 4))
    for b in range(2):
        for t in range(3):
            expected[int(ids[b, t])] += d[b, t]
    close(dW, expected)
    assert np.all(dW[[2, 4]] == 0)  # ids never looked up get nothing
    close(dW[1], d[0, 0] + d[0, 1] + d[1, 0])  # id 1 appears three times


@pytest.mark.parametrize("bad", [[[7]], [[-1]]])
def test_embedding_out_of_range_ids_are_a_clear_error(bad):
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 7\)"):
        L.embedding_forward(np.asarray(bad), np.zeros((7, 2)))


def test_embedding_rejects_float_ids():
    with pytest.raises(ValueError, match="integers"):
        L.embedding_forward(np.asarray([[1.0]]), np.zeros((7, 2)))


# --- linear -----------------------------------------------------------------------------------------


def test_linear_matches_explicit_sum(xp, rng):
    x, W, b = rng.standard_normal((2, 3, 4)), rng.standard_normal((4, 5)), rng.standard_normal(5)
    out, _ = L.linear_forward(xp.asarray(x), xp.asarray(W), xp.asarray(b))
    expected = np.einsum("bti,ij->btj", x, W) + b
    close(out, expected)
    out_nb, cache = L.linear_forward(xp.asarray(x), xp.asarray(W))
    close(out_nb, expected - b)
    assert L.linear_backward(xp.ones((2, 3, 5)), cache)[2] is None


def test_linear_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match=r"\(C_in, C_out\)"):
        L.linear_forward(np.zeros((2, 3)), np.zeros((4, 3)))


# --- layernorm ------------------------------------------------------------------------------------


def test_layernorm_normalises_each_row(xp, rng):
    x = 3.0 * rng.standard_normal((4, 5, 16)) + 7.0
    out, _ = L.layernorm_forward(xp.asarray(x), xp.ones(16), xp.zeros(16), eps=0.0)
    out = to_numpy(out)
    close(out.mean(-1), np.zeros((4, 5)), atol=1e-12)
    close(out.var(-1), np.ones((4, 5)), rtol=1e-12)


def test_layernorm_matches_formula_with_eps(xp, rng):
    x, w, b = rng.standard_normal((2, 3, 6)), rng.standard_normal(6), rng.standard_normal(6)
    out, _ = L.layernorm_forward(xp.asarray(x), xp.asarray(w), xp.asarray(b), eps=1e-2)
    expected = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-2) * w + b
    close(out, expected)


# --- GELU -------------------------------------------------------------------------------------------


def test_gelu_matches_gpt2_tanh_formula_elementwise(xp):
    xs = np.linspace(-6, 6, 25)
    out, _ = L.gelu_forward(xp.asarray(xs))
    expected = [0.5 * v * (1 + math.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v**3))) for v in xs]
    close(out, expected)


def test_gelu_is_close_to_exact_erf_gelu():
    xs = np.linspace(-5, 5, 101)
    exact = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in xs])
    out, _ = L.gelu_forward(xs)
    assert np.max(np.abs(out - exact)) < 1e-3  # the tanh approximation's known accuracy


def test_gelu_derivative_closed_form_at_zero():
    # gelu'(0) = 0.5 exactly (the tanh term vanishes there)
    _, cache = L.gelu_forward(np.zeros(3))
    close(L.gelu_backward(np.asarray([1.0, 2.0, -3.0]), cache), [0.5, 1.0, -1.5])


# --- attention --------------------------------------------------------------------------------------


def naive_attention(qkv, n_head):
    """Position by position, head by head, with explicit loops: an independent reference."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    hs = C // n_head
    out = np.zeros((B, T, C))
    for b in range(B):
        for h in range(n_head):
            q = qkv[b, :, h * hs : (h + 1) * hs]
            k = qkv[b, :, C + h * hs : C + (h + 1) * hs]
            v = qkv[b, :, 2 * C + h * hs : 2 * C + (h + 1) * hs]
            for t in range(T):
                scores = [float(q[t] @ k[s]) / math.sqrt(hs) for s in range(t + 1)]
                m = max(scores)
                w = [math.exp(sc - m) for sc in scores]
                z = sum(w)
                out[b, t, h * hs : (h + 1) * hs] = sum(w[s] / z * v[s] for s in range(t + 1))
    return out


@pytest.mark.parametrize("B,T,C,NH", [(2, 5, 8, 2), (1, 1, 4, 1), (2, 4, 12, 3), (1, 7, 16, 8)])
def test_attention_matches_naive_loops(xp, rng, B, T, C, NH):
    qkv = rng.standard_normal((B, T, 3 * C))
    out, _ = L.attention_forward(xp.asarray(qkv), NH)
    close(out, naive_attention(qkv, NH))


def test_attention_is_causal(xp, rng):
    qkv = rng.standard_normal((2, 6, 24))
    out, _ = L.attention_forward(xp.asarray(qkv), 4)
    changed = qkv.copy()
    changed[:, 4:] = rng.standard_normal((2, 2, 24))  # change the last two positions only
    out2, _ = L.attention_forward(xp.asarray(changed), 4)
    close(out[:, :4], to_numpy(out2)[:, :4], rtol=0, atol=0)  # earlier outputs identical, bit for bit
    assert not np.allclose(to_numpy(out)[:, 4:], to_numpy(out2)[:, 4:])


def test_attention_gradient_is_causal(rng):
    qkv = rng.standard_normal((1, 5, 12))
    _, cache = L.attention_forward(qkv, 2)
    dout = np.zeros((1, 5, 4))
    dout[0, 1] = rng.standard_normal(4)  # only position 1's output matters
    dqkv = L.attention_backward(dout, cache)
    assert np.all(dqkv[0, 2:] == 0)  # later positions cannot influence position 1
    assert np.any(dqkv[0, :2] != 0)


def test_attention_rejects_bad_head_count():
    with pytest.raises(ValueError, match="n_head"):
        L.attention_forward(np.zeros((1, 2, 24)), 5)


def test_attention_kv_step_equals_full_attention(rng):
    B, T, C, NH = 2, 6, 8, 2
    qkv = rng.standard_normal((B, T, 3 * C))
    full, _ = L.attention_forward(qkv, NH)
    k_cache, v_cache = np.zeros((B, NH, 10, C // NH)), np.zeros((B, NH, 10, C // NH))
    first = L.attention_step_kv(qkv[:, :4], NH, k_cache, v_cache, 0)  # prefill 4 positions
    rest = [L.attention_step_kv(qkv[:, t : t + 1], NH, k_cache, v_cache, t) for t in range(4, T)]
    close(np.concatenate([first] + rest, axis=1), full)


# --- cross-entropy --------------------------------------------------------------------------------


def test_cross_entropy_of_uniform_logits_is_log_v(xp):
    loss, _ = L.softmax_cross_entropy_forward(xp.zeros((2, 3, 11)), xp.asarray([[0, 5, 10], [1, 2, 3]]))
    assert loss.shape == ()
    assert abs(float(loss) - math.log(11)) < 1e-12


def test_cross_entropy_matches_closed_form_with_ignore_index(xp, rng):
    logits = rng.standard_normal((2, 4, 6)) * 3
    targets = rng.integers(0, 6, size=(2, 4))
    targets[0, 1] = targets[1, 3] = -100
    loss, _ = L.softmax_cross_entropy_forward(xp.asarray(logits), xp.asarray(targets))
    terms = []
    for b in range(2):
        for t in range(4):
            if targets[b, t] == -100:
                continue
            row = logits[b, t]
            terms.append(-(row[targets[b, t]] - math.log(sum(math.exp(v) for v in row))))
    assert abs(float(loss) - sum(terms) / len(terms)) < 1e-12


def test_cross_entropy_ignored_rows_get_zero_gradient(rng):
    logits = rng.standard_normal((1, 3, 5))
    targets = np.asarray([[2, -100, 4]])
    _, cache = L.softmax_cross_entropy_forward(logits, targets)
    d = L.softmax_cross_entropy_backward(1.0, cache)
    assert np.all(d[0, 1] == 0)
    close(d.sum(-1), np.zeros((1, 3)), atol=1e-15)  # each row of softmax - onehot sums to 0


def test_cross_entropy_is_stable_for_huge_logits(xp):
    logits = xp.asarray([[[1e4, 0.0, -1e4], [3e38, 3e38, 0.0]]], dtype=xp.float32)
    loss, cache = L.softmax_cross_entropy_forward(logits, xp.asarray([[0, 1]]))
    assert abs(float(loss) - math.log(2) / 2) < 1e-6  # row 0: loss 0; row 1: log 2
    assert np.isfinite(to_numpy(L.softmax_cross_entropy_backward(1.0, cache))).all()


def test_cross_entropy_all_ignored_is_an_error():
    with pytest.raises(ValueError, match="ignore_index"):
        L.softmax_cross_entropy_forward(np.zeros((1, 2, 3)), np.full((1, 2), -100))


def test_cross_entropy_target_out_of_range_is_an_error():
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        L.softmax_cross_entropy_forward(np.zeros((1, 2, 3)), np.asarray([[0, 3]]))


# --- dropout -------------------------------------------------------------------------------------------


def test_dropout_mask_statistics(xp):
    p, n = 0.3, 1_000_000
    x = xp.ones(n)
    out, cache = L.dropout_forward(x, p, HostRandom(0, xp))
    out = to_numpy(out)
    frac_dropped = np.mean(out == 0)
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(frac_dropped - p) < 5 * sigma
    assert np.allclose(out[out != 0], 1 / (1 - p))  # survivors scaled by 1/(1-p)
    assert abs(out.mean() - 1.0) < 5 * math.sqrt(p / (1 - p) / n)  # expectation preserved


def test_dropout_backward_uses_the_same_mask(xp, rng):
    x = xp.asarray(rng.standard_normal((4, 50)))
    out, cache = L.dropout_forward(x, 0.5, HostRandom(1, xp))
    dout = xp.asarray(rng.standard_normal((4, 50)))
    dx = to_numpy(L.dropout_backward(dout, cache))
    kept = to_numpy(out) != 0
    close(dx, np.where(kept, to_numpy(dout) * 2.0, 0.0))


def test_dropout_identity_when_off(rng):
    x = rng.standard_normal((3, 4))
    for p, training in [(0.0, True), (0.5, False)]:
        out, cache = L.dropout_forward(x, p, None, training=training)
        assert out is x and cache.keep is None
        d = rng.standard_normal((3, 4))
        assert L.dropout_backward(d, cache) is d


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5])
def test_dropout_rejects_bad_p(p):
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        L.dropout_forward(np.ones(3), p, np.random.default_rng(0))


def test_dropout_needs_rng_in_training():
    with pytest.raises(ValueError, match="default_rng"):
        L.dropout_forward(np.ones(3), 0.5, None)


# --- composites ----------------------------------------------------------------------------------------


def test_ffn_equals_its_steps(rng):
    x, w1, b1, w2, b2 = (rng.standard_normal(s) for s in [(2, 3, 4), (4, 16), (16,), (16, 4), (4,)])
    out, _ = L.ffn_forward(x, w1, b1, w2, b2)
    h = x @ w1 + b1
    g = 0.5 * h * (1 + np.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))
    close(out, g @ w2 + b2)


def _ln(x, w, b, eps=1e-5):
    return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps) * w + b


def test_block_equals_pre_layernorm_residual_formula(rng):
    from npgpt.gradcheck_suite import _block_params

    C, NH = 8, 2
    x = rng.standard_normal((2, 5, C))
    p = _block_params(rng, C)
    out, _ = L.block_forward(x, p, NH)
    qkv = _ln(x, p["ln_1.weight"], p["ln_1.bias"]) @ p["attn.c_attn.weight"] + p["attn.c_attn.bias"]
    x1 = x + naive_attention(qkv, NH) @ p["attn.c_proj.weight"] + p["attn.c_proj.bias"]
    h = _ln(x1, p["ln_2.weight"], p["ln_2.bias"]) @ p["mlp.c_fc.weight"] + p["mlp.c_fc.bias"]
    g = 0.5 * h * (1 + np.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))
    close(out, x1 + g @ p["mlp.c_proj.weight"] + p["mlp.c_proj.bias"])


def test_block_params_with_wrong_keys_are_a_clear_error(rng):
    from npgpt.gradcheck_suite import _block_params

    p = _block_params(rng, 8)
    p["attn.c_atn.weight"] = p.pop("attn.c_attn.weight")
    with pytest.raises(ValueError, match="missing.*attn.c_attn.weight.*unexpected.*attn.c_atn.weight"):
        L.block_forward(rng.standard_normal((1, 2, 8)), p, 2)


# --- dtypes ------------------------------------------------------------------------------------------------


def test_every_layer_keeps_float32(xp, rng):
    from npgpt.gradcheck_suite import layer_checks

    for check in layer_checks():
        inputs = [xp.asarray(v, dtype=xp.float32) if isinstance(v, np.ndarray) and v.dtype.kind == "f"
                  else ({k: xp.asarray(a, dtype=xp.float32) for k, a in v.items()} if isinstance(v, dict)
                        else (xp.asarray(v) if isinstance(v, np.ndarray) else v))
                  for v in check.make_inputs(np.random.default_rng(0))]  # fmt: skip
        kwargs = {"xp": xp} if "xp" in check.forward.__code__.co_varnames else {}
        out, cache = check.forward(*inputs, **kwargs)
        assert out.dtype == np.float32, check.layer
        grads = check.backward(xp.ones_like(out), cache)
        for g in grads if isinstance(grads, tuple) else (grads,):
            for a in g.values() if isinstance(g, dict) else (g,):
                assert a.dtype == np.float32, check.layer
