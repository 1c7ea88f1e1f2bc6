"""The hand-written CUDA kernels of the GPU fast path (kernels/*.cu) and what they need on the host.

- `npgpt.cuda.kernels`: CuPy wrappers with the contracts and positional arguments of the fast ops
  (npgpt/fast/) and npgpt.optim helpers they replace (CuPy is imported only when a wrapper is called).
- `npgpt.cuda.nvrtc`: NVRTC through ctypes, to compile the sources to PTX without CuPy or a GPU.
- `npgpt.cuda.blas`: attention's batched matrix products as one cuBLAS call each (no copies of
  transposed operands, TF32 honoured), the "bmm" name below.
- `enabled_kernels()`: which kernels the fast path may use, from $NPGPT_CUDA_KERNELS.

Every kernel is opt-in until its test (tests/test_cuda_kernels.py) has passed on a real GPU:
    NPGPT_CUDA_KERNELS=all                      every kernel
    NPGPT_CUDA_KERNELS=layernorm,gelu           a comma list of names from KERNEL_NAMES
    unset, "", "none"                           none (the default: the CuPy reference path)
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
}
# Fast paths that are not kernels of ours but are switched the same way, opt-in until run on a GPU.
LIBRARY_PATHS = {
    "bmm": "npgpt/cuda/blas.py",  # attention's batched GEMMs through cublasGemmStridedBatchedEx
}
KERNEL_NAMES = tuple(KERNEL_FILES) + tuple(LIBRARY_PATHS)


def enabled_kernels(value: str | None = None) -> set[str]:
    """The kernel names enabled by `value` (default: $NPGPT_CUDA_KERNELS): a comma list of names from
    KERNEL_NAMES, "all", or empty / "none" for none. An unknown name is a ValueError (a typo must not
    silently leave a kernel off)."""
    if value is None:
        value = os.environ.get(ENV_VAR, "")
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
