"""The checks `npgpt gradcheck` runs: every layer, several shapes, float64 finite differences.

Each Check builds its inputs from a seeded generator, so a failure is reproducible. The layer
functions are looked up on `npgpt.layers` when a check runs (not bound at import), so a test can
swap in a broken backward and watch the suite fail.
"""

from __future__ import annotations

import numpy as np

from . import layers as L
from .gradcheck import Check, HostRandom

IGNORE = -100


def _randn(rng, *shape):
    return rng.standard_normal(shape)


def _block_params(rng, C, qkv_bias=True):
    p = {
        "ln_1.weight": 1.0 + 0.1 * _randn(rng, C), "ln_1.bias": 0.1 * _randn(rng, C),
        "attn.c_attn.weight": 0.3 * _randn(rng, C, 3 * C), "attn.c_attn.bias": 0.1 * _randn(rng, 3 * C),
        "attn.c_proj.weight": 0.3 * _randn(rng, C, C), "attn.c_proj.bias": 0.1 * _randn(rng, C),
        "ln_2.weight": 1.0 + 0.1 * _randn(rng, C), "ln_2.bias": 0.1 * _randn(rng, C),
        "mlp.c_fc.weight": 0.3 * _randn(rng, C, 4 * C), "mlp.c_fc.bias": 0.1 * _randn(rng, 4 * C),
        "mlp.c_proj.weight": 0.3 * _randn(rng, 4 * C, C), "mlp.c_proj.bias": 0.1 * _randn(rng, C),
    }  # fmt: skip
    if not qkv_bias:
        del p["attn.c_attn.bias"]
    return p


def layer_checks() -> list[Check]:
    """One Check per layer and shape; the shapes include B=1, T=1, non-square and several head counts."""
    return _elementwise_and_affine_checks() + _attention_loss_dropout_checks() + _composite_checks()


def _elementwise_and_affine_checks() -> list[Check]:
    """embedding, linear, layernorm, gelu."""
    checks: list[Check] = []
    add = checks.append

    # embedding: repeated ids must accumulate
    for B, T, V, C in [(2, 5, 7, 4), (1, 1, 3, 6)]:
        add(Check(
            f"embedding B{B} T{T} V{V} C{C}",
            lambda ids, weight: L.embedding_forward(ids, weight),
            lambda d, c: L.embedding_backward(d, c),
            lambda r, B=B, T=T, V=V, C=C: [r.integers(0, V, size=(B, T)), _randn(r, V, C)],
        ))  # fmt: skip

    for B, T, Cin, Cout, bias in [(2, 3, 5, 4, True), (1, 1, 3, 7, True), (2, 4, 6, 3, False)]:
        if bias:
            add(Check(
                f"linear B{B} T{T} {Cin}->{Cout}",
                lambda x, weight, bias: L.linear_forward(x, weight, bias),
                lambda d, c: L.linear_backward(d, c),
                lambda r, B=B, T=T, Cin=Cin, Cout=Cout: [_randn(r, B, T, Cin), _randn(r, Cin, Cout), _randn(r, Cout)],
            ))  # fmt: skip
        else:
            add(Check(
                f"linear B{B} T{T} {Cin}->{Cout} no bias",
                lambda x, weight: L.linear_forward(x, weight),
                lambda d, c: L.linear_backward(d, c)[:2],
                lambda r, B=B, T=T, Cin=Cin, Cout=Cout: [_randn(r, B, T, Cin), _randn(r, Cin, Cout)],
            ))  # fmt: skip

    for B, T, C in [(2, 3, 8), (1, 1, 5), (3, 2, 16)]:
        add(Check(
            f"layernorm B{B} T{T} C{C}",
            lambda x, weight, bias: L.layernorm_forward(x, weight, bias),
            lambda d, c: L.layernorm_backward(d, c),
            lambda r, B=B, T=T, C=C: [2.0 * _randn(r, B, T, C) + 0.5, 1.0 + 0.2 * _randn(r, C), _randn(r, C)],
        ))  # fmt: skip

    for shape in [(2, 3, 7), (1, 1, 4)]:
        add(Check(
            f"gelu {'x'.join(map(str, shape))}",
            lambda x: L.gelu_forward(x),
            lambda d, c: L.gelu_backward(d, c),
            lambda r, shape=shape: [3.0 * _randn(r, *shape)],
        ))  # fmt: skip
    return checks


def _attention_loss_dropout_checks() -> list[Check]:
    """attention (with and without dropout), cross-entropy (with ignored targets, large logits), dropout."""
    checks: list[Check] = []
    add = checks.append
    for B, T, C, NH in [(2, 5, 8, 2), (1, 1, 8, 4), (2, 4, 12, 3), (1, 6, 4, 1), (2, 3, 16, 8)]:
        add(Check(
            f"attention B{B} T{T} C{C} NH{NH}",
            lambda qkv, n_head: L.attention_forward(qkv, n_head),
            lambda d, c: L.attention_backward(d, c),
            lambda r, B=B, T=T, C=C, NH=NH: [_randn(r, B, T, 3 * C), NH],
        ))  # fmt: skip
    add(Check(
        "attention B2 T5 C8 NH2 dropout 0.3",
        lambda qkv, n_head, xp=np: L.attention_forward(qkv, n_head, attn_pdrop=0.3, rng=HostRandom(7, xp), training=True),
        lambda d, c: L.attention_backward(d, c),
        lambda r: [_randn(r, 2, 5, 24), 2],
    ))  # fmt: skip

    for B, T, V, n_ignored, offset in [(2, 4, 11, 0, 0.0), (1, 1, 5, 0, 0.0), (2, 5, 13, 3, 0.0), (2, 3, 9, 1, 1000.0)]:
        def ce_inputs(r, B=B, T=T, V=V, n_ignored=n_ignored, offset=offset):
            targets = r.integers(0, V, size=(B, T))
            targets.reshape(-1)[r.choice(B * T, size=n_ignored, replace=False)] = IGNORE
            return [2.0 * _randn(r, B, T, V) + offset, targets]

        label = f"cross_entropy B{B} T{T} V{V}" + (f" ignore{n_ignored}" if n_ignored else "") + (" logits+1000" if offset else "")
        add(Check(
            label,
            lambda logits, targets: L.softmax_cross_entropy_forward(logits, targets, ignore_index=IGNORE),
            lambda d, c: L.softmax_cross_entropy_backward(d, c),
            ce_inputs,
        ))  # fmt: skip

    add(Check(
        "dropout 3x4x5 p=0.3",
        lambda x, xp=np: L.dropout_forward(x, 0.3, HostRandom(3, xp), training=True),
        lambda d, c: L.dropout_backward(d, c),
        lambda r: [_randn(r, 3, 4, 5)],
    ))  # fmt: skip
    return checks


def _composite_checks() -> list[Check]:
    """ffn and block: the layers composed, with and without the q|k|v bias and dropout."""
    checks: list[Check] = []
    add = checks.append
    for B, T, C, H in [(2, 3, 4, 16), (1, 1, 6, 10)]:
        add(Check(
            f"ffn B{B} T{T} C{C} H{H}",
            lambda x, w_fc, b_fc, w_proj, b_proj: L.ffn_forward(x, w_fc, b_fc, w_proj, b_proj),
            lambda d, c: L.ffn_backward(d, c),
            lambda r, B=B, T=T, C=C, H=H: [_randn(r, B, T, C), 0.5 * _randn(r, C, H), 0.1 * _randn(r, H),
                                           0.5 * _randn(r, H, C), 0.1 * _randn(r, C)],
        ))  # fmt: skip

    for B, T, C, NH, qkv_bias, drop in [(2, 4, 8, 2, True, 0.0), (1, 1, 8, 4, False, 0.0), (2, 3, 12, 3, True, 0.2)]:
        label = f"block B{B} T{T} C{C} NH{NH}" + ("" if qkv_bias else " no qkv bias") + (f" dropout {drop}" if drop else "")
        add(Check(
            label,
            lambda x, block_params, n_head, xp=np, drop=drop: L.block_forward(
                x, block_params, n_head, drop_rate=drop, rng=HostRandom(11, xp), training=drop > 0),
            lambda d, c: L.block_backward(d, c),
            lambda r, B=B, T=T, C=C, NH=NH, qkv_bias=qkv_bias: [_randn(r, B, T, C), _block_params(r, C, qkv_bias), NH],
            max_coords=24,
        ))  # fmt: skip
    checks += finetune_layer_checks()
    return checks


def _padded_ids(r, B, T, V, pad):
    """(B, T) ids in [0, V) without pad, each row right-padded with pad after a random length in [1, T]."""
    ids = r.integers(0, V - 1, size=(B, T))
    ids[ids >= pad] += 1  # real tokens never equal pad
    for b, n in enumerate(r.integers(1, T + 1, size=B)):
        ids[b, n:] = pad
    return ids


def finetune_layer_checks() -> list[Check]:
    """The fine-tuning layers: last-token pooling, the classification head, the mixed loss."""
    checks: list[Check] = []
    add = checks.append
    for B, T, C, pad in [(3, 5, 4, 6), (1, 1, 3, 0), (4, 6, 5, 2)]:
        add(Check(
            f"last_token B{B} T{T} C{C}",
            lambda x, idx, pad=pad: L.last_token_forward(x, idx, pad),
            lambda d, c: L.last_token_backward(d, c),
            lambda r, B=B, T=T, C=C, pad=pad: [_randn(r, B, T, C), _padded_ids(r, B, T, 7, pad)],
        ))  # fmt: skip
    for B, T, C, k in [(3, 5, 6, 4), (1, 1, 4, 2), (4, 3, 8, 3)]:
        add(Check(
            f"classifier_head B{B} T{T} C{C} k{k}",
            lambda x, idx, weight: L.classifier_head_forward(x, idx, weight, 5),
            lambda d, c: L.classifier_head_backward(d, c),
            lambda r, B=B, T=T, C=C, k=k: [_randn(r, B, T, C), _padded_ids(r, B, T, 9, 5), _randn(r, k, C)],
        ))  # fmt: skip
    for B, T, k, V, lam, n_ignored in [(3, 4, 3, 11, 0.5, 4), (2, 3, 2, 7, 1.0, 0), (1, 2, 5, 9, 0.3, 1), (2, 3, 3, 7, 0.0, 1)]:
        def mixed_inputs(r, B=B, T=T, k=k, V=V, n_ignored=n_ignored):
            targets = r.integers(0, V, size=(B, T))
            targets.reshape(-1)[r.choice(B * T, size=n_ignored, replace=False)] = IGNORE
            return [2.0 * _randn(r, B, k), r.integers(0, k, size=B), 2.0 * _randn(r, B, T, V), targets]

        add(Check(
            f"mixed_loss B{B} T{T} k{k} V{V} lambda{lam}" + (f" ignore{n_ignored}" if n_ignored else ""),
            lambda cls_logits, labels, lm_logits, lm_targets, lam=lam: L.mixed_loss_forward(
                cls_logits, labels, lm_logits, lm_targets, lm_weight=lam),
            lambda d, c: L.mixed_loss_backward(d, c),
            mixed_inputs,
        ))  # fmt: skip
    return checks


def _pad_mask(rng, B, T):
    """(B, T) bool, True at padding: row b keeps a random length in [1, T] (row 0 is always padded when T > 1)."""
    lengths = rng.integers(1, T + 1, size=B)
    if T > 1:
        lengths[0] = max(1, T - 2)
    return np.arange(T)[None, :] >= lengths[:, None]


def _away_from_zero(rng, *shape):
    """Normal values pushed at least 0.1 away from 0, so a finite difference never straddles ReLU's kink."""
    x = _randn(rng, *shape)
    return np.sign(x) * (0.1 + np.abs(x))


def _mha_params(rng, C, prefix=""):
    p = {}
    for name in L.MHA_PARAM_NAMES:
        p[prefix + name] = 0.4 * _randn(rng, C, C) if name.endswith("weight") else 0.1 * _randn(rng, C)
    return p


def _seq2seq_block_params(rng, C, F, decoder):
    p = _mha_params(rng, C, "self_attn.")
    if decoder:
        p.update(_mha_params(rng, C, "cross_attn."))
    p.update({"linear1.weight": 0.4 * _randn(rng, C, F), "linear1.bias": 0.1 * _randn(rng, F),
              "linear2.weight": 0.4 * _randn(rng, F, C), "linear2.bias": 0.1 * _randn(rng, C)})  # fmt: skip
    for i in (1, 2, 3) if decoder else (1, 2):
        p[f"norm{i}.weight"] = 1.0 + 0.1 * _randn(rng, C)
        p[f"norm{i}.bias"] = 0.1 * _randn(rng, C)
    return p


def seq2seq_layer_checks() -> list[Check]:
    """The encoder-decoder Transformer's layers (npgpt.seq2seq): ReLU, the feed-forward network,
    sinusoidal positions, attention with padding and causal masks, self- and cross-attention with
    their projections, encoder and decoder blocks in post-norm and pre-norm form."""
    return _seq2seq_op_checks() + _seq2seq_attention_and_block_checks()


def _seq2seq_op_checks() -> list[Check]:
    """relu, feedforward, sinusoidal, masked_attention."""
    checks: list[Check] = []
    add = checks.append

    for shape in [(2, 3, 7), (1, 1, 4)]:
        add(Check(
            f"relu {'x'.join(map(str, shape))}",
            lambda x: L.relu_forward(x),
            lambda d, c: L.relu_backward(d, c),
            lambda r, shape=shape: [_away_from_zero(r, *shape)],
        ))  # fmt: skip

    for B, T, C, F, act, drop in [(2, 3, 4, 16, "relu", 0.0), (1, 1, 6, 10, "gelu", 0.0), (2, 4, 6, 12, "relu", 0.3)]:
        add(Check(
            f"feedforward B{B} T{T} C{C} F{F} {act}" + (f" dropout {drop}" if drop else ""),
            lambda x, w1, b1, w2, b2, xp=np, act=act, drop=drop: L.feedforward_forward(
                x, w1, b1, w2, b2, act, drop_rate=drop, rng=HostRandom(5, xp), training=drop > 0),
            lambda d, c: L.feedforward_backward(d, c),
            lambda r, B=B, T=T, C=C, F=F: [_randn(r, B, T, C), 0.5 * _randn(r, C, F), 0.1 * _randn(r, F),
                                           0.5 * _randn(r, F, C), 0.1 * _randn(r, C)],
        ))  # fmt: skip

    for B, T, C, start in [(2, 5, 8, 0), (1, 3, 6, 4)]:
        add(Check(
            f"sinusoidal B{B} T{T} C{C} start{start}",
            lambda x, start=start: L.sinusoidal_forward(x, start),
            lambda d, c: L.sinusoidal_backward(d, c),
            lambda r, B=B, T=T, C=C: [_randn(r, B, T, C)],
        ))  # fmt: skip

    # (B, Tq, Tk, C, NH, padded keys, causal, dropout)
    for B, Tq, Tk, C, NH, pad, causal, drop in [
        (2, 5, 5, 8, 2, False, False, 0.0), (3, 4, 4, 8, 2, True, False, 0.0), (3, 5, 5, 12, 3, True, True, 0.0),
        (2, 3, 6, 8, 4, True, False, 0.0), (1, 1, 1, 4, 1, False, True, 0.0), (2, 4, 5, 8, 2, True, False, 0.3),
    ]:  # fmt: skip
        label = (f"masked_attention B{B} Tq{Tq} Tk{Tk} C{C} NH{NH}" + (" padded" if pad else "") + (" causal" if causal else "")
                 + (f" dropout {drop}" if drop else ""))  # fmt: skip
        add(Check(
            label,
            lambda q, k, v, mask, xp=np, NH=NH, causal=causal, drop=drop: L.masked_attention_forward(
                q, k, v, NH, key_padding_mask=mask, causal=causal, attn_pdrop=drop, rng=HostRandom(9, xp), training=drop > 0),
            lambda d, c: L.masked_attention_backward(d, c),
            lambda r, B=B, Tq=Tq, Tk=Tk, C=C, pad=pad: [_randn(r, B, Tq, C), _randn(r, B, Tk, C), _randn(r, B, Tk, C),
                                                        _pad_mask(r, B, Tk) if pad else None],
        ))  # fmt: skip

    return checks


def _seq2seq_attention_and_block_checks() -> list[Check]:
    """multihead_attention (self and cross), encoder_block and decoder_block, post- and pre-norm."""
    checks: list[Check] = []
    add = checks.append

    def self_attention_backward(d, c):
        dx, dmem, g = L.multihead_attention_backward(d, c)
        return dx + dmem, g  # x is both the queries' and the keys'/values' input

    add(Check(
        "multihead_attention self B2 T5 C8 NH2 padded causal",
        lambda x, params, mask: L.multihead_attention_forward(x, x, params, 2, key_padding_mask=mask, causal=True),
        self_attention_backward,
        lambda r: [_randn(r, 2, 5, 8), _mha_params(r, 8), _pad_mask(r, 2, 5)],
        max_coords=24,
    ))  # fmt: skip
    add(Check(
        "multihead_attention cross B3 Tq4 Tk6 C8 NH2 padded",
        lambda x, memory, params, mask: L.multihead_attention_forward(x, memory, params, 2, key_padding_mask=mask),
        lambda d, c: L.multihead_attention_backward(d, c),
        lambda r: [_randn(r, 3, 4, 8), _randn(r, 3, 6, 8), _mha_params(r, 8), _pad_mask(r, 3, 6)],
        max_coords=24,
    ))  # fmt: skip

    for norm_first, act, drop in [(False, "relu", 0.0), (True, "relu", 0.0), (False, "gelu", 0.0), (True, "gelu", 0.2)]:
        form = "pre-norm" if norm_first else "post-norm"
        suffix = f" {form} {act}" + (f" dropout {drop}" if drop else "")
        add(Check(
            "encoder_block B2 T5 C8 NH2 F16 padded" + suffix,
            lambda x, block_params, mask, xp=np, nf=norm_first, act=act, drop=drop: L.encoder_block_forward(
                x, block_params, 2, key_padding_mask=mask, norm_first=nf, activation=act, drop_rate=drop,
                rng=HostRandom(13, xp), training=drop > 0),
            lambda d, c: L.encoder_block_backward(d, c),
            lambda r: [_randn(r, 2, 5, 8), _seq2seq_block_params(r, 8, 16, decoder=False), _pad_mask(r, 2, 5)],
            max_coords=16,
        ))  # fmt: skip
        add(Check(
            "decoder_block B2 T4 S5 C8 NH2 F16 padded" + suffix,
            lambda x, memory, block_params, tgt_mask, src_mask, xp=np, nf=norm_first, act=act, drop=drop: L.decoder_block_forward(
                x, memory, block_params, 2, tgt_padding_mask=tgt_mask, memory_padding_mask=src_mask, norm_first=nf,
                activation=act, drop_rate=drop, rng=HostRandom(17, xp), training=drop > 0),
            lambda d, c: L.decoder_block_backward(d, c),
            lambda r: [_randn(r, 2, 4, 8), _randn(r, 2, 5, 8), _seq2seq_block_params(r, 8, 16, decoder=True),
                       _pad_mask(r, 2, 4), _pad_mask(r, 2, 5)],
            max_coords=16,
        ))  # fmt: skip
    return checks


def all_checks() -> list[Check]:
    """Every check npgpt ships: the GPT-2 layers (fine-tuning's included), the encoder-decoder layers,
    then the whole models (the fine-tuning model's included)."""
    from .finetune.gradchecks import finetune_model_checks
    from .model_check import model_checks
    from .seq2seq.check import seq2seq_model_checks

    return layer_checks() + seq2seq_layer_checks() + model_checks() + finetune_model_checks() + seq2seq_model_checks()
