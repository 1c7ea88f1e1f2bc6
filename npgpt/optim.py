"""AdamW and global-norm gradient clipping, written out.

AdamW (Loshchilov & Hutter), with PyTorch's conventions, for each parameter p with gradient g at step t:
    m = b1 * m + (1 - b1) * g                 first moment
    v = b2 * v + (1 - b2) * g^2               second moment
    m_hat = m / (1 - b1^t);  v_hat = v / (1 - b2^t)        bias correction (t counts from 1)
    p = p - lr * wd * p    (decoupled weight decay, only for the tensors decay_filter selects)
    p = p - lr * m_hat / (sqrt(v_hat) + eps)
Parameters are updated in place, so the model that owns the dict sees the new values. With 16-bit compute
(--precision bf16|fp16) the parameters stay float32 and the step can also round them into the fast
engine's 16-bit copy (`step(..., copy=engine.param_flat)`), in the same pass over each block.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from .backend import flat_base, get_array_module, views_into
from .parallel import num_threads, parallel_blocks
from .precision import is_low_precision

CHUNK = 1 << 17  # elements per block of the CPU update (512 KB in float32; large enough that threads do not queue on the GIL)


def default_decay_filter(name: str, param) -> bool:
    """Decay matrices and embeddings (ndim >= 2); not biases or LayerNorm weights (ndim 1)."""
    return param.ndim >= 2


def decay_every_parameter(name: str, param) -> bool:
    """Decay every tensor, biases and LayerNorm weights included, as torch.optim.AdamW(model.parameters())
    does (the book's chapter 5)."""
    return True


DECAY_FILTERS = {"matrices": default_decay_filter, "all": decay_every_parameter}  # `npgpt train --weight-decay-on`


class AdamW:
    def __init__(self, params: dict, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, decay_filter: Callable[[str, object], bool] = default_decay_filter):  # fmt: skip
        if not lr >= 0:
            raise ValueError(f"AdamW lr must be >= 0, got {lr}")
        b1, b2 = betas
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise ValueError(f"AdamW betas must be in [0, 1), got {betas}")
        if not eps > 0:
            raise ValueError(f"AdamW eps must be > 0, got {eps}")
        if not weight_decay >= 0:
            raise ValueError(f"AdamW weight_decay must be >= 0, got {weight_decay}")
        self.params = params
        self.lr, self.betas, self.eps, self.weight_decay = float(lr), (float(b1), float(b2)), float(eps), float(weight_decay)
        self.decay = {k: bool(decay_filter(k, p)) for k, p in params.items()}
        xp = get_array_module(*params.values())
        self.flat = flat_base(params)  # the parameters' one buffer, when they are laid out in one
        if self.flat is not None:  # moments laid out the same way, so one launch can update everything
            self.m_flat, self.v_flat = xp.zeros_like(self.flat), xp.zeros_like(self.flat)
            self.m, self.v = views_into(self.m_flat, params), views_into(self.v_flat, params)
        else:
            self.m = {k: xp.zeros_like(p) for k, p in params.items()}
            self.v = {k: xp.zeros_like(p) for k, p in params.items()}
        self._decay_mask = None
        self.t = 0  # steps taken

    def step(self, grads: dict, lr: float | None = None, *, copy=None) -> None:
        """One update of every parameter from `grads` (same keys). lr overrides the default for this step.
        copy: None, or a 1-D bfloat16/float16 array with one element per parameter element, laid out as
        the parameters back to back in the dict's order (the fast engine's `param_flat`, its 16-bit
        weights): each updated weight is rounded into it, in the same pass (the adamw kernel writes it
        beside p; the CPU while the block is in cache; the CuPy ops tensor by tensor)."""
        if grads.keys() != self.params.keys():
            missing = sorted(set(self.params) - set(grads))
            extra = sorted(set(grads) - set(self.params))
            raise ValueError(f"AdamW.step: gradients missing for {missing[:5]}, unexpected {extra[:5]}")
        copies = None
        if copy is not None:
            total = sum(int(p.size) for p in self.params.values())
            if copy.ndim != 1 or copy.size != total or not is_low_precision(copy.dtype):
                raise ValueError(f"AdamW.step: copy must be a 1-D bfloat16/float16 array of {total} elements (one per "
                                 f"weight), got {copy.dtype} of shape {tuple(copy.shape)}")  # fmt: skip
            copies = {k: c.reshape(-1) for k, c in views_into(copy, self.params).items()}
        lr = self.lr if lr is None else float(lr)
        b1, b2 = self.betas
        self.t += 1
        bc1 = 1.0 - b1**self.t
        bc2 = 1.0 - b2**self.t
        if self.flat is not None and _kernel_enabled(self.flat, "adamw"):
            g_flat = flat_base(grads)
            if g_flat is not None:  # one launch over the whole model (kernels/adamw.cu)
                from .cuda import kernels as ck

                if self._decay_mask is None:
                    self._decay_mask = ck.decay_mask_for(self.params, self.decay, xp=get_array_module(self.flat))
                ck.adamw_flat_(self.flat, g_flat, self.m_flat, self.v_flat, self._decay_mask, lr, b1, b2, self.eps,
                               self.weight_decay, self.t, copy=copy)  # fmt: skip
                return
        blocks = []  # (key, start, end): CPU tensors cut into cache-sized blocks
        for k, p in self.params.items():
            decay = lr * self.weight_decay if self.decay[k] else 0.0
            if get_array_module(p) is not np:  # GPU: whole tensors (the fused kernel: "adamw" above)
                _adamw_update(p, grads[k], self.m[k], self.v[k], None, b1, b2, self.eps, lr, decay, bc1, bc2)
                if copies is not None:
                    copies[k][...] = p.reshape(-1)  # rounded to 16 bits
                continue
            blocks += [(k, i, min(i + CHUNK, p.size)) for i in range(0, p.size, CHUNK)]
        if not blocks:
            return
        flat = {k: (p.reshape(-1), grads[k].reshape(-1), self.m[k].reshape(-1), self.v[k].reshape(-1)) for k, p in self.params.items()}
        scratch = self._scratch(next(iter(self.params.values())).dtype)

        def work(part, worker):
            for k, i, j in part:
                p, g, m, v = flat[k]
                decay = lr * self.weight_decay if self.decay[k] else 0.0
                _adamw_update(p[i:j], g[i:j], m[i:j], v[i:j], scratch[worker][: j - i], b1, b2, self.eps, lr, decay, bc1, bc2)
                if copies is not None:
                    copies[k][i:j] = p[i:j]  # rounded to 16 bits while the block is in cache

        parallel_blocks(blocks, work)  # each thread updates its own share of the blocks

    def _scratch(self, dtype):
        n = num_threads()
        buf = getattr(self, "_scratch_buf", None)
        if buf is None or buf.dtype != dtype or buf.shape[0] < n:
            self._scratch_buf = buf = np.empty((n, CHUNK), dtype=dtype)
        return buf

    def state_dict(self) -> dict:
        """Hyper-parameters, the step count and the moments (arrays keyed like the parameters)."""
        return {"t": self.t, "lr": self.lr, "betas": list(self.betas), "eps": self.eps,
                "weight_decay": self.weight_decay, "decay": dict(self.decay), "m": self.m, "v": self.v}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        for which in ("m", "v"):
            saved = state[which]
            if saved.keys() != self.params.keys():
                raise ValueError(f"optimizer state '{which}' has keys that do not match the parameters")
            for k, p in self.params.items():
                if tuple(saved[k].shape) != tuple(p.shape):
                    raise ValueError(f"optimizer state {which}[{k}] has shape {tuple(saved[k].shape)}, parameter {tuple(p.shape)}")
        xp = get_array_module(*self.params.values())
        for k in self.params:  # copied into the existing arrays, which keeps a flat layout flat
            self.m[k][...] = xp.asarray(state["m"][k], dtype=self.m[k].dtype)
            self.v[k][...] = xp.asarray(state["v"][k], dtype=self.v[k].dtype)
        self.t = int(state["t"])
        self.lr, self.eps, self.weight_decay = float(state["lr"]), float(state["eps"]), float(state["weight_decay"])
        self.betas = tuple(float(b) for b in state["betas"])
        if "decay" in state:
            self.decay = {k: bool(state["decay"][k]) for k in self.params}


def _adamw_update(p, g, m, v, scratch, b1, b2, eps, lr, decay, bc1, bc2) -> None:
    """The AdamW update of the module docstring, in place on p, m, v (any matching shapes):
        m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;  p -= decay * p;  p -= (lr / bc1) m / (sqrt(v / bc2) + eps)
    `scratch` (same size, or None to allocate) holds the temporaries."""
    xp = get_array_module(p)
    if scratch is None:
        scratch = xp.empty_like(p)
    m *= b1
    xp.multiply(g, 1.0 - b1, out=scratch)
    m += scratch
    v *= b2
    xp.multiply(g, g, out=scratch)
    scratch *= 1.0 - b2
    v += scratch
    if decay:
        p *= 1.0 - decay
    if lr == 0:
        return
    # (lr / bc1) m / (sqrt(v) / sqrt(bc2) + eps) = m / (sqrt(v) bc1 / (lr sqrt(bc2)) + eps bc1 / lr): the
    # constants folded, one pass fewer over the block (13 instead of 14; docs/benchmarks.md)
    xp.sqrt(v, out=scratch)
    scratch *= bc1 / (lr * math.sqrt(bc2))
    scratch += eps * bc1 / lr
    xp.divide(m, scratch, out=scratch)
    p -= scratch


def _kernel_enabled(array, name: str) -> bool:
    """True when `array` is a float32 array on a GPU (adamw and sq_norm work on float32 weights and
    gradients, also under 16-bit compute) and $NPGPT_CUDA_KERNELS enables the kernel `name`."""
    if get_array_module(array) is np or array.dtype != np.float32:
        return False
    from .cuda import kernel_enabled

    return kernel_enabled(name)


def grad_norm(grads: dict, *, sync: bool = True):
    """Global L2 norm of all gradients, sqrt(sum_k sum_i g_ki^2), as a Python float.

    On a GPU the norm is one reduction over the flat gradient buffer when the gradients are views of one
    (the fast engine's): the sq_norm kernel (kernels/adamw.cu) when enabled, else cuBLAS's nrm2. With
    sync=False it is returned as a 0-d device array, so nothing waits for the GPU (update.py reads it
    with the loss); on the CPU sync makes no difference."""
    xp = get_array_module(*grads.values())
    if xp is np:
        return math.sqrt(sum(float(np.dot(g.reshape(-1), g.reshape(-1))) for g in grads.values()))
    flat = flat_base(grads)
    if flat is not None and _kernel_enabled(flat, "sq_norm"):  # one deterministic reduction (kernels/adamw.cu)
        from .cuda import kernels as ck

        norm = xp.sqrt(ck.sq_norm(flat, sync=False)[0])
    elif flat is not None and flat.dtype in (np.float32, np.float64):
        from cupy import cublas

        norm = cublas.nrm2(flat)  # one pass, no temporary, the result left on the device
    else:
        norm = xp.sqrt(sum(xp.dot(g.reshape(-1), g.reshape(-1)) for g in grads.values()))
    return float(norm) if sync else norm


def clip_grad_norm(grads: dict, max_norm: float, *, sync: bool = True):
    """Scale all gradients in place so their global norm is at most max_norm; return the norm before.

    As in PyTorch: scale = max_norm / (norm + 1e-6), applied only when it is below 1. A non-finite
    norm is returned untouched (the trainer's non-finite guard decides what to do). On a GPU the scale
    is computed and applied there (one multiply over the flat gradient buffer, by 1 when no clipping is
    needed), so with sync=False nothing waits for the GPU and the norm is returned as a 0-d device array.
    """
    if not max_norm > 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm}")
    xp = get_array_module(*grads.values())
    flat = flat_base(grads)
    targets = [flat] if flat is not None else list(grads.values())
    norm = grad_norm(grads, sync=False)
    if xp is np:
        scale = max_norm / (norm + 1e-6)
        if math.isfinite(norm) and scale < 1.0:
            for g in targets:
                g *= scale
        return norm
    scale = xp.where(xp.isfinite(norm), xp.minimum(max_norm / (norm + 1e-6), 1.0), 1.0)
    for g in targets:
        g *= scale.astype(g.dtype)
    return float(norm) if sync else norm
