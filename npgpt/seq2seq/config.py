"""The encoder-decoder Transformer's configuration: a dataclass, checked on creation."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

NORMS = ("post", "pre")
ACTIVATIONS = ("relu", "gelu")
POSITIONS = ("sinusoidal", "learned")
TIES = ("all", "decoder", "none")


@dataclass(frozen=True)
class Seq2SeqConfig:
    src_vocab_size: int
    tgt_vocab_size: int
    d_model: int = 128  # C
    n_heads: int = 4  # NH; d_model must be a multiple
    n_encoder_layers: int = 2
    n_decoder_layers: int = 2
    d_ff: int = 256  # F, the feed-forward network's hidden width
    dropout: float = 0.1  # on the embeddings, attention probabilities, ff hidden layer and every residual branch
    norm: str = "post"  # "post": Add & Norm after each sub-layer (the paper); "pre": LayerNorm before it
    activation: str = "relu"  # of the feed-forward network: "relu" (the paper) or "gelu"
    pos_encoding: str = "sinusoidal"  # "sinusoidal" (fixed, the paper) or "learned" (a (max_len, C) table)
    max_len: int = 64  # longest source, and longest target with its start or end token
    tie_embeddings: str = "all"  # "all": one table for source, target and output (one shared vocabulary);
    #                              "decoder": target embedding = output projection; "none": three tables
    scale_embeddings: bool = True  # multiply embeddings by sqrt(d_model), as the paper does
    ln_eps: float = 1e-5
    pad_id: int = 0  # padding: masked out of attention, ignored by the loss
    bos_id: int = 1  # starts every target
    eos_id: int = 2  # ends every target

    def __post_init__(self):
        ints = ("src_vocab_size", "tgt_vocab_size", "d_model", "n_heads", "n_encoder_layers", "n_decoder_layers", "d_ff", "max_len")
        for name in ints:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; choose heads that divide it")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        for name, allowed in (("norm", NORMS), ("activation", ACTIVATIONS), ("pos_encoding", POSITIONS), ("tie_embeddings", TIES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.pos_encoding == "sinusoidal" and self.d_model % 2:
            raise ValueError(f"sinusoidal positions need an even d_model, got {self.d_model}; use pos_encoding='learned'")
        if self.tie_embeddings == "all" and self.src_vocab_size != self.tgt_vocab_size:
            raise ValueError("tie_embeddings='all' shares one table between source and target, so the vocabularies must "
                             f"be one (got {self.src_vocab_size} and {self.tgt_vocab_size}); use 'decoder' or 'none'")  # fmt: skip
        specials = (self.pad_id, self.bos_id, self.eos_id)
        if len(set(specials)) != 3 or min(specials) < 0 or max(specials) >= min(self.src_vocab_size, self.tgt_vocab_size):
            raise ValueError(f"pad_id, bos_id, eos_id must be three different ids inside both vocabularies, got {specials}")

    @property
    def head_size(self) -> int:
        return self.d_model // self.n_heads

    @property
    def norm_first(self) -> bool:
        return self.norm == "pre"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Seq2SeqConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown Seq2SeqConfig keys {unknown}; known keys: {', '.join(sorted(known))}")
        return cls(**d)

    def replace(self, **changes) -> "Seq2SeqConfig":
        return replace(self, **changes)
