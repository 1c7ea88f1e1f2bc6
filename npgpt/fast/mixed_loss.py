"""Fast mixed fine-tuning loss: L = L_FT + lm_weight * L_PT, both cross-entropies in place on their logits.

Glossary: b = batch, k = labels, V = vocab, n = the LM rows (b*t).
    L_FT = mean_i CE(cls_logits[i], labels[i])                          (b, k) -> 0-d
    L_PT = mean over the rows r whose target counts of CE(lm_logits[r], lm_targets[r])   (n, V) -> 0-d
    L    = L_FT + lm_weight * L_PT,   lm_weight in [0, 1]
A target equal to IGNORE_INDEX (-100) does not count; L_PT is 0 when none counts (a batch of
one-token texts) and when lm_weight is 0.

Readable twin: npgpt.layers.mixed_loss (mixed_loss_forward / mixed_loss_backward). Differences:
- forward and backward in one call, in place (fast/cross_entropy.py): each logits array becomes its
  gradient, cls_logits dloss * (softmax - onehot) / b and lm_logits dloss * lm_weight * (softmax -
  onehot) / n_valid (0 on rows that do not count), so no second (n, V) array exists; when L_PT is 0,
  lm_logits becomes 0, its gradient, as the readable backward returns zeros;
- returns (L, L_FT, L_PT) as Python floats (the readable layer: L as a 0-d array, the terms in its cache);
- lm_targets must be the targets of lm_logits's rows, (n,) or any shape of n elements; the targets
  always use IGNORE_INDEX (the readable layer takes ignore_index);
- lm_cross_entropy_: the op that runs the LM term, a resource (the fine-tuning step passes the one its
  engine chose: the fast op with its threads and row blocks, or the CUDA kernel, same arguments).
CUDA: the loss's kernel (kernels/cross_entropy.cu) through lm_cross_entropy_, or CuPy.
"""

from __future__ import annotations

from ..layers.mixed_loss import check_lm_weight
from .cross_entropy import IGNORE_INDEX, cross_entropy_


def mixed_loss_(cls_logits, labels, lm_logits=None, lm_targets=None, lm_weight: float = 0.5, want_grad: bool = True,
                dloss: float = 1.0, *, lm_cross_entropy_=cross_entropy_) -> tuple[float, float, float]:  # fmt: skip
    """(L, L_FT, L_PT) of cls_logits (b, k) against labels (b,) and lm_logits (n, V) against lm_targets
    (n elements, or both None: no LM term). With want_grad both logits arrays are overwritten by their
    gradients (of dloss * L), as the module docstring says; without, they may serve as scratch.

    Differentiates  `L = L_FT + lm_weight * L_PT`:  a sum passes dloss to each term scaled by its weight,
    and each cross-entropy's gradient is (softmax - onehot) / (rows counted) (fast/cross_entropy.py)."""
    lm_weight = check_lm_weight(lm_weight)
    if (lm_logits is None) != (lm_targets is None):
        raise ValueError("mixed loss: give lm_logits and lm_targets together, or neither")
    ft_loss = float(cross_entropy_(cls_logits, labels, want_grad, dloss))  # (b, k) -> L_FT; cls_logits -> dcls
    lm_loss = 0.0
    if lm_logits is not None:
        targets = lm_targets.reshape(-1)
        n_valid = int((targets != IGNORE_INDEX).sum()) if lm_weight > 0 else 0
        if n_valid > 0:  # the gradient dloss * lm_weight * (softmax - onehot) / n_valid, scaled before any rounding
            lm_loss = float(lm_cross_entropy_(lm_logits, targets, want_grad, dloss * lm_weight, n_valid=n_valid))
        elif want_grad:
            lm_logits[...] = 0  # L_PT is the constant 0 here: its gradient is 0
    return ft_loss + lm_weight * lm_loss, ft_loss, lm_loss
