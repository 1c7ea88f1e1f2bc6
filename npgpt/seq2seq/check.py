"""Whole-model gradient checks of the encoder-decoder Transformer: a tiny model in float64 on a padded
batch, every parameter tensor sampled (npgpt gradcheck runs these after the layers).

Parameters are redrawn larger than the initialisation (weights ~ N(0, 0.3^2), biases ~ N(0, 0.1^2),
LayerNorm scales ~ 1 + N(0, 0.1^2)) so every path carries a visible gradient. Two decoder layers read
the encoder output, so a backward that kept only one layer's dmemory fails on every encoder tensor.
"""

from __future__ import annotations

import numpy as np

from ..gradcheck import Check, HostRandom
from .config import Seq2SeqConfig
from .model import Seq2Seq


def tiny_config(**overrides) -> Seq2SeqConfig:
    """V=13, C=8, 2 heads, F=12, 2 encoder and 2 decoder layers, max_len 8, dropout off."""
    base = dict(src_vocab_size=13, tgt_vocab_size=13, d_model=8, n_heads=2, n_encoder_layers=2, n_decoder_layers=2,
                d_ff=12, dropout=0.0, max_len=8)  # fmt: skip
    return Seq2SeqConfig(**{**base, **overrides})


def random_params(config: Seq2SeqConfig, rng: np.random.Generator) -> dict:
    model = Seq2Seq(config, dtype=np.float64, device="cpu")
    params = {}
    for k, v in model.params.items():
        if v.ndim == 1 and "norm" in k and k.endswith(".weight"):
            params[k] = 1.0 + 0.1 * rng.standard_normal(v.shape)
        elif v.ndim == 1:
            params[k] = 0.1 * rng.standard_normal(v.shape)
        else:
            params[k] = 0.3 * rng.standard_normal(v.shape)
    return params


def padded_batch(config: Seq2SeqConfig, rng: np.random.Generator, B: int, S: int, T: int):
    """src (B, S), tgt_in (B, T), targets (B, T) with random lengths, padded on the right with pad_id."""
    pad, bos, eos = config.pad_id, config.bos_id, config.eos_id
    src = rng.integers(3, config.src_vocab_size, size=(B, S))
    body = rng.integers(3, config.tgt_vocab_size, size=(B, T))
    tgt_in, targets = np.full((B, T), pad), np.full((B, T), pad)
    for b in range(B):
        n_src = S if b == 0 else int(rng.integers(1, S + 1))
        src[b, n_src:] = pad
        n = T - 1 if b == 0 else int(rng.integers(0, T))  # target words; tgt_in is bos + them, targets them + eos
        tgt_in[b, 0] = bos
        tgt_in[b, 1 : n + 1] = body[b, :n]
        targets[b, :n] = body[b, :n]
        targets[b, n] = eos
    return src, tgt_in, targets


def seq2seq_model_check(label: str, config: Seq2SeqConfig, B: int = 3, S: int = 5, T: int = 4, training: bool = False,
                        tol: float = 1e-6, max_coords: int = 3) -> Check:  # fmt: skip
    model = Seq2Seq(config, dtype=np.float64, device="cpu")

    def make_inputs(rng):
        return [random_params(config, rng), *padded_batch(config, rng, B, S, T)]

    def forward(params, src, tgt_in, targets, xp=np):
        model.params = params  # the checker perturbs these arrays in place
        _, loss, cache = model.forward(src, tgt_in, targets, training=training, rng=HostRandom(4321, xp))
        return loss, cache

    def backward(dout, cache):
        return model.backward(cache, dloss=dout)

    return Check(label, forward, backward, make_inputs, tol=tol, max_coords=max_coords,
                 names=["params", "src", "tgt_in", "targets"])  # fmt: skip


def seq2seq_model_checks() -> list[Check]:
    """Two tiny models between them cover post- and pre-norm, ReLU and GELU, sinusoidal and learned
    positions, one shared table and a separate source table, dropout on and off. (An untied output,
    tie_embeddings="none", is checked against PyTorch in tests/test_seq2seq_torch_parity.py.)"""
    return [
        seq2seq_model_check("seq2seq post-norm relu sinusoidal tied", tiny_config()),
        seq2seq_model_check("seq2seq pre-norm gelu learned decoder-tied dropout 0.2",
                            tiny_config(norm="pre", activation="gelu", pos_encoding="learned", tie_embeddings="decoder",
                                        src_vocab_size=11, dropout=0.2), training=True),
    ]  # fmt: skip
