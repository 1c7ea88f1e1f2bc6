"""Fast position-wise feed-forward network, ReLU or GELU, with dropout on the hidden layer, into buffers.

Glossary: n = rows (B*T), C = channels (d_model), F = hidden width (d_ff).
    h = x @ w1 + b1;  a = dropout(act(h));  out = a @ w2 + b2         (n, C) -> (n, F) -> (n, C)

Readable twin: npgpt.layers.feedforward (feedforward_forward / feedforward_backward). Differences:
- saved state (`FeedForwardSaved`): with ReLU one (n, F) buffer, `h`, which ends the forward holding
  a = dropout(relu(h)) (bias add, ReLU and dropout all in place), since ReLU's backward needs only
  where its output is positive (fast/relu.py) and a is positive exactly where relu(h) was and the
  dropout kept it; with GELU two, `h` the pre-activation (GELU's backward needs it) and `a`. The
  readable cache keeps x, h's mask or h, the dropout mask and a, each separately; the caller keeps
  the keep-mask (returned by the forward) and gives x to the backward again;
- b1 is added by the activation's op (fused, as in fast/gelu.py and fast/relu.py);
- the weight gradients are written into the caller's buffers, or added into them with accumulate=True;
- threads and 16-bit handling: inside the activation ops and the GEMMs (fast/relu.py, fast/gelu.py,
  fast/linear.py).
CUDA: cuBLAS for the GEMMs; kernels/gelu.cu can replace GELU (the `gelu_forward` / `gelu_backward_`
resources), ReLU has no kernel of ours.
"""

from __future__ import annotations

from typing import NamedTuple

from .dropout import dropout_backward, dropout_forward
from .gelu import gelu_backward_, gelu_forward
from .linear import linear_backward, linear_forward
from .relu import relu_backward_, relu_forward


class FeedForwardSaved(NamedTuple):
    """The buffers the forward fills for the backward."""

    h: object  # (n, F) ReLU: dropout(relu(x @ w1 + b1)), in place; GELU: the pre-activation x @ w1 + b1
    a: object  # (n, F) GELU: dropout(gelu(h)); None with ReLU


def feedforward_forward(out, saved: FeedForwardSaved, x, w1, b1, w2, b2, activation: str = "relu", p: float = 0.0,
                        rng=None, *, threads: int = 1, gelu_forward=gelu_forward):  # fmt: skip
    """out (n, C) = dropout(act(x (n, C) @ w1 + b1)) @ w2 + b2. activation: "relu" or "gelu". p > 0:
    dropout on the hidden layer with a mask drawn from `rng` (as layers.feedforward draws it),
    returned; else returns None. gelu_forward: fast.gelu_forward (or a CUDA kernel with its arguments)."""
    h, a = saved
    linear_forward(h, x, w1)  # (n, C) @ (C, F) -> (n, F); b1 is added by the activation
    if activation == "relu":
        relu_forward(h, h, b1, threads=threads)
        a = h
    elif activation == "gelu":
        gelu_forward(a, h, b1)
    else:
        raise ValueError(f"unknown activation {activation!r}; use relu or gelu")
    keep = dropout_forward(a, a, p, rng) if p > 0 else None
    linear_forward(out, a, w2, b2)  # (n, F) @ (F, C) -> (n, C)
    return keep


def feedforward_backward(dx, dw1, db1, dw2, db2, dout, saved: FeedForwardSaved, x, w1, w2, activation: str = "relu",
                         keep=None, p: float = 0.0, accumulate: bool = False, *, dh, weight_scratch=None,
                         threads: int = 1, gelu_backward_=gelu_backward_) -> None:  # fmt: skip
    """dx (n, C) and the four weight gradients (written, or added into with accumulate) from dout (n, C).
    dh: (n, F) scratch. keep: the forward's mask (None: no dropout).

    Differentiates  `out = dropout(act(x @ w1 + b1)) @ w2 + b2`  last step first: w2's backward gives
    da, dropout's applies the same mask, the activation's gives dh = da * act'(h), w1's gives dx."""
    h, a = saved
    lin = dict(accumulate=accumulate, scratch=weight_scratch)
    linear_backward(dh, dw2, db2, dout, h if activation == "relu" else a, w2, **lin)  # dh holds da
    if keep is not None:
        dropout_backward(dh, dh, keep, p)
    if activation == "relu":
        relu_backward_(dh, h, threads=threads)  # h is positive exactly where a unit passed (see above)
    else:
        gelu_backward_(dh, h)
    linear_backward(dx, dw1, db1, dh, x, w1, **lin)  # (n, F) -> (n, C)

