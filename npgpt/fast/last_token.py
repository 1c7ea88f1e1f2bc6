"""Fast last-token pooling: each sequence's last real (non-padding) hidden state, gathered into a buffer.

Glossary: b = batch, t = time, C = channels.
    last[i] = max { j : idx[i, j] != pad_id }   (0 when the whole row is padding)
    h[i]    = x[i, last[i]]                      (b, t, C) -> (b, C)

Readable twin: npgpt.layers.last_token (last_token_index / last_token_forward / last_token_backward).
Differences:
- outputs first, into buffers the caller owns;
- the positions `last` are computed once per batch (last_token_index) and passed to both passes (the
  readable forward computes them and keeps them in its cache);
- the backward scatters into a (b, t, C) buffer that is zeroed first, or, with accumulate=True, adds
  into what it holds (how the fine-tuning step adds a classifier's gradient to the LM head's).
CUDA: CuPy's fancy indexing (one distinct row per sequence, so no atomic adds are needed).
"""

from __future__ import annotations

from ..backend import get_array_module


def last_token_index(last, idx, pad_id: int) -> None:
    """last (b,) = the position of each row's rightmost token of idx (b, t) that is not pad_id (0 if none)."""
    xp = get_array_module(idx)
    t = xp.arange(idx.shape[1])  # (t,)
    last[...] = (t * (idx != pad_id)).argmax(axis=1)  # (b, t) -> (b,); argmax returns the first maximum


def last_token_forward(out, x, last) -> None:
    """out (b, C) = x (b, t, C) at row last[i] (b,) of each sequence i."""
    xp = get_array_module(x)
    out[...] = x[xp.arange(x.shape[0]), last]  # (b, t, C) -> (b, C)


def last_token_backward(dx, dh, last, accumulate: bool = False) -> None:
    """dx (b, t, C): dh (b, C) scattered into row last[i] of each sequence, 0 elsewhere; with accumulate
    the rows are added into what dx holds.

    Differentiates  `h[i] = x[i, last[i]]`  (layers/last_token.py): a gather's gradient is a scatter."""
    xp = get_array_module(dx)
    rows = xp.arange(dx.shape[0])
    if accumulate:
        dx[rows, last] += dh  # the rows are distinct: no repeated index to lose an add to
    else:
        dx[...] = 0
        dx[rows, last] = dh
