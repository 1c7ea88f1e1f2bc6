"""`npgpt info`: what npgpt runs on here: backend, devices, BLAS and threads, versions."""

from __future__ import annotations

import argparse
import os
import platform
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], help="device to report as in use (default: $NPGPT_DEVICE or auto)")


def _version(module: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module)
    except PackageNotFoundError:
        return "not installed"


def collect(device=None) -> dict:
    import numpy as np

    from .. import __version__
    from ..backend import cuda_available, cuda_unavailable_reason, resolve_device

    info = {
        "npgpt": __version__,
        "python": f"{sys.version.split()[0]} ({platform.machine()}, {platform.system()})",
        "cpu cores": os.cpu_count(),
        "NPGPT_DEVICE": os.environ.get("NPGPT_DEVICE", "(unset: auto)"),
    }
    try:
        info["device in use"] = resolve_device(device)
    except ValueError as e:
        info["device in use"] = f"error: {e}"
    info["numpy"] = np.__version__
    try:
        from threadpoolctl import threadpool_info

        pools = threadpool_info()
        info["BLAS"] = "; ".join(
            f"{p.get('internal_api')} {p.get('version') or ''} ({p.get('num_threads')} threads, {p.get('architecture') or '?'})"
            for p in pools
            if p.get("user_api") == "blas"
        ) or "none found"
        openmp = [p for p in pools if p.get("user_api") == "openmp"]
        if openmp:
            info["OpenMP threads"] = ", ".join(str(p.get("num_threads")) for p in openmp)
    except Exception as e:  # threadpoolctl missing or confused: report, don't fail
        info["BLAS"] = f"unknown ({e})"
    info["cupy"] = _version("cupy-cuda12x") if _version("cupy-cuda12x") != "not installed" else _version("cupy-cuda13x")
    if cuda_available():
        import cupy

        props = cupy.cuda.runtime.getDeviceProperties(0)
        name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        free, total = cupy.cuda.runtime.memGetInfo()
        info["CUDA"] = f"available: {cupy.cuda.runtime.getDeviceCount()} device(s); 0 = {name}, {total / 2**30:.1f} GiB, sm_{props['major']}{props['minor']}"
        info["CUDA runtime"] = str(cupy.cuda.runtime.runtimeGetVersion())
        info["TF32"] = _tf32_line()
        from ..distributed import nccl_status

        info["NCCL"] = nccl_status()
    else:
        info["CUDA"] = f"not available: {cuda_unavailable_reason()}"
    from ..distributed import get_world

    try:
        world = get_world()
        info["distributed"] = f"{world.describe()}; world size {world.size}"
    except ValueError as e:
        info["distributed"] = f"error: {e}"
    info["mpi4py"] = _version("mpi4py")
    ml = _version("ml_dtypes")
    info["ml_dtypes"] = ml + ("" if ml != "not installed" else " (needed for --precision bf16: pip install ml_dtypes)")
    info["CUDA fast paths on"] = ", ".join(sorted(_enabled_kernels())) or "none (NPGPT_CUDA_KERNELS unset)"
    for pkg in ("tiktoken", "safetensors", "matplotlib", "tqdm"):
        info[pkg] = _version(pkg)
    return info


def _tf32_line() -> str:
    """Whether float32 products on the GPU use TF32 in this process now, and what a run does with it."""
    from ..backend import tf32_enabled

    now = "on" if tf32_enabled() else "off"
    env = os.environ.get("CUPY_TF32")
    source = f"$CUPY_TF32={env}" if env is not None else "CuPy's default, $CUPY_TF32 unset"
    return (f"{now} ({source}); npgpt train and npgpt bench turn it on for their run (--no-tf32: off) and "
            "restore it afterwards")


def _enabled_kernels() -> set:
    from ..cuda import enabled_kernels

    try:
        return enabled_kernels()
    except ValueError as e:
        return {f"error: {e}"}


def run(args) -> int:
    info = collect(args.device)
    width = max(len(k) for k in info)
    for k, v in info.items():
        print(f"{k.ljust(width)}  {v}")
    return 0
