"""Our own PyTorch twin of the chapter-5 run of "Build a Large Language Model (From Scratch)", for the
time and memory comparison of benchmarks/book_ch5.py.

Written here from the book's description of its model and loop (the book's code is not copied): a GPT of
GPT-2 124M's shape with a 256-token context, PyTorch's default initialisation (nn.Embedding N(0, 1),
nn.Linear U(+-1/sqrt(fan_in)), LayerNorm 1 and 0), dropout 0.1 after the embeddings, on the attention
weights and on each residual branch, a q|k|v projection without bias, attention written out (scores,
causal mask, softmax, dropout, weighted sum) as the book does, a tanh GELU, an untied head without bias;
torch.optim.AdamW(model.parameters(), lr=4e-4, weight_decay=0.1) (every parameter decayed, betas
(0.9, 0.999)); the-verdict cut at 90% of its characters, windows of 256 tokens with stride 256, a
shuffled drop_last train loader of batch 2; 10 epochs; after the first step and every 5 steps after it,
the train and val losses evaluated in eval mode on up to 5 batches of each loader; a 50-token greedy
sample of "Every effort moves you" at the end of each epoch. The tokens come from npgpt's GPT-2 BPE
(the same ranks as tiktoken's "gpt2"), so the data are the book's.

    python benchmarks/book_ch5_torch.py --json out.json [--epochs 10] [--seed 123] [--max-steps N]

Writes {"evals": [[book_step, train, val], ...], "sample", "seconds" (the loop), "step_ms" (each update),
"peak_memory_mb" (VmHWM of this process), "threads"}.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from torch import nn

from npgpt.data import bundled_path, read_text, split_text_ids
from npgpt.metrics import peak_rss_mb
from npgpt.tokenizer import decode, encode

CFG = dict(vocab_size=50257, context_length=256, emb_dim=768, n_heads=12, n_layers=12, drop_rate=0.1)


class Attention(nn.Module):
    def __init__(self, C: int, NH: int, T: int, p: float):
        super().__init__()
        self.NH = NH
        self.q, self.k, self.v = (nn.Linear(C, C, bias=False) for _ in range(3))
        self.out = nn.Linear(C, C)
        self.drop = nn.Dropout(p)
        self.register_buffer("future", torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1), persistent=False)

    def forward(self, x):  # (B, T, C) -> (B, T, C)
        B, T, C = x.shape
        heads = [f(x).view(B, T, self.NH, C // self.NH).transpose(1, 2) for f in (self.q, self.k, self.v)]
        q, k, v = heads  # (B, NH, T, hs) each
        scores = q @ k.transpose(2, 3)  # (B, NH, T, T)
        scores = scores.masked_fill(self.future[:T, :T], -math.inf)
        weights = self.drop(torch.softmax(scores / math.sqrt(k.shape[-1]), dim=-1))
        y = (weights @ v).transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.out(y)


class Block(nn.Module):
    def __init__(self, C: int, NH: int, T: int, p: float):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(C), nn.LayerNorm(C)
        self.attn = Attention(C, NH, T, p)
        self.mlp = nn.Sequential(nn.Linear(C, 4 * C), nn.GELU(approximate="tanh"), nn.Linear(4 * C, C))
        self.drop = nn.Dropout(p)

    def forward(self, x):
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.mlp(self.ln2(x)))


class TwinGPT(nn.Module):
    def __init__(self, vocab_size, context_length, emb_dim, n_heads, n_layers, drop_rate):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab_size, emb_dim), nn.Embedding(context_length, emb_dim)
        self.drop = nn.Dropout(drop_rate)
        self.blocks = nn.Sequential(*[Block(emb_dim, n_heads, context_length, drop_rate) for _ in range(n_layers)])
        self.ln_f = nn.LayerNorm(emb_dim)
        self.head = nn.Linear(emb_dim, vocab_size, bias=False)

    def forward(self, idx):  # (B, T) -> (B, T, V)
        T = idx.shape[1]
        x = self.drop(self.tok(idx) + self.pos(torch.arange(T, device=idx.device)))
        return self.head(self.ln_f(self.blocks(x)))


def windows(ids, T: int, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    starts = range(0, len(ids) - T, stride)
    ids = torch.as_tensor(ids.astype("int64"))
    return torch.stack([ids[s : s + T] for s in starts]), torch.stack([ids[s + 1 : s + T + 1] for s in starts])


def batches(x, y, batch_size: int, shuffle: bool, drop_last: bool, generator=None):
    """One pass of a DataLoader-like iterator over (x, y) rows."""
    order = torch.randperm(len(x), generator=generator) if shuffle else torch.arange(len(x))
    stop = len(x) - len(x) % batch_size if drop_last else len(x)
    for i in range(0, stop, batch_size):
        sel = order[i : i + batch_size]
        yield x[sel], y[sel]


def batch_loss(model, x, y):
    logits = model(x)
    return nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())


@torch.no_grad()
def loader_loss(model, loader, n_batches: int) -> float:
    losses = [batch_loss(model, x, y).item() for _, (x, y) in zip(range(n_batches), loader)]
    return sum(losses) / len(losses)


@torch.no_grad()
def greedy(model, prompt: str, n: int, T: int) -> str:
    idx = torch.tensor([encode(prompt)])
    for _ in range(n):
        nxt = model(idx[:, -T:])[:, -1].argmax(-1, keepdim=True)
        idx = torch.cat([idx, nxt], dim=1)
    return decode(idx[0].tolist())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--seed", type=int, default=123)
    ap.add_argument("--max-steps", type=int, help="stop after this many updates (a shorter timing run)")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    train_ids, val_ids = split_text_ids([read_text(bundled_path("the-verdict"))], 0.9)
    T = CFG["context_length"]
    train_xy, val_xy = windows(train_ids, T, T), windows(val_ids, T, T)
    model = TwinGPT(**CFG)
    opt = torch.optim.AdamW(model.parameters(), lr=4e-4, weight_decay=0.1)
    evals, sample, step, step_ms = [], "", 0, []
    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        if args.max_steps is not None and step >= args.max_steps:
            break
        model.train()
        for x, y in batches(*train_xy, 2, shuffle=True, drop_last=True):
            if args.max_steps is not None and step >= args.max_steps:
                break
            t_step = time.perf_counter()
            opt.zero_grad()
            batch_loss(model, x, y).backward()
            opt.step()
            step += 1
            step_ms.append(1e3 * (time.perf_counter() - t_step))
            if (step - 1) % 5 == 0:  # the book's "Step 000000" is the state after one update
                model.eval()
                train = loader_loss(model, batches(*train_xy, 2, shuffle=True, drop_last=True), 5)
                val = loader_loss(model, batches(*val_xy, 2, shuffle=False, drop_last=False), 5)
                model.train()
                evals.append([step - 1, train, val])
                print(f"Ep {epoch + 1} (Step {step - 1:06d}): Train loss {train:.3f}, Val loss {val:.3f}", flush=True)
        model.eval()
        sample = greedy(model, "Every effort moves you", 50, T)
        print(sample.replace("\n", " "), flush=True)
    seconds = time.perf_counter() - t0
    result = dict(evals=evals, sample=sample, seconds=seconds, peak_memory_mb=peak_rss_mb(), threads=torch.get_num_threads(),
                  torch=torch.__version__, steps=step, step_ms=step_ms)  # fmt: skip
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(f"{step} steps in {seconds:.1f} s, peak memory {result['peak_memory_mb']:.0f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
