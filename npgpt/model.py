"""The GPT-2 model: parameters in a dict with Hugging Face's names, forward and backward by hand.

Glossary: B=batch, T=time, C=channels (emb_dim), NH=heads, V=vocab, L=n_layers.

    x = dropout(wte[idx] + wpe[0..T-1])            (B, T) -> (B, T, C)
    x = block_i(x) for i in 0..L-1                 (B, T, C)
    x = ln_f(x)                                    (B, T, C)
    logits = x @ wte.T   (tied; else lm_head)      (B, T, C) -> (B, T, V)
    loss = cross_entropy(logits, targets)          0-d

The backward runs the same list in reverse; with tied weights the token table receives the sum of
its two gradients (the embedding lookup's and the output head's). Derivation: docs/backprop.md#the-whole-model.
"""

from __future__ import annotations

import math
from typing import Iterator, NamedTuple

import numpy as np

from . import layers as L
from .backend import DEFAULT_DTYPE, device_of, get_array_module, get_xp
from .config import GPTConfig
from .layers.block import BLOCK_PARAM_NAMES


class GPTCache(NamedTuple):
    tok: L.EmbeddingCache
    pos: L.EmbeddingCache
    drop: L.DropoutCache
    blocks: list  # [BlockCache] * n_layers
    ln_f: L.LayerNormCache
    head: L.LinearCache | None  # None when forward ran with lm_head=False
    loss: L.CrossEntropyCache | None  # None when forward had no targets
    hidden: object = None  # (B, T, C) ln_f's output: what the LM head reads, and any head of your own


def param_shapes(config: GPTConfig) -> dict[str, tuple]:
    """Every parameter's name and shape, in Hugging Face GPT-2 names and layouts, in a fixed order."""
    V, T, C = config.vocab_size, config.context_length, config.emb_dim
    shapes = {"wte.weight": (V, C), "wpe.weight": (T, C)}
    for i in range(config.n_layers):
        block = {
            "ln_1.weight": (C,), "ln_1.bias": (C,),
            "attn.c_attn.weight": (C, 3 * C), "attn.c_attn.bias": (3 * C,),
            "attn.c_proj.weight": (C, C), "attn.c_proj.bias": (C,),
            "ln_2.weight": (C,), "ln_2.bias": (C,),
            "mlp.c_fc.weight": (C, 4 * C), "mlp.c_fc.bias": (4 * C,),
            "mlp.c_proj.weight": (4 * C, C), "mlp.c_proj.bias": (C,),
        }  # fmt: skip
        if not config.qkv_bias:
            del block["attn.c_attn.bias"]
        assert set(block) <= set(BLOCK_PARAM_NAMES)
        shapes.update({f"h.{i}.{k}": s for k, s in block.items()})
    shapes["ln_f.weight"] = (C,)
    shapes["ln_f.bias"] = (C,)
    if not config.tie_weights:
        shapes["lm_head.weight"] = (V, C)  # nn.Linear layout, as in HF's GPT2LMHeadModel
    return shapes


INITS = ("gpt2", "pytorch")


def init_params(config: GPTConfig, seed: int = 0, xp=np, dtype=DEFAULT_DTYPE, init: str = "gpt2") -> dict:
    """Fresh parameters, drawn on the host with NumPy (so CPU and GPU models with one seed are equal).

    init="gpt2", GPT-2's initialisation: weights ~ N(0, 0.02), the two residual output projections of
    each block ~ N(0, 0.02 / sqrt(2 L)) (so the residual stream's variance does not grow with depth),
    biases 0, LayerNorm weights 1.

    init="pytorch", what PyTorch's layers do by default, as in the GPTModel of "Build a Large Language
    Model (From Scratch)" (which keeps them): nn.Embedding tables (wte, wpe) ~ N(0, 1); every nn.Linear
    weight and bias ~ U(-1/sqrt(fan_in), +1/sqrt(fan_in)), fan_in being the layer's input width (C for
    c_attn, attn.c_proj, c_fc and the untied lm_head; 4C for mlp.c_proj), since kaiming_uniform_ with
    a = sqrt(5) gives bound sqrt(6 / ((1 + a^2) fan_in)) = 1/sqrt(fan_in); LayerNorm weights 1, biases 0.
    A tied head is the N(0, 1) token table itself."""
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; choose one of {', '.join(INITS)}")
    rng = np.random.default_rng(seed)
    resid_std = 0.02 / math.sqrt(2 * max(config.n_layers, 1))
    params = {}
    for name, shape in param_shapes(config).items():
        if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            value = np.ones(shape, dtype=dtype)
        elif name.endswith(("ln_1.bias", "ln_2.bias", "ln_f.bias")):
            value = np.zeros(shape, dtype=dtype)
        elif init == "pytorch":
            if name in ("wte.weight", "wpe.weight"):
                value = rng.standard_normal(shape, dtype=np.float32)
            else:  # HF layout: (C_in, C_out) weights, lm_head (V, C) as nn.Linear stores it
                fan_in = shape[1] if name == "lm_head.weight" else _linear_fan_in(name, config.emb_dim)
                bound = np.float32(1.0 / math.sqrt(fan_in))
                value = rng.uniform(-bound, bound, size=shape).astype(np.float32)
            value = value.astype(dtype)
        elif name.endswith(".bias"):
            value = np.zeros(shape, dtype=dtype)
        else:
            std = resid_std if name.endswith(("attn.c_proj.weight", "mlp.c_proj.weight")) else 0.02
            value = (rng.standard_normal(shape, dtype=np.float32) * np.float32(std)).astype(dtype)
        params[name] = xp.asarray(value)
    return params


def _linear_fan_in(name: str, C: int) -> int:
    """Input width of the linear layer a block parameter belongs to (its weight's and its bias's)."""
    return 4 * C if ".mlp.c_proj." in name else C


def make_rng(seed, xp):
    """A random generator on the device of `xp` (for dropout masks)."""
    return np.random.default_rng(seed) if xp is np else xp.random.default_rng(seed)


class GPT:
    """GPT-2 with hand-written forward and backward.

    model = GPT(GPTConfig.from_preset("nano"), seed=0, device="cpu", dtype=np.float32)  # init="gpt2" or "pytorch"
    logits, loss, cache = model.forward(idx, targets, training=True)
    grads = model.backward(cache)       # same keys as model.params
    """

    def __init__(self, config: GPTConfig, seed: int = 0, device: str | None = None, dtype=DEFAULT_DTYPE, params=None,
                 init: str = "gpt2"):  # fmt: skip
        if not isinstance(config, GPTConfig):
            raise ValueError(f"GPT needs a GPTConfig, got {type(config).__name__}; use GPTConfig(**your_dict)")
        dtype = np.dtype(dtype)
        if dtype not in (np.float32, np.float64):
            raise ValueError(f"GPT dtype must be float32 or float64, got {dtype}")
        self.config = config
        if params is None:
            params = init_params(config, seed, get_xp(device), dtype, init=init)
        elif device is not None:
            raise ValueError("pass either params (already on their device) or device, not both")
        xp = get_array_module(params.get("wte.weight"))
        self.params = params
        self.check_params(self.params)
        self.rng = make_rng(seed + 1, xp)  # dropout masks when forward is given no rng
        self._block_keys = [[k for k in BLOCK_PARAM_NAMES if f"h.{i}.{k}" in self.params] for i in range(config.n_layers)]

    # --- parameters -----------------------------------------------------------------------------

    @property
    def xp(self):
        """numpy or cupy: the module that owns the parameters."""
        return get_array_module(self.params["wte.weight"])

    @property
    def device(self) -> str:
        return device_of(self.params["wte.weight"])

    @property
    def dtype(self):
        return self.params["wte.weight"].dtype

    def check_params(self, params: dict) -> None:
        """ValueError naming every missing, unexpected or mis-shaped tensor."""
        expected = param_shapes(self.config)
        problems = [f"missing {k} {s}" for k, s in expected.items() if k not in params]
        problems += [f"unexpected {k} {tuple(params[k].shape)}" for k in params if k not in expected]
        problems += [
            f"{k} has shape {tuple(params[k].shape)}, expected {s}"
            for k, s in expected.items()
            if k in params and tuple(params[k].shape) != s
        ]
        if problems:
            raise ValueError("parameters do not match the config: " + "; ".join(problems))

    def block_params(self, i: int) -> dict:
        """Block i's parameters keyed by their names inside the block ('ln_1.weight', ...)."""
        return {k: self.params[f"h.{i}.{k}"] for k in self._block_keys[i]}

    @property
    def head_weight(self):
        """(C, V) output projection: wte.T when tied (a view, no copy), else lm_head.weight.T."""
        return (self.params["wte.weight"] if self.config.tie_weights else self.params["lm_head.weight"]).T

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameters stored (a tied head is counted once). exclude_embeddings drops wte and wpe."""
        skip = ("wte.weight", "wpe.weight") if exclude_embeddings else ()
        return int(sum(v.size for k, v in self.params.items() if k not in skip))

    def flatten_params_(self):
        """Lay every parameter out in one contiguous buffer, in key order; `params` become views of it
        (same keys, shapes and values). Whole-model updates (AdamW, gradient clipping) can then run over
        one buffer, one kernel launch on a GPU. Build optimizers after calling this. Returns the buffer."""
        from .backend import flat_base, views_into

        existing = flat_base(self.params)
        if existing is not None:
            return existing
        flat = self.xp.empty(sum(int(v.size) for v in self.params.values()), dtype=self.dtype)
        views = views_into(flat, self.params)
        for k, v in self.params.items():
            views[k][...] = v
        self.params = views
        return flat

    def nbytes(self) -> int:
        return int(sum(v.nbytes for v in self.params.values()))

    def save_pretrained(self, directory) -> None:
        """model.safetensors + config.json in the Hugging Face GPT-2 layout (transformers' GPT2LMHeadModel
        .from_pretrained reads it), each written atomically. (Training checkpoints add a manifest of
        sha256 sums; an exported directory has none, so its config.json can be edited freely.)"""
        from .checkpoint import save_model

        save_model(directory, self)

    # --- training forward / backward ------------------------------------------------------------

    def check_idx(self, idx, what="idx"):
        xp = self.xp
        idx = xp.asarray(idx)
        if idx.ndim != 2:
            raise ValueError(f"{what} must have shape (B, T), got {tuple(idx.shape)}; add a batch axis with idx[None]")
        if idx.dtype.kind not in "iu":
            raise ValueError(f"{what} must hold integer token ids, got dtype {idx.dtype}")
        if idx.shape[1] > self.config.context_length:
            raise ValueError(
                f"{what} has T={idx.shape[1]} positions but the model's context_length is "
                f"{self.config.context_length}; crop the input to its last {self.config.context_length} tokens"
            )
        if idx.shape[1] < 1:
            raise ValueError(f"{what} is empty (T=0); give at least one token")
        return idx

    def forward(self, idx, targets=None, training=False, rng=None, lm_head=True):
        """idx: (B, T) token ids; targets: (B, T) ids or None -> (logits (B, T, V), loss (0-d) or None, cache).

        training=True turns dropout on (drop_rate of the config); `rng` draws the masks (default:
        the model's own generator, seeded from the model's seed, so a run is reproducible).
        Targets equal to -100 are left out of the loss (the mean is over the other positions).
        lm_head=False stops after the final LayerNorm (logits and loss None): for heads of your own,
        which read cache.hidden (B, T, C) and pass its gradient to backward as dhidden.
        """
        cfg, p = self.config, self.params
        idx = self.check_idx(idx)
        B, T = idx.shape
        rng = self.rng if rng is None else rng
        drop = cfg.drop_rate if training else 0.0
        tok, c_tok = L.embedding_forward(idx, p["wte.weight"])  # (B, T) -> (B, T, C)
        pos, c_pos = L.embedding_forward(self.xp.arange(T), p["wpe.weight"])  # (T,) -> (T, C)
        x = tok + pos  # (B, T, C) + (T, C)
        x, c_drop = L.dropout_forward(x, drop, rng, training)
        c_blocks = []
        for i in range(cfg.n_layers):
            x, c = L.block_forward(x, self.block_params(i), cfg.n_heads, eps=cfg.ln_eps, drop_rate=drop, rng=rng, training=training)
            c_blocks.append(c)
        x, c_ln_f = L.layernorm_forward(x, p["ln_f.weight"], p["ln_f.bias"], cfg.ln_eps)
        if not lm_head:
            if targets is not None:
                raise ValueError("targets need the LM head's logits; pass lm_head=True or no targets")
            return None, None, GPTCache(c_tok, c_pos, c_drop, c_blocks, c_ln_f, None, None, x)
        logits, c_head = L.linear_forward(x, self.head_weight)  # (B, T, C) -> (B, T, V)
        loss, c_loss = None, None
        if targets is not None:
            targets = self.xp.asarray(targets)
            loss, c_loss = L.softmax_cross_entropy_forward(logits, targets)
        return logits, loss, GPTCache(c_tok, c_pos, c_drop, c_blocks, c_ln_f, c_head, c_loss, x)

    def backward(self, cache: GPTCache, dloss=1.0, dlogits=None, dhidden=None, trainable=None) -> dict:
        """Gradients of every parameter, keyed like self.params.

        dloss: upstream gradient of the loss (scale it for gradient accumulation or loss scaling).
        dlogits: (B, T, V) upstream gradient of the logits, for losses of your own (added to the
        loss's gradient when the forward also had targets).
        dhidden: (B, T, C) upstream gradient of cache.hidden from a head of your own (a classifier),
        added to what the LM head sends back: the trunk gets the sum of both heads' gradients.
        trainable: names of the parameters that need gradients (default: all); only those are returned.
        Frozen weights get no weight-gradient GEMM, and the backward stops below the lowest trainable
        layer (see backward_plan).
        """
        cfg = self.config
        need, lowest = self.backward_plan(trainable)
        d = None
        if cache.loss is not None and dloss is not None:
            d = L.softmax_cross_entropy_backward(dloss, cache.loss)  # (B, T, V)
        if dlogits is not None:
            d = dlogits if d is None else d + dlogits
        if d is None and dhidden is None:
            raise ValueError("backward has nothing to differentiate: the forward had no targets, so pass dlogits or dhidden")
        if d is not None and cache.head is None:
            raise ValueError("the forward ran with lm_head=False, so there are no logits to differentiate; pass dhidden only")
        grads = {}
        head_name = "wte.weight" if cfg.tie_weights else "lm_head.weight"
        dx, dhead = dhidden, None
        if d is not None:
            dx_head, dhead, _ = L.linear_backward(d, cache.head, weight_grad=head_name in need)  # (B, T, V) -> (B, T, C); dhead (C, V)
            dx = dx_head if dx is None else dx + dx_head
        if lowest <= cfg.n_layers:  # something at or below ln_f is trainable
            dx, grads["ln_f.weight"], grads["ln_f.bias"] = L.layernorm_backward(dx, cache.ln_f)
        for i in reversed(range(max(lowest, 0), cfg.n_layers)):
            frozen = not any(f"h.{i}.{k}" in need for k in self._block_keys[i])
            dx, g = L.block_backward(dx, cache.blocks[i], weight_grads=not frozen)
            grads.update({f"h.{i}.{k}": v for k, v in g.items()})
        if lowest < 0:  # the embeddings are trainable
            dx = L.dropout_backward(dx, cache.drop)
            # x = tok + pos: both get dx; pos (T, C) was broadcast over the batch, so its gradient sums over B.
            if "wte.weight" in need:
                grads["wte.weight"] = L.embedding_backward(dx, cache.tok)  # (V, C)
            if "wpe.weight" in need:
                grads["wpe.weight"] = L.embedding_backward(dx.sum(axis=0), cache.pos)  # (T, C) -> (context_length, C)
        if dhead is not None:
            if cfg.tie_weights:
                grads["wte.weight"] += dhead.T  # the output head's share of the tied table
            else:
                grads["lm_head.weight"] = self.xp.ascontiguousarray(dhead.T)
        # a parameter no loss reached (the LM head when only dhidden came in) has a zero gradient
        return {k: grads[k] if k in grads else self.xp.zeros_like(v) for k, v in self.params.items() if k in need}

    def backward_plan(self, trainable) -> tuple[set, int]:
        """(names needing gradients, lowest layer that needs a backward): -1 the embeddings, i block i,
        n_layers ln_f, n_layers + 1 nothing below the LM head. A tied head is the embedding table.
        (The fast engine plans its backward with this too.)"""
        if trainable is None:
            return set(self.params), -1
        need = set(trainable)
        unknown = sorted(need - set(self.params))
        if unknown:
            raise ValueError(f"trainable names {unknown[:5]} are not parameters of this model; use names like 'h.0.ln_1.weight'")
        L_ = self.config.n_layers
        if need & {"wte.weight", "wpe.weight"}:
            return need, -1
        blocks = [i for i in range(L_) if any(f"h.{i}.{k}" in need for k in self._block_keys[i])]
        if blocks:
            return need, min(blocks)
        return need, L_ if need & {"ln_f.weight", "ln_f.bias"} else L_ + 1

    def loss_and_grads(self, idx, targets, training=True, rng=None, dloss=1.0):
        """forward + backward in one call -> (loss as a float, grads)."""
        _, loss, cache = self.forward(idx, targets, training=training, rng=rng)
        return float(loss), self.backward(cache, dloss=dloss)

    # --- generation (npgpt/generate.py) ---------------------------------------------------------

    def generate_stream(self, idx, max_new_tokens: int, **kwargs) -> Iterator[np.ndarray]:
        """npgpt.generate.generate_stream(self, ...): the next token ids, (B,) NumPy int64, step by step."""
        from .generate import generate_stream

        return generate_stream(self, idx, max_new_tokens, **kwargs)

    def generate(self, idx, max_new_tokens: int, **kwargs) -> np.ndarray:
        """npgpt.generate.generate(self, ...): (B, T) prompt ids -> (B, T + n) NumPy ids, n <= max_new_tokens."""
        from .generate import generate

        return generate(self, idx, max_new_tokens, **kwargs)
