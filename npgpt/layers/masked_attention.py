"""Multi-head scaled dot-product attention on separate queries, keys and values, with a key-padding
mask and an optional causal mask: the encoder's self-attention, the decoder's masked self-attention
and the decoder's cross-attention to the encoder output are all this one function.

Glossary: B=batch, Tq=query positions, Tk=key positions, C=channels, NH=heads, hs=C//NH (head size).
    q, k, v  = split_heads(q), split_heads(k), split_heads(v)    (B,Tq,C) -> (B,NH,Tq,hs); k, v: (B,NH,Tk,hs)
    scores   = q @ k^T / sqrt(hs)                                 (B, NH, Tq, Tk)
    scores   = -inf where blocked                                 blocked = padded key, or (causal) a later key
    att      = softmax(scores)                                    each row sums to 1 over the allowed keys
    att      = dropout(att)                                       (training only)
    y        = att @ v                                            (B, NH, Tq, hs) -> (B, Tq, C)
key_padding_mask is (B, Tk) boolean, True at the keys to ignore (padding), as in PyTorch. For
cross-attention the queries come from the decoder (Tq target positions) and the keys and values
from the encoder output (Tk source positions), so Tq and Tk differ. GPT-2's attention.py is the
special case q, k, v = split(qkv), causal, no padding.
Derivation: docs/backprop.md#attention and docs/backprop.md#the-padding-mask.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from ..backend import get_array_module
from .attention import merge_heads
from .dropout import check_dropout_p, dropout_mask


class MaskedAttentionCache(NamedTuple):
    q: object  # (B, NH, Tq, hs)
    k: object  # (B, NH, Tk, hs)
    v: object  # (B, NH, Tk, hs)
    att: object  # (B, NH, Tq, Tk) softmax probabilities (before dropout), exactly 0 where blocked
    keep: object  # (B, NH, Tq, Tk) dropout keep-mask, or None
    drop_scale: float  # 1 / (1 - p)


def split_heads(x, n_head):
    """(B, T, C) -> (B, NH, T, hs)."""
    B, T, C = x.shape
    return x.reshape(B, T, n_head, C // n_head).transpose(0, 2, 1, 3)  # (B, T, NH, hs) -> (B, NH, T, hs)


def blocked_keys(key_padding_mask, causal, B, Tq, Tk, xp):
    """Boolean, True where a query may not look: broadcastable to (B, 1, Tq, Tk), or None if nothing is."""
    blocked = None
    if key_padding_mask is not None:
        blocked = key_padding_mask[:, None, None, :]  # (B, Tk) -> (B, 1, 1, Tk)
    if causal:
        future = xp.triu(xp.ones((Tq, Tk), dtype=bool), k=1)  # (Tq, Tk), True where key s > query t
        blocked = future if blocked is None else blocked | future  # -> (B, 1, Tq, Tk)
    return blocked


def check_attention_inputs(q, k, v, n_head, key_padding_mask, causal):
    if q.ndim != 3 or k.ndim != 3 or v.ndim != 3:
        raise ValueError(f"attention expects q, k, v of shape (B, T, C), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, Tq, C = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[2] != C:
        raise ValueError(f"attention: k and v must both be (B={B}, Tk, C={C}), got {tuple(k.shape)} and {tuple(v.shape)}")
    if n_head < 1 or C % n_head:
        raise ValueError(f"attention: C={C} channels cannot be split into n_head={n_head} heads; choose n_head dividing C")
    if key_padding_mask is not None:
        if tuple(key_padding_mask.shape) != (B, k.shape[1]) or key_padding_mask.dtype != bool:
            raise ValueError(f"key_padding_mask must be a boolean (B, Tk) = ({B}, {k.shape[1]}) array, True at padding; "
                             f"got {key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")  # fmt: skip
    if causal and Tq != k.shape[1]:
        raise ValueError(f"a causal mask needs as many queries as keys, got Tq={Tq} and Tk={k.shape[1]}")


def masked_attention_forward(q, k, v, n_head, *, key_padding_mask=None, causal=False, attn_pdrop=0.0, rng=None,
                             training=False):  # fmt: skip
    """q: (B, Tq, C), k: (B, Tk, C), v: (B, Tk, C) -> y: (B, Tq, C) (before the output projection).

    key_padding_mask: (B, Tk) bool, True at keys to ignore; causal: query t sees keys s <= t only.
    Every query must keep at least one key: a row with every key blocked is a ValueError (its softmax
    would be 0/0). attn_pdrop, rng, training: dropout on the probabilities, as in attention.py.
    """
    check_attention_inputs(q, k, v, n_head, key_padding_mask, causal)
    xp = get_array_module(q)
    B, Tq, C = q.shape
    Tk = k.shape[1]
    blocked = blocked_keys(key_padding_mask, causal, B, Tq, Tk, xp)
    if blocked is not None and not bool((~blocked).any(axis=-1).all()):
        raise ValueError("attention: some query has every key masked (a sequence that is all padding?); "
                         "every sequence needs at least one token that is not padding")  # fmt: skip
    q, k, v = split_heads(q, n_head), split_heads(k, n_head), split_heads(v, n_head)  # (B, NH, T., hs)
    hs = C // n_head
    scores = (q @ k.transpose(0, 1, 3, 2)) * (1.0 / math.sqrt(hs))  # (B, NH, Tq, hs) @ (B, NH, hs, Tk) -> (B, NH, Tq, Tk)
    if blocked is not None:
        scores = xp.where(blocked, -xp.inf, scores)  # blocked keys get -inf, so exp() makes them exactly 0
    scores = scores - scores.max(axis=-1, keepdims=True)  # stable: the largest entry of each row is 0
    att = xp.exp(scores)
    att /= att.sum(axis=-1, keepdims=True)  # (B, NH, Tq, Tk), rows sum to 1
    p = check_dropout_p(attn_pdrop)
    keep, scale, att_used = None, 1.0, att
    if training and p > 0.0:
        keep = dropout_mask(att.shape, p, rng, xp)
        scale = 1.0 / (1.0 - p)
        att_used = att * keep * att.dtype.type(scale)
    y = att_used @ v  # (B, NH, Tq, Tk) @ (B, NH, Tk, hs) -> (B, NH, Tq, hs)
    return merge_heads(y), MaskedAttentionCache(q, k, v, att, keep, scale)  # -> (B, Tq, C)


def masked_attention_backward(dout, cache: MaskedAttentionCache):
    """Gradients of q, k and v.

    Differentiates  `y = att @ v`,  `att = softmax(q @ k^T / sqrt(hs))`  with blocked scores at -inf:
        dv = att^T @ dy;   datt = dy @ v^T;   dscores = att * (datt - sum_s(datt * att));
        dq = dscores @ k / sqrt(hs);   dk = dscores^T @ q / sqrt(hs)
    A blocked (query, key) entry has att = 0, so dscores = 0 there: a padded key's dk and dv are
    exactly 0, and it passes no gradient to any query. With dropout, datt goes back through the same
    mask before the softmax step. dout: (B, Tq, C). Returns (dq (B, Tq, C), dk (B, Tk, C), dv (B, Tk, C)).
    """
    q, k, v, att, keep, scale = cache
    B, NH, Tq, hs = q.shape
    dy = split_heads(dout, NH)  # (B, Tq, C) -> (B, NH, Tq, hs)
    att_used = att if keep is None else att * keep * att.dtype.type(scale)
    dv = att_used.transpose(0, 1, 3, 2) @ dy  # (B, NH, Tk, Tq) @ (B, NH, Tq, hs) -> (B, NH, Tk, hs)
    datt = dy @ v.transpose(0, 1, 3, 2)  # (B, NH, Tq, hs) @ (B, NH, hs, Tk) -> (B, NH, Tq, Tk)
    if keep is not None:
        datt = datt * keep * datt.dtype.type(scale)
    dscores = att * (datt - (datt * att).sum(axis=-1, keepdims=True))  # (B, NH, Tq, Tk), 0 where blocked
    dscores *= 1.0 / math.sqrt(hs)
    dq = dscores @ k  # (B, NH, Tq, Tk) @ (B, NH, Tk, hs) -> (B, NH, Tq, hs)
    dk = dscores.transpose(0, 1, 3, 2) @ q  # (B, NH, Tk, Tq) @ (B, NH, Tq, hs) -> (B, NH, Tk, hs)
    return merge_heads(dq), merge_heads(dk), merge_heads(dv)  # each (B, NH, T., hs) -> (B, T., C)
