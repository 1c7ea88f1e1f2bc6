"""The encoder-decoder Transformer's two engines: the readable reference and the fast step.

Glossary: B=batch, S=source positions, T=target positions, C=d_model, F=d_ff, NH=heads, V=target
vocabulary, E/D = encoder/decoder layers; Ns=B*S and Nt=B*T rows.

The same interface as npgpt/engine.py's, with a pair of id arrays as the input:

    engine = make_engine("fast", model, batch_size=64, src_len=21, tgt_len=29)   # or "reference"
    loss = engine((src, tgt_in), targets, training=True, rng=rng, dloss=1.0, accumulate=False)
    engine.grads                  # keyed like model.params (engine.grad_flat: their one buffer, or None)
    engine.loss((src, tgt_in), targets)   # no dropout, no backward

so update.py's Updater (clipping, the finite test, AdamW) drives either. Seq2SeqReferenceLossAndGrads runs
Seq2Seq.forward / backward (model.py, layers/). Seq2SeqFastLossAndGrads computes the same numbers
(tests/test_seq2seq_engine.py: float64 to ~1e-12, float32 to ~1e-5, padded batches, dropout with the
same masks) from the fast ops of npgpt/fast/, and is this file's buffer planning and wiring:
- every activation (`Seq2SeqActivations`) and scratch buffer (`Seq2SeqWorkspace`) is allocated once for
  the largest batch and lengths (seq2seq/buffers.py); a smaller batch or shorter sentences use the
  leading rows. Rows are 2-D (N, C), so each projection is one GEMM, and attention reads heads as
  strided views of them;
- it is built from the parts of GPT's fast engine (npgpt/engine/): its ops (choose_ops), the gradients'
  one flat buffer (Gradients), the LayerNorms by name (LayerNorms) and the dropout masks by key (Dropout);
- the blocks are wired here, sub-layer by sub-layer (`Sublayer`): post-norm out = LN(x + dropout(f(x))),
  pre-norm out = x + dropout(f(LN(x))), with f a fast multi-head attention (self or cross) or
  feed-forward op; layers/encoder_block.py and layers/decoder_block.py have no fast file of their own;
- one additive mask per batch for the source keys and one (padding + causal) for the target's, shared
  by every layer; the cross-attention's dmemory of every decoder layer is added into one buffer, which
  then enters the encoder's backward;
- the output projection and the loss run on the rows that have a target only (a padded target row's
  gradient is exactly 0 in the reference, so skipping it changes no number): the largest GEMM, with
  the vocabulary, shrinks by the share of padding;
- LayerNorm, GELU and the loss go through npgpt/engine/'s `choose_ops`, so on a GPU the CUDA kernels
  of kernels/ can replace them as in GPT training. The model's own dtype throughout (no 16-bit mode).
Dropout masks are drawn from `rng` in the reference's order and shapes, so one generator drops the
same elements on both paths.
"""

from __future__ import annotations

import math

import numpy as np

from .. import fast
from ..engine import Dropout, Gradients, LayerNorms, accumulated, choose_ops, resolve_kernels
from ..layers.multihead_attention import MHA_PARAM_NAMES
from ..parallel import num_threads
from .buffers import Sublayer, plan_activations, plan_sublayers, plan_workspace

FF_NAMES = ("linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias")


def make_engine(name: str, model, batch_size: int, src_len: int, tgt_len: int, kernels=None):
    """The engine called `name` ("fast" or "reference") for batches of up to batch_size pairs of up to
    src_len source and tgt_len target positions. "fast" first lays the model's weights out in one buffer
    (Seq2Seq.flatten_params_): build the optimizer after this."""
    if name == "fast":
        model.flatten_params_()
        return Seq2SeqFastLossAndGrads(model, batch_size, src_len, tgt_len, kernels=kernels)
    if name != "reference":
        raise ValueError(f"engine must be 'fast' or 'reference', got {name!r}")
    return Seq2SeqReferenceLossAndGrads(model)


def _pair(batch):
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise ValueError("the encoder-decoder's engines take the input as a pair (src, tgt_in) of (B, S) and (B, T) ids")
    return batch


class Seq2SeqReferenceLossAndGrads:
    """The readable path behind the engine interface: Seq2Seq.forward and Seq2Seq.backward."""

    grad_flat = None  # one array per parameter, not views of one buffer

    def __init__(self, model):
        self.model, self.grads = model, None

    def __call__(self, batch, targets, training: bool = False, rng=None, dloss: float = 1.0, accumulate: bool = False,
                 backward: bool = True, sync: bool = True) -> float:  # fmt: skip
        src, tgt_in = _pair(batch)
        if not accumulate:
            self.grads = None
        _, loss, cache = self.model.forward(src, tgt_in, targets, training=training, rng=rng)
        if backward:
            self.grads = accumulated(self.grads, self.model.backward(cache, dloss=dloss))
        return float(loss)

    def loss(self, batch, targets) -> float:
        """Mean loss over the targets that are not padding, without dropout and without a backward."""
        return self(batch, targets, training=False, backward=False)


def check_batch(model, batch, targets, limits):
    """(src, tgt_in, targets, the flat indices of the targets that are not padding) as arrays of the model's
    module; ValueError for what does not fit the buffers planned for limits = (B, S, T)."""
    cfg, xp = model.config, model.xp
    src, tgt_in = _pair(batch)
    src = model.check_ids(src, "src", cfg.src_vocab_size)
    tgt_in = model.check_ids(tgt_in, "tgt_in", cfg.tgt_vocab_size)
    (b, s), t = src.shape, tgt_in.shape[1]
    if tgt_in.shape[0] != b:
        raise ValueError(f"src has {b} rows but tgt_in {tgt_in.shape[0]}; give one target per source")
    if b > limits[0] or s > limits[1] or t > limits[2]:
        raise ValueError(f"a batch of {b} pairs of {s} source and {t} target positions does not fit this engine's "
                         f"buffers {tuple(limits)}; build it larger")  # fmt: skip
    targets = xp.asarray(targets)
    if targets.shape != tgt_in.shape or targets.dtype.kind not in "iu":
        raise ValueError(f"targets must be integer ids of tgt_in's shape {tuple(tgt_in.shape)}, got "
                         f"{targets.dtype} {tuple(targets.shape)}")  # fmt: skip
    if int(targets.min()) < 0 or int(targets.max()) >= cfg.tgt_vocab_size:
        raise ValueError(f"targets must lie in [0, {cfg.tgt_vocab_size}) (pad_id={cfg.pad_id} where there is none)")
    rows = xp.flatnonzero(targets.reshape(-1) != cfg.pad_id)
    if rows.size == 0:
        raise ValueError(f"every target equals pad_id={cfg.pad_id}, so the mean loss is undefined")
    return src, tgt_in, targets, rows


# --- the fast step -----------------------------------------------------------------------------------


class Seq2SeqFastLossAndGrads:
    """The fast engine: loss = engine((src, tgt_in), targets, ...), gradients in `engine.grads` (views of
    grad_flat). Batches up to (batch_size, src_len, tgt_len)."""

    def __init__(self, model, batch_size: int, src_len: int, tgt_len: int, kernels=None):
        """kernels: names of CUDA kernels to use for LayerNorm, GELU and the loss, and "bmm" for attention's
        products (npgpt.cuda.KERNEL_NAMES; default on a GPU: those $NPGPT_CUDA_KERNELS enables; the
        attention kernels are left out, see below)."""
        cfg = model.config
        for name, value in (("batch_size", batch_size), ("src_len", src_len), ("tgt_len", tgt_len)):
            if int(value) < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if max(src_len, tgt_len) > cfg.max_len:
            raise ValueError(f"src_len {src_len} / tgt_len {tgt_len} exceed the model's max_len {cfg.max_len}")
        self.model, self.cfg = model, cfg
        self.batch_size, self.src_len, self.tgt_len = int(batch_size), int(src_len), int(tgt_len)
        xp = self.xp = model.xp
        self.dtype = np.dtype(model.dtype)
        self.threads = num_threads() if xp is np else 1
        # Not "attention" nor "attention_softmax" (causal, no padding masks). "bmm" applies: the heads, strided
        # views (b, NH, t, hs) of (b, t, C) rows, are copied by cuda/blas.py's matmul before its one strided-
        # batched call (CuPy's N-D matmul copies every operand), and the products go the way GPT-2's do (TF32
        # as the run sets it); without "bmm" only those CuPy gets wrong go there (matmul_where_needed).
        self.kernels = resolve_kernels(kernels, xp, "fp32", self.dtype, cfg.head_size) - {"attention", "attention_softmax"}
        B, S, T = self.batch_size, self.src_len, self.tgt_len
        self.acts = plan_activations(xp, cfg, B, S, T, self.dtype)
        self.work = plan_workspace(xp, cfg, B, S, T, self.dtype, self.threads)
        # the loss works on blocks of rows as wide as GPT-2's (LOSS_ROWS rows of 50,257 logits, ~800 KB in
        # float32): with a small vocabulary that is more rows per block, so fewer NumPy calls
        loss_rows = max(fast.LOSS_ROWS, fast.LOSS_ROWS * 50_257 // cfg.tgt_vocab_size) if xp is np else fast.GPU_LOSS_ROWS
        self.ops = choose_ops(self.kernels, xp, self.threads, self.work.gelu, loss_rows)
        self.encoder_sublayers, self.decoder_sublayers = plan_sublayers(cfg)
        # Gradients that ops add into, zeroed at the start of a backward that does not accumulate:
        # LayerNorm's, learned positions', and an embedding table the output projection does not write.
        head_table = {"all": "embed.weight", "decoder": "decoder.embed.weight"}.get(cfg.tie_embeddings)
        added = [k for k in model.params if "norm" in k or k.endswith("pos.weight") or (k.endswith("embed.weight") and k != head_table)]
        self.gradients = Gradients(xp, model.params, set(model.params), self.dtype, self.dtype, added)
        self.grad_flat, self.grads = self.gradients.flat, self.gradients.views
        self.norms, self.drop = LayerNorms(model, self.gradients, self.ops), Dropout()
        self.rows = None  # the last forward's rows with a target
        self.shape = None  # the last forward's (b, s, t)

    def nbytes(self) -> int:
        """Bytes held by this step's buffers: activations, workspace and gradients."""
        return self.acts.nbytes() + self.work.nbytes() + self.gradients.nbytes()

    @property
    def masks(self):
        """The dropout keep-masks of the last forward, by key."""
        return self.drop.masks

    def __call__(self, batch, targets, training: bool = False, rng=None, dloss: float = 1.0, accumulate: bool = False,
                 backward: bool = True, sync: bool = True) -> float:  # fmt: skip
        """Forward (and backward unless backward=False) on one batch; returns the mean loss over the
        targets that are not padding, a Python float (sync is update.py's interface: GPT's engines may
        return a device array with sync=False; this one always reads the loss)."""
        limits = (self.batch_size, self.src_len, self.tgt_len)
        src, tgt_in, targets, rows = check_batch(self.model, batch, targets, limits)
        p = self.cfg.dropout if training else 0.0
        self.drop.start(p, self.model.rng if p > 0.0 and rng is None else rng)
        loss = self._forward(src, tgt_in, targets, rows, want_grad=backward, dloss=dloss)
        if backward:
            self._backward(src, tgt_in, accumulate)
        return loss

    def loss(self, batch, targets) -> float:
        """Mean loss over the targets that are not padding, without dropout and without a backward."""
        return self(batch, targets, training=False, backward=False)

    # --- forward: model.py's order ------------------------------------------------------------------
    def _forward(self, src, tgt_in, targets, rows, want_grad, dloss):
        a, w, cfg = self.acts, self.work, self.cfg
        (b, s), t = src.shape, tgt_in.shape[1]
        ns, nt, nv = b * s, b * t, int(rows.size)
        fast.attention_bias_into(w.src_bias[:b, :, :, :s], src == cfg.pad_id)  # encoder self- and cross-attention
        fast.attention_bias_into(w.tgt_bias[:b, :, :t, :t], tgt_in == cfg.pad_id, causal=True)
        self.shape, self.rows = (b, s, t), rows
        self._embed(a.src_stream[0][:ns], src, "encoder")
        for sub in self.encoder_sublayers:
            self._sublayer_forward(sub)
        self.norms.forward("encoder.norm", a.memory[:ns], a.memory_mean[:ns], a.memory_rstd[:ns], a.src_stream[-1][:ns])
        self._embed(a.tgt_stream[0][:nt], tgt_in, "decoder")
        for sub in self.decoder_sublayers:
            self._sublayer_forward(sub)
        # decoder.norm, the output projection and the loss, on the rows that have a target only
        self.xp.take(a.tgt_stream[-1][:nt], rows, axis=0, out=a.final_in[:nv])
        self.norms.forward("decoder.norm", a.final[:nv], a.final_mean[:nv], a.final_rstd[:nv], a.final_in[:nv])
        fast.linear_forward(a.logits[:nv], a.final[:nv], self._head()[0])  # (nv, C) @ (C, V) -> (nv, V)
        return float(self.ops.cross_entropy_(a.logits[:nv], targets.reshape(-1)[rows], want_grad, dloss, n_valid=nv))

    def _embed(self, x, ids, side):
        """x (n, C) = dropout(table[ids] * sqrt(C) + positions), as seq2seq/model.py's embed_forward."""
        cfg, params = self.cfg, self.model.params
        b, t = ids.shape
        fast.embedding_forward(x, ids.reshape(-1), params[self._table(side)])
        if cfg.scale_embeddings:
            x *= x.dtype.type(math.sqrt(cfg.d_model))
        if cfg.pos_encoding == "sinusoidal":
            fast.add_sinusoidal_(x.reshape(b, t, cfg.d_model), self.work.pe)
        else:
            fast.add_position_embedding_(x.reshape(b, t, cfg.d_model), params[f"{side}.pos.weight"])
        self.drop.forward(x, side + ".embed")

    def _sublayer_forward(self, sub: Sublayer):
        """post-norm: out = LN(x + dropout(f(x))), the LN input kept in norm; pre-norm: norm = LN(x),
        out = x + dropout(f(norm))."""
        x, out, norm, mean, rstd = self._sublayer_buffers(sub)
        branch = self.work.branch[: x.shape[0]]
        if self.cfg.norm_first:
            self.norms.forward(sub.norm, norm, mean, rstd, x)
        self.drop.masks[sub.prefix + "inner"] = self._branch_forward(sub, branch, norm if self.cfg.norm_first else x)
        self.drop.forward(branch, sub.prefix + "residual")
        if self.cfg.norm_first:
            self.xp.add(x, branch, out=out)
        else:
            self.xp.add(x, branch, out=norm)  # Add
            self.norms.forward(sub.norm, out, mean, rstd, norm)  # & Norm

    def _branch_forward(self, sub: Sublayer, out, h):
        """out (n, C) = the sub-layer's attention or feed-forward network of h (n, C); returns its mask."""
        params, p, rng = self.model.params, self.drop.p, self.drop.rng
        b, s, t = self.shape
        if sub.kind == "ff":
            return fast.feedforward_forward(out, self._ff_saved(sub, h.shape[0]), h, *(params[sub.prefix + k] for k in FF_NAMES),
                                            self.cfg.activation, p, rng, threads=self.threads, gelu_forward=self.ops.gelu_forward)  # fmt: skip
        tq, tk, memory, bias = self._geometry(sub)
        h3 = h.reshape(b, tq, -1)
        return fast.multihead_attention_forward(out.reshape(b, tq, -1), self._saved(sub.slot, b, tq, tk), h3,
                                                h3 if memory is None else memory, self._params(sub.prefix), bias, p, rng,
                                                dropped=self.work.datt[:b, :, :tq, :tk], threads=self.threads,
                                                matmul=self.ops.heads_matmul)  # fmt: skip

    # --- backward: the same lines in reverse order --------------------------------------------------
    def _backward(self, src, tgt_in, accumulate):
        a, w = self.acts, self.work
        b, s, t = self.shape
        ns, nt, nv = b * s, b * t, int(self.rows.size)
        if not accumulate:
            self.gradients.zero_added_into()
        # logits = decoder.norm(rows) @ head; the (V, C) table's gradient is computed in its own layout
        head, dhead = self._head()
        dfinal = w.dq[:nv]
        self.gradients.linear_backward(dfinal, a.logits[:nv], a.final[:nv], head, dhead, None, accumulate)
        self.norms.backward("decoder.norm", dfinal, dfinal, a.final_in[:nv], a.final_mean[:nv], a.final_rstd[:nv], w.tmp[:nv])
        dy = w.dstream[:nt]
        dy[...] = 0  # rows without a target get no gradient
        dy[self.rows] = dfinal
        w.dmemory[:ns] = 0  # every decoder layer's cross-attention adds its share
        for sub in reversed(self.decoder_sublayers):
            self._sublayer_backward(sub, dy, accumulate)
        self._embed_backward(dy, tgt_in, "decoder")
        dx = w.dstream[:ns]
        mean, rstd = a.memory_mean[:ns], a.memory_rstd[:ns]
        self.norms.backward("encoder.norm", dx, w.dmemory[:ns], a.src_stream[-1][:ns], mean, rstd, w.tmp[:ns])
        for sub in reversed(self.encoder_sublayers):
            self._sublayer_backward(sub, dx, accumulate)
        self._embed_backward(dx, src, "encoder")

    def _embed_backward(self, d, ids, side):
        """The table's gradient added into from d (n, C) (d is overwritten); x = dropout(table[ids] * scale + pos)."""
        cfg, grads = self.cfg, self.grads
        b, t = ids.shape
        d = self.drop.backward(d, d, side + ".embed")
        if cfg.pos_encoding == "learned":
            fast.position_embedding_backward(grads[f"{side}.pos.weight"], d.reshape(b, t, cfg.d_model))
        if cfg.scale_embeddings:
            d *= d.dtype.type(math.sqrt(cfg.d_model))
        fast.embedding_backward(grads[self._table(side)], d, ids.reshape(-1))

    def _sublayer_backward(self, sub: Sublayer, dx, accumulate):
        """dx holds d(out) on entry and d(x) on exit."""
        x, _, norm, mean, rstd = self._sublayer_buffers(sub)
        n = x.shape[0]
        if not self.cfg.norm_first:  # out = LN(s): ds = LN'(dout), in place
            self.norms.backward(sub.norm, dx, dx, norm, mean, rstd, self.work.tmp[:n])
        d = self.drop.backward(self.work.branch[:n], dx, sub.prefix + "residual")
        dh = self.work.dbranch[:n]
        self._branch_backward(sub, dh, d, norm if self.cfg.norm_first else x, accumulate)
        if self.cfg.norm_first:  # the branch read LN(x)
            self.norms.backward(sub.norm, dh, dh, x, mean, rstd, self.work.tmp[:n])
        dx += dh  # the shortcut and the branch both carry x

    def _branch_backward(self, sub: Sublayer, dh, dout, h, accumulate):
        """dh (n, C): the gradient of the branch's input h, from dout (n, C) (cross-attention: dmemory added into)."""
        w, params, grads = self.work, self.model.params, self.grads
        b, s, t = self.shape
        keep, p = self.drop.masks.get(sub.prefix + "inner"), self.drop.p
        lin = dict(weight_scratch=self.gradients.product_scratch(accumulate), threads=self.threads)
        if sub.kind == "ff":
            n = h.shape[0]
            fast.feedforward_backward(dh, *(grads[sub.prefix + k] for k in FF_NAMES), dout, self._ff_saved(sub, n), h,
                                      params[sub.prefix + "linear1.weight"], params[sub.prefix + "linear2.weight"],
                                      self.cfg.activation, keep, p, accumulate, dh=w.dff[:n], gelu_backward_=self.ops.gelu_backward_,
                                      **lin)  # fmt: skip
            return
        tq, tk, memory, _ = self._geometry(sub)
        h3, dh3 = h.reshape(b, tq, -1), dh.reshape(b, tq, -1)
        # cross-attention adds its dmemory into the encoder output's; self-attention's memory is its own input
        dmemory = dh3 if memory is None else w.dmemory[: b * s].reshape(b, s, -1)
        g = {k: grads[sub.prefix + k] for k in MHA_PARAM_NAMES if k != "k_proj.bias"}
        rows = lambda buf, n: buf[: b * n].reshape(b, n, -1)  # noqa: E731
        fast.multihead_attention_backward(dh3, dmemory, g, dout.reshape(b, tq, -1), self._saved(sub.slot, b, tq, tk), h3,
                                          h3 if memory is None else memory, self._params(sub.prefix), keep, p, accumulate,
                                          add_dmemory=True, dq=rows(w.dq, tq), dk=rows(w.dk, tk), dv=rows(w.dv, tk),
                                          tmp=rows(w.tmp, tk), datt=w.datt[:b, :, :tq, :tk], matmul=self.ops.heads_matmul,
                                          **lin)  # fmt: skip

    # --- where each sub-layer's state lives ---------------------------------------------------------
    def _sublayer_buffers(self, sub: Sublayer):
        """(x, out, norm, mean, rstd) of a sub-layer, the first n rows of its side: its input and output in the
        stream, and its LayerNorm's input (post-norm) or output (pre-norm) with the statistics."""
        a = self.acts
        b, s, t = self.shape
        n = b * (s if sub.side == "src" else t)
        stream = getattr(a, sub.side + "_stream")
        return (stream[sub.index][:n], stream[sub.index + 1][:n],
                *(getattr(a, f"{sub.side}_{f}")[sub.index][:n] for f in ("norm", "mean", "rstd")))  # fmt: skip

    def _geometry(self, sub: Sublayer):
        """(tq, tk, memory, bias) of an attention sub-layer: memory (b, S, C) for cross-attention, None for
        self-attention (whose memory is its input); bias: the batch's additive mask for its keys."""
        b, s, t = self.shape
        if sub.kind == "cross":
            return t, s, self.acts.memory[: b * s].reshape(b, s, -1), self.work.src_bias[:b, :, :, :s]
        if sub.side == "src":
            return s, s, None, self.work.src_bias[:b, :, :, :s]
        return t, t, None, self.work.tgt_bias[:b, :, :t, :t]

    def _saved(self, slot, b, tq, tk) -> fast.AttentionSaved:
        a = self.acts
        q, k, v, y = (buf[slot][: b * n].reshape(b, n, -1)
                      for buf, n in ((a.att_q, tq), (a.att_k, tk), (a.att_v, tk), (a.att_y, tq)))  # (b, t, C) views
        return fast.AttentionSaved(q, k, v, a.att_p[slot][:b, :, :tq, :tk], y)

    def _ff_saved(self, sub: Sublayer, n: int) -> fast.FeedForwardSaved:
        ff_a = self.acts.ff_a[sub.slot]
        return fast.FeedForwardSaved(self.acts.ff_h[sub.slot][:n], None if ff_a is None else ff_a[:n])

    def _params(self, prefix) -> dict:
        return {k: self.model.params[prefix + k] for k in MHA_PARAM_NAMES}

    def _table(self, side) -> str:
        return "embed.weight" if self.cfg.tie_embeddings == "all" else f"{side}.embed.weight"

    def _head(self):
        """(the (C, V) output weight, its gradient buffer): the target table's transposes when tied."""
        if self.cfg.tie_embeddings == "none":
            return self.model.params["output.weight"], self.grads["output.weight"]
        key = self._table("decoder")
        return self.model.params[key].T, self.grads[key].T
