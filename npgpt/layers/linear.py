"""Affine layer  out = x @ weight + bias, with GPT-2's (C_in, C_out) weight layout.

Glossary: B=batch, T=time, C_in/C_out=channels in/out, N=B*T rows.
Hugging Face stores GPT-2's projections as Conv1D, weight (C_in, C_out), so no transpose is
needed here. The leading axes are flattened to one, so every product is a single 2-D GEMM.
Derivation: docs/backprop.md#linear.
"""

from __future__ import annotations

from typing import NamedTuple


class LinearCache(NamedTuple):
    x: object  # (..., C_in) the input, needed for dweight
    weight: object  # (C_in, C_out), needed for dx
    has_bias: bool


def linear_forward(x, weight, bias=None):
    """x: (..., C_in), weight: (C_in, C_out), bias: (C_out,) or None -> out: (..., C_out)."""
    if x.shape[-1] != weight.shape[0]:
        raise ValueError(
            f"linear: x has {x.shape[-1]} input channels but weight is {tuple(weight.shape)}; "
            "weight must be laid out (C_in, C_out)"
        )
    lead = x.shape[:-1]
    out = x.reshape(-1, x.shape[-1]) @ weight  # (N, C_in) @ (C_in, C_out) -> (N, C_out)
    if bias is not None:
        out += bias  # (N, C_out) + (C_out,)
    out = out.reshape(*lead, weight.shape[1])  # (N, C_out) -> (..., C_out)
    return out, LinearCache(x, weight, bias is not None)


def linear_backward(dout, cache: LinearCache, weight_grad=True):
    """Gradients of x, weight and bias.

    Differentiates  `out = x @ weight + bias`.  Row by row out[n, j] = sum_i x[n, i] w[i, j] + b[j], so
    dx[n, i] = sum_j dout[n, j] w[i, j]  (dx = dout @ w.T),  dw[i, j] = sum_n x[n, i] dout[n, j]
    (dw = x.T @ dout),  and db[j] = sum_n dout[n, j].
    dout: (..., C_out). Returns (dx (..., C_in), dweight (C_in, C_out), dbias (C_out,) or None).
    weight_grad=False (a frozen layer): dx only, dweight and dbias are None and the x.T @ dout GEMM is skipped.
    """
    x, weight, has_bias = cache
    C_in, C_out = weight.shape
    dout2 = dout.reshape(-1, C_out)  # (..., C_out) -> (N, C_out)
    x2 = x.reshape(-1, C_in)  # (..., C_in) -> (N, C_in)
    dx = (dout2 @ weight.T).reshape(x.shape)  # (N, C_out) @ (C_out, C_in) -> (..., C_in)
    if not weight_grad:
        return dx, None, None
    dweight = x2.T @ dout2  # (C_in, N) @ (N, C_out) -> (C_in, C_out)
    dbias = dout2.sum(axis=0) if has_bias else None  # (N, C_out) -> (C_out,)
    return dx, dweight, dbias
