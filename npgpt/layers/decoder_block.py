"""One Transformer decoder layer: masked (causal) self-attention over the target, cross-attention to
the encoder output ("memory"), then a feed-forward network, each on a shortcut, post-norm ("Add &
Norm", the paper) or pre-norm (norm_first=True).

Glossary: B=batch, T=target positions, S=source positions, C=channels (d_model), F=d_ff, NH=heads.
    post-norm (norm_first=False):                        pre-norm (norm_first=True):
      x1  = norm1(x  + dropout(self_attn(x)))              x1  = x  + dropout(self_attn(norm1(x)))
      x2  = norm2(x1 + dropout(cross_attn(x1, memory)))    x2  = x1 + dropout(cross_attn(norm2(x1), memory))
      out = norm3(x2 + dropout(ff(x2)))                    out = x2 + dropout(ff(norm3(x2)))
self_attn is causal and masks padded target keys; cross_attn takes its queries from the decoder
(T of them) and its keys and values from memory (B, S, C), masking padded source keys. Because the
same memory feeds every decoder layer, its gradient is the sum of every layer's dmemory; the model
adds them (seq2seq/model.py). block_params, weights (C_in, C_out):
    self_attn.{q,k,v,out}_proj.weight (C, C), self_attn.{q,v,out}_proj.bias (C,), the same for cross_attn
    linear1.weight (C, F), linear1.bias (F,), linear2.weight (F, C), linear2.bias (C,)
    norm1, norm2, norm3 .weight and .bias (C,)
Derivation: docs/backprop.md#cross-attention and docs/backprop.md#encoder-and-decoder-blocks.
"""

from __future__ import annotations

from typing import NamedTuple

from .dropout import DropoutCache, dropout_backward, dropout_forward
from .encoder_block import FF_PARAM_NAMES, check_block_keys, sub_params
from .feedforward import FeedForwardCache, feedforward_backward, feedforward_forward
from .layernorm import LayerNormCache, layernorm_backward, layernorm_forward
from .linear import linear_forward
from .masked_attention import masked_attention_forward
from .multihead_attention import (
    MHA_PARAM_NAMES,
    MultiheadAttentionCache,
    multihead_attention_backward,
    multihead_attention_forward,
)

DECODER_BLOCK_PARAM_NAMES = (
    tuple(f"self_attn.{k}" for k in MHA_PARAM_NAMES) + tuple(f"cross_attn.{k}" for k in MHA_PARAM_NAMES)
    + FF_PARAM_NAMES + ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "norm3.weight", "norm3.bias")
)  # fmt: skip


class DecoderBlockCache(NamedTuple):
    norm_first: bool
    norm1: LayerNormCache
    self_attn: MultiheadAttentionCache
    drop1: DropoutCache
    norm2: LayerNormCache
    cross_attn: MultiheadAttentionCache
    drop2: DropoutCache
    norm3: LayerNormCache
    ff: FeedForwardCache
    drop3: DropoutCache


def decoder_block_forward(x, memory, block_params, n_head, *, tgt_padding_mask=None, memory_padding_mask=None,
                          norm_first=False, activation="relu", eps=1e-5, drop_rate=0.0, rng=None,
                          training=False):  # fmt: skip
    """x: (B, T, C) target stream, memory: (B, S, C) encoder output -> out: (B, T, C).

    tgt_padding_mask: (B, T) bool, True at padded target positions; memory_padding_mask: (B, S) bool,
    True at padded source positions. drop_rate as in encoder_block_forward.
    """
    p = block_params
    check_block_keys(p, DECODER_BLOCK_PARAM_NAMES, "decoder block")
    drop = dict(attn_pdrop=drop_rate, rng=rng, training=training)

    def self_attn(h):
        return multihead_attention_forward(h, h, sub_params(p, "self_attn"), n_head, key_padding_mask=tgt_padding_mask,
                                           causal=True, **drop)  # fmt: skip

    def cross_attn(h):
        return multihead_attention_forward(h, memory, sub_params(p, "cross_attn"), n_head,
                                           key_padding_mask=memory_padding_mask, **drop)  # fmt: skip

    def ff(h):
        return feedforward_forward(h, p["linear1.weight"], p["linear1.bias"], p["linear2.weight"], p["linear2.bias"],
                                   activation, drop_rate=drop_rate, rng=rng, training=training)  # fmt: skip

    def norm(i, h):
        return layernorm_forward(h, p[f"norm{i}.weight"], p[f"norm{i}.bias"], eps)

    if norm_first:
        h, c_n1 = norm(1, x)
        a, c_sa = self_attn(h)
        a, c_d1 = dropout_forward(a, drop_rate, rng, training)
        x1 = x + a
        h, c_n2 = norm(2, x1)
        a, c_ca = cross_attn(h)
        a, c_d2 = dropout_forward(a, drop_rate, rng, training)
        x2 = x1 + a
        h, c_n3 = norm(3, x2)
        f, c_ff = ff(h)
        f, c_d3 = dropout_forward(f, drop_rate, rng, training)
        out = x2 + f
    else:
        a, c_sa = self_attn(x)
        a, c_d1 = dropout_forward(a, drop_rate, rng, training)
        x1, c_n1 = norm(1, x + a)  # Add & Norm
        a, c_ca = cross_attn(x1)
        a, c_d2 = dropout_forward(a, drop_rate, rng, training)
        x2, c_n2 = norm(2, x1 + a)  # Add & Norm
        f, c_ff = ff(x2)
        f, c_d3 = dropout_forward(f, drop_rate, rng, training)
        out, c_n3 = norm(3, x2 + f)  # Add & Norm
    return out, DecoderBlockCache(norm_first, c_n1, c_sa, c_d1, c_n2, c_ca, c_d2, c_n3, c_ff, c_d3)


def decoder_block_backward(dout, cache: DecoderBlockCache):
    """Gradients of x, memory and every block parameter.

    The three sub-layers are undone last first with the rules of encoder_block_backward (post-norm:
    LayerNorm's backward, then shortcut + branch; pre-norm: shortcut + branch through the norm).
    Differentiates the cross-attention line, pre-norm  `x2 = x1 + dropout(cross_attn(norm2(x1), memory))`
    or post-norm  `x2 = norm2(x1 + dropout(cross_attn(x1, memory)))`, into two gradients: the queries'
    share goes back along the target stream into dx1 (through norm2's backward, before the shortcut's
    sum in pre-norm and after it in post-norm), and the keys' and values' share
    dmemory = dk @ w_k^T + dv @ w_v^T  leaves the block for the encoder.
    dout: (B, T, C). Returns (dx (B, T, C), dmemory (B, S, C), grads keyed like block_params).
    """
    c = cache
    g = {}

    def ff_back(d):
        d = dropout_backward(d, c.drop3)
        dh, g["linear1.weight"], g["linear1.bias"], g["linear2.weight"], g["linear2.bias"] = feedforward_backward(d, c.ff)
        return dh

    def cross_back(d):
        d = dropout_backward(d, c.drop2)
        dh, dmem, ga = multihead_attention_backward(d, c.cross_attn)
        g.update({f"cross_attn.{k}": v for k, v in ga.items()})
        return dh, dmem

    def self_back(d):
        d = dropout_backward(d, c.drop1)
        dh, dmem, ga = multihead_attention_backward(d, c.self_attn)
        g.update({f"self_attn.{k}": v for k, v in ga.items()})
        return dh + dmem  # the stream fed the queries and the keys/values

    def norm_back(i, d):
        dx, g[f"norm{i}.weight"], g[f"norm{i}.bias"] = layernorm_backward(d, getattr(c, f"norm{i}"))
        return dx

    if c.norm_first:
        dx2 = dout + norm_back(3, ff_back(dout))  # out = x2 + ff(norm3(x2))
        dh, dmemory = cross_back(dx2)  # x2 = x1 + cross_attn(norm2(x1), memory)
        dx1 = dx2 + norm_back(2, dh)
        dx = dx1 + norm_back(1, self_back(dx1))  # x1 = x + self_attn(norm1(x))
    else:
        ds = norm_back(3, dout)  # out = norm3(x2 + ff(x2))
        dx2 = ds + ff_back(ds)
        ds = norm_back(2, dx2)  # x2 = norm2(x1 + cross_attn(x1, memory))
        dh, dmemory = cross_back(ds)
        dx1 = ds + dh
        ds = norm_back(1, dx1)  # x1 = norm1(x + self_attn(x))
        dx = ds + self_back(ds)
    return dx, dmemory, {k: g[k] for k in DECODER_BLOCK_PARAM_NAMES}


# --- inference: one new position at a time, with caches ----------------------------------------------


def cross_attention_kv(memory, block_params):
    """The cross-attention keys and values of one decoder layer, (B, S, C) each: computed once per
    source sentence, then read at every decoding step."""
    p = block_params
    k, _ = linear_forward(memory, p["cross_attn.k_proj.weight"])
    v, _ = linear_forward(memory, p["cross_attn.v_proj.weight"], p["cross_attn.v_proj.bias"])
    return k, v


def decoder_block_step(x, block_params, n_head, self_kv, pos, memory_kv, *, memory_padding_mask=None,
                       norm_first=False, activation="relu", eps=1e-5):  # fmt: skip
    """Inference only: the decoder layer at position `pos` for one new token per row.

    x: (B, 1, C), the stream at position pos. self_kv: (k_cache, v_cache), each (B, T_max, C); this
    position's self-attention key and value are written into [:, pos] in place, and the query attends
    to positions 0 .. pos (the earlier ones were written by earlier steps, so no causal mask is
    needed). memory_kv: (k, v) from cross_attention_kv. Returns out: (B, 1, C), equal to position
    pos of decoder_block_forward on the whole prefix.
    """
    p = block_params
    if x.shape[1] != 1:
        raise ValueError(f"decoder_block_step takes one position at a time, got x of shape {tuple(x.shape)}")
    k_cache, v_cache = self_kv
    if pos >= k_cache.shape[1]:
        raise ValueError(f"the KV cache holds {k_cache.shape[1]} positions; cannot write position {pos}")

    def proj(h, name):
        return linear_forward(h, p[f"{name}.weight"], p.get(f"{name}.bias"))[0]  # k_proj has no bias

    def self_attn(h):
        k_cache[:, pos : pos + 1] = proj(h, "self_attn.k_proj")
        v_cache[:, pos : pos + 1] = proj(h, "self_attn.v_proj")
        y, _ = masked_attention_forward(proj(h, "self_attn.q_proj"), k_cache[:, : pos + 1], v_cache[:, : pos + 1], n_head)
        return proj(y, "self_attn.out_proj")  # (B, 1, C)

    def cross_attn(h):
        y, _ = masked_attention_forward(proj(h, "cross_attn.q_proj"), memory_kv[0], memory_kv[1], n_head,
                                        key_padding_mask=memory_padding_mask)  # fmt: skip
        return proj(y, "cross_attn.out_proj")

    def ff(h):
        return feedforward_forward(h, p["linear1.weight"], p["linear1.bias"], p["linear2.weight"], p["linear2.bias"],
                                   activation)[0]  # fmt: skip

    def norm(i, h):
        return layernorm_forward(h, p[f"norm{i}.weight"], p[f"norm{i}.bias"], eps)[0]

    if norm_first:
        x = x + self_attn(norm(1, x))
        x = x + cross_attn(norm(2, x))
        return x + ff(norm(3, x))
    x = norm(1, x + self_attn(x))
    x = norm(2, x + cross_attn(x))
    return norm(3, x + ff(x))
