"""Fast multi-head attention on separate queries, keys and values, with a key-padding mask and an optional
causal mask: the encoder's self-attention, the decoder's masked self-attention and its cross-attention.

Glossary: b=batch, tq=query positions, tk=key positions, C=channels, NH=heads, hs=C//NH (head size).
    q' = q / sqrt(hs)                                (b, tq, C), in place
    att = softmax(q' @ k^T + bias)                   per head: (b, NH, tq, tk); bias 0 or -inf
    y = dropout(att) @ v                             (b, NH, tq, hs) -> (b, tq, C)

Readable twin: npgpt.layers.masked_attention (masked_attention_forward / masked_attention_backward).
Differences:
- no head copies: q, k, v and y stay (b, t, C) arrays (rows of the projections' outputs), and each
  head is a strided view of them, (b, t, C) -> (b, NH, t, hs), whose (t, hs) matrices have row stride
  C, which BLAS takes as they are (the readable layer reshapes and copies);
- the masks are one additive bias (0 where a query may look, -inf where it may not), built once per
  batch by `attention_bias_into` and shared by every layer that uses it (the readable layer rebuilds
  a boolean mask in every call); the probabilities are the same, exactly 0 at blocked keys;
- saved state: the readable cache keeps q, k, v (as head copies) and att; this keeps them in the
  caller's buffers, with q divided by sqrt(hs) in place (one multiply per element of q instead of one
  per score); the caller keeps the dropout keep-mask;
- threads: the batch is split into contiguous shares, one per thread (each head's products are small
  GEMMs, which BLAS runs on the calling thread);
- 16-bit compute: the products accumulate in float32 (common.matmul), the softmax's row sums are taken
  in float32 (fast/attention.py's head-level pair does both).
The work per stack of heads is fast/attention.py's attention_heads_forward / attention_heads_backward_,
the same functions GPT-2's causal attention runs. CUDA: the engine's heads_matmul, CuPy's matmul or
npgpt.cuda.blas.matmul (both copy these views first, whose batch axes (b, NH) do not collapse into one
stride); no kernel of ours (kernels/attention.cu and attention_softmax.cu are causal, without padding).
"""

from __future__ import annotations

import math

import numpy as np

from ..backend import get_array_module
from ..layers.dropout import dropout_mask
from ..layers.masked_attention import blocked_keys
from .attention import attention_heads_backward_, attention_heads_forward, head_view
from .common import in_threads, matmul


def attention_bias_into(bias, key_padding_mask=None, causal: bool = False) -> None:
    """bias (b, 1, tq, tk) (or (b, 1, 1, tk) without a causal mask) <- 0 where query t may look at key s,
    -inf where s is padding (key_padding_mask (b, tk) True) or, causal, later than t."""
    xp = get_array_module(bias)
    b, _, tq, tk = bias.shape
    blocked = blocked_keys(key_padding_mask, causal, b, tq, tk, xp)
    if blocked is None:
        bias[...] = 0
    else:
        bias[...] = xp.where(blocked, bias.dtype.type(-np.inf), bias.dtype.type(0))


def _batch_slice(a, lo, hi):
    return a if a is None or a.shape[0] == 1 else a[lo:hi]


def masked_attention_forward(y, att, q, k, v, bias, p: float = 0.0, rng=None, *, dropped=None, threads: int = 1,
                             matmul=matmul):  # fmt: skip
    """y (b, tq, C) = attention of the queries q (b, tq, C) over keys k and values v (b, tk, C), with
    NH = att.shape[1] heads. q is divided by sqrt(hs) in place and kept so for the backward; att
    (b, NH, tq, tk) receives the probabilities before dropout. bias: attention_bias_into's (b, 1, tq or 1,
    tk). p > 0: dropout on the probabilities with a mask drawn from `rng` as layers.masked_attention
    draws it, returned; else returns None. dropped: scratch like att (allocated when needed)."""
    xp = get_array_module(q)
    b, NH, tq, tk = att.shape
    hs = q.shape[-1] // NH
    q *= q.dtype.type(1.0 / math.sqrt(hs))
    keep = dropout_mask(att.shape, p, rng, xp) if p > 0 else None
    if keep is not None and dropped is None:
        dropped = xp.empty_like(att)
    qh, kh, vh, yh = head_view(q, NH), head_view(k, NH), head_view(v, NH), head_view(y, NH)
    scale = att.dtype.type(1.0 / (1.0 - p))

    def rows(lo, hi, _worker):
        s = slice(lo, hi)
        attention_heads_forward(yh[s], att[s], qh[s], kh[s], vh[s], _batch_slice(bias, lo, hi), _batch_slice(keep, lo, hi),
                                scale, dropped=_batch_slice(dropped, lo, hi), matmul=matmul)  # fmt: skip

    in_threads(b, rows, threads)
    return keep


def masked_attention_backward(dq, dk, dv, dy, q, k, v, att, keep=None, p: float = 0.0, *, datt=None, threads: int = 1,
                              matmul=matmul) -> None:  # fmt: skip
    """dq (b, tq, C), dk and dv (b, tk, C) from dy (b, tq, C), with the forward's q (divided by sqrt(hs)),
    k, v, att and keep-mask (None: no dropout). dq may be dy itself (dy is read before dq is written).
    dq is the gradient of the q before the division. datt: scratch like att (allocated when None).

    Differentiates  `y = att' @ v`,  `att = softmax(q' @ k^T + bias)`  (layers/masked_attention.py):
        dv = att'^T @ dy;  datt = dy @ v^T (through the mask);  dscores = att * (datt - rowsum(datt * att));
        dk = dscores^T @ q';  dq = dscores @ k / sqrt(hs).  Blocked keys have att = 0, so dscores = 0
    there: a padded key gets no dk or dv and passes nothing to any query."""
    xp = get_array_module(dy)
    b, NH, tq, tk = att.shape
    hs = q.shape[-1] // NH
    if dq is not dy:
        dq[...] = dy  # attention_heads_backward_ reads dy from dq's place
    if datt is None:
        datt = xp.empty_like(att)
    dqh, dkh, dvh = head_view(dq, NH), head_view(dk, NH), head_view(dv, NH)
    qh, kh, vh = head_view(q, NH), head_view(k, NH), head_view(v, NH)
    scale, inv_sqrt = att.dtype.type(1.0 / (1.0 - p)), att.dtype.type(1.0 / math.sqrt(hs))

    def rows(lo, hi, _worker):
        s = slice(lo, hi)
        attention_heads_backward_(dqh[s], dkh[s], dvh[s], datt[s], qh[s], kh[s], vh[s], att[s], _batch_slice(keep, lo, hi),
                                  scale, inv_sqrt, matmul=matmul)  # fmt: skip

    in_threads(b, rows, threads)
