"""Multi-head attention with its four projections: self-attention or cross-attention.

Glossary: B=batch, Tq=query positions, Tk=key positions, C=channels, NH=heads.
    q   = x @ w_q + b_q              (B, Tq, C)      the queries come from x
    k   = memory @ w_k               (B, Tk, C)      keys and values come from memory:
    v   = memory @ w_v + b_v         (B, Tk, C)        memory is x itself for self-attention, the
                                                       encoder output for cross-attention
    y   = masked_attention(q, k, v)  (B, Tq, C)      masks and heads: masked_attention.py
    out = y @ w_o + b_o              (B, Tq, C)
params is keyed by the names inside one attention layer, weights in npgpt's (C_in, C_out) layout:
    q_proj.weight, k_proj.weight, v_proj.weight, out_proj.weight   (C, C)
    q_proj.bias,                  v_proj.bias,   out_proj.bias     (C,)
The keys have no bias, because one could never learn: it adds q . b_k to every score of a query's
row, the same constant for every key, and softmax ignores a constant added to its whole row, so
the loss does not depend on b_k and its gradient is exactly 0. (torch.nn.MultiheadAttention
carries that bias anyway, packed with the others as in_proj_bias; its gradient there is 0 too.
It packs the weights as in_proj_weight = [w_q^T; w_k^T; w_v^T], (3C, C).)
Derivation: docs/backprop.md#cross-attention.
"""

from __future__ import annotations

from typing import NamedTuple

from .linear import LinearCache, linear_backward, linear_forward
from .masked_attention import MaskedAttentionCache, masked_attention_backward, masked_attention_forward

MHA_PARAM_NAMES = (
    "q_proj.weight", "q_proj.bias", "k_proj.weight",
    "v_proj.weight", "v_proj.bias", "out_proj.weight", "out_proj.bias",
)  # fmt: skip


class MultiheadAttentionCache(NamedTuple):
    q_proj: LinearCache
    k_proj: LinearCache
    v_proj: LinearCache
    attn: MaskedAttentionCache
    out_proj: LinearCache


def check_mha_params(p, where="attention") -> None:
    missing = [k for k in MHA_PARAM_NAMES if k not in p]
    unknown = [k for k in p if k not in MHA_PARAM_NAMES]
    if missing or unknown:
        raise ValueError(f"{where} params: missing {missing}, unexpected {unknown}; the keys are {', '.join(MHA_PARAM_NAMES)}")


def multihead_attention_forward(x, memory, params, n_head, *, key_padding_mask=None, causal=False, attn_pdrop=0.0,
                                rng=None, training=False):  # fmt: skip
    """x: (B, Tq, C) (queries), memory: (B, Tk, C) (keys and values) -> out: (B, Tq, C).

    Self-attention passes the same array as x and memory. key_padding_mask: (B, Tk) bool, True at
    padded keys; causal, attn_pdrop, rng, training: as in masked_attention_forward.
    """
    p = params
    check_mha_params(p)
    q, c_q = linear_forward(x, p["q_proj.weight"], p["q_proj.bias"])  # (B, Tq, C)
    k, c_k = linear_forward(memory, p["k_proj.weight"])  # (B, Tk, C)
    v, c_v = linear_forward(memory, p["v_proj.weight"], p["v_proj.bias"])  # (B, Tk, C)
    y, c_att = masked_attention_forward(q, k, v, n_head, key_padding_mask=key_padding_mask, causal=causal,
                                        attn_pdrop=attn_pdrop, rng=rng, training=training)  # (B, Tq, C)  # fmt: skip
    out, c_o = linear_forward(y, p["out_proj.weight"], p["out_proj.bias"])  # (B, Tq, C)
    return out, MultiheadAttentionCache(c_q, c_k, c_v, c_att, c_o)


def multihead_attention_backward(dout, cache: MultiheadAttentionCache):
    """Gradients of x, memory and every projection.

    Differentiates  `out = attention(x @ w_q, memory @ w_k, memory @ w_v) @ w_o`  (biases left out):
    the output projection's backward gives dy, attention's gives dq, dk, dv; then x receives only
    the queries' share, dx = dq @ w_q^T, and memory receives both of the others',
        dmemory = dk @ w_k^T + dv @ w_v^T         (fan-out: memory fed two projections).
    For self-attention (memory is x) the caller adds the two: d(x) = dx + dmemory.
    dout: (B, Tq, C). Returns (dx (B, Tq, C), dmemory (B, Tk, C), grads keyed like params).
    """
    g = {}
    dy, g["out_proj.weight"], g["out_proj.bias"] = linear_backward(dout, cache.out_proj)  # (B, Tq, C)
    dq, dk, dv = masked_attention_backward(dy, cache.attn)  # (B, Tq, C), (B, Tk, C), (B, Tk, C)
    dx, g["q_proj.weight"], g["q_proj.bias"] = linear_backward(dq, cache.q_proj)
    dmem_k, g["k_proj.weight"], _ = linear_backward(dk, cache.k_proj)
    dmem_v, g["v_proj.weight"], g["v_proj.bias"] = linear_backward(dv, cache.v_proj)
    dmemory = dmem_k + dmem_v  # memory was used twice
    return dx, dmemory, {k: g[k] for k in MHA_PARAM_NAMES}
