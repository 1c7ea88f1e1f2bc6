"""Fast causal multi-head self-attention: all (batch, head) pairs at once, into preallocated buffers.

Glossary: B=batch, T=time, C=channels, NH=heads, hs=C//NH (head size); b, t: the batch and time in use.
    q, k, v = split(qkv);  q' = q / sqrt(hs)               (b,t,3C) -> 3 x (b,NH,t,hs), q pre-scaled
    att = softmax(q' @ k^T + bias)                         (b,NH,t,t), bias -inf above the diagonal
    y   = merge(dropout(att) @ v)                          (b,NH,t,hs) -> (b,t,C)

Readable twin: npgpt.layers.attention (attention_forward / attention_backward). Differences:
- saved state: the readable cache keeps q, k, v and att; this keeps them too, in the caller's
  buffers: `heads` (3, b, NH, t, hs) holds q already divided by sqrt(hs) (one multiply instead of
  one per score), k and v; `att` the probabilities before dropout; the caller keeps the keep-mask;
- the mask is an additive bias (0 on and below the diagonal, -inf above), built once by the caller;
- the products of each step run on the whole (b, NH) stack at once (`matmul`: common.matmul, or on a
  GPU npgpt.cuda.blas.matmul, one cuBLAS call per product with transposes as flags);
- 16-bit compute: the softmax's row sums are taken in float32.
The head-level pair attention_heads_forward / attention_heads_backward_ is what the CUDA kernels match.
In place (the CPU's fast step): attention_in_place_forward / _backward read q, k, v as views of qkv and
write y and dqkv directly, without the heads layout's copies; qkv then holds q already scaled.
Causal blocks (rows=, the fast step's default on the CPU): attention_causal_forward / _backward_ cut the
query rows (and in the backward the keys) into blocks of CAUSAL_ROWS and skip the products and
exponentials of what the mask hides; att then holds each block row only up to its diagonal block.
Recompute (npgpt/engine/attention.py's RecomputedAttention, recompute="attention"/"block"):
attention_rows_forward / attention_rows_backward_ keep nothing T x T; they work a block of ATTENTION_ROWS
query rows at a time against only the keys those rows can see, and the backward recomputes each block's
probabilities from q and k (as the flash kernel does on the GPU, without its online softmax: a block's
rows are complete, so its softmax is exact).
CUDA kernel: kernels/attention.cu (flash attention: O(t) memory, no dropout, keeps each row's logsumexp
instead of att), npgpt.cuda.kernels.attention_fwd / attention_bwd at the head level and
flash_attention_forward / flash_attention_backward at the level of this file's attention_forward /
attention_backward.
Fused softmax (a GPU's default attention, npgpt/engine/attention.py's FusedSoftmaxAttention): the
products are cuBLAS strided-batched GEMMs and what lies between them is one pass each way:
attention_softmax_forward_ (scale, causal mask, softmax and dropout over the scores, in place),
attention_softmax_backward_ (dropout's and softmax's backward, times the scale) and attention_dropout_
(the dropped probabilities again, for dv). Their dropout mask is Philox's (fast/dropout.py,
attention_dropout_keep), keyed by a seed, the layer and the position, so the backward draws it again
and nothing of it is kept; q is not pre-scaled (the scale is applied to the scores). These three are
the NumPy twins of the kernels of kernels/attention_softmax.cu (npgpt.cuda.kernels.attention_softmax_*),
16-bit arrays worked on in float32 and each output rounded once, as the kernels do.
"""

from __future__ import annotations

import math

import numpy as np

from ..backend import get_array_module
from ..layers.dropout import dropout_mask
from ..precision import is_low_precision
from .common import matmul, rowdot
from .dropout import attention_dropout_keep


def heads_from_qkv_into(heads, qkv) -> None:
    """heads (3, b, NH, t, hs) <- qkv (b*t, 3C) or (b, t, 3C), the fused projection [q | k | v], as it is."""
    _, b, NH, t, hs = heads.shape
    heads[...] = qkv.reshape(b, t, 3, NH, hs).transpose(2, 0, 3, 1, 4)  # (b, t, 3C) -> (3, b, NH, t, hs)


def qkv_from_heads_into(qkv, heads) -> None:
    """qkv (b*t, 3C) or (b, t, 3C) <- heads (3, b, NH, t, hs): heads_from_qkv_into's inverse (dqkv from dq, dk, dv)."""
    _, b, NH, t, hs = heads.shape
    qkv.reshape(b, t, 3, NH, hs)[...] = heads.transpose(1, 3, 0, 2, 4)  # (3, b, NH, t, hs) -> (b, t, 3C)


def split_heads_into(heads, qkv) -> None:
    """heads (3, b, NH, t, hs) <- qkv (b*t, 3C) or (b, t, 3C), the fused projection [q | k | v]; q is
    divided by sqrt(hs) on the way."""
    heads_from_qkv_into(heads, qkv)
    heads[0] *= heads.dtype.type(1.0 / math.sqrt(heads.shape[-1]))  # fold the 1/sqrt(hs) into q


def merge_heads_into(y, head_out) -> None:
    """y (b*t, C) or (b, t, C) <- head_out (b, NH, t, hs)."""
    b, NH, t, hs = head_out.shape
    y.reshape(b, t, NH, hs)[...] = head_out.transpose(0, 2, 1, 3)  # (b, NH, t, hs) -> (b, t, C)


def head_from_rows_into(head, y) -> None:
    """head (b, NH, t, hs) <- y (b*t, C) or (b, t, C): merge_heads_into's inverse (dy per head)."""
    b, NH, t, hs = head.shape
    head[...] = y.reshape(b, t, NH, hs).transpose(0, 2, 1, 3)  # (b, t, C) -> (b, NH, t, hs)


def attention_forward(y, heads, att, qkv, bias, p: float = 0.0, rng=None, *, dropped=None, head_out=None, matmul=matmul,
                      rows: int | None = None):  # fmt: skip
    """y (b, t, C) = causal attention over qkv (b, t, 3C) (or the same as 2-D (b*t, ...) views).

    Saves heads (3, b, NH, t, hs) (q scaled by 1/sqrt(hs), k, v) and att (b, NH, t, t), the
    probabilities before dropout. bias: (t, t), 0 on and below the diagonal, -inf above. p > 0: dropout
    on att with a mask drawn from `rng` (as layers.attention draws it), returned; else returns None.
    dropped (b, NH, t, t) and head_out (b, NH, t, hs): scratch (allocated when None). rows: causal blocks
    of that many query rows (attention_causal_forward; None: the whole stack at once); then att holds
    the probabilities on and left of each block's diagonal only, and the backward must be given the same rows."""
    xp = get_array_module(qkv)
    split_heads_into(heads, qkv)
    q, k, v = heads[0], heads[1], heads[2]
    keep = dropout_mask(att.shape, p, rng, xp) if p > 0 else None
    if keep is not None and dropped is None:
        dropped = xp.empty_like(att)
    if head_out is None:
        head_out = xp.empty_like(q)
    attention_heads_forward(head_out, att, q, k, v, bias, keep, att.dtype.type(1.0 / (1.0 - p)), dropped=dropped, matmul=matmul,
                            rows=rows)  # fmt: skip
    merge_heads_into(y, head_out)
    return keep


def attention_backward(dqkv, dy, heads, att, keep=None, p: float = 0.0, *, dheads=None, datt=None, matmul=matmul,
                       rows: int | None = None) -> None:  # fmt: skip
    """dqkv (b, t, 3C) from dy (b, t, C), with the forward's heads, att and keep-mask (None: no dropout).
    dheads (3, b, NH, t, hs) and datt (b, NH, t, t): scratch (allocated when None). rows: as the forward.

    Differentiates  `y = att' @ v`,  `att = softmax(q' @ k^T + bias)`  (layers/attention.py):
        dv = att'^T @ dy;  datt = dy @ v^T (through the mask);  dscores = att * (datt - rowsum(datt * att));
        dk = dscores^T @ q';  dq = dscores @ k / sqrt(hs)."""
    xp = get_array_module(dy)
    hs = heads.shape[-1]
    if dheads is None:
        dheads = xp.empty_like(heads)
    if datt is None:
        datt = xp.empty_like(att)
    head_from_rows_into(dheads[0], dy)  # dy lives in dq's slot until dq is computed
    attention_heads_backward_(dheads[0], dheads[1], dheads[2], datt, heads[0], heads[1], heads[2], att, keep,
                              att.dtype.type(1.0 / (1.0 - p)), att.dtype.type(1.0 / math.sqrt(hs)), matmul=matmul,
                              rows=rows)  # fmt: skip
    qkv_from_heads_into(dqkv, dheads)  # (3, b, NH, t, hs) -> (b, t, 3C)


# --- in place: no copies into or out of the heads layout (the CPU's fast step) ---------------------------


def qkv_heads_view(qkv, b: int, t: int, NH: int):
    """(3, b, NH, t, hs) view of qkv (b*t, 3C) [q | k | v], no copy: each head's (t, hs) matrix keeps the
    row stride 3C of qkv, which BLAS takes as it is."""
    hs = qkv.shape[-1] // (3 * NH)
    return qkv.reshape(b, t, 3, NH, hs).transpose(2, 0, 3, 1, 4)  # (b*t, 3C) -> (3, b, NH, t, hs)


def head_view(x, n_head: int):
    """(b, t, C) -> (b, NH, t, hs), a view (no copy): head h of row (i, j) is x[i, j, h*hs : (h+1)*hs]."""
    b, t, C = x.shape
    return x.reshape(b, t, n_head, C // n_head).transpose(0, 2, 1, 3)


def attention_in_place_forward(y, qkv, att, bias, p: float = 0.0, rng=None, *, dropped=None, rows: int | None = None,
                               matmul=matmul):  # fmt: skip
    """attention_forward without the copies of split_heads_into and merge_heads_into: q, k, v are read
    where the fused projection wrote them (views of qkv, (b*t, 3C)) and each head's output is written
    into its columns of y (b*t, C). qkv's q columns are divided by sqrt(hs) in place, so afterwards qkv
    holds [q' | k | v]: the saved state attention_in_place_backward reads. att (b, NH, t, t), bias,
    p, rng, dropped, rows: as attention_forward. Returns the keep-mask (p > 0) or None."""
    xp = get_array_module(qkv)
    b, NH, t = att.shape[0], att.shape[1], att.shape[2]
    C = qkv.shape[-1] // 3
    qkv[:, :C] *= qkv.dtype.type(1.0 / math.sqrt(C // NH))  # fold the 1/sqrt(hs) into q, in place
    q, k, v = qkv_heads_view(qkv, b, t, NH)
    keep = dropout_mask(att.shape, p, rng, xp) if p > 0 else None
    if keep is not None and dropped is None:
        dropped = xp.empty_like(att)
    attention_heads_forward(head_view(y.reshape(b, t, -1), NH), att, q, k, v, bias, keep, att.dtype.type(1.0 / (1.0 - p)),
                            dropped=dropped, matmul=matmul, rows=rows)  # fmt: skip
    return keep


def attention_in_place_backward(dqkv, dy, qkv, att, keep=None, p: float = 0.0, *, datt=None, rows: int | None = None,
                                matmul=matmul) -> None:  # fmt: skip
    """dqkv (b*t, 3C) from dy (b*t, C) and what attention_in_place_forward left in qkv and att (the same
    rows): dq, dk, dv are written straight into their columns of dqkv. Differentiates what
    attention_backward does; with causal blocks dy is read where it is, else it is first copied into
    dq's columns (attention_heads_backward_ takes dy in dq's place)."""
    xp = get_array_module(dy)
    b, NH, t = att.shape[0], att.shape[1], att.shape[2]
    q, k, v = qkv_heads_view(qkv, b, t, NH)
    dq, dk, dv = qkv_heads_view(dqkv, b, t, NH)
    if datt is None:
        datt = xp.empty_like(att)
    drop_scale, inv_sqrt = att.dtype.type(1.0 / (1.0 - p)), att.dtype.type(1.0 / math.sqrt(q.shape[-1]))
    if rows is not None and rows < t:
        attention_causal_backward_(dq, dk, dv, datt, q, k, v, att, keep, drop_scale, inv_sqrt, rows=rows, matmul=matmul,
                                   dy=head_view(dy.reshape(b, t, -1), NH))  # fmt: skip
        return
    dq[...] = head_view(dy.reshape(b, t, -1), NH)
    attention_heads_backward_(dq, dk, dv, datt, q, k, v, att, keep, drop_scale, inv_sqrt, matmul=matmul)


# --- over (..., t, hs) stacks of heads ------------------------------------------------------------------


def attention_heads_forward(out, att, q, k, v, bias, keep=None, drop_scale=1.0, *, dropped=None, matmul=matmul,
                            rows: int | None = None) -> None:  # fmt: skip
    """att = softmax(q @ k^T + bias) (rows), out = dropout(att) @ v. Shapes (..., t, hs) and (..., t, t);
    q is already scaled (by 1/sqrt(hs) in GPT-2); bias is 0 on and below the diagonal and -inf above it.
    keep: the dropout mask (None: no dropout), drop_scale 1/(1 - p), dropped: scratch like att.
    rows: work in causal blocks of that many query rows (attention_causal_forward; None: all at once)."""
    if rows is not None and rows < q.shape[-2]:
        attention_causal_forward(out, att, q, k, v, bias, keep, drop_scale, rows=rows, dropped=dropped, matmul=matmul)
        return
    xp = get_array_module(q)
    matmul(att, q, xp.swapaxes(k, -1, -2))  # scores
    _softmax_(att, bias)
    used = att
    if keep is not None:
        xp.multiply(att, keep, out=dropped)
        dropped *= drop_scale
        used = dropped
    matmul(out, used, v)


def attention_heads_backward_(dq, dk, dv, datt, q, k, v, att, keep=None, drop_scale=1.0, inv_sqrt=1.0, *, matmul=matmul,
                              rows: int | None = None) -> None:  # fmt: skip
    """The backward of attention_heads_forward. dq holds dy on entry (it is read before dq is written);
    datt is scratch like att. inv_sqrt: the factor of q's scale that dq must carry (1/sqrt(hs) for the
    unscaled q of GPT-2's qkv), so dq is the gradient of the q before the scaling. rows: as the forward
    was given (attention_causal_backward_)."""
    if rows is not None and rows < q.shape[-2]:
        attention_causal_backward_(dq, dk, dv, datt, q, k, v, att, keep, drop_scale, inv_sqrt, rows=rows, matmul=matmul)
        return
    xp = get_array_module(q)
    dy = dq
    if keep is not None:
        xp.multiply(att, keep, out=datt)  # the dropped probabilities that multiplied v
        datt *= drop_scale
        matmul(dv, xp.swapaxes(datt, -1, -2), dy)  # dv = att'^T @ dy
        matmul(datt, dy, xp.swapaxes(v, -1, -2))  # datt' = dy @ v^T
        datt *= keep  # back through the mask
        datt *= drop_scale
    else:
        matmul(dv, xp.swapaxes(att, -1, -2), dy)  # dv = att^T @ dy
        matmul(datt, dy, xp.swapaxes(v, -1, -2))  # datt = dy @ v^T
    # softmax backward, in place: dscores = att * (datt - sum(datt * att))
    _softmax_backward_(datt, att)
    # scores = q' @ k^T with q' = q * inv_sqrt:  dk = dscores^T @ q',  dq = dscores @ k * inv_sqrt
    matmul(dk, xp.swapaxes(datt, -1, -2), q)
    matmul(dq, datt, k)  # overwrites dy, which is no longer needed
    dq *= inv_sqrt


# --- causal blocks (the CPU's default): the products skip what the mask hides ------------------------

CAUSAL_ROWS = 128  # query rows (and keys) per block of attention_causal_forward / _backward_ on the CPU


def attention_causal_forward(out, att, q, k, v, bias, keep=None, drop_scale=1.0, *, rows: int, dropped=None,
                             matmul=matmul) -> None:  # fmt: skip
    """attention_heads_forward block of `rows` query rows by block: rows i0..i1 see keys 0..i1 only, so
    their scores, softmax and product with v run on (.., i1-i0, i1) and skip the keys the causal mask
    hides (for long t about half the products and exponentials). att keeps the probabilities on and
    left of each block's diagonal block, where attention_causal_backward_ reads them; att[.., i0:i1, i1:]
    is never written or read. Same arguments and results as attention_heads_forward."""
    xp = get_array_module(q)
    t = q.shape[-2]
    for i0 in range(0, t, rows):
        i1 = min(t, i0 + rows)
        s = att[..., i0:i1, :i1]  # (.., r, i1)
        matmul(s, q[..., i0:i1, :], xp.swapaxes(k[..., :i1, :], -1, -2))  # (.., r, hs) @ (.., hs, i1)
        _softmax_(s, bias[i0:i1, :i1])
        used = s
        if keep is not None:
            used = dropped[..., i0:i1, :i1]
            xp.multiply(s, keep[..., i0:i1, :i1], out=used)
            used *= drop_scale
        matmul(out[..., i0:i1, :], used, v[..., :i1, :])  # (.., r, i1) @ (.., i1, hs) -> (.., r, hs)


def attention_causal_backward_(dq, dk, dv, datt, q, k, v, att, keep=None, drop_scale=1.0, inv_sqrt=1.0, *, rows: int,
                               matmul=matmul, dy=None) -> None:  # fmt: skip
    """attention_heads_backward_ on the blocks attention_causal_forward wrote (same arguments; dq holds
    dy on entry, unless `dy` is given: then dy is read there and dq only written). The keys are cut
    into the same blocks: key block K = k0..k1 is seen by query rows k0..t only, and on those rows
    every probability of K was written (0 above the diagonal), so
        dv[K] = P'[k0:, K]^T @ dy[k0:]   and   dk[K] = dS[k0:, K]^T @ q'[k0:]   (a product per key block),
        dP = dy[R] @ v[:i1]^T,  dS = P * (dP - rowsum(dP * P)),  dq[R] = dS @ k[:i1] * inv_sqrt  (per row block)."""
    xp = get_array_module(q)
    t = q.shape[-2]
    dy, blocks = dq if dy is None else dy, [(i0, min(t, i0 + rows)) for i0 in range(0, t, rows)]
    src = att  # the probabilities that multiplied v: with dropout, the dropped ones, made in datt first
    if keep is not None:
        for i0, i1 in blocks:
            xp.multiply(att[..., i0:i1, :i1], keep[..., i0:i1, :i1], out=datt[..., i0:i1, :i1])
            datt[..., i0:i1, :i1] *= drop_scale
        src = datt
    for k0, k1 in blocks:  # dv = P'^T @ dy, key block by key block
        matmul(dv[..., k0:k1, :], xp.swapaxes(src[..., k0:, k0:k1], -1, -2), dy[..., k0:, :])  # (.., kb, t-k0) @ (.., t-k0, hs)
    for i0, i1 in blocks:  # dS, row block by row block
        d = datt[..., i0:i1, :i1]  # (.., r, i1)
        matmul(d, dy[..., i0:i1, :], xp.swapaxes(v[..., :i1, :], -1, -2))  # dP' = dy @ v^T
        if keep is not None:
            d *= keep[..., i0:i1, :i1]  # back through the mask
            d *= drop_scale
        _softmax_backward_(d, att[..., i0:i1, :i1])
    for k0, k1 in blocks:  # dk = dS^T @ q'
        matmul(dk[..., k0:k1, :], xp.swapaxes(datt[..., k0:, k0:k1], -1, -2), q[..., k0:, :])
    for i0, i1 in blocks:  # dq = dS @ k, last: it overwrites dy
        matmul(dq[..., i0:i1, :], datt[..., i0:i1, :i1], k[..., :i1, :])
    dq *= inv_sqrt


def _softmax_(s, bias) -> None:
    """s (..., r, c) = softmax(s + bias) over its rows, in place; bias 0 where a key is seen, -inf where not."""
    xp = get_array_module(s)
    s += bias  # the future gets -inf
    s -= s.max(axis=-1, keepdims=True)
    xp.exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True, dtype=np.float32 if is_low_precision(s.dtype) else None)


def _softmax_backward_(d, prob) -> None:
    """d (..., r, c) = prob * (d - rowsum(d * prob)), in place: the softmax's backward (d holds dprob on entry)."""
    d -= rowdot(d, prob)[..., None]
    d *= prob


# --- recompute: the probabilities are never kept, row block by row block ------------------------------

ATTENTION_ROWS = 128  # query rows per block of the recomputing attention (its scratch is (b, NH, rows, t) x 2)


def attention_rows_scratch(xp, b: int, NH: int, t: int, dtype, rows: int | None = None):
    """The scratch of attention_rows_forward / _backward: two (b, NH, rows, t) blocks of probabilities
    (rows: ATTENTION_ROWS by default); its height is the block of query rows they work on."""
    return xp.empty((2, b, NH, min(rows or ATTENTION_ROWS, t), t), dtype=dtype)


def _probabilities(s, q, k, bias, i0, i1, matmul):
    """s (..., i1-i0, i1) = softmax(q[i0:i1] @ k[:i1]^T + bias[i0:i1, :i1]): query rows i0..i1 see keys
    0..i1 only (the causal mask hides the rest), so the block is (i1-i0) x i1."""
    xp = get_array_module(q)
    matmul(s, q[..., i0:i1, :], xp.swapaxes(k[..., :i1, :], -1, -2))  # (.., r, hs) @ (.., hs, i1) -> (.., r, i1)
    _softmax_(s, bias[i0:i1, :i1])


def attention_rows_forward(out, q, k, v, bias, keep=None, drop_scale=1.0, *, scratch, matmul=matmul) -> None:
    """out (..., t, hs) = dropout(softmax(q @ k^T + bias)) @ v, like attention_heads_forward, but block
    of query rows by block, so only scratch (2, ..., rows, t) holds probabilities and nothing is kept
    for the backward (attention_rows_backward recomputes them from q and k, as the flash kernel does).
    keep: the (..., t, t) dropout mask or None."""
    t, rows = q.shape[-2], scratch.shape[-2]
    for i0 in range(0, t, rows):
        i1 = min(t, i0 + rows)
        s = scratch[0, ..., : i1 - i0, :i1]  # (.., r, i1)
        _probabilities(s, q, k, bias, i0, i1, matmul)
        if keep is not None:
            s *= keep[..., i0:i1, :i1]
            s *= drop_scale
        matmul(out[..., i0:i1, :], s, v[..., :i1, :])  # (.., r, i1) @ (.., i1, hs) -> (.., r, hs)


def attention_rows_backward_(dq, dk, dv, q, k, v, bias, keep=None, drop_scale=1.0, inv_sqrt=1.0, *, scratch, tmp,
                             matmul=matmul) -> None:  # fmt: skip
    """The backward of attention_rows_forward, with the probabilities recomputed block of query rows by
    block. dq holds dy on entry (each block's rows are read before they are written); dk, dv are written.
    tmp: scratch like q (the partial dk, dv of a block). Per block of rows R (keys 0..i1):
        dv[:i1] += P'^T @ dy[R];  dP = dy[R] @ v[:i1]^T (through the mask);  dS = P * (dP - rowsum(dP * P));
        dk[:i1] += dS^T @ q[R];  dq[R] = dS @ k[:i1] * inv_sqrt."""
    xp = get_array_module(q)
    t, rows = q.shape[-2], scratch.shape[-2]
    dk[...] = 0
    dv[...] = 0
    for i0 in range(0, t, rows):
        i1 = min(t, i0 + rows)
        p, dp = scratch[0, ..., : i1 - i0, :i1], scratch[1, ..., : i1 - i0, :i1]  # (.., r, i1)
        _probabilities(p, q, k, bias, i0, i1, matmul)
        dy = dq[..., i0:i1, :]  # (.., r, hs)
        part = tmp[..., :i1, :]  # (.., i1, hs)
        if keep is not None:
            xp.multiply(p, keep[..., i0:i1, :i1], out=dp)
            dp *= drop_scale  # the dropped probabilities that multiplied v
            matmul(part, xp.swapaxes(dp, -1, -2), dy)
        else:
            matmul(part, xp.swapaxes(p, -1, -2), dy)  # (.., i1, r) @ (.., r, hs)
        dv[..., :i1, :] += part
        matmul(dp, dy, xp.swapaxes(v[..., :i1, :], -1, -2))  # (.., r, hs) @ (.., hs, i1)
        if keep is not None:
            dp *= keep[..., i0:i1, :i1]
            dp *= drop_scale
        _softmax_backward_(dp, p)  # dS
        matmul(part, xp.swapaxes(dp, -1, -2), q[..., i0:i1, :])  # (.., i1, r) @ (.., r, hs)
        dk[..., :i1, :] += part
        matmul(dy, dp, k[..., :i1, :])  # dq of these rows; overwrites their dy, no longer needed
        dy *= inv_sqrt


# --- fused softmax: the NumPy twins of kernels/attention_softmax.cu ---------------------------------------


def _wide(dtype):
    """The dtype the fused softmax computes in: float32 for 16-bit arrays, else the arrays' own."""
    return np.dtype(np.float32) if is_low_precision(dtype) else np.dtype(dtype)


def _seen(xp, t: int):
    """(t, t) booleans: True on and below the diagonal, where a query row sees a key."""
    return xp.tril(xp.ones((t, t), dtype=np.bool_))


def attention_softmax_forward_(att, dropped, scale: float, p: float = 0.0, seed=None, layer: int = 0) -> None:
    """att (..., t, t): the scores q @ k^T on entry; on exit P = softmax(scale * scores + causal mask) over
    each row, 0 right of the diagonal. With p > 0, dropped (like att) = P * keep / (1 - p), keep =
    attention_dropout_keep(seed, layer, ...) (seed: the step's (1,) float64 uniform); dropped is not
    touched when p == 0 (it may be None or att). 16-bit arrays: float32 arithmetic, P rounded once, and
    dropped computed from the rounded P (as the backward's attention_dropout_ computes it again)."""
    xp = get_array_module(att)
    wide, t = _wide(att.dtype), att.shape[-1]
    seen = _seen(xp, t)
    z = xp.where(seen, att.astype(wide) * wide.type(scale), wide.type(-np.inf))  # (..., t, t): the future gets -inf
    z -= z.max(axis=-1, keepdims=True)
    xp.exp(z, out=z)
    z *= 1 / z.sum(axis=-1, keepdims=True)  # the reciprocal, as the kernel
    att[...] = z
    if p > 0:
        attention_dropout_(dropped, att, p, seed, layer)


def attention_softmax_backward_(datt, att, scale: float, p: float = 0.0, seed=None, layer: int = 0) -> None:
    """datt (..., t, t): on entry the gradient of the probabilities that multiplied v (of the dropped ones
    when p > 0), on exit the gradient of the unscaled scores; att: P from attention_softmax_forward_.

    Differentiates  `D = P * keep / (1 - p)`,  `P = softmax(scale * s + mask)`:
        dP = dD * keep / (1 - p);   dz = P * (dP - rowsum(P * dP));   ds = scale * dz   (0 right of the diagonal)."""
    xp = get_array_module(att)
    wide, t = _wide(att.dtype), att.shape[-1]
    P, d = att.astype(wide), datt.astype(wide)
    if p > 0:
        d *= attention_dropout_keep(seed, layer, att.shape, p, xp)
        d *= wide.type(1.0 / (1.0 - p))
    d -= rowdot(d, P)[..., None]  # P is 0 right of the diagonal: those columns add nothing
    d *= P
    d *= wide.type(scale)
    datt[...] = xp.where(_seen(xp, t), d, wide.type(0))


def attention_dropout_(dropped, att, p: float, seed, layer: int = 0) -> None:
    """dropped (..., t, t) = att * keep / (1 - p): the probabilities that multiplied v, from the kept P and
    the mask drawn again (keep as attention_softmax_forward_ drew it); 16-bit: from the stored P, rounded once."""
    xp = get_array_module(att)
    wide = _wide(att.dtype)
    keep = attention_dropout_keep(seed, layer, att.shape, p, xp)
    dropped[...] = att.astype(wide) * keep * wide.type(1.0 / (1.0 - p))
