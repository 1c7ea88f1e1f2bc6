"""Whole-model gradient checks of fine-tuning, float64 finite differences (run by `npgpt gradcheck`).

- a classifier (trunk + score head) on right-padded batches, with the LM loss mixed in (lambda > 0:
  the trunk's gradient is the sum of both heads') and without, with and without dropout;
- the language model on masked targets (prompt and padding at -100), the instruction-tuning loss.
Parameters are drawn larger than GPT-2's initialisation (model_check.random_params) so every path
carries a visible gradient.
"""

from __future__ import annotations

import numpy as np

from ..gradcheck import Check, HostRandom
from ..model import GPT
from ..model_check import random_params, tiny_config
from .classifier import SCORE, Classifier

PAD = 36  # the last id of tiny_config's V=37 vocabulary plays <|endoftext|>


def padded_batch(rng, B: int, T: int, V: int, pad: int = PAD) -> np.ndarray:
    """(B, T) ids without `pad`, each row right-padded after a random length in [1, T] (row 0 full)."""
    ids = rng.integers(0, V - 1, size=(B, T))
    ids[ids >= pad] += 1
    for b, n in enumerate([T] + list(rng.integers(1, T + 1, size=B - 1))):
        ids[b, n:] = pad
    return ids


def classifier_check(label: str, config, k: int = 3, B: int = 3, T: int = 6, lm_weight: float = 0.5,
                     training: bool = False, trainable=None) -> Check:  # fmt: skip
    """Every parameter gradient of a Classifier's loss L_FT + lm_weight * L_PT; with `trainable`, only
    those parameters are inputs (the frozen ones are held fixed) and only their gradients are asked for."""
    clf = Classifier.new(GPT(config, dtype=np.float64, device="cpu"), [f"c{i}" for i in range(k)], pad_token_id=PAD)
    frozen = {}

    def make_inputs(rng):
        params = random_params(config, rng)
        params[SCORE] = 0.5 * rng.standard_normal((k, config.emb_dim))
        frozen.clear()
        if trainable is not None:
            frozen.update({n: v for n, v in params.items() if n not in trainable})
            params = {n: v for n, v in params.items() if n in trainable}
        return [params, padded_batch(rng, B, T, config.vocab_size), rng.integers(0, k, size=B)]

    def forward(params, idx, labels, xp=np):
        dtype = next(iter(params.values())).dtype  # the frozen weights on the same device, in the same dtype
        allp = {**params, **{n: xp.asarray(v, dtype=dtype) for n, v in frozen.items()}}
        clf.model.params = {n: allp[n] for n in clf.model.params}
        clf.score = allp[SCORE]
        rng = HostRandom(99, xp)  # the same dropout masks on every call
        _, loss, cache = clf.forward(idx, labels, lm_weight=lm_weight, training=training, rng=rng)
        return loss, cache

    def backward(dout, cache):
        return clf.backward(cache, trainable=trainable, dloss=dout)

    return Check(label, forward, backward, make_inputs, tol=1e-6, max_coords=8, names=["params", "idx", "labels"])


def masked_lm_check(label: str, config, B: int = 3, T: int = 7) -> Check:
    """The LM loss with the prompt and the padding masked (-100), as instruction tuning computes it."""
    model = GPT(config, dtype=np.float64, device="cpu")

    def make_inputs(rng):
        idx = padded_batch(rng, B, T, config.vocab_size)
        targets = np.concatenate([idx[:, 1:], np.full((B, 1), PAD)], axis=1)
        for b in range(B):
            n_prompt = int(rng.integers(1, T))  # targets before the response are masked
            targets[b, : n_prompt - 1] = -100
        targets[targets == PAD] = -100  # padding; the row's end token stays a target in row 0 of a real batch
        targets[0, -1] = int(rng.integers(0, config.vocab_size))  # keep one target in every batch
        return [random_params(config, rng), idx, targets]

    def forward(params, idx, targets, xp=np):
        model.params = params
        _, loss, cache = model.forward(idx, targets)
        return loss, cache

    return Check(label, forward, lambda d, c: model.backward(c, dloss=d), make_inputs, tol=1e-6, max_coords=8,
                 names=["params", "idx", "targets"])  # fmt: skip


def finetune_model_checks() -> list[Check]:
    last = tiny_config(n_layers=2)
    last_block = [SCORE, "ln_f.weight", "ln_f.bias"] + [f"h.1.{k}" for k in GPT(last, dtype=np.float64).block_params(1)]
    return [
        classifier_check("classifier tied lambda 0.5", tiny_config()),
        classifier_check("classifier untied lambda 0", tiny_config(tie_weights=False, qkv_bias=False), lm_weight=0.0, T=8),
        classifier_check("classifier dropout 0.2 lambda 1", tiny_config(drop_rate=0.2), lm_weight=1.0, training=True),
        classifier_check("classifier last block trainable", last, trainable=last_block),
        masked_lm_check("masked LM tied", tiny_config()),
        masked_lm_check("masked LM untied", tiny_config(tie_weights=False), T=8),
    ]
