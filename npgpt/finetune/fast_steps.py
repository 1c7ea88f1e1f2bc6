"""The two fine-tuning steps on the fast engine (npgpt/engine/'s FastLossAndGrads): steps.py's, faster.

Glossary: B=batch, T=time, C=channels, V=vocab, k=labels; b, t: this batch's (at most B, T).

Each class has the interface of its readable twin in steps.py (call it on a batch, read `.loss` and
`.grads`, `.evaluate(batch)`), computes the same numbers (tests/test_finetune_fast.py holds them equal:
float64 to ~1e-12, float32 to ~1e-5, with padding, dropout and each --trainable), and keeps gradients
only for the trainable parameters. What the fast engine adds for them (see its docstring):
- the trunk runs once per batch into buffers allocated for (B, T); a batch may be narrower (b <= B)
  and shorter (t <= T: each batch is padded to its own longest example);
- the engine keeps gradient buffers for the trainable parameters only, skips the weight-gradient
  GEMMs of frozen layers and stops its backward below the lowest trainable layer;
- FastClassifierStep runs the readable Classifier's layers as their fast twins, on the engine's
  buffers: the trunk up to the final LayerNorm (`engine.hidden`) and, with lambda > 0, the LM head's
  logits (`engine.logits`); fast.classifier_head_* on the hidden states, and fast.mixed_loss_ on both
  logits (the LM term through the engine's loss op, which may be the CUDA kernel). With lambda = 0
  the LM head never runs and its (B*T, V) logits are not even allocated. Both gradients go back in
  one engine.backward(dhidden=..., dlogits=...): they add up at the final LayerNorm's output.
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
        self.cls_logits = xp.empty((B, k), dtype=dtype)  # the logits, then (in place) dL/dlogits
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
        xp = self.clf.model.xp
        idx, labels = xp.asarray(idx), xp.asarray(labels)
        b, t = idx.shape
        lm_targets = None
        if self.lm_weight > 0:  # no target at all (one-token texts): L_PT = 0 and the LM head need not run
            lm_targets = lm_targets_for(idx, self.clf.pad_token_id)
            lm_targets = lm_targets if bool((lm_targets != IGNORE_INDEX).any()) else None
        lm = lm_targets is not None
        self.engine.forward(idx, None, training=True, rng=rng, backward=self.train_trunk, lm_head=lm)
        z = self._head_forward(idx)
        self.loss, self.ft_loss, self.lm_loss = fast.mixed_loss_(z, labels, self.engine.logits if lm else None, lm_targets,
                                                                 self.lm_weight, lm_cross_entropy_=self.engine.ops.cross_entropy_)  # fmt: skip
        dhidden = self.dhidden[: b * t * self.pooled.shape[1]].reshape(b, t, -1) if self.train_trunk else None  # (b, t, C)
        fast.classifier_head_backward(dhidden, self.dscore, z, self.pooled[:b], self.last[:b], self.clf.score,
                                      dpooled=None if dhidden is None else self.dpooled[:b])  # fmt: skip
        if self.train_trunk:  # the two heads' gradients add up at ln_f's output
            self.engine.backward(dhidden=dhidden, dlogits=self.engine.logits if lm else None)
        return self

    def _head_forward(self, idx):
        """The classification logits (b, k) of engine.hidden, in this step's buffer (self.logits: a NumPy copy)."""
        b = idx.shape[0]
        fast.last_token_index(self.last[:b], idx, self.clf.pad_token_id)
        fast.classifier_head_forward(self.cls_logits[:b], self.pooled[:b], self.engine.hidden, self.last[:b], self.clf.score)
        self.logits = to_numpy(self.cls_logits[:b]).copy()
        return self.cls_logits[:b]

    def evaluate(self, batch) -> tuple[float, np.ndarray]:
        """(sum of L_FT over the batch's rows, logits (B, k) as NumPy): no dropout, no LM head."""
        idx, labels = batch
        idx, labels = self.clf.model.xp.asarray(idx), self.clf.model.xp.asarray(labels)
        self.engine.forward(idx, None, training=False, backward=False, lm_head=False)
        ft_loss = fast.mixed_loss_(self._head_forward(idx), labels, lm_weight=self.lm_weight, want_grad=False)[1]
        return ft_loss * len(labels), self.logits


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
