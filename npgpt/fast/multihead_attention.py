"""Fast multi-head attention with its four projections, self- or cross-attention, into preallocated buffers.

Glossary: b=batch, tq=query positions, tk=key positions, C=channels, NH=heads.
    q = x @ w_q + b_q;  k = memory @ w_k;  v = memory @ w_v + b_v       (b, tq, C), (b, tk, C), (b, tk, C)
    y = masked_attention(q, k, v)                                       fast/masked_attention.py
    out = y @ w_o + b_o                                                 (b, tq, C)
memory is x itself for self-attention and the encoder output for cross-attention. `w` and `g` map the
names inside one attention layer (layers.multihead_attention.MHA_PARAM_NAMES: q_proj.weight, ...) to
the weights and to their gradient buffers; the keys have no bias.

Readable twin: npgpt.layers.multihead_attention (multihead_attention_forward / _backward). Differences:
- outputs first; what the backward needs is kept in the caller's buffers (`AttentionSaved`: q divided
  by sqrt(hs), k, v, the probabilities, y), and the inputs x and memory are given to the backward again;
- the backward writes dx = dq @ w_q^T, and dmemory = dk @ w_k^T + dv @ w_v^T, or adds dmemory into its
  buffer (add_dmemory=True): the encoder output's gradient summed over the decoder layers that read it,
  or, for self-attention, dmemory given as dx itself, so that dx becomes the sum of both uses of x;
- the weight gradients are written into the caller's buffers (views of one flat buffer in the fast
  step), or added into them with accumulate=True (fast/linear.py);
- q, k and v are three GEMMs, not one: the model keeps w_q, w_k, w_v as separate (C, C) arrays, laid
  (C_in, C_out) and contiguous (AdamW, the checkpoints and the PyTorch mapping rely on that), and a
  fused (C, 3C) matrix [w_q | w_k | w_v] concatenates them along the columns, which would interleave
  their rows in memory: no view of three separate arrays can be it, so fusing would copy the weights
  at every step and scatter the fused weight gradient back (docs/backprop.md#where-the-code-lives-readable-fast-kernel-tests).
CUDA: cuBLAS (CuPy's matmul); no kernel of ours.
"""

from __future__ import annotations

from typing import NamedTuple

from ..backend import get_array_module
from .common import matmul
from .linear import linear_backward, linear_forward
from .masked_attention import masked_attention_backward, masked_attention_forward


class AttentionSaved(NamedTuple):
    """The buffers one attention layer's forward fills for its backward."""

    q: object  # (b, tq, C) the queries divided by sqrt(hs)
    k: object  # (b, tk, C)
    v: object  # (b, tk, C)
    att: object  # (b, NH, tq, tk) probabilities before dropout
    y: object  # (b, tq, C) attention's output, the input of out_proj


def _rows(a):
    """(b, t, C) -> (b*t, C), a view."""
    return a.reshape(-1, a.shape[-1])


def multihead_attention_forward(out, saved: AttentionSaved, x, memory, w, bias, p: float = 0.0, rng=None, *,
                                dropped=None, threads: int = 1, matmul=matmul):  # fmt: skip
    """out (b, tq, C) = multi-head attention with queries from x (b, tq, C) and keys and values from memory
    (b, tk, C) (x itself for self-attention). bias: fast.attention_bias_into's additive mask. p > 0:
    dropout on the probabilities, the keep-mask returned (else None). Fills `saved`."""
    q, k, v, att, y = saved
    linear_forward(_rows(q), _rows(x), w["q_proj.weight"], w["q_proj.bias"])  # (b*tq, C)
    linear_forward(_rows(k), _rows(memory), w["k_proj.weight"])  # (b*tk, C), no bias
    linear_forward(_rows(v), _rows(memory), w["v_proj.weight"], w["v_proj.bias"])
    keep = masked_attention_forward(y, att, q, k, v, bias, p, rng, dropped=dropped, threads=threads, matmul=matmul)
    linear_forward(_rows(out), _rows(y), w["out_proj.weight"], w["out_proj.bias"])  # (b*tq, C)
    return keep


def multihead_attention_backward(dx, dmemory, g, dout, saved: AttentionSaved, x, memory, w, keep=None, p: float = 0.0,
                                 accumulate: bool = False, add_dmemory: bool = False, *, dq, dk, dv, tmp, datt=None,
                                 weight_scratch=None, threads: int = 1, matmul=matmul) -> None:  # fmt: skip
    """dx (b, tq, C) = dq @ w_q^T; dmemory (b, tk, C) = dk @ w_k^T + dv @ w_v^T, added into it with
    add_dmemory (dmemory may then be dx: self-attention). g: the gradient buffers, keyed like w (written,
    or added into with accumulate). dq (b, tq, C), dk, dv, tmp (b, tk, C): scratch; datt: scratch like
    att; weight_scratch: fast.linear_backward's scratch.

    Differentiates  `out = attention(x @ w_q, memory @ w_k, memory @ w_v) @ w_o`  (biases left out):
    out_proj's backward gives dy, attention's dq, dk, dv; x receives the queries' share, and memory
    the keys' and the values' (it fed two projections, so the two add)."""
    q, k, v, att, y = saved
    lin = dict(accumulate=accumulate, scratch=weight_scratch)
    linear_backward(_rows(dq), g["out_proj.weight"], g["out_proj.bias"], _rows(dout), _rows(y), w["out_proj.weight"], **lin)
    masked_attention_backward(dq, dk, dv, dq, q, k, v, att, keep, p, datt=datt, threads=threads, matmul=matmul)  # dq held dy
    linear_backward(_rows(dx), g["q_proj.weight"], g["q_proj.bias"], _rows(dq), _rows(x), w["q_proj.weight"], **lin)
    mem = _rows(memory)
    first = _rows(tmp) if add_dmemory else _rows(dmemory)
    linear_backward(first, g["k_proj.weight"], None, _rows(dk), mem, w["k_proj.weight"], **lin)
    if add_dmemory:
        get_array_module(dmemory).add(_rows(dmemory), first, out=_rows(dmemory))
    linear_backward(_rows(tmp), g["v_proj.weight"], g["v_proj.bias"], _rows(dv), mem, w["v_proj.weight"], **lin)
    dmemory += tmp  # memory fed both the keys and the values
