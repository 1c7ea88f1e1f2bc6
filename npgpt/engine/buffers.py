"""The GPT fast engine's buffers: what the forward keeps for the backward, and the scratch every layer reuses.

Glossary: B=batch, T=time, C=channels, NH=heads, hs=C//NH, V=vocab, N=B*T rows, L=n_layers.

Everything is allocated once, for the largest (B, T) the engine is built for, and reused by every step,
so there is no allocator churn; a smaller batch uses the first n = b*t rows ([:n], or [:b, :, :t] per
head). Activations are 2-D (N, C), so each linear layer is one GEMM. A few buffers are allocated on
first use (the attention probabilities, only by a path that keeps them); `nbytes()` counts what is held
now. npgpt/memory.py computes the same sums before anything is allocated (tests hold them equal).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from .. import fast
from ..memory import RECOMPUTE_MODES

RECOMPUTE = RECOMPUTE_MODES  # what --recompute accepts


def check_recompute(recompute: str) -> str:
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute must be one of {', '.join(RECOMPUTE)}, got {recompute!r}")
    return recompute


def nbytes_of(record) -> int:
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
    """What the forward keeps for the backward (llm.c's ActivationTensors), per layer where it says L x."""

    resid: list  # L+1 x (N, C): each block's input; resid[L] feeds ln_f
    ln1: list  # L x (N, C)
    ln1_mean: list  # L x (N,) in the weights' dtype (float32 with 16-bit compute), as every *_mean, *_rstd
    ln1_rstd: list  # L x (N,)
    qkv_heads: list  # L x (3, B, NH, T, hs): q (divided by sqrt(hs)), k, v; in place on the CPU the same memory as (N, 3C) [q | k | v]
    att: list  # L x (B, NH, T, T) probabilities, allocated when first used (only by a path that keeps them)
    lse: list  # L x (B, NH, T) each row's logsumexp, with the flash-attention kernel only (else [])
    atty: list  # L x (N, C): attention's output before c_proj
    resid_mid: list  # L x (N, C): x1 = x + the attention branch
    ln2: list  # L x (N, C)
    ln2_mean: list  # L x (N,)
    ln2_rstd: list  # L x (N,)
    fc: list  # L x (N, 4C): the MLP's pre-activation (bias included), or its gelu' (Blocks.gelu_keeps_grad)
    act: list  # L x (N, 4C): GELU's output
    lnf: object  # (N, C)
    lnf_mean: object  # (N,)
    lnf_rstd: object  # (N,)
    logits: object  # (N, Vp): the logits, then the probabilities, then dlogits, in place; None without an LM head.
    # Vp: the vocabulary padded for the head's GEMMs (ends.LMHead), V when not padded

    def nbytes(self) -> int:
        return nbytes_of(self)


@dataclass
class Workspace:
    """Scratch that every layer reuses, in the forward and in the backward (named by shape, not use)."""

    dresid: object  # (N, C): the gradient of the residual stream, layer after layer
    nc: object  # (N, C): forward, a branch's output before the residual add; backward, gradients
    nc2: object  # (N, C): backward, gradients
    n3c: object  # (N, 3C): forward, the fused q|k|v projection (unless in place); backward, dqkv
    n4c: object  # (N, 4C): backward, dact then dfc; LayerNorm's backward scratch (its first C columns)
    heads: object  # (3, B, NH, T, hs): forward, attention's output per head; backward, dq, dk, dv
    att: object  # (B, NH, T, T): dropped probabilities, then datt; allocated with the first Activations.att
    flash_out: object  # (B, NH, T, hs) with the flash-attention kernel, else None
    gelu: object  # (threads, rows, 8C or 16C): each CPU thread's GELU row blocks (fast.gelu_scratch)
    causal_bias: object  # (T, T): 0 on and below the diagonal, -inf above
    att_rows: object = None  # (2, B, NH, rows, T): recomputed attention's probabilities, a block of rows at a time
    head_tmp: object = None  # (B, NH, T, hs): recomputed attention's backward, a block's partial dk / dv
    head_weight: object = None  # (Vp, C): the padded head's weights, rows V.. zero (a padded head only)
    head_grad: object = None  # (Vp, C): the padded head's weight-gradient product, allocated on first use

    def nbytes(self) -> int:
        return nbytes_of(self)


def plan_activations(xp, cfg, B, T, dtype, stat_dtype, flash: bool, recompute: str = "none",
                     lm_head: bool = True, vocab: int | None = None) -> Activations:  # fmt: skip
    """recompute (what the backward recomputes instead of the forward keeping it): "attention" keeps no
    (B, NH, T, T) probabilities; "mlp" keeps GELU's input, not its output (one (N, 4C) buffer serves
    every layer); "block" keeps only each block's input (resid), every other per-layer buffer is one
    buffer shared by all layers, refilled by rerunning the block's forward in the backward.
    lm_head=False: no (N, V) logits buffer (a step that never runs the LM head). vocab: the logits'
    columns, Vp of a padded head (default: the vocabulary)."""
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
        logits=act(N, vocab or cfg.vocab_size) if lm_head else None,  # a step that never runs the LM head has none
    )  # fmt: skip


def plan_workspace(xp, cfg, B, T, dtype, stat_dtype, threads: int, flash: bool, recompute: str = "none",
                   vocab: int | None = None) -> Workspace:  # fmt: skip
    """by_rows: the recomputing attention's scratch, allocated here unless the flash kernel runs attention
    (its dropout fallback then allocates it on first use: attention.RecomputedAttention). vocab: Vp of a
    padded head, whose (Vp, C) weights are kept here, rows V.. zero (default: no padding)."""
    N, C, NH, hs = B * T, cfg.emb_dim, cfg.n_heads, cfg.head_size
    by_rows = recompute in ("attention", "block") and not flash  # attention block of query rows by block
    rows = min(N, fast.ROW_BLOCK if xp is np else fast.GPU_ROW_BLOCK)
    scratch = lambda *shape: xp.empty(shape, dtype=dtype)  # noqa: E731
    return Workspace(
        dresid=scratch(N, C), nc=scratch(N, C), nc2=scratch(N, C), n3c=scratch(N, 3 * C), n4c=scratch(N, 4 * C),
        heads=scratch(3, B, NH, T, hs), att=None, flash_out=scratch(B, NH, T, hs) if flash else None,
        gelu=fast.gelu_scratch(xp, threads, rows, 4 * C, dtype, stat_dtype),
        causal_bias=xp.triu(xp.full((T, T), -np.inf, dtype=dtype), k=1),
        att_rows=fast.attention_rows_scratch(xp, B, NH, T, dtype) if by_rows else None,
        head_tmp=scratch(B, NH, T, hs) if by_rows else None,
        head_weight=xp.zeros((vocab, C), dtype=dtype) if vocab and vocab != cfg.vocab_size else None,
    )  # fmt: skip
