"""npgpt.cuda.blas: the cuBLAS arguments that `bmm` computes, and `bmm` itself.

Without a GPU: `strided_batched_args` is fed the shapes and byte strides of NumPy views (transposed
operands, swapaxes views, slices of bigger buffers such as the engine's q[:, :, :t], broadcast
batches), and a NumPy model of cuBLAS's column-major gemmStridedBatched runs with those arguments on
the flat buffers the views live in. Its result must equal np.matmul(op(a), op(b)) in float64 (1e-12),
and it must touch nothing but out's elements. The layouts that one strided batch cannot express must
be a ValueError naming the operand.

With a GPU (skipped without CuPy and a device): `bmm` against NumPy in float64 and cupy.matmul, for
float32 with and without TF32, float16, bfloat16 and float64, the constants against CuPy's cuBLAS module,
and matmul_where_needed (what the fast step uses without NPGPT_CUDA_KERNELS=bmm) on bfloat16 stacks,
which CuPy 14.2's own N-D matmul cannot multiply.
"""

import itertools
import math

import numpy as np
import pytest
from conftest import needs_cuda
from fake_cupy import gemm_strided_batched

from npgpt.cuda import blas
from npgpt.cuda.blas import CUBLAS_OP_N, CUBLAS_OP_T, strided_batched_args


# --- the NumPy model of cublasGemmStridedBatched (tests/fake_cupy.py, which also runs it for the fake CuPy) ---


def offset(view, mem):
    """The element offset of `view`'s first element in the 1-D buffer `mem` it lives in."""
    assert np.shares_memory(view, mem) or view.size == 0
    return (view.__array_interface__["data"][0] - mem.__array_interface__["data"][0]) // mem.itemsize


def op(x, trans):
    return np.swapaxes(x, -1, -2) if trans else x


def check(a, mem_a, b, mem_b, out, mem_c, trans_a=False, trans_b=False, alpha=1.0, beta=0.0):
    """Runs the model with strided_batched_args on the buffers; asserts mem_c afterwards holds
    alpha op(a) @ op(b) + beta out in out's elements and is unchanged everywhere else. Returns the args."""
    args = strided_batched_args(a.shape, a.strides, b.shape, b.strides, out.shape, out.strides, 8,
                                trans_a, trans_b)  # fmt: skip
    expected = mem_c.copy()
    view = np.lib.stride_tricks.as_strided(expected[offset(out, mem_c) :], out.shape, out.strides)
    ref = alpha * np.matmul(op(a, trans_a), op(b, trans_b))
    view[...] = ref if beta == 0 else ref + beta * out
    got = mem_c.copy()
    ops = {"a": (mem_a, offset(a, mem_a)), "b": (mem_b, offset(b, mem_b))}
    gemm_strided_batched(args, alpha, *ops[args.first], *ops[args.second], beta, got, offset(out, mem_c))
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12, equal_nan=True, err_msg=str(args))
    return args


def operand(rng, batch, rows, cols, layout, pad=0):
    """A (*batch, rows, cols) float64 view and the fresh 1-D buffer under it. "row": C order with rows
    `cols + pad` apart; "col": the swapaxes view of a C-ordered (*batch, cols, rows + pad) array."""
    if layout == "row":
        mem = rng.standard_normal(math.prod(batch) * rows * (cols + pad))
        return mem.reshape(*batch, rows, cols + pad)[..., :cols], mem
    mem = rng.standard_normal(math.prod(batch) * cols * (rows + pad))
    return np.swapaxes(mem.reshape(*batch, cols, rows + pad)[..., :rows], -1, -2), mem


def output(rng, batch, m, n, pad=0, fill=None):
    """A row-major (*batch, m, n) view with rows n + pad apart, and its buffer (random, or `fill`)."""
    mem = rng.standard_normal(math.prod(batch) * m * (n + pad))
    if fill is not None:
        mem[:] = fill
    return mem.reshape(*batch, m, n + pad)[..., :n], mem


# --- every layout, transpose flag, batch shape and size -----------------------------------------------------

BATCHES = [(), (1,), (4,), (2, 3)]
SIZES = [(1, 1, 1), (1, 4, 3), (5, 1, 2), (3, 4, 1), (6, 5, 7), (3, 4, 0), (0, 4, 3), (3, 0, 2)]  # (M, N, K)


@pytest.mark.parametrize("layout_a,layout_b", list(itertools.product(("row", "col"), repeat=2)))
@pytest.mark.parametrize("trans_a,trans_b", list(itertools.product((False, True), repeat=2)))
def test_matches_matmul(rng, layout_a, layout_b, trans_a, trans_b):
    for batch, (m, n, k), pad in itertools.product(BATCHES, SIZES, (0, 2)):
        a, mem_a = operand(rng, batch, *((k, m) if trans_a else (m, k)), layout_a, pad)
        b, mem_b = operand(rng, batch, *((n, k) if trans_b else (k, n)), layout_b, pad)
        out, mem_c = output(rng, batch, m, n, pad)
        args = check(a, mem_a, b, mem_b, out, mem_c, trans_a, trans_b)
        assert (args.m, args.n, args.k, args.batch) == (n, m, k, math.prod(batch))
        assert (args.first, args.second) == ("b", "a")


def test_empty_arrays_have_any_strides():
    """NumPy gives empty arrays strides of 0 (CuPy may too): an empty matrix or batch is accepted as is."""
    for a_shape, b_shape, out_shape in [((2, 3, 0), (2, 0, 4), (2, 3, 4)), ((0, 3, 2), (0, 2, 4), (0, 3, 4)),
                                        ((2, 0, 2), (2, 2, 4), (2, 0, 4))]:  # fmt: skip
        a, b, out = (np.empty(s) for s in (a_shape, b_shape, out_shape))
        args = strided_batched_args(a.shape, a.strides, b.shape, b.strides, out.shape, out.strides, 8)
        assert (args.m, args.n, args.k, args.batch) == (out_shape[2], out_shape[1], a_shape[2], out_shape[0])
    heads = np.empty((2, 3, 4, 5))[:, :2, :, :0]  # batch strides that do not collapse, but nothing to walk
    args = args_for(heads, np.empty((2, 2, 0, 6)), np.empty((2, 2, 4, 6)))
    assert (args.k, args.stride_b, args.batch) == (0, 0, 4)


def test_alpha_beta_and_beta_zero_does_not_read_out(rng):
    a, mem_a = operand(rng, (2, 3), 4, 5, "row")
    b, mem_b = operand(rng, (2, 3), 5, 6, "col")
    out, mem_c = output(rng, (2, 3), 4, 6, pad=1)
    check(a, mem_a, b, mem_b, out, mem_c, alpha=0.5, beta=-2.0)
    out, mem_c = output(rng, (2, 3), 4, 6, pad=1, fill=np.nan)
    check(a, mem_a, b, mem_b, out, mem_c, alpha=1.5, beta=0.0)  # out's NaNs are not read; the padding's stay


def test_transposed_view_is_the_flag(rng):
    """Passing swapaxes(x) with trans False and x with trans True are the same cuBLAS call."""
    a, _ = operand(rng, (2, 3), 4, 5, "row")
    b, _ = operand(rng, (2, 3), 6, 5, "row")
    out, _ = output(rng, (2, 3), 4, 6)
    bt = np.swapaxes(b, -1, -2)
    flag = strided_batched_args(a.shape, a.strides, b.shape, b.strides, out.shape, out.strides, 8, False, True)
    view = strided_batched_args(a.shape, a.strides, bt.shape, bt.strides, out.shape, out.strides, 8, False, False)
    assert flag == view
    assert flag.transa == CUBLAS_OP_T and flag.transb == CUBLAS_OP_N


def test_broadcast_input_has_batch_stride_zero(rng):
    w = rng.standard_normal(5 * 6)
    b = np.broadcast_to(w.reshape(5, 6), (2, 3, 5, 6))
    a, mem_a = operand(rng, (2, 3), 4, 5, "row")
    out, mem_c = output(rng, (2, 3), 4, 6)
    args = check(a, mem_a, b, w, out, mem_c)
    assert args.stride_a == 0  # b is cuBLAS's A


# --- the attention's products, on the engine's buffers ---------------------------------------------------------

B, NH, T, HS = 3, 2, 7, 4


def attention_views(rng, b, t):
    """q, k, v as the engine slices them from its (3, B, NH, T, hs) buffer ([:, :b, :, :t]), and two
    (b, NH, t, t) slices of (B, NH, T, T) scratch buffers, each with the 1-D buffer it lives in."""
    qkv = rng.standard_normal(3 * B * NH * T * HS)
    heads = qkv.reshape(3, B, NH, T, HS)[:, :b, :, :t]
    att_mem = rng.standard_normal(B * NH * T * T)
    d_mem = rng.standard_normal(B * NH * T * T)
    att = att_mem.reshape(B, NH, T, T)[:b, :, :t, :t]
    datt = d_mem.reshape(B, NH, T, T)[:b, :, :t, :t]
    return (heads[0], qkv), (heads[1], qkv), (heads[2], qkv), (att, att_mem), (datt, d_mem)


@pytest.mark.parametrize("b,t", [(B, T), (B, 5), (2, 5), (1, 1), (2, 1)])
def test_attention_products_on_sliced_buffers(rng, b, t):
    (q, qm), (k, km), (v, vm), (att, am), (datt, dm) = attention_views(rng, b, t)
    y_mem = rng.standard_normal(B * NH * T * HS)
    y = y_mem.reshape(B, NH, T, HS)[:b, :, :t]  # a (b, NH, t, hs) output slice, like the engine's dq
    check(q, qm, k, km, att, am, trans_b=True)  # scores = q @ k^T
    check(q, qm, np.swapaxes(k, -1, -2), km, att, am)  # the same, with CuPy's swapaxes view
    check(att, am, v, vm, y, y_mem)  # y = att @ v
    check(att, am, q, qm, y, y_mem, trans_a=True)  # dv = att^T @ dy
    check(np.swapaxes(att, -1, -2), am, q, qm, y, y_mem)
    check(q, qm, v, vm, datt, dm, trans_b=True)  # datt = dy @ v^T
    check(datt, dm, q, qm, y, y_mem, trans_a=True)  # dk = dscores^T @ q
    check(datt, dm, k, km, y, y_mem)  # dq = dscores @ k


def test_sliced_batches_collapse_to_one_stride(rng):
    (q, _), (k, _), _, (att, _), _ = attention_views(rng, 2, 5)
    args = strided_batched_args(q.shape, q.strides, k.shape, k.strides, att.shape, att.strides, 8, False, True)
    assert (args.stride_a, args.stride_b, args.stride_c) == (T * HS, T * HS, T * T)
    assert (args.lda, args.ldb, args.ldc, args.batch) == (HS, HS, T, 2 * NH)


def test_head_slices_and_token_major_heads_collapse_only_when_they_can(rng):
    """A slice of the heads axis, x[:, :h] with 1 < h < NH and B > 1, and (B, T, NH, hs) heads swapped
    to (B, NH, T, hs) without a copy (B > 1, T > 1) are batches one stride cannot walk: ValueError
    naming the operand. With h == 1 or B == 1 only one batch axis is left, and they collapse."""
    nh = 3
    mem = rng.standard_normal(B * nh * T * HS)
    heads = mem.reshape(B, nh, T, HS)
    k, mem_k = operand(rng, (B, 2), T, HS, "row")
    out, mem_c = output(rng, (B, 2), T, T)
    two = heads[:, :2]
    with pytest.raises(ValueError, match=r"^a: batch axes of shape \(3, 2\) with element strides \(84, 28\)") as e:
        strided_batched_args(two.shape, two.strides, k.shape, k.strides, out.shape, out.strides, 8, False, True)
    assert "xp.ascontiguousarray(a)" in str(e.value)
    with pytest.raises(ValueError, match=r"^b: batch axes"):
        strided_batched_args(k.shape, k.strides, two.shape, two.strides, out.shape, out.strides, 8, False, True)
    check(two[:1], mem, k[:1], mem_k, out[:1], mem_c, trans_b=True)  # B == 1
    check(heads[:, 1:2], mem, k[:, :1], mem_k, out[:, :1], mem_c, trans_b=True)  # h == 1

    token_major = np.swapaxes(mem.reshape(B, T, nh, HS), 1, 2)  # (B, NH, T, hs), rows NH * hs apart
    kk, mem_kk = operand(rng, (B, nh), T, HS, "row")
    att, mem_att = output(rng, (B, nh), T, T)
    with pytest.raises(ValueError, match=r"^a: batch axes of shape \(3, 3\) with element strides \(84, 4\)"):
        strided_batched_args(token_major.shape, token_major.strides, kk.shape, kk.strides, att.shape,
                             att.strides, 8, False, True)  # fmt: skip
    args = check(token_major[:1], mem, kk[:1], mem_kk, att[:1], mem_att, trans_b=True)
    assert (args.ldb, args.stride_b) == (nh * HS, HS)  # a is cuBLAS's B


def test_mixed_broadcast_batch_does_not_collapse(rng):
    x = rng.standard_normal((B, 4, 5))
    a = np.broadcast_to(x[:, None], (B, NH, 4, 5))  # batch strides (20, 0) elements
    b, _ = operand(rng, (B, NH), 5, 6, "row")
    out, _ = output(rng, (B, NH), 4, 6)
    with pytest.raises(ValueError, match=r"^a: batch axes"):
        strided_batched_args(a.shape, a.strides, b.shape, b.strides, out.shape, out.strides, 8, False, False)


# --- what one strided batch cannot express, and bad arguments ------------------------------------------------


def args_for(a, b, out, trans_a=False, trans_b=False, itemsize=8):
    """strided_batched_args on (shape, byte strides) pairs, or arrays."""
    a, b, out = ((x.shape, x.strides) if isinstance(x, np.ndarray) else x for x in (a, b, out))
    return strided_batched_args(*a, *b, *out, itemsize, trans_a, trans_b)


def c_order(*shape, itemsize=8):
    strides, step = [], itemsize
    for n in reversed(shape):
        strides.insert(0, step)
        step *= n
    return tuple(shape), tuple(strides)


@pytest.mark.parametrize(
    "a,b,out,trans_a,match",
    [
        (c_order(3), c_order(3, 2), c_order(1, 2), False, r"^a has shape \(3,\); bmm needs arrays of matrices"),
        (c_order(2, 4, 3), c_order(3, 4, 5), c_order(2, 4, 5), False, r"^batch axes differ"),
        (c_order(2, 4, 3), c_order(2, 4, 5), c_order(2, 4, 5), False, r"^shapes do not chain: op\(a\) is \(4, 3\)"),
        (c_order(2, 4, 3), c_order(2, 4, 5), c_order(2, 3, 5), False, r"^shapes do not chain"),
        (c_order(2, 4, 3), c_order(2, 3, 5), c_order(2, 4, 5), True, r"^shapes do not chain.*trans_a"),
        (c_order(2, 4, 3), c_order(2, 3, 5), c_order(2, 5, 4), False, r"^shapes do not chain"),
        (((4, 3), (24, 4)), c_order(3, 5), c_order(4, 5), False, r"^a: strides \(24, 4\) \(bytes\) are not whole"),
        (c_order(4, 3), c_order(3, 5), ((4, 5), (8, 32)), False, r"^out: its last two axes are column-major"),
        (c_order(4, 3), c_order(3, 5), ((4, 5), (40, 16)), False, r"^out: its last two axes .* are neither"),
        (c_order(3, 4, 3), c_order(3, 3, 5), ((3, 4, 5), (0, 40, 8)), False, r"^out: its matrices overlap"),
        (c_order(3, 4, 3), c_order(3, 3, 5), ((3, 4, 5), (120, 48, 8)), False, r"^out: its matrices overlap"),
        (c_order(3, 4, 3), c_order(3, 3, 5), ((3, 4, 5), (168, 48, 8)), False, r"^out: .* spans 23\)"),
        (((4, 3), (16, 8)), c_order(3, 5), c_order(4, 5), False, r"^a: its last two axes .* are neither"),
        (((4, 3), (8, 16)), c_order(3, 5), c_order(4, 5), False, r"^a: its last two axes .* are neither"),
        (((3, 4, 3), (-96, 24, 8)), c_order(3, 3, 5), c_order(3, 4, 5), False, r"^a: negative batch stride -12"),
        (((1, 2**31), (2**34, 8)), c_order(2**31, 1), c_order(1, 1), False, r"^k=2147483648, ldb=2147483648 exceed"),
        (c_order(1, 2), ((2, 2**31), (8, 16)), c_order(1, 2**31), False, r"^m=2147483648, ldc=2147483648 exceed"),
    ],
)  # fmt: skip
def test_value_errors(a, b, out, trans_a, match):
    with pytest.raises(ValueError, match=match):
        args_for(a, b, out, trans_a=trans_a)


def test_strided_or_reversed_last_axes_are_value_errors(rng):
    b, _ = operand(rng, (2,), 3, 5, "row")
    out, _ = output(rng, (2,), 4, 5)
    every_other = rng.standard_normal((2, 4, 6))[..., ::2]  # column stride 2
    reversed_ = rng.standard_normal((2, 4, 3))[..., ::-1]  # column stride -1
    col_every_other = np.swapaxes(rng.standard_normal((2, 3, 8))[..., ::2], -1, -2)  # row stride 2
    for bad in (every_other, reversed_, col_every_other):
        assert bad.shape == (2, 4, 3)
        with pytest.raises(ValueError, match=r"^a: its last two axes .* are neither row-major nor column-major"):
            args_for(bad, b, out)
    with pytest.raises(ValueError, match=r"^b: its last two axes .*pass xp.ascontiguousarray\(b\)$"):
        args_for(operand(rng, (2,), 4, 3, "col")[0], rng.standard_normal((2, 3, 10))[..., ::2], out)


def test_sizes_one_ignore_their_strides():
    """An axis of length 1 has no meaningful stride (NumPy and CuPy set it freely): any value will do."""
    for junk in (0, 8, 7 * 8, -8):
        a = ((2, 1, 3), (24, junk, 8))  # a row
        b = ((2, 3, 1), (24, 8, junk))  # a column
        out = ((2, 1, 1), (8, junk, junk))
        args = args_for(a, b, out)
        assert (args.m, args.n, args.k, args.lda, args.ldb, args.ldc) == (1, 1, 3, 1, 3, 1)
        assert (args.stride_a, args.stride_b, args.stride_c) == (3, 3, 1)


# --- types ------------------------------------------------------------------------------------------------


def test_gemm_types():
    assert blas.gemm_types(np.float32, True) == (blas.CUDA_R_32F, blas.CUBLAS_COMPUTE_32F_FAST_TF32, np.float32)
    assert blas.gemm_types(np.float32, False) == (blas.CUDA_R_32F, blas.CUBLAS_COMPUTE_32F, np.float32)
    for tf32 in (True, False):
        assert blas.gemm_types(np.float16, tf32) == (blas.CUDA_R_16F, blas.CUBLAS_COMPUTE_32F, np.float32)
        assert blas.gemm_types(np.float64, tf32) == (blas.CUDA_R_64F, blas.CUBLAS_COMPUTE_64F, np.float64)
    for bad in (np.int32, np.int8, np.complex64):
        with pytest.raises(TypeError, match="bmm supports float16, bfloat16, float32 and float64"):
            blas.gemm_types(bad, True)


def test_gemm_types_bfloat16():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    assert blas.gemm_types(ml_dtypes.bfloat16, True) == (blas.CUDA_R_16BF, blas.CUBLAS_COMPUTE_32F, np.float32)


# --- bmm on a GPU -----------------------------------------------------------------------------------------


@pytest.mark.cuda
@needs_cuda
def test_constants_match_cupy():
    import cupy
    from cupy_backends.cuda.libs import cublas

    assert (blas.CUBLAS_OP_N, blas.CUBLAS_OP_T) == (cublas.CUBLAS_OP_N, cublas.CUBLAS_OP_T)
    assert blas.CUBLAS_COMPUTE_32F == cublas.CUBLAS_COMPUTE_32F
    assert blas.CUBLAS_COMPUTE_32F_FAST_TF32 == cublas.CUBLAS_COMPUTE_32F_FAST_TF32
    assert blas.CUBLAS_COMPUTE_64F == cublas.CUBLAS_COMPUTE_64F
    runtime = cupy.cuda.runtime
    for name in ("CUDA_R_32F", "CUDA_R_64F", "CUDA_R_16F", "CUDA_R_16BF"):
        if hasattr(runtime, name):
            assert getattr(blas, name) == getattr(runtime, name), name


def rel_err(got, ref):
    got, ref = np.asarray(got, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    return float(np.max(np.abs(got - ref)) / max(np.max(np.abs(ref)), 1e-30))


def gpu_cases(rng, dtype):
    """(a, b, out, trans_a, trans_b, alpha, beta) on the GPU: sliced attention buffers, swapaxes views,
    2-D, a broadcast input, and alpha/beta."""
    import cupy

    b_, nh, t_max, hs, t = 2, 3, 40, 32, 33
    qkv = cupy.asarray(rng.standard_normal((3, b_ + 1, nh, t_max, hs))).astype(dtype)
    q, k, v = (qkv[i, :b_, :, :t] for i in range(3))
    scratch = cupy.full((b_ + 1, nh, t_max, t_max), np.nan, dtype=dtype)
    att = cupy.asarray(rng.standard_normal((b_, nh, t, t))).astype(dtype)
    heads = cupy.full((b_ + 1, nh, t_max, hs), np.nan, dtype=dtype)
    sw = cupy.swapaxes
    yield q, k, scratch[:b_, :, :t, :t], False, True, 1.0, 0.0  # scores
    yield q, sw(k, -1, -2), scratch[:b_, :, :t, :t], False, False, 1.0, 0.0
    yield att, v, heads[:b_, :, :t], False, False, 1.0, 0.0  # y = att @ v
    yield att, q, heads[:b_, :, :t], True, False, 1.0, 0.0  # dv = att^T @ dy
    yield sw(att, -1, -2), q, heads[:b_, :, :t], False, False, 1.0, 0.0
    yield att, k, heads[:b_, :, :t], False, False, 1.0, 0.0  # dq = dscores @ k
    yield sw(q, -1, -2), sw(k, -1, -2), cupy.zeros((b_, nh, t, t), dtype), True, False, 1.0, 0.0  # both column-major
    w = cupy.asarray(rng.standard_normal((hs, 17))).astype(dtype)
    yield q, cupy.broadcast_to(w, (b_, nh, hs, 17)), cupy.zeros((b_, nh, t, 17), dtype), False, False, 1.0, 0.0
    yield q[0, 0], w, cupy.zeros((t, 17), dtype), False, False, 1.0, 0.0  # 2-D
    c = cupy.asarray(rng.standard_normal((b_, nh, t, t))).astype(dtype)
    yield q, k, c, False, True, 0.5, -1.5


def _bf16():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    return ml_dtypes.bfloat16


# bfloat16 keeps 8 significant bits: the output's rounding alone is up to 2^-9 of each element
@pytest.mark.parametrize("dtype,tf32,tol", [(np.float32, False, 1e-5), (np.float32, True, 2e-3),
                                            (np.float16, True, 2e-3), ("bfloat16", True, 8e-3),
                                            (np.float64, True, 1e-12)],
                         ids=["f32", "tf32", "f16", "bf16", "f64"])  # fmt: skip
@pytest.mark.cuda
@needs_cuda
def test_bmm_matches_numpy(rng, dtype, tf32, tol):
    import cupy

    dtype = _bf16() if dtype == "bfloat16" else dtype

    for i, (a, b, out, ta, tb, alpha, beta) in enumerate(gpu_cases(rng, dtype)):
        a64, b64, c64 = (cupy.asnumpy(x).astype(np.float64) for x in (a, b, out))
        ref = alpha * np.matmul(op(a64, ta), op(b64, tb)) + (beta * c64 if beta else 0.0)
        outside = cupy.asnumpy(out.base).astype(np.float64) if out.base is not None else None  # (bf16 NaNs compare)
        got = blas.bmm(a, b, out, trans_a=ta, trans_b=tb, tf32=tf32, alpha=alpha, beta=beta)
        assert got is out
        err = rel_err(cupy.asnumpy(out), ref)
        assert err <= tol, f"case {i}: relative error {err:.3g} > {tol:g}"
        if outside is not None:  # nothing written outside out's elements
            after = cupy.asnumpy(out.base).astype(np.float64)
            mask = np.ones(after.shape, bool)
            mask[tuple(slice(0, n) for n in out.shape)] = False
            np.testing.assert_array_equal(after[mask], outside[mask], err_msg=f"case {i}: wrote outside out")
        if dtype == np.float64 and beta == 0:
            expected = cupy.matmul(op(a, ta), op(b, tb))
            assert rel_err(cupy.asnumpy(out), cupy.asnumpy(expected)) <= 1e-12, f"case {i}: differs from cupy.matmul"


@pytest.mark.cuda
@needs_cuda
def test_bmm_tf32_is_used_and_can_be_turned_off(rng):
    """With tf32 on, a float32 product is visibly less exact than with it off (TF32 keeps 10 mantissa bits)."""
    import cupy

    if int(cupy.cuda.Device().compute_capability) < 80:
        pytest.skip("TF32 needs compute capability 8.0")
    a64, b64 = rng.standard_normal((4, 128, 256)), rng.standard_normal((4, 256, 128))
    a, b = cupy.asarray(a64, dtype=cupy.float32), cupy.asarray(b64, dtype=cupy.float32)
    ref = np.matmul(cupy.asnumpy(a).astype(np.float64), cupy.asnumpy(b).astype(np.float64))
    out = cupy.empty((4, 128, 128), cupy.float32)
    exact = rel_err(cupy.asnumpy(blas.bmm(a, b, out, tf32=False)), ref)
    fast = rel_err(cupy.asnumpy(blas.bmm(a, b, out, tf32=True)), ref)
    assert exact < 1e-5 and fast > 10 * exact, (exact, fast)


@pytest.mark.cuda
@needs_cuda
def test_bmm_edges_and_errors(rng):
    import cupy

    a = cupy.asarray(rng.standard_normal((2, 3, 0)), dtype=cupy.float32)
    b = cupy.asarray(rng.standard_normal((2, 0, 4)), dtype=cupy.float32)
    out = cupy.full((2, 3, 4), np.nan, dtype=cupy.float32)
    blas.bmm(a, b, out)  # K == 0, beta == 0: zeros, NaNs not read
    assert not cupy.any(out)
    out[...] = 2
    blas.bmm(a, b, out, beta=0.5)
    assert bool(cupy.all(out == 1))
    blas.bmm(cupy.ones((0, 3, 2), cupy.float32), cupy.ones((0, 2, 4), cupy.float32), cupy.ones((0, 3, 4), cupy.float32))

    x = cupy.ones((2, 3, 3), cupy.float32)
    with pytest.raises(TypeError, match="not a CuPy array"):
        blas.bmm(np.ones((2, 3, 3), np.float32), x, x.copy())
    with pytest.raises(TypeError, match="dtypes differ"):
        blas.bmm(x, x.astype(cupy.float64), x.copy())
    with pytest.raises(TypeError, match="bmm supports"):
        blas.bmm(x.astype(cupy.int32), x.astype(cupy.int32), x.astype(cupy.int32))
    with pytest.raises(ValueError, match=r"^a: its last two axes"):
        blas.bmm(cupy.ones((2, 3, 6), cupy.float32)[..., ::2], x, x.copy())


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", ["bfloat16", np.float16])
def test_matmul_where_needed_multiplies_16bit_stacks(rng, dtype):
    """The attention products of a bf16 / fp16 step (no NPGPT_CUDA_KERNELS): 4-D stacks with a
    transposed operand, through cuBLAS, against NumPy in float64 on the same 16-bit inputs."""
    import cupy

    dtype = _bf16() if dtype == "bfloat16" else dtype
    q = cupy.asarray(rng.standard_normal((2, 3, 33, 32))).astype(dtype)
    k = cupy.asarray(rng.standard_normal((2, 3, 33, 32))).astype(dtype)
    out = cupy.full((2, 3, 33, 33), np.nan, dtype=dtype)
    blas.matmul_where_needed(out, q, cupy.swapaxes(k, -1, -2))
    q64, k64 = (cupy.asnumpy(x).astype(np.float64) for x in (q, k))
    err = rel_err(cupy.asnumpy(out), np.matmul(q64, np.swapaxes(k64, -1, -2)))
    assert err <= 8e-3, err


# --- the engine's attention through bmm, on the CPU ------------------------------------------------------


def _root(x):
    """The 1-D view of the whole buffer a NumPy view lives in."""
    while isinstance(x.base, np.ndarray):
        x = x.base
    return x.reshape(-1)


@pytest.mark.parametrize("drop_rate", [0.0, 0.1])
def test_engine_attention_through_bmm_matches_matmul(monkeypatch, drop_rate):
    """The fast engine with "bmm" enabled: every attention product it makes has a layout bmm accepts
    (no ValueError), and computed by the model of cuBLAS above through bmm's arguments, in the engine's
    own buffers, the loss and every gradient equal those of the matmul path (float64, 1e-12)."""
    import dataclasses

    from npgpt import engine as engine_mod
    from npgpt.config import GPTConfig
    from npgpt.model import GPT, make_rng

    calls = []

    def fake_bmm(a, b, out, *, trans_a=False, trans_b=False, tf32=True, alpha=1.0, beta=0.0):
        args = strided_batched_args(a.shape, a.strides, b.shape, b.strides, out.shape, out.strides, out.itemsize,
                                    trans_a, trans_b)  # fmt: skip
        mem = {"a": (_root(a), offset(a, _root(a))), "b": (_root(b), offset(b, _root(b)))}
        mem_c = _root(out)
        gemm_strided_batched(args, alpha, *mem[args.first], *mem[args.second], beta, mem_c, offset(out, mem_c))
        calls.append(out.shape)
        return out

    monkeypatch.setattr(blas, "bmm", fake_bmm)
    cfg = GPTConfig(vocab_size=61, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=drop_rate)
    x = np.random.default_rng(0).integers(0, 61, size=(3, 12))
    y = np.random.default_rng(1).integers(0, 61, size=(3, 12))
    results = []
    for use_bmm in (False, True):
        model = GPT(cfg, seed=2, dtype=np.float64)
        step = engine_mod.FastLossAndGrads(model, 4, 16)  # batch smaller than the buffers: sliced views
        step.qkv_in_place, step.causal_rows = False, None  # as on a GPU: the heads layout, whole stacks
        if use_bmm:
            step.ops = dataclasses.replace(step.ops, heads_matmul=blas.matmul)  # what "bmm" selects on CuPy arrays
        loss = step(x, y, training=drop_rate > 0, rng=make_rng(3, np))
        results.append((loss, step.grad_flat.copy()))
    assert len(calls) == 6 * cfg.n_layers  # scores, att @ v; dv, datt, dk, dq
    assert abs(results[0][0] - results[1][0]) < 1e-12
    np.testing.assert_allclose(results[1][1], results[0][1], rtol=1e-12, atol=1e-12)
