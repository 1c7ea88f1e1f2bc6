"""Each fast op (npgpt/fast/) against its readable twin (npgpt/layers/), op by op.

Relative error max|a - b| / max(|a| + |b|) (npgpt.gradcheck.relative_error) below 1e-12 in float64 and
1e-5 in float32, on random inputs and random upstream gradients, at sizes that enter the CPU row
blocks: N = B*T = 150 rows (ROW_BLOCK = 32 rows of GELU, LOSS_ROWS = 4 of the loss; 150 is a multiple
of neither), T = 75, head size 64, with one and with two threads, dropout on and off, ignored targets.
"""

import numpy as np
import pytest

from npgpt import fast
from npgpt import layers as L
from npgpt.gradcheck import relative_error

B, T, C, NH, V = 2, 75, 128, 2, 97  # head size 64
N = B * T
DTYPES = [pytest.param(np.float64, 1e-12, id="float64"), pytest.param(np.float32, 1e-5, id="float32")]
THREADS = [1, 2]


pytestmark = pytest.mark.usefixtures("split_small_work")  # threads=2 splits the rows even at these sizes


def test_small_work_stays_on_one_thread(monkeypatch):
    monkeypatch.setattr("npgpt.fast.common.PARALLEL_MIN_ELEMENTS", 1000)
    calls = []
    fast.in_threads(10, lambda lo, hi, w: calls.append((lo, hi, w)), 2, elements=999)
    assert calls == [(0, 10, 0)]
    calls.clear()
    fast.in_threads(10, lambda lo, hi, w: calls.append((lo, hi, w)), 2, elements=1000)
    assert sorted(calls) == [(0, 5, 0), (5, 10, 1)]


def randn(rng, *shape, dtype, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(dtype)


def close(got, want, tol, what):
    err = relative_error(got, want)
    assert err < tol, f"{what}: relative error {err:.2e} >= {tol:.0e}"


def test_the_sizes_enter_the_row_blocks():
    assert N > 4 * fast.ROW_BLOCK and N % fast.ROW_BLOCK and N % fast.LOSS_ROWS and T % 16
    assert C // NH == 64


@pytest.mark.parametrize("dtype, tol", DTYPES)
def test_embedding(dtype, tol, rng):
    ids = rng.integers(0, V, (B, T))
    wte, wpe = randn(rng, V, C, dtype=dtype), randn(rng, T + 5, C, dtype=dtype)
    tok, c_tok = L.embedding_forward(ids, wte)
    pos, c_pos = L.embedding_forward(np.arange(T), wpe)
    x = np.empty((N, C), dtype)
    fast.embedding_forward(x, ids.reshape(-1), wte)
    fast.add_position_embedding_(x.reshape(B, T, C), wpe)
    close(x, (tok + pos).reshape(N, C), tol, "wte[ids] + wpe[:T]")
    dx = randn(rng, N, C, dtype=dtype)
    dwte, dwpe = np.zeros_like(wte), np.zeros_like(wpe)
    fast.embedding_backward(dwte, dx, ids.reshape(-1))
    fast.position_embedding_backward(dwpe, dx.reshape(B, T, C))
    close(dwte, L.embedding_backward(dx.reshape(B, T, C), c_tok), tol, "dwte")
    close(dwpe, L.embedding_backward(dx.reshape(B, T, C).sum(axis=0), c_pos), tol, "dwpe")


@pytest.mark.parametrize("accumulate", [False, True], ids=["write", "accumulate"])
@pytest.mark.parametrize("dtype, tol", DTYPES)
def test_linear(dtype, tol, accumulate, rng):
    x, w, b = randn(rng, N, C, dtype=dtype), randn(rng, C, 3 * C, dtype=dtype, scale=0.1), randn(rng, 3 * C, dtype=dtype)
    ref, cache = L.linear_forward(x, w, b)
    out = np.empty((N, 3 * C), dtype)
    fast.linear_forward(out, x, w, b)
    close(out, ref, tol, "out")
    dout = randn(rng, N, 3 * C, dtype=dtype)
    ref_dx, ref_dw, ref_db = L.linear_backward(dout, cache)
    dw0, db0 = randn(rng, C, 3 * C, dtype=dtype), randn(rng, 3 * C, dtype=dtype)  # what was there before
    dx, dw, db = np.empty_like(x), dw0.copy(), db0.copy()
    fast.linear_backward(dx, dw, db, dout, x, w, accumulate)
    close(dx, ref_dx, tol, "dx")
    close(dw, ref_dw + dw0 if accumulate else ref_dw, tol, "dweight")
    close(db, ref_db + db0 if accumulate else ref_db, tol, "dbias")


@pytest.mark.parametrize("dtype, tol", DTYPES)
def test_linear_with_a_transposed_weight_as_the_tied_head(dtype, tol, rng):
    """logits = x @ wte^T: the (V, C) gradient buffer is given as its (C, V) transpose."""
    x, table = randn(rng, N, C, dtype=dtype), randn(rng, V, C, dtype=dtype, scale=0.1)
    ref, cache = L.linear_forward(x, table.T)
    out = np.empty((N, V), dtype)
    fast.linear_forward(out, x, table.T)
    close(out, ref, tol, "logits")
    dout = randn(rng, N, V, dtype=dtype)
    ref_dx, ref_dw, _ = L.linear_backward(dout, cache)
    dx, dtable = np.empty_like(x), np.empty_like(table)
    fast.linear_backward(dx, dtable.T, None, dout, x, table.T)
    close(dx, ref_dx, tol, "dx")
    close(dtable, ref_dw.T, tol, "dtable")


@pytest.mark.parametrize("alias", [False, True], ids=["dx", "dx-is-dout"])
@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("dtype, tol", DTYPES)
def test_layernorm(dtype, tol, threads, alias, rng):
    x = randn(rng, N, C, dtype=dtype, scale=2.0) + dtype(0.5)
    w, b = randn(rng, C, dtype=dtype) + dtype(1), randn(rng, C, dtype=dtype)
    ref, cache = L.layernorm_forward(x, w, b, 1e-5)
    out, mean, rstd = np.empty_like(x), np.empty(N, dtype), np.empty(N, dtype)
    fast.layernorm_forward(out, mean, rstd, x, w, b, 1e-5, threads=threads)
    close(out, ref, tol, "out")
    close(mean, x.astype(np.float64).mean(axis=1), tol, "mean")
    close(rstd, cache.rstd[:, 0], tol, "rstd")
    dout = randn(rng, N, C, dtype=dtype)
    ref_dx, ref_dw, ref_db = L.layernorm_backward(dout, cache)
    dx = dout.copy() if alias else np.empty_like(x)
    dw, db = np.zeros_like(w), np.zeros_like(b)
    fast.layernorm_backward(dx, dw, db, dx if alias else dout, x, mean, rstd, w, threads=threads)
    close(dx, ref_dx, tol, "dx")
    close(dw, ref_dw, tol, "dweight")
    close(db, ref_db, tol, "dbias")


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("dtype, tol", DTYPES)
def test_gelu(dtype, tol, threads, with_bias, rng):
    H = 4 * C
    h, bias = randn(rng, N, H, dtype=dtype, scale=3.0), randn(rng, H, dtype=dtype)
    pre = h + bias if with_bias else h.copy()  # the pre-activation
    ref, cache = L.gelu_forward(pre)
    x, out = h.copy(), np.empty_like(h)
    fast.gelu_forward(out, x, bias if with_bias else None, threads=threads)
    close(x, pre, tol, "x += bias, in place")
    close(out, ref, tol, "gelu")
    dout = randn(rng, N, H, dtype=dtype)
    d = dout.copy()
    fast.gelu_backward_(d, x, threads=threads)
    close(d, L.gelu_backward(dout, cache), tol, "dx")


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("dtype, tol", DTYPES)
def test_gelu_keeping_its_derivative(dtype, tol, threads, with_bias, rng):
    """gelu_forward_keep_grad leaves gelu'(x) where x was; gelu_backward_saved_ multiplies by it. Inputs
    reach far into both tails (exp(-2u) overflows to inf below about x = -10: g is then exactly 0)."""
    H = 4 * C
    h, bias = randn(rng, N, H, dtype=dtype, scale=3.0), randn(rng, H, dtype=dtype)
    h[0, :6] = [-60.0, -20.0, -9.5, 0.0, 9.5, 60.0]
    pre = h + bias if with_bias else h.copy()
    ref, cache = L.gelu_forward(pre)
    x, out = h.copy(), np.empty_like(h)
    with np.errstate(all="raise"):  # no warning escapes the op
        fast.gelu_forward_keep_grad(out, x, bias if with_bias else None, threads=threads)
    close(out, ref, tol, "gelu")
    dout = randn(rng, N, H, dtype=dtype)
    close(x, L.gelu_backward(np.ones_like(dout), cache), tol, "gelu' kept in x")
    d = dout.copy()
    fast.gelu_backward_saved_(d, x, threads=threads)
    close(d, L.gelu_backward(dout, cache), tol, "dx")


def test_gelu_keeping_its_derivative_refuses_16_bit():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = np.zeros((4, 8), dtype=ml_dtypes.bfloat16)
    with pytest.raises(ValueError, match="16-bit"):
        fast.gelu_forward_keep_grad(np.empty_like(x), x)


@pytest.mark.parametrize("p", [0.0, 0.2], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("dtype, tol", DTYPES)
def test_attention(dtype, tol, p, rng):
    qkv = randn(rng, B, T, 3 * C, dtype=dtype)
    ref, cache = L.attention_forward(qkv, NH, attn_pdrop=p, rng=np.random.default_rng(7), training=p > 0)
    hs = C // NH
    heads, att = np.empty((3, B, NH, T, hs), dtype), np.empty((B, NH, T, T), dtype)
    y = np.empty((N, C), dtype)  # 2-D, as the fast step keeps it
    bias = np.triu(np.full((T, T), -np.inf, dtype=dtype), k=1)
    keep = fast.attention_forward(y, heads, att, qkv.reshape(N, 3 * C), bias, p, np.random.default_rng(7))
    close(y, ref.reshape(N, C), tol, "y")
    close(att, cache.att, tol, "probabilities")
    assert (keep is None) == (p == 0) and (keep is None or np.array_equal(keep, cache.keep))
    close(heads[0] * dtype(np.sqrt(hs)), cache.q, tol, "q (kept divided by sqrt(hs))")
    dy = randn(rng, B, T, C, dtype=dtype)
    dqkv = np.empty((N, 3 * C), dtype)
    fast.attention_backward(dqkv, dy.reshape(N, C), heads, att, keep, p)
    close(dqkv, L.attention_backward(dy, cache).reshape(N, 3 * C), tol, "dqkv")


@pytest.mark.parametrize("rows", [16, 32, 64], ids=lambda r: f"rows{r}")
@pytest.mark.parametrize("p", [0.0, 0.2], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("dtype, tol", DTYPES)
def test_attention_in_causal_blocks(dtype, tol, p, rows, rng):
    """rows=: causal blocks of query rows (T = 75 is a multiple of none). What the blocks never write is
    NaN here: were any of it read (forward or backward), the results would be NaN."""
    qkv = randn(rng, B, T, 3 * C, dtype=dtype)
    ref, cache = L.attention_forward(qkv, NH, attn_pdrop=p, rng=np.random.default_rng(7), training=p > 0)
    hs = C // NH
    heads, att = np.empty((3, B, NH, T, hs), dtype), np.full((B, NH, T, T), np.nan, dtype)
    y = np.empty((N, C), dtype)
    bias = np.triu(np.full((T, T), -np.inf, dtype=dtype), k=1)
    keep = fast.attention_forward(y, heads, att, qkv.reshape(N, 3 * C), bias, p, np.random.default_rng(7),
                                  dropped=np.full_like(att, np.nan), rows=rows)  # fmt: skip
    close(y, ref.reshape(N, C), tol, "y")
    seen = np.arange(T)[None, :] < (np.arange(T) // rows * rows + rows)[:, None]  # (T, T): what a row's block wrote
    close(att[..., seen], cache.att[..., seen], tol, "probabilities")
    dy = randn(rng, B, T, C, dtype=dtype)
    dqkv = np.empty((N, 3 * C), dtype)
    fast.attention_backward(dqkv, dy.reshape(N, C), heads, att, keep, p, datt=np.full_like(att, np.nan), rows=rows)
    close(dqkv, L.attention_backward(dy, cache).reshape(N, 3 * C), tol, "dqkv")


@pytest.mark.parametrize("rows", [None, 16], ids=["whole", "rows16"])
@pytest.mark.parametrize("p", [0.0, 0.2], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("dtype, tol", DTYPES)
def test_attention_in_place(dtype, tol, p, rows, rng):
    """The in-place pair reads q, k, v as views of qkv (q scaled there) and writes y and dqkv directly."""
    qkv = randn(rng, B, T, 3 * C, dtype=dtype)
    ref, cache = L.attention_forward(qkv, NH, attn_pdrop=p, rng=np.random.default_rng(7), training=p > 0)
    att, y = np.full((B, NH, T, T), np.nan, dtype), np.empty((N, C), dtype)
    bias = np.triu(np.full((T, T), -np.inf, dtype=dtype), k=1)
    saved = qkv.reshape(N, 3 * C).copy()
    keep = fast.attention_in_place_forward(y, saved, att, bias, p, np.random.default_rng(7), rows=rows)
    close(y, ref.reshape(N, C), tol, "y")
    hs = C // NH
    close(saved[:, :C] * dtype(np.sqrt(hs)), qkv.reshape(N, 3 * C)[:, :C], tol, "q, scaled in place")
    assert np.array_equal(saved[:, C:], qkv.reshape(N, 3 * C)[:, C:])  # k and v untouched
    dy = randn(rng, B, T, C, dtype=dtype)
    dqkv, dy_before = np.full((N, 3 * C), np.nan, dtype), dy.copy()
    fast.attention_in_place_backward(dqkv, dy.reshape(N, C), saved, att, keep, p, rows=rows)
    close(dqkv, L.attention_backward(dy, cache).reshape(N, 3 * C), tol, "dqkv")
    assert np.array_equal(dy, dy_before)  # dy is read, not written


@pytest.mark.parametrize("ignore", [False, True], ids=["all-count", "ignore_index"])
@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("dtype, tol", DTYPES)
def test_cross_entropy(dtype, tol, threads, ignore, rng):
    logits = randn(rng, N, V, dtype=dtype, scale=3.0)
    targets = rng.integers(0, V, N)
    if ignore:
        targets[rng.random(N) < 0.3] = -100
        targets[fast.LOSS_ROWS : 2 * fast.LOSS_ROWS] = -100  # a whole block ignored
    ref_loss, cache = L.softmax_cross_entropy_forward(logits, targets)
    ref_dlogits = L.softmax_cross_entropy_backward(0.7, cache)
    z = logits.copy()
    loss = fast.cross_entropy_(z, targets, True, 0.7, threads=threads)
    assert isinstance(loss, float)
    close(loss, float(ref_loss), tol, "loss")
    close(z, ref_dlogits, tol, "dlogits")
    assert not z[targets == -100].any()  # ignored rows get no gradient
    n_valid = int((targets != -100).sum())
    assert fast.cross_entropy_(logits.copy(), targets, False, n_valid=n_valid, threads=threads) == pytest.approx(loss, rel=tol)


def test_cross_entropy_with_every_target_ignored_is_an_error():
    with pytest.raises(ValueError, match="every target equals ignore_index"):
        fast.cross_entropy_(np.zeros((3, 5)), np.full(3, -100))


@pytest.mark.parametrize("in_place", [False, True], ids=["out", "in-place"])
@pytest.mark.parametrize("dtype, tol", DTYPES)
def test_dropout(dtype, tol, in_place, rng):
    x = randn(rng, B, T, C, dtype=dtype)
    ref, cache = L.dropout_forward(x, 0.3, np.random.default_rng(3))
    out = x.copy() if in_place else np.empty_like(x)
    keep = fast.dropout_forward(out, out if in_place else x, 0.3, np.random.default_rng(3))
    assert np.array_equal(keep, cache.keep)
    close(out, ref, tol, "out")
    dout = randn(rng, B, T, C, dtype=dtype)
    dx = dout.copy() if in_place else np.empty_like(dout)
    fast.dropout_backward(dx, dx if in_place else dout, keep, 0.3)
    close(dx, L.dropout_backward(dout, cache), tol, "dx")


@pytest.mark.parametrize("accumulate", [False, True], ids=["write", "accumulate"])
@pytest.mark.parametrize("dtype, tol", DTYPES)
def test_last_token(dtype, tol, accumulate, rng):
    """The gather of each row's last non-padding position and its scatter back, padded rows included
    (a row of padding only reads position 0, as the readable rule says)."""
    pad = 5
    idx = rng.integers(0, V - 1, (B + 1, T))
    idx[idx >= pad] += 1  # real tokens never equal pad
    idx[0, 40:] = pad  # right padding
    idx[1, :] = pad  # padding only
    x = randn(rng, B + 1, T, C, dtype=dtype)
    ref, cache = L.last_token_forward(x, idx, pad)
    last = np.empty(B + 1, dtype=np.int64)
    fast.last_token_index(last, idx, pad)
    assert last.tolist() == [39, 0, T - 1]
    h = np.empty((B + 1, C), dtype)
    fast.last_token_forward(h, x, last)
    close(h, ref, tol, "h")
    dh = randn(rng, B + 1, C, dtype=dtype)
    before = randn(rng, B + 1, T, C, dtype=dtype)
    dx = before.copy()
    fast.last_token_backward(dx, dh, last, accumulate)
    want = L.last_token_backward(dh, cache)
    close(dx, want + before if accumulate else want, tol, "dx")


def _padded_ids(rng, pad):
    """(B + 1, T) ids without pad, right-padded from position 40 in row 0, padding only in row 1."""
    idx = rng.integers(0, V - 1, (B + 1, T))
    idx[idx >= pad] += 1  # real tokens never equal pad
    idx[0, 40:] = pad
    idx[1, :] = pad
    return idx


@pytest.mark.parametrize("wanted", ["both", "dx only", "dweight only"])
@pytest.mark.parametrize("accumulate", [False, True], ids=["write", "accumulate"])
@pytest.mark.parametrize("dtype, tol", DTYPES)
def test_classifier_head(dtype, tol, accumulate, wanted, rng):
    """The head on the last real token of padded rows, k = 3 labels: logits, dx (scattered into the rows
    `last`, or added into what dx held) and dweight in its (k, C) layout; a frozen weight (dweight None)
    or a frozen trunk (dx None) is skipped."""
    pad, k = 5, 3
    idx, x, w = _padded_ids(rng, pad), randn(rng, B + 1, T, C, dtype=dtype), randn(rng, k, C, dtype=dtype)
    ref, cache = L.classifier_head_forward(x, idx, w, pad)
    last, pooled, logits = np.empty(B + 1, dtype=np.int64), np.empty((B + 1, C), dtype), np.empty((B + 1, k), dtype)
    fast.last_token_index(last, idx, pad)
    fast.classifier_head_forward(logits, pooled, x, last, w)
    close(logits, ref, tol, "logits")
    dlogits, before = randn(rng, B + 1, k, dtype=dtype), randn(rng, B + 1, T, C, dtype=dtype)
    ref_dx, ref_dw = L.classifier_head_backward(dlogits, cache)
    dx = before.copy() if wanted != "dweight only" else None
    dw = np.full_like(w, np.nan) if wanted != "dx only" else None
    fast.classifier_head_backward(dx, dw, dlogits, pooled, last, w, accumulate)
    if dx is not None:
        close(dx, ref_dx + before if accumulate else ref_dx, tol, "dx")
    if dw is not None:
        close(dw, ref_dw, tol, "dweight")


@pytest.mark.parametrize("lam, ignore", [(0.5, "some"), (1.0, "none"), (0.3, "all"), (0.0, "some")])
@pytest.mark.parametrize("dtype, tol", DTYPES)
def test_mixed_loss(dtype, tol, lam, ignore, rng):
    """L = L_FT + lambda * L_PT and both logits' gradients, in place, against the readable layer: with some
    LM targets ignored, none, every one (L_PT = 0) and lambda = 0 (the LM logits' gradient is zeros in
    both tiers). dloss scales both; the LM term's op is a resource (here the fast op with two threads)."""
    k = 3
    cls, labels = randn(rng, B, k, dtype=dtype, scale=2.0), rng.integers(0, k, B)
    lm, targets = randn(rng, B, T, V, dtype=dtype, scale=3.0), rng.integers(0, V, (B, T))
    if ignore != "none":
        targets[rng.random((B, T)) < 0.3] = -100
    if ignore == "all":
        targets[...] = -100
    ref_loss, cache = L.mixed_loss_forward(cls, labels, lm, targets, lm_weight=lam)
    ref_dcls, ref_dlm = L.mixed_loss_backward(0.7, cache)
    z_cls, z_lm = cls.copy(), lm.reshape(N, V).copy()
    loss, ft, pt = fast.mixed_loss_(z_cls, labels, z_lm, targets, lam, True, 0.7,
                                    lm_cross_entropy_=lambda *a, **kw: fast.cross_entropy_(*a, threads=2, **kw))  # fmt: skip
    close(loss, float(ref_loss), tol, "L")
    close(ft, float(cache.ft_loss), tol, "L_FT")
    close(pt, float(cache.lm_loss), tol, "L_PT")
    close(z_cls, ref_dcls, tol, "dcls_logits")
    assert ref_dlm.shape == lm.shape
    close(z_lm, ref_dlm.reshape(N, V), tol, "dlm_logits")
    if lam == 0 or ignore == "all":
        assert not z_lm.any() and not ref_dlm.any()
    z_cls, z_lm = cls.copy(), lm.reshape(N, V).copy()
    assert fast.mixed_loss_(z_cls, labels, z_lm, targets, lam, want_grad=False) == pytest.approx((loss, ft, pt), rel=tol)
    ref_ft, _ = L.mixed_loss_forward(cls, labels, lm_weight=lam)
    assert fast.mixed_loss_(cls.copy(), labels, lm_weight=lam)[0] == pytest.approx(float(ref_ft), rel=tol)  # no LM term
    with pytest.raises(ValueError, match="together"):
        fast.mixed_loss_(cls.copy(), labels, lm.reshape(N, V).copy(), None, lam)


@pytest.mark.parametrize("dtype, tol", DTYPES)
def test_linear_backward_skips_what_is_not_wanted(dtype, tol, rng):
    """dweight None (a frozen weight, the readable weight_grad=False) and dx None (nothing below trains):
    those products are not computed and the others are unchanged."""
    x, w, b = randn(rng, N, C, dtype=dtype), randn(rng, C, 3 * C, dtype=dtype, scale=0.1), randn(rng, 3 * C, dtype=dtype)
    _, cache = L.linear_forward(x, w, b)
    dout = randn(rng, N, 3 * C, dtype=dtype)
    ref_dx, ref_dw, ref_db = L.linear_backward(dout, cache)
    frozen_dx, none_w, none_b = L.linear_backward(dout, cache, weight_grad=False)
    assert none_w is None and none_b is None
    dx = np.full_like(x, np.nan)
    fast.linear_backward(dx, None, None, dout, x, w)
    close(dx, frozen_dx, tol, "dx of a frozen layer")
    dw, db = np.full_like(w, np.nan), np.full_like(b, np.nan)
    fast.linear_backward(None, dw, db, dout, x, w)
    close(dw, ref_dw, tol, "dweight without dx")
    close(db, ref_db, tol, "dbias without dx")
