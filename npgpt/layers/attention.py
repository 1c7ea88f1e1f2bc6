"""Causal multi-head self-attention on GPT-2's fused q|k|v projection.

Glossary: B=batch, T=time, C=channels, NH=heads, hs=C//NH (head size).
    q, k, v = split(qkv)                      (B,T,3C) -> 3 x (B,NH,T,hs)
    scores  = q @ k^T / sqrt(hs)              (B,NH,T,T), future positions set to -inf
    att     = softmax(scores)                 each row sums to 1 over positions <= t
    att     = dropout(att)                    (training only, GPT-2's attn_pdrop)
    y       = att @ v                         (B,NH,T,hs) -> (B,T,C)
This is the readable reference: it stores the (B,NH,T,T) probabilities for the backward.
The output projection (c_proj) is a separate linear layer. Derivation: docs/backprop.md#attention.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from ..backend import get_array_module
from .dropout import check_dropout_p, dropout_mask


class AttentionCache(NamedTuple):
    q: object  # (B, NH, T, hs)
    k: object  # (B, NH, T, hs)
    v: object  # (B, NH, T, hs)
    att: object  # (B, NH, T, T) softmax probabilities (before dropout)
    keep: object  # (B, NH, T, T) dropout keep-mask, or None
    drop_scale: float  # 1 / (1 - p)


def split_heads(qkv, n_head):
    """(B, T, 3C) -> q, k, v each (B, NH, T, hs)."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    hs = C // n_head
    qkv = qkv.reshape(B, T, 3, n_head, hs)  # (B, T, 3C) -> (B, T, 3, NH, hs)
    qkv = qkv.transpose(2, 0, 3, 1, 4)  # -> (3, B, NH, T, hs)
    return qkv[0], qkv[1], qkv[2]


def merge_heads(y):
    """(B, NH, T, hs) -> (B, T, C)."""
    B, NH, T, hs = y.shape
    return y.transpose(0, 2, 1, 3).reshape(B, T, NH * hs)  # (B, NH, T, hs) -> (B, T, C)


def causal_mask(T, xp):
    """(T, T) boolean, True where key position s > query position t (the future)."""
    return xp.triu(xp.ones((T, T), dtype=bool), k=1)


def check_qkv(qkv, n_head):
    if qkv.ndim != 3 or qkv.shape[-1] % 3:
        raise ValueError(f"attention expects qkv of shape (B, T, 3C), got {tuple(qkv.shape)}")
    C = qkv.shape[-1] // 3
    if n_head < 1 or C % n_head:
        raise ValueError(f"attention: C={C} channels cannot be split into n_head={n_head} heads; "
                         "choose n_head dividing C")


def attention_forward(qkv, n_head, *, attn_pdrop=0.0, rng=None, training=False):
    """qkv: (B, T, 3C), the fused projection [q | k | v] -> y: (B, T, C) (before c_proj).

    attn_pdrop, rng, training: dropout on the attention probabilities (GPT-2's attn_pdrop);
    off unless training and attn_pdrop > 0.
    """
    check_qkv(qkv, n_head)
    xp = get_array_module(qkv)
    B, T, _ = qkv.shape
    q, k, v = split_heads(qkv, n_head)  # 3 x (B, NH, T, hs)
    hs = q.shape[-1]
    scores = (q @ k.transpose(0, 1, 3, 2)) * (1.0 / math.sqrt(hs))  # (B, NH, T, T)
    scores = xp.where(causal_mask(T, xp), -xp.inf, scores)  # the future gets -inf
    scores = scores - scores.max(axis=-1, keepdims=True)  # stable: largest entry of each row is 0
    att = xp.exp(scores)  # exp(-inf) = 0 on the masked entries
    att /= att.sum(axis=-1, keepdims=True)  # (B, NH, T, T), rows sum to 1
    p = check_dropout_p(attn_pdrop)
    keep, scale = None, 1.0
    att_used = att
    if training and p > 0.0:
        keep = dropout_mask(att.shape, p, rng, xp)
        scale = 1.0 / (1.0 - p)
        att_used = att * keep * att.dtype.type(scale)
    y = att_used @ v  # (B, NH, T, T) @ (B, NH, T, hs) -> (B, NH, T, hs)
    return merge_heads(y), AttentionCache(q, k, v, att, keep, scale)


def attention_backward(dout, cache: AttentionCache):
    """Gradient of qkv.

    Differentiates  `y = att @ v`,  `att = softmax(q @ k^T / sqrt(hs))`  (masked):
        dv = att^T @ dy;   datt = dy @ v^T
        softmax rows:  dscores = att * (datt - sum_s(datt * att))   (the Jacobian diag(a) - a a^T)
        dq = dscores @ k / sqrt(hs);   dk = dscores^T @ q / sqrt(hs)
    Masked entries have att = 0, so they get dscores = 0 with no extra work. With dropout, the
    dropped probabilities a' = a * keep * scale are what multiplied v, and datt is pushed back
    through the mask before the softmax step.
    dout: (B, T, C). Returns dqkv: (B, T, 3C).
    """
    xp = get_array_module(dout)
    q, k, v, att, keep, scale = cache
    B, NH, T, hs = q.shape
    dy = dout.reshape(B, T, NH, hs).transpose(0, 2, 1, 3)  # (B, T, C) -> (B, NH, T, hs)
    att_used = att if keep is None else att * keep * att.dtype.type(scale)
    dv = att_used.transpose(0, 1, 3, 2) @ dy  # (B, NH, T, T) @ (B, NH, T, hs) -> (B, NH, T, hs)
    datt = dy @ v.transpose(0, 1, 3, 2)  # (B, NH, T, hs) @ (B, NH, hs, T) -> (B, NH, T, T)
    if keep is not None:
        datt = datt * keep * datt.dtype.type(scale)
    dscores = att * (datt - (datt * att).sum(axis=-1, keepdims=True))  # (B, NH, T, T)
    dscores *= 1.0 / math.sqrt(hs)
    dq = dscores @ k  # (B, NH, T, T) @ (B, NH, T, hs) -> (B, NH, T, hs)
    dk = dscores.transpose(0, 1, 3, 2) @ q  # (B, NH, T, T) @ (B, NH, T, hs) -> (B, NH, T, hs)
    dqkv = xp.stack([dq, dk, dv], axis=0)  # (3, B, NH, T, hs)
    return dqkv.transpose(1, 3, 0, 2, 4).reshape(B, T, 3 * NH * hs)  # -> (B, T, 3, NH, hs) -> (B, T, 3C)


def attention_step_kv(qkv, n_head, k_cache, v_cache, pos):
    """Inference only: attend `qkv`'s new positions to every position cached so far.

    qkv: (B, Tn, 3C) for the Tn new positions pos .. pos+Tn-1.
    k_cache, v_cache: (B, NH, T_max, hs) buffers; the new keys and values are written into
    [pos, pos+Tn) in place. Returns y: (B, Tn, C). Each new query sees keys 0 .. its own position,
    so a prompt can be pre-filled in one call and then one token fed at a time.
    """
    check_qkv(qkv, n_head)
    xp = get_array_module(qkv)
    Tn = qkv.shape[1]
    q, k, v = split_heads(qkv, n_head)  # 3 x (B, NH, Tn, hs)
    hs = q.shape[-1]
    end = pos + Tn
    if end > k_cache.shape[2]:
        raise ValueError(f"KV cache holds {k_cache.shape[2]} positions; cannot write up to {end}")
    k_cache[:, :, pos:end] = k
    v_cache[:, :, pos:end] = v
    keys, values = k_cache[:, :, :end], v_cache[:, :, :end]  # (B, NH, end, hs)
    scores = (q @ keys.transpose(0, 1, 3, 2)) * (1.0 / math.sqrt(hs))  # (B, NH, Tn, end)
    future = xp.arange(end)[None, :] > (pos + xp.arange(Tn))[:, None]  # (Tn, end)
    scores = xp.where(future, -xp.inf, scores)
    scores = scores - scores.max(axis=-1, keepdims=True)
    att = xp.exp(scores)
    att /= att.sum(axis=-1, keepdims=True)  # (B, NH, Tn, end)
    return merge_heads(att @ values)  # (B, NH, Tn, hs) -> (B, Tn, C)
