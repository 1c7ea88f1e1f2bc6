"""What lies below and above GPT-2's blocks in the fast engine: the embeddings, and the LM head with its loss.

Glossary: B=batch, T=time, C=channels, V=vocab; b, t: this batch's; n = b*t rows.

    x = dropout(wte[idx] + wpe[:t])                  Embeddings        (b, t) -> (n, C)
    logits = ln_f(x) @ head^T;  loss = CE(logits)    LMHead            (n, C) -> (n, V) -> 0-d

Fine-tuning's two options live here: lm_head=False (an engine that never runs the LM head has no
(N, V) logits buffer) and `trainable` (a frozen head skips its weight GEMM; frozen tables get nothing).

The padded head (a GPU's default, memory.VOCAB_MULTIPLE): the vocabulary V is padded to Vp, a multiple
of 128 (GPT-2: 50257 -> 50304, as llm.c does), for the head's three GEMMs, so none of them has an odd
dimension or leading dimension: the logits buffer is (N, Vp), the head's weights are copied each
forward into a (Vp, C) buffer whose rows V.. are zero, and the weight gradient is a (Vp, C) product
whose first V rows are written to the (V, C) gradient. The padded columns never reach the loss (they
are set to -inf before it, so their probability is exactly 0, they add exactly 0 to every sum and
their gradient is 0), the gradients (set to 0 before the backward's products; the gradient keeps its
V rows), the caller (`logits` is the (n, V) view) or a checkpoint (the model's parameters are
untouched: V rows, the Hugging Face layout).
"""

from __future__ import annotations

import numpy as np

from .. import fast
from ..backend import get_array_module


class Embeddings:
    """x = dropout(wte[idx] + wpe[:t]), and its backward into the tables that train."""

    def __init__(self, config, weights, gradients, drop):
        self.config, self.weights, self.gradients, self.drop = config, weights, gradients, drop

    def forward(self, x, idx, b: int, t: int):
        """x (n, C) <- the embedded batch idx (b, t); returns x."""
        fast.embedding_forward(x, idx.reshape(-1), self.weights["wte.weight"])  # (n, C) token embeddings
        fast.add_position_embedding_(x.reshape(b, t, self.config.emb_dim), self.weights["wpe.weight"])  # + positions
        self.drop.forward(x, "emb")
        return x

    def backward(self, dx, idx, b: int, t: int) -> None:
        """The tables' gradients added into from dx (n, C), which is overwritten."""
        dx = self.drop.backward(dx, dx, "emb")
        views = self.gradients.views
        if "wte.weight" in views:  # x = wte[idx] + wpe[:t]
            fast.embedding_backward(views["wte.weight"], dx, idx.reshape(-1))
        if "wpe.weight" in views:
            fast.position_embedding_backward(views["wpe.weight"], dx.reshape(b, t, self.config.emb_dim))


class LMHead:
    """logits = lnf @ head^T with head the (V, C) token table (tied) or lm_head.weight, and the loss, in
    place on the logits (ops.cross_entropy_: they become dloss * (softmax - onehot) / n_valid, scaled
    before any rounding). Its backward computes head's gradient in head's own (V, C) layout. Padded
    (work.head_weight, (Vp, C)): the products run over Vp columns (the module docstring)."""

    def __init__(self, config, acts, work, weights, gradients, ops):
        self.acts, self.work, self.weights, self.gradients, self.ops = acts, work, weights, gradients, ops
        self.key = "wte.weight" if config.tie_weights else "lm_head.weight"
        self.V = config.vocab_size
        self.padded = work.head_weight is not None

    def forward(self, n: int, targets, want_grad: bool, dloss: float, n_valid: int):
        """The logits of the first n rows of ln_f's output, and with targets (n,) the mean loss (else None)."""
        a = self.acts
        if not self.padded:
            fast.linear_forward(a.logits[:n], a.lnf[:n], self.weights[self.key].T)  # (n, C) @ (C, V) -> (n, V)
        else:
            self.work.head_weight[: self.V] = self.weights[self.key]  # rows V.. stay zero
            fast.linear_forward(a.logits[:n], a.lnf[:n], self.work.head_weight.T)  # (n, C) @ (C, Vp) -> (n, Vp)
            a.logits[:n, self.V :] = -np.inf  # probability exactly 0: the loss, its sums and gradient are V's
        if targets is None:
            return None
        return self.ops.cross_entropy_(a.logits[:n], targets.reshape(-1), want_grad, dloss, n_valid=n_valid)

    def backward(self, dx, n: int, accumulate: bool, head: bool) -> None:
        """head: the logits hold a gradient; dx (n, C) (None: nothing below trains) gets lnf's, and head's
        gradient is written (added into). Without it, a head that trains gets 0 (unless accumulating; a
        tied table still gets its embedding rows later)."""
        dhead = self.gradients.views.get(self.key)
        if head and self.padded:
            self._padded_backward(dx, n, accumulate, dhead)
        elif head:
            a = self.acts
            self.gradients.linear_backward(dx, a.logits[:n], a.lnf[:n], self.weights[self.key].T,
                                           None if dhead is None else dhead.T, None, accumulate)  # (C, V) views of (V, C)
        elif dhead is not None and not accumulate:
            dhead[...] = 0  # no LM loss reached the head

    def _padded_backward(self, dx, n: int, accumulate: bool, dhead) -> None:
        """dx = dlogits @ head, dhead = (dlogits^T @ lnf)[:V] over the padded Vp columns (added into with
        accumulate). The padded columns of dlogits are set to 0 first (-inf after a loss that was not the
        engine's, as fine-tuning's on `logits`)."""
        a, w = self.acts, self.work
        dlogits = a.logits[:n]  # (n, Vp)
        dlogits[:, self.V :] = 0
        if dx is not None:
            fast.matmul(dx, dlogits, w.head_weight)  # (n, Vp) @ (Vp, C) -> (n, C)
        if dhead is None:
            return
        if w.head_grad is None:
            w.head_grad = get_array_module(dlogits).empty_like(w.head_weight)
        fast.matmul(w.head_grad, dlogits.T, a.lnf[:n])  # (Vp, n) @ (n, C) -> (Vp, C); its rows V.. are 0
        if accumulate:
            dhead += w.head_grad[: self.V]
        else:
            dhead[...] = w.head_grad[: self.V]
