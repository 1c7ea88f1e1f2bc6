"""GPT-2's feed-forward network (the "MLP"): expand 4x, GELU, project back.

Glossary: B=batch, T=time, C=channels, H=hidden width (4C in GPT-2).
    h = x @ w_fc + b_fc          (B, T, C) -> (B, T, H)
    a = gelu(h)                  (B, T, H)
    out = a @ w_proj + b_proj    (B, T, H) -> (B, T, C)
Derivation: the chain rule through docs/backprop.md#linear and docs/backprop.md#gelu.
"""

from __future__ import annotations

from typing import NamedTuple

from .gelu import GeluCache, gelu_backward, gelu_forward
from .linear import LinearCache, linear_backward, linear_forward


class FFNCache(NamedTuple):
    fc: LinearCache
    gelu: GeluCache
    proj: LinearCache


def ffn_forward(x, w_fc, b_fc, w_proj, b_proj):
    """x: (B, T, C), w_fc: (C, H), b_fc: (H,), w_proj: (H, C), b_proj: (C,) -> out: (B, T, C)."""
    h, c_fc = linear_forward(x, w_fc, b_fc)  # (B, T, C) -> (B, T, H)
    a, c_gelu = gelu_forward(h)  # (B, T, H)
    out, c_proj = linear_forward(a, w_proj, b_proj)  # (B, T, H) -> (B, T, C)
    return out, FFNCache(c_fc, c_gelu, c_proj)


def ffn_backward(dout, cache: FFNCache, weight_grads=True):
    """The chain rule through the three steps, last first.

    Differentiates  `out = gelu(x @ w_fc + b_fc) @ w_proj + b_proj`:  the projection's backward gives
    da (and dw_proj, db_proj), GELU's gives dh = da * gelu'(h), the expansion's gives dx (and dw_fc, db_fc).
    dout: (B, T, C). Returns (dx, dw_fc, db_fc, dw_proj, db_proj) in forward-argument order.
    weight_grads=False (frozen weights): the four parameter gradients are None, their GEMMs skipped.
    """
    da, dw_proj, db_proj = linear_backward(dout, cache.proj, weight_grads)  # (B, T, C) -> (B, T, H)
    dh = gelu_backward(da, cache.gelu)  # (B, T, H)
    dx, dw_fc, db_fc = linear_backward(dh, cache.fc, weight_grads)  # (B, T, H) -> (B, T, C)
    return dx, dw_fc, db_fc, dw_proj, db_proj
