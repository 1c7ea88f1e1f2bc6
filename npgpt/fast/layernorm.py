"""Fast LayerNorm over the last axis: rows split over the CPU threads, statistics kept per row.

Glossary: n = rows (B*T), C = channels.
    mean = x.mean(-1);  rstd = 1 / sqrt(((x - mean)^2).mean(-1) + eps);  out = (x - mean) * rstd * weight + bias

Readable twin: npgpt.layers.layernorm (layernorm_forward / layernorm_backward). Differences:
- saved state: the readable cache keeps xhat (n, C); this keeps only mean and rstd (n,) each and the
  backward recomputes xhat from x (the caller keeps x, the block's input, anyway);
- outputs first, into buffers the caller owns; dweight and dbias are added into (each thread sums its
  rows, then the partial sums are added), so the caller zeroes them once per backward;
- threads: contiguous row ranges, one per thread (`threads`);
- 16-bit compute (precision.py): x, out, dout and dx may be 16-bit while mean, rstd, the weights and
  their gradients are float32; the arithmetic then runs on float32 copies of each thread's rows, and
  the result is rounded to 16 bits once. The dtype of mean/rstd is the arithmetic's dtype.
CUDA kernel: kernels/layernorm.cu, npgpt.cuda.kernels.layernorm_forward / layernorm_backward (same
arguments, no threads; float32 x, or bfloat16/float16 x with the same float32 arithmetic and one rounding).
"""

from __future__ import annotations

import numpy as np

from ..backend import get_array_module
from .common import in_threads, rowdot


def layernorm_forward(out, mean, rstd, x, weight, bias, eps: float, *, threads: int = 1) -> None:
    """out (n, C) = (x - mean) * rstd * weight + bias over the last axis; stores mean, rstd (n,) for the
    backward. x: (n, C); weight, bias: (C,)."""
    xp = get_array_module(x)
    C = x.shape[-1]
    upcast = x.dtype != mean.dtype

    def rows(lo, hi, _worker):
        xs, o, m, r = x[lo:hi], out[lo:hi], mean[lo:hi], rstd[lo:hi]
        if upcast:
            xs = xs.astype(mean.dtype)
            o = xp.empty_like(xs)
        xs.mean(axis=-1, out=m)
        xp.subtract(xs, m[:, None], out=o)  # xc
        var = rowdot(o, o) / C
        xp.sqrt(var + eps, out=r)
        xp.divide(1.0, r, out=r)
        o *= r[:, None]  # xhat
        o *= weight
        o += bias
        if upcast:
            out[lo:hi] = o  # rounded to 16 bits once

    in_threads(x.shape[0], rows, threads, elements=x.size)


def layernorm_backward(dx, dweight, dbias, dout, x, mean, rstd, weight, *, scratch=None, threads: int = 1) -> None:
    """dx (n, C) = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dout * weight;
    dweight += sum_n dout * xhat, dbias += sum_n dout (added into). xhat = (x - mean) * rstd is
    recomputed from x. dx may be dout itself. scratch: (n, C) in mean's dtype for xhat (allocated when
    None; unused with 16-bit x). Derivation: layers/layernorm.py and docs/backprop.md#layernorm."""
    xp = get_array_module(dout)
    C = x.shape[-1]
    partial = [None] * max(threads, 1)
    upcast = x.dtype != mean.dtype
    if scratch is None and not upcast:
        scratch = xp.empty(x.shape, dtype=mean.dtype)

    def rows(lo, hi, worker):
        d, g, r = dout[lo:hi], dx[lo:hi], rstd[lo:hi]
        if upcast:
            d = d.astype(mean.dtype)
            xhat, g = xp.empty_like(d), xp.empty_like(d)
        else:
            xhat = scratch[lo:hi]
        xp.subtract(x[lo:hi], mean[lo:hi, None], out=xhat)
        xhat *= r[:, None]
        col_db = d.sum(axis=0)
        col_dw = xp.einsum("ij,ij->j", d, xhat) if xp is np else (d * xhat).sum(axis=0)  # column sums
        partial[worker] = (col_dw, col_db)
        xp.multiply(d, weight, out=g)  # g
        g_mean = g.mean(axis=-1)
        gx_mean = rowdot(g, xhat) / C
        g -= g_mean[:, None]
        xhat *= gx_mean[:, None]
        g -= xhat
        g *= r[:, None]
        if upcast:
            dx[lo:hi] = g

    in_threads(x.shape[0], rows, threads, elements=x.size)
    for part in partial:
        if part is not None:
            dweight += part[0]
            dbias += part[1]
