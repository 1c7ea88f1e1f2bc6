"""npgpt's fast ops: one file per readable layer of npgpt/layers/, same names, same math.

    layers/layernorm.py   out, cache = layernorm_forward(x, weight, bias)        (readable: fresh arrays, a cache)
    fast/layernorm.py     layernorm_forward(out, mean, rstd, x, weight, bias, eps, threads=2)
                          (fast: outputs first, written into buffers the caller allocated once)

Each fast op computes what its readable twin computes (tests/test_fast_ops.py holds each pair equal:
float64 to ~1e-12, float32 to ~1e-5) and says in its module docstring where the state it saves
differs. Threading (CPU row blocks over several threads) and 16-bit compute are handled inside the
ops. Positional arguments are an op's contract; keyword-only ones (threads=, scratch=, matmul=) are
resources of one implementation, which the fast step (npgpt/engine/ops.py) binds once when it chooses
each op's implementation: these NumPy/CuPy functions, or the CUDA kernels of npgpt.cuda.kernels,
which have the same positional arguments.

| readable layer (npgpt/layers/) | fast op (npgpt/fast/)                                          | CUDA kernel (kernels/) |
| embedding                      | embedding_forward/_backward, add_position_embedding_, position_embedding_backward | - |
| linear                         | linear_forward, linear_backward                                | - (cuBLAS)             |
| layernorm                      | layernorm_forward, layernorm_backward                          | layernorm.cu           |
| gelu                           | gelu_forward (bias add fused), gelu_backward_                  | gelu.cu                |
|                                | gelu_forward_keep_grad / gelu_backward_saved_ (keeps gelu')    | -                      |
| attention                      | attention_forward, attention_backward (+ the head-level pair)  | attention.cu (no dropout) |
|                                | attention_softmax_forward_ / _backward_, attention_dropout_   | attention_softmax.cu   |
|                                | (the fused softmax between cuBLAS products; Philox dropout)    |                        |
|                                | attention_causal_forward / _backward_ (CPU: causal row blocks) | -                      |
|                                | attention_in_place_forward / _backward (CPU: views of qkv)     | -                      |
|                                | attention_rows_forward / _backward_ (recompute: no T x T kept) | -                      |
| cross_entropy                  | cross_entropy_ (forward and backward in place)                 | cross_entropy.cu       |
| dropout                        | dropout_forward, dropout_backward                              | -                      |
|                                | philox4x32_10, attention_dropout_keep, AttentionDropoutRandom  | philox.cuh             |
| last_token                     | last_token_index, last_token_forward, last_token_backward     | -                      |
| classifier_head                | classifier_head_forward, classifier_head_backward (last_token + linear) | - (cuBLAS)   |
| mixed_loss                     | mixed_loss_ (two cross-entropies in place, weighted)           | cross_entropy.cu (LM term) |
| relu                           | relu_forward (bias add fused), relu_backward_                  | -                      |
| sinusoidal                     | sinusoidal_table_into, add_sinusoidal_ (backward: the identity) | -                     |
| masked_attention               | masked_attention_forward / _backward, attention_bias_into      | - (cuBLAS)             |
| multihead_attention            | multihead_attention_forward / _backward (the four projections) | - (cuBLAS)             |
| feedforward                    | feedforward_forward / _backward (ReLU or GELU)                 | gelu.cu for GELU       |

The composites have no file here, having no op of their own: GPT-2's block and ffn (npgpt/engine/block.py
wires their ops), and the encoder-decoder's encoder_block and decoder_block (seq2seq/engine.py).
"""

from .attention import (
    ATTENTION_ROWS,
    CAUSAL_ROWS,
    attention_backward,
    attention_causal_backward_,
    attention_causal_forward,
    attention_dropout_,
    attention_forward,
    attention_heads_backward_,
    attention_heads_forward,
    attention_in_place_backward,
    attention_in_place_forward,
    attention_rows_backward_,
    attention_rows_forward,
    attention_rows_scratch,
    attention_softmax_backward_,
    attention_softmax_forward_,
    head_from_rows_into,
    head_view,
    heads_from_qkv_into,
    merge_heads_into,
    qkv_from_heads_into,
    qkv_heads_view,
    split_heads_into,
)
from .common import in_threads, matmul, rowdot
from .classifier_head import classifier_head_backward, classifier_head_forward
from .cross_entropy import GPU_LOSS_ROWS, IGNORE_INDEX, LOSS_ROWS, cross_entropy_
from .dropout import AttentionDropoutRandom, attention_dropout_keep, dropout_backward, dropout_forward, philox4x32_10
from .embedding import add_position_embedding_, embedding_backward, embedding_forward, position_embedding_backward
from .feedforward import FeedForwardSaved, feedforward_backward, feedforward_forward
from .gelu import (
    GPU_ROW_BLOCK,
    ROW_BLOCK,
    gelu_backward_,
    gelu_backward_saved_,
    gelu_forward,
    gelu_forward_keep_grad,
    gelu_scratch,
)
from .last_token import last_token_backward, last_token_forward, last_token_index
from .layernorm import layernorm_backward, layernorm_forward
from .linear import linear_backward, linear_forward
from .mixed_loss import mixed_loss_
from .masked_attention import attention_bias_into, masked_attention_backward, masked_attention_forward
from .multihead_attention import AttentionSaved, multihead_attention_backward, multihead_attention_forward
from .relu import relu_backward_, relu_forward
from .sinusoidal import add_sinusoidal_, sinusoidal_table_into

__all__ = [
    "attention_forward", "attention_backward", "attention_heads_forward", "attention_heads_backward_",
    "split_heads_into", "merge_heads_into", "heads_from_qkv_into", "qkv_from_heads_into", "head_from_rows_into",
    "attention_rows_forward", "attention_rows_backward_", "attention_rows_scratch", "ATTENTION_ROWS",
    "attention_causal_forward", "attention_causal_backward_", "CAUSAL_ROWS",
    "attention_in_place_forward", "attention_in_place_backward", "qkv_heads_view",
    "attention_softmax_forward_", "attention_softmax_backward_", "attention_dropout_",
    "matmul", "rowdot", "in_threads",
    "cross_entropy_", "IGNORE_INDEX", "LOSS_ROWS", "GPU_LOSS_ROWS",
    "dropout_forward", "dropout_backward", "philox4x32_10", "attention_dropout_keep", "AttentionDropoutRandom",
    "embedding_forward", "embedding_backward", "add_position_embedding_", "position_embedding_backward",
    "gelu_forward", "gelu_backward_", "gelu_forward_keep_grad", "gelu_backward_saved_", "gelu_scratch", "ROW_BLOCK", "GPU_ROW_BLOCK",
    "last_token_index", "last_token_forward", "last_token_backward",
    "layernorm_forward", "layernorm_backward",
    "linear_forward", "linear_backward",
    # fine-tuning's (npgpt.finetune)
    "classifier_head_forward", "classifier_head_backward", "mixed_loss_",
    # the encoder-decoder Transformer's (npgpt.seq2seq)
    "relu_forward", "relu_backward_",
    "sinusoidal_table_into", "add_sinusoidal_",
    "attention_bias_into", "head_view", "masked_attention_forward", "masked_attention_backward",
    "AttentionSaved", "multihead_attention_forward", "multihead_attention_backward",
    "FeedForwardSaved", "feedforward_forward", "feedforward_backward",
]  # fmt: skip
