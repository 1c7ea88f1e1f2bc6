"""The encoder-decoder Transformer (Vaswani et al. 2017): forward and backward by hand.

Glossary: B=batch, S=source positions, T=target positions, C=channels (d_model), V=target vocabulary,
E/D = encoder/decoder layers.

    x = dropout(embed(src) * sqrt(C) + pos(S))                    (B, S) -> (B, S, C)
    x = encoder_block_i(x) for i in 0..E-1                         masks padded source keys
    memory = encoder.norm(x)                                       (B, S, C)
    y = dropout(embed(tgt_in) * sqrt(C) + pos(T))                  (B, T) -> (B, T, C)
    y = decoder_block_j(y, memory) for j in 0..D-1                 causal; masks padded target and source keys
    y = decoder.norm(y)                                            (B, T, C)
    logits = y @ embed.T   (tied; else output.weight)              (B, T, C) -> (B, T, V)
    loss = cross_entropy(logits, targets), pad_id ignored          0-d

torch.nn.Transformer has the same two final LayerNorms (encoder.norm, decoder.norm) in both norm
placements, so this model has them too. Padding is wherever an id equals pad_id: masked out as a key
in every attention and ignored as a target, so it contributes nothing to any gradient.

The backward runs the list in reverse. Every decoder layer reads the same memory, so its gradient is
the sum over the decoder layers (fan-out adds) before it enters the encoder. With tie_embeddings="all"
the one table receives three gradients: the source lookup's, the target lookup's and the output's.
Derivation: docs/backprop.md#the-encoder-decoder-model.

Parameter names (weights in npgpt's (C_in, C_out) layout; block keys as in encoder_block.py and
decoder_block.py):
    embed.weight (V, C)                                   tie_embeddings="all"
    encoder.embed.weight, decoder.embed.weight (V., C)    "decoder" and "none";  output.weight (C, V) for "none"
    encoder.pos.weight, decoder.pos.weight (max_len, C)   pos_encoding="learned" only
    encoder.layers.{i}.<block key>, decoder.layers.{j}.<block key>
    encoder.norm.weight/bias, decoder.norm.weight/bias (C,)
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from .. import layers as L
from ..backend import DEFAULT_DTYPE, device_of, get_array_module, get_xp
from ..layers.decoder_block import DECODER_BLOCK_PARAM_NAMES
from ..layers.encoder_block import ENCODER_BLOCK_PARAM_NAMES
from .config import Seq2SeqConfig


class StreamCache(NamedTuple):
    """One embedded sequence: lookup, positions, dropout."""

    embed: L.EmbeddingCache
    pos: object  # SinusoidalCache or EmbeddingCache (learned)
    drop: L.DropoutCache


def embed_forward(model, ids, side: str, rng, drop: float, training: bool):
    """(B, T) ids -> x = dropout(table[ids] * sqrt(C) + positions): (B, T, C), and its StreamCache.
    side: "encoder" or "decoder" (whose table and, when learned, position table)."""
    cfg = model.config
    T = ids.shape[1]
    x, c_emb = L.embedding_forward(ids, model.embed_table(side))  # (B, T) -> (B, T, C)
    if cfg.scale_embeddings:
        x = x * x.dtype.type(math.sqrt(cfg.d_model))
    if cfg.pos_encoding == "sinusoidal":
        x, c_pos = L.sinusoidal_forward(x)  # + PE[0:T]
    else:
        pos, c_pos = L.embedding_forward(model.xp.arange(T), model.params[f"{side}.pos.weight"])  # (T, C)
        x = x + pos
    x, c_drop = L.dropout_forward(x, drop, rng, training)
    return x, StreamCache(c_emb, c_pos, c_drop)


def embed_backward(model, dx, cache: StreamCache, side: str, grads: dict) -> None:
    """The tables' gradients from dx (B, T, C), into grads: a learned position table's set, the token
    table's added (three lookups may share one table: tie_embeddings="all").

    Differentiates  `x = dropout(table[ids] * s + pos)`:  dropout's mask, then the sum passes dx to both
    terms (pos was broadcast over the batch, so its gradient sums over B), and the lookup's gradient
    adds dx * s into the rows it read."""
    cfg = model.config
    dx = L.dropout_backward(dx, cache.drop)
    if cfg.pos_encoding == "learned":
        grads[f"{side}.pos.weight"] = L.embedding_backward(dx.sum(axis=0), cache.pos)
    else:
        dx = L.sinusoidal_backward(dx, cache.pos)
    if cfg.scale_embeddings:
        dx = dx * dx.dtype.type(math.sqrt(cfg.d_model))
    key = "embed.weight" if cfg.tie_embeddings == "all" else f"{side}.embed.weight"
    d = L.embedding_backward(dx, cache.embed)
    grads[key] = d if key not in grads else grads[key] + d


class Seq2SeqCache(NamedTuple):
    src: StreamCache
    encoder: list  # [EncoderBlockCache] * E
    encoder_norm: L.LayerNormCache
    tgt: StreamCache
    decoder: list  # [DecoderBlockCache] * D
    decoder_norm: L.LayerNormCache
    head: L.LinearCache
    loss: L.CrossEntropyCache | None  # None when forward had no targets


def param_shapes(config: Seq2SeqConfig) -> dict[str, tuple]:
    """Every parameter's name and shape, in a fixed order."""
    C, F, Vs, Vt = config.d_model, config.d_ff, config.src_vocab_size, config.tgt_vocab_size
    shapes = {}
    if config.tie_embeddings == "all":
        shapes["embed.weight"] = (Vs, C)
    else:
        shapes["encoder.embed.weight"] = (Vs, C)
        shapes["decoder.embed.weight"] = (Vt, C)
    if config.pos_encoding == "learned":
        shapes["encoder.pos.weight"] = (config.max_len, C)
        shapes["decoder.pos.weight"] = (config.max_len, C)

    def block_shape(k):
        if k == "linear1.weight":
            return (C, F)
        if k == "linear1.bias":
            return (F,)
        if k == "linear2.weight":
            return (F, C)
        if k.endswith(".bias") or k.startswith("norm"):
            return (C,)
        return (C, C)  # an attention projection

    def block(prefix, names):
        shapes.update({f"{prefix}.{k}": block_shape(k) for k in names})

    for i in range(config.n_encoder_layers):
        block(f"encoder.layers.{i}", ENCODER_BLOCK_PARAM_NAMES)
    shapes["encoder.norm.weight"] = shapes["encoder.norm.bias"] = (C,)
    for j in range(config.n_decoder_layers):
        block(f"decoder.layers.{j}", DECODER_BLOCK_PARAM_NAMES)
    shapes["decoder.norm.weight"] = shapes["decoder.norm.bias"] = (C,)
    if config.tie_embeddings == "none":
        shapes["output.weight"] = (C, Vt)
    return shapes


def init_params(config: Seq2SeqConfig, seed: int = 0, xp=np, dtype=DEFAULT_DTYPE) -> dict:
    """torch.nn.Transformer's initialisation for the blocks: every matrix Xavier-uniform,
    U(-a, a) with a = sqrt(6 / (fan_in + fan_out)), biases 0, LayerNorm weights 1. Embedding tables
    ~ N(0, 1/C), so that embed * sqrt(C) has unit variance (and tied logits start near 0 spread 1).
    Drawn on the host with NumPy, so CPU and GPU models with one seed are equal."""
    rng = np.random.default_rng(seed)
    C = config.d_model
    params = {}
    for name, shape in param_shapes(config).items():
        if len(shape) == 1:
            value = np.ones(shape) if "norm" in name and name.endswith(".weight") else np.zeros(shape)
        elif name.endswith(("embed.weight", "pos.weight")):
            value = rng.standard_normal(shape) / math.sqrt(C)
        else:
            a = math.sqrt(6.0 / (shape[0] + shape[1]))
            value = rng.uniform(-a, a, size=shape)
        params[name] = xp.asarray(value.astype(dtype))
    return params


class Seq2Seq:
    """The encoder-decoder Transformer with hand-written forward and backward.

    model = Seq2Seq(Seq2SeqConfig(src_vocab_size=V, tgt_vocab_size=V), seed=0)
    logits, loss, cache = model.forward(src, tgt_in, targets, training=True)
    grads = model.backward(cache)       # same keys as model.params
    """

    def __init__(self, config: Seq2SeqConfig, seed: int = 0, device: str | None = None, dtype=DEFAULT_DTYPE, params=None):
        if not isinstance(config, Seq2SeqConfig):
            raise ValueError(f"Seq2Seq needs a Seq2SeqConfig, got {type(config).__name__}")
        dtype = np.dtype(dtype)
        if dtype not in (np.float32, np.float64):
            raise ValueError(f"Seq2Seq dtype must be float32 or float64, got {dtype}")
        self.config = config
        if params is None:
            params = init_params(config, seed, get_xp(device), dtype)
        elif device is not None:
            raise ValueError("pass either params (already on their device) or device, not both")
        self.params = params
        self.check_params(params)
        from ..model import make_rng

        self.rng = make_rng(seed + 1, self.xp)  # dropout masks when forward is given no rng

    # --- parameters ---------------------------------------------------------------------------------

    @property
    def xp(self):
        return get_array_module(next(iter(self.params.values())))

    @property
    def device(self) -> str:
        return device_of(next(iter(self.params.values())))

    @property
    def dtype(self):
        return next(iter(self.params.values())).dtype

    def num_params(self) -> int:
        return int(sum(v.size for v in self.params.values()))

    def flatten_params_(self):
        """Lay every parameter out in one contiguous buffer, in key order; `params` become views of it
        (same keys, shapes and values), so AdamW and gradient clipping can run over one buffer. The fast
        engine (seq2seq/engine.py) calls this; build the optimizer after it. Returns the buffer."""
        from ..backend import flat_base, views_into

        existing = flat_base(self.params)
        if existing is not None:
            return existing
        flat = self.xp.empty(self.num_params(), dtype=self.dtype)
        views = views_into(flat, self.params)
        for k, v in self.params.items():
            views[k][...] = v
        self.params = views
        return flat

    def check_params(self, params: dict) -> None:
        expected = param_shapes(self.config)
        problems = [f"missing {k} {s}" for k, s in expected.items() if k not in params]
        problems += [f"unexpected {k}" for k in params if k not in expected]
        problems += [f"{k} has shape {tuple(params[k].shape)}, expected {s}" for k, s in expected.items()
                     if k in params and tuple(params[k].shape) != s]  # fmt: skip
        if problems:
            raise ValueError("parameters do not match the config: " + "; ".join(problems[:8]))

    def block_params(self, side: str, i: int) -> dict:
        """Layer i of "encoder" or "decoder", keyed by the names inside the block."""
        prefix = f"{side}.layers.{i}."
        names = ENCODER_BLOCK_PARAM_NAMES if side == "encoder" else DECODER_BLOCK_PARAM_NAMES
        return {k: self.params[prefix + k] for k in names}

    def embed_table(self, side: str):
        return self.params["embed.weight"] if self.config.tie_embeddings == "all" else self.params[f"{side}.embed.weight"]

    @property
    def head_weight(self):
        """(C, V) output projection: the target embedding's transpose when tied (a view), else output.weight."""
        if self.config.tie_embeddings == "none":
            return self.params["output.weight"]
        return self.embed_table("decoder").T

    # --- input checks -------------------------------------------------------------------------------

    def check_ids(self, ids, what: str, vocab_size: int):
        xp = self.xp
        ids = xp.asarray(ids)
        if ids.ndim != 2 or ids.shape[1] < 1:
            raise ValueError(f"{what} must have shape (B, T) with T >= 1, got {tuple(ids.shape)}")
        if ids.dtype.kind not in "iu":
            raise ValueError(f"{what} must hold integer token ids, got dtype {ids.dtype}")
        if ids.shape[1] > self.config.max_len:
            raise ValueError(f"{what} has {ids.shape[1]} positions but the model's max_len is {self.config.max_len}; "
                             "shorten the sequence or train a model with a larger --max-len")  # fmt: skip
        if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
            raise ValueError(f"{what} ids must lie in [0, {vocab_size})")
        if bool((ids[:, 0] == self.config.pad_id).any()):
            raise ValueError(f"{what}: a sequence starts with padding (pad_id={self.config.pad_id}); "
                             "pad on the right, and give every sequence at least one token")  # fmt: skip
        return ids

    # --- forward / backward -------------------------------------------------------------------------

    def encode(self, src, training=False, rng=None):
        """src: (B, S) ids -> (memory (B, S, C), src padding mask (B, S) bool, caches for the backward)."""
        cfg = self.config
        src = self.check_ids(src, "src", cfg.src_vocab_size)
        src_mask = src == cfg.pad_id  # (B, S) True at padding
        drop = cfg.dropout if training else 0.0
        rng = self.rng if rng is None else rng
        x, c_src = embed_forward(self, src, "encoder", rng, drop, training)
        c_enc = []
        for i in range(cfg.n_encoder_layers):
            x, c = L.encoder_block_forward(x, self.block_params("encoder", i), cfg.n_heads, key_padding_mask=src_mask,
                                           norm_first=cfg.norm_first, activation=cfg.activation, eps=cfg.ln_eps,
                                           drop_rate=drop, rng=rng, training=training)  # fmt: skip
            c_enc.append(c)
        p = self.params
        memory, c_norm = L.layernorm_forward(x, p["encoder.norm.weight"], p["encoder.norm.bias"], cfg.ln_eps)
        return memory, src_mask, (c_src, c_enc, c_norm)

    def forward(self, src, tgt_in, targets=None, training=False, rng=None):
        """src: (B, S), tgt_in: (B, T) ids, targets: (B, T) ids or None ->
        (logits (B, T, V), loss (0-d) or None, cache).

        Padding is pad_id, on the right. tgt_in starts with bos_id; targets are tgt_in shifted left
        with eos_id at the end (pad_id where tgt_in is padding). training=True turns dropout on;
        `rng` draws its masks (default: the model's own generator).
        """
        cfg, p, xp = self.config, self.params, self.xp
        src = self.check_ids(src, "src", cfg.src_vocab_size)
        tgt_in = self.check_ids(tgt_in, "tgt_in", cfg.tgt_vocab_size)
        if src.shape[0] != tgt_in.shape[0]:
            raise ValueError(f"src has {src.shape[0]} rows but tgt_in {tgt_in.shape[0]}; give one target per source")
        rng = self.rng if rng is None else rng
        drop = cfg.dropout if training else 0.0
        memory, src_mask, (c_src, c_enc, c_enc_norm) = self.encode(src, training, rng)
        tgt_mask = tgt_in == cfg.pad_id  # (B, T)
        y, c_tgt = embed_forward(self, tgt_in, "decoder", rng, drop, training)
        c_dec = []
        for j in range(cfg.n_decoder_layers):
            y, c = L.decoder_block_forward(y, memory, self.block_params("decoder", j), cfg.n_heads,
                                           tgt_padding_mask=tgt_mask, memory_padding_mask=src_mask,
                                           norm_first=cfg.norm_first, activation=cfg.activation, eps=cfg.ln_eps,
                                           drop_rate=drop, rng=rng, training=training)  # fmt: skip
            c_dec.append(c)
        y, c_dec_norm = L.layernorm_forward(y, p["decoder.norm.weight"], p["decoder.norm.bias"], cfg.ln_eps)
        logits, c_head = L.linear_forward(y, self.head_weight)  # (B, T, C) -> (B, T, V)
        loss, c_loss = None, None
        if targets is not None:
            targets = xp.asarray(targets)
            if targets.shape != tgt_in.shape:
                raise ValueError(f"targets have shape {tuple(targets.shape)} but tgt_in {tuple(tgt_in.shape)}; they must match")
            loss, c_loss = L.softmax_cross_entropy_forward(logits, targets, ignore_index=cfg.pad_id)
        cache = Seq2SeqCache(c_src, c_enc, c_enc_norm, c_tgt, c_dec, c_dec_norm, c_head, c_loss)
        return logits, loss, cache

    def backward(self, cache: Seq2SeqCache, dloss=1.0, dlogits=None) -> dict:
        """Gradients of every parameter, keyed like self.params.

        dloss: upstream gradient of the loss (scale it for accumulation). dlogits: (B, T, V) upstream
        gradient of the logits, for a loss of your own (added to the loss's when both are given).
        """
        cfg = self.config
        d = None
        if cache.loss is not None and dloss is not None:
            d = L.softmax_cross_entropy_backward(dloss, cache.loss)  # (B, T, V)
        if dlogits is not None:
            d = dlogits if d is None else d + dlogits
        if d is None:
            raise ValueError("backward has nothing to differentiate: the forward had no targets, so pass dlogits")
        grads = {}
        dy, dhead, _ = L.linear_backward(d, cache.head)  # (B, T, V) -> (B, T, C); dhead (C, V)
        dy, grads["decoder.norm.weight"], grads["decoder.norm.bias"] = L.layernorm_backward(dy, cache.decoder_norm)
        dmemory = None
        for j in reversed(range(cfg.n_decoder_layers)):
            dy, dmem, g = L.decoder_block_backward(dy, cache.decoder[j])
            grads.update({f"decoder.layers.{j}.{k}": v for k, v in g.items()})
            dmemory = dmem if dmemory is None else dmemory + dmem  # every decoder layer read the same memory
        embed_backward(self, dy, cache.tgt, "decoder", grads)
        dx, grads["encoder.norm.weight"], grads["encoder.norm.bias"] = L.layernorm_backward(dmemory, cache.encoder_norm)
        for i in reversed(range(cfg.n_encoder_layers)):
            dx, g = L.encoder_block_backward(dx, cache.encoder[i])
            grads.update({f"encoder.layers.{i}.{k}": v for k, v in g.items()})
        embed_backward(self, dx, cache.src, "encoder", grads)
        if cfg.tie_embeddings == "none":
            grads["output.weight"] = dhead
        else:
            key = "embed.weight" if cfg.tie_embeddings == "all" else "decoder.embed.weight"
            grads[key] = grads[key] + dhead.T  # the output projection's share of the tied table
        return {k: grads[k] for k in self.params}

    # --- inference with caches ----------------------------------------------------------------------

    def start_decoding(self, src, max_steps: int):
        """Encode once and set up the caches for decode_step.

        Returns a dict: memory (B, S, C), src_mask (B, S), the cross-attention keys and values of every
        decoder layer (computed once here), and empty self-attention KV caches (B, max_steps, C).
        """
        cfg = self.config
        src = self.check_ids(src, "src", cfg.src_vocab_size)
        if max_steps > cfg.max_len:
            raise ValueError(f"cannot decode {max_steps} steps: the model's max_len is {cfg.max_len}")
        memory, src_mask, _ = self.encode(src)
        B, C = src.shape[0], cfg.d_model
        xp, dtype = self.xp, self.dtype
        return {
            "src_mask": src_mask,
            "cross_kv": [L.cross_attention_kv(memory, self.block_params("decoder", j)) for j in range(cfg.n_decoder_layers)],
            "self_kv": [(xp.zeros((B, max_steps, C), dtype), xp.zeros((B, max_steps, C), dtype)) for _ in range(cfg.n_decoder_layers)],
        }  # fmt: skip

    def decode_step(self, state: dict, tokens, pos: int):
        """tokens: (B,) ids at position pos -> logits (B, V) for position pos + 1's token.

        Extends state's self-attention caches by one position; equal to forward's logits at pos."""
        cfg, p, xp = self.config, self.params, self.xp
        ids = xp.asarray(tokens).reshape(-1, 1)  # (B, 1)
        x, _ = L.embedding_forward(ids, self.embed_table("decoder"))  # (B, 1, C)
        if cfg.scale_embeddings:
            x = x * x.dtype.type(math.sqrt(cfg.d_model))
        if cfg.pos_encoding == "sinusoidal":
            x, _ = L.sinusoidal_forward(x, start=pos)
        else:
            x = x + p["decoder.pos.weight"][pos]
        for j in range(cfg.n_decoder_layers):
            x = L.decoder_block_step(x, self.block_params("decoder", j), cfg.n_heads, state["self_kv"][j], pos,
                                     state["cross_kv"][j], memory_padding_mask=state["src_mask"],
                                     norm_first=cfg.norm_first, activation=cfg.activation, eps=cfg.ln_eps)  # fmt: skip
        x, _ = L.layernorm_forward(x, p["decoder.norm.weight"], p["decoder.norm.bias"], cfg.ln_eps)
        logits, _ = L.linear_forward(x[:, 0], self.head_weight)  # (B, C) -> (B, V)
        return logits

    @staticmethod
    def reorder_state(state: dict, rows) -> dict:
        """Keep (and repeat) rows of every cache: beam search follows the surviving hypotheses."""
        return {
            "src_mask": state["src_mask"][rows],
            "cross_kv": [(k[rows], v[rows]) for k, v in state["cross_kv"]],
            "self_kv": [(k[rows], v[rows]) for k, v in state["self_kv"]],
        }
