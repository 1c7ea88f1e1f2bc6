"""GPT-2's fast engine: the parts of npgpt/engine/ assembled into one training step.

Glossary: B=batch, T=time, C=channels, V=vocab; b, t: this batch's (at most B, T); n = b*t rows; L=n_layers.

    x = Embeddings(idx);  x = Blocks.forward(l, x) for each l;  h = ln_f(x);  loss = LMHead(h)
    and back: LMHead -> ln_f -> Blocks.backward(l) for each l, top first -> Embeddings

FastLossAndGrads plans the buffers (buffers.py), chooses the ops (ops.py) and the attention path
(attention.py) once, and assembles the parts (parts.py, block.py, ends.py); a step is the lines above.
"""

from __future__ import annotations

import numpy as np

from .. import fast
from ..backend import flat_base, get_array_module, host_scalars, views_into
from ..layers.dropout import check_dropout_p
from ..memory import VOCAB_MULTIPLE, padded_vocab
from ..parallel import num_threads
from ..precision import compute_dtype, is_low_precision
from .attention import FlashAttention, choose_attention
from .block import Blocks, Recompute
from .buffers import check_recompute, plan_activations, plan_workspace
from .ends import Embeddings, LMHead
from .ops import choose_ops, resolve_kernels
from .parts import Dropout, Gradients, LayerNorms, Trainable, overflow_allowed

IGNORE_INDEX = fast.IGNORE_INDEX  # targets equal to it count neither in the loss nor in the gradients


class _Reassembles:
    """An engine setting the parts are assembled from (ops, qkv_in_place, causal_rows): setting it once the
    engine is built assembles them again (so a test can run, say, a GPU's attention layout on the CPU)."""

    def __set_name__(self, owner, name):
        self.name = "_" + name

    def __get__(self, engine, owner=None):
        return self if engine is None else getattr(engine, self.name)

    def __set__(self, engine, value):
        setattr(engine, self.name, value)
        if getattr(engine, "blocks", None) is not None:
            engine._assemble()


class FastLossAndGrads:
    """The fast engine: loss = engine(idx, targets, ...), gradients in `engine.grads` (views of grad_flat).

    engine = FastLossAndGrads(model, batch_size=2, seq_len=256)
    loss = engine(x, y, training=True, rng=rng)   # a Python float
    optimizer.step(engine.grads)                  # the same keys as model.params
    """

    ops = _Reassembles()  # the implementation of each op (ops.py)
    qkv_in_place = _Reassembles()  # attention reads q, k, v inside c_attn's output (the CPU; InPlaceAttention)
    causal_rows = _Reassembles()  # attention's products in causal blocks of this many query rows, or None (a GPU)

    def __init__(self, model, batch_size: int, seq_len: int, kernels=None, precision: str = "fp32", trainable=None,
                 lm_head: bool = True, recompute: str = "none", vocab_multiple: int | None = None):  # fmt: skip
        """kernels: names of the CUDA kernels to use (npgpt.cuda.KERNEL_NAMES; see ops.resolve_kernels).
        precision: "fp32" (the model's dtype throughout), "bf16" or "fp16" (16-bit activations and
        matrix products, float32 weights and gradients; see precision.py).
        trainable: names of the parameters that need gradients (default: all). `grads` then holds only
        those; a frozen linear layer gets no weight-gradient GEMM, and the backward stops below the
        lowest trainable layer (GPT.backward_plan, as GPT.backward(trainable=) does).
        lm_head=False: the step never runs the LM head, so its (B*T, V) logits are not allocated.
        recompute: what the forward does not keep and the backward recomputes: "none", "attention",
        "mlp" or "block" (block.Recompute).
        vocab_multiple: the LM head's vocabulary is padded to a multiple of this for its GEMMs (ends.py;
        the loss, the gradients, `logits` and the model keep V); default memory.VOCAB_MULTIPLE, 128 on
        a GPU and 1 (no padding) on the CPU."""
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
        # The fused softmax path is preferred to the flash kernel, except where the probabilities are not
        # to be kept (recompute): there the flash kernel runs under RecomputedAttention as before.
        fused = "attention_softmax" in self.kernels and not Recompute(recompute).attention
        flash = "attention" in self.kernels and not fused
        B, T = self.batch_size, self.seq_len
        multiple = VOCAB_MULTIPLE["cpu" if xp is np else "gpu"] if vocab_multiple is None else vocab_multiple
        self.padded_vocab = padded_vocab(cfg.vocab_size, multiple) if lm_head else cfg.vocab_size  # Vp
        self.acts = plan_activations(xp, cfg, B, T, self.dtype, self.stat_dtype, flash, recompute, lm_head, self.padded_vocab)
        self.work = plan_workspace(xp, cfg, B, T, self.dtype, self.stat_dtype, self.threads, flash, recompute, self.padded_vocab)
        need, self.lowest = model.backward_plan(trainable)  # lowest: -1 the embeddings, ..., L + 1 nothing
        self.trainable = Trainable(frozenset(need), self.lowest)
        # LayerNorm's gradients, the position table's and an untied token table's are added into
        added = [k for k in model.params if ".ln_" in f".{k}" or k == "wpe.weight" or (k == "wte.weight" and not cfg.tie_weights)]
        self.gradients = Gradients(xp, model.params, need, self.stat_dtype, self.dtype, added)
        self.grad_flat, self.grads = self.gradients.flat, self.gradients.views
        # The weights the GEMMs read: the model's own, or a 16-bit copy refreshed at every call, unless
        # weights_copy_current says it holds the current weights already (update.Updater sets it while its
        # AdamW step writes the copy in the same pass as the update).
        self.param_flat, self.weights, self.weights_copy_current = None, model.params, False
        if self.lowp:
            self.param_flat = xp.empty(sum(int(p.size) for p in model.params.values()), dtype=self.dtype)
            self.weights = views_into(self.param_flat, model.params)
        self.drop = Dropout()  # the dropout masks of the last training forward
        self._pending = None  # what the last forward leaves for its backward
        self._shape = None  # (b, t) of the last forward
        self.blocks = None
        loss_rows = fast.LOSS_ROWS if xp is np else fast.GPU_LOSS_ROWS
        self.ops = choose_ops(self.kernels, xp, self.threads, self.work.gelu, loss_rows)
        self.causal_rows = fast.CAUSAL_ROWS if xp is np else None  # a GPU takes the whole stack in one product
        self.qkv_in_place = xp is np and not flash and not fused and not Recompute(recompute).attention
        self._assemble()

    def _assemble(self) -> None:
        """The parts, from the buffers, the ops and the settings: the attention path is chosen here."""
        recompute = Recompute(self.recompute)
        self.attention = choose_attention(self.acts, self.work, self.ops, in_place=self.qkv_in_place, rows=self.causal_rows,
                                          recompute=recompute.attention)  # fmt: skip
        self.norms = LayerNorms(self.model, self.gradients, self.ops)
        # GELU's derivative kept in place of its input (fast/gelu.py's second pair): not with the CUDA
        # kernel or 16-bit activations, nor when the backward rebuilds GELU's output from that input
        gelu_keeps_grad = "gelu" not in self.kernels and not self.lowp and not recompute.gelu_input_only
        parts = (self.gradients, self.norms, self.drop, self.attention, recompute)
        self.blocks = Blocks(self.model, self.acts, self.work, self.weights, parts, self.ops, self.threads, gelu_keeps_grad)
        self.embeddings = Embeddings(self.model.config, self.weights, self.gradients, self.drop)
        self.head = LMHead(self.model.config, self.acts, self.work, self.weights, self.gradients, self.ops)

    @property
    def used_flash(self) -> list:
        """Which layers took the flash kernel in the last forward."""
        if isinstance(self.attention, FlashAttention):
            return self.attention.used
        return [False] * self.model.config.n_layers

    @property
    def masks(self):
        """The dropout keep-masks of the last forward, by key."""
        return self.drop.masks

    def nbytes(self) -> int:
        """Bytes held by this step's buffers: activations, workspace, gradients, 16-bit weights, and the
        dropout keep-masks of the last training forward."""
        extra = self.param_flat.nbytes if self.param_flat is not None else 0
        return self.acts.nbytes() + self.work.nbytes() + self.gradients.nbytes() + int(extra) + self.masks_nbytes()

    def masks_nbytes(self) -> int:
        """Bytes of the dropout keep-masks the last training forward kept (generator copies not counted)."""
        return self.drop.nbytes()

    def __call__(self, idx, targets, training: bool = False, rng=None, dloss: float = 1.0, accumulate: bool = False,
                 backward: bool = True, sync: bool = True) -> float:  # fmt: skip
        """Forward (and backward unless backward=False) on one batch; returns the mean loss over the
        targets that are not IGNORE_INDEX: a Python float, or with sync=False on a GPU a 0-d device
        array (nothing waits for the GPU; update.py reads it together with the gradient norm)."""
        loss = self.forward(idx, targets, training=training, rng=rng, dloss=dloss, backward=backward, sync=sync)
        if backward:
            self.backward(accumulate=accumulate)
        return loss

    def loss(self, idx, targets) -> float:
        """Mean loss without dropout and without a backward (for evaluation)."""
        return self(idx, targets, training=False, backward=False)

    def forward(self, idx, targets=None, training: bool = False, rng=None, dloss: float = 1.0, backward: bool = True,
                lm_head: bool = True, sync: bool = True) -> float | None:  # fmt: skip
        """The forward half of __call__: the mean loss over the targets that are not IGNORE_INDEX (None
        without targets; with sync=False a 0-d device array, as __call__ says). With backward=True the
        gradient of dloss * loss is left in the logits for backward(). lm_head=False stops after the final
        LayerNorm (`hidden`): no logits, no targets. lm_head=True without targets leaves the logits in
        `logits`, for a loss of the caller's (backward(dlogits=...))."""
        if not lm_head and targets is not None:
            raise ValueError("targets need the LM head's logits; pass lm_head=True or no targets")
        if lm_head and self.acts.logits is None:
            raise ValueError("this step was built with lm_head=False, so it has no logits buffer; pass lm_head=False")
        idx, targets, n_valid = check_batch(self.xp, idx, targets, self.model.config.vocab_size, (self.batch_size, self.seq_len))
        p = check_dropout_p(self.model.config.drop_rate) if training else 0.0
        self.drop.start(p, self.model.rng if p > 0.0 and rng is None else rng)
        b, t = idx.shape
        n, self._shape = b * t, (b, t)
        self._refresh_low_precision_weights()
        with overflow_allowed(self.dtype):
            x = self.embeddings.forward(self.acts.resid[0][:n], idx, b, t)
            for l in range(self.model.config.n_layers):  # noqa: E741
                x = self.blocks.forward(l, x, b, t, want_grad=backward)
            self.norms.forward("ln_f", self.acts.lnf[:n], self.acts.lnf_mean[:n], self.acts.lnf_rstd[:n], x)
            loss = self.head.forward(n, targets, backward, dloss, n_valid) if lm_head else None
        self._pending = (idx, b, t, targets is not None and backward, lm_head) if backward else None
        return float(loss) if sync and loss is not None else loss

    def backward(self, dhidden=None, accumulate: bool = False, dlogits=None) -> None:
        """The backward half of __call__, after forward(..., backward=True): the gradients of the
        trainable parameters into `grads` (written, or added into with accumulate=True). dhidden: an
        upstream gradient of `hidden`, (b, t, C), added to what the LM head sends back (or alone when
        the forward had no targets). dlogits: (b*t, V), the gradient of `logits` from a loss of the
        caller's, after a forward with the LM head and no targets (`logits` itself, written in place,
        is not copied)."""
        if self._pending is None:
            raise ValueError("backward() needs a forward(..., backward=True) on this step first")
        idx, b, t, head, ran_head = self._pending
        C = self.model.config.emb_dim
        if dlogits is not None:
            if head or not ran_head:
                raise ValueError("dlogits needs a forward with lm_head=True and no targets (the loss is then the caller's)")
            if tuple(dlogits.shape) != tuple(self.logits.shape):
                raise ValueError(f"dlogits has shape {tuple(dlogits.shape)}; the forward's logits are {tuple(self.logits.shape)}")
            if dlogits is not self.logits:
                self.logits[...] = dlogits
            head = True
        if dhidden is None and not head:
            raise ValueError("backward has nothing to differentiate: the forward had no targets, so pass dhidden or dlogits")
        if dhidden is not None and tuple(dhidden.shape) != (b, t, C):
            raise ValueError(f"dhidden has shape {tuple(dhidden.shape)}; the forward's hidden is {(b, t, C)}")
        with overflow_allowed(self.dtype):
            self._backward(idx, b, t, accumulate, head, dhidden)

    def _backward(self, idx, b, t, accumulate, head, dhidden):
        """The forward's lines in reverse; nothing below the lowest trainable part (Trainable)."""
        a, w, L, n = self.acts, self.work, self.model.config.n_layers, b * t
        if not accumulate:  # the weight GEMMs write their gradients; these are added into
            self.gradients.zero_added_into()
        dx, below = w.dresid[:n], self.trainable.below_head(L)
        self.head.backward(dx if below else None, n, accumulate, head)
        if not below:
            return
        if dhidden is not None:  # a head of the caller's on ln_f's output: the two gradients add up
            dh = dhidden.reshape(n, self.model.config.emb_dim)
            if head:
                dx += dh
            else:
                dx[...] = dh
        self.norms.backward("ln_f", w.nc[:n], dx, a.resid[L][:n], a.lnf_mean[:n], a.lnf_rstd[:n], w.nc2[:n])
        dx[...] = w.nc[:n]  # d(resid[L])
        for l in self.trainable.blocks(L):  # noqa: E741
            self.blocks.backward(l, dx, b, t, accumulate)
        if self.trainable.embeddings:
            self.embeddings.backward(dx, idx, b, t)

    @property
    def hidden(self):
        """(b, t, C): the final LayerNorm's output of the last forward (a view of this step's buffer)."""
        b, t = self._last_shape()
        return self.acts.lnf[: b * t].reshape(b, t, self.model.config.emb_dim)

    @property
    def logits(self):
        """(b*t, V): the LM head's logits of the last forward (a view of this step's buffer, rows padded_vocab
        apart when the head is padded; after a loss, its gradient)."""
        b, t = self._last_shape()
        if self.acts.logits is None:
            raise ValueError("this step was built with lm_head=False, so it has no logits")
        return self.acts.logits[: b * t, : self.model.config.vocab_size]

    def _last_shape(self):
        if self._shape is None:
            raise ValueError("no forward has run on this step yet")
        return self._shape

    def _refresh_low_precision_weights(self) -> None:
        """With 16-bit compute, this step's 16-bit copy of the (float32) weights, refreshed before each forward
        (not when weights_copy_current: the optimizer wrote it with the last update)."""
        if not self.lowp or self.weights_copy_current:
            return
        src = flat_base(self.model.params)
        if src is not None:
            self.param_flat[...] = src
        else:
            for k, w in self.model.params.items():
                self.weights[k][...] = w


def check_batch(xp, idx, targets, vocab_size: int, limits: tuple):
    """(idx, targets, n_valid) as arrays of module xp; ValueError for what does not fit buffers planned for
    limits = (B, T). The ids are checked where they are: NumPy ids (what training feeds) on the host
    before the copy to the GPU, so the check never waits for the GPU; ids already on a GPU there, read
    back once."""
    V = vocab_size
    here = get_array_module(idx, targets)  # where the ids are now
    idx = here.asarray(idx)
    if idx.ndim != 2 or idx.dtype.kind not in "iu":
        raise ValueError(f"idx must be a (B, T) integer array, got shape {tuple(idx.shape)} dtype {idx.dtype}")
    b, t = idx.shape
    if b > limits[0] or t > limits[1] or b < 1 or t < 1:
        raise ValueError(f"batch of shape ({b}, {t}) does not fit this step's buffers {tuple(limits)}")
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
        return xp.asarray(idx), None, 0
    n_valid, low, high = stats[2:]
    if n_valid == 0:
        raise ValueError(f"every target equals ignore_index={IGNORE_INDEX}, so the mean loss is undefined")
    if low < 0 or high >= V:
        raise ValueError(f"targets must lie in [0, {V}) or equal ignore_index={IGNORE_INDEX}")
    return xp.asarray(idx), xp.asarray(targets), n_valid
