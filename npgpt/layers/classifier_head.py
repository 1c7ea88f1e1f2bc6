"""The classification head: the last real token's hidden state, projected onto k labels.

Glossary: B=batch, T=time, C=channels, k=labels.
    h      = x[b, last[b]]          (B, T, C) -> (B, C)     last_token.py: rightmost non-padding token
    logits = h @ weight.T           (B, C) -> (B, k)        weight: (k, C), no bias
P(y | x_1..x_n) = softmax(h_L W_y) of GPT-1's fine-tuning, with W_y = weight.T. The weight is stored
(k, C) like Hugging Face's GPT2ForSequenceClassification `score` (an nn.Linear without bias), so a
saved head loads there unchanged. Derivation: docs/backprop.md#classification-head.
"""

from __future__ import annotations

from typing import NamedTuple

from .last_token import LastTokenCache, last_token_backward, last_token_forward
from .linear import LinearCache, linear_backward, linear_forward


class ClassifierHeadCache(NamedTuple):
    pool: LastTokenCache
    score: LinearCache


def classifier_head_forward(x, idx, weight, pad_id: int):
    """x: (B, T, C) final hidden states, idx: (B, T) token ids, weight: (k, C) -> logits: (B, k)."""
    if weight.ndim != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"classifier head: weight must be (k, C={x.shape[-1]}), got {tuple(weight.shape)}")
    h, c_pool = last_token_forward(x, idx, pad_id)  # (B, T, C) -> (B, C)
    logits, c_score = linear_forward(h, weight.T)  # (B, C) @ (C, k) -> (B, k)
    return logits, ClassifierHeadCache(c_pool, c_score)


def classifier_head_backward(dlogits, cache: ClassifierHeadCache, weight_grad=True):
    """Gradients of x and weight (idx and pad_id are not differentiable).

    Differentiates  `logits = x[b, last[b]] @ weight.T`:  the linear layer gives dh = dlogits @ weight
    and d(weight.T) = h.T @ dlogits, so dweight = dlogits.T @ h (k, C); the gather scatters dh into
    the rows last[b] of a zero (B, T, C).
    dlogits: (B, k). Returns (dx (B, T, C), dweight (k, C), or None when weight_grad=False).
    """
    dh, dweight_t, _ = linear_backward(dlogits, cache.score, weight_grad)  # (B, k) -> (B, C); (C, k)
    dx = last_token_backward(dh, cache.pool)  # (B, C) -> (B, T, C)
    return dx, None if dweight_t is None else dweight_t.T.copy()  # (C, k) -> (k, C)
