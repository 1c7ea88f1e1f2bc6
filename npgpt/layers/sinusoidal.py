"""Sinusoidal positional encoding (Vaswani et al. 2017, section 3.5): a fixed table added to the
embeddings, so attention, which is blind to order, can tell positions apart.

Glossary: B=batch, T=time, C=channels (even), i = 0 .. C/2 - 1 indexes the pairs of channels.
    w_i            = 1 / 10000^(2i / C)            one frequency per pair, from 1 down to 10000^(-(C-2)/C)
                                                    (the last pair is i = C/2 - 1: 1/8660 at C = 128)
    PE[pos, 2i]    = sin(pos * w_i)
    PE[pos, 2i+1]  = cos(pos * w_i)
    out            = x + PE[start : start + T]      (B, T, C) + (T, C)

Why sines and cosines: shifting the position by k turns each (sin, cos) pair by the angle k * w_i,
    [sin((pos+k) w), cos((pos+k) w)] = [[cos kw, sin kw], [-sin kw, cos kw]] @ [sin(pos w), cos(pos w)]
(the angle-addition formulas), a rotation that depends on k alone. So "k positions further on" is the
same linear map at every position, which a linear layer (a query or key projection) can learn once.
The wavelengths run from 2 pi to 2 pi * 10000^((C-2)/C) in a geometric progression: fast pairs tell neighbours
apart, slow ones count far; every row has norm sqrt(C / 2); and the table needs no training and works
for any position, including ones longer than any training sentence.

The table is a constant, so the backward is the identity. The learned alternative is a (max_len, C)
table looked up by position with embedding.py. Derivation: docs/backprop.md#sinusoidal-positional-encoding.
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import numpy as np

from ..backend import get_array_module

BASE = 10000.0


class SinusoidalCache(NamedTuple):
    start: int  # first position that was added (nothing else is needed: the table is a constant)


@lru_cache(maxsize=16)
def _table64(length: int, channels: int) -> np.ndarray:
    pos = np.arange(length, dtype=np.float64)[:, None]  # (T, 1)
    freq = BASE ** (-np.arange(0, channels, 2, dtype=np.float64) / channels)  # (C/2,)
    table = np.empty((length, channels))  # (T, C)
    table[:, 0::2] = np.sin(pos * freq)
    table[:, 1::2] = np.cos(pos * freq)
    table.setflags(write=False)
    return table


def sinusoidal_table(length: int, channels: int, xp=np, dtype=np.float64):
    """PE: (length, channels), computed in float64 then cast, on xp's device."""
    if channels % 2:
        raise ValueError(f"sinusoidal positional encoding needs an even number of channels, got {channels}; "
                         "choose an even d_model or use learned positions")  # fmt: skip
    if length < 0:
        raise ValueError(f"sinusoidal table length must be >= 0, got {length}")
    return xp.asarray(_table64(int(length), int(channels)), dtype=dtype)


def sinusoidal_forward(x, start=0):
    """x: (B, T, C) -> out = x + PE[start : start + T]: (B, T, C)."""
    xp = get_array_module(x)
    T, C = x.shape[-2], x.shape[-1]
    pe = sinusoidal_table(start + T, C, xp, x.dtype)[start:]  # (T, C)
    return x + pe, SinusoidalCache(start)


def sinusoidal_backward(dout, cache: SinusoidalCache):
    """Gradient of x.

    Differentiates  `out = x + PE[start : start + T]`:  PE is a constant, so d out / d x = I and
    dx = dout (returned as is: the backward never writes into it).
    """
    return dout
