"""The encoder-decoder fast engine's buffers, and its sub-layers in the order they run.

Glossary: B=batch, S=source positions, T=target positions, C=d_model, F=d_ff, NH=heads, V=target
vocabulary, E/D = encoder/decoder layers; Ns=B*S and Nt=B*T rows, Nm=B*max(S, T).

Everything is allocated once for the largest batch and lengths (seq2seq/engine.py); a smaller batch or
shorter sentences use the leading rows. Rows are 2-D (N, C), so each projection is one GEMM, and
attention reads heads as strided views of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .. import fast
from ..engine import nbytes_of



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
        return nbytes_of(self)


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

    def nbytes(self) -> int:
        return nbytes_of(self)


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
        tgt_bias=buf(B, 1, T, T), pe=pe, gelu=gelu,
    )  # fmt: skip
