"""The numerically checkable claims of docs/backprop.md, checked, so the text and the code cannot drift.

Each test first finds the claim's wording in the document (if someone rewrites the sentence, the test
points at it), then checks it in float64 against the layer code or against central differences.
"""

import itertools
import math
import re
from pathlib import Path

import numpy as np
import pytest

import npgpt
from npgpt import GPT, layers as L
from npgpt.layers.attention import merge_heads, split_heads
from npgpt.model_check import tiny_config

BACKPROP_MD = Path(__file__).resolve().parents[1] / "docs" / "backprop.md"
DOC = re.sub(r"\s+", " ", BACKPROP_MD.read_text(encoding="utf-8"))  # line breaks do not matter


def doc_says(*snippets):
    for snippet in snippets:
        assert re.sub(r"\s+", " ", snippet) in DOC, f"docs/backprop.md no longer says: {snippet!r}"


def numeric_jacobian(f, x, eps=1e-6):
    """J[j, i] = d f(x)[j] / d x[i] by central differences (x and f(x) flattened)."""
    x = np.array(x, dtype=np.float64)
    cols = []
    for i in range(x.size):
        e = np.zeros(x.size)
        e[i] = eps
        cols.append((f(x + e.reshape(x.shape)).ravel() - f(x - e.reshape(x.shape)).ravel()) / (2 * eps))
    return np.stack(cols, axis=1)


# --- Attention: reshape and transpose at the ends --------------------------------------------------


def test_dy_is_a_reshape_then_a_transpose_not_a_plain_reshape():
    doc_says("is reshaped to `(B, T, NH, hs)` and its axes 1 and 2 are swapped",
             "puts the entries in other places whenever `NH > 1` and `T > 1`")  # fmt: skip
    rng = np.random.default_rng(0)
    for B, T, NH, hs in [(2, 3, 2, 4), (1, 5, 4, 2), (2, 1, 3, 4), (2, 4, 1, 3)]:
        dout = rng.standard_normal((B, T, NH * hs))
        dy = dout.reshape(B, T, NH, hs).transpose(0, 2, 1, 3)  # the code's (and the text's) two steps
        plain = dout.reshape(B, NH, T, hs)
        assert np.array_equal(merge_heads(dy), dout)  # the inverse of merge_heads
        if NH > 1 and T > 1:
            assert np.abs(plain - dy).max() > 0.1
        else:
            assert np.array_equal(plain, dy)


def test_the_attention_backward_of_the_text_is_the_code():
    """Every formula of the Attention section, written out in NumPy, against attention_backward: dy by
    reshape + transpose, dv, datt, dscores, dqk (the renamed scaled gradient), dq, dk, and the stack
    + transpose + reshape back into dqkv."""
    doc_says("dqk = dscores / sqrt(hs)", "dq  = dqk @ k", "dk  = dqk^T @ q",
             "transposed to `(B, T, 3, NH, hs)` and only then reshaped into `dqkv`")  # fmt: skip
    rng = np.random.default_rng(1)
    B, T, C, NH = 2, 5, 12, 3
    hs = C // NH
    qkv = rng.standard_normal((B, T, 3 * C))
    y, cache = L.attention_forward(qkv, NH)
    dout = rng.standard_normal(y.shape)
    q, k, v, att = cache.q, cache.k, cache.v, cache.att
    tr = lambda a: a.transpose(0, 1, 3, 2)  # noqa: E731  ^T: swap the last two axes
    dy = dout.reshape(B, T, NH, hs).transpose(0, 2, 1, 3)
    dv = tr(att) @ dy
    datt = dy @ tr(v)
    dscores = att * (datt - (datt * att).sum(axis=-1, keepdims=True))
    dqk = dscores / math.sqrt(hs)
    dq, dk = dqk @ k, tr(dqk) @ q
    dqkv = np.stack([dq, dk, dv]).transpose(1, 3, 0, 2, 4).reshape(B, T, 3 * C)
    assert np.allclose(dqkv, L.attention_backward(dout, cache), rtol=0, atol=1e-12)
    for mine, theirs in zip(split_heads(dqkv, NH), (dq, dk, dv)):  # the inverse of split_heads
        assert np.array_equal(mine, theirs)
    # The plain reshape of dout would have given another gradient.
    dy_wrong = dout.reshape(B, NH, T, hs)
    assert np.abs(tr(att) @ dy_wrong - dv).max() > 0.1


# --- Softmax: J, zero row sums, the max subtraction ------------------------------------------------


def stable_softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def test_softmax_jacobian_is_symmetric_with_zero_row_sums_and_ignores_the_max():
    doc_says("d a[s] / d z[r] = a[s] * (delta[s, r] - a[r])", "i.e. `J 1 = 0`")
    rng = np.random.default_rng(2)
    z = 3.0 * rng.standard_normal(7)
    a = stable_softmax(z)
    J = np.diag(a) - np.outer(a, a)
    assert np.array_equal(J, J.T)
    assert np.abs(J @ np.ones(7)).max() < 1e-15
    # softmax(z - max z), max included in the function, has Jacobian J; so does the plain softmax.
    assert np.abs(numeric_jacobian(stable_softmax, z) - J).max() < 1e-9
    plain = lambda z: np.exp(z) / np.exp(z).sum()  # noqa: E731
    assert np.abs(numeric_jacobian(plain, z) - J).max() < 1e-9
    # Shifting every score by the same c leaves the softmax unchanged (the identity behind both).
    assert np.allclose(stable_softmax(z + 5.0), a, rtol=1e-14, atol=0)


def test_each_row_of_dscores_sums_to_zero_masked_and_with_dropout():
    doc_says("**Each row of `dscores` sums to zero.**", "sum_s dscores[s] = sum_s att[s] * datt[s] - S * sum_s att[s] = S - S = 0")
    rng = np.random.default_rng(3)
    B, T, C, NH = 2, 6, 8, 2
    for training in (False, True):
        qkv = rng.standard_normal((B, T, 3 * C))
        y, cache = L.attention_forward(qkv, NH, attn_pdrop=0.3, rng=np.random.default_rng(4), training=training)
        dy = rng.standard_normal(y.shape).reshape(B, T, NH, C // NH).transpose(0, 2, 1, 3)
        datt = dy @ cache.v.transpose(0, 1, 3, 2)
        if training:
            datt = datt * cache.keep * cache.drop_scale
        att = cache.att
        dscores = att * (datt - (datt * att).sum(axis=-1, keepdims=True))
        assert np.abs(dscores.sum(axis=-1)).max() < 1e-14 * np.abs(dscores).max() * T
        assert np.all(dscores[..., np.triu_indices(T, 1)[0], np.triu_indices(T, 1)[1]] == 0.0)  # masked keys
        # and it is the gradient of sum(softmax(scores) * datt) with respect to the scores
        s0 = (cache.q @ cache.k.transpose(0, 1, 3, 2)) / math.sqrt(C // NH)
        b, h, t = 1, 1, T - 1  # the last query row sees every key
        numeric = numeric_jacobian(stable_softmax, s0[b, h, t]).T @ datt[b, h, t]
        assert np.abs(numeric - dscores[b, h, t]).max() < 1e-8


def test_zero_row_sums_seen_through_attention_backward():
    """If each row of dscores sums to zero, dq = dqk @ k does not change when the same vector u is added
    to every key of a head (the scores of a row all shift by q . u / sqrt(hs), the softmax ignores that).
    Checked on attention_backward itself: the whole dqkv stays the same."""
    rng = np.random.default_rng(5)
    B, T, C, NH = 2, 5, 8, 2
    qkv = rng.standard_normal((B, T, 3 * C))
    dout = rng.standard_normal((B, T, C))
    shifted = qkv.copy()
    shifted[..., C : 2 * C] += 3.0 * rng.standard_normal(C)  # u per head, the same at every position
    d0 = L.attention_backward(dout, L.attention_forward(qkv, NH)[1])
    d1 = L.attention_backward(dout, L.attention_forward(shifted, NH)[1])
    assert np.abs(d1 - d0).max() < 1e-12 * np.abs(d0).max() * 100


# --- LayerNorm: the skipped steps and what eps does ------------------------------------------------


def layernorm_pieces(x, eps):
    C = x.shape[-1]
    xc = x - x.mean()
    var = (xc * xc).mean()
    rstd = 1.0 / np.sqrt(var + eps)
    return C, xc, var, rstd, xc * rstd


@pytest.mark.parametrize("eps", [0.0, 1e-5, 1e-2])
def test_layernorm_intermediate_derivatives(eps):
    doc_says("= (2/C) * xc[i]", "= -(1/C) rstd^3 xc[i]", "= -(1/C) rstd^2 xhat[i]",
             "= rstd * (delta[i, j] - 1/C - xhat[i] * xhat[j] / C)")  # fmt: skip
    x = np.random.default_rng(6).standard_normal(6) * 0.3 + 1.0
    C, xc, var, rstd, xhat = layernorm_pieces(x, eps)
    dvar = numeric_jacobian(lambda x: np.array(layernorm_pieces(x, eps)[2]), x)[0]
    drstd = numeric_jacobian(lambda x: np.array(layernorm_pieces(x, eps)[3]), x)[0]
    dxhat = numeric_jacobian(lambda x: layernorm_pieces(x, eps)[4], x)  # [j, i] = d xhat[j] / d x[i]
    assert np.allclose(dvar, (2 / C) * xc, rtol=1e-7, atol=1e-9)
    assert np.allclose(drstd, -(1 / C) * rstd**3 * xc, rtol=1e-6, atol=1e-8)
    assert np.allclose(drstd, -(1 / C) * rstd**2 * xhat, rtol=1e-6, atol=1e-8)
    formula = rstd * (np.eye(C) - 1 / C - np.outer(xhat, xhat) / C)  # symmetric in i, j
    assert np.abs(dxhat - formula).max() < 1e-6 * np.abs(formula).max()


@pytest.mark.parametrize("eps", [0.0, 1e-5, 1e-2])
def test_layernorm_dx_dot_ones_and_dx_dot_xhat(eps):
    doc_says("dx . 1 = 0`, for every `eps`", "dx . xhat = 0` only for `eps = 0`",
             "= rstd * C * mean(g * xhat) * eps / (var + eps)",
             "`sum_i xhat[i]^2 = rstd^2 * sum_i xc[i]^2 = C * var / (var + eps)`")  # fmt: skip
    rng = np.random.default_rng(7)
    C = 16
    x = 0.2 * rng.standard_normal((5, C)) + 3.0  # small variance (about 0.04): eps = 1e-2 matters
    weight, bias = 1.0 + 0.3 * rng.standard_normal(C), rng.standard_normal(C)
    out, cache = L.layernorm_forward(x, weight, bias, eps=eps)
    dout = rng.standard_normal(out.shape)
    dx, _, _ = L.layernorm_backward(dout, cache)
    xhat, rstd = cache.xhat, cache.rstd[:, 0]
    var = x.var(axis=-1)
    g = dout * weight
    scale = np.abs(dx).max() * np.sqrt(C)
    assert np.abs(dx.sum(axis=-1)).max() < 1e-14 * scale  # dx . 1 = 0 whatever eps is
    sum_sq = (xhat * xhat).sum(axis=-1)
    assert np.allclose(sum_sq, C * var / (var + eps), rtol=1e-12)
    dot = (dx * xhat).sum(axis=-1)
    predicted = rstd * C * (g * xhat).mean(axis=-1) * eps / (var + eps)
    assert np.allclose(dot, predicted, rtol=1e-8, atol=1e-14 * scale)
    if eps == 0.0:
        assert np.allclose(sum_sq, C, rtol=1e-13)
        assert np.abs(dot).max() < 1e-13 * scale
    else:
        assert np.all(sum_sq < C)
    if eps == 1e-2:
        assert np.abs(dot).max() > 1e-2 * scale  # far from zero: the component along xhat is real


def test_scaling_a_row_changes_layernorm_only_through_eps():
    """dx . xhat is rstd times the rate at which the loss changes when the row is scaled."""
    rng = np.random.default_rng(8)
    x = 0.2 * rng.standard_normal(8) + 1.0
    w, b, dout = rng.standard_normal(8), rng.standard_normal(8), rng.standard_normal(8)
    for eps in (0.0, 1e-2):
        loss = lambda s: float((L.layernorm_forward(s * x, w, b, eps=eps)[0] * dout).sum())  # noqa: E731
        rate = (loss(1 + 1e-6) - loss(1 - 1e-6)) / 2e-6
        out, cache = L.layernorm_forward(x, w, b, eps=eps)
        dx = L.layernorm_backward(dout, cache)[0]
        assert rate == pytest.approx(float((dx * cache.xhat).sum() / cache.rstd[0]), abs=1e-7)
        assert (abs(rate) < 1e-8) == (eps == 0.0)


# --- Linear: shapes check, they do not decide ------------------------------------------------------


def products_of_shape(N, C_in, C_out, shape):
    factors = {"dout": (N, C_out), "dout.T": (C_out, N), "weight": (C_in, C_out), "weight.T": (C_out, C_in)}
    found = []
    for (a, sa), (b, sb) in itertools.product(factors.items(), repeat=2):
        if a.split(".")[0] != b.split(".")[0] and sa[1] == sb[0] and (sa[0], sb[1]) == shape:
            found.append(f"{a} @ {b}")
    return found


def test_shapes_decide_only_when_the_sizes_differ():
    doc_says("when `N`, `C_in` and `C_out` all differ, the only product of `dout` `(N, C_out)` and `weight`",
             "For a square weight, such as `attn.c_proj.weight` `(C, C)`, `dout @ weight` has the same shape and is wrong")  # fmt: skip
    assert products_of_shape(6, 3, 4, (6, 3)) == ["dout @ weight.T"]
    assert products_of_shape(6, 4, 4, (6, 4)) == ["dout @ weight", "dout @ weight.T"]
    rng = np.random.default_rng(9)
    x, weight = rng.standard_normal((6, 4)), rng.standard_normal((4, 4))

    def forward(x, weight):
        return L.linear_forward(x, weight)

    def shape_only(dout, cache):  # right shape, wrong product
        dx, dweight, _ = L.linear_backward(dout, cache)
        return dout @ cache.weight, dweight

    rx, rw = npgpt.gradcheck(forward, shape_only, [x, weight])
    assert not rx.passed and rx.max_rel_error > 1e-2 and rw.passed
    npgpt.assert_gradients(forward, lambda d, c: L.linear_backward(d, c)[:2], [x, weight])


# --- Cross-entropy: the entries of dlogits and what a descent step on them does ---------------------


def test_cross_entropy_gradient_entries_and_a_descent_step_on_the_logits():
    doc_says("`+dloss * probs[n, j] / n_valid` and the target's is `-dloss * (1 - probs[n, t[n]]) / n_valid`",
             "would lower every wrong token's logit by `lr * dloss * probs[n, j] / n_valid`")  # fmt: skip
    rng = np.random.default_rng(10)
    N, V, dloss, lr = 6, 9, 0.5, 0.1
    z = 2.0 * rng.standard_normal((N, V))
    t = rng.integers(0, V, size=N)
    t[2] = -100  # one ignored row
    loss, cache = L.softmax_cross_entropy_forward(z, t)
    dz = L.softmax_cross_entropy_backward(dloss, cache)
    probs, n_valid = stable_softmax(z), 5
    for n in range(N):
        if t[n] == -100:
            assert np.all(dz[n] == 0.0)
            continue
        wrong = np.arange(V) != t[n]
        assert np.allclose(dz[n, wrong], dloss * probs[n, wrong] / n_valid, rtol=1e-12)
        assert dz[n, t[n]] == pytest.approx(-dloss * (1 - probs[n, t[n]]) / n_valid, rel=1e-12)
        assert abs(dz[n].sum()) < 1e-16
    z_new = z - lr * dz
    valid = t != -100
    rows = np.flatnonzero(valid)
    wrong = np.ones_like(z, dtype=bool)
    wrong[rows, t[rows]] = False
    wrong[~valid] = False
    assert np.all(z_new[wrong] < z[wrong])  # every wrong logit goes down ...
    assert np.allclose((z - z_new)[wrong], (lr * dloss * probs / n_valid)[wrong], rtol=1e-12)
    assert np.all(z_new[rows, t[rows]] > z[rows, t[rows]])  # ... the target's goes up
    assert float(L.softmax_cross_entropy_forward(z_new, t)[0]) < float(loss)


# --- Embedding, position embedding, the head ------------------------------------------------------


def test_fancy_index_add_keeps_one_of_the_repeated_contributions():
    doc_says("`dweight[ids] += dout` silently keeps only one of the repeated contributions")
    rng = np.random.default_rng(11)
    ids = np.array([[1, 1, 2]])
    dout = rng.standard_normal((1, 3, 4))
    tempting = np.zeros((3, 4))
    tempting[ids] += dout
    right = L.embedding_backward(dout, L.embedding_forward(ids, np.zeros((3, 4)))[1])
    assert np.allclose(right[1], dout[0, 0] + dout[0, 1])
    assert not np.allclose(tempting[1], right[1])
    assert any(np.array_equal(tempting[1], dout[0, i]) for i in (0, 1))


@pytest.mark.parametrize("tie", [True, False])
def test_the_head_weight_and_its_gradient_tied_and_untied(tie):
    doc_says("`W_head` `(C, V)` is `wte.T` when the weights are tied and `lm_head.weight.T` when they are not",
             "rows `T` to `context_length - 1` stay zero")  # fmt: skip
    config = tiny_config(tie_weights=tie)
    model = GPT(config, dtype=np.float64, device="cpu", seed=0)
    rng = np.random.default_rng(12)
    idx = rng.integers(0, config.vocab_size, size=(2, 5))  # T = 5 < context_length = 8
    logits, loss, cache = model.forward(idx, rng.integers(0, config.vocab_size, size=(2, 5)))
    grads = model.backward(cache)
    expected_head = model.params["wte.weight" if tie else "lm_head.weight"].T
    assert model.head_weight.shape == (config.emb_dim, config.vocab_size)
    assert np.shares_memory(model.head_weight, expected_head) and np.array_equal(model.head_weight, expected_head)
    h = cache.head.x.reshape(-1, config.emb_dim)  # the final LayerNorm's output, (N, C)
    dlogits = L.softmax_cross_entropy_backward(1.0, cache.loss).reshape(-1, config.vocab_size)
    dhead = h.T @ dlogits  # (C, V)
    # A table row whose id does not occur in idx gets nothing from the embedding: its gradient is the
    # head's share alone when tied (dwte = embedding part + dhead.T), zero when untied.
    unseen = np.setdiff1d(np.arange(config.vocab_size), idx)
    assert len(unseen) > 0 and np.abs(dhead.T[unseen]).max() > 1e-6
    if tie:
        assert "lm_head.weight" not in grads
        assert np.allclose(grads["wte.weight"][unseen], dhead.T[unseen], rtol=1e-12, atol=1e-15)
    else:
        assert np.allclose(grads["lm_head.weight"], dhead.T, rtol=1e-12, atol=1e-15)
        assert np.all(grads["wte.weight"][unseen] == 0.0)
    assert np.all(grads["wpe.weight"][5:] == 0.0) and np.abs(grads["wpe.weight"][:5]).min() > 0


# --- GELU ----------------------------------------------------------------------------------------


def test_gelu_derivative_is_slightly_negative_below_about_minus_0_75():
    doc_says("slightly negative for `x` below about `-0.75`")
    x = np.linspace(-6.0, 3.0, 90001)
    d = L.gelu_backward(np.ones_like(x), L.gelu_forward(x)[1])
    root = x[np.flatnonzero(d < 0).max()]
    assert -0.76 < root < -0.74
    assert np.all(d[x < -0.76] < 0) and np.all(d[x > -0.74] > 0)
    assert -0.13 < d.min() < -0.12  # slightly: GELU' never goes below -0.13


# --- Checking a derivation ------------------------------------------------------------------------


def test_a_gradient_0_1_percent_too_large_scores_about_5e_4():
    doc_says("even a gradient only 0.1% too large everywhere scores `0.001 / 2.001`, about `5e-4`")
    a = np.random.default_rng(13).standard_normal(50)
    assert npgpt.relative_error(1.001 * a, a) == pytest.approx(0.001 / 2.001, rel=1e-12)


def test_the_largest_analytic_entry_is_always_checked():
    """gradcheck adds the coordinate where the analytic gradient is largest to its design: a backward wrong
    only there fails for every seed."""
    doc_says("the coordinate where the analytic gradient is largest in absolute value is added when it is missing")
    x = np.random.default_rng(14).standard_normal((30, 40))

    def wrong_at_the_largest(dout, cache):
        dx = L.gelu_backward(dout, cache)
        i = np.unravel_index(np.argmax(np.abs(dx)), dx.shape)
        dx = dx.copy()
        dx[i] *= 1.5
        return dx

    for seed in range(5):
        (r,) = npgpt.gradcheck(L.gelu_forward, wrong_at_the_largest, [x], max_coords=8, seed=seed)
        assert not r.passed and r.n_checked in (40, 41) and r.n_total == 1200  # the 40-long axis sets the size


def test_random_sampling_misses_the_last_time_step_a_third_of_the_time():
    """The figure the design replaces: 64 coordinates drawn at random from a (8, 64, 64) tensor all avoid
    the B * C = 512 entries of the last time step with probability C(n - 512, 64) / C(n, 64)."""
    doc_says("with 64 random coordinates, one that zeroed `dx` at the last time step of a `(8, 64, 64)` input "
             "passed on about a third of the seeds")  # fmt: skip
    n, slice_size = 8 * 64 * 64, 8 * 64
    miss = math.prod((n - slice_size - i) / (n - i) for i in range(64))
    assert 0.3 < miss < 0.4  # 0.365
    rng = np.random.default_rng(15)
    misses = sum(not np.any(np.unravel_index(rng.choice(n, 64, replace=False), (8, 64, 64))[1] == 63) for _ in range(2000))
    assert abs(misses / 2000 - miss) < 0.04


def test_the_measured_error_range_of_the_suite():
    """The range the text gives, measured again: every layer check of `npgpt gradcheck` (seed 0, tolerance
    1e-7), the GPT whole-model checks and the encoder-decoder's post-norm model, whose errors are the
    largest of the whole-model checks (tolerance 1e-6)."""
    doc_says("it lies between about `4e-13` and `1.3e-9` (median `2e-11`;",
             "their tolerance, the default, is `1e-7`", "use `1e-6`, with `max_coords` 3 to 8",
             "their errors reach about `5e-9`")  # fmt: skip
    from npgpt.gradcheck_suite import layer_checks, seq2seq_layer_checks
    from npgpt.model_check import model_checks
    from npgpt.seq2seq.check import seq2seq_model_checks

    layers = [r for c in layer_checks() + seq2seq_layer_checks() for r in c.run(seed=0)]
    assert all(r.passed and r.tol == 1e-7 for r in layers)
    errors = np.array([r.max_rel_error for r in layers])
    nonzero = errors[errors > 0]
    # exactly zero: masked attention with one query and one key (dq = dk = 0), and the LM logits of the mixed loss at
    # lambda = 0 (their gradient is zeros, as the loss does not depend on them)
    assert np.count_nonzero(errors == 0) == 3
    assert 1e-13 < nonzero.min() < 1.5e-12  # "about 4e-13"
    assert 5e-10 < nonzero.max() < 4e-9  # "1.3e-9"
    assert 5e-12 < np.median(nonzero) < 8e-11  # "2e-11"
    models = [r for c in model_checks() + seq2seq_model_checks()[:1] for r in c.run(seed=0)]
    assert all(r.passed and r.tol == 1e-6 for r in models)
    assert 1.5e-9 < max(r.max_rel_error for r in models) < 1.5e-8  # "about 5e-9"


# --- Literal readings (issue 30, item 3): the statements say exactly what the code does -------------


def test_the_slowest_sinusoidal_frequency_is_1_over_8660_at_C_128():
    doc_says("`1/8660` at `C = 128`, the translation model's default",
             "`w_{C/2-1} = 10000^(-(C-2)/C)`")  # fmt: skip
    for C, slowest in [(128, 8660), (8, 1000), (512, 9647)]:
        pe = L.sinusoidal_table(2, C)
        w = np.arctan2(pe[1, 0::2], pe[1, 1::2])  # the angle each pair turns by in one position
        assert w[0] == pytest.approx(1.0, abs=1e-12)
        assert round(1.0 / w[-1]) == slowest and 1.0 / w[-1] == pytest.approx(10000 ** ((C - 2) / C), rel=1e-9)
    from npgpt.seq2seq import Seq2SeqConfig

    assert Seq2SeqConfig(src_vocab_size=10, tgt_vocab_size=10).d_model == 128


def test_left_padding_under_the_causal_mask_leaves_a_query_with_no_key():
    doc_says("under the causal mask, for a sentence padded on the left: its first position is `<pad>`")
    rng = np.random.default_rng(16)
    q = k = v = rng.standard_normal((1, 4, 8))
    right = np.array([[False, False, False, True]])  # True = padding
    L.masked_attention_forward(q, k, v, 2, key_padding_mask=right, causal=True)  # fine
    with pytest.raises(ValueError, match="every key masked"):
        L.masked_attention_forward(q, k, v, 2, key_padding_mask=right[:, ::-1].copy(), causal=True)
    L.masked_attention_forward(q, k, v, 2, key_padding_mask=right[:, ::-1].copy(), causal=False)  # only the causal mask makes it so


def test_a_padded_batch_is_its_sentences_weighted_by_their_share_of_targets():
    doc_says("weights each sentence's loss and gradients by `n_b / n_valid`, and gets the batch's loss",
             "the plain mean of the sentences' losses is another number")  # fmt: skip
    from npgpt.seq2seq import Seq2Seq
    from npgpt.seq2seq.check import padded_batch, random_params
    from npgpt.seq2seq.check import tiny_config as seq2seq_config

    cfg = seq2seq_config()
    rng = np.random.default_rng(17)
    model = Seq2Seq(cfg, params=random_params(cfg, rng))
    src, tgt_in, targets = padded_batch(cfg, rng, B=4, S=6, T=5)
    batch_loss = float(model.forward(src, tgt_in, targets)[1])
    counts, losses = [], []
    for b in range(4):
        n = int((targets[b] != cfg.pad_id).sum())
        s = src[b : b + 1, : int((src[b] != cfg.pad_id).sum())]
        losses.append(float(model.forward(s, tgt_in[b : b + 1, :n], targets[b : b + 1, :n])[1]))
        counts.append(n)
    assert len(set(counts)) > 1  # sentences of different lengths
    weighted = sum(loss * n for loss, n in zip(losses, counts)) / sum(counts)
    assert weighted == pytest.approx(batch_loss, rel=1e-12)
    assert abs(np.mean(losses) - batch_loss) > 1e-3


def test_the_names_in_the_trunk_gradient_of_the_mixed_loss():
    """dx = last_token_backward(dh) + dlm_logits @ W_head.T, with the functions and the matrix the text names."""
    doc_says("`dx = last_token_backward(dh) + dlm_logits @ W_head.T`", "is `GPT.head_weight`")
    rng = np.random.default_rng(18)
    config = tiny_config()
    model = GPT(config, dtype=np.float64, device="cpu", seed=0)
    B, T, C, V = 2, 5, config.emb_dim, config.vocab_size
    idx = rng.integers(0, V - 1, size=(B, T))
    idx[1, 3:] = V - 1  # right padding, pad id V - 1
    x = rng.standard_normal((B, T, C))
    h, cache = L.last_token_forward(x, idx, V - 1)
    dh, dlm = rng.standard_normal((B, C)), rng.standard_normal((B, T, V))
    dx = L.last_token_backward(dh, cache) + dlm @ model.head_weight.T
    expected = dlm @ model.params["wte.weight"]  # tied: W_head = wte.T
    expected[0, T - 1] += dh[0]
    expected[1, 2] += dh[1]  # the scatter: each row's last real token only
    assert np.allclose(dx, expected, rtol=1e-13, atol=1e-13)


def test_left_padding_changes_the_state_the_classifier_reads():
    """last_token.py: the index is found under either padding, but only right padding keeps the state."""
    doc_says("Always pad on the right.")
    layer_doc = (BACKPROP_MD.parents[1] / "npgpt" / "layers" / "last_token.py").read_text(encoding="utf-8")
    assert "Always pad on the right" in layer_doc
    config = tiny_config()
    model = GPT(config, dtype=np.float64, device="cpu", seed=0)
    pad, text = config.vocab_size - 1, np.array([3, 14, 15, 9])
    alone = model.forward(text[None], lm_head=False)[2].hidden[0, -1]
    for row, padded_right in [(np.concatenate([text, [pad, pad]]), True), (np.concatenate([[pad, pad], text]), False)]:
        last = int(L.last_token_index(row[None], pad)[0])
        assert last == (3 if padded_right else 5)  # the index is right either way
        state = model.forward(row[None], lm_head=False)[2].hidden[0, last]
        if padded_right:
            assert np.allclose(state, alone, rtol=1e-12, atol=1e-12)
        else:
            assert np.abs(state - alone).max() > 1e-3  # the padding before the text was attended to


def test_the_instruction_loss_is_one_token_weighted_mean_with_the_end_token():
    doc_says("a batch of a 2-token and a 6-token response is `(sum of 8 losses) / 8`",
             "each example's end token `<|endoftext|>` included")  # fmt: skip
    rng = np.random.default_rng(19)
    V = 11
    logits = rng.standard_normal((2, 8, V))
    targets = np.full((2, 8), -100)
    targets[0, 5:7] = rng.integers(0, V, 2)  # a 2-token response
    targets[1, 2:8] = rng.integers(0, V, 6)  # a 6-token response
    loss = float(L.softmax_cross_entropy_forward(logits, targets)[0])
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    per_token = {(b, t): -logp[b, t, targets[b, t]] for b in range(2) for t in range(8) if targets[b, t] != -100}
    assert loss == pytest.approx(sum(per_token.values()) / 8, rel=1e-12)
    means = [np.mean([v for (b, _), v in per_token.items() if b == row]) for row in (0, 1)]
    assert abs(np.mean(means) - loss) > 1e-3  # not the mean of the examples' means
    from npgpt.finetune.instructions import ALPACA, IGNORE_INDEX, InstructionSet, Record
    from npgpt.tokenizer import EOT_ID

    data = InstructionSet.build([Record("Say hi.", "", "hi", where="a test")], ALPACA, context_length=64)
    _, y = data.example(0)
    counted = y[y != IGNORE_INDEX]
    assert counted[-1] == EOT_ID and len(counted) >= 2  # the response's tokens, then the end token
