"""The two fine-tuning steps on the fast engine (engine.py's FastLossAndGrads): steps.py's, faster.

Glossary: B=batch, T=time, C=channels, V=vocab, k=labels; b, t: this batch's (at most B, T).

Each class has the interface of its readable twin in steps.py (call it on a batch, read `.loss` and
`.grads`, `.evaluate(batch)`), computes the same numbers (tests/test_finetune_fast.py holds them equal:
float64 to ~1e-12, float32 to ~1e-5, with padding, dropout and each --trainable), and keeps gradients
only for the trainable parameters. What the fast engine adds for them (see its docstring):
- the trunk runs once per batch into buffers allocated for (B, T); a batch may be narrower (b <= B)
  and shorter (t <= T: each batch is padded to its own longest example);
- the engine keeps gradient buffers for the trainable parameters only, skips the weight-gradient
  GEMMs of frozen layers and stops its backward below the lowest trainable layer;
- FastClassifierStep: the engine stops at the final LayerNorm (`engine.hidden`); the head and both
  losses are the fast ops of their parts (classifier_head = last_token + linear, mixed_loss = two
  cross-entropies): fast.last_token_*, fast.linear_*, fast.cross_entropy_. With lambda = 0 the LM
  head never runs and its (B*T, V) logits are not even allocated; with lambda > 0 its loss gradient
  is scaled by lambda inside the cross-entropy (dloss) and the classifier's gradient is added to the
  LM head's at the final LayerNorm's output (engine.backward(dhidden=...)).
"""

from __future__ import annotations

import numpy as np

from .. import fast
from ..backend import to_numpy
from ..engine import IGNORE_INDEX, FastLossAndGrads
from ..model import GPT
from .classifier import SCORE, Classifier, lm_targets_for


class FastClassifierStep:
    """ClassifierStep on the fast engine: L_FT + lm_weight * L_PT on batches of up to (batch_size,
    seq_len); gradients of `trainable` only (views of buffers reused by every step)."""

    def __init__(self, clf: Classifier, trainable: list[str], lm_weight: float, batch_size: int, seq_len: int,
                 kernels=None):  # fmt: skip
        self.clf, self.trainable, self.lm_weight = clf, list(trainable), float(lm_weight)
        model = clf.model
        trunk = [k for k in self.trainable if k != SCORE]
        self.train_trunk, self.train_score = bool(trunk), SCORE in self.trainable
        self.engine = FastLossAndGrads(model, batch_size, seq_len, kernels=kernels, trainable=trunk,
                                       lm_head=self.lm_weight > 0)  # fmt: skip
        xp, dtype = model.xp, model.dtype
        B, T, C, k = batch_size, seq_len, model.config.emb_dim, clf.score.shape[0]
        self.last = xp.empty(B, dtype=np.int64)  # (B,) the position each row's head reads
        self.pooled = xp.empty((B, C), dtype=dtype)  # h = hidden[b, last[b]]
        self.cls_logits = xp.empty((B, k), dtype=dtype)
        self.dcls = xp.empty((B, k), dtype=dtype)  # the logits, then (in place) dL_FT/dlogits
        self.dpooled = xp.empty((B, C), dtype=dtype) if self.train_trunk else None
        self.dhidden = xp.empty(B * T * C, dtype=dtype) if self.train_trunk else None  # (b, t, C) views
        self.dscore = xp.empty((k, C), dtype=dtype) if self.train_score else None
        grads = dict(self.engine.grads)
        if self.train_score:
            grads[SCORE] = self.dscore
        self.grads = {name: grads[name] for name in clf.params if name in grads}  # in the readable step's order
        self.loss = self.ft_loss = self.lm_loss = float("nan")
        self.logits = None

    def __call__(self, batch, rng=None):
        idx, labels = batch
        xp, pad = self.clf.model.xp, self.clf.pad_token_id
        idx = xp.asarray(idx)
        b, t = idx.shape
        lm_loss, lm_head = 0.0, False
        if self.lm_weight > 0:  # the trunk's forward with the LM head and its loss (gradient scaled by lambda)
            targets = lm_targets_for(idx, pad)
            lm_head = bool((targets != IGNORE_INDEX).any())  # none: one-token texts, L_PT = 0 as in mixed_loss
            if lm_head:
                lm_loss = self.engine.forward(idx, targets, training=True, rng=rng, dloss=self.lm_weight,
                                              backward=self.train_trunk)  # fmt: skip
        if not lm_head:
            self.engine.forward(idx, None, training=True, rng=rng, backward=self.train_trunk, lm_head=False)
        ft_loss = self._head(idx, labels, want_grad=True)
        if self.train_trunk:
            dhidden = self.dhidden[: b * t * self.pooled.shape[1]].reshape(b, t, -1)  # (b, t, C)
            fast.last_token_backward(dhidden, self.dpooled[:b], self.last[:b])  # the gather's scatter
            self.engine.backward(dhidden=dhidden)  # added to the LM head's gradient at ln_f's output
        self.loss, self.ft_loss, self.lm_loss = ft_loss + self.lm_weight * lm_loss, ft_loss, lm_loss
        return self

    def _head(self, idx, labels, want_grad: bool) -> float:
        """The classification head on engine.hidden and L_FT; self.logits (b, k) as NumPy. With want_grad
        the head's gradients: dscore (trainable) and dpooled (when the trunk trains)."""
        b = idx.shape[0]
        last, h, z, d = self.last[:b], self.pooled[:b], self.cls_logits[:b], self.dcls[:b]
        score_t = self.clf.score.T  # (C, k) view of the (k, C) weight
        fast.last_token_index(last, idx, self.clf.pad_token_id)
        fast.last_token_forward(h, self.engine.hidden, last)  # (b, t, C) -> (b, C)
        fast.linear_forward(z, h, score_t)  # (b, C) @ (C, k) -> (b, k)
        self.logits = to_numpy(z).copy()
        d[...] = z
        labels = self.clf.model.xp.asarray(labels)
        ft_loss = fast.cross_entropy_(d, labels, want_grad)  # d becomes (softmax - onehot) / b
        if want_grad and (self.train_score or self.train_trunk):
            dh = self.dpooled[:b] if self.train_trunk else None
            dscore_t = self.dscore.T if self.train_score else None  # (C, k) view: computed in (k, C) layout
            fast.linear_backward(dh, dscore_t, None, d, h, score_t)
        return float(ft_loss)

    def evaluate(self, batch) -> tuple[float, np.ndarray]:
        """(sum of L_FT over the batch's rows, logits (B, k) as NumPy): no dropout, no LM head."""
        idx, labels = batch
        idx = self.clf.model.xp.asarray(idx)
        self.engine.forward(idx, None, training=False, backward=False, lm_head=False)
        return self._head(idx, labels, want_grad=False) * len(labels), self.logits


class FastInstructStep:
    """InstructStep on the fast engine: the masked LM loss on batches of up to (batch_size, seq_len) of
    (inputs, targets with -100 masked); gradients of `trainable` only."""

    def __init__(self, model: GPT, trainable: list[str], batch_size: int, seq_len: int, kernels=None):
        self.model, self.trainable = model, list(trainable)
        self.engine = FastLossAndGrads(model, batch_size, seq_len, kernels=kernels, trainable=self.trainable)
        self.grads = self.engine.grads
        self.loss = float("nan")

    def __call__(self, batch, rng=None):
        x, y = batch
        self.loss = self.engine(x, y, training=True, rng=rng)
        return self

    def evaluate(self, batch) -> tuple[float, int]:
        """(sum of the loss over the batch's unmasked targets, how many there are): no dropout."""
        x, y = batch
        n = int((np.asarray(to_numpy(y)) != IGNORE_INDEX).sum())
        if n == 0:
            return 0.0, 0
        return self.engine.loss(x, y) * n, n
