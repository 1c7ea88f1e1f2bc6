"""Whole-model gradient checks: a tiny GPT in float64, every parameter tensor sampled.

The parameters are redrawn with larger values than GPT-2's initialisation (weights ~ N(0, 0.2),
biases ~ N(0, 0.1), LayerNorm scales ~ 1 + N(0, 0.1)) so every path carries a visible gradient.
"""

from __future__ import annotations

import numpy as np

from .config import GPTConfig
from .gradcheck import Check, HostRandom
from .model import GPT


def tiny_config(**overrides) -> GPTConfig:
    """V=37 (not a multiple of anything convenient), T<=8, C=8, 2 heads, 2 layers."""
    base = dict(vocab_size=37, context_length=8, emb_dim=8, n_heads=2, n_layers=2, drop_rate=0.0, qkv_bias=True)
    return GPTConfig(**{**base, **overrides})


def random_params(config: GPTConfig, rng: np.random.Generator) -> dict:
    model = GPT(config, dtype=np.float64, device="cpu")
    params = {}
    for k, v in model.params.items():
        if k.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            params[k] = 1.0 + 0.1 * rng.standard_normal(v.shape)
        elif k.endswith(".bias"):
            params[k] = 0.1 * rng.standard_normal(v.shape)
        else:
            params[k] = 0.2 * rng.standard_normal(v.shape)
    return params


def model_check(label: str, config: GPTConfig, B: int = 2, T: int = 5, training: bool = False,
                upstream: str = "loss", tol: float = 1e-6, max_coords: int = 8) -> Check:  # fmt: skip
    """A Check of every parameter gradient of GPT(config) on a random batch.

    upstream="loss": the scalar loss with a random upstream scalar; "logits": the (B, T, V) logits
    with a random upstream tensor (exercises backward's dlogits path and the head directly).
    """
    model = GPT(config, dtype=np.float64, device="cpu")

    def make_inputs(rng):
        idx = rng.integers(0, config.vocab_size, size=(B, T))
        targets = rng.integers(0, config.vocab_size, size=(B, T))
        return [random_params(config, rng), idx, targets]

    def forward(params, idx, targets, xp=np):
        model.params = params  # the checker perturbs these arrays in place
        rng = HostRandom(1234, xp)  # the same dropout masks on every call
        logits, loss, cache = model.forward(idx, targets if upstream == "loss" else None, training=training, rng=rng)
        return (loss if upstream == "loss" else logits), cache

    def backward(dout, cache):
        if upstream == "loss":
            return model.backward(cache, dloss=dout)
        return model.backward(cache, dloss=None, dlogits=dout)

    return Check(label, forward, backward, make_inputs, tol=tol, max_coords=max_coords, names=["params", "idx", "targets"])


def model_checks() -> list[Check]:
    return [
        model_check("model tied", tiny_config()),
        model_check("model tied dropout 0.2", tiny_config(drop_rate=0.2), training=True),
        model_check("model untied no qkv bias", tiny_config(tie_weights=False, qkv_bias=False), T=8),
        model_check("model logits upstream", tiny_config(n_layers=1), B=1, T=3, upstream="logits"),
    ]
