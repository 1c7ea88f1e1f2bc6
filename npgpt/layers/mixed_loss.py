"""Fine-tuning loss with the language-model loss mixed in (GPT-1's auxiliary objective).

Glossary: B=batch, T=time, k=labels, V=vocab.
    L_FT = -mean_b log softmax(cls_logits[b])[labels[b]]           classification, (B, k) logits
    L_PT = -mean over (b, t) with lm_targets != ignore_index of log softmax(lm_logits[b, t])[lm_targets[b, t]]
    L    = L_FT + lm_weight * L_PT,   lm_weight in [0, 1] (GPT-1 used 0.5)
Both heads read the same trunk, so the trunk receives the sum of the two heads' gradients (the model
adds them at its final hidden state). L_FT is a mean over the batch, as Hugging Face's
GPT2ForSequenceClassification computes it (GPT-1 writes a sum; the two differ by the factor B).
L_PT is 0 when no position has a target (a batch of one-token texts). Both terms reuse
cross_entropy.py. Derivation: docs/backprop.md#mixed-fine-tuning-loss.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

from ..backend import get_array_module
from .cross_entropy import CrossEntropyCache, softmax_cross_entropy_backward, softmax_cross_entropy_forward


class MixedLossCache(NamedTuple):
    ft: CrossEntropyCache  # the classification term
    lm: CrossEntropyCache | None  # the LM term, None when lambda = 0 or no position has a target
    lm_weight: float
    lm_shape: tuple | None  # (B, T, V) when lm_logits were given (to shape a zero gradient), else None
    ft_loss: object  # 0-d L_FT, for logging
    lm_loss: object  # 0-d L_PT (0 when off), for logging


def check_lm_weight(lm_weight) -> float:
    if isinstance(lm_weight, bool) or not isinstance(lm_weight, numbers.Real) or not 0.0 <= float(lm_weight) <= 1.0:
        raise ValueError(f"the LM-loss weight (lambda, --lm-weight) must lie in [0, 1], got {lm_weight!r}; "
                         "0 trains on the labels only, 0.5 is GPT-1's choice")  # fmt: skip
    return float(lm_weight)


def mixed_loss_forward(cls_logits, labels, lm_logits=None, lm_targets=None, lm_weight=0.5, ignore_index=-100):
    """cls_logits: (B, k), labels: (B,) ids in [0, k); lm_logits: (B, T, V) or None, lm_targets: (B, T)
    next-token ids or ignore_index -> loss: 0-d L_FT + lm_weight * L_PT."""
    xp = get_array_module(cls_logits)
    lm_weight = check_lm_weight(lm_weight)
    if (lm_logits is None) != (lm_targets is None):
        raise ValueError("mixed loss: give lm_logits and lm_targets together, or neither")
    ft_loss, c_ft = softmax_cross_entropy_forward(cls_logits, labels)  # (B, k) -> 0-d
    lm_loss, c_lm, lm_shape = xp.zeros((), dtype=cls_logits.dtype), None, None
    if lm_logits is not None:
        lm_shape = tuple(lm_logits.shape)
        if lm_weight > 0.0 and bool((xp.asarray(lm_targets) != ignore_index).any()):
            lm_loss, c_lm = softmax_cross_entropy_forward(lm_logits, lm_targets, ignore_index)  # (B, T, V) -> 0-d
    loss = ft_loss + lm_weight * lm_loss  # 0-d
    return loss, MixedLossCache(c_ft, c_lm, lm_weight, lm_shape, ft_loss, lm_loss)


def mixed_loss_backward(dloss, cache: MixedLossCache):
    """Gradients of cls_logits and lm_logits (None when the forward was given no lm_logits).

    Differentiates  `L = L_FT + lm_weight * L_PT`:  a sum passes dloss to each term, scaled by its
    weight, and each cross-entropy gives (softmax - onehot) / (rows counted):
        dcls_logits = dloss * (p_cls - onehot(labels)) / B
        dlm_logits  = dloss * lm_weight * (p_lm - onehot(targets)) / n_valid   (0 on ignored positions)
    With lm_weight = 0, or no position with a target, L does not depend on lm_logits: dlm_logits is 0.
    Returns (dcls_logits (B, k), dlm_logits (B, T, V), or None without lm_logits).
    """
    dcls = softmax_cross_entropy_backward(dloss, cache.ft)  # (B, k)
    if cache.lm_shape is None:
        return dcls, None
    if cache.lm is None:  # lambda = 0, or no position had a target: L_PT contributes the constant 0
        xp = get_array_module(dcls)
        return dcls, xp.zeros(cache.lm_shape, dtype=dcls.dtype)
    return dcls, softmax_cross_entropy_backward(dloss * cache.lm_weight, cache.lm)  # (B, T, V)
