"""One GPT-2 Transformer block: pre-LayerNorm attention and MLP, each on a shortcut (residual).

Glossary: B=batch, T=time, C=channels, NH=heads.
    x1  = x  + dropout(c_proj(attention(c_attn(ln_1(x)))))
    out = x1 + dropout(mlp(ln_2(x1)))
Derivation: docs/backprop.md#residual-connections.
block_params is keyed by GPT-2's names inside one block (the `h.{i}.` prefix dropped):
    ln_1.weight, ln_1.bias                      (C,)
    attn.c_attn.weight (C, 3C), attn.c_attn.bias (3C,) (optional: qkv_bias=False leaves it out)
    attn.c_proj.weight (C, C),  attn.c_proj.bias (C,)
    ln_2.weight, ln_2.bias                      (C,)
    mlp.c_fc.weight (C, 4C),    mlp.c_fc.bias (4C,)
    mlp.c_proj.weight (4C, C),  mlp.c_proj.bias (C,)
"""

from __future__ import annotations

from typing import NamedTuple

from .attention import AttentionCache, attention_backward, attention_forward
from .dropout import DropoutCache, dropout_backward, dropout_forward
from .ffn import FFNCache, ffn_backward, ffn_forward
from .layernorm import LayerNormCache, layernorm_backward, layernorm_forward
from .linear import LinearCache, linear_backward, linear_forward

BLOCK_PARAM_NAMES = (
    "ln_1.weight", "ln_1.bias",
    "attn.c_attn.weight", "attn.c_attn.bias",
    "attn.c_proj.weight", "attn.c_proj.bias",
    "ln_2.weight", "ln_2.bias",
    "mlp.c_fc.weight", "mlp.c_fc.bias",
    "mlp.c_proj.weight", "mlp.c_proj.bias",
)  # fmt: skip
OPTIONAL_BLOCK_PARAMS = ("attn.c_attn.bias",)


class BlockCache(NamedTuple):
    ln_1: LayerNormCache
    c_attn: LinearCache
    attn: AttentionCache
    c_proj: LinearCache
    drop_attn: DropoutCache
    ln_2: LayerNormCache
    mlp: FFNCache
    drop_mlp: DropoutCache


def check_block_params(p) -> None:
    missing = [k for k in BLOCK_PARAM_NAMES if k not in p and k not in OPTIONAL_BLOCK_PARAMS]
    unknown = [k for k in p if k not in BLOCK_PARAM_NAMES]
    if missing or unknown:
        raise ValueError(
            f"block_params: missing {missing}, unexpected {unknown}; keys are GPT-2's names inside a "
            f"block without the 'h.<i>.' prefix: {', '.join(BLOCK_PARAM_NAMES)}"
        )


def block_forward(x, block_params, n_head, *, eps=1e-5, drop_rate=0.0, rng=None, training=False, attend=None):
    """x: (B, T, C) -> out: (B, T, C).

    drop_rate applies, when training, to the attention probabilities and to both residual
    branches, as in GPT-2 (attn_pdrop = resid_pdrop = drop_rate); `rng` draws the masks.
    attend: a function qkv (B, T, 3C) -> (y (B, T, C), cache) that replaces the causal attention, for
    inference only: generation passes one that reads and extends a KV cache (npgpt/generate.py).
    """
    p = block_params
    check_block_params(p)
    h, c_ln1 = layernorm_forward(x, p["ln_1.weight"], p["ln_1.bias"], eps)  # (B, T, C)
    qkv, c_attn = linear_forward(h, p["attn.c_attn.weight"], p.get("attn.c_attn.bias"))  # -> (B, T, 3C)
    if attend is None:
        a, c_att = attention_forward(qkv, n_head, attn_pdrop=drop_rate, rng=rng, training=training)  # -> (B, T, C)
    else:
        a, c_att = attend(qkv)
    a, c_proj = linear_forward(a, p["attn.c_proj.weight"], p["attn.c_proj.bias"])  # (B, T, C)
    a, c_d1 = dropout_forward(a, drop_rate, rng, training)
    x1 = x + a  # shortcut around attention
    h, c_ln2 = layernorm_forward(x1, p["ln_2.weight"], p["ln_2.bias"], eps)
    m, c_mlp = ffn_forward(h, p["mlp.c_fc.weight"], p["mlp.c_fc.bias"], p["mlp.c_proj.weight"], p["mlp.c_proj.bias"])
    m, c_d2 = dropout_forward(m, drop_rate, rng, training)
    out = x1 + m  # shortcut around the MLP
    return out, BlockCache(c_ln1, c_attn, c_att, c_proj, c_d1, c_ln2, c_mlp, c_d2)


def block_backward(dout, cache: BlockCache, weight_grads=True):
    """Gradients of x and of every block parameter.

    Differentiates  `x1 = x + f(x)`,  `out = x1 + g(x1)`:  a shortcut copies its input, so its
    gradient passes through unchanged and adds to the branch's:  dx1 = dout + g'(x1)^T dout,
    dx = dx1 + f'(x)^T dx1.  Each branch runs its layers' backwards in reverse order.
    dout: (B, T, C). Returns (dx (B, T, C), grads) with grads keyed like block_params.
    weight_grads=False (a frozen block that gradients only pass through): grads is {}, and the four
    linear layers' weight-gradient GEMMs are skipped.
    """
    c = cache
    g = {}
    # out = x1 + dropout(mlp(ln_2(x1)))
    dm = dropout_backward(dout, c.drop_mlp)
    dh, g["mlp.c_fc.weight"], g["mlp.c_fc.bias"], g["mlp.c_proj.weight"], g["mlp.c_proj.bias"] = ffn_backward(dm, c.mlp, weight_grads)
    dh, g["ln_2.weight"], g["ln_2.bias"] = layernorm_backward(dh, c.ln_2)
    dx1 = dout + dh  # shortcut + branch
    # x1 = x + dropout(c_proj(attention(c_attn(ln_1(x)))))
    da = dropout_backward(dx1, c.drop_attn)
    da, g["attn.c_proj.weight"], g["attn.c_proj.bias"] = linear_backward(da, c.c_proj, weight_grads)
    dqkv = attention_backward(da, c.attn)  # (B, T, C) -> (B, T, 3C)
    dh, g["attn.c_attn.weight"], dqkv_bias = linear_backward(dqkv, c.c_attn, weight_grads)  # (B, T, 3C) -> (B, T, C)
    if dqkv_bias is not None:
        g["attn.c_attn.bias"] = dqkv_bias
    dh, g["ln_1.weight"], g["ln_1.bias"] = layernorm_backward(dh, c.ln_1)
    dx = dx1 + dh  # shortcut + branch
    return dx, (g if weight_grads else {})
