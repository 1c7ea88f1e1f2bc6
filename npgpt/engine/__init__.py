"""The engines that compute a batch's loss and gradients: the readable reference and the fast step.

Glossary: B=batch, T=time, C=channels, NH=heads, hs=C//NH, V=vocab, N=B*T rows, L=n_layers.

Both have one interface, which `npgpt train` and `npgpt bench` drive through update.py:

    engine = make_engine("fast", model, batch_size=2, seq_len=256)    # or "reference"
    loss = engine(x, y, training=True, rng=rng, dloss=1.0, accumulate=False)   # a Python float (sync=False: maybe on the GPU)
    engine.grads        # the gradients, keyed like model.params (engine.grad_flat: their one buffer, or None)
    engine.loss(x, y)   # the mean loss without dropout and without a backward (evaluation)

dloss scales the gradients (1/grad_accum, times the fp16 loss scale); accumulate=True adds this batch's
gradients to `grads` instead of overwriting them. Neither engine steps the optimizer (update.py does).

Fine-tuning (npgpt/finetune/fast_steps.py) drives the fast engine in two halves, so that a head of its
own can sit on the final LayerNorm's output between them, and trains only some parameters:

    engine = FastLossAndGrads(model, B, T, trainable=names, lm_head=False)   # defaults: all, True
    engine.forward(idx, targets=None, training=True, rng=rng, lm_head=False)
    engine.hidden                      # (b, t, C): ln_f's output, what the LM head would read
    engine.backward(dhidden=dh)        # dh (b, t, C): the head's gradient, added to the LM head's
    # or with lm_head=True and no targets: engine.logits (b*t, V), and backward(dhidden=, dlogits=)

ReferenceLossAndGrads (reference.py) runs GPT.forward / GPT.backward (model.py, layers/): every layer
returns a fresh array and a cache. FastLossAndGrads (gpt.py) computes the same numbers (tests hold them
equal: float64 to ~1e-12, float32 to ~1e-5) from the fast ops of npgpt/fast/, one per readable layer,
assembled from parts, each in a module of its own:

    buffers.py    Activations, Workspace: every buffer allocated once for the largest (B, T)
    ops.py        choose_ops: each op's implementation, the fast op or a CUDA kernel, chosen once
    parts.py      Gradients, LayerNorms, Dropout, Trainable: the bookkeeping both fast engines share
    attention.py  the attention paths (in place, heads layout, recomputed, flash, fused softmax), one chosen once
    block.py      Blocks: the block's wiring, written once; Recompute: what the backward refills
    ends.py       Embeddings, and LMHead (fine-tuning's lm_head=False and frozen head)
    gpt.py        FastLossAndGrads: plans, chooses, assembles; a step is the forward and its reverse

          idx ─► Embeddings ─► Blocks[0] ─► ... ─► Blocks[L-1] ─► ln_f ─► LMHead ─► loss
                                  │  ln_1 ─ c_attn ─ [attention path] ─ c_proj ─ dropout ─ +
                                  │  ln_2 ─ c_fc ─ GELU ─ c_proj ─ dropout ─ +
          grads ◄──────────── the same parts backward, top first (Gradients, LayerNorms, Dropout) ◄─┘

With precision="bf16" or "fp16" (precision.py) activations and matrix products are 16-bit while the
weights the optimizer owns ("master" weights: LayerNorm reads them directly), the gradients and the
LayerNorm / loss arithmetic stay float32; each step refreshes a 16-bit copy of the weights. Dropout
masks are drawn from `rng` in the reference's order and shapes, so one generator drops the same
elements on both paths. The encoder-decoder's fast engine (npgpt/seq2seq/engine.py) is built from the
same ops and parts. docs/architecture.md (its second half) draws the whole picture.
"""

from __future__ import annotations

from .attention import (FlashAttention, FusedSoftmaxAttention, HeadsAttention, InPlaceAttention, RecomputedAttention,
                        choose_attention)
from .block import Blocks, Recompute
from .buffers import RECOMPUTE, Activations, Workspace, check_recompute, nbytes_of, plan_activations, plan_workspace
from .gpt import IGNORE_INDEX, FastLossAndGrads, check_batch
from .ops import Ops, choose_ops, resolve_kernels
from .parts import Dropout, Gradients, LayerNorms, Trainable
from .reference import ReferenceLossAndGrads, accumulated


def make_engine(name: str, model, batch_size: int, seq_len: int, precision: str = "fp32", recompute: str = "none"):
    """The engine called `name` ("fast" or "reference") for batches of up to (batch_size, seq_len).
    "fast" first lays the model's weights out in one buffer (GPT.flatten_params_), so that AdamW can
    update them in one pass: build the optimizer after this. recompute: see block.Recompute."""
    check_recompute(recompute)
    if name == "fast":
        model.flatten_params_()
        return FastLossAndGrads(model, batch_size, seq_len, precision=precision, recompute=recompute)
    if name != "reference":
        raise ValueError(f"engine must be 'fast' or 'reference', got {name!r}")
    if recompute != "none":
        raise ValueError(f"recompute {recompute!r} runs in the fast engine only (the readable reference keeps "
                         "every cache); use --engine fast or --recompute none")  # fmt: skip
    if precision != "fp32":
        raise ValueError(f"precision {precision} runs in the fast engine only; use --engine fast")
    return ReferenceLossAndGrads(model)


__all__ = [
    "make_engine", "FastLossAndGrads", "ReferenceLossAndGrads", "accumulated", "IGNORE_INDEX", "check_batch",
    "Activations", "Workspace", "plan_activations", "plan_workspace", "nbytes_of", "RECOMPUTE", "check_recompute",
    "Ops", "choose_ops", "resolve_kernels",
    "Gradients", "LayerNorms", "Dropout", "Trainable",
    "choose_attention", "InPlaceAttention", "HeadsAttention", "RecomputedAttention", "FlashAttention",
    "FusedSoftmaxAttention",
    "Blocks", "Recompute",
]  # fmt: skip
