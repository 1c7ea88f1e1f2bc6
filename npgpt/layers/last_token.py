"""Pick each sequence's last real (non-padding) position: the hidden state a classifier reads.

Glossary: B=batch, T=time, C=channels.
    last[b] = max { t : idx[b, t] != pad_id }   (0 when the whole row is padding)
    h[b]    = x[b, last[b]]                      (B, T, C) -> (B, C)
This is the rule of Hugging Face's GPT2ForSequenceClassification (transformers 5.x): it takes the
argmax over t of t * (idx != pad_id), the rightmost non-padding token, and gives position 0 for a row
of padding only. Always pad on the right: with right padding and causal attention the padding never
influences that position, so a padded batch gives each row's unpadded result. The index would be found
under left padding too, but GPT has no attention mask, so padding placed before the text is read by
every real position and changes the hidden state picked (and the logits).
Derivation: docs/backprop.md#last-token-pooling.
"""

from __future__ import annotations

from typing import NamedTuple

from ..backend import get_array_module


class LastTokenCache(NamedTuple):
    last: object  # (B,) the position picked in each row
    x_shape: tuple  # (B, T, C), to shape dx like x


def last_token_index(idx, pad_id: int):
    """idx: (B, T) token ids -> (B,) position of each row's rightmost token that is not pad_id (0 if none)."""
    xp = get_array_module(idx)
    if idx.ndim != 2:
        raise ValueError(f"last_token_index expects idx of shape (B, T), got {tuple(idx.shape)}")
    t = xp.arange(idx.shape[1])  # (T,)
    return (t * (idx != pad_id)).argmax(axis=1)  # (B, T) -> (B,); argmax returns the first maximum


def last_token_forward(x, idx, pad_id: int):
    """x: (B, T, C) hidden states, idx: (B, T) the token ids that made them -> h: (B, C)."""
    xp = get_array_module(x)
    idx = xp.asarray(idx)
    if x.ndim != 3 or idx.shape != x.shape[:2]:
        raise ValueError(f"last_token: x {tuple(x.shape)} and idx {tuple(idx.shape)} must be (B, T, C) and (B, T)")
    last = last_token_index(idx, pad_id)  # (B,)
    h = x[xp.arange(x.shape[0]), last]  # (B, T, C) -> (B, C)
    return h, LastTokenCache(last, tuple(x.shape))


def last_token_backward(dh, cache: LastTokenCache):
    """Gradient of x.

    Differentiates  `h[b] = x[b, last[b]]`:  a gather copies one row per sequence, so its gradient
    scatters dh[b] back into row last[b] and every other position gets zero.
    dh: (B, C). Returns dx: (B, T, C).
    """
    xp = get_array_module(dh)
    dx = xp.zeros(cache.x_shape, dtype=dh.dtype)  # (B, T, C)
    dx[xp.arange(cache.x_shape[0]), cache.last] = dh  # one (distinct) row per sequence: no accumulation needed
    return dx
