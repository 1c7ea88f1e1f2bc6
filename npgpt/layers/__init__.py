"""npgpt's layers: each a pair of pure functions.

    out, cache = X_forward(inputs..., params...)
    grads      = X_backward(dout, cache)    # gradients of the differentiable inputs, in forward order

The backward never mutates dout or the cache. Every layer runs on NumPy and CuPy arrays, in
float32 or float64. One concept per file; docs/backprop.md derives every backward. Each layer has a
fast twin of the same name in npgpt/fast/ (what training runs; tests/test_fast_ops.py and
tests/test_seq2seq_fast_ops.py hold them equal), except the composites block, ffn, encoder_block and
decoder_block, whose parts the fast steps (engine.py, seq2seq/engine.py) wire directly.
"""

from .attention import AttentionCache, attention_backward, attention_forward, attention_step_kv
from .block import BLOCK_PARAM_NAMES, BlockCache, block_backward, block_forward
from .classifier_head import ClassifierHeadCache, classifier_head_backward, classifier_head_forward
from .cross_entropy import CrossEntropyCache, softmax_cross_entropy_backward, softmax_cross_entropy_forward
from .decoder_block import (
    DECODER_BLOCK_PARAM_NAMES,
    DecoderBlockCache,
    cross_attention_kv,
    decoder_block_backward,
    decoder_block_forward,
    decoder_block_step,
)
from .dropout import DropoutCache, dropout_backward, dropout_forward
from .embedding import EmbeddingCache, embedding_backward, embedding_forward
from .encoder_block import ENCODER_BLOCK_PARAM_NAMES, EncoderBlockCache, encoder_block_backward, encoder_block_forward
from .feedforward import FeedForwardCache, feedforward_backward, feedforward_forward
from .ffn import FFNCache, ffn_backward, ffn_forward
from .gelu import GeluCache, gelu_backward, gelu_forward
from .last_token import LastTokenCache, last_token_backward, last_token_forward, last_token_index
from .layernorm import LayerNormCache, layernorm_backward, layernorm_forward
from .linear import LinearCache, linear_backward, linear_forward
from .masked_attention import MaskedAttentionCache, masked_attention_backward, masked_attention_forward
from .multihead_attention import (
    MHA_PARAM_NAMES,
    MultiheadAttentionCache,
    multihead_attention_backward,
    multihead_attention_forward,
)
from .mixed_loss import MixedLossCache, mixed_loss_backward, mixed_loss_forward
from .relu import ReluCache, relu_backward, relu_forward
from .sinusoidal import SinusoidalCache, sinusoidal_backward, sinusoidal_forward, sinusoidal_table

__all__ = [
    "AttentionCache", "attention_forward", "attention_backward", "attention_step_kv",
    "BLOCK_PARAM_NAMES", "BlockCache", "block_forward", "block_backward",
    "ClassifierHeadCache", "classifier_head_forward", "classifier_head_backward",
    "CrossEntropyCache", "softmax_cross_entropy_forward", "softmax_cross_entropy_backward",
    "DropoutCache", "dropout_forward", "dropout_backward",
    "EmbeddingCache", "embedding_forward", "embedding_backward",
    "FFNCache", "ffn_forward", "ffn_backward",
    "GeluCache", "gelu_forward", "gelu_backward",
    "LastTokenCache", "last_token_forward", "last_token_backward", "last_token_index",
    "LayerNormCache", "layernorm_forward", "layernorm_backward",
    "LinearCache", "linear_forward", "linear_backward",
    "MixedLossCache", "mixed_loss_forward", "mixed_loss_backward",
    # the encoder-decoder Transformer's layers (npgpt.seq2seq)
    "MaskedAttentionCache", "masked_attention_forward", "masked_attention_backward",
    "MHA_PARAM_NAMES", "MultiheadAttentionCache", "multihead_attention_forward", "multihead_attention_backward",
    "ReluCache", "relu_forward", "relu_backward",
    "FeedForwardCache", "feedforward_forward", "feedforward_backward",
    "SinusoidalCache", "sinusoidal_forward", "sinusoidal_backward", "sinusoidal_table",
    "ENCODER_BLOCK_PARAM_NAMES", "EncoderBlockCache", "encoder_block_forward", "encoder_block_backward",
    "DECODER_BLOCK_PARAM_NAMES", "DecoderBlockCache", "decoder_block_forward", "decoder_block_backward",
    "cross_attention_kv", "decoder_block_step",
]  # fmt: skip
