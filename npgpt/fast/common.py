"""What the fast ops share: the matrix product, row-wise dot products, and CPU threads over row ranges.

Glossary: n = rows, C = channels. Not a layer: npgpt/layers/ has no twin of this file.
"""

from __future__ import annotations

import numpy as np

from ..backend import get_array_module
from ..parallel import parallel_ranges
from ..precision import is_low_precision


def matmul(out, a, b) -> None:
    """out = a @ b (stacks of matrices too). With 16-bit operands on the CPU the product is taken of
    float32 copies and rounded once into `out`, as a GPU's tensor cores accumulate 16-bit products in
    float32 (NumPy has no 16-bit BLAS, and no bfloat16 matmul that writes bfloat16). On the GPU with
    NPGPT_CUDA_KERNELS=bmm, attention's products go through npgpt.cuda.blas.matmul instead (same contract)."""
    xp = get_array_module(out)
    if xp is np and is_low_precision(out.dtype):
        out[...] = np.matmul(a.astype(np.float32), b.astype(np.float32))
    else:
        xp.matmul(a, b, out=out)


def rowdot(a, b):
    """sum(a * b, axis=-1) without materialising a * b on the CPU (16-bit operands: summed in float32)."""
    xp = get_array_module(a)
    if is_low_precision(a.dtype):
        return (a * b).sum(axis=-1, dtype=np.float32)
    if xp is np:
        sub = "abcdefgh"[: a.ndim]
        return np.einsum(f"{sub},{sub}->{sub[:-1]}", a, b)
    return (a * b).sum(axis=-1)


PARALLEL_MIN_ELEMENTS = 2_000_000  # below this many elements an op's rows stay on one thread


def in_threads(n: int, work, threads: int, *, elements: int | None = None) -> None:
    """work(lo, hi, worker) over contiguous row ranges of range(n), on `threads` threads at once (NumPy
    releases the GIL inside its loops, so elementwise work spreads over the cores; see parallel.py).
    elements: how many array elements the work covers; under PARALLEL_MIN_ELEMENTS one thread does it
    all. Measured on the 2-core machine (docs/benchmarks.md): a second thread made LayerNorm on (512, 768)
    1.4x slower and GELU on (512, 3072) no faster, while the loss over (512, 50257) ran 1.5x faster and
    LayerNorm's backward over (4096, 768) 1.6x faster."""
    if elements is not None and elements < PARALLEL_MIN_ELEMENTS:
        threads = 1
    if threads <= 1 or n < 2 * threads:
        work(0, n, 0)
    else:
        parallel_ranges(n, work, threads)
