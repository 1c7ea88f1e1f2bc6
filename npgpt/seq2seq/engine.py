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
  the largest batch and lengths; a smaller batch or shorter sentences use the leading rows. Rows are
  2-D (N, C), so each projection is one GEMM, and attention reads heads as strided views of them;
- the blocks are wired here, sub-layer by sub-layer (`Sublayer`): post-norm out = LN(x + dropout(f(x))),
  pre-norm out = x + dropout(f(LN(x))), with f a fast multi-head attention (self or cross) or
  feed-forward op; layers/encoder_block.py and layers/decoder_block.py have no fast file of their own;
- one additive mask per batch for the source keys and one (padding + causal) for the target's, shared
  by every layer; the cross-attention's dmemory of every decoder layer is added into one buffer, which
  then enters the encoder's backward;
- the output projection and the loss run on the rows that have a target only (a padded target row's
  gradient is exactly 0 in the reference, so skipping it changes no number): the largest GEMM, with
  the vocabulary, shrinks by the share of padding;
- LayerNorm, GELU and the loss go through npgpt/engine.py's `choose_ops`, so on a GPU the CUDA kernels
  of kernels/ can replace them as in GPT training. The model's own dtype throughout (no 16-bit mode).
Dropout masks are drawn from `rng` in the reference's order and shapes, so one generator drops the
same elements on both paths.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .. import fast
from ..backend import views_into
from ..engine import accumulated, choose_ops, nbytes_of as _nbytes, resolve_kernels
from ..layers.multihead_attention import MHA_PARAM_NAMES
from ..parallel import num_threads

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


# --- the fast step's buffers --------------------------------------------------------------------------


@dataclass
class Seq2SeqActivations:
    """What the forward keeps for the backward, sized for (B, S, T). Per sub-layer lists: the encoder has
    2 sub-layers a layer (self-attention, feed-forward), the decoder 3 (self-attention, cross-attention,
    feed-forward). Attention lists run over the E + 2D attention sub-layers, feed-forward ones over E + D."""

    src_stream: list  # 2E+1 x (Ns, C): the embedded source, then the stream after each sub-layer
    src_norm: list  # 2E x (Ns, C): each sub-layer's LayerNorm input (post-norm) or output (pre-norm)
    src_mean: list  # 2E x (Ns,), as every *_mean, *_rstd
    src_rstd: list  # 2E x (Ns,)
    tgt_stream: list  # 3D+1 x (Nt, C)
    tgt_norm: list  # 3D x (Nt, C)
    tgt_mean: list  # 3D x (Nt,)
    tgt_rstd: list  # 3D x (Nt,)
    att_q: list  # E+2D x (Nq, C): queries divided by sqrt(hs)
    att_k: list  # E+2D x (Nk, C)
    att_v: list  # E+2D x (Nk, C)
    att_p: list  # E+2D x (B, NH, Tq, Tk): probabilities before dropout
    att_y: list  # E+2D x (Nq, C): attention's output before out_proj
    ff_h: list  # E+D x (N, F): ReLU: its output after dropout; GELU: the pre-activation
    ff_a: list  # E+D x (N, F) GELU's output after dropout (None with ReLU)
    memory: object  # (Ns, C): the encoder output, encoder.norm of the last stream
    memory_mean: object  # (Ns,)
    memory_rstd: object  # (Ns,)
    final_in: object  # (Nt, C): the decoder stream's rows that have a target, gathered
    final: object  # (Nt, C): decoder.norm of them
    final_mean: object  # (Nt,)
    final_rstd: object  # (Nt,)
    logits: object  # (Nt, V): logits of the rows with a target, then probabilities, then dlogits, in place

    def nbytes(self) -> int:
        return _nbytes(self)


@dataclass
class Seq2SeqWorkspace:
    """Scratch reused by every layer (rows: Nm = B * max(S, T)), and the per-batch masks."""

    dstream: object  # (Nm, C): the gradient of the stream, sub-layer after sub-layer
    dmemory: object  # (Ns, C): the encoder output's gradient, summed over the decoder layers
    branch: object  # (Nm, C): forward, a branch's output; backward, its gradient after dropout
    dbranch: object  # (Nm, C): backward, the gradient of a branch's input
    dq: object  # (Nm, C): attention's dq (dy on the way in); the head's gradient
    dk: object  # (Nm, C)
    dv: object  # (Nm, C)
    tmp: object  # (Nm, C): a dmemory share; LayerNorm's backward scratch
    dff: object  # (Nm, F): the feed-forward network's hidden gradient
    datt: object  # (B, NH, Tm, Tm): forward, dropped probabilities; backward, datt
    src_bias: object  # (B, 1, 1, S): -inf at padded source keys
    tgt_bias: object  # (B, 1, T, T): -inf at padded or later target keys
    pe: object  # (max_len, C): the sinusoidal table (None with learned positions)
    gelu: object  # GELU's per-thread row blocks (fast.gelu_scratch), None with ReLU
    weight_grad: object  # 1-D: weight-gradient products when accumulating, allocated on first use

    def nbytes(self) -> int:
        return _nbytes(self)


class Sublayer(NamedTuple):
    """One residual sub-layer: which stream, its LayerNorm, its branch and where its buffers are."""

    side: str  # "src" (encoder) or "tgt" (decoder)
    index: int  # position on its side: reads stream[index], writes stream[index + 1], norm lists [index]
    norm: str  # its LayerNorm's parameter prefix, e.g. "decoder.layers.0.norm2"
    kind: str  # "self", "cross" or "ff"
    slot: int  # index into the att_* lists (attention) or the ff_* lists
    prefix: str  # the branch's parameter prefix, e.g. "decoder.layers.0.cross_attn."


def plan_sublayers(cfg) -> tuple[list, list]:
    E, D = cfg.n_encoder_layers, cfg.n_decoder_layers
    enc, dec = [], []
    for i in range(E):
        pre = f"encoder.layers.{i}."
        enc += [Sublayer("src", 2 * i, pre + "norm1", "self", i, pre + "self_attn."),
                Sublayer("src", 2 * i + 1, pre + "norm2", "ff", i, pre)]  # fmt: skip
    for j in range(D):
        pre = f"decoder.layers.{j}."
        dec += [Sublayer("tgt", 3 * j, pre + "norm1", "self", E + 2 * j, pre + "self_attn."),
                Sublayer("tgt", 3 * j + 1, pre + "norm2", "cross", E + 2 * j + 1, pre + "cross_attn."),
                Sublayer("tgt", 3 * j + 2, pre + "norm3", "ff", E + j, pre)]  # fmt: skip
    return enc, dec


def plan_activations(xp, cfg, B, S, T, dtype) -> Seq2SeqActivations:
    E, D, C, F, NH = cfg.n_encoder_layers, cfg.n_decoder_layers, cfg.d_model, cfg.d_ff, cfg.n_heads
    Ns, Nt = B * S, B * T
    buf = lambda *shape: xp.empty(shape, dtype=dtype)  # noqa: E731
    many = lambda count, *shape: [buf(*shape) for _ in range(count)]  # noqa: E731
    # (query rows, key rows, Tq, Tk) of each attention sub-layer: E self, then D x (self, cross)
    att = [(Ns, Ns, S, S)] * E + [(Nt, Nt, T, T), (Nt, Ns, T, S)] * D
    ff_rows = [Ns] * E + [Nt] * D
    return Seq2SeqActivations(
        src_stream=many(2 * E + 1, Ns, C), src_norm=many(2 * E, Ns, C), src_mean=many(2 * E, Ns), src_rstd=many(2 * E, Ns),
        tgt_stream=many(3 * D + 1, Nt, C), tgt_norm=many(3 * D, Nt, C), tgt_mean=many(3 * D, Nt), tgt_rstd=many(3 * D, Nt),
        att_q=[buf(nq, C) for nq, _, _, _ in att], att_k=[buf(nk, C) for _, nk, _, _ in att],
        att_v=[buf(nk, C) for _, nk, _, _ in att], att_p=[buf(B, NH, tq, tk) for _, _, tq, tk in att],
        att_y=[buf(nq, C) for nq, _, _, _ in att], ff_h=[buf(n, F) for n in ff_rows],
        ff_a=[buf(n, F) if cfg.activation == "gelu" else None for n in ff_rows],
        memory=buf(Ns, C), memory_mean=buf(Ns), memory_rstd=buf(Ns),
        final_in=buf(Nt, C), final=buf(Nt, C), final_mean=buf(Nt), final_rstd=buf(Nt), logits=buf(Nt, cfg.tgt_vocab_size),
    )  # fmt: skip


def plan_workspace(xp, cfg, B, S, T, dtype, threads: int) -> Seq2SeqWorkspace:
    C, F, NH = cfg.d_model, cfg.d_ff, cfg.n_heads
    Tm = max(S, T)
    Nm = B * Tm
    buf = lambda *shape: xp.empty(shape, dtype=dtype)  # noqa: E731
    pe = None
    if cfg.pos_encoding == "sinusoidal":
        pe = buf(cfg.max_len, C)
        fast.sinusoidal_table_into(pe)
    gelu = None
    if cfg.activation == "gelu":
        gelu = fast.gelu_scratch(xp, threads, min(Nm, fast.ROW_BLOCK if xp is np else fast.GPU_ROW_BLOCK), F, dtype)
    return Seq2SeqWorkspace(
        dstream=buf(Nm, C), dmemory=buf(B * S, C), branch=buf(Nm, C), dbranch=buf(Nm, C), dq=buf(Nm, C), dk=buf(Nm, C),
        dv=buf(Nm, C), tmp=buf(Nm, C), dff=buf(Nm, F), datt=buf(B, NH, Tm, Tm), src_bias=buf(B, 1, 1, S),
        tgt_bias=buf(B, 1, T, T), pe=pe, gelu=gelu, weight_grad=None,
    )  # fmt: skip


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
        """kernels: names of CUDA kernels to use for LayerNorm, GELU and the loss (npgpt.cuda.KERNEL_NAMES;
        default on a GPU: those $NPGPT_CUDA_KERNELS enables; others are left out, see below)."""
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
        # Not "attention" (the flash kernel is causal, without padding or dropout) nor "bmm": cuBLAS's strided
        # batched GEMM needs each operand's batch axes to collapse into one stride, which the heads, strided
        # views (b, NH, t, hs) of (b, t, C) rows, do not (CuPy's matmul copies them instead).
        self.kernels = resolve_kernels(kernels, xp, "fp32", self.dtype, cfg.head_size) - {"attention", "bmm"}
        B, S, T = self.batch_size, self.src_len, self.tgt_len
        self.acts = plan_activations(xp, cfg, B, S, T, self.dtype)
        self.work = plan_workspace(xp, cfg, B, S, T, self.dtype, self.threads)
        # the loss works on blocks of rows as wide as GPT-2's (LOSS_ROWS rows of 50,257 logits, ~800 KB in
        # float32): with a small vocabulary that is more rows per block, so fewer NumPy calls
        loss_rows = max(fast.LOSS_ROWS, fast.LOSS_ROWS * 50_257 // cfg.tgt_vocab_size) if xp is np else fast.GPU_LOSS_ROWS
        self.ops = choose_ops(self.kernels, xp, self.threads, self.work.gelu, loss_rows)
        self.encoder_sublayers, self.decoder_sublayers = plan_sublayers(cfg)
        self.grad_flat = xp.zeros(model.num_params(), dtype=self.dtype)
        self.grads = views_into(self.grad_flat, model.params)
        # Gradients that ops add into, zeroed at the start of a backward that does not accumulate:
        # LayerNorm's, learned positions', and an embedding table the output projection does not write.
        head_table = {"all": "embed.weight", "decoder": "decoder.embed.weight"}.get(cfg.tie_embeddings)
        self._added_into = [k for k in model.params if "norm" in k or k.endswith("pos.weight")
                            or (k.endswith("embed.weight") and k != head_table)]  # fmt: skip
        self.masks, self.rows = None, None  # the last forward's dropout masks, and its rows with a target
        self.shape = None  # the last forward's (b, s, t)

    def nbytes(self) -> int:
        """Bytes held by this step's buffers: activations, workspace and gradients."""
        return self.acts.nbytes() + self.work.nbytes() + int(self.grad_flat.nbytes)

    def __call__(self, batch, targets, training: bool = False, rng=None, dloss: float = 1.0, accumulate: bool = False,
                 backward: bool = True, sync: bool = True) -> float:  # fmt: skip
        """Forward (and backward unless backward=False) on one batch; returns the mean loss over the
        targets that are not padding, a Python float (sync is update.py's interface: GPT's engines may
        return a device array with sync=False; this one always reads the loss)."""
        limits = (self.batch_size, self.src_len, self.tgt_len)
        src, tgt_in, targets, rows = check_batch(self.model, batch, targets, limits)
        p = self.cfg.dropout if training else 0.0
        if p > 0.0 and rng is None:
            rng = self.model.rng
        loss = self._forward(src, tgt_in, targets, rows, p, rng, want_grad=backward, dloss=dloss)
        if backward:
            self._backward(src, tgt_in, p, accumulate)
        return loss

    def loss(self, batch, targets) -> float:
        """Mean loss over the targets that are not padding, without dropout and without a backward."""
        return self(batch, targets, training=False, backward=False)

    # --- forward: model.py's order ------------------------------------------------------------------
    def _forward(self, src, tgt_in, targets, rows, p, rng, want_grad, dloss):
        a, w, cfg = self.acts, self.work, self.cfg
        (b, s), t = src.shape, tgt_in.shape[1]
        ns, nt, nv, masks = b * s, b * t, int(rows.size), {}
        fast.attention_bias_into(w.src_bias[:b, :, :, :s], src == cfg.pad_id)  # encoder self- and cross-attention
        fast.attention_bias_into(w.tgt_bias[:b, :, :t, :t], tgt_in == cfg.pad_id, causal=True)
        self.shape = (b, s, t)
        self._embed(a.src_stream[0][:ns], src, "encoder", p, rng, masks)
        for sub in self.encoder_sublayers:
            self._sublayer_forward(sub, p, rng, masks)
        self._layernorm("encoder.norm", a.memory[:ns], a.memory_mean[:ns], a.memory_rstd[:ns], a.src_stream[-1][:ns])
        self._embed(a.tgt_stream[0][:nt], tgt_in, "decoder", p, rng, masks)
        for sub in self.decoder_sublayers:
            self._sublayer_forward(sub, p, rng, masks)
        # decoder.norm, the output projection and the loss, on the rows that have a target only
        self.xp.take(a.tgt_stream[-1][:nt], rows, axis=0, out=a.final_in[:nv])
        self._layernorm("decoder.norm", a.final[:nv], a.final_mean[:nv], a.final_rstd[:nv], a.final_in[:nv])
        fast.linear_forward(a.logits[:nv], a.final[:nv], self._head()[0])  # (nv, C) @ (C, V) -> (nv, V)
        self.masks, self.rows = masks, rows
        return float(self.ops.cross_entropy_(a.logits[:nv], targets.reshape(-1)[rows], want_grad, dloss, n_valid=nv))

    def _embed(self, x, ids, side, p, rng, masks):
        """x (n, C) = dropout(table[ids] * sqrt(C) + positions), as Seq2Seq._embed."""
        cfg, params = self.cfg, self.model.params
        b, t = ids.shape
        fast.embedding_forward(x, ids.reshape(-1), params[self._table(side)])
        if cfg.scale_embeddings:
            x *= x.dtype.type(math.sqrt(cfg.d_model))
        if cfg.pos_encoding == "sinusoidal":
            fast.add_sinusoidal_(x.reshape(b, t, cfg.d_model), self.work.pe)
        else:
            fast.add_position_embedding_(x.reshape(b, t, cfg.d_model), params[f"{side}.pos.weight"])
        if p > 0:
            masks[side + ".embed"] = fast.dropout_forward(x, x, p, rng)

    def _sublayer_forward(self, sub: Sublayer, p, rng, masks):
        """post-norm: out = LN(x + dropout(f(x))), the LN input kept in norm; pre-norm: norm = LN(x),
        out = x + dropout(f(norm))."""
        a, xp = self.acts, self.xp
        n = self._rows(sub.side)
        x, out = getattr(a, sub.side + "_stream")[sub.index][:n], getattr(a, sub.side + "_stream")[sub.index + 1][:n]
        norm, mean, rstd = (getattr(a, f"{sub.side}_{f}")[sub.index][:n] for f in ("norm", "mean", "rstd"))
        branch = self.work.branch[:n]
        if self.cfg.norm_first:
            self._layernorm(sub.norm, norm, mean, rstd, x)
        masks[sub.prefix + "inner"] = self._branch_forward(sub, branch, norm if self.cfg.norm_first else x, p, rng)
        if p > 0:
            masks[sub.prefix + "residual"] = fast.dropout_forward(branch, branch, p, rng)
        if self.cfg.norm_first:
            xp.add(x, branch, out=out)
        else:
            xp.add(x, branch, out=norm)  # Add
            self._layernorm(sub.norm, out, mean, rstd, norm)  # & Norm

    def _branch_forward(self, sub: Sublayer, out, h, p, rng):
        """out (n, C) = the sub-layer's attention or feed-forward network of h (n, C); returns its mask."""
        a, w, params = self.acts, self.work, self.model.params
        b, s, t = self.shape
        if sub.kind == "ff":
            saved = fast.FeedForwardSaved(a.ff_h[sub.slot][: h.shape[0]], _rows_or_none(a.ff_a[sub.slot], h.shape[0]))
            return fast.feedforward_forward(out, saved, h, *(params[sub.prefix + k] for k in FF_NAMES), self.cfg.activation,
                                            p, rng, threads=self.threads, gelu_forward=self.ops.gelu_forward)  # fmt: skip
        tq, tk, memory, bias = self._geometry(sub)
        h3 = h.reshape(b, tq, -1)
        return fast.multihead_attention_forward(out.reshape(b, tq, -1), self._saved(sub.slot, b, tq, tk), h3,
                                                h3 if memory is None else memory, self._params(sub.prefix), bias, p, rng,
                                                dropped=w.datt[:b, :, :tq, :tk], threads=self.threads,
                                                matmul=self.ops.heads_matmul)  # fmt: skip

    # --- backward: the same lines in reverse order --------------------------------------------------
    def _backward(self, src, tgt_in, p, accumulate):
        a, w, grads = self.acts, self.work, self.grads
        b, s, t = self.shape
        ns, nt, nv = b * s, b * t, int(self.rows.size)
        if not accumulate:
            for key in self._added_into:
                grads[key][...] = 0
        # logits = decoder.norm(rows) @ head; the (V, C) table's gradient is computed in its own layout
        head, dhead = self._head()
        dfinal = w.dq[:nv]
        scratch = self._weight_scratch(accumulate)
        fast.linear_backward(dfinal, dhead, None, a.logits[:nv], a.final[:nv], head, accumulate, scratch=scratch)
        self._layernorm_backward("decoder.norm", dfinal, dfinal, a.final_in[:nv], a.final_mean[:nv], a.final_rstd[:nv])
        dy = w.dstream[:nt]
        dy[...] = 0  # rows without a target get no gradient
        dy[self.rows] = dfinal
        w.dmemory[:ns] = 0  # every decoder layer's cross-attention adds its share
        for sub in reversed(self.decoder_sublayers):
            self._sublayer_backward(sub, dy, p, accumulate)
        self._embed_backward(dy, tgt_in, "decoder", p)
        dx = w.dstream[:ns]
        mean, rstd = a.memory_mean[:ns], a.memory_rstd[:ns]
        self._layernorm_backward("encoder.norm", dx, w.dmemory[:ns], a.src_stream[-1][:ns], mean, rstd)
        for sub in reversed(self.encoder_sublayers):
            self._sublayer_backward(sub, dx, p, accumulate)
        self._embed_backward(dx, src, "encoder", p)

    def _embed_backward(self, d, ids, side, p):
        """The table's gradient added into from d (n, C) (d is overwritten); x = dropout(table[ids] * scale + pos)."""
        cfg, grads = self.cfg, self.grads
        b, t = ids.shape
        if p > 0:
            fast.dropout_backward(d, d, self.masks[side + ".embed"], p)
        if cfg.pos_encoding == "learned":
            fast.position_embedding_backward(grads[f"{side}.pos.weight"], d.reshape(b, t, cfg.d_model))
        if cfg.scale_embeddings:
            d *= d.dtype.type(math.sqrt(cfg.d_model))
        fast.embedding_backward(grads[self._table(side)], d, ids.reshape(-1))

    def _sublayer_backward(self, sub: Sublayer, dx, p, accumulate):
        """dx holds d(out) on entry and d(x) on exit."""
        a, w = self.acts, self.work
        n = self._rows(sub.side)
        x = getattr(a, sub.side + "_stream")[sub.index][:n]
        norm, mean, rstd = (getattr(a, f"{sub.side}_{f}")[sub.index][:n] for f in ("norm", "mean", "rstd"))
        if not self.cfg.norm_first:  # out = LN(s): ds = LN'(dout), in place
            self._layernorm_backward(sub.norm, dx, dx, norm, mean, rstd)
        d = dx
        if p > 0:
            d = w.branch[:n]
            fast.dropout_backward(d, dx, self.masks[sub.prefix + "residual"], p)
        dh = w.dbranch[:n]
        self._branch_backward(sub, dh, d, norm if self.cfg.norm_first else x, p, accumulate)
        if self.cfg.norm_first:  # the branch read LN(x)
            self._layernorm_backward(sub.norm, dh, dh, x, mean, rstd)
        dx += dh  # the shortcut and the branch both carry x

    def _branch_backward(self, sub: Sublayer, dh, dout, h, p, accumulate):
        """dh (n, C): the gradient of the branch's input h, from dout (n, C) (cross-attention: dmemory added into)."""
        a, w, params, grads = self.acts, self.work, self.model.params, self.grads
        b, s, t = self.shape
        keep = self.masks.get(sub.prefix + "inner")
        lin = dict(weight_scratch=self._weight_scratch(accumulate), threads=self.threads)
        if sub.kind == "ff":
            n = h.shape[0]
            saved = fast.FeedForwardSaved(a.ff_h[sub.slot][:n], _rows_or_none(a.ff_a[sub.slot], n))
            dw1, db1, dw2, db2 = (grads[sub.prefix + k] for k in FF_NAMES)
            fast.feedforward_backward(dh, dw1, db1, dw2, db2, dout, saved, h, params[sub.prefix + "linear1.weight"],
                                      params[sub.prefix + "linear2.weight"], self.cfg.activation, keep, p, accumulate,
                                      dh=w.dff[:n], gelu_backward_=self.ops.gelu_backward_, **lin)  # fmt: skip
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

    # --- small helpers ------------------------------------------------------------------------------
    def _rows(self, side) -> int:
        b, s, t = self.shape
        return b * (s if side == "src" else t)

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

    def _weight_scratch(self, accumulate):
        if not accumulate:
            return None
        if self.work.weight_grad is None:
            largest = max(int(g.size) for g in self.grads.values() if g.ndim == 2)
            self.work.weight_grad = self.xp.empty(largest, dtype=self.dtype)
        return self.work.weight_grad

    def _layernorm(self, name, out, mean, rstd, x):
        p = self.model.params
        self.ops.layernorm_forward(out, mean, rstd, x, p[name + ".weight"], p[name + ".bias"], self.cfg.ln_eps)

    def _layernorm_backward(self, name, dx, dout, x, mean, rstd):
        """dx (may be dout), and LayerNorm `name`'s gradients added into."""
        g, weight = self.grads, self.model.params[name + ".weight"]
        self.ops.layernorm_backward(dx, g[name + ".weight"], g[name + ".bias"], dout, x, mean, rstd, weight,
                                    scratch=self.work.tmp[: x.shape[0]])  # fmt: skip


def _rows_or_none(a, n):
    return None if a is None else a[:n]
