"""The fast training step: the whole model's forward and backward with buffers allocated once.

Glossary: B=batch, T=time, C=channels, NH=heads, hs=C//NH, V=vocab, N=B*T rows, L=n_layers.

`GPT.forward` / `GPT.backward` (model.py, layers/) are the readable reference: every layer returns a
fresh array and a cache. This module computes exactly the same numbers faster, and tests hold the two
equal (float64 to ~1e-12, float32 to ~1e-5). What it does differently, and why:

- every activation and gradient lives in a buffer allocated once for the largest (B, T) and reused
  on every step (`out=` arguments and in-place ops: no allocator churn, no page faults);
- activations are kept as 2-D (N, C) matrices, so each linear layer is one GEMM, and the gradients of
  the weights are written straight into one flat gradient buffer (`self.grads` are views into it);
- LayerNorm keeps only its per-row mean and 1/std and recomputes xhat in the backward;
- softmax cross-entropy over the vocabulary runs in place on the logits buffer, row block by row block
  (so each block stays in cache): logits -> probabilities -> dlogits without a second (N, V) array;
- on the CPU, elementwise work (GELU, LayerNorm, the loss; AdamW in optim.py) is split over the cores
  (NumPy's ufuncs use one) in row blocks sized for the cache;
- on a GPU, hand-written CUDA kernels (kernels/, opt-in) can replace LayerNorm, GELU, the loss and
  attention, the last with O(T) memory instead of the (B, NH, T, T) probabilities;
- with precision="bf16" or "fp16" (precision.py) activations and matrix products are 16-bit while the
  weights the optimizer owns, the gradients and LayerNorm / loss arithmetic stay float32: each step
  casts the weights to a 16-bit copy (self.P), and each weight-gradient GEMM writes a 16-bit product
  that is added into the float32 gradient buffer.

Dropout draws its masks from `rng` in the same order and shapes as the reference, so with the same
generator both paths drop the same elements. The logits are not returned: the loss is the output.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np

from .backend import flat_base, get_array_module, scatter_add, views_into
from .layers.dropout import check_dropout_p, dropout_mask
from .layers.gelu import GELU_CUBIC, GELU_SCALE
from .parallel import num_threads, parallel_ranges
from .precision import compute_dtype, is_low_precision

ROW_BLOCK = 32  # rows of the (N, 4C) MLP activations processed together on the CPU (GELU)
LOSS_ROWS = 4  # rows of the (N, V) logits processed together on the CPU (about 800 KB for GPT-2's vocabulary)
# On a GPU blocks only bound the temporaries: small blocks would mean thousands of kernel launches.
GPU_ROW_BLOCK = 2048
GPU_LOSS_ROWS = 1024


class TrainStep:
    """loss = step(idx, targets, training, rng): forward and backward; gradients land in `self.grads`.

    step = TrainStep(model, batch_size=2, seq_len=256)
    loss = step(x, y, training=True, rng=rng)   # a Python float
    optimizer.step(step.grads)                  # the same keys as model.params
    """

    def __init__(self, model, batch_size: int, seq_len: int, kernels=None, precision: str = "fp32"):
        """kernels: names of the CUDA kernels to use (npgpt.cuda.KERNEL_NAMES); default: those that
        $NPGPT_CUDA_KERNELS enables when the model is on a GPU, none on the CPU. (Given NumPy arrays the
        kernels run in npgpt.cuda.emulate's CPU emulation, which is how the tests check this path.)
        precision: "fp32" (the model's dtype throughout), "bf16" or "fp16" (16-bit activations and
        matrix products, float32 weights and gradients; see precision.py). Our kernels are float32-only
        and are not used with 16-bit precision; "bmm" (cuBLAS's batched GEMM, npgpt/cuda/blas.py) is."""
        cfg = model.config
        if seq_len > cfg.context_length:
            raise ValueError(f"seq_len {seq_len} exceeds the model's context_length {cfg.context_length}")
        self.model = model
        self.B, self.T = int(batch_size), int(seq_len)
        xp = self.xp = model.xp
        self.precision = precision
        dt = self.dtype = compute_dtype(precision, model.dtype)  # activations and matrix products
        sdt = self.stat_dtype = np.dtype(model.dtype)  # weights, gradients, LayerNorm statistics, sums over rows
        self.lowp = is_low_precision(dt)
        B, T, C, NH, L, V = self.B, self.T, cfg.emb_dim, cfg.n_heads, cfg.n_layers, cfg.vocab_size
        N = B * T
        z = lambda *shape: xp.empty(shape, dtype=dt)  # noqa: E731

        # Activations saved for the backward, one set per layer.
        self.resid = [z(N, C) for _ in range(L + 1)]  # input of each block; resid[L] feeds ln_f
        self.resid_mid = [z(N, C) for _ in range(L)]  # x1 = x + attention branch
        self.ln1 = [z(N, C) for _ in range(L)]
        self.ln2 = [z(N, C) for _ in range(L)]
        zs = lambda *shape: xp.empty(shape, dtype=sdt)  # noqa: E731
        self.ln_stats = [(zs(N), zs(N), zs(N), zs(N)) for _ in range(L)]  # mean1, rstd1, mean2, rstd2
        self.qkv = [z(3, B, NH, T, cfg.head_size) for _ in range(L)]  # q (pre-scaled), k, v; head-major
        self.att = [None] * L  # softmax probabilities (B, NH, T, T), allocated on first use (not with flash attention)
        self.atty = [z(N, C) for _ in range(L)]  # attention output before c_proj
        self.fc = [z(N, 4 * C) for _ in range(L)]  # MLP pre-activation
        self.act = [z(N, 4 * C) for _ in range(L)]  # GELU output
        self.lnf = z(N, C)
        self.lnf_stats = (zs(N), zs(N))
        self.logits = z(N, V)  # logits, then probabilities, then dlogits, in place
        self.masks = None  # dropout keep-masks of the last training step
        # Gradient buffers: one flat array (float32 also with 16-bit compute), a view per parameter in
        # the model's key order.
        self.grad_flat = xp.zeros(sum(int(p.size) for p in model.params.values()), dtype=sdt)
        self.grads = views_into(self.grad_flat, model.params)
        # The weights the forward and backward read: the model's own, or their 16-bit copy (refreshed
        # from the model at every call, since the optimizer changes the float32 weights in between).
        self.param_flat = None
        self.P = model.params
        if self.lowp:
            self.param_flat = xp.empty(self.grad_flat.size, dtype=dt)
            self.P = views_into(self.param_flat, model.params)
        # Scratch for the backward.
        self.d_resid = z(N, C)
        self.d_nc = z(N, C)
        self.d_nc2 = z(N, C)
        self.d_n3c = z(N, 3 * C)
        self.d_n4c = z(N, 4 * C)
        self.d_att = None  # (B, NH, T, T) scratch of the reference attention, allocated with self.att
        self.d_head = z(3, B, NH, T, cfg.head_size)
        # Gradients that are summed into rather than written by a GEMM: zeroed at the start of a backward.
        self._added_into = [k for k, p in model.params.items() if p.ndim == 1 or k == "wpe.weight"]
        if not cfg.tie_weights:
            self._added_into.append("wte.weight")  # only the embedding scatter-add writes it
        self._acc_scratch = None  # for gradient accumulation (and every weight GEMM in 16 bits), allocated on first use
        self._accumulate = False
        # CPU threads for the elementwise work (GELU, LayerNorm, the loss), each with its own scratch
        self.threads = num_threads() if xp is np else 1
        self.loss_rows = LOSS_ROWS if xp is np else GPU_LOSS_ROWS
        row_block = min(N, ROW_BLOCK if xp is np else GPU_ROW_BLOCK)
        # GELU's temporaries per thread: two (N, 4C) blocks, two more for float32 copies with 16-bit compute
        self.row_scratch = zs(self.threads, row_block, (16 if self.lowp else 8) * C)
        self.causal_bias = xp.triu(xp.full((T, T), -np.inf, dtype=dt), k=1)  # -inf above the diagonal
        # Hand-written CUDA kernels (kernels/*.cu), opt-in until verified on a GPU.
        from .cuda import enabled_kernels

        self.kernels = (enabled_kernels() if xp is not np else set()) if kernels is None else set(kernels)
        if self.lowp:  # our kernels read and write float32 only; cuBLAS's batched GEMM takes 16 bits too
            if kernels and set(kernels) - {"bmm"}:
                raise ValueError(f"the CUDA kernels work in float32; precision {precision!r} cannot use "
                                 f"{sorted(set(kernels) - {'bmm'})}")  # fmt: skip
            self.kernels &= {"bmm"}
        # attention's stacks of heads: one cuBLAS call per product ("bmm"), or xp.matmul
        self.bmm = _cublas_matmul if ("bmm" in self.kernels and xp is not np) else _matmul
        self.ck = None
        if self.kernels:
            from .cuda import kernels as ck

            self.ck = ck
            if "attention" in self.kernels and cfg.head_size not in ck.ATTENTION_HEAD_SIZES:
                self.kernels.discard("attention")  # the flash kernel needs hs in 16..128, a multiple of 16
        self.lse = [z(B, NH, T) for _ in range(L)] if "attention" in self.kernels else None
        self.flash_out = z(B, NH, T, cfg.head_size) if "attention" in self.kernels else None
        self.used_flash = [False] * L  # which layers took the flash kernel in the last forward

    # ------------------------------------------------------------------------------------------------
    def nbytes(self) -> int:
        """Bytes held by this step's buffers (activations, gradients, scratch)."""
        arrays = [self.lnf, self.logits, self.grad_flat, self.d_resid, self.d_nc, self.d_nc2, self.d_n3c, self.d_n4c,
                  self.d_head, self.row_scratch, self.causal_bias, *self.lnf_stats]  # fmt: skip
        if self.d_att is not None:
            arrays.append(self.d_att)
        for group in (self.resid, self.resid_mid, self.ln1, self.ln2, self.qkv, self.att, self.atty, self.fc, self.act,
                      self.lse or []):  # fmt: skip
            arrays += [a for a in group if a is not None]
        if self.flash_out is not None:
            arrays.append(self.flash_out)
        if self.param_flat is not None:  # the 16-bit copy of the weights
            arrays.append(self.param_flat)
        arrays += [a for stats in self.ln_stats for a in stats]
        if self._acc_scratch is not None:
            arrays.append(self._acc_scratch)
        return int(sum(a.nbytes for a in arrays))

    def _check(self, idx, targets):
        xp = self.xp
        idx = xp.asarray(idx)
        if idx.ndim != 2 or idx.dtype.kind not in "iu":
            raise ValueError(f"idx must be a (B, T) integer array, got shape {tuple(idx.shape)} dtype {idx.dtype}")
        b, t = idx.shape
        if b > self.B or t > self.T or b < 1 or t < 1:
            raise ValueError(f"batch of shape ({b}, {t}) does not fit this step's buffers ({self.B}, {self.T})")
        V = self.model.config.vocab_size
        if int(idx.min()) < 0 or int(idx.max()) >= V:
            raise ValueError(f"token ids must lie in [0, {V})")
        if targets is not None:
            targets = xp.asarray(targets)
            if targets.shape != idx.shape:
                raise ValueError(f"targets have shape {tuple(targets.shape)}, idx {tuple(idx.shape)}")
            if int(targets.min()) < 0 or int(targets.max()) >= V:
                raise ValueError(f"targets must lie in [0, {V}) (ignore_index is not supported by the fast step)")
        return idx, targets

    # ------------------------------------------------------------------------------------------------
    def __call__(self, idx, targets, training: bool = False, rng=None, dloss: float = 1.0, accumulate: bool = False,
                 backward: bool = True) -> float:  # fmt: skip
        """Forward (and backward unless backward=False) on one batch; returns the mean loss.

        accumulate=True adds this batch's gradients to `self.grads` instead of overwriting them.
        dloss scales the gradients (1/grad_accum for gradient accumulation).
        """
        idx, targets = self._check(idx, targets)
        cfg = self.model.config
        p = check_dropout_p(cfg.drop_rate) if training else 0.0
        if p > 0.0 and rng is None:
            rng = self.model.rng
        b, t = idx.shape
        if self.lowp:  # this step's 16-bit copy of the (float32) weights
            src = flat_base(self.model.params)
            if src is not None:
                self.param_flat[...] = src
            else:
                for k, w in self.model.params.items():
                    self.P[k][...] = w
        # float16 overflows to inf by design: loss scaling (train.py) finds it in the gradients and backs off
        with np.errstate(over="ignore", invalid="ignore") if self.dtype == np.float16 else contextlib.nullcontext():
            loss = self._forward(idx, targets, b, t, p, rng, want_grad=backward, dloss=dloss)
            if backward:
                self._backward(idx, targets, b, t, p, accumulate)
        return loss

    def loss(self, idx, targets) -> float:
        """Mean loss without dropout and without a backward (for evaluation)."""
        return self(idx, targets, training=False, backward=False)

    # --- forward ---------------------------------------------------------------------------------------
    def _forward(self, idx, targets, b, t, p, rng, want_grad, dloss=1.0):
        xp, cfg, P, P32 = self.xp, self.model.config, self.P, self.model.params  # P32: LayerNorm's float32 weights
        C, L, eps = cfg.emb_dim, cfg.n_layers, cfg.ln_eps
        n = b * t
        masks = {}
        x = self.resid[0][:n]
        xp.take(P["wte.weight"], idx.reshape(-1), axis=0, out=x)  # (n, C) token embeddings
        x.reshape(b, t, C)[...] += P["wpe.weight"][:t]  # + position embeddings
        if p > 0:
            masks["emb"] = self._dropout_(x, p, rng)
        for l in range(L):  # noqa: E741
            pre = f"h.{l}."
            mean1, rstd1, mean2, rstd2 = (s[:n] for s in self.ln_stats[l])
            h = self.ln1[l][:n]
            self._ln_fwd(x, P32[pre + "ln_1.weight"], P32[pre + "ln_1.bias"], eps, h, mean1, rstd1)
            qkv2d = self.d_n3c[:n]  # scratch: the fused projection before it is split into heads
            _linear_fwd(h, P[pre + "attn.c_attn.weight"], P.get(pre + "attn.c_attn.bias"), qkv2d)
            y = self.atty[l][:n]
            masks[f"att{l}"] = self._attention_fwd(l, qkv2d, b, t, y, p, rng)
            x1 = self.resid_mid[l][:n]
            _linear_fwd(y, P[pre + "attn.c_proj.weight"], P[pre + "attn.c_proj.bias"], self.d_nc[:n])
            if p > 0:
                masks[f"res1_{l}"] = self._dropout_(self.d_nc[:n], p, rng)
            xp.add(x, self.d_nc[:n], out=x1)
            h2 = self.ln2[l][:n]
            self._ln_fwd(x1, P32[pre + "ln_2.weight"], P32[pre + "ln_2.bias"], eps, h2, mean2, rstd2)
            fc, act = self.fc[l][:n], self.act[l][:n]
            if "gelu" in self.kernels:  # the bias add fused into the GELU kernel
                _matmul(h2, P[pre + "mlp.c_fc.weight"], fc)
                self.ck.gelu_bias_fwd(fc, P[pre + "mlp.c_fc.bias"], act, pre=fc)
            else:
                _linear_fwd(h2, P[pre + "mlp.c_fc.weight"], P[pre + "mlp.c_fc.bias"], fc)
                _gelu_fwd(fc, act, self.row_scratch, self.threads)
            x_next = self.resid[l + 1][:n]
            _linear_fwd(act, P[pre + "mlp.c_proj.weight"], P[pre + "mlp.c_proj.bias"], self.d_nc[:n])
            if p > 0:
                masks[f"res2_{l}"] = self._dropout_(self.d_nc[:n], p, rng)
            xp.add(x1, self.d_nc[:n], out=x_next)
            x = x_next
        mean_f, rstd_f = (s[:n] for s in self.lnf_stats)
        self._ln_fwd(x, P32["ln_f.weight"], P32["ln_f.bias"], eps, self.lnf[:n], mean_f, rstd_f)
        logits = self.logits[:n]
        head = P["wte.weight"] if cfg.tie_weights else P["lm_head.weight"]  # (V, C)
        _matmul(self.lnf[:n], head.T, logits)  # (n, C) @ (C, V) -> (n, V)
        self.masks = masks
        if targets is None:
            return None
        # the gradient left in the logits is dloss * (softmax - onehot) / n: scaled before any rounding
        if "cross_entropy" in self.kernels:
            return float(self.ck.cross_entropy_(logits, targets.reshape(-1), scale=dloss / n, want_grad=want_grad))
        return _cross_entropy_inplace(logits, targets.reshape(-1), want_grad, self.threads, dloss, self.loss_rows)

    def _ln_fwd(self, x, w, b, eps, out, mean, rstd):
        if "layernorm" in self.kernels:
            self.ck.layernorm_fwd(x, w, b, eps, out, mean, rstd)
        else:
            _layernorm_fwd(x, w, b, eps, out, mean, rstd, self.threads)

    def _ln_bwd(self, dout, x, mean, rstd, w, dx, dw, db, scratch):
        if "layernorm" in self.kernels:
            self.ck.layernorm_bwd(dout, x, mean, rstd, w, dx, dw, db)
        else:
            _layernorm_bwd(dout, x, mean, rstd, w, dx, dw, db, scratch, self.threads)

    def _dropout_(self, a, p, rng):
        """In-place inverted dropout on `a`; returns the keep-mask (drawn like the reference layer)."""
        keep = dropout_mask(a.shape, p, rng, self.xp)
        a *= keep
        a *= a.dtype.type(1.0 / (1.0 - p))
        return keep

    def _attention_fwd(self, l, qkv2d, b, t, y, p, rng):  # noqa: E741
        xp, cfg = self.xp, self.model.config
        NH, hs = cfg.n_heads, cfg.head_size
        heads = self.qkv[l][:, :b, :, :t]  # (3, b, NH, t, hs)
        heads[...] = qkv2d.reshape(b, t, 3, NH, hs).transpose(2, 0, 3, 1, 4)  # (n, 3C) -> (3, b, NH, t, hs)
        heads[0] *= heads.dtype.type(1.0 / math.sqrt(hs))  # fold the 1/sqrt(hs) into q
        q, k, v = heads[0], heads[1], heads[2]
        self.used_flash[l] = "attention" in self.kernels and p == 0  # the kernel has no dropout
        if self.used_flash[l]:  # O(T) memory: keeps the row logsumexp, not the probabilities
            out = self.flash_out[:b, :, :t]
            self.ck.attention_fwd(q, k, v, out, self.lse[l][:b, :, :t], scale=1.0)
            y.reshape(b, t, NH, hs)[...] = out.transpose(0, 2, 1, 3)  # (b, NH, t, hs) -> (n, C)
            return None
        if self.att[l] is None:  # the O(T^2) buffers, only when this path is taken
            self.att[l] = xp.empty((self.B, NH, self.T, self.T), dtype=heads.dtype)
            if self.d_att is None:
                self.d_att = xp.empty_like(self.att[l])
        att = self.att[l][:b, :, :t, :t]  # (b, NH, t, t)
        keep = dropout_mask(att.shape, p, rng, xp) if p > 0 else None  # drawn where the reference draws it
        scale = att.dtype.type(1.0 / (1.0 - p))
        dropped = self.d_att[:b, :, :t, :t]  # scratch for the dropped probabilities
        out = self.d_head[0, :b, :, :t]  # (b, NH, t, hs) scratch
        bias = self.causal_bias[:t, :t]

        _attention_fwd_slab(q, k, v, att, bias, keep, scale, dropped, out, self.bmm)  # all (batch, head) pairs at once
        y.reshape(b, t, NH, hs)[...] = out.transpose(0, 2, 1, 3)  # (b, NH, t, hs) -> (n, C)
        return keep

    # --- backward --------------------------------------------------------------------------------------
    def _backward(self, idx, targets, b, t, p, accumulate):
        cfg, P, P32, G = self.model.config, self.P, self.model.params, self.grads
        C, L = cfg.emb_dim, cfg.n_layers
        n = b * t
        self._accumulate = accumulate
        if not accumulate:  # the weight GEMMs overwrite their gradients; the rest is added into
            for key in self._added_into:
                G[key][...] = 0
        dlogits = self.logits[:n]  # holds dloss * (probs - onehot) / n after the forward
        head_key = "wte.weight" if cfg.tie_weights else "lm_head.weight"
        head = P[head_key]  # (V, C)
        dx = self.d_resid[:n]
        _matmul(dlogits, head, dx)  # (n, V) @ (V, C) -> (n, C)
        self._matmul_into(dlogits.T, self.lnf[:n], G[head_key], accumulate)  # (V, n) @ (n, C) -> (V, C)
        mean_f, rstd_f = (s[:n] for s in self.lnf_stats)
        dtmp = self.d_nc[:n]
        self._ln_bwd(dx, self.resid[L][:n], mean_f, rstd_f, P32["ln_f.weight"], dtmp, G["ln_f.weight"], G["ln_f.bias"], self.d_nc2[:n])
        dx[...] = dtmp  # d(resid[L])
        for l in reversed(range(L)):  # noqa: E741
            pre = f"h.{l}."
            mean1, rstd1, mean2, rstd2 = (s[:n] for s in self.ln_stats[l])
            # out = x1 + dropout(mlp(ln_2(x1)))
            dm = dx
            if p > 0:
                dm = self.d_nc[:n]
                self._dropout_bwd_(dx, self.masks[f"res2_{l}"], p, out=dm)
            dact = self.d_n4c[:n]
            self._linear_bwd(dm, self.act[l][:n], pre + "mlp.c_proj", dact)
            if "gelu" in self.kernels:  # dact becomes dfc, in place
                self.ck.gelu_bwd_(dact, self.fc[l][:n])
            else:
                _gelu_bwd(dact, self.fc[l][:n], self.row_scratch, self.threads)
            dh2 = self.d_nc2[:n]
            self._linear_bwd(dact, self.ln2[l][:n], pre + "mlp.c_fc", dh2)
            dln = self.d_nc[:n]
            self._ln_bwd(dh2, self.resid_mid[l][:n], mean2, rstd2, P32[pre + "ln_2.weight"], dln,
                         G[pre + "ln_2.weight"], G[pre + "ln_2.bias"], self.d_n4c[:n, :C])  # fmt: skip
            dx += dln  # dx1 = dout + branch
            # x1 = x + dropout(c_proj(attention(c_attn(ln_1(x)))))
            da = dx
            if p > 0:
                da = self.d_nc[:n]
                self._dropout_bwd_(dx, self.masks[f"res1_{l}"], p, out=da)
            dy = self.d_nc2[:n]
            self._linear_bwd(da, self.atty[l][:n], pre + "attn.c_proj", dy)
            dqkv = self.d_n3c[:n]
            self._attention_bwd(l, dy, b, t, dqkv, p)
            dh = self.d_nc[:n]
            self._linear_bwd(dqkv, self.ln1[l][:n], pre + "attn.c_attn", dh)
            dln = self.d_nc2[:n]
            self._ln_bwd(dh, self.resid[l][:n], mean1, rstd1, P32[pre + "ln_1.weight"], dln,
                         G[pre + "ln_1.weight"], G[pre + "ln_1.bias"], self.d_n4c[:n, :C])  # fmt: skip
            dx += dln
        if p > 0:
            self._dropout_bwd_(dx, self.masks["emb"], p)
        # x = wte[idx] + wpe[:t]
        scatter_add(G["wte.weight"], idx.reshape(-1), dx.astype(self.stat_dtype, copy=False))
        G["wpe.weight"][:t] += dx.reshape(b, t, C).sum(axis=0, dtype=self.stat_dtype)

    def _matmul_into(self, a, b, out, accumulate):
        """out = a @ b, or out += a @ b when accumulating. matmul cannot accumulate, and with 16-bit
        compute its product is 16-bit while `out` (a gradient) is float32: both go through a scratch
        buffer of the compute dtype, allocated on first use and kept."""
        if not accumulate and not self.lowp:
            self.xp.matmul(a, b, out=out)
            return
        if self._acc_scratch is None:
            largest = max(int(g.size) for g in self.grads.values() if g.ndim == 2)
            self._acc_scratch = self.xp.empty(largest, dtype=self.dtype)
        tmp = self._acc_scratch[: out.size].reshape(out.shape)
        _matmul(a, b, tmp)
        if accumulate:
            out += tmp
        else:
            out[...] = tmp

    def _dropout_bwd_(self, d, keep, p, out=None):
        """out (default: d itself) = d * keep / (1 - p)."""
        out = d if out is None else out
        self.xp.multiply(d, keep, out=out)
        out *= d.dtype.type(1.0 / (1.0 - p))

    def _linear_bwd(self, dout, x, name, dx):
        """dx = dout @ W.T; dW += x.T @ dout; db += sum(dout) for the layer `name` (e.g. 'h.0.mlp.c_fc')."""
        P, G = self.P, self.grads
        W = P[name + ".weight"]
        _matmul(dout, W.T, dx)  # (n, C_out) @ (C_out, C_in) -> (n, C_in)
        self._matmul_into(x.T, dout, G[name + ".weight"], self._accumulate)
        if name + ".bias" in G:
            G[name + ".bias"] += dout.sum(axis=0, dtype=self.stat_dtype)

    def _attention_bwd(self, l, dy, b, t, dqkv, p):  # noqa: E741
        cfg = self.model.config
        NH, hs = cfg.n_heads, cfg.head_size
        heads = self.qkv[l][:, :b, :, :t]
        q, k, v = heads[0], heads[1], heads[2]  # q already holds q / sqrt(hs)
        dheads = self.d_head[:, :b, :, :t]  # (3, b, NH, t, hs): dq, dk, dv
        dyh = dheads[0]  # dy lives in dq's slot until dq is computed, head by head
        dyh[...] = dy.reshape(b, t, NH, hs).transpose(0, 2, 1, 3)  # (n, C) -> (b, NH, t, hs)
        if self.used_flash[l]:
            out = self.flash_out[:b, :, :t]
            out[...] = self.atty[l][: b * t].reshape(b, t, NH, hs).transpose(0, 2, 1, 3)  # the forward's output
            self.ck.attention_bwd(q, k, v, out, self.lse[l][:b, :, :t], dyh, dheads[0], dheads[1], dheads[2],
                                  scale=1.0, dq_mult=1.0 / math.sqrt(hs))  # fmt: skip
            dqkv.reshape(b, t, 3, NH, hs)[...] = dheads.transpose(1, 3, 0, 2, 4)
            return
        att = self.att[l][:b, :, :t, :t]
        datt = self.d_att[:b, :, :t, :t]
        keep = self.masks[f"att{l}"] if p > 0 else None
        scale = att.dtype.type(1.0 / (1.0 - p))
        inv_sqrt = att.dtype.type(1.0 / math.sqrt(hs))

        _attention_bwd_slab(q, k, v, att, keep, scale, inv_sqrt, datt, dheads[0], dheads[1], dheads[2], self.bmm)
        dqkv.reshape(b, t, 3, NH, hs)[...] = dheads.transpose(1, 3, 0, 2, 4)  # (3, b, NH, t, hs) -> (n, 3C)


# --- attention over (..., t, hs) stacks of heads -------------------------------------------------------


def _attention_fwd_slab(q, k, v, att, bias, keep, scale, dropped, out, mm=None):
    """att = softmax(q @ k^T + bias) (rows), out = dropout(att) @ v. Shapes (..., t, hs) and (..., t, t);
    q is already scaled by 1/sqrt(hs), bias is 0 on and below the diagonal and -inf above it.
    mm(a, b, out): the batched product (default _matmul)."""
    xp = get_array_module(q)
    mm = mm or _matmul
    mm(q, xp.swapaxes(k, -1, -2), att)  # scores
    att += bias  # the future gets -inf
    att -= att.max(axis=-1, keepdims=True)
    xp.exp(att, out=att)
    att /= att.sum(axis=-1, keepdims=True, dtype=np.float32 if is_low_precision(att.dtype) else None)
    used = att
    if keep is not None:
        xp.multiply(att, keep, out=dropped)
        dropped *= scale
        used = dropped
    mm(used, v, out)


def _attention_bwd_slab(q, k, v, att, keep, scale, inv_sqrt, datt, dq, dk, dv, mm=None):
    """The backward of _attention_fwd_slab; dq holds dy on entry (it is read before dq is written)."""
    xp = get_array_module(q)
    mm = mm or _matmul
    dy = dq
    if keep is not None:
        xp.multiply(att, keep, out=datt)  # the dropped probabilities that multiplied v
        datt *= scale
        mm(xp.swapaxes(datt, -1, -2), dy, dv)  # dv = att'^T @ dy
        mm(dy, xp.swapaxes(v, -1, -2), datt)  # datt' = dy @ v^T
        datt *= keep  # back through the mask
        datt *= scale
    else:
        mm(xp.swapaxes(att, -1, -2), dy, dv)  # dv = att^T @ dy
        mm(dy, xp.swapaxes(v, -1, -2), datt)  # datt = dy @ v^T
    # softmax backward, in place: dscores = att * (datt - sum(datt * att))
    datt -= _rowdot(datt, att)[..., None]
    datt *= att
    # scores = q' @ k^T with q' = q / sqrt(hs):  dk = dscores^T @ q',  dq = dscores @ k / sqrt(hs)
    mm(xp.swapaxes(datt, -1, -2), q, dk)
    mm(datt, k, dq)  # overwrites dy, which is no longer needed
    dq *= inv_sqrt


# --- building blocks (2-D, in place) --------------------------------------------------------------------


def _matmul(a, b, out):
    """out = a @ b (stacks of matrices too). With 16-bit operands on the CPU the product is taken of
    float32 copies and rounded once into `out`, as a GPU's tensor cores accumulate 16-bit products in
    float32 (NumPy has no 16-bit BLAS, and has no bfloat16 matmul that writes bfloat16)."""
    xp = get_array_module(out)
    if xp is np and is_low_precision(out.dtype):
        out[...] = np.matmul(a.astype(np.float32), b.astype(np.float32))
    else:
        xp.matmul(a, b, out=out)


def _cublas_matmul(a, b, out):
    """out = a @ b for CuPy stacks of matrices through npgpt.cuda.blas.bmm: transposed operands become
    cuBLAS op flags instead of copies, and float32 honours the TF32 setting (CuPy's N-D matmul does
    neither; see blas.py). 2-D products keep CuPy's matmul, which does both."""
    if out.ndim <= 2:
        get_array_module(out).matmul(a, b, out=out)
        return
    from .backend import tf32_enabled
    from .cuda.blas import bmm

    bmm(a, b, out, tf32=tf32_enabled())


def _rowdot(a, b):
    """sum(a * b, axis=-1) without materialising a * b on the CPU (16-bit operands: summed in float32)."""
    xp = get_array_module(a)
    if is_low_precision(a.dtype):
        return (a * b).sum(axis=-1, dtype=np.float32)
    if xp is np:
        sub = "abcdefgh"[: a.ndim]
        return np.einsum(f"{sub},{sub}->{sub[:-1]}", a, b)
    return (a * b).sum(axis=-1)


def _linear_fwd(x, W, bias, out):
    """out = x @ W + bias, with x (n, C_in), W (C_in, C_out), out (n, C_out)."""
    _matmul(x, W, out)
    if bias is not None:
        out += bias


def _in_threads(n, work, threads):
    """work(lo, hi, worker) over contiguous row ranges of range(n), on `threads` threads at once."""
    if threads <= 1 or n < 2 * threads:
        work(0, n, 0)
    else:
        parallel_ranges(n, work, threads)


def _layernorm_fwd(x, w, bias, eps, out, mean, rstd, threads=1):
    """out = (x - mean) * rstd * w + bias over the last axis; keeps mean and rstd (n,) for the backward.
    The arithmetic is in the dtype of mean/rstd: with 16-bit x and out, on float32 copies of the rows."""
    xp = get_array_module(x)
    C = x.shape[-1]
    upcast = x.dtype != mean.dtype

    def rows(lo, hi, _w):
        xs, o, m, r = x[lo:hi], out[lo:hi], mean[lo:hi], rstd[lo:hi]
        if upcast:
            xs = xs.astype(mean.dtype)
            o = xp.empty_like(xs)
        xs.mean(axis=-1, out=m)
        xp.subtract(xs, m[:, None], out=o)  # xc
        var = _rowdot(o, o) / C
        xp.sqrt(var + eps, out=r)
        xp.divide(1.0, r, out=r)
        o *= r[:, None]  # xhat
        o *= w
        o += bias
        if upcast:
            out[lo:hi] = o  # rounded to 16 bits once

    _in_threads(x.shape[0], rows, threads)


def _layernorm_bwd(dout, x, mean, rstd, w, dx, dw, db, scratch, threads=1):
    """LayerNorm backward (see layers/layernorm.py): dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dout * w.
    dw += sum(dout * xhat), db += sum(dout) (each thread sums its rows, then the partial sums are added).
    `scratch` is (n, C). The arithmetic is in the dtype of mean/rstd (float32 copies of 16-bit rows)."""
    xp = get_array_module(dout)
    C = x.shape[-1]
    partial = [None] * max(threads, 1)
    upcast = x.dtype != mean.dtype

    def rows(lo, hi, worker):
        d, xhat, g, r = dout[lo:hi], scratch[lo:hi], dx[lo:hi], rstd[lo:hi]
        if upcast:
            d = d.astype(mean.dtype)
            xhat, g = xp.empty_like(d), xp.empty_like(d)
        xp.subtract(x[lo:hi], mean[lo:hi, None], out=xhat)
        xhat *= r[:, None]
        col_db = d.sum(axis=0)
        col_dw = xp.einsum("ij,ij->j", d, xhat) if xp is np else (d * xhat).sum(axis=0)  # column sums
        partial[worker] = (col_dw, col_db)
        xp.multiply(d, w, out=g)  # g
        g_mean = g.mean(axis=-1)
        gx_mean = _rowdot(g, xhat) / C
        g -= g_mean[:, None]
        xhat *= gx_mean[:, None]
        g -= xhat
        g *= r[:, None]
        if upcast:
            dx[lo:hi] = g

    _in_threads(x.shape[0], rows, threads)
    for part in partial:
        if part is not None:
            dw += part[0]
            db += part[1]


def _gelu_fwd(x, out, scratch, threads=1):
    """out = 0.5 x (1 + tanh(s (x + a x^3))), in row blocks of scratch's height so the temporaries stay
    in cache; each thread takes a share of the rows and its own scratch (scratch[worker]). With 16-bit
    x the arithmetic runs on a float32 copy of each block (scratch then holds two more blocks)."""
    _in_threads(x.shape[0], lambda lo, hi, w: _gelu_fwd_rows(x[lo:hi], out[lo:hi], scratch[w]), threads)


def _gelu_fwd_rows(x, out, scratch):
    xp = get_array_module(x)
    (n, width), block = x.shape, scratch.shape[0]
    for i in range(0, n, block):
        xb, ob = x[i : i + block], out[i : i + block]
        u = scratch[: xb.shape[0], :width]
        if xb.dtype != scratch.dtype:  # 16-bit: compute on a float32 copy, round once at the end
            x32 = scratch[: xb.shape[0], 2 * width : 3 * width]
            x32[...] = xb
            xb = x32
        xp.multiply(xb, xb, out=u)
        u *= GELU_CUBIC
        u += 1.0
        u *= xb
        u *= GELU_SCALE  # s (x + a x^3)
        xp.tanh(u, out=u)
        u += 1.0
        if ob.dtype == u.dtype:
            xp.multiply(xb, u, out=ob)
            ob *= 0.5
        else:
            u *= xb
            u *= 0.5
            ob[...] = u


def _gelu_bwd(d, x, scratch, threads=1):
    """d *= gelu'(x), in place, in row blocks (scratch[worker] holds two blocks side by side):
    gelu'(x) = 0.5 (1 + th) + 0.5 s x (1 + 3 a x^2) (1 - th^2),  th = tanh(s (x + a x^3))."""
    _in_threads(x.shape[0], lambda lo, hi, w: _gelu_bwd_rows(d[lo:hi], x[lo:hi], scratch[w]), threads)


def _gelu_bwd_rows(d, x, scratch):
    xp = get_array_module(d)
    (n, width), block = x.shape, scratch.shape[0]
    for i in range(0, n, block):
        xb, db = x[i : i + block], d[i : i + block]
        rows = xb.shape[0]
        x2, th = scratch[:rows, :width], scratch[:rows, width : 2 * width]
        d16 = None
        if xb.dtype != scratch.dtype:  # 16-bit: compute on float32 copies, round once at the end
            x32, d32 = scratch[:rows, 2 * width : 3 * width], scratch[:rows, 3 * width : 4 * width]
            x32[...] = xb
            d32[...] = db
            xb, d16, db = x32, db, d32
        xp.multiply(xb, xb, out=x2)  # x^2
        xp.multiply(x2, GELU_CUBIC, out=th)
        th += 1.0
        th *= xb
        th *= GELU_SCALE
        xp.tanh(th, out=th)  # th
        x2 *= 3.0 * GELU_CUBIC
        x2 += 1.0
        x2 *= xb
        x2 *= 0.5 * GELU_SCALE  # 0.5 s x (1 + 3 a x^2)
        # local = (1 + th) (0.5 + x2 (1 - th)), since 1 - th^2 = (1 - th)(1 + th)
        th += 1.0
        db *= th  # d (1 + th)
        th -= 2.0
        th *= x2  # -x2 (1 - th)
        th -= 0.5
        db *= th  # d (1 + th) (-0.5 - x2 (1 - th))
        xp.negative(db, out=db)
        if d16 is not None:
            d16[...] = db


def _cross_entropy_inplace(logits, targets, want_grad, threads=1, dloss=1.0, block=LOSS_ROWS):
    """Mean cross-entropy of rows of `logits` (n, V); with want_grad, leaves dloss * (softmax - onehot) / n
    in `logits` (the gradient of dloss times the mean loss). Block of rows by block, so each block stays
    in cache on the CPU; the threads take shares of the rows and their partial sums are added at the end.
    16-bit logits are worked on in float32 copies of each block, and the gradient is rounded once."""
    xp = get_array_module(logits)
    n = logits.shape[0]
    partial = [0.0] * max(threads, 1)
    rows_all = xp.arange(n)
    upcast = is_low_precision(logits.dtype)

    def rows(lo, hi, worker):
        total = 0.0
        for i in range(lo, hi, block):
            z16 = logits[i : min(i + block, hi)]  # (rows, V)
            z = z16.astype(np.float32) if upcast else z16
            r = z.shape[0]
            tgt = targets[i : i + r]
            z -= z.max(axis=-1, keepdims=True)
            target_z = z[rows_all[:r], tgt]  # shifted logit of the target
            xp.exp(z, out=z)
            s = z.sum(axis=-1)
            total += (xp.log(s) - target_z).sum(dtype=np.float64)  # stays on the device until the end
            if want_grad:
                z /= s[:, None]  # probabilities
                z[rows_all[:r], tgt] -= 1.0
                z *= z.dtype.type(dloss / n)
                if upcast:
                    z16[...] = z
        partial[worker] = total

    _in_threads(n, rows, threads)
    return float(sum(partial)) / n
