"""Choosing the next token from logits: greedy, temperature, top-k and top-p (nucleus) sampling.

Everything here works on NumPy arrays on the host: logits (B, V) -> token ids (B,).
"""

from __future__ import annotations

import numpy as np


def check_sampling_args(temperature, top_k, top_p, prefix: str = "") -> None:
    """ValueError for settings that cannot sample. prefix: "--" names them as flags (--top-k), "--sample-"
    as `npgpt train`'s (--sample-top-k); "" as the arguments of this module."""

    def name(arg):
        return prefix + arg.replace("_", "-") if prefix else arg

    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not np.isfinite(temperature) or temperature < 0:
        raise ValueError(f"{name('temperature')} must be a finite number >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, float, np.integer))
                              or not np.isfinite(top_k) or int(top_k) != top_k or top_k < 1):  # fmt: skip
        raise ValueError(f"{name('top_k')} must be a whole number of at least 1 (or left out: no limit), got {top_k}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0):
        raise ValueError(f"{name('top_p')} must be in (0, 1] (or left out: no limit), got {top_p}")


def next_token_probs(logits, temperature=1.0, top_k=None, top_p=None):
    """(B, V) logits -> (B, V) float64 probabilities after temperature, top-k and top-p filtering."""
    check_sampling_args(temperature, top_k, top_p)
    z = np.asarray(logits, dtype=np.float64) / max(temperature, 1e-8)  # (B, V)
    if top_k is not None and top_k < z.shape[-1]:
        kth = np.partition(z, -int(top_k), axis=-1)[:, -int(top_k)][:, None]  # (B, 1) k-th largest
        z = np.where(z < kth, -np.inf, z)
    z = z - z.max(axis=-1, keepdims=True)
    probs = np.exp(z)
    probs /= probs.sum(axis=-1, keepdims=True)
    if top_p is not None and top_p < 1.0:
        order = np.argsort(-probs, axis=-1, kind="stable")  # (B, V) most likely first
        sorted_p = np.take_along_axis(probs, order, axis=-1)
        before = np.cumsum(sorted_p, axis=-1) - sorted_p  # mass of the tokens ranked above each one
        keep_sorted = before < top_p  # the first token is always kept
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, axis=-1)
        probs = np.where(keep, probs, 0.0)
        probs /= probs.sum(axis=-1, keepdims=True)
    return probs


def sample_next(logits, rng: np.random.Generator, temperature=1.0, top_k=None, top_p=None) -> np.ndarray:
    """(B, V) logits -> (B,) int64 ids. temperature == 0 picks the argmax (greedy) and draws nothing."""
    check_sampling_args(temperature, top_k, top_p)
    logits = np.asarray(logits)
    if temperature == 0:
        return np.argmax(logits, axis=-1).astype(np.int64)
    probs = next_token_probs(logits, temperature, top_k, top_p)
    u = rng.random(probs.shape[0])  # one uniform per row
    cdf = np.cumsum(probs, axis=-1)
    ids = (cdf < (u * cdf[:, -1])[:, None]).sum(axis=-1)  # inverse-CDF sampling
    return np.minimum(ids, probs.shape[-1] - 1).astype(np.int64)
