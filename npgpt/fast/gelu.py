"""Fast GELU (GPT-2's tanh approximation) with the preceding bias add fused in, in cache-sized row blocks.

Glossary: n = rows (B*T), H = width (4C in GPT-2's MLP).
    u = sqrt(2/pi) (x + 0.044715 x^3);  gelu(x) = 0.5 x (1 + tanh(u))

Readable twin: npgpt.layers.gelu (gelu_forward / gelu_backward). Differences:
- the forward takes the bias of the linear layer before it (c_fc's) and adds it in place, so `x`
  becomes the pre-activation that both twins keep for the backward (the readable cache keeps x too);
- outputs first; the backward works in place: d holds dout on entry and dx on exit;
- row blocks of `scratch`'s height (ROW_BLOCK on the CPU, so the temporaries stay in cache;
  GPU_ROW_BLOCK on a GPU, where blocks only bound the temporaries); each thread takes a contiguous
  share of the rows and its own scratch[worker];
- 16-bit compute (precision.py): each block is worked on in a float32 copy and rounded once;
- gelu_forward_keep_grad / gelu_backward_saved_: a second pair for the fast step on the CPU. The
  forward also computes the derivative gelu'(x) and leaves it where the pre-activation was (the
  buffer the backward would read anyway), so the backward is one multiply. The exponential is the
  costly part of GELU in NumPy (tanh and exp take 10-20 times a multiply per element), and this way
  there is one per element for forward and backward together, through exp rather than tanh:
      0.5 (1 + tanh(u)) = sigmoid(2u) = 1 / (1 + exp(-2u)) =: g
      gelu(x) = x g,   gelu'(x) = g (1 + 2 s x (1 + 3 a x^2) (1 - g))
  (the readable derivative with 1 + th = 2g and 1 - th^2 = 4 g (1 - g)). The pre-activation is not
  kept, so a step that recomputes GELU's output in the backward (recompute="mlp") uses the first pair.
CUDA kernel: kernels/gelu.cu, npgpt.cuda.kernels.gelu_forward / gelu_backward_ (same arguments, no
scratch or threads; float32, or bfloat16/float16 with the same float32 arithmetic and one rounding).
"""

from __future__ import annotations

import numpy as np

from ..backend import get_array_module
from ..layers.gelu import GELU_CUBIC, GELU_SCALE
from ..precision import is_low_precision
from .common import in_threads

ROW_BLOCK = 32  # rows of the (n, H) activations worked on together on the CPU
GPU_ROW_BLOCK = 2048  # on a GPU a block only bounds the temporaries: small ones would mean thousands of launches


def gelu_scratch(xp, threads: int, rows: int, width: int, x_dtype, dtype=None):
    """Scratch for `threads` threads working on blocks of `rows` rows of width `width`: two blocks each,
    four with 16-bit x (the float32 copies of x and d). dtype: the arithmetic's (default: x's, float32
    for 16-bit x)."""
    low = is_low_precision(x_dtype)
    dtype = dtype or (np.float32 if low else x_dtype)
    return xp.empty((threads, rows, (4 if low else 2) * width), dtype=dtype)


def _scratch_for(x, scratch, threads):
    if scratch is not None:
        return scratch
    xp = get_array_module(x)
    return gelu_scratch(xp, max(threads, 1), min(x.shape[0], ROW_BLOCK if xp is np else GPU_ROW_BLOCK) or 1, x.shape[1], x.dtype)


def gelu_forward(out, x, bias=None, *, scratch=None, threads: int = 1) -> None:
    """x (n, H) += bias (H,) in place when given (x then holds the pre-activation); out (n, H) = gelu(x).
    scratch: gelu_scratch(...) (allocated when None)."""
    scratch = _scratch_for(x, scratch, threads)
    in_threads(x.shape[0], lambda lo, hi, w: _forward_rows(out[lo:hi], x[lo:hi], bias, scratch[w]), threads, elements=x.size)


def _forward_rows(out, x, bias, scratch):
    xp = get_array_module(x)
    (n, width), block = x.shape, scratch.shape[0]
    for i in range(0, n, block):
        xb, ob = x[i : i + block], out[i : i + block]
        if bias is not None:
            xb += bias  # the pre-activation, kept (in x) for the backward
        u = scratch[: xb.shape[0], :width]
        if xb.dtype != scratch.dtype:  # 16-bit: compute on a float32 copy, round once at the end
            x32 = scratch[: xb.shape[0], 2 * width : 3 * width]
            x32[...] = xb
            xb = x32
        xp.multiply(xb, xb, out=u)
        u *= GELU_CUBIC
        u += 1.0
        u *= xb
        u *= GELU_SCALE  # s (x + a x^3)
        xp.tanh(u, out=u)
        u += 1.0
        if ob.dtype == u.dtype:
            xp.multiply(xb, u, out=ob)
            ob *= 0.5
        else:
            u *= xb
            u *= 0.5
            ob[...] = u


def gelu_backward_(d, x, *, scratch=None, threads: int = 1) -> None:
    """d (n, H) *= gelu'(x), in place (dout in, dx out); x is the pre-activation (bias included).

    Differentiates  `out = 0.5 x (1 + tanh(u))`,  u = s (x + a x^3)  (see layers/gelu.py):
        gelu'(x) = 0.5 (1 + th) + 0.5 s x (1 + 3 a x^2) (1 - th^2),  th = tanh(u)."""
    scratch = _scratch_for(x, scratch, threads)
    in_threads(x.shape[0], lambda lo, hi, w: _backward_rows(d[lo:hi], x[lo:hi], scratch[w]), threads, elements=x.size)


def _backward_rows(d, x, scratch):
    xp = get_array_module(d)
    (n, width), block = x.shape, scratch.shape[0]
    for i in range(0, n, block):
        xb, db = x[i : i + block], d[i : i + block]
        rows = xb.shape[0]
        x2, th = scratch[:rows, :width], scratch[:rows, width : 2 * width]
        d16 = None
        if xb.dtype != scratch.dtype:  # 16-bit: compute on float32 copies, round once at the end
            x32, d32 = scratch[:rows, 2 * width : 3 * width], scratch[:rows, 3 * width : 4 * width]
            x32[...] = xb
            d32[...] = db
            xb, d16, db = x32, db, d32
        xp.multiply(xb, xb, out=x2)  # x^2
        xp.multiply(x2, GELU_CUBIC, out=th)
        th += 1.0
        th *= xb
        th *= GELU_SCALE
        xp.tanh(th, out=th)  # th
        x2 *= 3.0 * GELU_CUBIC
        x2 += 1.0
        x2 *= xb
        x2 *= 0.5 * GELU_SCALE  # 0.5 s x (1 + 3 a x^2)
        # local = (1 + th) (0.5 + x2 (1 - th)), since 1 - th^2 = (1 - th)(1 + th)
        th += 1.0
        db *= th  # d (1 + th)
        th -= 2.0
        th *= x2  # -x2 (1 - th)
        th -= 0.5
        db *= th  # d (1 + th) (-0.5 - x2 (1 - th))
        xp.negative(db, out=db)
        if d16 is not None:
            d16[...] = db


def gelu_forward_keep_grad(out, x, bias=None, *, scratch=None, threads: int = 1) -> None:
    """x (n, H) += bias (H,) when given; out (n, H) = gelu(x); then x (n, H) = gelu'(x), the local
    derivative gelu_backward_saved_ multiplies by (the pre-activation is overwritten). Float32 and
    float64 only. scratch: gelu_scratch(...) (allocated when None)."""
    if is_low_precision(x.dtype):
        raise ValueError("gelu_forward_keep_grad works in float32/float64; 16-bit x uses gelu_forward")
    scratch = _scratch_for(x, scratch, threads)
    with np.errstate(over="ignore", under="ignore"):  # exp(-2u) is inf below x = -10 (g = 0 exactly), 0 far above
        in_threads(x.shape[0], lambda lo, hi, w: _forward_grad_rows(out[lo:hi], x[lo:hi], bias, scratch[w]), threads,
                   elements=x.size)  # fmt: skip


def _forward_grad_rows(out, x, bias, scratch):
    xp = get_array_module(x)
    (n, width), block = x.shape, scratch.shape[0]
    s, a = GELU_SCALE, GELU_CUBIC
    for i in range(0, n, block):
        xb, ob = x[i : i + block], out[i : i + block]
        if bias is not None:
            xb += bias  # the pre-activation
        x2, g = scratch[: xb.shape[0], :width], scratch[: xb.shape[0], width : 2 * width]
        xp.multiply(xb, xb, out=x2)  # x^2
        xp.multiply(x2, -2.0 * s * a, out=g)
        g -= 2.0 * s
        g *= xb  # -2u = -2 s (x + a x^3)
        xp.exp(g, out=g)
        g += 1.0
        xp.divide(1.0, g, out=g)  # g = sigmoid(2u) = 0.5 (1 + tanh u)
        xp.multiply(xb, g, out=ob)  # gelu(x) = x g
        x2 *= 6.0 * s * a
        x2 += 2.0 * s
        x2 *= xb  # 2 s x (1 + 3 a x^2)
        xp.subtract(1.0, g, out=xb)  # 1 - g (x itself is no longer needed)
        xb *= x2
        xb += 1.0
        xb *= g  # gelu'(x) = g (1 + 2 s x (1 + 3 a x^2) (1 - g))


def gelu_backward_saved_(d, dgelu, *, threads: int = 1) -> None:
    """d (n, H) *= dgelu (n, H), in place: the backward of gelu_forward_keep_grad, whose dgelu = gelu'(x)."""
    xp = get_array_module(d)
    in_threads(d.shape[0], lambda lo, hi, _w: xp.multiply(d[lo:hi], dgelu[lo:hi], out=d[lo:hi]), threads, elements=d.size)
