"""ReLU, the activation of the original Transformer's feed-forward network.

    relu(x) = max(x, 0)
Elementwise, so any shape works. Derivation: docs/backprop.md#relu.
"""

from __future__ import annotations

from typing import NamedTuple

from ..backend import get_array_module


class ReluCache(NamedTuple):
    positive: object  # boolean, x > 0 (same shape as x): where the gradient passes


def relu_forward(x):
    """x: any shape -> out: same shape."""
    xp = get_array_module(x)
    positive = x > 0
    out = xp.where(positive, x, x.dtype.type(0))
    return out, ReluCache(positive)


def relu_backward(dout, cache: ReluCache):
    """Gradient of x.

    Differentiates  `out = max(x, 0)`:  the slope is 1 where x > 0 and 0 where x < 0, so
    dx = dout where x > 0, else 0. (At x = 0 exactly the slope is taken as 0, as PyTorch does.)
    dout: same shape as x. Returns dx.
    """
    xp = get_array_module(dout)
    return xp.where(cache.positive, dout, dout.dtype.type(0))
