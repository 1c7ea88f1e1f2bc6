"""The GPU benchmark table (issue 13, docs/benchmarks.md): npgpt's training step against PyTorch's on one GPU.

    python benchmarks/gpu_bench.py --out gpu-check/bench.jsonl --deadline 220      # what gpu_check.sh runs
    python benchmarks/gpu_bench.py --device cpu --preset micro --context-length 32 --batch-sizes 2 \
        --precisions fp32 --steps 1 --warmup 1 --out /tmp/b.jsonl                # the logic, on a CPU

A unit of work is one batch size and one precision ("fp32": true float32, TF32 off on both sides;
"tf32": float32 with TF32 tensor-core products on both sides; "bf16": npgpt's mixed precision against
torch.autocast). For a unit it builds, once and from the same weights and batch, the twins:

    npgpt           the fast engine with NPGPT_CUDA_KERNELS=none (CuPy ops, cuBLAS)
    npgpt+kernels   the fast engine with NPGPT_CUDA_KERNELS=all (kernels/*.cu, and bmm)
    torch eager     transformers' GPT2LMHeadModel with sdpa attention, torch.optim.AdamW
    torch.compile   the same forward and loss under torch.compile (only in the units that ask for it)

one at a time in this one process: a twin is built, takes its warm-up steps (CuPy's and NVRTC's
compilation, torch.compile's) and its timed steps (forward, backward, AdamW, then a wait for the GPU),
and is freed (CuPy's pool and torch's cache emptied) before the next is built. (At B=16, T=1024 the
three 124M twins held at once needed about 70 of an H100's 80 GiB before the pools' overhead: issue 25.
A GPU's speed does not drift as this CPU's does, so the twins need not alternate step by step.) The
median is reported, with tokens/s, MFU against the data sheet's dense peak of this GPU's part for the
precision (npgpt.bench.GPU_PEAKS; the part is recorded), each twin's first losses (equal weights and
batch: they must agree), and the memory each held (CuPy's pool, torch's peak allocated). A twin that
fails (out of memory, a kernel error) is recorded with its error; the others go on.

Units run most important first: B = the first of --batch-sizes (16) in TF32, bf16 and fp32, then the
other batch sizes, then torch.compile units (eager beside compile) for --compile-batch-sizes. Before a
unit starts, its time is estimated from what has run (the first guesses are generous); a unit that would
not end before --deadline seconds is skipped and recorded as skipped. Every unit's figures are appended
to --out (JSON lines) as soon as it ends, and the markdown table (--out with .md) is rewritten, so a
timeout from outside loses only the unit in flight. The first line of --out describes the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from npgpt.backend import tf32_mode
from npgpt.bench import NpgptStep, flops_per_token, gpu_name, gpu_part, gpu_peak_gflops, make_batch
from npgpt.config import GPTConfig
from npgpt.cuda import ENV_VAR
from npgpt.model import GPT, init_params, make_rng

PRECISIONS = ("tf32", "bf16", "fp32")  # the order units run in, most important first
TWINS = ("npgpt", "npgpt+kernels", "torch eager", "torch.compile")
# First guesses (seconds) before anything was measured: a step of the 124M model at B=16 on a slow GPU,
# building a unit's twins, one torch.compile.
GUESS_STEP, GUESS_BUILD, GUESS_COMPILE = 1.0, 30.0, 120.0


@contextlib.contextmanager
def kernels_env(value: str | None):
    """$NPGPT_CUDA_KERNELS set to `value` (None: unset) inside the block. The engine reads it when it is
    built and AdamW at each step, so each npgpt twin's steps run inside its own setting."""
    old = os.environ.get(ENV_VAR)
    if value is None:
        os.environ.pop(ENV_VAR, None)
    else:
        os.environ[ENV_VAR] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(ENV_VAR, None)
        else:
            os.environ[ENV_VAR] = old


class Twin:
    def __init__(self, name: str, env: str | None = None):
        self.name, self.env = name, env
        self.step = None
        self.times, self.losses = [], []
        self.first_s = None  # the first step's seconds (compilation included)
        self.build_s = 0.0
        self.memory = {}  # what the GPU's pools held after its steps
        self.error = None

    def fail(self, e: BaseException) -> None:
        self.error = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
        self.step = None

    def result(self, flops_per_step: float, tokens: int, peak: float | None) -> dict:
        r = {"error": self.error, "losses": [round(v, 6) for v in self.losses[:3]], "first_step_s": self.first_s,
             "build_s": round(self.build_s, 1), **self.memory}
        if self.times and self.error is None:
            sec = statistics.median(self.times)
            r.update(ms=1e3 * sec, tokens_per_s=tokens / sec, tflops=flops_per_step / sec / 1e12,
                     mfu=(flops_per_step / sec / 1e9 / peak) if peak else None, timed_steps=len(self.times))  # fmt: skip
        return r


def free_memory(device: str) -> None:
    gc.collect()
    if device != "cuda":
        return
    import cupy

    cupy.get_default_memory_pool().free_all_blocks()
    with contextlib.suppress(Exception):
        import torch

        torch.cuda.empty_cache()


def build_twin(name, cfg, host_params, B, T, precision, device) -> Twin:
    """One twin of a unit, from its own copy of `host_params`; a twin that fails to build keeps its error."""
    from npgpt.bench import torch_precision

    np_precision = "bf16" if precision == "bf16" else "fp32"
    twin = Twin(name, env="all" if name == "npgpt+kernels" else "none")  # "none": not even DEFAULT_ON
    t0 = time.perf_counter()
    try:
        model = GPT(cfg, params={k: _to(device, v) for k, v in host_params.items()})
        if name.startswith("npgpt"):
            with kernels_env(twin.env):
                twin.step = NpgptStep(model, B, T, "fast", precision=np_precision)
        else:
            from npgpt.bench_torch import TorchStep

            twin.step = TorchStep(model, "sdpa", device=device, compile=name == "torch.compile",
                                  precision=torch_precision(np_precision, precision == "tf32"))  # fmt: skip
            del model  # the torch twin holds its own copy of the weights
    except Exception as e:  # noqa: BLE001 (reported in the table, the other twins go on)
        twin.fail(e)
    twin.build_s = time.perf_counter() - t0
    return twin


def time_twin(twin: Twin, x, y, warmup: int, steps: int, xp, seed: int) -> None:
    """warmup + steps steps of one twin (each timed with the GPU waited for); a failure ends them."""
    for i in range(warmup + steps):
        if twin.step is None:
            return
        try:
            with kernels_env(twin.env):
                t0 = time.perf_counter()
                loss = twin.step(x, y, False, make_rng(seed + i, xp))
                dt = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001
            twin.fail(e)
            return
        twin.losses.append(float(loss))
        if i == 0:
            twin.first_s = dt
        if i >= warmup:
            twin.times.append(dt)


def run_unit(names, cfg, host_params, B, T, precision, device, x, y, warmup, steps, xp, seed) -> list:
    """The twins of one unit, one at a time: each built, warmed up, timed, its memory read, and freed
    before the next is built, inside the unit's TF32 setting. Returns the finished twins (steps freed)."""
    done = []
    with tf32_mode(precision == "tf32" if device == "cuda" else None):
        for name in names:
            _reset_torch_peak(device)
            twin = build_twin(name, cfg, host_params, B, T, precision, device)
            time_twin(twin, x, y, warmup, steps, xp, seed)
            twin.memory = _memory(device)
            twin.step = None  # the twin's model, engine and optimizer go here ...
            free_memory(device)  # ... and their GPU memory back to the device
            done.append(twin)
    return done


def _reset_torch_peak(device: str) -> None:
    if device == "cuda":
        with contextlib.suppress(Exception):
            import torch

            torch.cuda.reset_peak_memory_stats()


def _to(device, host):
    if device == "cuda":
        import cupy

        return cupy.asarray(host)
    return host.copy()


def machine(device: str) -> dict:
    info = {"kind": "machine", "python": platform.python_version(), "numpy": np.__version__, "device": device,
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip
    if device == "cuda":
        import cupy

        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        name = gpu_name()
        info.update(gpu=name, gpu_part=gpu_part(name), memory_gib=round(props["totalGlobalMem"] / 2**30, 1), cupy=cupy.__version__,
                    cuda_runtime=cupy.cuda.runtime.runtimeGetVersion(), driver=cupy.cuda.runtime.driverGetVersion())  # fmt: skip
    with contextlib.suppress(Exception):
        import torch

        info["torch"] = torch.__version__
    return info


def plan(batch_sizes, precisions, compile_batch_sizes) -> list:
    """(B, precision, twins) in the order of importance."""
    units = []
    for B in batch_sizes:
        units += [(B, p, ("npgpt", "npgpt+kernels", "torch eager")) for p in precisions]
    for B in compile_batch_sizes:
        units += [(B, p, ("torch eager", "torch.compile")) for p in precisions]
    return units


class Estimator:
    """Seconds a unit will take, from what has run: per-twin step seconds (scaled by batch size), the
    time to build a unit's twins, and torch.compile's first step."""

    def __init__(self):
        self.step, self.build, self.compile = {}, [], []

    def record(self, B, precision, twins, build_s):
        self.build.append(build_s)
        for t in twins:
            if t.times:
                self.step[(t.name, precision)] = statistics.median(t.times) / B
            if t.name == "torch.compile" and t.first_s is not None:
                self.compile.append(t.first_s)

    def unit(self, B, precision, names, rounds) -> float:
        per_step = sum(self.step.get((n, precision), self.step.get((n, "tf32"), GUESS_STEP / 16)) * B for n in names)
        build = max(self.build) if self.build else GUESS_BUILD
        comp = (max(self.compile) if self.compile else GUESS_COMPILE) if "torch.compile" in names else 0.0
        return build + rounds * per_step + comp


def run(args) -> int:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    device = args.device
    xp = np
    if device == "cuda":
        import cupy as xp  # noqa: F811
    sizes = {k: getattr(args, k) for k in ("vocab_size", "emb_dim", "n_heads", "n_layers") if getattr(args, k)}
    cfg = GPTConfig.from_preset(args.preset, drop_rate=0.0, **sizes)
    if args.context_length > cfg.context_length:
        raise SystemExit(f"--context-length {args.context_length} exceeds the preset's {cfg.context_length}")
    precisions = [p for p in args.precisions if device == "cuda" or p != "tf32"]  # no TF32 on a CPU
    records = [machine(device)]
    out.write_text(json.dumps(records[0]) + "\n")
    host_params = init_params(cfg, seed=args.seed, xp=np)
    est = Estimator()
    T = args.context_length
    for B, precision, names in plan(args.batch_sizes, precisions, args.compile_batch_sizes):
        names = [n for n in names if n in args.twins]
        if not names:
            continue
        unit = {"kind": "unit", "B": B, "T": T, "precision": precision, "preset": args.preset, **sizes}
        left = args.deadline - (time.perf_counter() - t_start)
        need = est.unit(B, precision, names, args.warmup + args.steps)
        if need > left:
            unit.update(skipped=f"out of time: about {need:.0f} s needed, {left:.0f} s left")
            print(f"[gpu_bench] B={B} {precision}: skipped ({unit['skipped']})", flush=True)
            _append(out, records, unit, args)
            continue
        print(f"[gpu_bench] B={B} T={T} {precision}: {', '.join(names)} (about {need:.0f} s, {left:.0f} s left)", flush=True)
        t0 = time.perf_counter()
        x, y = make_batch(cfg, B, T, args.seed)
        twins = run_unit(names, cfg, host_params, B, T, precision, device, x, y, args.warmup, args.steps, xp, args.seed)
        build_s = sum(t.build_s for t in twins)
        flops = flops_per_token(cfg, T) * B * T
        peak = gpu_peak_gflops("bf16" if precision == "bf16" else "fp32", precision == "tf32") if device == "cuda" else None
        unit.update(seconds=round(time.perf_counter() - t0, 1), build_s=round(build_s, 1), peak_tflops=peak and peak / 1e3,
                    flops_per_step=flops, twins={t.name: t.result(flops, B * T, peak) for t in twins})  # fmt: skip
        est.record(B, precision, twins, build_s)
        _append(out, records, unit, args)
        print(_unit_line(unit), flush=True)
        if device == "cuda" and "torch.compile" in names:
            with contextlib.suppress(Exception):
                import torch

                torch._dynamo.reset()
    print(table(records), flush=True)
    return 0


def _memory(device) -> dict:
    if device != "cuda":
        return {}
    import cupy

    mem = {"cupy_pool_gib": round(cupy.get_default_memory_pool().total_bytes() / 2**30, 2)}
    with contextlib.suppress(Exception):
        import torch

        mem["torch_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return mem


def _append(out: Path, records: list, unit: dict, args) -> None:
    records.append(unit)
    with out.open("a") as f:
        f.write(json.dumps(unit) + "\n")
    Path(str(out.with_suffix("")) + ".md").write_text(table(records) + "\n")


def _unit_line(unit: dict) -> str:
    parts = []
    for name, r in unit["twins"].items():
        if r.get("error"):
            parts.append(f"{name}: FAILED ({r['error'][:80]})")
        elif "tokens_per_s" in r:
            mfu = f", MFU {100 * r['mfu']:.1f}%" if r.get("mfu") else ""
            parts.append(f"{name}: {r['ms']:.1f} ms, {r['tokens_per_s']:,.0f} tok/s{mfu}")
    return f"[gpu_bench] B={unit['B']} {unit['precision']} ({unit['seconds']} s): " + "; ".join(parts)


def _cell(r: dict | None) -> str:
    if r is None:
        return ""
    if r.get("error"):
        return "failed: " + r["error"].split(":")[0]
    if "tokens_per_s" not in r:
        return "no timed step"
    mfu = f" ({100 * r['mfu']:.0f}%)" if r.get("mfu") else ""
    return f"{r['tokens_per_s']:,.0f}{mfu}"


def table(records: list) -> str:
    """The markdown table of every unit so far: tokens/s (MFU) per twin, npgpt's best against torch eager,
    and how far apart the twins' first losses are (same weights and batch)."""
    head = records[0]
    where = head.get("gpu") or f"{head['device']} (no GPU)"
    lines = [f"Machine: {where}; Python {head['python']}, NumPy {head['numpy']}, CuPy {head.get('cupy', '-')}, "
             f"PyTorch {head.get('torch', '-')}; {head['time']}.", "",
             "Training step of the model (forward, backward, AdamW), tokens/s and in brackets MFU against the "
             f"dense peak for the precision of {head.get('gpu_part') or 'the GPU (unknown part: no MFU)'} "
             "(npgpt.bench.GPU_PEAKS); median of the timed steps, one twin at a time in one process.", "",
             "| B x T | precision | npgpt | npgpt + kernels | torch eager | torch.compile | best npgpt / eager | first losses agree |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    merged = {}
    for u in records[1:]:
        key = (u["B"], u["T"], u["precision"])
        row = merged.setdefault(key, {"twins": {}, "skipped": []})
        if "skipped" in u:
            row["skipped"].append(u["skipped"])
        for name, r in u.get("twins", {}).items():
            if name not in row["twins"] or "tokens_per_s" in r:
                row["twins"][name] = r
    for (B, T, precision), row in merged.items():
        tw = row["twins"]
        best = max((tw[n]["tokens_per_s"] for n in ("npgpt", "npgpt+kernels") if "tokens_per_s" in tw.get(n, {})), default=None)
        eager = tw.get("torch eager", {}).get("tokens_per_s")
        ratio = f"{best / eager:.2f}x" if best and eager else ""
        firsts = [r["losses"][0] for r in tw.values() if r.get("losses")]
        agree = f"{max(firsts) / min(firsts) - 1:.1e}" if len(firsts) > 1 and min(firsts) > 0 else ""
        cells = [_cell(tw.get(n)) for n in TWINS]
        if row["skipped"] and not tw:
            cells = ["skipped (time)"] + [""] * 3
        lines.append(f"| {B} x {T} | {precision} | " + " | ".join(cells) + f" | {ratio} | {agree} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON lines, appended unit by unit (and the table beside it, .md)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--preset", default="gpt2")
    ap.add_argument("--context-length", type=int, default=1024)
    for name in ("vocab-size", "emb-dim", "n-heads", "n-layers"):  # a smaller model (tests of this script)
        ap.add_argument(f"--{name}", type=int, help="override the preset's (tests: a tiny model on a CPU)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 8], help="most important first")
    ap.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    ap.add_argument("--compile-batch-sizes", type=int, nargs="*", default=[16, 8],
                    help="batch sizes that also get torch.compile units (they run after every other unit)")
    ap.add_argument("--twins", nargs="+", choices=TWINS, default=list(TWINS))
    ap.add_argument("--steps", type=int, default=5, help="timed steps per twin")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (at least 1: compilation)")
    ap.add_argument("--deadline", type=float, default=1e9, help="seconds from the start: no unit starts that would end later")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        ap.error("--warmup and --steps must be at least 1")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
