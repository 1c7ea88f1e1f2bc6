"""The readable engine: GPT.forward and GPT.backward (model.py, layers/) behind the engine interface.

Every layer returns a fresh array and a cache; this is the reference the fast engine (gpt.py) is held
equal to (tests/test_engine.py).
"""

from __future__ import annotations


def accumulated(total: dict | None, grads: dict) -> dict:
    """grads, or (gradient accumulation) total with grads added into it, key by key."""
    if total is None:
        return grads
    for k, g in grads.items():
        total[k] += g
    return total


class ReferenceLossAndGrads:
    """The readable path behind the engine interface: GPT.forward and GPT.backward. `grads` are fresh
    arrays from each backward; they are released at the next call, before its forward allocates."""

    grad_flat = None  # one array per parameter, not views of one buffer

    def __init__(self, model):
        self.model, self.grads = model, None

    def __call__(self, idx, targets, training: bool = False, rng=None, dloss: float = 1.0, accumulate: bool = False,
                 backward: bool = True, sync: bool = True) -> float:  # fmt: skip
        if not accumulate:
            self.grads = None
        _, loss, cache = self.model.forward(idx, targets, training=training, rng=rng)
        if backward:
            self.grads = accumulated(self.grads, self.model.backward(cache, dloss=dloss))
        return float(loss) if sync else loss

    def loss(self, idx, targets) -> float:
        """Mean loss without dropout and without a backward (for evaluation)."""
        return self(idx, targets, training=False, backward=False)
