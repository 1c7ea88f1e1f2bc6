"""Model configuration: a dataclass with the lecture's keys, presets, and the Hugging Face mapping.

    GPT_CONFIG_124M = {"vocab_size": 50257, "context_length": 1024, "emb_dim": 768, "n_heads": 12,
                       "n_layers": 12, "drop_rate": 0.1, "qkv_bias": False}
    cfg = GPTConfig(**GPT_CONFIG_124M)          # the lecture's dict works as it is
    cfg = GPTConfig.from_preset("gpt2")         # the real GPT-2 124M (qkv_bias=True, like the checkpoints)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

GPT2_VOCAB_SIZE = 50257  # 50,256 BPE merges' tokens + <|endoftext|>

PRESETS: dict[str, dict] = {
    # The four released GPT-2 sizes, shaped exactly like the Hugging Face checkpoints.
    "gpt2": dict(emb_dim=768, n_heads=12, n_layers=12, context_length=1024, qkv_bias=True, drop_rate=0.1),
    "gpt2-medium": dict(emb_dim=1024, n_heads=16, n_layers=24, context_length=1024, qkv_bias=True, drop_rate=0.1),
    "gpt2-large": dict(emb_dim=1280, n_heads=20, n_layers=36, context_length=1024, qkv_bias=True, drop_rate=0.1),
    "gpt2-xl": dict(emb_dim=1600, n_heads=25, n_layers=48, context_length=1024, qkv_bias=True, drop_rate=0.1),
    # Small models for learning on a laptop CPU (GPT-2's tokenizer, so the vocabulary stays 50,257). Like the
    # lecture's GPTModel they have their own output head (untied), which also learns faster at this size.
    "nano": dict(emb_dim=128, n_heads=4, n_layers=4, context_length=64, qkv_bias=False, drop_rate=0.1, tie_weights=False),
    "micro": dict(emb_dim=256, n_heads=8, n_layers=6, context_length=256, qkv_bias=False, drop_rate=0.1, tie_weights=False),
    "mini": dict(emb_dim=384, n_heads=6, n_layers=6, context_length=256, qkv_bias=False, drop_rate=0.1, tie_weights=False),
}  # fmt: skip


@dataclass
class GPTConfig:
    vocab_size: int = GPT2_VOCAB_SIZE
    context_length: int = 1024  # longest sequence the position table covers
    emb_dim: int = 768  # C
    n_heads: int = 12  # NH; emb_dim must be divisible by it
    n_layers: int = 12  # Transformer blocks
    drop_rate: float = 0.1  # dropout on embeddings, attention probabilities and residual branches
    qkv_bias: bool = False  # bias in the fused q|k|v projection (GPT-2 has one; the lecture's model not)
    tie_weights: bool = True  # output head shares the token embedding (logits = x @ wte.T)
    ln_eps: float = 1e-5  # LayerNorm epsilon

    def __post_init__(self):
        for name in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"GPTConfig.{name} must be an int, got {v!r}")
        for name in ("vocab_size", "context_length", "emb_dim", "n_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"GPTConfig.{name} must be at least 1, got {getattr(self, name)}")
        if self.n_layers < 0:
            raise ValueError(f"GPTConfig.n_layers must be 0 or more, got {self.n_layers}")
        if self.emb_dim % self.n_heads:
            divisors = [h for h in range(1, self.emb_dim + 1) if self.emb_dim % h == 0 and h <= 64]
            raise ValueError(
                f"emb_dim={self.emb_dim} is not divisible by n_heads={self.n_heads}; pick n_heads from "
                f"{divisors} or change emb_dim to a multiple of {self.n_heads}"
            )
        if not isinstance(self.drop_rate, (int, float)) or not 0.0 <= self.drop_rate < 1.0:
            raise ValueError(f"GPTConfig.drop_rate must be in [0, 1), got {self.drop_rate!r}; 0 turns dropout off")
        if not isinstance(self.ln_eps, (int, float)) or not self.ln_eps > 0:
            raise ValueError(f"GPTConfig.ln_eps must be positive, got {self.ln_eps!r}")
        for name in ("qkv_bias", "tie_weights"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"GPTConfig.{name} must be True or False, got {getattr(self, name)!r}")
        self.drop_rate = float(self.drop_rate)
        self.ln_eps = float(self.ln_eps)

    @property
    def head_size(self) -> int:
        return self.emb_dim // self.n_heads

    @classmethod
    def from_preset(cls, name: str, **overrides) -> GPTConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown GPTConfig keys {unknown}; known keys: {sorted(known)}")
        return cls(**d)

    def replace(self, **changes) -> GPTConfig:
        return dataclasses.replace(self, **changes)

    # --- Hugging Face GPT2Config (config.json of a "gpt2" checkpoint) ---------------------------

    def to_hf_config(self) -> dict:
        """A config.json that transformers' GPT2LMHeadModel reads. HF's GPT-2 always has a q|k|v bias;
        a model with qkv_bias=False is exported with a zero bias, which computes the same function."""
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": self.vocab_size,
            "n_positions": self.context_length,
            "n_ctx": self.context_length,
            "n_embd": self.emb_dim,
            "n_head": self.n_heads,
            "n_layer": self.n_layers,
            "n_inner": None,
            "activation_function": "gelu_new",
            "resid_pdrop": self.drop_rate,
            "embd_pdrop": self.drop_rate,
            "attn_pdrop": self.drop_rate,
            "layer_norm_epsilon": self.ln_eps,
            "initializer_range": 0.02,
            "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False,
            "tie_word_embeddings": self.tie_weights,
            "bos_token_id": 50256 if self.vocab_size > 50256 else None,  # GPT-2's <|endoftext|>, when it exists
            "eos_token_id": 50256 if self.vocab_size > 50256 else None,
            "use_cache": True,
        }

    @classmethod
    def from_hf_config(cls, hf: dict) -> GPTConfig:
        """Map a Hugging Face GPT-2 config.json onto GPTConfig, refusing what npgpt cannot reproduce."""
        model_type = hf.get("model_type", "gpt2")
        if model_type != "gpt2":
            raise ValueError(f"config.json has model_type {model_type!r}; npgpt loads GPT-2 ('gpt2') checkpoints only")
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(
                f"config.json asks for activation_function {act!r}; npgpt implements GPT-2's tanh GELU "
                "('gelu_new') only"
            )
        n_embd = hf.get("n_embd", 768)
        n_inner = hf.get("n_inner")
        if n_inner not in (None, 4 * n_embd):
            raise ValueError(f"config.json has n_inner={n_inner}; npgpt's MLP is 4 * n_embd = {4 * n_embd} wide")
        for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            if hf.get(flag):
                raise ValueError(f"config.json sets {flag}=true, which npgpt does not implement")
        if hf.get("scale_attn_weights", True) is not True:
            raise ValueError("config.json sets scale_attn_weights=false, which npgpt does not implement")
        drops = {hf.get(k, 0.1) for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop")}
        return cls(
            vocab_size=hf.get("vocab_size", GPT2_VOCAB_SIZE),
            context_length=hf.get("n_positions", hf.get("n_ctx", 1024)),
            emb_dim=n_embd,
            n_heads=hf.get("n_head", 12),
            n_layers=hf.get("n_layer", 12),
            drop_rate=float(max(drops)),
            qkv_bias=True,
            tie_weights=bool(hf.get("tie_word_embeddings", True)),
            ln_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        )
