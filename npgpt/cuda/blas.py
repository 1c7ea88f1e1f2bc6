"""Batched matrix products on the GPU through one cuBLAS call, for the attention's stacks of heads.

Why not `cupy.matmul`: read from CuPy 14.2's source (cupy/_core/_routines_linalg.pyx, `matmul`), N-D
matmul (ndim > 2)

- makes both operands C-contiguous with `ascontiguousarray`, so a transposed operand such as
  `swapaxes(k, -1, -2)` is copied in full on every call;
- calls `cublas.gemmStridedBatchedEx` only for the dtypes 'fdFD', with the compute type set to the
  legacy data type (CUDA_R_32F for float32), so it ignores CuPy's TF32 setting (`CUPY_TF32` /
  `set_compute_type`), which only the 2-D `dot` path (`tensordot_core_v11`,
  CUBLAS_COMPUTE_32F_FAST_TF32) honours;
- computes float16 ('e') in float32: both operands are converted to float32 copies and multiplied
  without tensor cores, and the result converted back;
- sends every other dtype, bfloat16 ('E') included, to its integer GEMM kernel, which fails with
  `TypeError: data type 'E' not understood`: a bfloat16 attention cannot run through it at all;
- writes to a temporary and copies it when `out` is not C-contiguous.
(2-D products, through `dot`, are fine in every float dtype: gemmEx with float32 accumulation for the
16-bit ones, TF32 honoured.)

So attention's products go through `bmm`, which calls the same cuBLAS function itself: a transposed
operand becomes an op flag, a column-major operand (the transpose of a row-major one) a flipped op flag,
float32 uses CUBLAS_COMPUTE_32F_FAST_TF32 unless `tf32=False`, and float16 / bfloat16 run on tensor
cores with float32 accumulation (CUBLAS_COMPUTE_32F). The fast step uses `matmul_where_needed` (16-bit,
and float32 with TF32 on, through `bmm`; the rest through CuPy) unless NPGPT_CUDA_KERNELS enables
"bmm", which sends every product through `matmul`.

cuBLAS is column-major: a row-major (r, c) matrix with row stride ld is, to cuBLAS, the (c, r)
matrix with leading dimension ld. So out = op(a) @ op(b) (row-major) is computed as
out^T = op(b)^T @ op(a)^T: b goes first as cuBLAS's A, a second as its B, and m, n swap.

The argument computation is the pure function `strided_batched_args` (shapes and byte strides in,
cuBLAS arguments out), tested without a GPU against a NumPy model of gemmStridedBatched in
tests/test_cuda_blas.py. CuPy is imported only when `bmm` is called.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

# cublasOperation_t (cublas_api.h)
CUBLAS_OP_N = 0
CUBLAS_OP_T = 1
# cudaDataType_t (library_types.h); spelled out as older CuPy runtime modules do not list CUDA_R_16BF.
CUDA_R_32F = 0
CUDA_R_64F = 1
CUDA_R_16F = 2
CUDA_R_16BF = 14
# cublasComputeType_t (cublas_api.h); tests/test_cuda_blas.py checks these against CuPy's cublas module.
CUBLAS_COMPUTE_32F = 68
CUBLAS_COMPUTE_64F = 70
CUBLAS_COMPUTE_32F_FAST_TF32 = 77

_INT_MAX = 2**31 - 1  # cuBLAS takes m, n, k, the leading dimensions and the batch count as int


class GemmArgs(NamedTuple):
    """The geometry arguments of cublasGemmStridedBatchedEx, in cuBLAS's column-major terms: C (m x n,
    leading dimension ldc) = op_A(A) op_B(B) with op_A(A) m x k and op_B(B) k x n, for `batch` matrices
    `stride_*` elements apart. `first` names the bmm operand passed as cuBLAS's A ("b": out is row-major,
    so out^T = op(b)^T op(a)^T), and `second` the one passed as its B."""

    transa: int
    transb: int
    m: int
    n: int
    k: int
    lda: int
    stride_a: int
    ldb: int
    stride_b: int
    ldc: int
    stride_c: int
    batch: int
    first: str
    second: str


class GemmTypes(NamedTuple):
    """The data type of A, B and C, the cuBLAS compute type, and the host dtype of alpha and beta."""

    data_type: int
    compute_type: int
    scalar_dtype: np.dtype


def gemm_types(dtype, tf32: bool) -> GemmTypes:
    """cuBLAS types for arrays of `dtype`: float32 computes in TF32 when `tf32` (CUBLAS_COMPUTE_32F_FAST_TF32)
    and in full float32 otherwise; float16 and bfloat16 accumulate in float32 (CUBLAS_COMPUTE_32F, float32
    alpha/beta) whatever `tf32` says; float64 computes in float64. Other dtypes are a TypeError."""
    dtype = np.dtype(dtype)
    if dtype == np.float32:
        return GemmTypes(CUDA_R_32F, CUBLAS_COMPUTE_32F_FAST_TF32 if tf32 else CUBLAS_COMPUTE_32F, np.dtype(np.float32))
    if dtype == np.float64:
        return GemmTypes(CUDA_R_64F, CUBLAS_COMPUTE_64F, np.dtype(np.float64))
    if dtype == np.float16:
        return GemmTypes(CUDA_R_16F, CUBLAS_COMPUTE_32F, np.dtype(np.float32))
    if dtype.name == "bfloat16":
        return GemmTypes(CUDA_R_16BF, CUBLAS_COMPUTE_32F, np.dtype(np.float32))
    raise TypeError(f"bmm supports float16, bfloat16, float32 and float64, not {dtype}; cast the operands")


def _elements(name: str, strides, itemsize: int) -> tuple:
    if any(s % itemsize for s in strides):
        raise ValueError(f"{name}: strides {tuple(strides)} (bytes) are not whole elements of {itemsize} bytes; "
                         f"pass a copy (xp.ascontiguousarray({name}))")  # fmt: skip
    return tuple(s // itemsize for s in strides)


def _matrix_layout(name: str, rows: int, cols: int, s_rows: int, s_cols: int, empty: bool) -> tuple[bool, int]:
    """(column_major, ld) for a (rows, cols) matrix with element strides (s_rows, s_cols): row-major
    when its columns are adjacent (ld = s_rows >= cols), else column-major when its rows are adjacent
    (ld = s_cols >= rows). A stride along an axis of length 1 is never looked at, and the matrix of an
    `empty` array (whose strides NumPy may set to 0) is taken as row-major."""
    if empty:
        return False, max(1, cols)
    ld = s_rows if rows > 1 else max(1, cols)
    if (cols <= 1 or s_cols == 1) and ld >= max(1, cols):
        return False, ld
    if (rows <= 1 or s_rows == 1) and s_cols >= max(1, rows):  # one column gets here only with s_rows < 1
        return True, s_cols
    raise ValueError(f"{name}: its last two axes (shape ({rows}, {cols}), element strides ({s_rows}, {s_cols})) "
                     "are neither row-major nor column-major (one axis must have stride 1 and the other a "
                     "stride no smaller than the length of the stride-1 axis); "
                     f"pass xp.ascontiguousarray({name})")  # fmt: skip


def _batch_stride(name: str, shape, strides, empty: bool) -> int:
    """The one element stride between consecutive matrices when the batch axes `shape` (strides
    `strides`) are walked in C order; axes of length 1 are ignored, and an `empty` array has stride 0.
    ValueError when there is none."""
    if empty:
        return 0
    axes = [(n, s) for n, s in zip(shape, strides) if n != 1]
    if not axes:
        return 0
    for (_, outer), (n, inner) in zip(axes, axes[1:]):
        if outer != inner * n:
            raise ValueError(f"{name}: batch axes of shape {tuple(shape)} with element strides {tuple(strides)} "
                             "cannot be collapsed into one stride (each stride must be the next one times the "
                             f"next axis' length); pass xp.ascontiguousarray({name})")  # fmt: skip
    if axes[-1][1] < 0:
        raise ValueError(f"{name}: negative batch stride {axes[-1][1]}; pass xp.ascontiguousarray({name})")
    return axes[-1][1]


def strided_batched_args(a_shape, a_strides, b_shape, b_strides, out_shape, out_strides, itemsize: int,
                         trans_a: bool = False, trans_b: bool = False) -> GemmArgs:  # fmt: skip
    """The cublasGemmStridedBatchedEx arguments (GemmArgs) that compute out[i] = op(a[i]) @ op(b[i])
    over the batch axes, from shapes and byte strides (as `ndarray.shape` / `.strides` give them).

    Shapes: op(a) (..., M, K), op(b) (..., K, N), out (..., M, N), with the same leading (batch) axes;
    op(x) is x with its last two axes swapped when trans_x, so a is (..., K, M) when trans_a.
    Layouts: a and b row-major or column-major in their last two axes (a column-major operand flips its
    op flag); out row-major (unit column stride, row stride >= N, so a slice out[..., :m, :n] of a
    bigger C-contiguous buffer will do). Each operand's batch axes must collapse into one stride (e.g.
    (B, NH) with stride_B = NH * stride_NH); the matrices of out must not overlap one another.
    Anything else is a ValueError that names the operand (callers can pass a copy)."""
    shapes = {"a": tuple(a_shape), "b": tuple(b_shape), "out": tuple(out_shape)}
    strides = {"a": tuple(a_strides), "b": tuple(b_strides), "out": tuple(out_strides)}
    for name, shape in shapes.items():
        if len(shape) < 2:
            raise ValueError(f"{name} has shape {shape}; bmm needs arrays of matrices (at least 2-D)")
        if len(strides[name]) != len(shape):
            raise ValueError(f"{name}: {len(strides[name])} strides for a shape of {len(shape)} axes")
    lead = shapes["out"][:-2]
    if shapes["a"][:-2] != lead or shapes["b"][:-2] != lead:
        raise ValueError(f"batch axes differ: a {shapes['a']}, b {shapes['b']}, out {shapes['out']}; bmm does not "
                         "broadcast, so give all three the same leading axes (xp.broadcast_to an input)")  # fmt: skip
    ma, ka = shapes["a"][-2:][::-1] if trans_a else shapes["a"][-2:]
    kb, nb = shapes["b"][-2:][::-1] if trans_b else shapes["b"][-2:]
    m, n = shapes["out"][-2:]
    if ka != kb or (ma, nb) != (m, n):
        raise ValueError(f"shapes do not chain: op(a) is ({ma}, {ka}), op(b) ({kb}, {nb}), out ({m}, {n}); "
                         "op(a) @ op(b) needs (M, K) @ (K, N) -> (M, N) (check trans_a / trans_b)")  # fmt: skip
    k = ka
    el = {name: _elements(name, strides[name], itemsize) for name in shapes}

    def operand(name, trans):
        rows, cols = shapes[name][-2:]
        empty = 0 in shapes[name]
        col_major, ld = _matrix_layout(name, rows, cols, *el[name][-2:], empty)
        return (CUBLAS_OP_T if trans != col_major else CUBLAS_OP_N), ld, _batch_stride(name, lead, el[name][:-2], empty)

    # out^T (N x M, column-major) = op(b)^T (N x K) @ op(a)^T (K x M): b is cuBLAS's A, a its B.
    transa, lda, stride_a = operand("b", trans_b)
    transb, ldb, stride_b = operand("a", trans_a)
    empty = 0 in shapes["out"]
    col_major, ldc = _matrix_layout("out", m, n, *el["out"][-2:], empty)
    if col_major:
        raise ValueError("out: its last two axes are column-major; bmm writes row-major matrices, so pass a "
                         "C-contiguous out (or compute the transposed product into its transpose)")  # fmt: skip
    stride_c = _batch_stride("out", lead, el["out"][:-2], empty)
    batch = math.prod(lead)
    if batch > 1 and not empty and stride_c < (m - 1) * ldc + n:
        raise ValueError(f"out: its matrices overlap (batch stride {stride_c} elements, each spans "
                         f"{(m - 1) * ldc + n}); pass a C-contiguous out")  # fmt: skip
    args = GemmArgs(transa, transb, n, m, k, lda, stride_a, ldb, stride_b, ldc, stride_c, batch, "b", "a")
    too_big = [f"{key}={getattr(args, key)}" for key in ("m", "n", "k", "lda", "ldb", "ldc", "batch")
               if getattr(args, key) > _INT_MAX]  # fmt: skip
    if too_big:
        raise ValueError(f"{', '.join(too_big)} exceed cuBLAS's 32-bit int arguments; split the batch or the matrices")
    return args


def bmm(a, b, out, *, trans_a=False, trans_b=False, tf32=True, alpha=1.0, beta=0.0):
    """out[i] = alpha * op(a[i]) @ op(b[i]) + beta * out[i] over the leading (batch) axes, in one
    cublasGemmStridedBatchedEx call on CuPy's current stream, without copying any operand; returns out.

    a: (..., M, K), or (..., K, M) when trans_a;  b: (..., K, N), or (..., N, K) when trans_b;
    out: (..., M, N). The same leading axes on all three (an input may be an xp.broadcast_to view: its
    batch stride 0 is passed on), one dtype (float16, bfloat16, float32 or float64), all CuPy arrays
    on one device. Layout requirements: see `strided_batched_args` (a ValueError names the operand to
    copy). float32 computes in TF32 unless tf32=False; 16-bit dtypes accumulate in float32. With
    beta == 0, out is not read (NaNs in it do not propagate). out must not share memory with a or b
    (not checked)."""
    import cupy

    for name, x in (("a", a), ("b", b), ("out", out)):
        if not isinstance(x, cupy.ndarray):
            raise TypeError(f"bmm: {name} is a {type(x).__name__}, not a CuPy array; use xp.matmul on the CPU")
    if not a.dtype == b.dtype == out.dtype:
        raise TypeError(f"bmm: dtypes differ (a {a.dtype}, b {b.dtype}, out {out.dtype}); cast to one dtype")
    if not a.data.device_id == b.data.device_id == out.data.device_id:
        raise ValueError(f"bmm: arrays on different devices (a {a.data.device_id}, b {b.data.device_id}, "
                         f"out {out.data.device_id}); move them to one")  # fmt: skip
    types = gemm_types(out.dtype, tf32)
    args = strided_batched_args(a.shape, a.strides, b.shape, b.strides, out.shape, out.strides, out.itemsize,
                                trans_a, trans_b)  # fmt: skip
    if out.size == 0:
        return out
    if args.k == 0:  # an empty sum: out = beta * out
        if beta == 0:
            out.fill(0)
        else:
            out *= beta
        return out
    # Imported here: cupy_backends.cuda.libs.cublas is where CuPy's own linalg code takes cuBLAS from.
    from cupy_backends.cuda.libs import cublas

    ops = {"a": a, "b": b}
    first, second = ops[args.first], ops[args.second]
    scalars = np.array([alpha, beta], dtype=types.scalar_dtype)  # host memory, read during the call
    alpha_ptr = scalars.ctypes.data
    beta_ptr = alpha_ptr + scalars.itemsize
    with cupy.cuda.Device(out.data.device_id):
        handle = cupy.cuda.device.get_cublas_handle()
        cublas.gemmStridedBatchedEx(
            handle, args.transa, args.transb, args.m, args.n, args.k, alpha_ptr,
            first.data.ptr, types.data_type, args.lda, args.stride_a,
            second.data.ptr, types.data_type, args.ldb, args.stride_b,
            beta_ptr, out.data.ptr, types.data_type, args.ldc, args.stride_c,
            args.batch, types.compute_type, cublas.CUBLAS_GEMM_DEFAULT,
        )  # fmt: skip
    return out


def takes_strided_batch(shape, strides, itemsize: int, is_out: bool = False) -> bool:
    """Whether an array of this shape and byte strides can be an operand of one strided-batched call as it
    is (see `strided_batched_args`): its last two axes row- or column-major, its batch axes collapsing
    into one stride; for `is_out` also row-major, its matrices not overlapping. The encoder-decoder's
    heads, strided (b, NH, t, hs) views of (b, t, C) rows, are not (b's stride is not NH times NH's)."""
    shape, empty = tuple(shape), 0 in tuple(shape)
    if len(shape) < 2 or len(strides) != len(shape):
        return False
    try:
        el = _elements("x", strides, itemsize)
        rows, cols = shape[-2:]
        col_major, ld = _matrix_layout("x", rows, cols, *el[-2:], empty)
        stride = _batch_stride("x", shape[:-2], el[:-2], empty)
    except ValueError:
        return False
    if is_out and (col_major or (math.prod(shape[:-2]) > 1 and not empty and stride < (rows - 1) * ld + cols)):
        return False
    return True


def matmul(out, a, b) -> None:
    """out = a @ b for CuPy stacks of matrices through `bmm`: transposed operands become cuBLAS op flags
    instead of copies, float32 honours the TF32 setting, 16-bit dtypes run on tensor cores (CuPy's N-D
    matmul does none of these; see above). 2-D products keep CuPy's matmul, which does all three.

    An operand whose layout one strided-batched call cannot take (`takes_strided_batch`) is copied first
    (a contiguous copy always can), and an `out` that cannot be written directly gets the product through
    a contiguous temporary: never an error, and still TF32 and 16-bit through cuBLAS, which CuPy's own
    N-D matmul would not give (it would copy too).

    Fast op it matches: npgpt.fast.common.matmul (same arguments); the fast step uses it for attention's
    products when NPGPT_CUDA_KERNELS enables "bmm"."""
    from npgpt.backend import get_array_module, tf32_enabled

    xp = get_array_module(out)
    if out.ndim <= 2:
        xp.matmul(a, b, out=out)
        return
    if not takes_strided_batch(a.shape, a.strides, a.itemsize):
        a = xp.ascontiguousarray(a)
    if not takes_strided_batch(b.shape, b.strides, b.itemsize):
        b = xp.ascontiguousarray(b)
    if takes_strided_batch(out.shape, out.strides, out.itemsize, is_out=True):
        bmm(a, b, out, tf32=tf32_enabled())
    else:
        out[...] = bmm(a, b, xp.empty(out.shape, out.dtype), tf32=tf32_enabled())


def needs_bmm(dtype) -> bool:
    """True for the dtypes whose N-D products CuPy's matmul cannot do as it should: float16 and bfloat16
    (no tensor cores; bfloat16 fails outright) and float32 while TF32 is on (ignored)."""
    from npgpt.backend import tf32_enabled

    dtype = np.dtype(dtype)
    return dtype.itemsize == 2 or (dtype == np.float32 and tf32_enabled())


def matmul_where_needed(out, a, b) -> None:
    """out = a @ b for CuPy arrays: through `bmm` (see `matmul`) where `needs_bmm(out.dtype)`, else
    CuPy's own matmul. The fast step's attention products on a GPU when "bmm" is not enabled: what CuPy
    gets wrong goes through cuBLAS whatever NPGPT_CUDA_KERNELS says. Operands of any layout (`matmul`
    copies what the batched call cannot take), so the encoder-decoder's strided heads run with TF32 on.

    Fast op it matches: npgpt.fast.common.matmul (same arguments)."""
    from npgpt.backend import get_array_module

    if out.ndim > 2 and needs_bmm(out.dtype):
        matmul(out, a, b)
    else:
        get_array_module(out).matmul(a, b, out=out)
