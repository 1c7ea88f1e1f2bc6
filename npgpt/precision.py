"""Mixed precision: 16-bit compute with float32 master weights, and dynamic loss scaling for float16.

    npgpt train --precision bf16     # bfloat16 activations and matrix products, float32 weights
    npgpt train --precision fp16     # float16, with the loss scaled up so small gradients survive

What stays in float32 and why (the fast engine, npgpt/engine/, follows this):
- the weights AdamW updates ("master weights"), its moments, and the gradients it reads. Each step
  casts the master weights to a 16-bit copy that the forward and backward use; a 16-bit weight could
  not take an update of lr * 1e-3 relative size at all (bfloat16 has 8 bits of mantissa);
- LayerNorm's statistics and arithmetic, the softmax cross-entropy over the vocabulary, and every sum
  over many rows (bias, position-embedding and LayerNorm gradients): these lose most to rounding;
- the products of the matrix multiplies accumulate in float32 (tensor cores do; on the CPU npgpt
  multiplies float32 copies), and only the result is rounded to 16 bits.

float16 has 5 exponent bits: values below 6e-8 flush to zero, above 65504 overflow. The gradient of the
mean loss over N = B*T tokens is about 1/N per logit and smaller further back, so without help much of
it would vanish. Loss scaling multiplies the loss (in practice, its gradient dlogits) by S before the
backward and divides the float32 gradients by S after it. If any gradient overflowed to inf or nan the
step is skipped and S halved; after `growth_interval` clean steps S doubles, so S hovers near the
largest safe value. bfloat16 has float32's exponent range, so it needs no scaling.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

PRECISIONS = ("fp32", "bf16", "fp16")


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def compute_dtype(precision: str, master_dtype=np.float32) -> np.dtype:
    """The dtype of activations and matrix products for `precision` (master_dtype for fp32)."""
    check_precision(precision)
    if precision == "fp32":
        return np.dtype(master_dtype)
    if np.dtype(master_dtype) != np.float32:
        raise ValueError(f"--precision {precision} keeps float32 master weights; the model is {np.dtype(master_dtype)} "
                         "(use --dtype float32)")  # fmt: skip
    if precision == "fp16":
        return np.dtype(np.float16)
    try:
        import ml_dtypes
    except ImportError:
        raise ValueError("--precision bf16 needs the bfloat16 dtype from ml_dtypes: pip install ml_dtypes "
                         "(or use --precision fp16)") from None  # fmt: skip
    return np.dtype(ml_dtypes.bfloat16)


def is_low_precision(dtype) -> bool:
    """True for the 16-bit compute dtypes (float16, bfloat16)."""
    return np.dtype(dtype).itemsize == 2


@dataclass
class LossScaler:
    """Dynamic loss scaling (for float16). Per optimizer step:

        loss = step(x, y, dloss=scaler.scale)    # gradients come back multiplied by scale
        grads *= 1 / scaler.scale                # back to the true gradients (float32)
        if scaler.update(finite=all gradients finite): optimizer.step(grads)   # else: skipped

    update() halves the scale after an overflow (down to min_scale) and doubles it after growth_interval
    finite steps in a row. `overflowed_at_min` tells when an overflow happened at min_scale already, which
    is then a real divergence rather than a scale to lower.
    """

    scale: float = 2.0**16
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 2000
    min_scale: float = 1.0
    max_scale: float = 2.0**24
    good_steps: int = 0  # finite steps since the last change of scale
    overflowed_at_min: bool = False

    def __post_init__(self):
        if not (self.min_scale <= self.scale <= self.max_scale):
            raise ValueError(f"loss scale {self.scale} must lie in [{self.min_scale}, {self.max_scale}]")
        if self.growth_factor <= 1.0 or not (0.0 < self.backoff_factor < 1.0) or self.growth_interval < 1:
            raise ValueError("loss scaling needs growth_factor > 1, 0 < backoff_factor < 1 and growth_interval >= 1")

    def update(self, finite: bool) -> bool:
        """Record whether this step's gradients were finite; True when the update should be applied."""
        self.overflowed_at_min = False
        if not finite:
            self.overflowed_at_min = self.scale <= self.min_scale
            self.scale = max(self.min_scale, self.scale * self.backoff_factor)
            self.good_steps = 0
            return False
        self.good_steps += 1
        if self.good_steps >= self.growth_interval:
            self.scale = min(self.max_scale, self.scale * self.growth_factor)
            self.good_steps = 0
        return True

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            if k in self.__dataclass_fields__:
                setattr(self, k, type(getattr(self, k))(v))
