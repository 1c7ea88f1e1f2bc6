"""GELU with GPT-2's tanh approximation (Hugging Face's "gelu_new").

    u = sqrt(2/pi) * (x + 0.044715 * x^3)
    gelu(x) = 0.5 * x * (1 + tanh(u))
Elementwise, so any shape works. Derivation: docs/backprop.md#gelu.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from ..backend import get_array_module

GELU_SCALE = math.sqrt(2.0 / math.pi)
GELU_CUBIC = 0.044715


class GeluCache(NamedTuple):
    x: object  # the input, any shape


def gelu_forward(x):
    """x: any shape -> out: same shape."""
    xp = get_array_module(x)
    u = GELU_SCALE * (x + GELU_CUBIC * x * x * x)
    out = 0.5 * x * (1.0 + xp.tanh(u))
    return out, GeluCache(x)


def gelu_backward(dout, cache: GeluCache):
    """Gradient of x.

    Differentiates  `out = 0.5 * x * (1 + tanh(u))`,  u = s * (x + a x^3).  Product rule:
        d out / dx = 0.5 * (1 + tanh u) + 0.5 * x * (1 - tanh(u)^2) * s * (1 + 3 a x^2)
    and dx = dout * (d out / dx), elementwise. dout: same shape as x. Returns dx.
    """
    xp = get_array_module(dout)
    x = cache.x
    x2 = x * x
    th = xp.tanh(GELU_SCALE * (x + GELU_CUBIC * x2 * x))
    local = 0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * GELU_SCALE * (1.0 + 3.0 * GELU_CUBIC * x2)
    return dout * local
