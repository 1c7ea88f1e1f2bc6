"""Generation: continue token ids with a model, one token at a time, with a KV cache.

    from npgpt.generate import generate
    ids = generate(model, prompt_ids, 50, temperature=0.8, top_k=40, seed=1)   # (B, T) -> (B, T + 50)

The KV cache keeps every layer's keys and values of the positions seen so far, so each new token
costs one position instead of a whole forward pass. `forward_kv` runs the model's own block
(layers/block.py's block_forward) with its attention replaced by layers.attention.attention_step_kv,
which reads and extends the cache: the order of a block is written once. The command line is in
npgpt/cli/generate.py.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from . import layers as L
from .backend import to_numpy
from .sampling import sample_next


def new_kv_cache(model, batch_size: int, length: int | None = None) -> list:
    """Per-layer (k, v) buffers of shape (B, NH, length, hs) for incremental decoding."""
    cfg = model.config
    length = cfg.context_length if length is None else length
    shape = (batch_size, cfg.n_heads, length, cfg.head_size)
    return [(model.xp.zeros(shape, model.dtype), model.xp.zeros(shape, model.dtype)) for _ in range(cfg.n_layers)]


def forward_kv(model, idx, kv_cache, pos: int, last_only: bool = True):
    """Inference forward for positions pos .. pos+Tn-1, reading and extending `kv_cache`.

    idx: (B, Tn) new token ids. Returns logits (B, V) for the last position (last_only) or
    (B, Tn, V). No dropout, nothing kept for a backward.
    """
    cfg, p = model.config, model.params
    idx = model.check_idx(idx)
    Tn = idx.shape[1]
    if pos + Tn > cfg.context_length:
        raise ValueError(f"positions {pos}..{pos + Tn - 1} exceed context_length {cfg.context_length}")
    x = p["wte.weight"][idx] + p["wpe.weight"][pos : pos + Tn]  # (B, Tn, C)
    for i, (k_cache, v_cache) in enumerate(kv_cache):
        attend = lambda qkv, k=k_cache, v=v_cache: (L.attention_step_kv(qkv, cfg.n_heads, k, v, pos), None)  # noqa: E731
        x, _ = L.block_forward(x, model.block_params(i), cfg.n_heads, eps=cfg.ln_eps, attend=attend)  # (B, Tn, C)
    if last_only:
        x = x[:, -1:]  # (B, 1, C): only the next token's logits are needed
    x, _ = L.layernorm_forward(x, p["ln_f.weight"], p["ln_f.bias"], cfg.ln_eps)
    logits, _ = L.linear_forward(x, model.head_weight)  # (B, Tx, V)
    return logits[:, -1] if last_only else logits


def generate_stream(model, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                    top_p: float | None = None, seed: int | None = None, rng=None, eos_id: int | None = None,
                    use_kv_cache: bool = True) -> Iterator[np.ndarray]:  # fmt: skip
    """Yield the next token ids, (B,) NumPy int64, one step at a time.

    temperature 0 is greedy (argmax). top_k keeps the k most likely tokens, top_p the smallest set
    whose probability reaches p. Sampling happens on the host with a NumPy generator (`rng`, or
    one seeded with `seed`), so CPU and GPU runs with one seed draw alike. Stops early when every
    row has produced `eos_id`. Longer than context_length: the model sees the last context_length
    tokens (the KV cache is rebuilt for the shifted window, which gives the same tokens as recomputing).
    """
    idx = np.asarray(to_numpy(idx))
    if idx.ndim != 2 or idx.shape[1] < 1 or idx.dtype.kind not in "iu":
        raise ValueError(f"the prompt must be a (B, T) integer array with T >= 1, got shape {idx.shape} dtype {idx.dtype}")
    rng = np.random.default_rng(seed) if rng is None else rng
    ctx = model.config.context_length
    seq = idx.astype(np.int64)
    B = seq.shape[0]
    done = np.zeros(B, dtype=bool)
    kv, pos = None, 0
    for _ in range(max_new_tokens):
        if not use_kv_cache:
            window = seq[:, -ctx:]
            logits = model.forward(window)[0][:, -1]  # (B, V)
        elif kv is None or pos + 1 > ctx:
            window = seq[:, -ctx:]  # (re)fill the cache with the visible window
            kv = new_kv_cache(model, B)
            logits = forward_kv(model, model.xp.asarray(window), kv, 0)
            pos = window.shape[1]
        else:
            logits = forward_kv(model, model.xp.asarray(seq[:, -1:]), kv, pos)
            pos += 1
        nxt = sample_next(to_numpy(logits), rng, temperature=temperature, top_k=top_k, top_p=top_p)  # (B,)
        if eos_id is not None:
            nxt = np.where(done, eos_id, nxt)
            done |= nxt == eos_id
        seq = np.concatenate([seq, nxt[:, None]], axis=1)
        yield nxt
        if eos_id is not None and done.all():
            return


def generate(model, idx, max_new_tokens: int, **kwargs) -> np.ndarray:
    """(B, T) prompt ids -> (B, T + n) NumPy ids, n <= max_new_tokens. Options as generate_stream."""
    prompt = np.asarray(to_numpy(idx)).astype(np.int64)
    steps = list(generate_stream(model, prompt, max_new_tokens, **kwargs))
    if not steps:
        return prompt
    return np.concatenate([prompt, np.stack(steps, axis=1)], axis=1)
