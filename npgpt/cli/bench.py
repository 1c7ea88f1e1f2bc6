"""`npgpt bench`: time a full training step (forward, backward, AdamW) and greedy generation.

    npgpt bench                                   # 124M, B=2, T=256, float32, on the CPU
    npgpt bench --vs-torch                        # the same model, weights and batch in PyTorch eager
    npgpt bench --preset nano --engine both       # fast engine against the readable reference
    npgpt bench --device cuda --batch-size 8 --context-length 1024 --precision bf16 --vs-torch --torch-compile

What is measured and how: npgpt/bench.py. With --vs-torch the npgpt and PyTorch steps alternate in one
process (same thread count, same device, same precision: --precision bf16/fp16 is torch.autocast there,
fp32 follows --tf32/--no-tf32) and the ratios are printed; --torch-compile adds a torch.compile twin
beside eager. --isolate (CPU) times each instead in its own fresh process, one after the other
(--rounds times, alternating), so none shares a process, a heap or a warm cache with another. On the
CPU the peak memory of each is measured in a fresh subprocess (peak resident set size; with --isolate,
the timed ones), so neither inherits the other's allocations; on a GPU the run prints what CuPy's
memory pool held and torch's peak allocated. Generation: greedy decoding with the KV cache against transformers' generate.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

import numpy as np

from ..atomic import atomic_write_json
from ..backend import set_tf32, tf32_mode
from ..bench import (
    NpgptStep,
    bench_generation,
    describe_peak,
    flops_per_token,
    gpu_name,
    gpu_part,
    gpu_peak_gflops,
    make_batch,
    peak_sgemm_gflops,
    set_threads,
    time_steps,
    torch_precision,
)
from ..config import GPTConfig
from ..metrics import peak_rss_mb
from ..model import GPT


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
    p.add_argument("--recompute", choices=["none", "attention", "mlp", "block"], default="none",
                   help="the fast engine's activation recompute (see npgpt train --help)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the memory estimate, the largest batch that fits and the FLOPs; time nothing")
    p.add_argument("--drop-rate", type=float, default=0.0, help="dropout during the timed steps (default off)")
    p.add_argument("--threads", type=int, help="BLAS (and torch) threads (default: as configured)")
    p.add_argument("--vs-torch", action="store_true", help="also run the same step in PyTorch eager (transformers' GPT-2)")
    p.add_argument("--torch-attn", choices=["sdpa", "eager"], default="sdpa", help="transformers' attention implementation")
    p.add_argument("--torch-compile", action="store_true", help="with --vs-torch, also time a torch.compile twin beside eager")
    p.add_argument("--isolate", action="store_true",
                   help="time each library (and engine) in its own fresh process, one after the other, instead of "
                        "alternating their steps in one process (CPU only)")
    p.add_argument("--rounds", type=int, default=1,
                   help="with --isolate: run the processes this many times, the libraries alternating; the median "
                        "is taken over every round's timed steps, and each round's ratios are printed")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory subprocesses")
    p.add_argument("--generate", type=int, default=50, metavar="N", help="greedy tokens to generate (0: skip)")
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    p.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True, help="TF32 matrix products on the GPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--memory-worker", choices=["npgpt", "torch"], help=argparse.SUPPRESS)


def memory_worker(args) -> int:
    """Run --warmup untimed and --steps timed steps of one framework in this fresh process; print as JSON
    its peak RSS, the timed steps' seconds and every step's loss."""
    threads = set_threads(args.threads)
    cfg = GPTConfig.from_preset(args.preset, drop_rate=args.drop_rate)
    model = GPT(cfg, seed=args.seed, device="cpu", dtype=np.dtype(args.dtype))
    x, y = make_batch(cfg, args.batch_size, args.context_length, args.seed)
    if args.memory_worker == "torch":
        from ..bench_torch import TorchStep

        step = TorchStep(model, args.torch_attn, threads=threads, precision=torch_precision(args.precision, tf32=False))
        del model  # the torch twin holds its own copy of the weights
    else:
        engine = "fast" if args.engine == "both" else args.engine
        step = NpgptStep(model, args.batch_size, args.context_length, engine, precision=args.precision,
                         recompute=args.recompute if engine == "fast" else "none")  # fmt: skip
    times, losses = time_steps({"step": step}, x, y, args.steps, args.warmup, args.drop_rate > 0, args.seed, raw=True)
    rss = peak_rss_mb()
    peak = peak_sgemm_gflops(dtype=np.dtype(args.dtype)) if args.steps > 1 else None  # this process's, for MFU
    print(json.dumps({"peak_rss_mb": rss, "seconds": times["step"], "losses": losses["step"], "peak_gflops": peak}))
    return 0


def run_worker(args, framework: str, engine: str | None = None, steps: int = 1, warmup: int = 1) -> dict:
    """One memory_worker in a fresh process (`engine`: the npgpt engine, default --engine's): its JSON, or
    {"error": the last line of its stderr} when it failed."""
    cmd = [sys.executable, "-m", "npgpt", "bench", "--memory-worker", framework, "--preset", args.preset,
           "--batch-size", str(args.batch_size), "--context-length", str(args.context_length), "--dtype", args.dtype,
           "--engine", engine or args.engine, "--torch-attn", args.torch_attn, "--seed", str(args.seed),
           "--precision", args.precision, "--recompute", args.recompute, "--steps", str(steps), "--warmup", str(warmup),
           "--drop-rate", str(args.drop_rate)]  # fmt: skip
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "NPGPT_DEVICE": "cpu"})
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or [f"exit status {out.returncode}"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_memory(args, framework: str) -> float | None:
    """Peak RSS (MB) of two training steps of `framework` in a fresh process (None, said, if it failed)."""
    result = run_worker(args, framework)
    if "error" in result:
        print(f"  (memory measurement of {framework} failed: {result['error']})")
        return None
    return result["peak_rss_mb"]


def time_isolated(args) -> tuple[dict, dict, dict, list, list]:
    """--isolate: each engine and the torch twin timed in its own fresh process, one after the other,
    --rounds times. (median seconds over every round's timed steps, the first round's losses, peak RSS
    MB, each round's median seconds by name, each process's peak sgemm GFLOP/s), by the names the
    in-process table uses."""
    runs = [(f"npgpt {e}", "npgpt", e) for e in (["fast", "reference"] if args.engine == "both" else [args.engine])]
    if args.vs_torch:
        runs.append((f"torch eager ({args.torch_attn})", "torch", None))
    seconds, losses, peaks, per_round, sgemm = {name: [] for name, _, _ in runs}, {}, {}, [], []
    for r in range(args.rounds):
        per_round.append({})
        for name, framework, engine in runs:
            result = run_worker(args, framework, engine, steps=args.steps, warmup=args.warmup)
            if "error" in result:
                raise ValueError(f"the isolated run of {name} failed: {result['error']} (run without --isolate "
                                 "to see the whole error)")  # fmt: skip
            seconds[name] += result["seconds"]
            per_round[r][name] = statistics.median(result["seconds"])
            losses.setdefault(name, result["losses"])
            peaks.setdefault(framework, result["peak_rss_mb"])  # npgpt's: the first engine's, as without --isolate
            if result.get("peak_gflops"):
                sgemm.append(result["peak_gflops"])
        if args.rounds > 1:
            print(f"  round {r + 1}: " + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in per_round[r].items()), flush=True)
    return {k: statistics.median(v) for k, v in seconds.items()}, losses, peaks, per_round, sgemm


def run(args) -> int:
    if args.memory_worker:
        return memory_worker(args)
    with tf32_mode():  # the TF32 setting of a GPU benchmark (set_tf32 below) ends with it
        return _bench(args)


def _bench(args) -> int:
    _check_args(args)
    threads = set_threads(args.threads)
    cfg = GPTConfig.from_preset(args.preset, drop_rate=args.drop_rate)
    T, B = args.context_length, args.batch_size
    if args.dry_run:
        from ..backend import resolve_device
        from ..memory import plan_report

        for e in ["fast", "reference"] if args.engine == "both" else [args.engine]:
            print(plan_report(cfg, B, T, args.dtype, args.precision, e, recompute=args.recompute if e == "fast" else "none",
                              device=resolve_device(args.device), name=args.preset))  # fmt: skip
        return 0
    _check_memory(args, cfg)
    model = GPT(cfg, seed=args.seed, device=args.device, dtype=np.dtype(args.dtype))
    x, y = make_batch(cfg, B, T, args.seed)
    tf32 = args.tf32 and model.device == "cuda"  # TF32 exists only on the GPU
    if model.device == "cuda":  # CUDA state only for a CUDA model
        set_tf32(args.tf32)
    peaks, per_round, sgemm = None, [], []
    if args.isolate:  # the model above (and torch's twin) stay for generation; the timed steps run in their own processes
        torch_step = _torch_twin(args, model, threads, tf32, compiled=False) if args.vs_torch else None
        times, losses, peaks, per_round, sgemm = time_isolated(args)
    else:
        steps, torch_step = _build_steps(args, cfg, model, threads, tf32)
        times, losses = time_steps(steps, x, y, args.steps, args.warmup, args.drop_rate > 0, args.seed, model.xp)
    precision = args.precision + (" with TF32" if args.precision == "fp32" and tf32 else "")
    how = "each in its own process" if args.isolate else "alternating in one process"
    if args.isolate and args.rounds > 1:
        how += f", {args.rounds} rounds"
    print(f"npgpt bench: preset {args.preset} ({model.num_params():,} parameters), B={B} T={T}, {args.dtype}, "
          f"precision {precision}, {model.device}, {threads} BLAS thread(s); "
          f"median of {args.steps} steps after {args.warmup} warm-up" + (f", {how}" if len(times) > 1 else ""))  # fmt: skip
    report = {"preset": args.preset, "B": B, "T": T, "dtype": args.dtype, "precision": args.precision, "tf32": tf32,
              "device": model.device, "threads": threads, "flops_per_step": flops_per_token(cfg, T) * B * T,
              "isolated": bool(args.isolate), "rounds": args.rounds if args.isolate else 0, "steps": {}}  # fmt: skip
    if per_round:
        report["per_round_ms"] = [{k: v * 1e3 for k, v in r.items()} for r in per_round]
    if sgemm:
        report["worker_peak_sgemm_gflops"] = sgemm
    if torch_step is not None:
        report["torch_precision"] = torch_step.precision
    _report_steps(args, report, times, losses, model.device, tf32, statistics.median(sgemm) if sgemm else None)
    if model.device == "cuda":
        _report_gpu_memory(args, report, torch_step)
    if args.memory and model.device == "cpu":
        _report_peak_memory(args, report, peaks)
    if args.generate:
        _report_generation(args, report, model, torch_step)
    if args.json:
        atomic_write_json(args.json, report)
    return 0


def _check_args(args) -> None:
    """Every argument, before anything is built or timed (--json's file is checked, not yet written)."""
    from .. import validate as V
    from ..config import PRESETS

    if args.preset not in PRESETS:
        raise ValueError(f"--preset {args.preset!r} is not a preset; choose one of {', '.join(PRESETS)}")
    V.integer("--batch-size", args.batch_size, 1)
    V.integer("--context-length", args.context_length, 1)
    preset_ctx = PRESETS[args.preset]["context_length"]
    if args.context_length > preset_ctx:
        raise ValueError(f"--context-length {args.context_length} exceeds the context length {preset_ctx} of "
                         f"--preset {args.preset}; use at most {preset_ctx}")  # fmt: skip
    V.integer("--steps", args.steps, 1, hint="the median of the timed steps is reported")
    V.integer("--warmup", args.warmup, 0)
    V.real("--drop-rate", args.drop_rate, 0, 1, hi_open=True, hint="0 turns dropout off")
    if args.threads is not None:
        V.integer("--threads", args.threads, 1, hint="leave it out to keep the configured count")
    V.integer("--generate", args.generate, 0, hint="0 skips the generation benchmark")
    V.integer("--prompt-tokens", args.prompt_tokens, 1)
    V.integer("--seed", args.seed, 0)
    if args.recompute != "none" and args.engine == "reference":  # as npgpt train refuses the pair
        raise ValueError(f"--recompute {args.recompute} runs in the fast engine; drop --engine reference (or use --engine both)")
    if args.json is not None:
        V.out_file("--json", args.json)
    if args.torch_compile and not args.vs_torch:
        raise ValueError("--torch-compile times a torch.compile twin beside --vs-torch's eager one; add --vs-torch")
    if args.torch_compile and args.warmup < 1:
        raise ValueError("--torch-compile compiles during the first step; use --warmup 1 or more so that is not timed")
    if args.isolate and args.device != "cpu":
        raise ValueError("--isolate times CPU runs in fresh processes; drop it, or use --device cpu")
    V.integer("--rounds", args.rounds, 1)
    if args.rounds > 1 and not args.isolate:
        raise ValueError("--rounds repeats the --isolate processes; add --isolate (in one process the steps already alternate)")
    if args.isolate and args.torch_compile:
        raise ValueError("--isolate times torch eager only; drop --torch-compile (it runs beside eager in one process)")
    if args.vs_torch and args.dtype != "float32":
        raise ValueError("--vs-torch compares float32 models (torch's twin keeps float32 weights; mixed precision "
                         "is --precision bf16/fp16); drop --dtype")  # fmt: skip


def _check_memory(args, cfg) -> None:
    """Refuse, with the numbers, a benchmark that cannot fit (every engine timed holds its own model)."""
    from ..backend import resolve_device
    from ..memory import MemoryEstimate, check_fits, estimate_training

    device = resolve_device(args.device)
    engines = ["fast", "reference"] if args.engine == "both" else [args.engine]
    parts = [estimate_training(cfg, args.batch_size, args.context_length, args.dtype, args.precision, e, gpu=device == "cuda",
                               recompute=args.recompute if e == "fast" else "none")
             for e in engines]  # fmt: skip
    est = MemoryEstimate(*(sum(getattr(p, f) for p in parts)
                           for f in ("weights", "gradients", "optimizer", "activations", "workspace", "transient")))  # fmt: skip
    check_fits(est, device, fix="use a smaller --preset, --batch-size or --context-length, or --recompute "
                                "attention|mlp|block; --dry-run shows the largest batch that fits")  # fmt: skip


def _build_steps(args, cfg, model, threads: int, tf32: bool) -> tuple[dict, object]:
    """The steps to time by name, and the torch eager twin (None without --vs-torch), which also runs the
    generation comparison. A second npgpt engine (--engine both) gets its own model with the same seed."""
    B, T, dtype = args.batch_size, args.context_length, np.dtype(args.dtype)
    engines = ["fast", "reference"] if args.engine == "both" else [args.engine]
    steps = {f"npgpt {e}": NpgptStep(GPT(cfg, seed=args.seed, device=args.device, dtype=dtype) if i else model,
                                     B, T, e, precision=args.precision, recompute=args.recompute if e == "fast" else "none")
             for i, e in enumerate(engines)}  # fmt: skip
    if not args.vs_torch:
        return steps, None
    twins = {f"torch eager ({args.torch_attn})": False}
    if args.torch_compile:
        twins[f"torch.compile ({args.torch_attn})"] = True
    for name, compiled in twins.items():
        steps[name] = _torch_twin(args, model, threads, tf32, compiled)
    return steps, steps[f"torch eager ({args.torch_attn})"]


def _torch_twin(args, model, threads: int, tf32: bool, compiled: bool):
    try:
        from ..bench_torch import TorchStep
    except ImportError:
        raise ValueError("--vs-torch needs PyTorch and transformers: pip install 'npgpt[parity]'") from None
    return TorchStep(model, args.torch_attn, threads=threads, device=model.device,
                     precision=torch_precision(args.precision, tf32), compile=compiled)  # fmt: skip


def _report_steps(args, report: dict, times: dict, losses: dict, device: str, tf32: bool, peak=None) -> None:
    """The table of ms/step, tokens/s, GFLOP/s and MFU, and the throughput ratios against the first step.
    peak: the CPU's sgemm GFLOP/s as the timed processes measured it (--isolate: their median), else
    measured here."""
    tokens, flops = report["B"] * report["T"], report["flops_per_step"]
    measured_here = peak is None
    if peak is None:
        peak = peak_sgemm_gflops(dtype=np.dtype(args.dtype)) if device == "cpu" else gpu_peak_gflops(args.precision, tf32)
    if peak:
        report["peak_sgemm_gflops" if device == "cpu" else "peak_gpu_gflops"] = peak
    print(f"  {'':28s} {'ms/step':>9s} {'tokens/s':>9s} {'GFLOP/s':>8s} {'MFU':>6s}  first losses")
    for name, sec in times.items():
        gf = flops / sec / 1e9
        mfu = f"{100 * gf / peak:5.1f}%" if peak else "   n/a"
        print(f"  {name:28s} {sec * 1e3:9.1f} {tokens / sec:9.1f} {gf:8.1f} {mfu}  {' '.join(f'{v:.4f}' for v in losses[name][:3])}")
        report["steps"][name] = {"ms": sec * 1e3, "tokens_per_s": tokens / sec, "gflops": gf, "losses": losses[name]}
    if peak and device == "cpu":
        where = "same process" if measured_here else "median over the timed processes, each after its steps"
        print(f"  peak sgemm (2048^3 np.matmul, {where}): {peak:.1f} GFLOP/s")
    elif device == "cuda":
        name = gpu_name()
        report["gpu"], report["peak_gpu_part"] = name, gpu_part(name)
        print(f"  {describe_peak(name, args.precision, tf32)}")
    first = next(iter(times))
    for name in list(times)[1:]:
        ratio = times[name] / times[first]
        rounds = report.get("per_round_ms", [])
        each = f" (per round: {', '.join(f'{r[name] / r[first]:.2f}x' for r in rounds)})" if len(rounds) > 1 else ""
        print(f"  {first} is {ratio:.2f}x the throughput of {name}{each}")
        report.setdefault("ratios", {})[f"{first} / {name}"] = ratio


def _report_gpu_memory(args, report: dict, torch_step) -> None:
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


def _report_peak_memory(args, report: dict, peaks: dict | None = None) -> None:
    """peaks: what the isolated runs measured (--isolate), else two steps of each in a fresh process."""
    if peaks is not None:
        mem = dict(peaks)
    else:
        mem = {"npgpt": measure_memory(args, "npgpt")}
        if args.vs_torch:
            mem["torch"] = measure_memory(args, "torch")
    line = ", ".join(f"{k} {v:,.0f} MB" for k, v in mem.items() if v)
    from ..memory import estimate_training

    engine = "fast" if args.engine == "both" else args.engine
    cfg = GPTConfig.from_preset(args.preset, drop_rate=0.0)  # the memory worker's model
    est = estimate_training(cfg, args.batch_size, args.context_length, args.dtype, args.precision, engine,
                            recompute=args.recompute if engine == "fast" else "none")  # fmt: skip
    report["npgpt_estimate_mb"] = est.total / 2**20
    line += f" (npgpt's estimate without the interpreter and BLAS: {est.total / 2**20:,.0f} MiB)"
    print(f"  peak memory of a training step (fresh process, peak RSS): {line}"
          + (f"; npgpt/torch = {mem['npgpt'] / mem['torch']:.2f}" if mem.get("torch") and mem.get("npgpt") else ""))  # fmt: skip
    report["peak_memory_mb"] = mem


def _report_generation(args, report: dict, model, torch_step) -> None:
    n_new = min(args.generate, model.config.context_length - args.prompt_tokens)  # the KV cache holds the context
    if n_new < 1:
        print(f"  (no generation: --prompt-tokens {args.prompt_tokens} fills the context of {model.config.context_length})")
        return
    gen = bench_generation(model, n_new, args.prompt_tokens, args.seed, torch_step)
    line = f"  greedy generation, KV cache, {n_new} tokens after {args.prompt_tokens}: npgpt {gen['npgpt_tokens_per_s']:.1f} tokens/s"
    if "torch_tokens_per_s" in gen:
        line += (f", transformers generate {gen['torch_tokens_per_s']:.1f} tokens/s "
                 f"(ratio {gen['npgpt_tokens_per_s'] / gen['torch_tokens_per_s']:.2f}; same tokens: {gen['same_tokens']})")  # fmt: skip
    print(line)
    report["generation"] = gen
