"""One optimizer update from one or more micro-batches: the single implementation that `npgpt train` and
`npgpt bench` share.

    updater = Updater(engine, AdamW(model.params), world=world, scaler=LossScaler(), grad_clip=1.0)
    result = updater([(x1, y1, rng1), (x2, y2, rng2)], lr=3e-4)   # two micro-batches of one step

In order:
1. gradient accumulation: each micro-batch's forward and backward with dloss = scale / A (A micro-batches,
   scale the fp16 loss scale or 1), the gradients summed in the engine's buffers (accumulate=True after
   the first), so they are the gradient of the mean loss over the A micro-batches (times scale);
2. the all-reduce: under MPI the gradients are averaged over the ranks (distributed.py), and so is the loss;
3. loss scaling: the float32 gradients are divided by the scale again;
4. the global gradient norm, clipped to grad_clip when given (measured only when something needs it:
   clipping, loss scaling, or measure_norm, since it reads every gradient once);
5. the finite test: a non-finite loss or norm skips the AdamW step, leaving weights and optimizer state
   untouched. With loss scaling, an overflow of the float16 gradients (a finite loss, an infinite norm)
   halves the scale and is reported as `overflow`, not as a divergence, unless the scale is at its minimum;
6. AdamW (optim.py) with the learning rate given. With 16-bit compute it also rounds the new weights
   into the engine's 16-bit copy (`param_flat`) in the same pass, so the next update's forwards skip
   their own refresh of that copy (FastLossAndGrads.weights_copy_current, set here for the micro-batches
   of one update only). Code that writes the model's weights between two updates must call
   `updater.weights_changed()`, so that the next forward refreshes the copy from them.

On a GPU an update waits for the GPU once: the losses and the gradient norm stay on the device (the
engines' and optim's sync=False) and are read together in one copy (backend.host_scalars) for the
finite test; the ids are checked on the host before they are copied (npgpt/engine/).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np

from .backend import host_scalars
from .distributed import SingleProcess, allreduce_grads_
from .optim import AdamW, clip_grad_norm, grad_norm


@dataclass
class UpdateResult:
    loss: float  # mean loss over the micro-batches (and the ranks)
    grad_norm: float | None  # global norm of the true gradients before clipping (None: not measured)
    applied: bool  # the optimizer stepped
    overflow: bool = False  # float16 gradients overflowed: the loss scale was lowered, the update skipped


class Updater:
    """Gradient accumulation, loss scaling, the all-reduce, clipping, the finite test and AdamW, for an
    engine of npgpt/engine/ (FastLossAndGrads or ReferenceLossAndGrads)."""

    def __init__(self, engine, optimizer, *, world=None, scaler=None, grad_clip: float | None = None,
                 measure_norm: bool = True):  # fmt: skip
        self.engine, self.optimizer = engine, optimizer
        self.world = world if world is not None else SingleProcess()
        self.scaler, self.grad_clip, self.measure_norm = scaler, grad_clip, measure_norm
        self.copy = self._weights_copy(engine, optimizer)  # the engine's 16-bit weights AdamW writes, or None
        self._copy_current = False  # the copy holds the weights as the last update left them

    @staticmethod
    def _weights_copy(engine, optimizer):
        """The engine's 16-bit copy of the weights when the optimizer can keep it (16-bit compute, AdamW
        over exactly the model's parameters in their order, so the layouts agree), else None."""
        copy = getattr(engine, "param_flat", None)
        if copy is None or not isinstance(optimizer, AdamW):
            return None
        params = engine.model.params
        same = list(optimizer.params) == list(params) and all(optimizer.params[k].shape == params[k].shape for k in params)
        return copy if same else None

    def weights_changed(self) -> None:
        """Say that something other than this updater's optimizer wrote the model's weights: the next
        update's first forward refreshes the engine's 16-bit copy from them."""
        self._copy_current = False

    def __call__(self, micro_batches, lr: float | None = None, training: bool = True) -> UpdateResult:
        """micro_batches: a list of (x, y, rng), each (b, T) token ids and the dropout generator."""
        engine, world, count = self.engine, self.world, len(micro_batches)
        scale = self.scaler.scale if self.scaler is not None else 1.0  # fp16: gradients come back scaled
        loss_sum = 0.0  # on a GPU, a 0-d device array until the one read below
        if self.copy is not None:  # the 16-bit weights as the last step wrote them: no refresh needed
            engine.weights_copy_current = self._copy_current
        try:
            for i, (x, y, rng) in enumerate(micro_batches):
                loss_sum = loss_sum + engine(x, y, training=training, rng=rng, dloss=scale / count, accumulate=i > 0, sync=False)
        finally:
            if self.copy is not None:
                engine.weights_copy_current = False  # outside an update, every forward refreshes the copy
        self._copy_current = self.copy is not None  # the forwards refreshed it (or found it current)
        grads = engine.grads
        allreduce_grads_(world, grads, engine.grad_flat)
        if scale != 1.0:
            engine.grad_flat *= engine.grad_flat.dtype.type(1.0 / scale)  # the true (float32) gradients
        norm = None
        if self.grad_clip or self.measure_norm or self.scaler is not None:
            with np.errstate(over="ignore", invalid="ignore") if self.scaler is not None else contextlib.nullcontext():
                if self.grad_clip:  # inf: fp16 overflow
                    norm = clip_grad_norm(grads, self.grad_clip, sync=False)
                else:
                    norm = grad_norm(grads, sync=False)
        loss_sum, norm = host_scalars(loss_sum, norm)  # the step's one wait for the GPU
        loss = float(world.allreduce_sum([loss_sum / count])[0]) / world.size
        finite = math.isfinite(loss) and (norm is None or math.isfinite(norm))
        if self.scaler is not None and math.isfinite(loss):
            self.scaler.update(math.isfinite(norm))
            if not finite and not self.scaler.overflowed_at_min:  # a smaller scale, not a divergence
                return UpdateResult(loss, norm, applied=False, overflow=True)
        if finite and self.copy is not None:
            self._copy_current = False  # until the step below has written it
            self.optimizer.step(grads, lr=lr, copy=self.copy)  # the 16-bit weights written in the same pass
            self._copy_current = True
        elif finite:
            self.optimizer.step(grads, lr=lr)
        return UpdateResult(loss, norm, applied=finite)
