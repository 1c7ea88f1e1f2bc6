"""Timing a training step and generation: the figures `npgpt bench` prints (its command line, and the
peak-memory subprocesses, are in npgpt/cli/bench.py).

Reported for the training step: ms per step (median of the timed steps, after warm-up), tokens/s, achieved
GFLOP/s from the model's FLOPs (6 per parameter per token for the matrix multiplies, the tied head
included, plus 12 L T C per token for attention's two products), and on the CPU "CPU MFU": that rate
divided by the peak sgemm rate measured in the same run with a large np.matmul; on a GPU, MFU against
the data sheet's dense peak for the precision in use (GPU_PEAKS). The npgpt and PyTorch steps alternate
in one process (time_steps).
"""

from __future__ import annotations

import platform
import re
import statistics
import time
from pathlib import Path

import numpy as np

from . import memory
from .engine import make_engine
from .generate import generate
from .model import make_rng
from .optim import AdamW
from .precision import LossScaler
from .update import Updater

flops_per_token = memory.flops_per_token  # training FLOPs per token, defined beside the memory estimate


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


# Dense (no sparsity) peaks in GFLOP/s from NVIDIA's data sheets: float32, TF32 tensor cores, and 16-bit
# (bf16 and fp16, which are the same) tensor cores. The data sheets give the tensor-core figures "with
# sparsity"; the dense peak is half of that. One chip comes in form factors with different clocks and
# power: an H100 PCIe reaches 76% of an H100 SXM's 16-bit peak, an H100 NVL 84%.
GPU_PEAKS = {
    "H200 NVL": {"fp32": 60_000, "tf32": 417_500, "16-bit": 835_500},
    "H200 SXM": {"fp32": 67_000, "tf32": 494_700, "16-bit": 989_400},
    "GH200": {"fp32": 67_000, "tf32": 494_700, "16-bit": 989_400},
    "H100 NVL": {"fp32": 60_000, "tf32": 417_500, "16-bit": 835_500},
    "H100 PCIe": {"fp32": 51_200, "tf32": 378_000, "16-bit": 756_500},
    "H100 SXM": {"fp32": 67_000, "tf32": 494_700, "16-bit": 989_400},
    "A100": {"fp32": 19_500, "tf32": 156_000, "16-bit": 312_000},
    "L4": {"fp32": 30_300, "tf32": 60_600, "16-bit": 121_000},
}
# How each part shows in the name CUDA reports ("NVIDIA H100 80GB HBM3" is the SXM part, "NVIDIA H100
# PCIe", "NVIDIA H100 NVL", "NVIDIA H200", "NVIDIA GH200 480GB", "NVIDIA A100-SXM4-80GB"), most specific
# first: the first pattern found in the name (whole words, any case) names the part.
GPU_NAMES = (
    ("H200 NVL", r"\bH200\b.*\bNVL\b"),
    ("H200 SXM", r"\bH200\b"),
    ("GH200", r"\bGH200\b"),
    ("H100 NVL", r"\bH100\b.*\bNVL\b"),
    ("H100 PCIe", r"\bH100\b.*\bPCIe\b"),
    ("H100 SXM", r"\bH100\b"),
    ("A100", r"\bA100\b"),
    ("L4", r"\bL4\b"),
)


def peak_kind(precision: str, tf32: bool) -> str:
    """Which GPU_PEAKS column bounds a step: bf16/fp16 -> "16-bit"; fp32 -> "tf32" with TF32 on, else "fp32"."""
    if precision in ("bf16", "fp16"):
        return "16-bit"
    if precision == "fp32":
        return "tf32" if tf32 else "fp32"
    raise ValueError(f"unknown precision {precision!r}; choose fp32, bf16 or fp16")


def gpu_part(name: str) -> str | None:
    """The GPU_PEAKS part a device called `name` (as CUDA reports it) is, or None when none matches (an
    L40S is not an L4, an RTX 4090 is not listed)."""
    for part, pattern in GPU_NAMES:
        if re.search(pattern, name, re.IGNORECASE):
            return part
    return None


def peak_for_name(name: str, precision: str, tf32: bool) -> float | None:
    """The dense peak (GFLOP/s) of the GPU called `name` for this precision, or None (see gpu_part)."""
    kind = peak_kind(precision, tf32)
    part = gpu_part(name)
    return GPU_PEAKS[part][kind] if part else None


def gpu_name() -> str:
    """The name CUDA reports for CuPy's current device."""
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    return props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])


def gpu_peak_gflops(precision: str, tf32: bool) -> float | None:
    """The dense peak of the GPU in use for this precision, when gpu_part knows its name."""
    return peak_for_name(gpu_name(), precision, tf32)


def describe_peak(name: str, precision: str, tf32: bool) -> str:
    """Which peak an MFU is against, for printing: the part, the column and the figure, or that there is none."""
    kind = peak_kind(precision, tf32)
    part = gpu_part(name)
    if part is None:
        return f"no peak known for {name!r} (npgpt.bench.GPU_PEAKS): MFU not computed"
    column = {"fp32": "FP32", "tf32": "TF32", "16-bit": "16-bit"}[kind]
    return f"MFU against the {part}'s dense {column} peak, {GPU_PEAKS[part][kind] / 1e3:,.1f} TFLOP/s (device {name!r})"


def torch_precision(precision: str, tf32: bool) -> str:
    """The TorchStep precision that matches npgpt's: fp32 -> "tf32" with TF32 on, else "fp32" (true
    float32); bf16 and fp16 -> the same autocast. Pass tf32=False on the CPU, where TF32 does not exist."""
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"unknown precision {precision!r}; choose fp32, bf16 or fp16")
    if precision == "fp32":
        return "tf32" if tf32 else "fp32"
    return precision


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), for the benchmark pages."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# --- the steps being timed ------------------------------------------------------------------------------


def make_batch(config, B, T, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, config.vocab_size, size=(B, T)), rng.integers(0, config.vocab_size, size=(B, T))


class NpgptStep:
    """npgpt's training step (the fast engine or the readable reference) with AdamW, timed by time_steps:
    one update.Updater call, as `npgpt train` makes (without clipping or measuring the gradient norm).

    precision: "fp32", or "bf16"/"fp16" mixed precision, which only the fast engine runs. fp16 scales the
    loss as `npgpt train` does (precision.LossScaler: unscale the float32 gradients, skip the update on
    an overflow), the work torch's GradScaler does in the --vs-torch twin."""

    def __init__(self, model, B, T, engine: str, lr=1e-4, precision: str = "fp32", recompute: str = "none"):
        if precision != "fp32" and engine != "fast":
            raise ValueError(f"--precision {precision} runs in the fast engine only; use --engine fast")
        self.model, self.engine_name, self.precision = model, engine, precision
        self.engine = make_engine(engine, model, B, T, precision=precision, recompute=recompute)
        self.opt = AdamW(model.params, lr=lr, weight_decay=0.1)
        self.scaler = LossScaler() if precision == "fp16" else None
        self.updater = Updater(self.engine, self.opt, scaler=self.scaler, measure_norm=False)

    def __call__(self, x, y, training, rng) -> float:
        loss = self.updater([(x, y, rng)], training=training).loss
        xp = self.model.xp
        if xp is not np:  # the update's AdamW is still queued after its one read: wait for all of it
            xp.cuda.get_current_stream().synchronize()  # CuPy's current stream, where npgpt's work goes
        return loss


def time_steps(steps: dict, x, y, n_timed, n_warmup, training, seed, xp=np, raw: bool = False):
    """Alternate the given step functions; median seconds of each (raw=True: every timed step's
    seconds), and the losses of every step."""
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
    return (times if raw else {k: statistics.median(v) for k, v in times.items()}), losses


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
    generate(model, prompt, 2, temperature=0.0)  # warm up
    t0 = time.perf_counter()
    ours = generate(model, prompt, n_new, temperature=0.0)
    t_ours = time.perf_counter() - t0
    result = {"npgpt_tokens_per_s": n_new / t_ours}
    if torch_step is not None:
        theirs, t_theirs = torch_step.generate(prompt, n_new)
        result["torch_tokens_per_s"] = n_new / t_theirs
        result["same_tokens"] = bool(np.array_equal(ours, theirs))
    return result
