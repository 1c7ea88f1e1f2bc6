"""Fast inverted dropout: in place on a preallocated buffer, the keep-mask returned to the caller.

Glossary: any shape.

Readable twin: npgpt.layers.dropout (dropout_forward / dropout_backward). Same mask: it is drawn by the
same function (layers.dropout.dropout_mask) with the same shape, so given one generator in the same
state both paths drop the same elements. Differences: outputs first (`out` may be `x` itself, in place);
the caller keeps the mask (no cache). The 1/(1 - p) scale is applied in the array's dtype.
CUDA: CuPy elementwise ops; no kernel of ours.
"""

from __future__ import annotations

from ..backend import get_array_module
from ..layers.dropout import dropout_mask


def dropout_forward(out, x, p: float, rng):
    """out = x * keep / (1 - p), keep drawn with probability 1 - p from `rng`; returns keep (x's shape).
    out may be x. Call only with p > 0 (p == 0 is the identity: draw nothing)."""
    xp = get_array_module(x)
    keep = dropout_mask(x.shape, p, rng, xp)
    xp.multiply(x, keep, out=out)
    out *= out.dtype.type(1.0 / (1.0 - p))
    return keep


def dropout_backward(dx, dout, keep, p: float) -> None:
    """dx = dout * keep / (1 - p); dx may be dout.

    Differentiates  `out = x * keep / (1 - p)`:  the mask is a constant, so dropped elements get no gradient."""
    get_array_module(dout).multiply(dout, keep, out=dx)
    dx *= dout.dtype.type(1.0 / (1.0 - p))
