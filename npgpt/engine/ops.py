"""Which implementation runs each op whose implementation varies: chosen once, when an engine is built.

Each op is bound either to the NumPy/CuPy fast op of npgpt/fast/ (with the engine's CPU threads and
scratch as keyword resources) or, on a GPU, to a hand-written CUDA kernel of kernels/ (opt-in through
NPGPT_CUDA_KERNELS) with the same positional arguments. Both fast engines (GPT's and the
encoder-decoder's) take their LayerNorm, GELU and loss from here; GPT's attention paths
(attention.py) also take attention's products (`heads_matmul`) and the flash kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import numpy as np

from .. import fast
from ..precision import is_low_precision



@dataclass(frozen=True)
class Ops:
    """The implementation of each op whose implementation varies, chosen once (choose_ops). Each takes
    the positional arguments of its fast op in npgpt/fast/."""

    layernorm_forward: Callable  # (out, mean, rstd, x, weight, bias, eps)
    layernorm_backward: Callable  # (dx, dweight, dbias, dout, x, mean, rstd, weight, scratch=)
    gelu_forward: Callable  # (out, x, bias)
    gelu_backward_: Callable  # (d, x)
    cross_entropy_: Callable  # (logits, targets, want_grad, dloss, n_valid=) -> loss (on a GPU a 0-d device array)
    heads_matmul: Callable  # (out, a, b): attention's products over stacks of heads
    flash_forward: Callable | None  # (y, heads, lse, qkv, head_out=): attention without dropout, or None
    flash_backward: Callable | None  # (dqkv, dy, heads, lse, y, dheads=, head_out=)


def resolve_kernels(kernels, xp, precision: str, dtype, head_size: int) -> set:
    """The CUDA kernels to use for activations of `dtype`: `kernels`, or by default those
    $NPGPT_CUDA_KERNELS enables on a GPU (none on the CPU; given NumPy arrays the kernels run in
    npgpt.cuda.emulate, which is how the tests check this path). Our kernels are float32-only: for any
    other dtype (float64, or 16-bit precision) only "bmm" (cuBLAS, any float dtype) remains; naming
    another kernel explicitly for such a dtype is a ValueError."""
    from ..cuda import enabled_kernels

    names = (enabled_kernels() if xp is not np else set()) if kernels is None else set(kernels)
    if np.dtype(dtype) != np.float32:
        if kernels and set(kernels) - {"bmm"}:
            what = f"precision {precision!r}" if is_low_precision(dtype) else f"dtype {np.dtype(dtype).name}"
            raise ValueError(f"the CUDA kernels work in float32; {what} cannot use "
                             f"{sorted(set(kernels) - {'bmm'})} (only 'bmm')")  # fmt: skip
        names &= {"bmm"}
    if "attention" in names:
        from ..cuda.kernels import ATTENTION_HEAD_SIZES

        if head_size not in ATTENTION_HEAD_SIZES:
            names.discard("attention")  # the flash kernel needs hs in 16..128, a multiple of 16
    return names


def choose_ops(kernels: set, xp, threads: int, gelu_scratch, loss_rows: int) -> Ops:
    """Bind each op to its CUDA kernel when `kernels` names it, else to the NumPy/CuPy fast op with this
    step's threads and scratch. Attention's products on a GPU: every one through cuBLAS's strided-batched
    GEMM with "bmm", else only those that CuPy's own N-D matmul gets wrong (16-bit, and float32 with TF32
    on: cuda/blas.py, matmul_where_needed)."""
    ck = None
    if kernels - {"bmm"}:
        from ..cuda import kernels as ck
    heads_matmul = fast.matmul
    if xp is not np:
        from ..cuda import blas

        heads_matmul = blas.matmul if "bmm" in kernels else blas.matmul_where_needed

    def pick(name, kernel, fallback):  # the wrapper called `kernel` in npgpt.cuda.kernels, or the fast op
        return getattr(ck, kernel) if name in kernels else fallback

    return Ops(
        layernorm_forward=pick("layernorm", "layernorm_forward", partial(fast.layernorm_forward, threads=threads)),
        layernorm_backward=pick("layernorm", "layernorm_backward", partial(fast.layernorm_backward, threads=threads)),
        gelu_forward=pick("gelu", "gelu_forward", partial(fast.gelu_forward, scratch=gelu_scratch, threads=threads)),
        gelu_backward_=pick("gelu", "gelu_backward_", partial(fast.gelu_backward_, scratch=gelu_scratch, threads=threads)),
        cross_entropy_=pick("cross_entropy", "cross_entropy_",
                            partial(fast.cross_entropy_, threads=threads, block=loss_rows, sync=False)),
        heads_matmul=heads_matmul,
        flash_forward=pick("attention", "flash_attention_forward", None),
        flash_backward=pick("attention", "flash_attention_backward", None),
    )  # fmt: skip
