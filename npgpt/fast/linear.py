"""Fast affine layer: out = x @ weight + bias as one 2-D GEMM into a preallocated buffer.

Glossary: n = rows (B*T), C_in / C_out = channels in / out.

Readable twin: npgpt.layers.linear (linear_forward / linear_backward). Differences:
- outputs first, into buffers the caller owns; x, out, dx are 2-D (n, C);
- no cache: the backward is given x and weight again (the caller keeps x as an activation);
- the gradients are written straight into the caller's buffers (in the fast step, views of its one
  flat gradient buffer), or added into them with accumulate=True (gradient accumulation);
- a weight gradient that is a transposed view (the tied output head: the (V, C) table used as a
  (C, V) weight) is computed in its buffer's own layout, dweight^T = dout^T @ x, so nothing is copied;
- 16-bit compute (precision.py): x, weight, out and dx are 16-bit and the products accumulate in
  float32 (common.matmul); the weight and bias gradients are float32, so the 16-bit weight product
  goes through `scratch` and is then copied or added into the float32 buffer;
- the bias gradient (a column sum) is a GEMV with a ones vector on the CPU (column_sums);
- a gradient that is not wanted is not computed: dweight None (a frozen layer, the readable
  weight_grad=False) skips the x^T @ dout GEMM, dbias None the bias sum, and dx None (nothing below
  the layer trains; the readable twin always returns dx) skips the dout @ weight^T GEMM.
CUDA: plain cuBLAS GEMMs (CuPy's matmul); no kernel of ours.
"""

from __future__ import annotations

import numpy as np

from ..backend import get_array_module
from .common import matmul


def linear_forward(out, x, weight, bias=None) -> None:
    """out (n, C_out) = x (n, C_in) @ weight (C_in, C_out) + bias (C_out,) (None: no bias)."""
    matmul(out, x, weight)  # (n, C_in) @ (C_in, C_out) -> (n, C_out)
    if bias is not None:
        out += bias


def linear_backward(dx, dweight, dbias, dout, x, weight, accumulate: bool = False, *, scratch=None) -> None:
    """dx (n, C_in) = dout @ weight^T;  dweight (C_in, C_out) = x^T @ dout;  dbias (C_out,) = sum_n dout.

    Differentiates  `out = x @ weight + bias`  (derivation in layers/linear.py). dweight and dbias are
    overwritten, or added into with accumulate=True; dbias None: the layer has no bias (or a frozen
    one). dweight None: the weight is frozen, its GEMM is skipped. dx None: no input gradient wanted.
    dout: (n, C_out). scratch: a 1-D buffer of x's dtype with at least dweight.size elements, used when
    accumulating or when dweight's dtype differs from x's (16-bit compute); allocated when needed."""
    if dx is not None:
        matmul(dx, dout, weight.T)  # (n, C_out) @ (C_out, C_in) -> (n, C_in)
    if dweight is not None:
        _weight_grad(dweight, dout, x, accumulate, scratch)
    if dbias is not None:
        total = column_sums(dout, dbias.dtype)  # (n, C_out) -> (C_out,)
        if accumulate:
            dbias += total
        else:
            dbias[...] = total


def column_sums(a, dtype):
    """a (n, C).sum(axis=0) in `dtype`. On the CPU, for a of that dtype, as ones (n,) @ a: a GEMV runs on
    BLAS's threads and is 2-3x NumPy's column sum at the model's shapes (docs/benchmarks.md)."""
    xp = get_array_module(a)
    if xp is np and a.dtype == dtype:
        return np.ones(a.shape[0], dtype=dtype) @ a  # (n,) @ (n, C) -> (C,)
    return a.sum(axis=0, dtype=dtype)


def _weight_grad(dweight, dout, x, accumulate: bool, scratch) -> None:
    """dweight (C_in, C_out) = x^T @ dout, written or added into (see linear_backward)."""
    a, b, target = x.T, dout, dweight  # (C_in, n) @ (n, C_out) -> (C_in, C_out)
    if not dweight.flags.c_contiguous and dweight.T.flags.c_contiguous:
        a, b, target = dout.T, x, dweight.T  # the buffer's own layout: (C_out, n) @ (n, C_in) -> (C_out, C_in)
    if not accumulate and target.dtype == x.dtype:
        get_array_module(target).matmul(a, b, out=target)
    else:
        if scratch is None:
            scratch = get_array_module(x).empty(target.size, dtype=x.dtype)
        product = scratch[: target.size].reshape(target.shape)
        matmul(product, a, b)
        if accumulate:
            target += product
        else:
            target[...] = product
