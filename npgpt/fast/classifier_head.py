"""Fast classification head: the last real token's hidden state, projected onto k labels, into buffers.

Glossary: b = batch, t = time, C = channels, k = labels.
    h      = x[i, last[i]]        (b, t, C) -> (b, C)     fast/last_token.py; last from last_token_index
    logits = h @ weight.T         (b, C) -> (b, k)        weight: (k, C), no bias (Hugging Face's `score`)

Readable twin: npgpt.layers.classifier_head (classifier_head_forward / classifier_head_backward).
Differences:
- outputs first, into the caller's buffers; the positions `last` (b,) are computed once per batch by
  fast.last_token_index and given to both passes (the readable forward finds them from idx and pad_id);
- saved state: h in the caller's `pooled` (b, C) buffer (the readable cache keeps it in its linear
  layer's cache, and `last` in its pooling's);
- the backward writes dweight (k, C) through its transposed (C, k) view, so the GEMM lands in the
  weight's own layout (the readable backward copies the transpose), and skips what is None: the
  weight's gradient when it is frozen, dx when nothing below the head trains;
- the scatter into dx (b, t, C) can add into what dx holds (accumulate=True).
CUDA: cuBLAS (CuPy's matmul) and CuPy's fancy indexing; no kernel of ours.
"""

from __future__ import annotations

from ..backend import get_array_module
from .last_token import last_token_backward, last_token_forward
from .linear import linear_backward, linear_forward


def classifier_head_forward(logits, pooled, x, last, weight) -> None:
    """logits (b, k) = x (b, t, C) at position last[i] of each sequence i, times weight.T (weight (k, C)).
    pooled (b, C) receives that hidden state, which the backward reads."""
    last_token_forward(pooled, x, last)  # (b, t, C) -> (b, C)
    linear_forward(logits, pooled, weight.T)  # (b, C) @ (C, k) -> (b, k)


def classifier_head_backward(dx, dweight, dlogits, pooled, last, weight, accumulate: bool = False, *,
                             dpooled=None) -> None:  # fmt: skip
    """dx (b, t, C) (None: not wanted) and dweight (k, C) (None: frozen) from dlogits (b, k), with the
    forward's pooled and last. dx is 0 outside the rows last[i]; with accumulate it is added into.
    dpooled: (b, C) scratch for dh (allocated when None and dx is wanted).

    Differentiates  `logits = x[i, last[i]] @ weight.T`  (layers/classifier_head.py): the linear layer
    gives dh = dlogits @ weight and d(weight.T) = h.T @ dlogits, so dweight = dlogits.T @ h (k, C);
    the gather's gradient scatters dh into the rows last[i]."""
    if dx is not None and dpooled is None:
        dpooled = get_array_module(pooled).empty_like(pooled)
    dh = None if dx is None else dpooled
    linear_backward(dh, None if dweight is None else dweight.T, None, dlogits, pooled, weight.T)  # (b, k) -> (b, C); (C, k)
    if dx is not None:
        last_token_backward(dx, dh, last, accumulate)  # (b, C) -> (b, t, C)
