"""Embedding lookup: row `ids[b, t]` of a table.

Glossary: B=batch, T=time, C=channels, V=vocab (rows of the table).
Derivation: docs/backprop.md#embedding.
"""

from __future__ import annotations

from typing import NamedTuple

from ..backend import get_array_module, scatter_add


class EmbeddingCache(NamedTuple):
    ids: object  # (B, T) integer ids that were looked up
    vocab_size: int  # V, rows of the table (to size dweight)


def embedding_forward(ids, weight):
    """out[b, t] = weight[ids[b, t]].

    ids: integer array of any shape, usually (B, T); weight: (V, C).
    Returns out: ids.shape + (C,), e.g. (B, T, C), and the cache.
    """
    xp = get_array_module(weight)
    ids = xp.asarray(ids)
    if ids.dtype.kind not in "iu":
        raise ValueError(f"embedding ids must be integers, got dtype {ids.dtype}; cast with .astype(np.int64)")
    V = weight.shape[0]
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= V):
        raise ValueError(
            f"embedding ids must lie in [0, {V}) but range over [{int(ids.min())}, {int(ids.max())}]; "
            "check the tokenizer's vocabulary against the model's vocab_size"
        )
    out = weight[ids]  # (B, T) -> (B, T, C)
    return out, EmbeddingCache(ids, V)


def embedding_backward(dout, cache: EmbeddingCache):
    """Gradient of the table.

    Differentiates  `out = weight[ids]`:  each output row is a copy of one table row, so the
    table row v receives the sum of dout over every position where ids == v (a repeated id
    accumulates; an id never seen gets zero).
    dout: ids.shape + (C,). Returns dweight: (V, C).
    """
    xp = get_array_module(dout)
    C = dout.shape[-1]
    dweight = xp.zeros((cache.vocab_size, C), dtype=dout.dtype)  # (V, C)
    scatter_add(dweight, cache.ids.reshape(-1), dout.reshape(-1, C))  # (B*T,) rows of (B*T, C)
    return dweight
