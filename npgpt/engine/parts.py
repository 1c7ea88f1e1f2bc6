"""The parts both fast engines are built from: gradients, LayerNorms, dropout, and which parameters train.

Glossary: C=channels, n = the rows of this batch (b*t).

GPT's engine (engine/gpt.py) and the encoder-decoder's (seq2seq/engine.py) each hold one of each:

    gradients = Gradients(xp, model.params, need, dtype, product_dtype, added_into)
    gradients.views["h.0.attn.c_attn.weight"]           # a view of gradients.flat, one buffer for AdamW
    gradients.linear_backward(dx, dout, x, weight, dweight, dbias, accumulate)
    norms = LayerNorms(model, gradients, ops)            # every LayerNorm by its parameter prefix
    norms.forward("h.0.ln_1", out, mean, rstd, x);  norms.backward("h.0.ln_1", dx, dout, x, mean, rstd, scratch)
    drop = Dropout();  drop.start(p, rng)                 # one forward's masks, by key
    drop.forward(x, "res1_0");  d = drop.backward(scratch, dx, "res1_0")

A part holds no model logic: it is the bookkeeping every layer of either engine needs, written once.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np

from .. import fast
from ..backend import views_into
from ..precision import is_low_precision


class Gradients:
    """The gradients of the parameters that train: one flat buffer (`flat`, float32 also with 16-bit
    compute) and a view of it per parameter (`views`, keyed and ordered like the model's params), plus
    the two buffers computing them needs: a compute-dtype scratch for the weight-gradient products
    (with accumulation, or 16-bit compute: fast.linear_backward rounds through it) and a sink for the
    sums of a frozen LayerNorm. `added_into`: the gradients that ops add into rather than write
    (LayerNorm's, the position table's, ...), zeroed at the start of a backward that does not accumulate."""

    def __init__(self, xp, params: dict, need, dtype, product_dtype, added_into):
        shapes = {k: p for k, p in params.items() if k in need}
        self.xp, self.product_dtype = xp, np.dtype(product_dtype)
        self.rounds = is_low_precision(self.product_dtype)  # 16-bit products are rounded into float32 via the scratch
        self.flat = xp.zeros(sum(int(p.size) for p in shapes.values()), dtype=dtype)
        self.views = views_into(self.flat, shapes)
        self.added_into = [k for k in added_into if k in self.views]
        self.products = None  # 1-D, the size of the largest 2-D gradient: allocated on first use
        self.sink = None  # (2, C): where a frozen LayerNorm's parameter sums go, allocated on first use

    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in (self.flat, self.products, self.sink) if a is not None)

    def zero_added_into(self) -> None:
        for key in self.added_into:
            self.views[key][...] = 0

    def product_scratch(self, accumulate: bool):
        """The weight-gradient products' scratch when they cannot be written straight into the gradient
        (accumulating into it, or rounding 16-bit products into float32); else None."""
        if not accumulate and not self.rounds:
            return None
        if self.products is None:
            largest = max((int(g.size) for g in self.views.values() if g.ndim == 2), default=1)
            self.products = self.xp.empty(largest, dtype=self.product_dtype)
        return self.products

    def linear_backward(self, dx, dout, x, weight, dweight, dbias, accumulate: bool) -> None:
        """fast.linear_backward: dx (None: not wanted), and dweight, dbias (None: frozen, or no bias; the
        GEMM is then skipped) written, or added into with accumulate."""
        fast.linear_backward(dx, dweight, dbias, dout, x, weight, accumulate, scratch=self.product_scratch(accumulate))

    def layernorm_sums(self, name: str, channels: int, dtype) -> tuple:
        """(dweight, dbias) of LayerNorm `name`: its gradients, or for a frozen one rows of the sink (the
        sums over rows are computed anyway, with dx, and nobody reads them)."""
        dweight, dbias = self.views.get(name + ".weight"), self.views.get(name + ".bias")
        if dweight is None or dbias is None:
            if self.sink is None:
                self.sink = self.xp.empty((2, channels), dtype=dtype)
            dweight = self.sink[0] if dweight is None else dweight
            dbias = self.sink[1] if dbias is None else dbias
        return dweight, dbias


class LayerNorms:
    """Every LayerNorm of a model, by its parameter prefix (e.g. "h.0.ln_1"), through the chosen op
    (ops.layernorm_*: the fast op or the CUDA kernel). It reads the model's own weights (float32 also
    with 16-bit compute) and adds its gradients into `gradients`."""

    def __init__(self, model, gradients: Gradients, ops):
        self.model, self.gradients, self.ops = model, gradients, ops

    def forward(self, name, out, mean, rstd, x) -> None:
        """out (n, C) = LayerNorm `name` of x (n, C); its mean and rstd (n,) kept for the backward."""
        p = self.model.params
        self.ops.layernorm_forward(out, mean, rstd, x, p[name + ".weight"], p[name + ".bias"], self.model.config.ln_eps)

    def backward(self, name, dx, dout, x, mean, rstd, scratch) -> None:
        """dx (n, C) (may be dout), and LayerNorm `name`'s gradients added into. scratch: (n, C)."""
        weight = self.model.params[name + ".weight"]
        dweight, dbias = self.gradients.layernorm_sums(name, weight.shape[0], weight.dtype)
        self.ops.layernorm_backward(dx, dweight, dbias, dout, x, mean, rstd, weight, scratch=scratch)


class Dropout:
    """One forward's dropout: its rate p, its generator, and the keep-masks it drew, by key, in the order
    the readable model draws them (so one generator drops the same elements on both paths). The
    backward reads the masks again; a replay (recompute) applies them again instead of drawing."""

    def __init__(self):
        self.p, self.rng, self.masks = 0.0, None, None

    def start(self, p: float, rng) -> None:
        """A new forward: masks from the last one are dropped."""
        self.p, self.rng, self.masks = p, rng, {}

    def nbytes(self) -> int:
        """Bytes of the kept masks (a kept generator copy, which has none, is not counted)."""
        return sum(int(m.nbytes) for m in (self.masks or {}).values() if hasattr(m, "nbytes"))

    def forward(self, x, key: str, replay: bool = False) -> None:
        """x = dropout(x) in place (nothing when p = 0): a fresh mask kept under key, or (replay) the kept one."""
        if self.p == 0:
            return
        if replay:
            fast.dropout_backward(x, x, self.masks[key], self.p)  # the same product: x * keep / (1 - p)
        else:
            self.masks[key] = fast.dropout_forward(x, x, self.p, self.rng)

    def backward(self, dx, dout, key: str):
        """The gradient through the dropout kept under key: dx = dout * keep / (1 - p), returned; with
        p = 0 dout itself (dx untouched)."""
        if self.p == 0:
            return dout
        fast.dropout_backward(dx, dout, self.masks[key], self.p)
        return dx


@dataclass(frozen=True)
class Trainable:
    """Which of a GPT's parameters train (fine-tuning's --trainable; pretraining: all), as GPT.backward_plan
    gives it: `names`, and `lowest`, the lowest part a backward must reach: -1 the embeddings, l block l,
    L ln_f only, L + 1 nothing below the LM head. The backward stops there; a frozen linear layer has
    no gradient buffer, so its weight GEMM is skipped."""

    names: frozenset
    lowest: int

    def below_head(self, n_layers: int) -> bool:
        """Whether anything under the LM head trains (else its backward computes only its own gradient)."""
        return self.lowest <= n_layers

    def blocks(self, n_layers: int) -> range:
        """The blocks a backward runs through, top first."""
        return range(n_layers - 1, max(self.lowest, 0) - 1, -1)

    @property
    def embeddings(self) -> bool:
        return self.lowest < 0


def overflow_allowed(dtype):
    """float16 overflows to inf by design: loss scaling (update.py) finds it in the gradients and backs off."""
    return np.errstate(over="ignore", invalid="ignore") if dtype == np.float16 else contextlib.nullcontext()
