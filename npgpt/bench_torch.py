"""The PyTorch twin for `npgpt bench --vs-torch`: the same GPT-2, weights, batch and AdamW in PyTorch eager
(through transformers' GPT2LMHeadModel), optionally under torch.compile, on the CPU or a CUDA GPU.

This is the only module of npgpt that imports torch, and nothing else in the package imports it: npgpt's
own forward and backward never use an autograd library. It needs the optional extra `npgpt[parity]`.
"""

from __future__ import annotations

import contextlib
import time

import numpy as np
import torch
import transformers

from .backend import to_numpy

# precision name -> the dtype torch.autocast runs the matrix products in (None: no autocast, float32)
AUTOCAST_DTYPES = {"fp32": None, "tf32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class TorchStep:
    """The same model, weights and AdamW (same decay groups) in PyTorch, through transformers.

    step = TorchStep(model, "sdpa", device="cuda", precision="bf16", compile=True)
    loss = step(x, y)   # x, y: (B, T) NumPy int arrays; one forward, backward and AdamW step

    precision: "fp32" (true float32 products, TF32 off), "tf32" (float32 with TF32 tensor-core products;
    CUDA only), "bf16" or "fp16" (torch.autocast around forward and loss, float32 master weights and
    optimizer; fp16 adds a GradScaler). Under autocast every matrix product runs in 16 bits and the
    float32 leftovers (LayerNorm, softmax statistics, the loss) in true float32. The TF32 switches are
    process-wide torch settings, so the last TorchStep built sets them for all.
    compile: run forward and loss through torch.compile (compiled on the first call, so warm up).
    """

    def __init__(self, model, attn: str, lr=1e-4, threads: int | None = None, device: str = "cpu",
                 precision: str = "fp32", compile: bool = False):  # fmt: skip
        if precision not in AUTOCAST_DTYPES:
            raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(AUTOCAST_DTYPES)}")
        if device not in ("cpu", "cuda"):
            raise ValueError(f"unknown device {device!r}; choose 'cpu' or 'cuda'")
        if precision == "tf32" and device != "cuda":
            raise ValueError("TF32 is a GPU mode; use precision='fp32' on the CPU")
        if device == "cuda" and not torch.cuda.is_available():
            raise ValueError("this PyTorch has no CUDA device; install a CUDA build of torch or use device='cpu'")
        if threads:
            torch.set_num_threads(threads)
        self.device, self.precision = device, precision
        self.amp_dtype = AUTOCAST_DTYPES[precision]
        _set_torch_tf32(precision == "tf32")

        hf_cfg = {**model.config.to_hf_config(), "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
        hf_cfg.pop("architectures", None)
        cfg = transformers.GPT2Config(**hf_cfg, attn_implementation=attn)
        self.hf = transformers.GPT2LMHeadModel(cfg)
        state = {}
        for k, v in model.params.items():
            state[k if k == "lm_head.weight" else f"transformer.{k}"] = torch.from_numpy(to_numpy(v).copy())
        if not model.config.qkv_bias:
            for i in range(model.config.n_layers):
                state[f"transformer.h.{i}.attn.c_attn.bias"] = torch.zeros(3 * model.config.emb_dim)
        missing, unexpected = self.hf.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith(("attn.bias", "attn.masked_bias")) and k != "lm_head.weight"]
        if missing or unexpected:
            raise RuntimeError(f"torch twin does not match: missing {missing}, unexpected {unexpected}")
        self.hf.to(device).train()
        params = dict(self.hf.named_parameters())
        groups = [{"params": [p for p in params.values() if p.dim() >= 2], "weight_decay": 0.1},
                  {"params": [p for p in params.values() if p.dim() < 2], "weight_decay": 0.0}]  # fmt: skip
        self.opt = torch.optim.AdamW(groups, lr=lr)
        self.scaler = torch.amp.GradScaler(device) if precision == "fp16" else None

        self.loss_fn = self._forward_loss
        if compile:
            if not hasattr(torch, "compile"):
                raise ValueError(f"torch.compile needs PyTorch 2.0 or newer, this is {torch.__version__}: pip install -U torch")
            try:
                self.loss_fn = torch.compile(self._forward_loss)
            except RuntimeError as e:  # e.g. a Python version this torch's compiler does not support
                raise ValueError(f"torch.compile is unavailable here ({e}); drop --torch-compile") from None
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()

    def _forward_loss(self, x, y):
        """Forward and mean cross-entropy: the part torch.compile wraps, so the loss fuses with the head."""
        logits = self.hf(x, use_cache=False).logits
        return torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))

    def _autocast(self):
        """torch.autocast to the 16-bit dtype for bf16/fp16; a context that does nothing for fp32/tf32."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device, dtype=self.amp_dtype)

    def __call__(self, x, y, training=None, rng=None) -> float:
        """One training step on the host batch (x, y); returns the loss. On CUDA it waits for the GPU to
        finish the step, so wall-clock timing around the call is honest."""
        x = torch.as_tensor(np.asarray(x), dtype=torch.long, device=self.device)
        y = torch.as_tensor(np.asarray(y), dtype=torch.long, device=self.device)
        self.opt.zero_grad(set_to_none=True)
        with self._autocast():
            loss = self.loss_fn(x, y)
        if self.scaler is None:
            loss.backward()
            self.opt.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
        if self.device == "cuda":
            torch.cuda.synchronize()
        return loss.item()

    def peak_memory_mb(self) -> float:
        """Peak memory torch's allocator handed out on the GPU since this twin was built (MB): every
        torch tensor in the process counts, so with two twins alive it covers both."""
        if self.device != "cuda":
            raise ValueError("peak_memory_mb is for CUDA; on the CPU `npgpt bench` measures peak RSS in a fresh process")
        return torch.cuda.max_memory_allocated() / 2**20

    def generate(self, prompt, n_new: int):
        """Greedy decoding with transformers' generate and its KV cache, float32 weights, no autocast
        -> (ids as a NumPy array, seconds)."""
        hf = self.hf.eval()
        prompt = torch.as_tensor(np.asarray(prompt), dtype=torch.long, device=self.device)
        kw = dict(do_sample=False, max_new_tokens=n_new, min_new_tokens=n_new, use_cache=True, pad_token_id=0)
        with torch.no_grad():
            hf.generate(prompt, **{**kw, "max_new_tokens": 2, "min_new_tokens": 2})  # warm up
            t0 = time.perf_counter()
            ids = hf.generate(prompt, **kw)
            if self.device == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
        self.hf.train()
        return ids.cpu().numpy(), seconds


def _set_torch_tf32(enabled: bool) -> None:
    """TF32 for torch's float32 matrix products and convolutions on CUDA, or true float32 ("highest")."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    if not enabled:
        torch.set_float32_matmul_precision("highest")
