"""Learning-rate schedule: linear warmup, then cosine decay to a floor.

    step < warmup:   lr = max_lr * (step + 1) / warmup          (never 0, even at step 0)
    afterwards:      lr = min_lr + (max_lr - min_lr) * 0.5 * (1 + cos(pi * progress)),
                     progress = (step - warmup) / (total - warmup), clamped to [0, 1]
Steps count from 0 (the step about to be taken).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class LRSchedule:
    max_lr: float
    total_steps: int | None = None  # None: no decay after warmup
    warmup_steps: int = 0
    min_lr: float | None = None  # default 0.1 * max_lr
    kind: str = "cosine"  # "cosine" or "constant" (warmup still applies)

    def __post_init__(self):
        if not self.max_lr > 0:
            raise ValueError(f"the learning rate must be > 0, got {self.max_lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup steps must be >= 0, got {self.warmup_steps}")
        if self.kind not in ("cosine", "constant"):
            raise ValueError(f"unknown schedule {self.kind!r}; use 'cosine' or 'constant'")
        if self.min_lr is None:
            self.min_lr = 0.1 * self.max_lr
        if not 0 <= self.min_lr <= self.max_lr:
            raise ValueError(f"min_lr must be in [0, max_lr={self.max_lr}], got {self.min_lr}")

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.max_lr * (step + 1) / self.warmup_steps
        if self.kind == "constant" or self.total_steps is None:
            return self.max_lr
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(max((step - self.warmup_steps) / span, 0.0), 1.0)
        return self.min_lr + (self.max_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
