"""Fast sinusoidal positional encoding: the fixed table made once, then added in place.

Glossary: B=batch, T=time, C=channels (even), L = the longest sequence the caller plans for.
    PE[pos, 2i] = sin(pos / 10000^(2i/C));  PE[pos, 2i+1] = cos(pos / 10000^(2i/C));  x += PE[start : start+T]

Readable twin: npgpt.layers.sinusoidal (sinusoidal_forward / sinusoidal_backward). Differences:
- the table is made once for L positions in the compute dtype (`sinusoidal_table_into`, from the
  readable layer's float64 table, so both add the same rounded numbers) and kept by the caller;
  the readable forward fetches it from a cache on every call and returns a new array;
- in place: x (b, t, C) becomes x + PE[start : start + t];
- the backward is the identity (PE is a constant: dx = dout), so there is no backward function: the
  fast step passes the gradient on untouched, and nothing is saved for it.
CUDA: a CuPy elementwise add; no kernel of ours.
"""

from __future__ import annotations

from ..backend import get_array_module
from ..layers.sinusoidal import sinusoidal_table


def sinusoidal_table_into(table) -> None:
    """table (L, C) <- PE[0:L], computed in float64 and rounded once to table's dtype."""
    L, C = table.shape
    table[...] = sinusoidal_table(L, C, get_array_module(table), table.dtype)


def add_sinusoidal_(x, table, start: int = 0) -> None:
    """x (b, t, C) += table[start : start + t] (positions start .. start+t-1, broadcast over the batch)."""
    t = x.shape[-2]
    if start + t > table.shape[0]:
        raise ValueError(f"positions {start}..{start + t - 1} are beyond the {table.shape[0]} rows of the sinusoidal table")
    x += table[start : start + t]  # (t, C) broadcast over the batch

