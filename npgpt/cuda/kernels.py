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

Activations at 16 bits (--precision bf16|fp16): the LayerNorm, GELU, cross-entropy and attention-softmax
wrappers take bfloat16 or float16 activations as well as float32 ones and launch that type's
instantiation of the same kernel template (name suffix _bf16 / _f16: float32 arithmetic inside, one
rounding per stored value, as the fast ops at 16 bits); adamw_flat_ can also round the updated float32
weights into their 16-bit copy in the same pass (`copy=`). KERNEL_DTYPES says which activation dtypes each kernel name takes.

Which wrappers the fast path uses is decided by the caller (npgpt.engine.choose_ops, from
npgpt.cuda.enabled_kernels()); this module does not look at $NPGPT_CUDA_KERNELS.
"""

from __future__ import annotations

import functools
import math
import re

import numpy as np

from npgpt.backend import get_array_module, is_cupy_array
from npgpt.fast.attention import head_from_rows_into, merge_heads_into, qkv_from_heads_into, split_heads_into
from npgpt.cuda.sources import kernel_dir, kernel_source

BLOCK = 256  # threads per block of every kernel but cross_entropy's
GRID_STRIDE_MAX_BLOCKS = 8192  # grid of the grid-stride kernels (gelu, adamw)
CE_BLOCK = 512  # threads per row of the cross-entropy kernel
SQ_NORM_MAX_BLOCKS = 1024
LN_BWD_MAX_CHUNKS = 128  # row chunks of the dw/db partial sums
LN_BWD_MIN_ROWS = 32  # rows per chunk at least
ATTENTION_HEAD_SIZES = (16, 32, 48, 64, 80, 96, 112, 128)
ATT_BR = 64  # rows per attention block (kernels/attention.cu: ATT_BR)
ATT_SOFTMAX_ROWS = 8  # rows per block of the fused softmax kernels, one warp each (kernels/attention_softmax.cu)
COMPILE_OPTIONS = ("-std=c++17",)

# The suffix of each activation dtype's instantiation of a kernel template ("" for float32).
DTYPE_SUFFIX = {"float32": "", "bfloat16": "_bf16", "float16": "_f16"}
_SIXTEEN = ("_bf16", "_f16")
# The activation dtypes each kernel name (npgpt.cuda.KERNEL_NAMES) works with: npgpt.engine.resolve_kernels
# keeps a kernel only for these. adamw and sq_norm work on the float32 master weights and gradients, so
# they serve 16-bit compute too (adamw then also writes the 16-bit copy of the weights); attention's flash
# kernel is float32 only, its fused softmax path takes all three; bmm (cuBLAS) takes every floating dtype.
KERNEL_DTYPES = {
    "layernorm": ("float32", "bfloat16", "float16"),
    "gelu": ("float32", "bfloat16", "float16"),
    "cross_entropy": ("float32", "bfloat16", "float16"),
    "adamw": ("float32", "bfloat16", "float16"),
    "sq_norm": ("float32", "bfloat16", "float16"),
    "attention": ("float32",),
    "attention_softmax": ("float32", "bfloat16", "float16"),
    "bmm": ("float16", "bfloat16", "float32", "float64"),
}

# Every kernel each file exports (the compile checks assert that each appears in the PTX, and no more).
KERNEL_ENTRIES = {
    "layernorm.cu": ("layernorm_fwd", "layernorm_bwd_dwdb_partial", "layernorm_bwd_dwdb_finalize", "layernorm_bwd_dx")
    + tuple(f"{k}{sfx}" for sfx in _SIXTEEN for k in ("layernorm_fwd", "layernorm_bwd_dwdb_partial", "layernorm_bwd_dx")),
    "gelu.cu": ("gelu_bias_fwd", "gelu_bias_fwd_vec4", "gelu_bwd_inplace", "gelu_bwd_inplace_vec4")
    + tuple(f"{k}{sfx}" for sfx in _SIXTEEN for k in ("gelu_bias_fwd", "gelu_bias_fwd_vec8", "gelu_bwd_inplace", "gelu_bwd_inplace_vec8")),
    "cross_entropy.cu": ("cross_entropy_fwd_bwd",) + tuple(f"cross_entropy_fwd_bwd{sfx}" for sfx in _SIXTEEN),
    "adamw.cu": ("adamw_flat", "sq_norm_partial", "sq_norm_finalize") + tuple(f"adamw_flat{sfx}" for sfx in _SIXTEEN),
    "attention.cu": ("attention_bwd_rowdot",)
    + tuple(f"attention_{k}_hs{hs}" for hs in ATTENTION_HEAD_SIZES for k in ("fwd", "bwd_dkdv", "bwd_dq")),
    "attention_softmax.cu": tuple(f"attention_{k}{sfx}" for sfx in DTYPE_SUFFIX.values()
                                  for k in ("softmax_fwd", "softmax_bwd", "dropout")),  # fmt: skip
}

# Threads per block each kernel is launched with, by file (or, where a file's kernels differ, by kernel
# name: {"name": threads}). The wrappers below launch with these (tests/test_cuda_kernels.py checks every
# launch against them) and benchmarks/kernel_resources.py computes occupancy from them. No kernel uses
# dynamic shared memory.
LAUNCH_BLOCKS = {"layernorm.cu": BLOCK, "gelu.cu": BLOCK, "cross_entropy.cu": CE_BLOCK, "adamw.cu": BLOCK, "attention.cu": BLOCK,
                 "attention_softmax.cu": BLOCK}  # fmt: skip


def launch_block(filename: str, kernel: str) -> int:
    """Threads per block of `kernel` in kernels/<filename>, as its wrapper launches it (LAUNCH_BLOCKS)."""
    block = LAUNCH_BLOCKS.get(filename)
    if isinstance(block, dict):
        block = block.get(kernel)
    if block is None:
        raise ValueError(f"no launch block for {kernel} in {filename}: add it to LAUNCH_BLOCKS in npgpt/cuda/kernels.py")
    return int(block)


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
    return _shape(name, a, shape, contiguous)


def _act(name, a, like=None, shape=None, contiguous=True) -> str:
    """Check an activation array: float32, bfloat16 or float16 (the same dtype as `like` when given),
    shape, contiguity. Returns the kernel-name suffix of its dtype (DTYPE_SUFFIX)."""
    dtype = np.dtype(a.dtype)
    if dtype.name not in DTYPE_SUFFIX:
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {dtype}")
    if like is not None and dtype != like.dtype:
        raise ValueError(f"{name} is {dtype}, but the activations are {like.dtype}: pass arrays of one dtype")
    _shape(name, a, shape, contiguous)
    return DTYPE_SUFFIX[dtype.name]


def _shape(name, a, shape=None, contiguous=True):
    if shape is not None and tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(a.shape)}, expected {tuple(shape)}")
    if contiguous and not a.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")
    return a


def _pack(a) -> int:
    """Elements of a's dtype in one 16-byte pack (npgpt_pack in common.cuh): 4 float32, 8 bf16/fp16."""
    return 16 // np.dtype(a.dtype).itemsize


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
    x, out: (N, C), float32 or both bfloat16 / float16 (16-bit compute: float32 arithmetic, out rounded
    once); weight, bias: (C,) and mean, rstd: (N,), float32; all contiguous. Kernel: layernorm_fwd (or
    layernorm_fwd_bf16 / _f16) in kernels/layernorm.cu.
    """
    N, C = x.shape
    sfx = _act("x", x)
    _act("out", out, x, (N, C))
    _f32("weight", weight, (C,))
    _f32("bias", bias, (C,))
    _f32("mean", mean, (N,))
    _f32("rstd", rstd, (N,))
    if N == 0:
        return out
    _launch("layernorm.cu", "layernorm_fwd" + sfx, (-(-N // 8),), BLOCK,
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
    dout, x, dx: (N, C), float32 or all three bfloat16 / float16 (16-bit compute: float32 arithmetic, dx
    rounded once); mean, rstd: (N,) and weight, dweight, dbias: (C,), float32. dx may be dout itself.
    `scratch`: a float32 contiguous array of at least 2 * nchunks * C elements for the partial sums
    (an (N, C) scratch is enough when N >= 2 * nchunks, i.e. N >= 2); allocated when None, too small or
    not contiguous. Kernels: layernorm_bwd_dwdb_partial, layernorm_bwd_dwdb_finalize, layernorm_bwd_dx
    (the first and last with _bf16 / _f16 for 16-bit activations).
    """
    xp = get_array_module(x)
    N, C = x.shape
    sfx = _act("x", x)
    _act("dout", dout, x, (N, C))
    _act("dx", dx, x, (N, C))
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
    _launch("layernorm.cu", "layernorm_bwd_dwdb_partial" + sfx, (-(-C // 32), nchunks), BLOCK,
            (dout, x, mean, rstd, partial, _i32(N), _i32(C), _i32(rows)))  # fmt: skip
    _launch("layernorm.cu", "layernorm_bwd_dwdb_finalize", (-(-C // BLOCK),), BLOCK, (partial, dweight, dbias, _i32(nchunks), _i32(C)))
    _launch("layernorm.cu", "layernorm_bwd_dx" + sfx, (-(-N // 8),), BLOCK, (dout, x, mean, rstd, weight, dx, _i32(N), _i32(C)))
    return dx


# --- GELU -----------------------------------------------------------------------------------------------


def gelu_forward(out, x, bias=None, *, pre=None):
    """pre = x + bias (the MLP pre-activation, kept for the backward), out = gelu(pre).

    Fast op it matches: npgpt.fast.gelu.gelu_forward (same arguments, without scratch and threads).
    x: (N, C) contiguous, the GEMM output without its bias; bias: (C,) or None (no add: x already is the
    pre-activation); out: (N, C), not aliasing x. pre defaults to x (the add happens in place, as in the
    fast op). All of one dtype: float32, or bfloat16 / float16 (16-bit compute: float32 arithmetic; pre
    is rounded, and GELU taken of the rounded value, as the fast op's 16-bit `x += bias`). 16-byte loads
    (4 floats, 8 16-bit values) when C is a multiple of that and the arrays are 16-byte aligned.
    Kernels: gelu_bias_fwd, gelu_bias_fwd_vec4 (gelu_bias_fwd_bf16 / _f16, gelu_bias_fwd_vec8_bf16 / _f16).
    """
    N, C = x.shape
    pre = x if pre is None else pre
    sfx = _act("x", x)
    _act("out", out, x, (N, C))
    _act("pre", pre, x, (N, C))
    has_bias = bias is not None
    if has_bias:
        _act("bias", bias, x, (C,))
    b = bias if has_bias else x  # never read when has_bias == 0
    n, P = N * C, _pack(x)
    if n == 0:
        return out
    if C % P == 0 and _aligned16(x, b, pre, out):
        _launch("gelu.cu", f"gelu_bias_fwd_vec{P}{sfx}", (_grid_stride_blocks(n // P),), BLOCK,
                (x, b, pre, out, _i64(n // P), _i32(C // P), _i32(has_bias)))  # fmt: skip
    else:
        _launch("gelu.cu", "gelu_bias_fwd" + sfx, (_grid_stride_blocks(n),), BLOCK, (x, b, pre, out, _i64(n), _i32(C), _i32(has_bias)))
    return out


def gelu_backward_(d, x):
    """d *= gelu'(x), in place; x is the pre-activation (with bias). Returns d.

    Fast op it matches: npgpt.fast.gelu.gelu_backward_ (same arguments, without scratch and threads).
    d, x: same shape and dtype (float32, or bfloat16 / float16: float32 arithmetic, d rounded once),
    contiguous, not aliasing. Kernels: gelu_bwd_inplace, gelu_bwd_inplace_vec4 (_bf16 / _f16,
    gelu_bwd_inplace_vec8_bf16 / _f16).
    """
    sfx = _act("d", d)
    _act("x", x, d, d.shape)
    n, P = d.size, _pack(d)
    if n == 0:
        return d
    if n % P == 0 and _aligned16(d, x):
        _launch("gelu.cu", f"gelu_bwd_inplace_vec{P}{sfx}", (_grid_stride_blocks(n // P),), BLOCK, (d, x, _i64(n // P)))
    else:
        _launch("gelu.cu", "gelu_bwd_inplace" + sfx, (_grid_stride_blocks(n),), BLOCK, (d, x, _i64(n)))
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
    losses: (N,) float32 scratch for the per-row losses, allocated when None. logits: float32, or
    bfloat16 / float16 (16-bit compute: the softmax and the loss in float32, the gradient rounded once).
    Kernel: cross_entropy_fwd_bwd (cross_entropy_fwd_bwd_bf16 / _f16).
    """
    xp = get_array_module(logits)
    N, V = logits.shape
    sfx = _act("logits", logits)
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
        _launch("cross_entropy.cu", "cross_entropy_fwd_bwd" + sfx, (N,), CE_BLOCK,
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


def adamw_flat_(p, g, m, v, decay_mask, lr, b1, b2, eps, wd, step, *, copy=None):
    """One AdamW step on flat buffers, in place on p, m, v:
        m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;  p *= 1 - lr wd (where decay_mask);
        p -= (lr / (1 - b1^step)) m / (sqrt(v / (1 - b2^step)) + eps)
    and with `copy` also copy = p rounded to copy's 16-bit dtype, in the same pass.

    Reference: npgpt.optim._adamw_update (per tensor, decay = lr * wd or 0) as AdamW.step runs it, then
    the 16-bit cast of the weights the fast engine makes (its param_flat).
    p, g, m, v: (n,) float32 contiguous, not aliasing. decay_mask: (n,) uint8 or bool (nonzero: the
    element decays) or None (every element decays; pass wd=0 for none). step counts from 1. copy: None,
    or an (n,) bfloat16 / float16 contiguous array, the 16-bit working copy of p.
    Kernel: adamw_flat (adamw_flat_bf16 / _f16 with a copy).
    """
    n = p.size
    for name, a in (("p", p), ("g", g), ("m", m), ("v", v)):
        _f32(name, a)
        if a.size != n:
            raise ValueError(f"{name} has {a.size} elements, p has {n}")
    sfx = ""
    if copy is not None:
        sfx = _act("copy", copy)
        if not sfx or copy.size != n:
            raise ValueError(f"copy must be a bfloat16 or float16 array of {n} elements (the weights' 16-bit copy), "
                             f"got {copy.dtype} with {copy.size}")  # fmt: skip
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
        pointers = (p, g, m, v, mask) + ((copy,) if sfx else ())
        _launch("adamw.cu", "adamw_flat" + sfx, (_grid_stride_blocks(n),), BLOCK,
                pointers + (_i64(n), _f(b1), _f(1.0 - b1), _f(b2), _f(1.0 - b2), _f(eps), _f(1.0 - lr * wd),
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
    hs = heads.shape[-1]
    head_from_rows_into(dheads[0], dy)  # dy lives in dq's slot
    head_from_rows_into(head_out, y)  # the forward's output, per head
    attention_bwd(heads[0], heads[1], heads[2], head_out, lse, dheads[0], dheads[0], dheads[1], dheads[2],
                  scale=1.0, dq_mult=1.0 / math.sqrt(hs))  # fmt: skip
    qkv_from_heads_into(dqkv, dheads)  # (3, b, NH, t, hs) -> (b, t, 3C)


# --- attention's fused softmax and dropout (kernels/attention_softmax.cu) --------------------------------

def _softmax_layout(arrays: dict) -> tuple:
    """(suffix, n_bh, t, head_stride, row_stride) of (..., t, t) stacks that share one layout: the same
    shape, dtype (float32, bfloat16 or float16) and strides; unit column stride; leading axes that
    collapse into one stride (a view [:b, :, :t, :t] of a (B, NH, T, T) buffer does)."""
    first_name, first = next(iter(arrays.items()))
    if first.dtype.name not in DTYPE_SUFFIX:
        raise ValueError(f"the fused softmax kernels take float32, bfloat16 or float16, not {first.dtype} ({first_name})")
    if first.ndim < 2 or first.shape[-1] != first.shape[-2]:
        raise ValueError(f"{first_name} must be a stack of square (t, t) matrices, got shape {tuple(first.shape)}")
    for name, a in arrays.items():
        if a.dtype != first.dtype or tuple(a.shape) != tuple(first.shape) or tuple(a.strides) != tuple(first.strides):
            raise ValueError(f"{name} ({a.dtype}, shape {tuple(a.shape)}, strides {a.strides}) must have {first_name}'s "
                             f"dtype, shape and strides ({first.dtype}, {tuple(first.shape)}, {first.strides})")  # fmt: skip
    t, item = first.shape[-1], first.itemsize
    st = [s // item for s in first.strides]
    if t > 1 and st[-1] != 1:
        raise ValueError(f"{first_name}: the columns of each row must be contiguous (strides {first.strides})")
    row_stride = st[-2] if t > 1 else t
    lead = [(n, s) for n, s in zip(first.shape[:-2], st[:-2]) if n != 1]
    for (_, outer), (n, inner) in zip(lead, lead[1:]):
        if outer != inner * n:
            raise ValueError(f"{first_name}: its leading axes {tuple(first.shape[:-2])} (strides {first.strides}) do not "
                             "collapse into one stride; pass a contiguous array")  # fmt: skip
    head_stride = lead[-1][1] if lead else t * row_stride
    n_bh = int(np.prod(first.shape[:-2], dtype=np.int64))
    if row_stride < t or (n_bh > 1 and head_stride < t * row_stride) or n_bh * t > 2**31 - 1:
        raise ValueError(f"{first_name}: rows or matrices overlap, or more than 2^31 rows (shape {tuple(first.shape)}, "
                         f"strides {first.strides})")  # fmt: skip
    return DTYPE_SUFFIX[first.dtype.name], n_bh, t, head_stride, row_stride


def _seed_pointer(xp, seed, p):
    """The seed array the kernels read (a float64 uniform, read only when p > 0)."""
    if p > 0:
        if seed is None or seed.dtype != np.float64 or seed.size < 1:
            raise ValueError("dropout (p > 0) needs seed: a (1,) float64 array holding a uniform in [0, 1)")
        return seed
    return xp.empty(1, dtype=np.float64)  # never read


def _check_drop(p, layer):
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    if not 0 <= int(layer) < 2**32:
        raise ValueError(f"layer must be in [0, 2^32), got {layer}")


def attention_softmax_forward_(att, dropped, scale, p=0.0, seed=None, layer=0):
    """att (..., t, t): the scores q @ k^T on entry, P = softmax(scale * scores + causal mask) on exit (0 right
    of the diagonal); with p > 0 dropped = P * keep / (1 - p), the mask drawn by Philox from (seed, layer,
    position). Returns att.

    Fast op it matches: npgpt.fast.attention.attention_softmax_forward_ (same arguments). att, dropped:
    float32, bfloat16 or float16 with one layout (see _softmax_layout); dropped may be None (or att) when
    p == 0. seed: (1,) float64 on att's device. Kernel: attention_softmax_fwd (_bf16 / _f16 at 16 bits).
    """
    _check_drop(p, layer)
    xp = get_array_module(att)
    arrays = {"att": att} if p == 0 else {"att": att, "dropped": dropped}
    suffix, n_bh, t, hstride, rstride = _softmax_layout(arrays)
    if n_bh and t:
        _launch("attention_softmax.cu", "attention_softmax_fwd" + suffix, (-(-n_bh * t // ATT_SOFTMAX_ROWS),), BLOCK,
                (att, att if p == 0 else dropped, _i32(n_bh), _i32(t), _i64(hstride), _i32(rstride), _f(scale), _f(p),
                 _f(1.0 / (1.0 - p)), _seed_pointer(xp, seed, p), np.uint32(layer)))  # fmt: skip
    return att


def attention_softmax_backward_(datt, att, scale, p=0.0, seed=None, layer=0):
    """datt (..., t, t): the gradient of the probabilities that multiplied v on entry (of the dropped ones
    when p > 0), of the unscaled scores on exit: scale * P * (dP - rowsum(P * dP)), dP = datt * keep / (1 - p),
    0 right of the diagonal. att: P, read only. Returns datt.

    Fast op it matches: npgpt.fast.attention.attention_softmax_backward_ (same arguments). datt and att:
    one layout, not aliasing. Kernel: attention_softmax_bwd (_bf16 / _f16 at 16 bits).
    """
    _check_drop(p, layer)
    xp = get_array_module(att)
    suffix, n_bh, t, hstride, rstride = _softmax_layout({"datt": datt, "att": att})
    if n_bh and t:
        _launch("attention_softmax.cu", "attention_softmax_bwd" + suffix, (-(-n_bh * t // ATT_SOFTMAX_ROWS),), BLOCK,
                (datt, att, _i32(n_bh), _i32(t), _i64(hstride), _i32(rstride), _f(scale), _f(p), _f(1.0 / (1.0 - p)),
                 _seed_pointer(xp, seed, p), np.uint32(layer)))  # fmt: skip
    return datt


def attention_dropout_(dropped, att, p, seed, layer=0):
    """dropped (..., t, t) = att * keep / (1 - p), the mask drawn again as attention_softmax_forward_ drew
    it (the probabilities that multiplied v, for the backward's dv). Returns dropped.

    Fast op it matches: npgpt.fast.attention.attention_dropout_ (same arguments). p > 0; dropped and att:
    one layout, not aliasing. Kernel: attention_dropout (_bf16 / _f16 at 16 bits).
    """
    _check_drop(p, layer)
    if p == 0:
        raise ValueError("attention_dropout_ regenerates a dropout mask: call it with p > 0")
    xp = get_array_module(att)
    suffix, n_bh, t, hstride, rstride = _softmax_layout({"dropped": dropped, "att": att})
    if n_bh and t:
        _launch("attention_softmax.cu", "attention_dropout" + suffix, (-(-n_bh * t // ATT_SOFTMAX_ROWS),), BLOCK,
                (dropped, att, _i32(n_bh), _i32(t), _i64(hstride), _i32(rstride), _f(p), _f(1.0 / (1.0 - p)),
                 _seed_pointer(xp, seed, p), np.uint32(layer)))  # fmt: skip
    return dropped
