"""`npgpt bench`: time a full training step (forward, backward, AdamW) and greedy generation.

    npgpt bench                                   # 124M, B=2, T=256, float32, on the CPU
    npgpt bench --vs-torch                        # the same model, weights and batch in PyTorch eager
    npgpt bench --preset nano --engine both       # fast engine against the readable reference
    npgpt bench --device cuda --batch-size 8 --context-length 1024 --precision bf16 --vs-torch --torch-compile

Reported for the training step: ms per step (median of --steps, after --warmup), tokens/s, achieved
GFLOP/s from the model's FLOPs (6 per parameter per token for the matrix multiplies, the tied head
included, plus 12 L T C per token for attention's two products), and on the CPU "CPU MFU": that rate
divided by the peak sgemm rate measured in the same run with a large np.matmul; on a GPU, MFU against
the data sheet's dense peak for the precision in use (GPU_PEAKS). With --vs-torch the npgpt and PyTorch
steps alternate in one process (same thread count, same device, same precision: --precision bf16/fp16
is torch.autocast there, fp32 follows --tf32/--no-tf32) and the ratios are printed; --torch-compile adds
a torch.compile twin beside eager. On the CPU the peak memory of each is measured in a fresh subprocess
(peak resident set size), so neither inherits the other's allocations; on a GPU the run prints what
CuPy's memory pool held and torch's peak allocated. Generation: greedy decoding with the KV cache
against transformers' generate.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
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
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="matrix products in float32 (TF32 on a GPU unless --no-tf32) or mixed precision, bf16/fp16 "
                        "with float32 master weights (the same torch.autocast in the --vs-torch twin)")  # fmt: skip
    p.add_argument("--engine", choices=["fast", "reference", "both"], default="fast")
    p.add_argument("--drop-rate", type=float, default=0.0, help="dropout during the timed steps (default off)")
    p.add_argument("--threads", type=int, help="BLAS (and torch) threads (default: as configured)")
    p.add_argument("--vs-torch", action="store_true", help="also run the same step in PyTorch eager (transformers' GPT-2)")
    p.add_argument("--torch-attn", choices=["sdpa", "eager"], default="sdpa", help="transformers' attention implementation")
    p.add_argument("--torch-compile", action="store_true", help="with --vs-torch, also time a torch.compile twin beside eager")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory subprocesses")
    p.add_argument("--generate", type=int, default=50, metavar="N", help="greedy tokens to generate (0: skip)")
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    p.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True, help="TF32 matrix products on the GPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--memory-worker", choices=["npgpt", "torch"], help=argparse.SUPPRESS)


def flops_per_token(config, T: int) -> float:
    """Training FLOPs per token: 6 * (matmul parameters) + 12 * L * T * C (attention scores and mixing).

    Half of the attention products are masked in a causal model; the formula counts them anyway, as
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


# Dense (no sparsity) peaks in GFLOP/s of common GPUs, from NVIDIA's data sheets (SXM parts): float32,
# TF32 tensor cores, and 16-bit (bf16 and fp16, which are the same) tensor cores.
GPU_PEAKS = {
    "H200": {"fp32": 67_000, "tf32": 494_700, "16-bit": 989_400},
    "H100": {"fp32": 67_000, "tf32": 494_700, "16-bit": 989_400},
    "A100": {"fp32": 19_500, "tf32": 156_000, "16-bit": 312_000},
    "L4": {"fp32": 30_300, "tf32": 60_600, "16-bit": 121_000},
}


def peak_kind(precision: str, tf32: bool) -> str:
    """Which GPU_PEAKS column bounds a step: bf16/fp16 -> "16-bit"; fp32 -> "tf32" with TF32 on, else "fp32"."""
    if precision in ("bf16", "fp16"):
        return "16-bit"
    if precision == "fp32":
        return "tf32" if tf32 else "fp32"
    raise ValueError(f"unknown precision {precision!r}; choose fp32, bf16 or fp16")


def peak_for_name(name: str, precision: str, tf32: bool) -> float | None:
    """The dense peak (GFLOP/s) of the GPU called `name` (as CUDA reports it, e.g. "NVIDIA H100 80GB
    HBM3") for this precision, or None when no GPU_PEAKS key is a whole word of the name (an L40S is
    not an L4)."""
    kind = peak_kind(precision, tf32)
    for key, peaks in GPU_PEAKS.items():
        if re.search(rf"\b{key}\b", name):
            return peaks[kind]
    return None


def gpu_peak_gflops(precision: str, tf32: bool) -> float | None:
    """The dense peak of the GPU in use for this precision, when its name is in GPU_PEAKS."""
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    return peak_for_name(name, precision, tf32)


def torch_precision(precision: str, tf32: bool) -> str:
    """The TorchStep precision that matches npgpt's: fp32 -> "tf32" with TF32 on, else "fp32" (true
    float32); bf16 and fp16 -> the same autocast. Pass tf32=False on the CPU, where TF32 does not exist."""
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"unknown precision {precision!r}; choose fp32, bf16 or fp16")
    if precision == "fp32":
        return "tf32" if tf32 else "fp32"
    return precision


def peak_rss_mb() -> float:
    from .train import peak_rss_mb as rss

    return rss()


# --- the steps being timed ------------------------------------------------------------------------------


def make_batch(config, B, T, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, config.vocab_size, size=(B, T)), rng.integers(0, config.vocab_size, size=(B, T))


class NpgptStep:
    """npgpt's training step (the fast engine or the readable reference) with AdamW, timed by time_steps.

    precision: "fp32", or "bf16"/"fp16" mixed precision, which only the fast engine runs. fp16 scales the
    loss as `npgpt train` does (precision.LossScaler: unscale the float32 gradients, skip the update on
    an overflow), the work torch's GradScaler does in the --vs-torch twin."""

    def __init__(self, model, B, T, engine: str, lr=1e-4, precision: str = "fp32"):
        from .engine import TrainStep
        from .optim import AdamW
        from .precision import LossScaler

        if precision != "fp32" and engine != "fast":
            raise ValueError(f"--precision {precision} runs in the fast engine only; use --engine fast")
        self.model, self.engine_name, self.precision = model, engine, precision
        if engine == "fast":
            model.flatten_params_()
        self.opt = AdamW(model.params, lr=lr, weight_decay=0.1)
        self.engine = TrainStep(model, B, T, precision=precision) if engine == "fast" else None
        self.scaler = LossScaler() if precision == "fp16" else None

    def __call__(self, x, y, training, rng) -> float:
        xp = self.model.xp
        if self.scaler is not None:
            loss = self.engine(x, y, training=training, rng=rng, dloss=self.scaler.scale)
            g = self.engine.grad_flat
            g *= g.dtype.type(1.0 / self.scaler.scale)  # the true (float32) gradients
            if self.scaler.update(finite=bool(xp.isfinite(g).all())):
                self.opt.step(self.engine.grads)
        elif self.engine is not None:
            loss = self.engine(x, y, training=training, rng=rng)
            self.opt.step(self.engine.grads)
        else:
            _, loss, cache = self.model.forward(x, y, training=training, rng=rng)
            grads = self.model.backward(cache)
            del cache
            self.opt.step(grads)
            loss = float(loss)
        if xp is not np:
            xp.cuda.Stream.null.synchronize()
        return loss


def time_steps(steps: dict, x, y, n_timed, n_warmup, training, seed, xp=np):
    """Alternate the given step functions; median seconds of each, and the first losses."""
    from .model import make_rng

    times = {k: [] for k in steps}
    losses = {k: [] for k in steps}
    for i in range(n_warmup + n_timed):
        for name, fn in steps.items():
            t0 = time.perf_counter()
            loss = fn(x, y, training, make_rng(seed + i, xp))
            dt = time.perf_counter() - t0
            losses[name].append(loss)
            if i >= n_warmup:
                times[name].append(dt)
    return {k: statistics.median(v) for k, v in times.items()}, losses


def memory_worker(args) -> int:
    """Run warmup+steps of one framework in this fresh process and print its peak RSS as JSON."""
    from .config import GPTConfig
    from .model import GPT

    set_threads(args.threads)
    cfg = GPTConfig.from_preset(args.preset, drop_rate=0.0)
    model = GPT(cfg, seed=args.seed, device="cpu", dtype=np.dtype(args.dtype))
    x, y = make_batch(cfg, args.batch_size, args.context_length, args.seed)
    if args.memory_worker == "torch":
        from .bench_torch import TorchStep

        step = TorchStep(model, args.torch_attn, precision=torch_precision(args.precision, tf32=False))
        del model  # the torch twin holds its own copy of the weights
    else:
        engine = "fast" if args.engine == "both" else args.engine
        step = NpgptStep(model, args.batch_size, args.context_length, engine, precision=args.precision)
    for _ in range(2):
        step(x, y, False, None)
    print(json.dumps({"peak_rss_mb": peak_rss_mb()}))
    return 0


def measure_memory(args, framework: str) -> float | None:
    cmd = [sys.executable, "-m", "npgpt", "bench", "--memory-worker", framework, "--preset", args.preset,
           "--batch-size", str(args.batch_size), "--context-length", str(args.context_length), "--dtype", args.dtype,
           "--engine", args.engine, "--torch-attn", args.torch_attn, "--seed", str(args.seed),
           "--precision", args.precision]  # fmt: skip
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "NPGPT_DEVICE": "cpu"})
    if out.returncode != 0:
        print(f"  (memory measurement of {framework} failed: {out.stderr.strip().splitlines()[-1:]})")
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mb"]


def set_threads(n: int | None) -> int:
    """Set NumPy's BLAS threads (and torch's, if imported later by us) to n; return the count in use."""
    from threadpoolctl import threadpool_info, threadpool_limits

    if n:
        threadpool_limits(limits=n, user_api="blas")
    counts = [p["num_threads"] for p in threadpool_info() if p.get("user_api") == "blas"]
    return counts[0] if counts else 1


def bench_generation(model, n_new, n_prompt, seed, torch_step=None):
    """Greedy tokens/s with the KV cache; with torch_step, the same in transformers' generate."""
    rng = np.random.default_rng(seed)
    prompt = rng.integers(0, model.config.vocab_size, size=(1, n_prompt))
    model.generate(prompt, 2, temperature=0.0)  # warm up
    t0 = time.perf_counter()
    ours = model.generate(prompt, n_new, temperature=0.0)
    t_ours = time.perf_counter() - t0
    result = {"npgpt_tokens_per_s": n_new / t_ours}
    if torch_step is not None:
        theirs, t_theirs = torch_step.generate(prompt, n_new)
        result["torch_tokens_per_s"] = n_new / t_theirs
        result["same_tokens"] = bool(np.array_equal(ours, theirs))
    return result


def run(args) -> int:
    if args.memory_worker:
        return memory_worker(args)
    from .config import GPTConfig
    from .model import GPT

    from .backend import set_tf32

    if args.torch_compile and not args.vs_torch:
        raise ValueError("--torch-compile times a torch.compile twin beside --vs-torch's eager one; add --vs-torch")
    if args.torch_compile and args.warmup < 1:
        raise ValueError("--torch-compile compiles during the first step; use --warmup 1 or more so that is not timed")
    if args.vs_torch and args.dtype != "float32":
        raise ValueError("--vs-torch compares float32 models (torch's twin keeps float32 weights; mixed precision "
                         "is --precision bf16/fp16); drop --dtype")  # fmt: skip
    set_tf32(args.tf32)
    threads = set_threads(args.threads)
    cfg = GPTConfig.from_preset(args.preset, drop_rate=args.drop_rate)
    T, B = args.context_length, args.batch_size
    if T > cfg.context_length:
        raise ValueError(f"--context-length {T} exceeds the preset's context_length {cfg.context_length}")
    model = GPT(cfg, seed=args.seed, device=args.device, dtype=np.dtype(args.dtype))
    x, y = make_batch(cfg, B, T, args.seed)
    engines = ["fast", "reference"] if args.engine == "both" else [args.engine]
    steps = {f"npgpt {e}": NpgptStep(GPT(cfg, seed=args.seed, device=args.device, dtype=np.dtype(args.dtype)) if i else model,
                                     B, T, e, precision=args.precision)
             for i, e in enumerate(engines)}  # fmt: skip
    tf32 = args.tf32 and model.device == "cuda"  # TF32 exists only on the GPU
    torch_step = None  # the eager twin, which also runs the generation comparison
    if args.vs_torch:
        try:
            from .bench_torch import TorchStep
        except ImportError:
            raise ValueError("--vs-torch needs PyTorch and transformers: pip install 'npgpt[parity]'") from None
        twins = {f"torch eager ({args.torch_attn})": False}
        if args.torch_compile:
            twins[f"torch.compile ({args.torch_attn})"] = True
        for name, compiled in twins.items():
            steps[name] = TorchStep(model, args.torch_attn, threads=threads, device=model.device,
                                    precision=torch_precision(args.precision, tf32), compile=compiled)  # fmt: skip
        torch_step = steps[f"torch eager ({args.torch_attn})"]
    times, losses = time_steps(steps, x, y, args.steps, args.warmup, args.drop_rate > 0, args.seed, model.xp)
    tokens = B * T
    flops = flops_per_token(cfg, T) * tokens
    precision = args.precision + (" with TF32" if args.precision == "fp32" and tf32 else "")
    print(f"npgpt bench: preset {args.preset} ({model.num_params():,} parameters), B={B} T={T}, {args.dtype}, "
          f"precision {precision}, {model.device}, {threads} BLAS thread(s); "
          f"median of {args.steps} steps after {args.warmup} warm-up")  # fmt: skip
    report = {"preset": args.preset, "B": B, "T": T, "dtype": args.dtype, "precision": args.precision, "tf32": tf32,
              "device": model.device, "threads": threads, "flops_per_step": flops, "steps": {}}  # fmt: skip
    if torch_step is not None:
        report["torch_precision"] = torch_step.precision
    peak = peak_sgemm_gflops(dtype=np.dtype(args.dtype)) if model.device == "cpu" else gpu_peak_gflops(args.precision, tf32)
    if peak:
        report["peak_sgemm_gflops" if model.device == "cpu" else "peak_gpu_gflops"] = peak
    print(f"  {'':28s} {'ms/step':>9s} {'tokens/s':>9s} {'GFLOP/s':>8s} {'MFU':>6s}  first losses")
    for name, sec in times.items():
        gf = flops / sec / 1e9
        mfu = f"{100 * gf / peak:5.1f}%" if peak else "   n/a"
        print(f"  {name:28s} {sec * 1e3:9.1f} {tokens / sec:9.1f} {gf:8.1f} {mfu}  {' '.join(f'{v:.4f}' for v in losses[name][:3])}")
        report["steps"][name] = {"ms": sec * 1e3, "tokens_per_s": tokens / sec, "gflops": gf, "losses": losses[name]}
    if peak and model.device == "cpu":
        print(f"  peak sgemm (2048^3 np.matmul, same process): {peak:.1f} GFLOP/s")
    elif peak:
        kind = {"fp32": "FP32", "tf32": "TF32", "16-bit": args.precision.upper()}[peak_kind(args.precision, tf32)]
        print(f"  MFU against the GPU's dense {kind} peak, {peak / 1e3:.0f} TFLOP/s")
    if model.device == "cuda":
        import cupy

        # CuPy keeps no peak; its pool never gives memory back (nothing in npgpt calls free_all_blocks), so
        # what it holds after the steps is its high-water mark, cached free blocks included. torch's
        # allocator keeps a peak of the memory its tensors held, since the last twin was built.
        pool = cupy.get_default_memory_pool()
        held = pool.total_bytes() / 2**20
        line = f"  GPU memory: npgpt's CuPy pool held {held:,.0f} MB ({pool.used_bytes() / 2**20:,.0f} MB in use after)"
        report["gpu_pool_mb"] = held
        if torch_step is not None:
            report["torch_peak_allocated_mb"] = torch_step.peak_memory_mb()
            line += f"; torch peak allocated {report['torch_peak_allocated_mb']:,.0f} MB"
            line += " (eager and torch.compile twins together)" if args.torch_compile else ""
        print(line)
    first = next(iter(times))
    for name in list(times)[1:]:
        ratio = times[name] / times[first]
        print(f"  {first} is {ratio:.2f}x the throughput of {name}")
        report.setdefault("ratios", {})[f"{first} / {name}"] = ratio
    if args.memory and model.device == "cpu":
        mem = {"npgpt": measure_memory(args, "npgpt")}
        if args.vs_torch:
            mem["torch"] = measure_memory(args, "torch")
        line = ", ".join(f"{k} {v:,.0f} MB" for k, v in mem.items() if v)
        print(f"  peak memory of a training step (fresh process, peak RSS): {line}"
              + (f"; npgpt/torch = {mem['npgpt'] / mem['torch']:.2f}" if mem.get("torch") and mem.get("npgpt") else ""))  # fmt: skip
        report["peak_memory_mb"] = mem
    if args.generate:
        gen = bench_generation(model, args.generate, args.prompt_tokens, args.seed, torch_step)
        line = f"  greedy generation, KV cache, {args.generate} tokens after {args.prompt_tokens}: npgpt {gen['npgpt_tokens_per_s']:.1f} tokens/s"
        if "torch_tokens_per_s" in gen:
            line += (f", transformers generate {gen['torch_tokens_per_s']:.1f} tokens/s "
                     f"(ratio {gen['npgpt_tokens_per_s'] / gen['torch_tokens_per_s']:.2f}; same tokens: {gen['same_tokens']})")  # fmt: skip
        print(line)
        report["generation"] = gen
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0
