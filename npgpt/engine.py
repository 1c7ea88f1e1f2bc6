"""The two engines that compute a batch's loss and gradients: the readable reference and the fast step.

Glossary: B=batch, T=time, C=channels, NH=heads, hs=C//NH, V=vocab, N=B*T rows, L=n_layers.

Both have one interface, which `npgpt train` and `npgpt bench` drive through update.py:

    engine = make_engine("fast", model, batch_size=2, seq_len=256)    # or "reference"
    loss = engine(x, y, training=True, rng=rng, dloss=1.0, accumulate=False)   # a Python float (sync=False: maybe on the GPU)
    engine.grads        # the gradients, keyed like model.params (engine.grad_flat: their one buffer, or None)
    engine.loss(x, y)   # the mean loss without dropout and without a backward (evaluation)

dloss scales the gradients (1/grad_accum, times the fp16 loss scale); accumulate=True adds this batch's
gradients to `grads` instead of overwriting them. Neither engine steps the optimizer (update.py does).

Fine-tuning (npgpt/finetune/fast_steps.py) drives the fast engine in two halves, so that a head of its
own can sit on the final LayerNorm's output between them, and trains only some parameters:

    engine = FastLossAndGrads(model, B, T, trainable=names, lm_head=False)   # defaults: all, True
    engine.forward(idx, targets=None, training=True, rng=rng, lm_head=False)
    engine.hidden                      # (b, t, C): ln_f's output, what the LM head would read
    engine.backward(dhidden=dh)        # dh (b, t, C): the head's gradient, added to the LM head's

ReferenceLossAndGrads runs GPT.forward / GPT.backward (model.py, layers/): every layer returns a fresh
array and a cache. FastLossAndGrads computes the same numbers (tests hold them equal: float64 to
~1e-12, float32 to ~1e-5) from the fast ops of npgpt/fast/, one per readable layer, and is this file's
buffer planning and wiring:
- every activation (`Activations`) and scratch buffer (`Workspace`) is allocated once for the largest
  (B, T) and reused by every step, so there is no allocator churn; activations are 2-D (N, C), so
  each linear layer is one GEMM, whose weight gradient lands straight in one flat gradient buffer;
- each op's implementation is chosen once, when the step is built (`choose_ops`): the NumPy/CuPy fast
  op (CPU threads and cache-sized row blocks inside it), or on a GPU a hand-written CUDA kernel
  (kernels/, opt-in through NPGPT_CUDA_KERNELS) with the same arguments;
- with precision="bf16" or "fp16" (precision.py) activations and matrix products are 16-bit while the
  weights the optimizer owns ("master" weights: LayerNorm reads them directly), the gradients and
  LayerNorm / loss arithmetic stay float32; each step refreshes a 16-bit copy of the weights.
- recompute="attention" | "mlp" | "block" keeps less for the backward and recomputes it there (same
  numbers; memory.py estimates each setting): attention's probabilities a block of query rows at a
  time from the kept q and k (fast.attention_rows_*), GELU's output from its kept input, or a whole
  block's forward from its kept input, into buffers that all layers share.
Dropout masks are drawn from `rng` in the reference's order and shapes, so one generator drops the
same elements on both paths. The logits are not returned: the loss is the output.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, fields
from functools import partial
from typing import Callable

import numpy as np

from . import fast
from .backend import flat_base, get_array_module, host_scalars, views_into
from .layers.dropout import check_dropout_p, dropout_mask
from .memory import RECOMPUTE_MODES
from .parallel import num_threads
from .precision import compute_dtype, is_low_precision

IGNORE_INDEX = fast.IGNORE_INDEX  # targets equal to it count neither in the loss nor in the gradients


def make_engine(name: str, model, batch_size: int, seq_len: int, precision: str = "fp32", recompute: str = "none"):
    """The engine called `name` ("fast" or "reference") for batches of up to (batch_size, seq_len).
    "fast" first lays the model's weights out in one buffer (GPT.flatten_params_), so that AdamW can
    update them in one pass: build the optimizer after this. recompute: see FastLossAndGrads."""
    check_recompute(recompute)
    if name == "fast":
        model.flatten_params_()
        return FastLossAndGrads(model, batch_size, seq_len, precision=precision, recompute=recompute)
    if name != "reference":
        raise ValueError(f"engine must be 'fast' or 'reference', got {name!r}")
    if recompute != "none":
        raise ValueError(f"recompute {recompute!r} runs in the fast engine only (the readable reference keeps "
                         "every cache); use --engine fast or --recompute none")  # fmt: skip
    if precision != "fp32":
        raise ValueError(f"precision {precision} runs in the fast engine only; use --engine fast")
    return ReferenceLossAndGrads(model)


def accumulated(total: dict | None, grads: dict) -> dict:
    """grads, or (gradient accumulation) total with grads added into it, key by key."""
    if total is None:
        return grads
    for k, g in grads.items():
        total[k] += g
    return total


class ReferenceLossAndGrads:
    """The readable path behind the engine interface: GPT.forward and GPT.backward. `grads` are fresh
    arrays from each backward; they are released at the next call, before its forward allocates."""

    grad_flat = None  # one array per parameter, not views of one buffer

    def __init__(self, model):
        self.model, self.grads = model, None

    def __call__(self, idx, targets, training: bool = False, rng=None, dloss: float = 1.0, accumulate: bool = False,
                 backward: bool = True, sync: bool = True) -> float:  # fmt: skip
        if not accumulate:
            self.grads = None
        _, loss, cache = self.model.forward(idx, targets, training=training, rng=rng)
        if backward:
            self.grads = accumulated(self.grads, self.model.backward(cache, dloss=dloss))
        return float(loss) if sync else loss

    def loss(self, idx, targets) -> float:
        """Mean loss without dropout and without a backward (for evaluation)."""
        return self(idx, targets, training=False, backward=False)


# --- the fast step's buffers ------------------------------------------------------------------------


def _nbytes(record) -> int:
    """Bytes held by the arrays in a dataclass's fields (lists of arrays included, None skipped; an array
    listed several times, as recompute shares one buffer among the layers, counted once)."""
    total, seen = 0, set()
    for f in fields(record):
        value = getattr(record, f.name)
        for a in value if isinstance(value, list) else [value]:
            if a is not None and id(a) not in seen:
                seen.add(id(a))
                total += int(a.nbytes)
    return total


@dataclass
class Activations:
    """What the forward keeps for the backward (llm.c's ActivationTensors), per layer where it says L x.
    Sized for (B, T); a smaller batch uses the first n = b*t rows ([:n], or [:b, :, :t] per head)."""

    resid: list  # L+1 x (N, C): each block's input; resid[L] feeds ln_f
    ln1: list  # L x (N, C)
    ln1_mean: list  # L x (N,) in the weights' dtype (float32 with 16-bit compute), as every *_mean, *_rstd
    ln1_rstd: list  # L x (N,)
    qkv_heads: list  # L x (3, B, NH, T, hs): q (divided by sqrt(hs)), k, v; on the CPU the same memory as (N, 3C) [q | k | v]
    att: list  # L x (B, NH, T, T) probabilities, allocated when first used (never with flash attention)
    lse: list  # L x (B, NH, T) each row's logsumexp, with the flash-attention kernel only (else [])
    atty: list  # L x (N, C): attention's output before c_proj
    resid_mid: list  # L x (N, C): x1 = x + the attention branch
    ln2: list  # L x (N, C)
    ln2_mean: list  # L x (N,)
    ln2_rstd: list  # L x (N,)
    fc: list  # L x (N, 4C): the MLP's pre-activation (bias included), or its gelu' (FastLossAndGrads.gelu_keeps_grad)
    act: list  # L x (N, 4C): GELU's output
    lnf: object  # (N, C)
    lnf_mean: object  # (N,)
    lnf_rstd: object  # (N,)
    logits: object  # (N, V): the logits, then the probabilities, then dlogits, in place

    def nbytes(self) -> int:
        return _nbytes(self)


@dataclass
class Workspace:
    """Scratch that every layer reuses, in the forward and in the backward (named by shape, not use)."""

    dresid: object  # (N, C): the gradient of the residual stream, layer after layer
    nc: object  # (N, C): forward, a branch's output before the residual add; backward, gradients
    nc2: object  # (N, C): backward, gradients
    n3c: object  # (N, 3C): forward, the fused q|k|v projection; backward, dqkv
    n4c: object  # (N, 4C): backward, dact then dfc; LayerNorm's backward scratch (its first C columns)
    heads: object  # (3, B, NH, T, hs): forward, attention's output per head; backward, dq, dk, dv
    att: object  # (B, NH, T, T): dropped probabilities, then datt; allocated with the first Activations.att
    flash_out: object  # (B, NH, T, hs) with the flash-attention kernel, else None
    gelu: object  # (threads, rows, 8C or 16C): each CPU thread's GELU row blocks (fast.gelu_scratch)
    causal_bias: object  # (T, T): 0 on and below the diagonal, -inf above
    weight_grad: object  # 1-D: weight-gradient products in the compute dtype (accumulation, 16 bits), on first use
    att_rows: object = None  # (2, B, NH, rows, T): recomputed attention's probabilities, a block of rows at a time
    head_tmp: object = None  # (B, NH, T, hs): recomputed attention's backward, a block's partial dk / dv

    def nbytes(self) -> int:
        return _nbytes(self)


RECOMPUTE = RECOMPUTE_MODES  # what --recompute accepts


def check_recompute(recompute: str) -> str:
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute must be one of {', '.join(RECOMPUTE)}, got {recompute!r}")
    return recompute


def plan_activations(xp, cfg, B, T, dtype, stat_dtype, flash: bool, recompute: str = "none",
                     lm_head: bool = True) -> Activations:  # fmt: skip
    """recompute (what the backward recomputes instead of the forward keeping it): "attention" keeps no
    (B, NH, T, T) probabilities; "mlp" keeps GELU's input, not its output (one (N, 4C) buffer serves
    every layer); "block" keeps only each block's input (resid), every other per-layer buffer is one
    buffer shared by all layers, refilled by rerunning the block's forward in the backward.
    lm_head=False: no (N, V) logits buffer (a step that never runs the LM head)."""
    N, C, L, NH, hs = B * T, cfg.emb_dim, cfg.n_layers, cfg.n_heads, cfg.head_size
    act = lambda *shape: xp.empty(shape, dtype=dtype)  # noqa: E731
    stat = lambda *shape: xp.empty(shape, dtype=stat_dtype)  # noqa: E731

    def per_layer(make, *shape, shared=recompute == "block"):  # L buffers, or one listed L times
        return [make(*shape)] * L if shared and L else [make(*shape) for _ in range(L)]

    return Activations(
        resid=[act(N, C) for _ in range(L + 1)], ln1=per_layer(act, N, C), ln1_mean=per_layer(stat, N),
        ln1_rstd=per_layer(stat, N), qkv_heads=per_layer(act, 3, B, NH, T, hs), att=[None] * L,
        lse=per_layer(act, B, NH, T) if flash else [], atty=per_layer(act, N, C), resid_mid=per_layer(act, N, C),
        ln2=per_layer(act, N, C), ln2_mean=per_layer(stat, N), ln2_rstd=per_layer(stat, N),
        fc=per_layer(act, N, 4 * C), act=per_layer(act, N, 4 * C, shared=recompute in ("mlp", "block")),
        lnf=act(N, C), lnf_mean=stat(N), lnf_rstd=stat(N),
        logits=act(N, cfg.vocab_size) if lm_head else None,  # a step that never runs the LM head has none
    )  # fmt: skip


def plan_workspace(xp, cfg, B, T, dtype, stat_dtype, threads: int, flash: bool, recompute: str = "none") -> Workspace:
    N, C, NH, hs = B * T, cfg.emb_dim, cfg.n_heads, cfg.head_size
    by_rows = recompute in ("attention", "block") and not flash  # attention block of query rows by block
    rows = min(N, fast.ROW_BLOCK if xp is np else fast.GPU_ROW_BLOCK)
    scratch = lambda *shape: xp.empty(shape, dtype=dtype)  # noqa: E731
    return Workspace(
        dresid=scratch(N, C), nc=scratch(N, C), nc2=scratch(N, C), n3c=scratch(N, 3 * C), n4c=scratch(N, 4 * C),
        heads=scratch(3, B, NH, T, hs), att=None, flash_out=scratch(B, NH, T, hs) if flash else None,
        gelu=fast.gelu_scratch(xp, threads, rows, 4 * C, dtype, stat_dtype),
        causal_bias=xp.triu(xp.full((T, T), -np.inf, dtype=dtype), k=1), weight_grad=None,
        att_rows=fast.attention_rows_scratch(xp, B, NH, T, dtype) if by_rows else None,
        head_tmp=scratch(B, NH, T, hs) if by_rows else None,
    )  # fmt: skip


# --- which implementation runs each op ------------------------------------------------------------


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
    from .cuda import enabled_kernels

    names = (enabled_kernels() if xp is not np else set()) if kernels is None else set(kernels)
    if np.dtype(dtype) != np.float32:
        if kernels and set(kernels) - {"bmm"}:
            what = f"precision {precision!r}" if is_low_precision(dtype) else f"dtype {np.dtype(dtype).name}"
            raise ValueError(f"the CUDA kernels work in float32; {what} cannot use "
                             f"{sorted(set(kernels) - {'bmm'})} (only 'bmm')")  # fmt: skip
        names &= {"bmm"}
    if "attention" in names:
        from .cuda.kernels import ATTENTION_HEAD_SIZES

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
        from .cuda import kernels as ck
    heads_matmul = fast.matmul
    if xp is not np:
        from .cuda import blas

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


# --- the fast step ---------------------------------------------------------------------------------


class FastLossAndGrads:
    """The fast engine: loss = engine(idx, targets, ...), gradients in `engine.grads` (views of grad_flat).

    engine = FastLossAndGrads(model, batch_size=2, seq_len=256)
    loss = engine(x, y, training=True, rng=rng)   # a Python float
    optimizer.step(engine.grads)                  # the same keys as model.params
    """

    def __init__(self, model, batch_size: int, seq_len: int, kernels=None, precision: str = "fp32", trainable=None,
                 lm_head: bool = True, recompute: str = "none"):  # fmt: skip
        """kernels: names of the CUDA kernels to use (npgpt.cuda.KERNEL_NAMES; see resolve_kernels).
        precision: "fp32" (the model's dtype throughout), "bf16" or "fp16" (16-bit activations and
        matrix products, float32 weights and gradients; see precision.py).
        trainable: names of the parameters that need gradients (default: all). `grads` then holds only
        those; a frozen linear layer gets no weight-gradient GEMM, and the backward stops below the
        lowest trainable layer (GPT.backward_plan, as GPT.backward(trainable=) does).
        lm_head=False: the step never runs the LM head, so its (B*T, V) logits are not allocated.
        recompute: what the forward does not keep and the backward recomputes (same losses and
        gradients, less memory, more work): "none"; "attention", the (B, NH, T, T) probabilities,
        recomputed from q and k a block of query rows at a time (fast.attention_rows_*; the dropout
        mask is redrawn from a copy of the generator); "mlp", GELU's output, recomputed from its
        input; "block", everything but each block's input, the block's forward rerun in the backward
        (with its attention recomputed as for "attention")."""
        cfg = model.config
        if seq_len > cfg.context_length:
            raise ValueError(f"seq_len {seq_len} exceeds the model's context_length {cfg.context_length}")
        self.model, self.batch_size, self.seq_len, self.precision = model, int(batch_size), int(seq_len), precision
        self.recompute = check_recompute(recompute)
        xp = self.xp = model.xp
        self.dtype = compute_dtype(precision, model.dtype)  # activations and matrix products
        self.stat_dtype = np.dtype(model.dtype)  # weights, gradients, LayerNorm statistics, sums over rows
        self.lowp = is_low_precision(self.dtype)
        self.threads = num_threads() if xp is np else 1  # CPU threads for the elementwise ops
        self.kernels = resolve_kernels(kernels, xp, precision, self.dtype, cfg.head_size)
        flash = "attention" in self.kernels
        B, T = self.batch_size, self.seq_len
        self.acts = plan_activations(xp, cfg, B, T, self.dtype, self.stat_dtype, flash, recompute, lm_head)
        self.work = plan_workspace(xp, cfg, B, T, self.dtype, self.stat_dtype, self.threads, flash, recompute)
        self.rows_attention = self.work.att_rows is not None  # attention recomputed in the backward
        # attention's products in causal blocks of query rows on the CPU (fast.attention_causal_forward);
        # a GPU takes the whole stack in one batched product
        self.causal_rows = fast.CAUSAL_ROWS if xp is np else None
        loss_rows = fast.LOSS_ROWS if xp is np else fast.GPU_LOSS_ROWS
        self.ops = choose_ops(self.kernels, xp, self.threads, self.work.gelu, loss_rows)
        # on the CPU c_attn writes qkv into the layer's saved buffer and attention reads q, k, v there
        # (fast.attention_in_place_*), with no copies into and out of the heads layout
        self.qkv_in_place = xp is np and self.ops.flash_forward is None and not self.rows_attention
        # GELU's derivative computed in the forward and kept in place of its input (fast/gelu.py's second
        # pair): not with the CUDA kernel or 16-bit activations, nor when the backward rebuilds GELU's
        # output from that input (recompute="mlp")
        self.gelu_keeps_grad = "gelu" not in self.kernels and not self.lowp and self.recompute != "mlp"
        # The gradients: one flat buffer (float32 also with 16-bit compute), a view per trainable parameter.
        need, self.lowest = model.backward_plan(trainable)  # lowest: -1 the embeddings, ..., L + 1 nothing
        shapes = {k: p for k, p in model.params.items() if k in need}
        self.grad_flat = xp.zeros(sum(int(p.size) for p in shapes.values()), dtype=self.stat_dtype)
        self.grads = views_into(self.grad_flat, shapes)
        self._sink = None  # (2, C): where a frozen LayerNorm's parameter sums go, allocated on first use
        # The weights the GEMMs read: the model's own, or a 16-bit copy refreshed at every call.
        self.param_flat, self.weights = None, model.params
        if self.lowp:
            self.param_flat = xp.empty(self.grad_flat.size, dtype=self.dtype)
            self.weights = views_into(self.param_flat, model.params)
        # Gradients that ops add into (LayerNorm's, the position table's, an untied token table's):
        # zeroed at the start of a backward that does not accumulate. Every other one is written.
        self._added_into = [k for k in model.params if ".ln_" in f".{k}" or k == "wpe.weight"]
        if not cfg.tie_weights:
            self._added_into.append("wte.weight")
        self._added_into = [k for k in self._added_into if k in self.grads]
        self._pending = None  # what the last forward leaves for its backward
        self._shape = None  # (b, t) of the last forward
        self._want_grad = False  # whether the last forward prepared a backward
        self.masks = None  # the dropout keep-masks of the last training forward
        self.used_flash = [False] * cfg.n_layers  # which layers took the flash kernel in the last forward

    def nbytes(self) -> int:
        """Bytes held by this step's buffers: activations, workspace, gradients, 16-bit weights, and the
        dropout keep-masks of the last training forward."""
        extra = self.param_flat.nbytes if self.param_flat is not None else 0
        return self.acts.nbytes() + self.work.nbytes() + int(self.grad_flat.nbytes) + int(extra) + self.masks_nbytes()

    def masks_nbytes(self) -> int:
        """Bytes of the dropout keep-masks the last training forward kept (generator copies not counted)."""
        return sum(int(m.nbytes) for m in (self.masks or {}).values() if hasattr(m, "nbytes"))

    def _check(self, idx, targets):
        """(idx, targets, n_valid) as arrays of the model's module; ValueError for what does not fit.
        The ids are checked where they are: NumPy ids (what training feeds) on the host before the copy
        to the GPU, so the check never waits for the GPU; ids already on a GPU there, read back once."""
        V = self.model.config.vocab_size
        here = get_array_module(idx, targets)  # where the ids are now
        idx = here.asarray(idx)
        if idx.ndim != 2 or idx.dtype.kind not in "iu":
            raise ValueError(f"idx must be a (B, T) integer array, got shape {tuple(idx.shape)} dtype {idx.dtype}")
        b, t = idx.shape
        if b > self.batch_size or t > self.seq_len or b < 1 or t < 1:
            raise ValueError(f"batch of shape ({b}, {t}) does not fit this step's buffers ({self.batch_size}, {self.seq_len})")
        stats = [idx.min(), idx.max()]
        if targets is not None:
            targets = here.asarray(targets)
            if targets.shape != idx.shape:
                raise ValueError(f"targets have shape {tuple(targets.shape)}, idx {tuple(idx.shape)}")
            valid = targets != IGNORE_INDEX
            stats += [valid.sum(), here.where(valid, targets, 0).min(), targets.max()]
        stats = [int(v) for v in host_scalars(*stats)]  # no wait for NumPy ids, one read for CuPy ones
        if stats[0] < 0 or stats[1] >= V:
            raise ValueError(f"token ids must lie in [0, {V})")
        if targets is None:
            return self.xp.asarray(idx), None, 0
        n_valid, low, high = stats[2:]
        if n_valid == 0:
            raise ValueError(f"every target equals ignore_index={IGNORE_INDEX}, so the mean loss is undefined")
        if low < 0 or high >= V:
            raise ValueError(f"targets must lie in [0, {V}) or equal ignore_index={IGNORE_INDEX}")
        return self.xp.asarray(idx), self.xp.asarray(targets), n_valid

    def __call__(self, idx, targets, training: bool = False, rng=None, dloss: float = 1.0, accumulate: bool = False,
                 backward: bool = True, sync: bool = True) -> float:  # fmt: skip
        """Forward (and backward unless backward=False) on one batch; returns the mean loss over the
        targets that are not IGNORE_INDEX: a Python float, or with sync=False on a GPU a 0-d device
        array (nothing waits for the GPU; update.py reads it together with the gradient norm)."""
        loss = self.forward(idx, targets, training=training, rng=rng, dloss=dloss, backward=backward, sync=sync)
        if backward:
            self.backward(accumulate=accumulate)
        return loss

    def forward(self, idx, targets=None, training: bool = False, rng=None, dloss: float = 1.0, backward: bool = True,
                lm_head: bool = True, sync: bool = True) -> float | None:  # fmt: skip
        """The forward half of __call__: the mean loss over the targets that are not IGNORE_INDEX (None
        without targets; with sync=False a 0-d device array, as __call__ says). With backward=True the
        gradient of dloss * loss is left in the logits for backward(). lm_head=False stops after the final
        LayerNorm (`hidden`): no logits, no targets."""
        if not lm_head and targets is not None:
            raise ValueError("targets need the LM head's logits; pass lm_head=True or no targets")
        if lm_head and self.acts.logits is None:
            raise ValueError("this step was built with lm_head=False, so it has no logits buffer; pass lm_head=False")
        idx, targets, n_valid = self._check(idx, targets)
        p = check_dropout_p(self.model.config.drop_rate) if training else 0.0
        if p > 0.0 and rng is None:
            rng = self.model.rng
        b, t = idx.shape
        if self.lowp:  # this step's 16-bit copy of the (float32) weights
            src = flat_base(self.model.params)
            if src is not None:
                self.param_flat[...] = src
            else:
                for k, w in self.model.params.items():
                    self.weights[k][...] = w
        with self._overflow_allowed():
            loss = self._forward(idx, targets, n_valid, b, t, p, rng, want_grad=backward, dloss=dloss, lm_head=lm_head)
        self._pending = (idx, b, t, p, targets is not None and backward) if backward else None
        return float(loss) if sync and loss is not None else loss

    def backward(self, dhidden=None, accumulate: bool = False) -> None:
        """The backward half of __call__, after forward(..., backward=True): the gradients of the
        trainable parameters into `grads` (written, or added into with accumulate=True). dhidden: an
        upstream gradient of `hidden`, (b, t, C), added to what the LM head sends back (or alone when
        the forward had no targets)."""
        if self._pending is None:
            raise ValueError("backward() needs a forward(..., backward=True) on this step first")
        idx, b, t, p, head = self._pending
        if dhidden is None and not head:
            raise ValueError("backward has nothing to differentiate: the forward had no targets, so pass dhidden")
        shape = (b, t, self.model.config.emb_dim)
        if dhidden is not None and tuple(dhidden.shape) != shape:
            raise ValueError(f"dhidden has shape {tuple(dhidden.shape)}; the forward's hidden is {shape}")
        with self._overflow_allowed():
            self._backward(idx, b, t, p, accumulate, head=head, dhidden=dhidden)

    @property
    def hidden(self):
        """(b, t, C): the final LayerNorm's output of the last forward (a view of this step's buffer)."""
        if self._shape is None:
            raise ValueError("no forward has run on this step yet")
        b, t = self._shape
        return self.acts.lnf[: b * t].reshape(b, t, self.model.config.emb_dim)

    def _overflow_allowed(self):
        # float16 overflows to inf by design: loss scaling (update.py) finds it in the gradients and backs off
        return np.errstate(over="ignore", invalid="ignore") if self.dtype == np.float16 else contextlib.nullcontext()

    def loss(self, idx, targets) -> float:
        """Mean loss without dropout and without a backward (for evaluation)."""
        return self(idx, targets, training=False, backward=False)

    # --- forward: model.py's and layers/block.py's order --------------------------------------------
    def _forward(self, idx, targets, n_valid, b, t, p, rng, want_grad, dloss, lm_head=True):
        a, cfg, weights = self.acts, self.model.config, self.weights
        n, masks = b * t, {}
        self._shape, self._want_grad = (b, t), want_grad
        x = a.resid[0][:n]
        fast.embedding_forward(x, idx.reshape(-1), weights["wte.weight"])  # (n, C) token embeddings
        fast.add_position_embedding_(x.reshape(b, t, cfg.emb_dim), weights["wpe.weight"])  # + positions
        if p > 0:
            masks["emb"] = fast.dropout_forward(x, x, p, rng)
        for l in range(cfg.n_layers):  # noqa: E741
            x = self._block_forward(l, x, b, t, p, rng, masks)
        self._layernorm("ln_f", a.lnf[:n], a.lnf_mean[:n], a.lnf_rstd[:n], x)
        self.masks = masks
        if not lm_head:  # a head of the caller's reads `hidden` (ln_f's output)
            return None
        head = weights["wte.weight"] if cfg.tie_weights else weights["lm_head.weight"]  # (V, C)
        fast.linear_forward(a.logits[:n], a.lnf[:n], head.T)  # (n, C) @ (C, V) -> (n, V)
        if targets is None:
            return None
        # the gradient left in the logits is dloss * (softmax - onehot) / n_valid: scaled before any rounding
        return self.ops.cross_entropy_(a.logits[:n], targets.reshape(-1), want_grad, dloss, n_valid=n_valid)

    def _block_forward(self, l, x, b, t, p, rng, masks, replay: bool = False):  # noqa: E741
        """x1 = x + dropout(c_proj(attention(c_attn(ln_1(x))))); out = x1 + dropout(mlp(ln_2(x1))).
        replay (recompute="block", in the backward): the same forward again with the same dropout
        masks, up to GELU's output (the MLP's c_proj output is not needed by the backward)."""
        a, w, weights, n, pre = self.acts, self.work, self.weights, b * t, f"h.{l}."
        h, y, branch = a.ln1[l][:n], a.atty[l][:n], w.nc[:n]
        qkv = self._saved_qkv(l, n) if self.qkv_in_place else w.n3c[:n]
        self._layernorm(pre + "ln_1", h, a.ln1_mean[l][:n], a.ln1_rstd[l][:n], x)
        fast.linear_forward(qkv, h, weights[pre + "attn.c_attn.weight"], weights.get(pre + "attn.c_attn.bias"))  # (n, 3C)
        mask = self._attention_forward(l, y, qkv, b, t, p, rng, masks, replay)  # (n, 3C) -> (n, C)
        if not replay:
            masks[f"att{l}"] = mask
        fast.linear_forward(branch, y, weights[pre + "attn.c_proj.weight"], weights[pre + "attn.c_proj.bias"])
        if p > 0:
            self._dropout(branch, p, rng, masks, f"res1_{l}", replay)
        x1 = a.resid_mid[l][:n]
        self.xp.add(x, branch, out=x1)  # shortcut around attention
        h2, fc, act = a.ln2[l][:n], a.fc[l][:n], a.act[l][:n]
        self._layernorm(pre + "ln_2", h2, a.ln2_mean[l][:n], a.ln2_rstd[l][:n], x1)
        fast.linear_forward(fc, h2, weights[pre + "mlp.c_fc.weight"])  # (n, 4C); the bias is added by GELU
        if self.gelu_keeps_grad and self._want_grad:  # fc becomes gelu'(fc + bias), what the backward multiplies by
            fast.gelu_forward_keep_grad(act, fc, weights[pre + "mlp.c_fc.bias"], scratch=self.work.gelu, threads=self.threads)
        else:
            self.ops.gelu_forward(act, fc, weights[pre + "mlp.c_fc.bias"])
        if replay:
            return None
        fast.linear_forward(branch, act, weights[pre + "mlp.c_proj.weight"], weights[pre + "mlp.c_proj.bias"])  # (n, C)
        if p > 0:
            self._dropout(branch, p, rng, masks, f"res2_{l}", replay)
        out = a.resid[l + 1][:n]
        self.xp.add(x1, branch, out=out)  # shortcut around the MLP
        return out

    def _saved_qkv(self, l, n):  # noqa: E741
        """Layer l's saved attention state as (n, 3C) [q' | k | v] (qkv_in_place): the memory of its
        qkv_heads buffer, which this path fills in qkv's layout."""
        return self.acts.qkv_heads[l].reshape(-1)[: n * 3 * self.model.config.emb_dim].reshape(n, -1)

    def _dropout(self, x, p, rng, masks, key, replay):
        """Dropout on x in place: a fresh mask kept in masks[key], or (replay) the one kept there."""
        if replay:
            fast.dropout_backward(x, x, masks[key], p)  # the same product: x * keep / (1 - p)
        else:
            masks[key] = fast.dropout_forward(x, x, p, rng)

    def _attention_forward(self, l, y, qkv, b, t, p, rng, masks=None, replay=False):  # noqa: E741
        a, w = self.acts, self.work
        heads = a.qkv_heads[l][:, :b, :, :t]  # (3, b, NH, t, hs)
        self.used_flash[l] = self.ops.flash_forward is not None and p == 0  # the kernel has no dropout
        if self.used_flash[l]:  # O(T) memory: keeps each row's logsumexp, not the probabilities
            self.ops.flash_forward(y, heads, a.lse[l][:b, :, :t], qkv, head_out=w.flash_out[:b, :, :t])
            return None
        if self.rows_attention:  # nothing T x T is kept: the backward recomputes it (recompute="attention")
            fast.split_heads_into(heads, qkv)
            keep = None
            if p > 0:  # keep a copy of the generator, not the mask: the backward draws the mask again
                if replay:
                    keep = self._attention_mask(l, b, t, p, masks)
                else:
                    try:
                        masks[f"att_rng{l}"] = copy.deepcopy(rng)
                    except Exception:  # a generator that cannot be copied: the mask itself is kept
                        masks[f"att_rng{l}"] = None
                    keep = dropout_mask((b, heads.shape[2], t, t), p, rng, self.xp)
                    if masks[f"att_rng{l}"] is None:
                        masks[f"att_keep{l}"] = keep
            head_out = w.heads[0, :b, :, :t]
            fast.attention_rows_forward(head_out, heads[0], heads[1], heads[2], w.causal_bias[:t, :t], keep,
                                        self.dtype.type(1.0 / (1.0 - p)), scratch=w.att_rows[:, :b, :, :, :t],
                                        matmul=self.ops.heads_matmul)  # fmt: skip
            fast.merge_heads_into(y, head_out)
            return None
        if a.att[l] is None:  # the O(T^2) buffers, only once this path is taken
            a.att[l] = self.xp.empty((self.batch_size, heads.shape[2], self.seq_len, self.seq_len), dtype=self.dtype)
            if w.att is None:
                w.att = self.xp.empty_like(a.att[l])
        att, dropped, head_out = a.att[l][:b, :, :t, :t], w.att[:b, :, :t, :t], w.heads[0, :b, :, :t]
        if self.qkv_in_place:  # qkv is the layer's saved buffer: q is scaled there, nothing is copied
            return fast.attention_in_place_forward(y, qkv, att, w.causal_bias[:t, :t], p, rng, dropped=dropped,
                                                   rows=self.causal_rows, matmul=self.ops.heads_matmul)  # fmt: skip
        return fast.attention_forward(y, heads, att, qkv, w.causal_bias[:t, :t], p, rng, dropped=dropped, head_out=head_out,
                                      matmul=self.ops.heads_matmul, rows=self.causal_rows)  # fmt: skip

    # --- backward: the same lines in reverse order ------------------------------------------------
    def _backward(self, idx, b, t, p, accumulate, head=True, dhidden=None):
        """head: the LM head's loss gradient is in the logits; dhidden: a gradient of ln_f's output to add.
        Frozen parameters have no entry in `grads` (see __init__'s trainable)."""
        a, w, cfg, grads = self.acts, self.work, self.model.config, self.grads
        n = b * t
        if not accumulate:  # the weight GEMMs write their gradients; these are added into
            for key in self._added_into:
                grads[key][...] = 0
        head_key = "wte.weight" if cfg.tie_weights else "lm_head.weight"
        dx, dhead = w.dresid[:n], grads.get(head_key)
        below = self.lowest <= cfg.n_layers  # something under the LM head trains
        if head:
            # logits = lnf @ head^T: the (V, C) gradient is computed in its own layout (fast/linear.py)
            layer = (self.weights[head_key].T, None if dhead is None else dhead.T, None)  # (C, V) views of (V, C)
            self._linear_backward(dx if below else None, a.logits[:n], a.lnf[:n], layer, accumulate)
        elif dhead is not None and not accumulate:
            dhead[...] = 0  # no LM loss reached the head (a tied table still gets its embedding rows below)
        if not below:
            return
        if dhidden is not None:  # a head of the caller's on ln_f's output: the two gradients add up
            dh = dhidden.reshape(n, cfg.emb_dim)
            if head:
                dx += dh
            else:
                dx[...] = dh
        self._layernorm_backward("ln_f", w.nc[:n], dx, a.resid[cfg.n_layers][:n], a.lnf_mean[:n], a.lnf_rstd[:n], w.nc2[:n])
        dx[...] = w.nc[:n]  # d(resid[L])
        for l in reversed(range(max(self.lowest, 0), cfg.n_layers)):  # noqa: E741  (none below the lowest trainable)
            self._block_backward(l, dx, b, t, p, accumulate)
        if self.lowest >= 0:  # the embeddings are frozen
            return
        if p > 0:
            fast.dropout_backward(dx, dx, self.masks["emb"], p)
        # x = wte[idx] + wpe[:t]
        if "wte.weight" in grads:
            fast.embedding_backward(grads["wte.weight"], dx, idx.reshape(-1))
        if "wpe.weight" in grads:
            fast.position_embedding_backward(grads["wpe.weight"], dx.reshape(b, t, cfg.emb_dim))

    def _block_backward(self, l, dx, b, t, p, accumulate):  # noqa: E741
        """dx holds d(out) on entry and d(x) on exit."""
        a, w, n, pre = self.acts, self.work, b * t, f"h.{l}."
        if self.recompute == "block":  # refill the shared buffers with this block's forward
            self._block_forward(l, a.resid[l][:n], b, t, p, None, self.masks, replay=True)
        elif self.recompute == "mlp":  # GELU's output from its input (bias included)
            self.ops.gelu_forward(a.act[l][:n], a.fc[l][:n], None)
        scratch = w.n4c[:n, : self.model.config.emb_dim]  # LayerNorm's backward scratch, free by then
        # out = x1 + dropout(mlp(ln_2(x1)))
        dm = dx
        if p > 0:
            dm = w.nc[:n]
            fast.dropout_backward(dm, dx, self.masks[f"res2_{l}"], p)
        dact, dh2, dln = w.n4c[:n], w.nc2[:n], w.nc[:n]
        self._linear_backward(dact, dm, a.act[l][:n], self._layer(pre + "mlp.c_proj"), accumulate)
        if self.gelu_keeps_grad:
            fast.gelu_backward_saved_(dact, a.fc[l][:n], threads=self.threads)  # dfc = dact * gelu'
        else:
            self.ops.gelu_backward_(dact, a.fc[l][:n])  # dact becomes dfc, in place
        self._linear_backward(dh2, dact, a.ln2[l][:n], self._layer(pre + "mlp.c_fc"), accumulate)
        self._layernorm_backward(pre + "ln_2", dln, dh2, a.resid_mid[l][:n], a.ln2_mean[l][:n], a.ln2_rstd[l][:n], scratch)
        dx += dln  # dx1 = dout + branch
        # x1 = x + dropout(c_proj(attention(c_attn(ln_1(x)))))
        da = dx
        if p > 0:
            da = w.nc[:n]
            fast.dropout_backward(da, dx, self.masks[f"res1_{l}"], p)
        dy, dqkv, dh, dln = w.nc2[:n], w.n3c[:n], w.nc[:n], w.nc2[:n]
        self._linear_backward(dy, da, a.atty[l][:n], self._layer(pre + "attn.c_proj"), accumulate)
        self._attention_backward(l, dqkv, dy, b, t, p)
        self._linear_backward(dh, dqkv, a.ln1[l][:n], self._layer(pre + "attn.c_attn"), accumulate)
        self._layernorm_backward(pre + "ln_1", dln, dh, a.resid[l][:n], a.ln1_mean[l][:n], a.ln1_rstd[l][:n], scratch)
        dx += dln

    def _attention_backward(self, l, dqkv, dy, b, t, p):  # noqa: E741
        a, w = self.acts, self.work
        heads, dheads = a.qkv_heads[l][:, :b, :, :t], w.heads[:, :b, :, :t]
        if self.used_flash[l]:
            self.ops.flash_backward(dqkv, dy, heads, a.lse[l][:b, :, :t], a.atty[l][: b * t], dheads=dheads,
                                    head_out=w.flash_out[:b, :, :t])  # fmt: skip
            return
        if self.rows_attention:
            dheads[0][...] = dy.reshape(b, t, -1, heads.shape[-1]).transpose(0, 2, 1, 3)  # dy in dq's slot
            keep = self._attention_mask(l, b, t, p, self.masks) if p > 0 else None
            fast.attention_rows_backward_(dheads[0], dheads[1], dheads[2], heads[0], heads[1], heads[2],
                                          w.causal_bias[:t, :t], keep, self.dtype.type(1.0 / (1.0 - p)),
                                          self.dtype.type(1.0 / np.sqrt(heads.shape[-1])),
                                          scratch=w.att_rows[:, :b, :, :, :t], tmp=w.head_tmp[:b, :, :t],
                                          matmul=self.ops.heads_matmul)  # fmt: skip
            dqkv.reshape(b, t, 3, heads.shape[2], heads.shape[-1])[...] = dheads.transpose(1, 3, 0, 2, 4)
            return
        keep = self.masks[f"att{l}"] if p > 0 else None
        att, datt = a.att[l][:b, :, :t, :t], w.att[:b, :, :t, :t]
        if self.qkv_in_place:
            fast.attention_in_place_backward(dqkv, dy, self._saved_qkv(l, b * t), att, keep, p, datt=datt,
                                             rows=self.causal_rows, matmul=self.ops.heads_matmul)  # fmt: skip
            return
        fast.attention_backward(dqkv, dy, heads, att, keep, p, dheads=dheads, datt=datt, matmul=self.ops.heads_matmul,
                                rows=self.causal_rows)  # fmt: skip

    def _attention_mask(self, l, b, t, p, masks):  # noqa: E741
        """Layer l's attention dropout mask drawn again from the copy of the generator the forward kept."""
        if masks[f"att_rng{l}"] is None:
            return masks[f"att_keep{l}"]
        return dropout_mask((b, self.model.config.n_heads, t, t), p, copy.deepcopy(masks[f"att_rng{l}"]), self.xp)

    def _layernorm(self, name, out, mean, rstd, x):
        """LayerNorm `name` (e.g. 'h.0.ln_1') with the model's own weights (float32 also with 16-bit compute)."""
        weight, bias = self.model.params[name + ".weight"], self.model.params[name + ".bias"]
        self.ops.layernorm_forward(out, mean, rstd, x, weight, bias, self.model.config.ln_eps)

    def _layernorm_backward(self, name, dx, dout, x, mean, rstd, scratch):
        """dx, and LayerNorm `name`'s gradients added into (a frozen one's into a scratch nobody reads:
        they are sums over the rows, no GEMM, and the CUDA kernel writes them with dx)."""
        dweight, dbias = self.grads.get(name + ".weight"), self.grads.get(name + ".bias")
        if dweight is None or dbias is None:
            if self._sink is None:
                self._sink = self.xp.empty((2, self.model.config.emb_dim), dtype=self.stat_dtype)
            dweight = self._sink[0] if dweight is None else dweight
            dbias = self._sink[1] if dbias is None else dbias
        weight = self.model.params[name + ".weight"]
        self.ops.layernorm_backward(dx, dweight, dbias, dout, x, mean, rstd, weight, scratch=scratch)

    def _layer(self, name):
        """(weight, its gradient, the bias's gradient) of the linear layer `name`, e.g. 'h.0.mlp.c_fc'; a
        gradient is None for a layer without bias or a frozen parameter (its GEMM is then skipped)."""
        return self.weights[name + ".weight"], self.grads.get(name + ".weight"), self.grads.get(name + ".bias")

    def _linear_backward(self, dx, dout, x, layer, accumulate):
        """dx, and the gradients of layer = (weight, dweight, dbias) written, or added into when accumulating."""
        scratch = None
        if accumulate or self.lowp:  # the weight product goes through a compute-dtype buffer first
            if self.work.weight_grad is None:
                largest = max((int(g.size) for g in self.grads.values() if g.ndim == 2), default=1)
                self.work.weight_grad = self.xp.empty(largest, dtype=self.dtype)
            scratch = self.work.weight_grad
        weight, dweight, dbias = layer
        fast.linear_backward(dx, dweight, dbias, dout, x, weight, accumulate, scratch=scratch)
