"""`npgpt bench`: time a full training step (forward, backward, AdamW) and report throughput.

    npgpt bench --preset gpt2 --batch-size 2 --context-length 256

Reported: ms per step (median of --steps after --warmup), tokens/s, achieved GFLOP/s from the model's
FLOPs per step (6 N per token for the matrix multiplies, N = the parameters used in them including the
tied head, plus 12 L T C per token for attention's two products), and on the CPU "CPU MFU": that rate
divided by the peak sgemm rate measured in the same run with a large np.matmul. Peak memory is the
process's peak resident set size (CPU) or CuPy's peak pool usage (GPU).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="gpt2")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--context-length", type=int, default=256)
    p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--drop-rate", type=float, default=0.0, help="dropout during the timed steps (default off)")
    p.add_argument("--seed", type=int, default=0)


def flops_per_token(config, T: int) -> float:
    """Training FLOPs per token: 6 * (matmul parameters) + 12 * L * T * C (attention scores and mixing).

    For a causal model half of the attention products are masked; the formula counts them anyway, as
    the PaLM paper's MFU definition does, so figures compare with other reports."""
    C, L, V = config.emb_dim, config.n_layers, config.vocab_size
    matmul_params = L * (12 * C * C) + V * C  # c_attn 3C^2, c_proj C^2, c_fc 4C^2, mlp c_proj 4C^2; head V*C
    return 6.0 * matmul_params + 12.0 * L * T * C


def peak_sgemm_gflops(n: int = 2048, repeats: int = 5, dtype=np.float32) -> float:
    """Best observed GFLOP/s of an n x n x n matmul on this machine (NumPy's BLAS, current threads)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32).astype(dtype)
    b = rng.standard_normal((n, n), dtype=np.float32).astype(dtype)
    out = np.empty((n, n), dtype=dtype)
    np.matmul(a, b, out=out)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.matmul(a, b, out=out)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best / 1e9


def time_train_steps(model, optimizer, batch_size, T, steps, warmup, seed=0, training=False):
    """Median seconds of full training steps on random tokens."""
    from .model import make_rng

    xp = model.xp
    rng = np.random.default_rng(seed)
    V = model.config.vocab_size
    x = xp.asarray(rng.integers(0, V, size=(batch_size, T)))
    y = xp.asarray(rng.integers(0, V, size=(batch_size, T)))
    sync = (lambda: xp.cuda.Stream.null.synchronize()) if xp is not np else (lambda: None)
    times, losses = [], []
    for i in range(warmup + steps):
        sync()
        t0 = time.perf_counter()
        _, loss, cache = model.forward(x, y, training=training, rng=make_rng(seed + i, xp))
        grads = model.backward(cache)
        del cache
        optimizer.step(grads)
        del grads
        sync()
        dt = time.perf_counter() - t0
        losses.append(float(loss))
        if i >= warmup:
            times.append(dt)
    return statistics.median(times), losses


def run(args) -> int:
    from .config import GPTConfig
    from .model import GPT
    from .optim import AdamW
    from .train import peak_rss_mb

    cfg = GPTConfig.from_preset(args.preset, drop_rate=args.drop_rate)
    T, B = args.context_length, args.batch_size
    if T > cfg.context_length:
        raise ValueError(f"--context-length {T} exceeds the preset's context_length {cfg.context_length}")
    model = GPT(cfg, seed=args.seed, device=args.device, dtype=np.dtype(args.dtype))
    opt = AdamW(model.params, lr=1e-4, weight_decay=0.1)
    sec, losses = time_train_steps(model, opt, B, T, args.steps, args.warmup, args.seed, training=args.drop_rate > 0)
    tokens = B * T
    gflops = flops_per_token(cfg, T) * tokens / sec / 1e9
    print(f"npgpt bench: preset {args.preset} ({model.num_params():,} parameters), B={B} T={T}, {args.dtype}, {model.device}")
    print(f"  training step     {sec * 1e3:9.1f} ms  (median of {args.steps}, after {args.warmup} warm-up)")
    print(f"  throughput        {tokens / sec:9.1f} tokens/s")
    print(f"  achieved          {gflops:9.1f} GFLOP/s")
    if model.device == "cpu":
        peak = peak_sgemm_gflops(dtype=np.dtype(args.dtype))
        print(f"  peak matmul       {peak:9.1f} GFLOP/s  (2048^3 np.matmul, same process)")
        print(f"  CPU MFU           {100 * gflops / peak:9.1f} %")
        print(f"  peak memory       {peak_rss_mb():9.0f} MB  (process peak RSS)")
    else:
        import cupy

        print(f"  GPU pool in use   {cupy.get_default_memory_pool().total_bytes() / 2**20:9.0f} MB")
    print(f"  losses            {' '.join(f'{v:.3f}' for v in losses)}")
    return 0
