"""Fast ReLU with the preceding bias add fused in, in place, in cache-sized row blocks over the CPU threads.

Glossary: n = rows (B*T), F = width (d_ff in the feed-forward network).
    relu(x) = max(x, 0);  relu'(x) = 1 where x > 0, else 0

Readable twin: npgpt.layers.relu (relu_forward / relu_backward). Differences:
- saved state: the readable cache keeps the boolean mask x > 0; this keeps nothing of its own. The
  backward reads the sign of the output instead (relu(x) > 0 exactly where x > 0), and the output is
  kept anyway as the next linear layer's input, so `out` may be `x` itself and the feed-forward
  network needs one (n, F) buffer, not three;
- the forward takes the bias of the linear layer before it and adds it in place (as fast/gelu.py);
- outputs first; the backward works in place: d holds dout on entry and dx on exit;
- row blocks of ROW_BLOCK rows (fast/gelu.py's), so the bias add and the max run on a block while it
  is in cache; each thread takes a contiguous share of the rows;
- 16-bit compute: max(x, 0) and the sign test are exact in every dtype, so nothing is converted.
CUDA: CuPy elementwise ops; no kernel of ours.
"""

from __future__ import annotations

import numpy as np

from ..backend import get_array_module
from .common import in_threads
from .gelu import GPU_ROW_BLOCK, ROW_BLOCK


def _block(x) -> int:
    return ROW_BLOCK if get_array_module(x) is np else GPU_ROW_BLOCK


def relu_forward(out, x, bias=None, *, threads: int = 1) -> None:
    """x (n, F) += bias (F,) in place when given; out (n, F) = max(x, 0). out may be x."""
    block = _block(x)

    def rows(lo, hi, _worker):
        xp = get_array_module(x)
        for i in range(lo, hi, block):
            j = min(i + block, hi)
            if bias is not None:
                x[i:j] += bias  # the pre-activation
            xp.maximum(x[i:j], 0, out=out[i:j])

    in_threads(x.shape[0], rows, threads)


def relu_backward_(d, y, *, threads: int = 1) -> None:
    """d (n, F) *= (y > 0), in place (dout in, dx out). y: the forward's x or its output: both are
    positive at the same places. (y may also be the output after an in-place dropout, when d has
    already been through that dropout's backward: where the dropout zeroed y it zeroed d too.)

    Differentiates  `out = max(x, 0)`:  the slope is 1 where x > 0 and 0 elsewhere (0 at x = 0 exactly,
    as PyTorch and layers/relu.py take it)."""
    block = _block(d)

    def rows(lo, hi, _worker):
        xp = get_array_module(d)
        for i in range(lo, hi, block):
            j = min(i + block, hi)
            xp.multiply(d[i:j], y[i:j] > 0, out=d[i:j])

    in_threads(d.shape[0], rows, threads)
