"""One fine-tuning step's forward and backward, on the readable layers (the reference engine).

Both step objects have the same shape as the training engine's step: call it on a batch, then read
`.loss` (a float) and `.grads` (a dict over the trainable parameters only). `.evaluate(batch)` is the
forward without dropout and without gradients. The loop in trainer.py uses nothing else; the fast
twins in fast_steps.py (the default, --engine fast) have the same four names and compute the same
numbers. classifier_step / instruct_step pick one by the engine's name.
"""

from __future__ import annotations

import numpy as np

from ..backend import to_numpy
from ..model import GPT
from .classifier import Classifier


def classifier_step(engine: str, clf: Classifier, trainable: list[str], lm_weight: float, batch_size: int,
                    seq_len: int):  # fmt: skip
    """The classification step of `engine` ("fast" or "reference") for batches of up to (batch_size, seq_len)."""
    if engine == "fast":
        from .fast_steps import FastClassifierStep

        return FastClassifierStep(clf, trainable, lm_weight, batch_size, seq_len)
    return ClassifierStep(clf, trainable, lm_weight)


def instruct_step(engine: str, model: GPT, trainable: list[str], batch_size: int, seq_len: int):
    """The instruction-tuning step of `engine` ("fast" or "reference") for batches of up to (batch_size, seq_len)."""
    if engine == "fast":
        from .fast_steps import FastInstructStep

        return FastInstructStep(model, trainable, batch_size, seq_len)
    return InstructStep(model, trainable)


class ClassifierStep:
    """L_FT + lm_weight * L_PT on a batch of (idx (B, T), labels (B,)); gradients of `trainable` only."""

    def __init__(self, clf: Classifier, trainable: list[str], lm_weight: float):
        self.clf, self.trainable, self.lm_weight = clf, list(trainable), float(lm_weight)
        self.loss = self.ft_loss = self.lm_loss = float("nan")
        self.logits, self.grads = None, None

    def __call__(self, batch, rng=None):
        idx, labels = batch
        logits, loss, cache = self.clf.forward(idx, labels, lm_weight=self.lm_weight, training=True, rng=rng)
        self.grads = self.clf.backward(cache, trainable=self.trainable)
        self.loss, self.ft_loss, self.lm_loss = float(loss), float(cache.loss.ft_loss), float(cache.loss.lm_loss)
        self.logits = to_numpy(logits)
        return self

    def evaluate(self, batch) -> tuple[float, np.ndarray]:
        """(sum of L_FT over the batch's rows, logits (B, k) as NumPy): no dropout, no LM head."""
        idx, labels = batch
        logits, loss, _ = self.clf.forward(idx, labels, lm_weight=0.0)
        return float(loss) * len(labels), to_numpy(logits)


class InstructStep:
    """The masked language-model loss on a batch of (inputs (B, T), targets (B, T) with -100 masked)."""

    def __init__(self, model: GPT, trainable: list[str]):
        self.model, self.trainable = model, list(trainable)
        self.loss, self.grads = float("nan"), None

    def __call__(self, batch, rng=None):
        x, y = batch
        _, loss, cache = self.model.forward(x, y, training=True, rng=rng)
        self.grads = self.model.backward(cache, trainable=self.trainable)
        self.loss = float(loss)
        return self

    def evaluate(self, batch) -> tuple[float, int]:
        """(sum of the loss over the batch's unmasked targets, how many there are): no dropout."""
        x, y = batch
        n = int((np.asarray(y) != -100).sum())
        if n == 0:
            return 0.0, 0
        return float(self.model.forward(x, y)[1]) * n, n
