"""The Transformer's position-wise feed-forward network, with ReLU (the paper) or GELU.

Glossary: B=batch, T=time, C=channels (d_model), F=hidden width (d_ff).
    h   = x @ w1 + b1            (B, T, C) -> (B, T, F)
    a   = act(h)                 relu (relu.py) or gelu (gelu.py), elementwise
    a   = dropout(a)             training only, where torch.nn.TransformerEncoderLayer puts it
    out = a @ w2 + b2            (B, T, F) -> (B, T, C)
GPT-2's MLP (ffn.py) is the same network with GELU fixed and no inner dropout.
Derivation: the chain rule through docs/backprop.md#linear, docs/backprop.md#relu (or #gelu) and
docs/backprop.md#dropout.
"""

from __future__ import annotations

from typing import NamedTuple

from .dropout import DropoutCache, dropout_backward, dropout_forward
from .gelu import gelu_backward, gelu_forward
from .linear import LinearCache, linear_backward, linear_forward
from .relu import relu_backward, relu_forward

ACTIVATIONS = {"relu": (relu_forward, relu_backward), "gelu": (gelu_forward, gelu_backward)}


class FeedForwardCache(NamedTuple):
    fc1: LinearCache
    act: object  # ReluCache or GeluCache
    activation: str  # "relu" or "gelu"
    drop: DropoutCache
    fc2: LinearCache


def check_activation(activation: str) -> str:
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; use one of {', '.join(ACTIVATIONS)}")
    return activation


def feedforward_forward(x, w1, b1, w2, b2, activation="relu", *, drop_rate=0.0, rng=None, training=False):
    """x: (B, T, C), w1: (C, F), b1: (F,), w2: (F, C), b2: (C,) -> out: (B, T, C).

    activation: "relu" or "gelu" (GPT-2's tanh approximation). drop_rate, rng, training: dropout on
    the hidden activations, off unless training and drop_rate > 0.
    """
    act_forward, _ = ACTIVATIONS[check_activation(activation)]
    h, c_fc1 = linear_forward(x, w1, b1)  # (B, T, C) -> (B, T, F)
    a, c_act = act_forward(h)  # (B, T, F)
    a, c_drop = dropout_forward(a, drop_rate, rng, training)
    out, c_fc2 = linear_forward(a, w2, b2)  # (B, T, F) -> (B, T, C)
    return out, FeedForwardCache(c_fc1, c_act, activation, c_drop, c_fc2)


def feedforward_backward(dout, cache: FeedForwardCache):
    """The chain rule through the four steps, last first.

    Differentiates  `out = dropout(act(x @ w1 + b1)) @ w2 + b2`:  the second linear layer's backward
    gives da (and dw2, db2), dropout's keeps the same mask, the activation's gives dh = da * act'(h),
    the first linear layer's gives dx (and dw1, db1).
    dout: (B, T, C). Returns (dx, dw1, db1, dw2, db2) in forward-argument order.
    """
    _, act_backward = ACTIVATIONS[cache.activation]
    da, dw2, db2 = linear_backward(dout, cache.fc2)  # (B, T, C) -> (B, T, F)
    da = dropout_backward(da, cache.drop)
    dh = act_backward(da, cache.act)  # (B, T, F)
    dx, dw1, db1 = linear_backward(dh, cache.fc1)  # (B, T, F) -> (B, T, C)
    return dx, dw1, db1, dw2, db2
