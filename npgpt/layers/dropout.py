"""Inverted dropout: zero each element with probability p and scale the survivors by 1/(1-p),
so the expected output equals the input and evaluation needs no rescaling.

Glossary: any shape. Derivation: docs/backprop.md#dropout.
"""

from __future__ import annotations

from typing import NamedTuple

from ..backend import get_array_module


class DropoutCache(NamedTuple):
    keep: object  # boolean mask of kept elements (same shape as x), or None for the identity
    scale: float  # 1 / (1 - p)


def check_dropout_p(p) -> float:
    p = float(p)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}; use 0 to switch dropout off")
    return p


def dropout_mask(shape, p, rng, xp):
    """A boolean keep-mask, True with probability 1 - p. `rng` is a NumPy or CuPy Generator."""
    if rng is None:
        raise ValueError(
            "dropout in training mode needs a random generator: pass rng=np.random.default_rng(seed) "
            "(cupy.random.default_rng(seed) for CuPy arrays)"
        )
    u = rng.random(shape, dtype=xp.float32)
    if get_array_module(u) is not xp:
        raise ValueError(
            "dropout's rng makes arrays on a different device than x; use np.random.default_rng for "
            "NumPy arrays and cupy.random.default_rng for CuPy arrays"
        )
    return u >= p


def dropout_forward(x, p, rng, training=True):
    """x: any shape -> out: same shape. Identity (no mask drawn) when p == 0 or not training."""
    p = check_dropout_p(p)
    if not training or p == 0.0:
        return x, DropoutCache(None, 1.0)
    xp = get_array_module(x)
    keep = dropout_mask(x.shape, p, rng, xp)
    scale = 1.0 / (1.0 - p)
    out = x * keep * x.dtype.type(scale)
    return out, DropoutCache(keep, scale)


def dropout_backward(dout, cache: DropoutCache):
    """Gradient of x.

    Differentiates  `out = x * keep / (1 - p)`:  the mask is a constant, so dx = dout * keep / (1 - p)
    (dropped elements get no gradient). Returns dx, same shape as dout.
    """
    if cache.keep is None:
        return dout
    return dout * cache.keep * dout.dtype.type(cache.scale)
