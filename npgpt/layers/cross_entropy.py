"""Softmax cross-entropy over the vocabulary, averaged over the targets that count.

Glossary: B=batch, T=time, V=vocab, N=B*T rows.
    logp[n, j] = logits[n, j] - logsumexp(logits[n, :])     (stable: the row max is subtracted first)
    loss = -mean over rows n with targets[n] != ignore_index of logp[n, targets[n]]
The loss is a 0-d array. Derivation: docs/backprop.md#cross-entropy.
"""

from __future__ import annotations

from typing import NamedTuple

from ..backend import get_array_module


class CrossEntropyCache(NamedTuple):
    probs: object  # (N, V) softmax of the logits
    targets: object  # (N,) target ids, ignored rows replaced by 0
    valid: object  # (N,) bool, False where targets == ignore_index
    n_valid: int  # how many rows count
    logits_shape: tuple  # (..., V), to shape dlogits like the logits


def softmax_cross_entropy_forward(logits, targets, ignore_index=-100):
    """logits: (..., V), targets: (...) integer ids in [0, V) or ignore_index -> loss: 0-d array."""
    xp = get_array_module(logits)
    targets = xp.asarray(targets)
    V = logits.shape[-1]
    if targets.shape != logits.shape[:-1]:
        raise ValueError(
            f"cross-entropy: targets have shape {tuple(targets.shape)} but logits {tuple(logits.shape)}; "
            "targets must have the logits' shape without the last (vocabulary) axis"
        )
    if targets.dtype.kind not in "iu":
        raise ValueError(f"cross-entropy targets must be integers, got dtype {targets.dtype}")
    z = logits.reshape(-1, V)  # (..., V) -> (N, V)
    t = targets.reshape(-1)  # (...) -> (N,)
    valid = t != ignore_index  # (N,)
    n_valid = int(valid.sum())
    if n_valid == 0:
        raise ValueError(f"cross-entropy: every target equals ignore_index={ignore_index}, so the mean is undefined")
    t = xp.where(valid, t, 0)  # ignored rows point at class 0; their terms are masked out below
    if int(t.min()) < 0 or int(t.max()) >= V:
        raise ValueError(f"cross-entropy targets must lie in [0, {V}) (or equal ignore_index={ignore_index})")
    shifted = z - z.max(axis=-1, keepdims=True)  # (N, V), largest entry of each row is 0
    exp = xp.exp(shifted)  # (N, V)
    sumexp = exp.sum(axis=-1, keepdims=True)  # (N, 1)
    probs = exp / sumexp  # (N, V)
    rows = xp.arange(t.shape[0])
    logp_target = shifted[rows, t] - xp.log(sumexp[:, 0])  # (N,)
    loss = -(logp_target * valid).sum() / n_valid  # 0-d
    return loss, CrossEntropyCache(probs, t, valid, n_valid, tuple(logits.shape))


def softmax_cross_entropy_backward(dloss, cache: CrossEntropyCache):
    """Gradient of the logits.

    Differentiates  `loss = -mean_n (z[n, t_n] - logsumexp(z[n, :]))`:  d logsumexp / dz = softmax(z),
    so for each counted row  dlogits[n] = (probs[n] - onehot(t_n)) / n_valid,  ignored rows get 0,
    and everything is multiplied by the upstream dloss (a scalar).
    Returns dlogits: same shape as the logits.
    """
    xp = get_array_module(cache.probs)
    probs, t, valid, n_valid, shape = cache
    dlogits = probs.copy()  # (N, V)
    dlogits[xp.arange(t.shape[0]), t] -= 1.0
    dlogits *= (valid * (xp.asarray(dloss, dtype=probs.dtype) / n_valid))[:, None].astype(probs.dtype)
    return dlogits.reshape(shape)  # (N, V) -> (..., V)
