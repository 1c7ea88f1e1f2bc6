"""Fast softmax cross-entropy over the vocabulary, in place on the logits, block of rows by block.

Glossary: n = rows (B*T), V = vocab.
    loss = mean over the rows whose target is not ignore_index of (logsumexp(z[r]) - z[r, target[r]])
    dlogits[r] = dloss * (softmax(z[r]) - onehot(target[r])) / n_valid,  0 for ignored rows

Readable twin: npgpt.layers.cross_entropy (softmax_cross_entropy_forward / _backward). Differences:
- forward and backward in one pass, in place: the logits become the probabilities and then the
  gradient, so no second (n, V) array exists (the readable cache keeps the probabilities);
- dloss (the upstream gradient: 1/grad_accum, or the fp16 loss scale) is applied before any
  rounding; the loss is returned as a Python float (or, sync=False, left on the GPU);
- LOSS_ROWS rows at a time on the CPU, so a block (about 800 KB for GPT-2's vocabulary) stays in
  cache; each thread takes a contiguous share of the rows and the partial sums are added at the end;
- 16-bit logits are worked on in float32 copies of each block and the gradient is rounded once.
CUDA kernel: kernels/cross_entropy.cu, npgpt.cuda.kernels.cross_entropy_ (same arguments, no threads
or block; float32 logits, or bfloat16/float16 with the same float32 arithmetic and one rounding).
"""

from __future__ import annotations

import numpy as np

from ..backend import get_array_module
from ..precision import is_low_precision
from .common import in_threads

LOSS_ROWS = 4  # rows of the (n, V) logits worked on together on the CPU
GPU_LOSS_ROWS = 1024  # on a GPU a block only bounds the float32 temporaries
IGNORE_INDEX = -100  # as npgpt.layers.cross_entropy and PyTorch


def cross_entropy_(logits, targets, want_grad: bool = True, dloss: float = 1.0, ignore_index: int = IGNORE_INDEX, *,
                   n_valid: int | None = None, threads: int = 1, block: int = LOSS_ROWS, sync: bool = True) -> float:  # fmt: skip
    """Mean cross-entropy of the rows of `logits` (n, V) against `targets` (n,) over the rows whose
    target is not ignore_index; with want_grad the logits are overwritten by dloss * (softmax - onehot)
    / n_valid (zero rows where the target is ignored). n_valid: how many targets count, when the caller
    knows (it saves a pass over the targets, and on a GPU a wait for it). Returns the mean loss as a
    Python float; with sync=False on a GPU as a 0-d device array (no wait for the GPU).

    Differentiates  `loss = -mean_r (z[r, t_r] - logsumexp(z[r, :]))`:  d logsumexp / dz = softmax(z)
    (derivation in layers/cross_entropy.py and docs/backprop.md#cross-entropy)."""
    xp = get_array_module(logits)
    n = logits.shape[0]
    if n_valid is None:
        n_valid = int((targets != ignore_index).sum())
    if n_valid == 0:
        raise ValueError(f"cross-entropy: every target equals ignore_index={ignore_index}, so the mean is undefined")
    valid = None
    if n_valid < n:  # some rows are ignored: they point at class 0 and are masked out
        valid = targets != ignore_index
        targets = xp.where(valid, targets, 0)
    partial = [0.0] * max(threads, 1)
    rows_all = xp.arange(n)
    upcast = is_low_precision(logits.dtype)

    def rows(lo, hi, worker):
        total = 0.0
        for i in range(lo, hi, block):
            z16 = logits[i : min(i + block, hi)]  # (rows, V)
            z = z16.astype(np.float32) if upcast else z16
            r = z.shape[0]
            tgt = targets[i : i + r]
            z -= z.max(axis=-1, keepdims=True)
            target_z = z[rows_all[:r], tgt]  # shifted logit of the target
            xp.exp(z, out=z)
            s = z.sum(axis=-1)
            row_loss = xp.log(s) - target_z  # (rows,)
            if valid is not None:
                row_loss = xp.where(valid[i : i + r], row_loss, 0.0)
            total += row_loss.sum(dtype=np.float64)  # stays on the device until the end
            if want_grad:
                z /= s[:, None]  # probabilities
                z[rows_all[:r], tgt] -= 1.0
                z *= z.dtype.type(dloss / n_valid)
                if valid is not None:
                    z[~valid[i : i + r]] = 0.0
                if upcast:
                    z16[...] = z
        partial[worker] = total

    in_threads(n, rows, threads, elements=logits.size)
    total = sum(partial)  # on a GPU, a 0-d device array
    return float(total) / n_valid if sync else total / n_valid
