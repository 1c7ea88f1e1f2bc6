"""Which implementation runs each op whose implementation varies: chosen once, when an engine is built.

Each op is bound either to the NumPy/CuPy fast op of npgpt/fast/ (with the engine's CPU threads and
scratch as keyword resources) or, on a GPU, to a hand-written CUDA kernel of kernels/ (opt-in through
NPGPT_CUDA_KERNELS) with the same positional arguments; at 16 bits (--precision bf16|fp16) the
LayerNorm, GELU, loss and attention-softmax kernels are their bf16/fp16 instantiations (resolve_kernels
says which apply). Both fast engines (GPT's and the encoder-decoder's) take their LayerNorm, GELU and loss from
here; GPT's attention paths (attention.py) also take attention's products (`heads_matmul`) and the
flash kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import numpy as np

from .. import fast
from ..backend import get_array_module
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
    # The fused softmax path (attention.FusedSoftmaxAttention), or None: its products, every one a cuBLAS
    # strided-batched GEMM on a GPU (cuda/blas.py), and its kernels (kernels/attention_softmax.cu).
    batched_matmul: Callable | None = None  # (out, a, b)
    softmax_forward: Callable | None = None  # (att, dropped, scale, p, seed, layer)
    softmax_backward: Callable | None = None  # (datt, att, scale, p, seed, layer)
    softmax_dropout: Callable | None = None  # (dropped, att, p, seed, layer)


def resolve_kernels(kernels, xp, precision: str, dtype, head_size: int) -> set:
    """The CUDA kernels to use for activations of `dtype`: `kernels`, or by default those
    $NPGPT_CUDA_KERNELS enables on a GPU (none on the CPU; given NumPy arrays the kernels run in
    npgpt.cuda.emulate, which is how the tests check this path), less those that do not take `dtype`
    (npgpt.cuda.kernels.KERNEL_DTYPES): at 16 bits (precision bf16/fp16) LayerNorm, GELU, the loss,
    AdamW (which then also writes the 16-bit weights), the gradient norm and attention's fused softmax
    have 16-bit kernels, and attention's flash kernel is float32-only; at float64 only "bmm" (cuBLAS)
    remains. Naming a kernel explicitly for a dtype it does not take is a ValueError."""
    from ..cuda import enabled_kernels

    names = (enabled_kernels() if xp is not np else set()) if kernels is None else set(kernels)
    if not names:
        return names
    from ..cuda.kernels import KERNEL_DTYPES  # not imported by a step that uses no kernel (the CPU's)

    dtype = np.dtype(dtype)
    unfit = {k for k in names if dtype.name not in KERNEL_DTYPES.get(k, ("float32",))}
    if unfit and kernels is not None:
        what = f"precision {precision!r} ({dtype.name})" if is_low_precision(dtype) else f"dtype {dtype.name}"
        detail = ", ".join(f"{k} ({'/'.join(KERNEL_DTYPES.get(k, ('float32',)))} only)" for k in sorted(unfit))
        takes = ", ".join(sorted(k for k in KERNEL_DTYPES if dtype.name in KERNEL_DTYPES[k]))
        raise ValueError(f"{what} cannot use the CUDA kernel(s) {detail}; name only kernels that take {dtype.name}: {takes}")
    names -= unfit
    if "attention" in names:
        from ..cuda.kernels import ATTENTION_HEAD_SIZES

        if head_size not in ATTENTION_HEAD_SIZES:
            names.discard("attention")  # the flash kernel needs hs in 16..128, a multiple of 16
    return names


def choose_ops(kernels: set, xp, threads: int, gelu_scratch, loss_rows: int) -> Ops:
    """Bind each op to its CUDA kernel when `kernels` names it, else to the NumPy/CuPy fast op with this
    step's threads and scratch. Attention's products on a GPU: every one through cuBLAS's strided-batched
    GEMM with "bmm", else only those that CuPy's own N-D matmul gets wrong (16-bit, and float32 with TF32
    on: cuda/blas.py, matmul_where_needed). "attention_softmax": the fused softmax path's kernels, and
    its products through cuBLAS always (batched_matmul)."""
    ck = None
    if kernels - {"bmm"}:
        from ..cuda import kernels as ck
    heads_matmul = batched_matmul = fast.matmul
    if xp is not np:
        from ..cuda import blas

        heads_matmul = blas.matmul if "bmm" in kernels else blas.matmul_where_needed
        batched_matmul = blas.matmul
    fused = "attention_softmax" in kernels

    def pick(name, kernel, fallback):  # the wrapper called `kernel` in npgpt.cuda.kernels, or the fast op
        return getattr(ck, kernel) if name in kernels else fallback

    return Ops(
        layernorm_forward=pick("layernorm", "layernorm_forward", partial(fast.layernorm_forward, threads=threads)),
        layernorm_backward=pick("layernorm", "layernorm_backward", partial(fast.layernorm_backward, threads=threads)),
        gelu_forward=pick("gelu", "gelu_forward", partial(fast.gelu_forward, scratch=gelu_scratch, threads=threads)),
        gelu_backward_=pick("gelu", "gelu_backward_", partial(fast.gelu_backward_, scratch=gelu_scratch, threads=threads)),
        cross_entropy_=_on_contiguous_rows(ck.cross_entropy_) if "cross_entropy" in kernels else
                       partial(fast.cross_entropy_, threads=threads, block=loss_rows, sync=False),
        heads_matmul=heads_matmul,
        flash_forward=pick("attention", "flash_attention_forward", None),
        flash_backward=pick("attention", "flash_attention_backward", None),
        batched_matmul=batched_matmul if fused else None,
        softmax_forward=pick("attention_softmax", "attention_softmax_forward_", None),
        softmax_backward=pick("attention_softmax", "attention_softmax_backward_", None),
        softmax_dropout=pick("attention_softmax", "attention_dropout_", None),
    )  # fmt: skip


def _on_contiguous_rows(kernel):
    """The loss kernel reads rows V elements apart. The engine's own loss hands it the padded head's whole
    (n, Vp) rows (contiguous); a caller's loss on `engine.logits`, the (n, V) view of those rows
    (fine-tuning's LM term), goes through a contiguous copy, and the gradient is copied back."""

    def cross_entropy_(logits, targets, *args, **kwargs):
        if logits.flags.c_contiguous:
            return kernel(logits, targets, *args, **kwargs)
        rows = get_array_module(logits).ascontiguousarray(logits)
        loss = kernel(rows, targets, *args, **kwargs)
        logits[...] = rows
        return loss

    return cross_entropy_
