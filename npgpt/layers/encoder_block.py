"""One Transformer encoder layer: self-attention over the source, then a feed-forward network, each
on a shortcut, with LayerNorm after the sum ("Add & Norm", the paper's post-norm) or before the
branch (pre-norm, norm_first=True, as GPT-2 does).

Glossary: B=batch, T=source positions, C=channels (d_model), F=d_ff, NH=heads.
    post-norm (norm_first=False):                      pre-norm (norm_first=True):
      x1  = norm1(x + dropout(self_attn(x)))             x1  = x + dropout(self_attn(norm1(x)))
      out = norm2(x1 + dropout(ff(x1)))                  out = x1 + dropout(ff(norm2(x1)))
self_attn is multihead_attention.py with memory = its own input and the source's key-padding mask;
ff is feedforward.py. The dropout placement is torch.nn.TransformerEncoderLayer's.
block_params is keyed by the names inside one layer (weights (C_in, C_out)):
    self_attn.{q,k,v,out}_proj.weight (C, C), self_attn.{q,v,out}_proj.bias (C,)  (keys have no bias)
    linear1.weight (C, F), linear1.bias (F,), linear2.weight (F, C), linear2.bias (C,)
    norm1.weight, norm1.bias, norm2.weight, norm2.bias   (C,)
Derivation: docs/backprop.md#encoder-and-decoder-blocks.
"""

from __future__ import annotations

from typing import NamedTuple

from .dropout import DropoutCache, dropout_backward, dropout_forward
from .feedforward import FeedForwardCache, feedforward_backward, feedforward_forward
from .layernorm import LayerNormCache, layernorm_backward, layernorm_forward
from .multihead_attention import (
    MHA_PARAM_NAMES,
    MultiheadAttentionCache,
    multihead_attention_backward,
    multihead_attention_forward,
)

FF_PARAM_NAMES = ("linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias")
ENCODER_BLOCK_PARAM_NAMES = (
    tuple(f"self_attn.{k}" for k in MHA_PARAM_NAMES) + FF_PARAM_NAMES
    + ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias")
)  # fmt: skip


class EncoderBlockCache(NamedTuple):
    norm_first: bool
    norm1: LayerNormCache
    attn: MultiheadAttentionCache
    drop1: DropoutCache
    norm2: LayerNormCache
    ff: FeedForwardCache
    drop2: DropoutCache


def check_block_keys(p, names, where) -> None:
    missing = [k for k in names if k not in p]
    unknown = [k for k in p if k not in names]
    if missing or unknown:
        raise ValueError(f"{where} params: missing {missing}, unexpected {unknown}; the keys are {', '.join(names)}")


def sub_params(p, prefix):
    """The entries of p under `prefix.`, with the prefix dropped."""
    n = len(prefix) + 1
    return {k[n:]: v for k, v in p.items() if k.startswith(prefix + ".")}


def encoder_block_forward(x, block_params, n_head, *, key_padding_mask=None, norm_first=False, activation="relu",
                          eps=1e-5, drop_rate=0.0, rng=None, training=False):  # fmt: skip
    """x: (B, T, C) -> out: (B, T, C).

    key_padding_mask: (B, T) bool, True at padded source positions. drop_rate applies, when
    training, to the attention probabilities, the hidden layer of ff and both residual branches.
    """
    p = block_params
    check_block_keys(p, ENCODER_BLOCK_PARAM_NAMES, "encoder block")
    drop = dict(rng=rng, training=training)

    def attn(h):
        return multihead_attention_forward(h, h, sub_params(p, "self_attn"), n_head, key_padding_mask=key_padding_mask,
                                           attn_pdrop=drop_rate, **drop)  # fmt: skip

    def ff(h):
        return feedforward_forward(h, p["linear1.weight"], p["linear1.bias"], p["linear2.weight"], p["linear2.bias"],
                                   activation, drop_rate=drop_rate, **drop)  # fmt: skip

    if norm_first:
        h, c_n1 = layernorm_forward(x, p["norm1.weight"], p["norm1.bias"], eps)
        a, c_att = attn(h)
        a, c_d1 = dropout_forward(a, drop_rate, rng, training)
        x1 = x + a  # shortcut around attention
        h, c_n2 = layernorm_forward(x1, p["norm2.weight"], p["norm2.bias"], eps)
        f, c_ff = ff(h)
        f, c_d2 = dropout_forward(f, drop_rate, rng, training)
        out = x1 + f  # shortcut around ff
    else:
        a, c_att = attn(x)
        a, c_d1 = dropout_forward(a, drop_rate, rng, training)
        x1, c_n1 = layernorm_forward(x + a, p["norm1.weight"], p["norm1.bias"], eps)  # Add & Norm
        f, c_ff = ff(x1)
        f, c_d2 = dropout_forward(f, drop_rate, rng, training)
        out, c_n2 = layernorm_forward(x1 + f, p["norm2.weight"], p["norm2.bias"], eps)  # Add & Norm
    return out, EncoderBlockCache(norm_first, c_n1, c_att, c_d1, c_n2, c_ff, c_d2)


def encoder_block_backward(dout, cache: EncoderBlockCache):
    """Gradients of x and of every block parameter.

    Pre-norm differentiates  `out = x1 + f(x1)`,  `x1 = x + a(x)`  as block.py does: the shortcut
    passes dout unchanged and the branch adds its own, dx1 = dout + f'(x1)^T dout.
    Post-norm differentiates  `out = norm2(x1 + f(x1))`,  `x1 = norm1(x + a(x))`:  the LayerNorm
    backward comes first, then the same sum rule on its input: with s = x1 + f(x1) and
    ds = norm2'^T dout, dx1 = ds + f'(x1)^T ds. Self-attention's x is also its memory, so
    its input receives dx + dmemory. dout: (B, T, C). Returns (dx (B, T, C), grads keyed like block_params).
    """
    c = cache
    g = {}

    def ff_back(d):
        d = dropout_backward(d, c.drop2)
        dh, g["linear1.weight"], g["linear1.bias"], g["linear2.weight"], g["linear2.bias"] = feedforward_backward(d, c.ff)
        return dh

    def attn_back(d):
        d = dropout_backward(d, c.drop1)
        dh, dmem, ga = multihead_attention_backward(d, c.attn)
        g.update({f"self_attn.{k}": v for k, v in ga.items()})
        return dh + dmem  # the block's input fed the queries and the keys/values

    if c.norm_first:
        # out = x1 + ff(norm2(x1))
        dh, g["norm2.weight"], g["norm2.bias"] = layernorm_backward(ff_back(dout), c.norm2)
        dx1 = dout + dh
        # x1 = x + attn(norm1(x))
        dh, g["norm1.weight"], g["norm1.bias"] = layernorm_backward(attn_back(dx1), c.norm1)
        dx = dx1 + dh
    else:
        # out = norm2(x1 + ff(x1))
        ds, g["norm2.weight"], g["norm2.bias"] = layernorm_backward(dout, c.norm2)
        dx1 = ds + ff_back(ds)
        # x1 = norm1(x + attn(x))
        ds, g["norm1.weight"], g["norm1.bias"] = layernorm_backward(dx1, c.norm1)
        dx = ds + attn_back(ds)
    return dx, {k: g[k] for k in ENCODER_BLOCK_PARAM_NAMES}
