"""CuPy wrappers for the CUDA kernels in kernels/*.cu, one Python function per operation.

Each wrapper has the contract, and the positional arguments, of the fast op it replaces (npgpt/fast/,
named in its docstring as "Fast op it matches"), so the fast step (npgpt/engine/) can pick either
implementation of an op once, when it is built. A wrapper checks dtypes, shapes and layouts and
launches on CuPy's current stream. Nothing here imports CuPy until a
wrapper is called with CuPy arrays, so this module imports on any machine (the compile checks read
KERNEL_ENTRIES). Given NumPy arrays instead, the same wrappers run the same kernels on the CPU through
npgpt.cuda.emulate (slow; for tests without a GPU).

Compilation: each .cu file is compiled once per process and device with `cupy.RawModule` (NVRTC),
and CuPy keeps the binary in its on-disk cache. The #include "common.cuh" line is replaced by the
header's text before the source is handed over, because CuPy's cache key covers the source string
and options but not the files it includes: a changed header must change the key. Every kernel is
`extern "C"`, so no name_expressions are needed.

Which wrappers the fast path uses is decided by the caller (npgpt.engine.choose_ops, from
npgpt.cuda.enabled_kernels()); this module does not look at $NPGPT_CUDA_KERNELS.
"""

from __future__ import annotations

import functools
import math
import re

import numpy as np

from npgpt.backend import get_array_module, is_cupy_array
from npgpt.fast.attention import merge_heads_into, split_heads_into
from npgpt.cuda.sources import kernel_dir, kernel_source

BLOCK = 256  # threads per block of every kernel but cross_entropy's
GRID_STRIDE_MAX_BLOCKS = 8192  # grid of the grid-stride kernels (gelu, adamw)
CE_BLOCK = 512  # threads per row of the cross-entropy kernel
SQ_NORM_MAX_BLOCKS = 1024
LN_BWD_MAX_CHUNKS = 128  # row chunks of the dw/db partial sums
LN_BWD_MIN_ROWS = 32  # rows per chunk at least
ATTENTION_HEAD_SIZES = (16, 32, 48, 64, 80, 96, 112, 128)
ATT_BR = 64  # rows per attention block (kernels/attention.cu: ATT_BR)
COMPILE_OPTIONS = ("-std=c++17",)

# Every kernel each file exports (the compile checks assert that each appears in the PTX, and no more).
KERNEL_ENTRIES = {
    "layernorm.cu": ("layernorm_fwd", "layernorm_bwd_dwdb_partial", "layernorm_bwd_dwdb_finalize", "layernorm_bwd_dx"),
    "gelu.cu": ("gelu_bias_fwd", "gelu_bias_fwd_vec4", "gelu_bwd_inplace", "gelu_bwd_inplace_vec4"),
    "cross_entropy.cu": ("cross_entropy_fwd_bwd",),
    "adamw.cu": ("adamw_flat", "sq_norm_partial", "sq_norm_finalize"),
    "attention.cu": ("attention_bwd_rowdot",)
    + tuple(f"attention_{k}_hs{hs}" for hs in ATTENTION_HEAD_SIZES for k in ("fwd", "bwd_dkdv", "bwd_dq")),
}

_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*"([^"]+)"[ \t]*$', re.M)


def expanded_source(filename: str, defines=()) -> str:
    """The text of kernels/<filename> with each #include "x" replaced by kernels/x (once per file,
    recursively, `#pragma once` dropped) and `#define NAME VALUE` lines for `defines` put first."""
    seen = set()

    def expand(name):
        if name in seen:
            return ""
        seen.add(name)
        path = kernel_dir() / name
        if not path.is_file():
            raise ValueError(f"{filename} includes {name!r}, which is not in {kernel_dir()}")
        text = path.read_text(encoding="utf-8")
        text = re.sub(r"^[ \t]*#[ \t]*pragma[ \t]+once[ \t]*$", "", text, flags=re.M)
        return _INCLUDE.sub(lambda m: expand(m.group(1)), text)

    kernel_source(filename)  # a clear ValueError for an unknown file
    head = "".join(f"#define {k} {v}\n" for k, v in defines)
    return head + expand(filename)


def _cupy():
    try:
        import cupy
    except Exception as e:  # ImportError, or a broken CUDA install
        raise RuntimeError(f"npgpt.cuda.kernels needs CuPy ({type(e).__name__}: {e})") from e
    return cupy


@functools.lru_cache(maxsize=None)
def _module(filename: str, defines: tuple, device_id: int):
    cupy = _cupy()
    with cupy.cuda.Device(device_id):
        return cupy.RawModule(code=expanded_source(filename, defines), options=COMPILE_OPTIONS)


@functools.lru_cache(maxsize=None)
def _function(filename: str, name: str, defines: tuple, device_id: int):
    cupy = _cupy()
    with cupy.cuda.Device(device_id):
        return _module(filename, defines, device_id).get_function(name)


def _launch(filename, name, grid, block, args, defines=()):
    grid = tuple(int(g) for g in grid)
    arrays = [a for a in args if isinstance(a, np.ndarray) or is_cupy_array(a)]
    on_gpu = [is_cupy_array(a) for a in arrays]
    if any(on_gpu) and not all(on_gpu):
        raise TypeError(f"{name}: arrays must all be CuPy arrays (or all NumPy arrays, for the CPU emulation)")
    if not any(on_gpu):  # NumPy arrays: the CPU emulation
        from npgpt.cuda import emulate

        emulate.launch(filename, name, grid, int(block), args, defines=tuple(defines))
        return
    cupy = _cupy()
    fn = _function(filename, name, tuple(defines), cupy.cuda.Device().id)
    fn(grid, (int(block),), tuple(args))


# --- argument checks ------------------------------------------------------------------------------------


def _f32(name, a, shape=None, contiguous=True):
    if a.dtype != np.float32:
        raise ValueError(f"{name} must be float32, got {a.dtype}")
    if shape is not None and tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(a.shape)}, expected {tuple(shape)}")
    if contiguous and not a.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")
    return a


def _ptr(a) -> int:
    return int(a.data.ptr) if is_cupy_array(a) else int(a.ctypes.data)


def _aligned16(*arrays) -> bool:
    return all(_ptr(a) % 16 == 0 for a in arrays)


def _i32(x):
    return np.int32(x)


def _i64(x):
    return np.int64(x)


def _f(x):
    return np.float32(x)


def _grid_stride_blocks(work: int) -> int:
    return max(1, min(-(-work // BLOCK), GRID_STRIDE_MAX_BLOCKS))


# --- LayerNorm ------------------------------------------------------------------------------------------


def layernorm_forward(out, mean, rstd, x, weight, bias, eps):
    """out = (x - mean) * rstd * weight + bias over the last axis; stores mean and rstd (N,).

    Fast op it matches: npgpt.fast.layernorm.layernorm_forward (same arguments, without `threads`).
    x, out: (N, C); weight, bias: (C,); mean, rstd: (N,); float32, contiguous. Kernel: layernorm_fwd in
    kernels/layernorm.cu.
    """
    N, C = x.shape
    _f32("x", x)
    _f32("out", out, (N, C))
    _f32("weight", weight, (C,))
    _f32("bias", bias, (C,))
    _f32("mean", mean, (N,))
    _f32("rstd", rstd, (N,))
    if N == 0:
        return out
    _launch("layernorm.cu", "layernorm_fwd", (-(-N // 8),), BLOCK,
            (x, weight, bias, out, mean, rstd, _i32(N), _i32(C), _f(eps)))  # fmt: skip
    return out


def layernorm_bwd_chunks(N: int) -> tuple[int, int]:
    """(nchunks, rows_per_chunk) of the deterministic dw/db reduction for N rows."""
    nchunks = max(1, min(LN_BWD_MAX_CHUNKS, -(-N // LN_BWD_MIN_ROWS)))
    rows = max(1, -(-N // nchunks))
    return -(-N // rows), rows


def layernorm_backward(dx, dweight, dbias, dout, x, mean, rstd, weight, *, scratch=None):
    """dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dout * weight (overwritten);
    dweight += sum(dout * xhat), dbias += sum(dout) over the rows (added into, deterministic two-pass sums).

    Fast op it matches: npgpt.fast.layernorm.layernorm_backward (same arguments, without `threads`).
    dout, x, dx: (N, C); mean, rstd: (N,); weight, dweight, dbias: (C,). dx may be dout itself.
    `scratch`: a float32 contiguous array of at least 2 * nchunks * C elements for the partial sums
    (an (N, C) scratch is enough when N >= 2 * nchunks, i.e. N >= 2); allocated when None, too small or
    not contiguous. Kernels: layernorm_bwd_dwdb_partial, layernorm_bwd_dwdb_finalize, layernorm_bwd_dx.
    """
    xp = get_array_module(x)
    N, C = x.shape
    _f32("x", x)
    _f32("dout", dout, (N, C))
    _f32("dx", dx, (N, C))
    _f32("mean", mean, (N,))
    _f32("rstd", rstd, (N,))
    _f32("weight", weight, (C,))
    _f32("dweight", dweight, (C,))
    _f32("dbias", dbias, (C,))
    if N == 0:
        return dx
    nchunks, rows = layernorm_bwd_chunks(N)
    need = 2 * nchunks * C
    if scratch is not None and scratch.dtype == np.float32 and scratch.flags.c_contiguous and scratch.size >= need:
        partial = scratch.reshape(-1)[:need]
    else:
        partial = xp.empty(need, dtype=np.float32)
    _launch("layernorm.cu", "layernorm_bwd_dwdb_partial", (-(-C // 32), nchunks), BLOCK,
            (dout, x, mean, rstd, partial, _i32(N), _i32(C), _i32(rows)))  # fmt: skip
    _launch("layernorm.cu", "layernorm_bwd_dwdb_finalize", (-(-C // BLOCK),), BLOCK, (partial, dweight, dbias, _i32(nchunks), _i32(C)))
    _launch("layernorm.cu", "layernorm_bwd_dx", (-(-N // 8),), BLOCK, (dout, x, mean, rstd, weight, dx, _i32(N), _i32(C)))
    return dx


# --- GELU -----------------------------------------------------------------------------------------------


def gelu_forward(out, x, bias=None, *, pre=None):
    """pre = x + bias (the MLP pre-activation, kept for the backward), out = gelu(pre).

    Fast op it matches: npgpt.fast.gelu.gelu_forward (same arguments, without scratch and threads).
    x: (N, C) float32 contiguous, the GEMM output without its bias; bias: (C,) or None (no add: x already
    is the pre-activation); out: (N, C), not aliasing x. pre defaults to x (the add happens in place,
    as in the fast op). float4 loads when C % 4 == 0 and the arrays are 16-byte aligned.
    Kernels: gelu_bias_fwd, gelu_bias_fwd_vec4.
    """
    N, C = x.shape
    pre = x if pre is None else pre
    _f32("x", x)
    _f32("out", out, (N, C))
    _f32("pre", pre, (N, C))
    has_bias = bias is not None
    if has_bias:
        _f32("bias", bias, (C,))
    b = bias if has_bias else x  # never read when has_bias == 0
    n = N * C
    if n == 0:
        return out
    if C % 4 == 0 and _aligned16(x, b, pre, out):
        _launch("gelu.cu", "gelu_bias_fwd_vec4", (_grid_stride_blocks(n // 4),), BLOCK,
                (x, b, pre, out, _i64(n // 4), _i32(C // 4), _i32(has_bias)))  # fmt: skip
    else:
        _launch("gelu.cu", "gelu_bias_fwd", (_grid_stride_blocks(n),), BLOCK, (x, b, pre, out, _i64(n), _i32(C), _i32(has_bias)))
    return out


def gelu_backward_(d, x):
    """d *= gelu'(x), in place; x is the pre-activation (with bias). Returns d.

    Fast op it matches: npgpt.fast.gelu.gelu_backward_ (same arguments, without scratch and threads).
    d, x: same shape, float32, contiguous, not aliasing. Kernels: gelu_bwd_inplace, gelu_bwd_inplace_vec4.
    """
    _f32("d", d)
    _f32("x", x, d.shape)
    n = d.size
    if n == 0:
        return d
    if n % 4 == 0 and _aligned16(d, x):
        _launch("gelu.cu", "gelu_bwd_inplace_vec4", (_grid_stride_blocks(n // 4),), BLOCK, (d, x, _i64(n // 4)))
    else:
        _launch("gelu.cu", "gelu_bwd_inplace", (_grid_stride_blocks(n),), BLOCK, (d, x, _i64(n)))
    return d


# --- softmax cross-entropy ------------------------------------------------------------------------------


def cross_entropy_(logits, targets, want_grad=True, dloss=1.0, ignore_index=-100, *, n_valid=None, scale=None,
                   losses=None):  # fmt: skip
    """Mean softmax cross-entropy of the rows of `logits` (N, V); with want_grad the logits are
    overwritten in place by the gradient (softmax - onehot) * scale, zero rows where the target is
    ignore_index. Returns the mean loss over the rows that count, as a 0-d float64 array of the
    logits' module (no host synchronisation unless `scale` has to be computed).

    Fast op it matches: npgpt.fast.cross_entropy.cross_entropy_ (same arguments, without threads and
    block; it returns a Python float). scale: dloss / n_valid (n_valid = rows whose target !=
    ignore_index); None computes it from n_valid when given, else reads the count back to the host.
    losses: (N,) float32 scratch for the per-row losses, allocated when None.
    Kernel: cross_entropy_fwd_bwd.
    """
    xp = get_array_module(logits)
    N, V = logits.shape
    _f32("logits", logits)
    targets = xp.ascontiguousarray(xp.asarray(targets).reshape(-1), dtype=np.int64)
    if targets.shape != (N,):
        raise ValueError(f"targets have {targets.size} entries for {N} rows of logits")
    if losses is None:
        losses = xp.empty(N, dtype=np.float32)
    _f32("losses", losses, (N,))
    counted = (targets != ignore_index).sum()
    if want_grad and scale is None:
        nv = int(counted) if n_valid is None else int(n_valid)
        scale = float(dloss) / nv if nv else 0.0
    if N:
        _launch("cross_entropy.cu", "cross_entropy_fwd_bwd", (N,), CE_BLOCK,
                (logits, targets, losses, _i32(N), _i32(V), _f(scale if want_grad else 0.0), _i32(bool(want_grad)),
                 _i64(ignore_index)))  # fmt: skip
    return losses.sum(dtype=np.float64) / counted  # nan when every row is ignored


# --- AdamW and the gradient norm ------------------------------------------------------------------------


def decay_mask_for(params: dict, decay: dict, xp=None):
    """A flat uint8 mask, 1 where the element belongs to a parameter that decays, laid out like the
    engine's grad_flat (the parameters' elements concatenated in the dict's order). `decay` maps each key
    to a bool (AdamW.decay). xp: numpy or cupy (default: cupy)."""
    xp = _cupy() if xp is None else xp
    host = np.concatenate([np.full(int(np.prod(p.shape)), 1 if decay[k] else 0, dtype=np.uint8) for k, p in params.items()])
    return xp.asarray(host)


def adamw_flat_(p, g, m, v, decay_mask, lr, b1, b2, eps, wd, step):
    """One AdamW step on flat buffers, in place on p, m, v:
        m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;  p *= 1 - lr wd (where decay_mask);
        p -= (lr / (1 - b1^step)) m / (sqrt(v / (1 - b2^step)) + eps)

    Reference: npgpt.optim._adamw_update (per tensor, decay = lr * wd or 0) as AdamW.step runs it.
    p, g, m, v: (n,) float32 contiguous, not aliasing. decay_mask: (n,) uint8 or bool (nonzero: the
    element decays) or None (every element decays; pass wd=0 for none). step counts from 1.
    Kernel: adamw_flat.
    """
    n = p.size
    for name, a in (("p", p), ("g", g), ("m", m), ("v", v)):
        _f32(name, a)
        if a.size != n:
            raise ValueError(f"{name} has {a.size} elements, p has {n}")
    if step < 1:
        raise ValueError(f"step counts from 1, got {step}")
    use_mask = decay_mask is not None
    if use_mask:
        if decay_mask.size != n or decay_mask.dtype not in (np.uint8, np.bool_) or not decay_mask.flags.c_contiguous:
            raise ValueError("decay_mask must be a contiguous uint8 or bool array with one entry per element")
        mask = decay_mask.view(np.uint8)
    else:
        mask = get_array_module(p).zeros(1, dtype=np.uint8)  # never read
    bc1 = 1.0 - b1**step
    bc2 = 1.0 - b2**step
    if n:
        _launch("adamw.cu", "adamw_flat", (_grid_stride_blocks(n),), BLOCK,
                (p, g, m, v, mask, _i64(n), _f(b1), _f(1.0 - b1), _f(b2), _f(1.0 - b2), _f(eps), _f(1.0 - lr * wd),
                 _f(lr / bc1), _f(1.0 / math.sqrt(bc2)), _i32(use_mask)))  # fmt: skip
    return p


def sq_norm_blocks(n: int) -> int:
    return max(1, min(-(-n // (4 * BLOCK)), SQ_NORM_MAX_BLOCKS))


def sq_norm(flat, sync=True):
    """sum(flat ** 2), accumulated in float64, deterministic (fixed-order two-pass reduction).

    Reference: npgpt.optim.grad_norm(grads) ** 2 over the flat gradient buffer. flat: float32, contiguous.
    Returns a Python float, or with sync=False a CuPy (1,) float64 array (no host synchronisation).
    Kernels: sq_norm_partial, sq_norm_finalize.
    """
    xp = get_array_module(flat)
    _f32("flat", flat)
    n = flat.size
    G = sq_norm_blocks(n)
    partial = xp.empty(G, dtype=np.float64)
    out = xp.zeros(1, dtype=np.float64)
    if n:
        _launch("adamw.cu", "sq_norm_partial", (G,), BLOCK, (flat, _i64(n), partial))
        _launch("adamw.cu", "sq_norm_finalize", (1,), BLOCK, (partial, _i32(G), out))
    return float(out[0]) if sync else out


# --- attention ------------------------------------------------------------------------------------------


def _head_stride(name, a, shape4):
    """Elements between consecutive heads of a (B, NH, T, X) array whose (T, X) rows are contiguous."""
    B, NH, T, X = shape4
    if tuple(a.shape) != tuple(shape4):
        raise ValueError(f"{name} has shape {tuple(a.shape)}, expected {tuple(shape4)}")
    if a.dtype != np.float32:
        raise ValueError(f"{name} must be float32, got {a.dtype}")
    st = [s // 4 for s in a.strides]
    if (X > 1 and st[3] != 1) or (T > 1 and st[2] != X):
        raise ValueError(f"{name}: the (T, {X}) rows of each head must be contiguous (strides {a.strides})")
    if NH > 1:
        hstride = st[1]
        if B > 1 and st[0] != NH * hstride:
            raise ValueError(f"{name}: heads must be evenly spaced across the batch (strides {a.strides})")
    elif B > 1:
        hstride = st[0]
    else:
        hstride = T * X
    if hstride < T * X:
        raise ValueError(f"{name}: heads overlap (strides {a.strides})")
    return hstride


def _attention_layout(q, k, v, others, lse):
    if q.ndim != 4:
        raise ValueError(f"q must be (B, NH, T, hs), got shape {tuple(q.shape)}")
    B, NH, T, hs = q.shape
    if hs not in ATTENTION_HEAD_SIZES:
        raise ValueError(f"attention kernels support head sizes {ATTENTION_HEAD_SIZES}, got {hs}")
    if B * NH > 65535:
        raise ValueError(f"B * NH = {B * NH} exceeds the kernel grid's 65535")
    arrays = {"q": q, "k": k, "v": v, **others}
    strides = {name: _head_stride(name, a, (B, NH, T, hs)) for name, a in arrays.items()}
    if len(set(strides.values())) != 1:
        raise ValueError(f"q, k, v, ... must share one head stride, got {strides}; pass contiguous arrays")
    stride = strides["q"]
    if stride % 4 or not _aligned16(*arrays.values()):
        raise ValueError("attention arrays must be 16-byte aligned with a head stride that is a multiple of 4")
    lse_stride = _head_stride("lse", lse[..., None], (B, NH, T, 1))
    return B, NH, T, hs, stride, lse_stride


def attention_fwd(q, k, v, out, lse, scale):
    """Causal attention without dropout: out = softmax(scale * q k^T + causal mask) v, per head, and
    lse = logsumexp of each row of the masked scores (kept for the backward). O(T) extra memory.

    Fast op it matches: npgpt.fast.attention.attention_heads_forward with keep=None (which takes q
    pre-scaled: call with scale=1 then), and so npgpt.layers.attention.attention_forward without dropout. With attention
    dropout on, use the reference path instead.
    q, k, v, out: (B, NH, T, hs) float32, hs in ATTENTION_HEAD_SIZES, (T, hs) rows of each head contiguous,
    all with one head stride (views into buffers allocated for a longer T are fine), 16-byte aligned;
    lse: (B, NH, T) float32 with contiguous rows. Kernel: attention_fwd_hs<hs>.
    """
    B, NH, T, hs, stride, lse_stride = _attention_layout(q, k, v, {"out": out}, lse)
    if T == 0 or B * NH == 0:
        return out
    _launch("attention.cu", f"attention_fwd_hs{hs}", (-(-T // ATT_BR), B * NH), BLOCK,
            (q, k, v, out, lse, _i32(T), _i64(stride), _i64(lse_stride), _f(scale)),
            defines=(("NPGPT_ATTENTION_ONLY_HS", hs),))  # fmt: skip
    return out


def attention_bwd(q, k, v, out, lse, dout, dq, dk, dv, scale, dq_mult=1.0, D=None):
    """Backward of attention_fwd: dq, dk, dv (overwritten) from dout, recomputing the probabilities
    from lse. Deterministic (dq is its own kernel pass, no atomics).

        dq = dq_mult * scale * dS @ k,   dk = scale * dS^T @ q,   dv = P^T @ dout,
        dS = P * (dout @ v^T - rowsum(dout * out))

    Fast op it matches: npgpt.fast.attention.attention_heads_backward_ with keep=None: the fast step's q
    is pre-scaled by 1/sqrt(hs) and it wants dq for the unscaled q, i.e. scale=1, dq_mult=1/sqrt(hs). With scale=1/sqrt(hs)
    on an unscaled q, dq_mult=1 gives npgpt.layers.attention.attention_backward's dq.
    Arrays as in attention_fwd (out and lse from it). dout may be dq itself (the fast step keeps dy in dq's
    slot); no other aliasing. D: scratch for rowsum(dout * out), float32 with at least B * NH * lse head
    stride elements (allocated when None). Kernels: attention_bwd_rowdot, attention_bwd_dkdv_hs<hs>,
    attention_bwd_dq_hs<hs>.
    """
    xp = get_array_module(q)
    B, NH, T, hs, stride, lse_stride = _attention_layout(q, k, v, {"out": out, "dout": dout, "dq": dq, "dk": dk, "dv": dv}, lse)
    if T == 0 or B * NH == 0:
        return dq, dk, dv
    need = B * NH * lse_stride
    if D is None or D.size < need or D.dtype != np.float32 or not D.flags.c_contiguous:
        D = xp.empty(need, dtype=np.float32)
    defines = (("NPGPT_ATTENTION_ONLY_HS", hs),)
    grid = (-(-T // ATT_BR), B * NH)
    _launch("attention.cu", "attention_bwd_rowdot", (-(-T // 8), B * NH), BLOCK,
            (dout, out, D, _i32(T), _i32(hs), _i64(stride), _i64(lse_stride)), defines=defines)  # fmt: skip
    _launch("attention.cu", f"attention_bwd_dkdv_hs{hs}", grid, BLOCK,
            (q, k, v, lse, D, dout, dk, dv, _i32(T), _i64(stride), _i64(lse_stride), _f(scale)), defines=defines)  # fmt: skip
    _launch("attention.cu", f"attention_bwd_dq_hs{hs}", grid, BLOCK,
            (q, k, v, lse, D, dout, dq, _i32(T), _i64(stride), _i64(lse_stride), _f(scale), _f(dq_mult)), defines=defines)  # fmt: skip
    return dq, dk, dv


def flash_attention_forward(y, heads, lse, qkv, *, head_out=None):
    """y (b, t, C) = causal attention over qkv (b, t, 3C) without dropout, through attention_fwd: O(t)
    memory. Saves heads (3, b, NH, t, hs) (q scaled by 1/sqrt(hs), k, v) and lse (b, NH, t), each
    row's logsumexp, instead of the probabilities.

    Fast op it matches: npgpt.fast.attention.attention_forward with p = 0 (which saves the probabilities
    `att` where this saves `lse`). head_out: (b, NH, t, hs) scratch (allocated when None).
    """
    split_heads_into(heads, qkv)
    if head_out is None:
        head_out = get_array_module(qkv).empty_like(heads[0])
    attention_fwd(heads[0], heads[1], heads[2], head_out, lse, scale=1.0)
    merge_heads_into(y, head_out)


def flash_attention_backward(dqkv, dy, heads, lse, y, *, dheads, head_out):
    """dqkv (b, t, 3C) from dy (b, t, C), through attention_bwd, with the forward's heads, lse and output
    y (b, t, C), from which the probabilities are recomputed.

    Fast op it matches: npgpt.fast.attention.attention_backward with no dropout. dheads (3, b, NH, t,
    hs) and head_out (b, NH, t, hs): scratch.
    """
    _, b, NH, t, hs = heads.shape
    dheads[0][...] = dy.reshape(b, t, NH, hs).transpose(0, 2, 1, 3)  # dy lives in dq's slot
    head_out[...] = y.reshape(b, t, NH, hs).transpose(0, 2, 1, 3)  # the forward's output, per head
    attention_bwd(heads[0], heads[1], heads[2], head_out, lse, dheads[0], dheads[0], dheads[1], dheads[2],
                  scale=1.0, dq_mult=1.0 / math.sqrt(hs))  # fmt: skip
    dqkv.reshape(b, t, 3, NH, hs)[...] = dheads.transpose(1, 3, 0, 2, 4)
