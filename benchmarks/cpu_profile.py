"""Where a CPU training step of npgpt goes, and how fast this machine's GEMMs are in NumPy and PyTorch.

    python benchmarks/cpu_profile.py            # 124M, B=2, T=256: the issue's configuration

Prints (1) the fast engine's step split into GEMM time (every np.matmul, timed), the rest of the
forward/backward (elementwise work, copies, reductions) and AdamW, and that rest op by op (each fast op
the step calls, its GEMMs subtracted); (2) GFLOP/s of the model's GEMM shapes in NumPy (OpenBLAS) and
PyTorch (its own BLAS, MKL on x86 builds), same threads, same process. The second table needs torch (the
parity extra); it is skipped without it.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def best_of(fn, repeats=7) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def step_breakdown(preset: str, B: int, T: int, steps: int) -> None:
    import npgpt
    from npgpt.engine import FastLossAndGrads

    model = npgpt.GPT(npgpt.GPTConfig.from_preset(preset, drop_rate=0.0), seed=0)
    model.flatten_params_()
    opt = npgpt.AdamW(model.params, lr=1e-4, weight_decay=0.1)
    step = FastLossAndGrads(model, B, T)
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, model.config.vocab_size, (B, T)), rng.integers(0, model.config.vocab_size, (B, T))
    real_matmul = np.matmul
    acc = {"s": 0.0, "flop": 0.0}
    per_op = {}

    def timed_matmul(a, b, out=None):
        t0 = time.perf_counter()
        r = real_matmul(a, b, out=out)
        acc["s"] += time.perf_counter() - t0
        acc["flop"] += 2.0 * a.size * b.shape[-1]
        return r

    def timed_op(name, fn):  # the op's time without the GEMMs it runs
        def run(*args, **kw):
            g0, t0 = acc["s"], time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                per_op[name] = per_op.get(name, 0.0) + time.perf_counter() - t0 - (acc["s"] - g0)

        return run

    import dataclasses

    from npgpt import fast

    originals = {k: getattr(fast, k) for k in fast.__all__ if callable(getattr(fast, k)) and k.endswith(("_forward", "_backward", "_backward_", "_", "_grad"))}
    ops = {f.name: getattr(step.ops, f.name) for f in dataclasses.fields(step.ops) if getattr(step.ops, f.name) is not None}
    step(x, y)
    opt.step(step.grads)
    rows = []
    np.matmul = timed_matmul
    for k, fn in originals.items():
        setattr(fast, k, timed_op(k, fn))
    for k, fn in ops.items():
        object.__setattr__(step.ops, k, timed_op(k, fn))
    try:
        for _ in range(steps):
            acc.update(s=0.0, flop=0.0)
            t0 = time.perf_counter()
            step(x, y)
            t1 = time.perf_counter()
            opt.step(step.grads)
            t2 = time.perf_counter()
            rows.append((t2 - t0, acc["s"], t1 - t0 - acc["s"], t2 - t1, acc["flop"]))
    finally:
        np.matmul = real_matmul
        for k, fn in originals.items():
            setattr(fast, k, fn)
        for k, fn in ops.items():
            object.__setattr__(step.ops, k, fn)
    total, gemm, rest, adamw, flop = np.median(np.array(rows), axis=0)
    print(f"fast engine, {preset}, B={B} T={T} (median of {steps} steps):")
    print(f"  whole step              {total * 1e3:8.0f} ms")
    print(f"  GEMMs (np.matmul)       {gemm * 1e3:8.0f} ms  {100 * gemm / total:4.0f}%   {flop / 1e9:.0f} GFLOP at {flop / gemm / 1e9:.0f} GFLOP/s")
    print(f"  rest of fwd+bwd         {rest * 1e3:8.0f} ms  {100 * rest / total:4.0f}%   (GELU, LayerNorm, softmaxes, loss, copies)")
    print(f"  AdamW                   {adamw * 1e3:8.0f} ms  {100 * adamw / total:4.0f}%")
    print("  the rest, op by op (each fast op the step calls, its own GEMMs subtracted):")
    for name, sec in sorted(per_op.items(), key=lambda kv: -kv[1]):
        if sec / steps >= 5e-4:
            print(f"    {name:30s} {sec / steps * 1e3:8.1f} ms")


def gemm_table(C: int, V: int, N: int) -> None:
    try:
        import torch
    except ImportError:
        print("(torch not installed: no NumPy / PyTorch GEMM comparison)")
        return
    from threadpoolctl import threadpool_info

    threads = next((p["num_threads"] for p in threadpool_info() if p.get("user_api") == "blas"), 1)
    torch.set_num_threads(threads)
    print(f"\nGEMM GFLOP/s with {threads} threads, NumPy {np.__version__} vs PyTorch {torch.__version__}:")
    shapes = {"c_attn  x @ W": (N, C, 3 * C), "c_fc    x @ W": (N, C, 4 * C), "c_proj  x @ W": (N, 4 * C, C),
              "head    x @ wte.T": (N, C, V), "square  2048^3": (2048, 2048, 2048)}  # fmt: skip
    for warmup in (True, False):  # one silent round first: thread pools start and caches settle
        for name, (m, k, n) in shapes.items():
            _gemm_row(name, m, k, n, torch, quiet=warmup)


def _gemm_row(name, m, k, n, torch, quiet):
    a = np.random.default_rng(0).standard_normal((m, k), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((k, n), dtype=np.float32)
    o = np.empty((m, n), dtype=np.float32)
    ta, tb, to = torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(o)
    s_np = best_of(lambda: np.matmul(a, b, out=o))
    s_t = best_of(lambda: torch.mm(ta, tb, out=to))
    flop = 2.0 * m * k * n
    if not quiet:
        print(f"  {name:18s} ({m}x{k}x{n:>5})  numpy {flop / s_np / 1e9:6.1f}   torch {flop / s_t / 1e9:6.1f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gpt2")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--context-length", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    step_breakdown(args.preset, args.batch_size, args.context_length, args.steps)
    from npgpt.config import GPTConfig

    cfg = GPTConfig.from_preset(args.preset)
    gemm_table(cfg.emb_dim, cfg.vocab_size, args.batch_size * args.context_length)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
