"""Layer normalisation over the last axis (channels), with learned scale and shift.

Glossary: B=batch, T=time, C=channels.
    mean = x.mean(-1);  xc = x - mean;  var = (xc * xc).mean(-1)   (biased variance, as in GPT-2)
    rstd = 1 / sqrt(var + eps);  xhat = xc * rstd;  out = xhat * weight + bias
Derivation: docs/backprop.md#layernorm.
"""

from __future__ import annotations

from typing import NamedTuple

from ..backend import get_array_module


class LayerNormCache(NamedTuple):
    xhat: object  # (..., C) normalised input
    rstd: object  # (..., 1) reciprocal standard deviation
    weight: object  # (C,)


def layernorm_forward(x, weight, bias, eps=1e-5):
    """x: (..., C), weight: (C,), bias: (C,) -> out: (..., C)."""
    xp = get_array_module(x)
    if x.shape[-1] != weight.shape[0] or bias.shape != weight.shape:
        raise ValueError(
            f"layernorm: x has {x.shape[-1]} channels but weight is {tuple(weight.shape)} "
            f"and bias {tuple(bias.shape)}; both must be ({x.shape[-1]},)"
        )
    mean = x.mean(axis=-1, keepdims=True)  # (..., C) -> (..., 1)
    xc = x - mean  # (..., C)
    var = (xc * xc).mean(axis=-1, keepdims=True)  # (..., C) -> (..., 1)
    rstd = 1.0 / xp.sqrt(var + eps)  # (..., 1)
    xhat = xc * rstd  # (..., C)
    out = xhat * weight + bias  # (..., C)
    return out, LayerNormCache(xhat, rstd, weight)


def layernorm_backward(dout, cache: LayerNormCache):
    """Gradients of x, weight and bias.

    Differentiates  `out = xhat * weight + bias`  with  `xhat = (x - mean) * rstd`.
    dweight = sum over rows of dout * xhat,  dbias = sum of dout.  With g = dout * weight (the
    gradient reaching xhat), the mean and the variance each depend on every x in the row, which gives
        dx = rstd * (g - mean(g) - xhat * mean(g * xhat))      (means over the C channels)
    dout: (..., C). Returns (dx (..., C), dweight (C,), dbias (C,)).
    """
    xhat, rstd, weight = cache
    C = xhat.shape[-1]
    dweight = (dout * xhat).reshape(-1, C).sum(axis=0)  # (..., C) -> (C,)
    dbias = dout.reshape(-1, C).sum(axis=0)  # (..., C) -> (C,)
    g = dout * weight  # (..., C)
    g_mean = g.mean(axis=-1, keepdims=True)  # (..., 1)
    gx_mean = (g * xhat).mean(axis=-1, keepdims=True)  # (..., 1)
    dx = rstd * (g - g_mean - xhat * gx_mean)  # (..., C)
    return dx, dweight, dbias
