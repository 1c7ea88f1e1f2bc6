"""The hand-written CUDA kernels of the GPU fast path (kernels/*.cu) and what they need on the host.

- `npgpt.cuda.kernels`: CuPy wrappers with the contracts and positional arguments of the fast ops
  (npgpt/fast/) and npgpt.optim helpers they replace (CuPy is imported only when a wrapper is called).
- `npgpt.cuda.nvrtc`: NVRTC through ctypes, to compile the sources to PTX without CuPy or a GPU.
- `npgpt.cuda.blas`: attention's batched matrix products as one cuBLAS call each (no copies of
  transposed operands, TF32 honoured, 16-bit on tensor cores). The fast step always sends the products
  CuPy's own N-D matmul cannot do right through it (bfloat16 and float16, float32 with TF32 on); the
  "bmm" name below sends every other one (float32 without TF32, float64) through it too.
- `enabled_kernels()`: which kernels the fast path may use, from $NPGPT_CUDA_KERNELS.

A fast path is on by default only once benchmarks/gpu_check.sh has verified it on a real GPU (DEFAULT_ON;
none yet); the others are opt-in:
    NPGPT_CUDA_KERNELS=all                      every kernel
    NPGPT_CUDA_KERNELS=layernorm,gelu           a comma list of names from KERNEL_NAMES
    NPGPT_CUDA_KERNELS="" or none               none (the CuPy ops alone)
    unset                                       DEFAULT_ON
"""

from __future__ import annotations

import os

ENV_VAR = "NPGPT_CUDA_KERNELS"

# The names a caller checks with kernel_enabled(), and the source file each one lives in.
KERNEL_FILES = {
    "layernorm": "layernorm.cu",  # layernorm_forward, layernorm_backward
    "gelu": "gelu.cu",  # gelu_forward (bias add fused), gelu_backward_
    "cross_entropy": "cross_entropy.cu",  # cross_entropy_
    "adamw": "adamw.cu",  # adamw_flat_
    "sq_norm": "adamw.cu",  # sq_norm (the global gradient norm, squared)
    "attention": "attention.cu",  # flash_attention_forward/_backward over attention_fwd/_bwd (no dropout)
    # attention_softmax_forward_/_backward_, attention_dropout_: the fused softmax path (cuBLAS products,
    # Philox dropout); chosen over the flash kernel when both are on, except under --recompute attention|block
    "attention_softmax": "attention_softmax.cu",
}
# Fast paths that are not kernels of ours but are switched the same way.
LIBRARY_PATHS = {
    "bmm": "npgpt/cuda/blas.py",  # every attention GEMM through cublasGemmStridedBatchedEx (16-bit and TF32 always are)
}
KERNEL_NAMES = tuple(KERNEL_FILES) + tuple(LIBRARY_PATHS)
# On when $NPGPT_CUDA_KERNELS is unset: the names that benchmarks/gpu_check.sh's report lists as verified
# on a real GPU ("Fast paths"). Empty until one has run it (issue 13, section 3).
DEFAULT_ON: frozenset = frozenset()


def enabled_kernels(value: str | None = None) -> set[str]:
    """The kernel names enabled by `value` (default: $NPGPT_CUDA_KERNELS, or DEFAULT_ON when it is unset):
    a comma list of names from KERNEL_NAMES, "all", or empty / "none" for none. An unknown name is a
    ValueError (a typo must not silently leave a kernel off)."""
    if value is None:
        value = os.environ.get(ENV_VAR)
        if value is None:
            return set(DEFAULT_ON)
    names = {part.strip().lower() for part in value.split(",")} - {""}
    if not names or names == {"none"}:
        return set()
    if "all" in names:
        if names != {"all"}:
            raise ValueError(f"{ENV_VAR}={value!r}: 'all' cannot be combined with other names")
        return set(KERNEL_NAMES)
    unknown = sorted(names - set(KERNEL_NAMES))
    if unknown:
        raise ValueError(f"{ENV_VAR}={value!r}: unknown kernel name(s) {', '.join(unknown)}; "
                         f"use 'all', 'none' or a comma list of {', '.join(KERNEL_NAMES)}")  # fmt: skip
    return names


def kernel_enabled(name: str) -> bool:
    """True when $NPGPT_CUDA_KERNELS enables the kernel `name` (one of KERNEL_NAMES)."""
    if name not in KERNEL_NAMES:
        raise ValueError(f"unknown kernel {name!r}; known: {', '.join(KERNEL_NAMES)}")
    return name in enabled_kernels()
