"""Fast embedding lookups: token rows by id, and positions 0..t-1 added in place.

Glossary: B=batch, T=time, C=channels, V=vocab, n=B*T rows.

Readable twin: npgpt.layers.embedding (embedding_forward / embedding_backward), which GPT.forward calls
twice, for the tokens and for the positions, and then adds the two. Differences:
- outputs first, into buffers the caller owns; rows are 2-D (n, C);
- positions need no ids: `add_position_embedding_` adds rows 0..t-1 of the table to every sequence, and
  its backward sums the gradient over the batch into those rows;
- no cache: the backward is given the ids again;
- 16-bit compute (precision.py): the lookup reads the 16-bit copy of the table; the gradients are
  float32 (dout is converted before it is added in, and the batch sum is taken in float32).
CUDA: CuPy's take and cupyx.scatter_add (atomic adds, so the order of a repeated id's sums varies).
"""

from __future__ import annotations

from ..backend import get_array_module, scatter_add


def embedding_forward(out, ids, weight) -> None:
    """out (n, C) = weight[ids] for ids (n,) and weight (V, C)."""
    get_array_module(out).take(weight, ids, axis=0, out=out)  # (n,) -> (n, C)


def embedding_backward(dweight, dout, ids) -> None:
    """dweight (V, C) += dout (n, C) row by row at ids (n,): added into, a repeated id accumulates.

    Differentiates  `out = weight[ids]`  (see layers/embedding.py): each output row is a copy of one
    table row, so that row receives the sum of dout over the positions where it was looked up."""
    scatter_add(dweight, ids, dout.astype(dweight.dtype, copy=False))


def add_position_embedding_(x, weight) -> None:
    """x (b, t, C) += weight[:t]: position j's row (weight is (context_length, C)) added to every sequence."""
    x += weight[: x.shape[1]]  # (t, C) broadcast over the batch


def position_embedding_backward(dweight, dx) -> None:
    """dweight[:t] += the sum over the batch of dx (b, t, C): the positions were broadcast over it.

    Differentiates  `x = tok + weight[:t]`:  the shortcut passes dx unchanged to the position rows."""
    dweight[: dx.shape[1]] += dx.sum(axis=0, dtype=dweight.dtype)  # (b, t, C) -> (t, C)
