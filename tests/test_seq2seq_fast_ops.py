"""The encoder-decoder's fast ops (npgpt/fast/) against their readable twins (npgpt/layers/), op by op.

As tests/test_fast_ops.py: relative error max|a - b| / max(|a| + |b|) below 1e-12 in float64 and 1e-5 in
float32, random inputs and random upstream gradients, one and two threads, dropout on and off (the same
masks, drawn from generators with the same seed). Sizes that enter the blocks: N = B*T = 155 query rows
(ReLU's row blocks are 32 rows; 155 is not a multiple), head size 64, B = 5 so that two threads split the
batch unevenly, T = 31 queries and 23 keys (no multiple of any block), padded batches: each row's keys
padded at random lengths, the first row not at all.
"""

import numpy as np
import pytest

from npgpt import fast
from npgpt import layers as L
from npgpt.gradcheck import relative_error

pytestmark = pytest.mark.usefixtures("split_small_work")  # threads=2 splits the rows even at these sizes

B, TQ, TK, C, NH, F = 5, 31, 23, 128, 2, 96  # head size 64
N = B * TQ
DTYPES = [pytest.param(np.float64, 1e-12, id="float64"), pytest.param(np.float32, 1e-5, id="float32")]
THREADS = [1, 2]
DROPOUT = [pytest.param(0.0, id="no-dropout"), pytest.param(0.2, id="dropout")]


def randn(rng, *shape, dtype, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(dtype)


def close(got, want, tol, what):
    err = relative_error(got, want)
    assert err < tol, f"{what}: relative error {err:.2e} >= {tol:.0e}"


def padding(rng, b, t):
    """(b, t) bool, True at padded positions: row 0 full, the others of random length >= 1."""
    lengths = np.concatenate([[t], rng.integers(1, t + 1, b - 1)])
    return np.arange(t)[None, :] >= lengths[:, None]


def test_the_sizes_enter_the_blocks():
    assert N > 4 * fast.ROW_BLOCK and N % fast.ROW_BLOCK and TQ % 16 and TK % 16
    assert C // NH == 64 and B >= 2 * max(THREADS) and B % 2


@pytest.mark.parametrize("in_place", [False, True], ids=["out", "in-place"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("dtype, tol", DTYPES)
def test_relu(dtype, tol, threads, with_bias, in_place, rng):
    h, bias = randn(rng, N, F, dtype=dtype), randn(rng, F, dtype=dtype)
    h[3, :5] = 0  # exactly 0: no slope, as in the readable layer
    pre = h + bias if with_bias else h.copy()
    ref, cache = L.relu_forward(pre)
    x = h.copy()
    out = x if in_place else np.empty_like(x)
    fast.relu_forward(out, x, bias if with_bias else None, threads=threads)
    close(out, ref, tol, "relu")
    if not in_place:
        close(x, pre, tol, "x += bias, in place")
    dout = randn(rng, N, F, dtype=dtype)
    want = L.relu_backward(dout, cache)
    for y in (pre, ref):  # the backward reads the sign of the input or of the output
        d = dout.copy()
        fast.relu_backward_(d, y, threads=threads)
        close(d, want, tol, "dx")


@pytest.mark.parametrize("dtype, tol", DTYPES)
def test_sinusoidal(dtype, tol, rng):
    table = np.empty((40, C), dtype)
    fast.sinusoidal_table_into(table)
    close(table, L.sinusoidal_table(40, C), tol, "table")
    x = randn(rng, B, TQ, C, dtype=dtype)
    for start in (0, 9):
        ref, cache = L.sinusoidal_forward(x, start=start)
        out = x.copy()
        fast.add_sinusoidal_(out, table, start)
        close(out, ref, tol, f"x + PE[{start}:]")
        dout = randn(rng, B, TQ, C, dtype=dtype)
        assert L.sinusoidal_backward(dout, cache) is dout  # the identity: the fast step has nothing to call
    with pytest.raises(ValueError, match="beyond the 40 rows"):
        fast.add_sinusoidal_(x.copy(), table, 10)


CASES = {  # (queries, keys, causal): the three uses in the encoder-decoder
    "encoder self-attention": (TK, TK, False),
    "decoder self-attention": (TQ, TQ, True),
    "cross-attention": (TQ, TK, False),
}


@pytest.mark.parametrize("p", DROPOUT)
@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype, tol", DTYPES)
def test_masked_attention(dtype, tol, case, threads, p, rng):
    tq, tk, causal = CASES[case]
    q, k, v = randn(rng, B, tq, C, dtype=dtype), randn(rng, B, tk, C, dtype=dtype), randn(rng, B, tk, C, dtype=dtype)
    pad = padding(rng, B, tk)
    ref, cache = L.masked_attention_forward(q, k, v, NH, key_padding_mask=pad, causal=causal, attn_pdrop=p,
                                            rng=np.random.default_rng(7), training=p > 0)  # fmt: skip
    bias = np.empty((B, 1, tq if causal else 1, tk), dtype)
    fast.attention_bias_into(bias, pad, causal)
    y, att, qs = np.empty((B, tq, C), dtype), np.empty((B, NH, tq, tk), dtype), q.copy()
    keep = fast.masked_attention_forward(y, att, qs, k, v, bias, p, np.random.default_rng(7), threads=threads)
    close(y, ref, tol, "y")
    close(att, cache.att, tol, "probabilities")
    assert not att[np.broadcast_to(pad[:, None, None, :], att.shape)].any()  # padded keys: exactly 0
    assert (keep is None) == (p == 0) and (keep is None or np.array_equal(keep, cache.keep))
    close(qs * dtype(np.sqrt(C // NH)), q, tol, "q (kept divided by sqrt(hs))")
    dy = randn(rng, B, tq, C, dtype=dtype)
    ref_dq, ref_dk, ref_dv = L.masked_attention_backward(dy, cache)
    dq, dk, dv = dy.copy(), np.empty_like(k), np.empty_like(v)  # dq starts as dy: the fast step's aliasing
    fast.masked_attention_backward(dq, dk, dv, dq, qs, k, v, att, keep, p, threads=threads)
    close(dq, ref_dq, tol, "dq")
    close(dk, ref_dk, tol, "dk")
    close(dv, ref_dv, tol, "dv")
    assert not dk[pad].any() and not dv[pad].any()  # a padded key gets no gradient


def test_masked_attention_in_float16_tracks_float64(rng):
    q, k, v = randn(rng, B, TQ, C, dtype=np.float64), randn(rng, B, TK, C, dtype=np.float64), randn(rng, B, TK, C, dtype=np.float64)
    pad = padding(rng, B, TK)
    ref, cache = L.masked_attention_forward(q, k, v, NH, key_padding_mask=pad)
    h = np.float16
    bias = np.empty((B, 1, 1, TK), h)
    fast.attention_bias_into(bias, pad)
    y, att, qs = np.empty((B, TQ, C), h), np.empty((B, NH, TQ, TK), h), q.astype(h)
    fast.masked_attention_forward(y, att, qs, k.astype(h), v.astype(h), bias)
    close(y.astype(np.float64), ref, 4e-3, "y in float16")  # float16 keeps 11 bits: about 5e-4 per rounding
    dy = randn(rng, B, TQ, C, dtype=np.float64)
    dq, dk, dv = dy.astype(h), np.empty((B, TK, C), h), np.empty((B, TK, C), h)
    fast.masked_attention_backward(dq, dk, dv, dq, qs, k.astype(h), v.astype(h), att)
    for got, want, what in zip((dq, dk, dv), L.masked_attention_backward(dy, cache), ("dq", "dk", "dv")):
        close(got.astype(np.float64), want, 1e-2, what + " in float16")


def mha_params(rng, dtype):
    p = {name: randn(rng, C, C, dtype=dtype, scale=0.1) for name in L.MHA_PARAM_NAMES if name.endswith("weight")}
    p.update({name: randn(rng, C, dtype=dtype, scale=0.1) for name in L.MHA_PARAM_NAMES if name.endswith("bias")})
    return p


@pytest.mark.parametrize("accumulate", [False, True], ids=["write", "accumulate"])
@pytest.mark.parametrize("p", DROPOUT)
@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("case", ["decoder self-attention", "cross-attention"])
@pytest.mark.parametrize("dtype, tol", DTYPES)
def test_multihead_attention(dtype, tol, case, threads, p, accumulate, rng):
    tq, tk, causal = CASES[case]
    w = mha_params(rng, dtype)
    x = randn(rng, B, tq, C, dtype=dtype)
    memory = x if case != "cross-attention" else randn(rng, B, tk, C, dtype=dtype)
    pad = padding(rng, B, tk)
    ref, cache = L.multihead_attention_forward(x, memory, w, NH, key_padding_mask=pad, causal=causal, attn_pdrop=p,
                                               rng=np.random.default_rng(3), training=p > 0)  # fmt: skip
    saved = fast.AttentionSaved(*(np.empty((B, t, C), dtype) for t in (tq, tk, tk)), np.empty((B, NH, tq, tk), dtype),
                                np.empty((B, tq, C), dtype))  # fmt: skip
    bias = np.empty((B, 1, tq if causal else 1, tk), dtype)
    fast.attention_bias_into(bias, pad, causal)
    out = np.empty((B, tq, C), dtype)
    keep = fast.multihead_attention_forward(out, saved, x, memory, w, bias, p, np.random.default_rng(3), threads=threads)
    close(out, ref, tol, "out")
    dout = randn(rng, B, tq, C, dtype=dtype)
    ref_dx, ref_dmem, ref_g = L.multihead_attention_backward(dout, cache)
    g0 = {k: randn(rng, *v.shape, dtype=dtype) for k, v in ref_g.items() if v is not None}  # what was there before
    g = {k: v.copy() for k, v in g0.items()}
    scratch = dict(dq=np.empty((B, tq, C), dtype), dk=np.empty((B, tk, C), dtype), dv=np.empty((B, tk, C), dtype),
                   tmp=np.empty((B, tk, C), dtype))  # fmt: skip
    dx = np.empty_like(x)
    if case == "cross-attention":  # dmemory added into what the other decoder layers left there
        dmem0 = randn(rng, B, tk, C, dtype=dtype)
        dmem = dmem0.copy()
        fast.multihead_attention_backward(dx, dmem, g, dout, saved, x, memory, w, keep, p, accumulate, add_dmemory=True,
                                          threads=threads, **scratch)  # fmt: skip
        close(dx, ref_dx, tol, "dx")
        close(dmem, dmem0 + ref_dmem, tol, "dmemory, added")
    else:  # self-attention: x is the memory, so its gradient is the sum of both
        fast.multihead_attention_backward(dx, dx, g, dout, saved, x, memory, w, keep, p, accumulate, add_dmemory=True,
                                          threads=threads, **scratch)  # fmt: skip
        close(dx, ref_dx + ref_dmem, tol, "dx + dmemory")
    for k in g:
        close(g[k], ref_g[k] + g0[k] if accumulate else ref_g[k], tol, k)


def test_multihead_attention_writes_dmemory_when_not_adding(rng):
    dtype, tq, tk = np.float64, 4, 6
    w, x, memory = mha_params(rng, dtype), randn(rng, 2, tq, C, dtype=dtype), randn(rng, 2, tk, C, dtype=dtype)
    ref, cache = L.multihead_attention_forward(x, memory, w, NH)
    saved = fast.AttentionSaved(np.empty((2, tq, C)), np.empty((2, tk, C)), np.empty((2, tk, C)), np.empty((2, NH, tq, tk)),
                                np.empty((2, tq, C)))  # fmt: skip
    bias = np.zeros((2, 1, 1, tk))
    out = np.empty((2, tq, C))
    fast.multihead_attention_forward(out, saved, x, memory, w, bias)
    dout = randn(rng, 2, tq, C, dtype=dtype)
    g = {k: np.full_like(v, np.nan) for k, v in w.items() if k != "k_proj.bias"}
    dx, dmem = np.empty_like(x), np.full_like(memory, np.nan)  # NaN: anything not overwritten would show
    fast.multihead_attention_backward(dx, dmem, g, dout, saved, x, memory, w, dq=np.empty_like(x), dk=np.empty_like(memory),
                                      dv=np.empty_like(memory), tmp=np.empty_like(memory))  # fmt: skip
    ref_dx, ref_dmem, ref_g = L.multihead_attention_backward(dout, cache)
    close(dmem, ref_dmem, 1e-12, "dmemory")
    for k in g:
        close(g[k], ref_g[k], 1e-12, k)


@pytest.mark.parametrize("p", DROPOUT)
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("dtype, tol", DTYPES)
def test_feedforward(dtype, tol, threads, activation, p, rng):
    x = randn(rng, B, TQ, C, dtype=dtype)
    w1, b1 = randn(rng, C, F, dtype=dtype, scale=0.2), randn(rng, F, dtype=dtype)
    w2, b2 = randn(rng, F, C, dtype=dtype, scale=0.2), randn(rng, C, dtype=dtype)
    ref, cache = L.feedforward_forward(x, w1, b1, w2, b2, activation, drop_rate=p, rng=np.random.default_rng(5), training=p > 0)
    saved = fast.FeedForwardSaved(np.empty((N, F), dtype), np.empty((N, F), dtype) if activation == "gelu" else None)
    out = np.empty((N, C), dtype)
    x2 = x.reshape(N, C)
    keep = fast.feedforward_forward(out, saved, x2, w1, b1, w2, b2, activation, p, np.random.default_rng(5), threads=threads)
    close(out, ref.reshape(N, C), tol, "out")
    assert (keep is None) == (p == 0) and (keep is None or np.array_equal(keep, cache.drop.keep.reshape(N, F)))
    dout = randn(rng, B, TQ, C, dtype=dtype)
    want = L.feedforward_backward(dout, cache)
    dx, dw1, db1, dw2, db2 = np.empty_like(x2), np.empty_like(w1), np.empty_like(b1), np.empty_like(w2), np.empty_like(b2)
    fast.feedforward_backward(dx, dw1, db1, dw2, db2, dout.reshape(N, C), saved, x2, w1, w2, activation, keep, p,
                              dh=np.empty((N, F), dtype), threads=threads)  # fmt: skip
    for got, ref_g, what in zip((dx, dw1, db1, dw2, db2), want, ("dx", "dw1", "db1", "dw2", "db2")):
        close(got, ref_g.reshape(got.shape), tol, what)
