"""The PyTorch twin for `npgpt bench --vs-torch`: the same GPT-2, weights, batch and AdamW in PyTorch eager
(through transformers' GPT2LMHeadModel).

This is the only module of npgpt that imports torch, and nothing else in the package imports it: npgpt's
own forward and backward never use an autograd library. It needs the optional extra `npgpt[parity]`.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import transformers


class TorchStep:
    """The same model, weights and AdamW (same decay groups) in PyTorch eager, through transformers."""

    def __init__(self, model, attn: str, lr=1e-4, threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        hf_cfg = {**model.config.to_hf_config(), "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
        hf_cfg.pop("architectures", None)
        cfg = transformers.GPT2Config(**hf_cfg, attn_implementation=attn)
        self.hf = transformers.GPT2LMHeadModel(cfg)
        state = {}
        for k, v in model.params.items():
            state[k if k == "lm_head.weight" else f"transformer.{k}"] = torch.from_numpy(np.array(v))
        if not model.config.qkv_bias:
            for i in range(model.config.n_layers):
                state[f"transformer.h.{i}.attn.c_attn.bias"] = torch.zeros(3 * model.config.emb_dim)
        missing, unexpected = self.hf.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith(("attn.bias", "attn.masked_bias")) and k != "lm_head.weight"]
        if missing or unexpected:
            raise RuntimeError(f"torch twin does not match: missing {missing}, unexpected {unexpected}")
        self.hf.train()
        params = dict(self.hf.named_parameters())
        groups = [{"params": [p for p in params.values() if p.dim() >= 2], "weight_decay": 0.1},
                  {"params": [p for p in params.values() if p.dim() < 2], "weight_decay": 0.0}]  # fmt: skip
        self.opt = torch.optim.AdamW(groups, lr=lr)

    def __call__(self, x, y, training=None, rng=None) -> float:
        self.opt.zero_grad(set_to_none=True)
        logits = self.hf(torch.as_tensor(x)).logits
        loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), torch.as_tensor(y).view(-1))
        loss.backward()
        self.opt.step()
        return loss.item()

    def generate(self, prompt, n_new: int):
        """Greedy decoding with transformers' generate and its KV cache -> (ids, seconds)."""
        hf = self.hf.eval()
        kw = dict(do_sample=False, max_new_tokens=n_new, min_new_tokens=n_new, use_cache=True, pad_token_id=0)
        with torch.no_grad():
            hf.generate(torch.as_tensor(prompt), **{**kw, "max_new_tokens": 2, "min_new_tokens": 2})  # warm up
            t0 = time.perf_counter()
            ids = hf.generate(torch.as_tensor(prompt), **kw).numpy()
            seconds = time.perf_counter() - t0
        self.hf.train()
        return ids, seconds
