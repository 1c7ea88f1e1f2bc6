"""How much of each pytest part of benchmarks/gpu_check.sh a cold CuPy kernel cache costs: the estimate
behind the parts' time limits (issue 25, section 3; docs/benchmarks.md, "GPU check").

    NPGPT_FAKE_CUDA=1 NPGPT_FAKE_KERNEL_LOG=/tmp/kernels.jsonl python -m pytest -m cuda   # 1. count
    python benchmarks/gpu_compile_budget.py /tmp/kernels.jsonl                              # 2. time, add up

1. Counting: on the CPU stand-in (tests/fake_cupy.py) every CUDA test runs as on a GPU, and the stand-in
   records each kernel CuPy would compile: an elementwise kernel per ufunc, dtypes, merged dimensions and
   contiguity (CuPy's cache key, roughly), a reduction per function, dtype and whole/axis, a RawModule
   per kernels/*.cu source and defines; conftest.py logs, per test, the ones no earlier test needed.
2. Timing: this script compiles, with nvcc to a cubin for sm_90 (NVRTC's work: the same front end and
   ptxas), a kernel of each kind as CuPy 14.2 builds it: an elementwise kernel over the headers CuPy's
   cupy/carray.cuh pulls in (thrust's tuple, pair and swap, <tuple>, cuda_fp16.h), a CUB reduction over
   cub/block/block_reduce.cuh and block_load.cuh (cupy/_core/_cub_reduction.pyx, _get_cub_header_include),
   and each kernels/*.cu. Each is compiled --repeats times and the least CPU time (user + system of
   nvcc and its children) taken: CPU seconds are what a compile costs on an idle core, and on a shared
   machine they are disturbed far less than wall seconds. Every reduction is counted as a CUB one (CuPy 14.2's default
   accelerator is CUB), an upper bound.
Then, replaying the log in gpu_check.sh's order of parts (a kernel compiled in an earlier part is
cached for the later ones), it prints each part's kernels and estimated compile seconds.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = {  # as gpu_check.sh splits them
    "pytest-core": ("test_layers.py", "test_engine.py", "test_cuda_kernels.py", "test_cuda_blas.py", "test_gpu_training.py"),
    "pytest-nccl": ("test_distributed.py",),
}
ELEMENTWISE = r"""
#include <initializer_list>
#include <cassert>
#include <cstddef>
#include <tuple>
#include <thrust/swap.h>
#include <thrust/tuple.h>
#include <thrust/pair.h>
#include <cuda_fp16.h>
extern "C" __global__ void cupy_add(const float* a, const float* b, float* out, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)blockDim.x * gridDim.x)
        out[i] = a[i] + b[i];
}
"""
CUB_REDUCTION = r"""
#include <tuple>
#include <thrust/tuple.h>
#include <thrust/pair.h>
#include <cuda_fp16.h>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_load.cuh>
extern "C" __global__ void cupy_sum(const float* in, float* out, int n) {
    typedef cub::BlockReduce<float, 512> Reduce;
    __shared__ typename Reduce::TempStorage tmp;
    float v = 0;
    for (int i = threadIdx.x; i < n; i += 512) v += in[blockIdx.x * n + i];
    float s = Reduce(tmp).Sum(v);
    if (threadIdx.x == 0) out[blockIdx.x] = s;
}
"""


def nvcc_seconds(source: str, name: str, nvcc: str, repeats: int, includes=()) -> float:
    """The least CPU time (user + system, of nvcc and what it runs) of `repeats` compiles of `source` to an
    sm_90 cubin: CPU seconds, not wall seconds, so that the other work on a shared machine counts less."""
    best = float("inf")
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / name
        src.write_text(source)
        cmd = [nvcc, "-cubin", "-arch=sm_90", "-std=c++17", *(f"-I{i}" for i in includes), "-o", str(Path(d) / "k.cubin"),
               str(src)]  # fmt: skip
        for _ in range(repeats):
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            subprocess.run(cmd, check=True, capture_output=True)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            best = min(best, after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return best


def measure(nvcc: str, repeats: int) -> dict:
    times = {"elementwise": nvcc_seconds(ELEMENTWISE, "elementwise.cu", nvcc, repeats),
             "reduction": nvcc_seconds(CUB_REDUCTION, "reduction.cu", nvcc, repeats)}  # fmt: skip
    for cu in sorted((ROOT / "kernels").glob("*.cu")):
        times[f"rawmodule {cu.name}"] = nvcc_seconds(cu.read_text(), cu.name, nvcc, repeats, includes=[ROOT / "kernels"])
    return times


def part_of(test_file: str) -> str:
    for part, files in PARTS.items():
        if test_file in files:
            return part
    return "pytest-more"


def check_order(test_file: str) -> tuple:
    """Where gpu_check.sh runs a test file: its part, then its place in that part (the rest by name)."""
    order = ["pytest-core", "pytest-more", "pytest-nccl"]
    part = part_of(test_file)
    files = PARTS.get(part, ())
    return order.index(part), files.index(test_file) if test_file in files else len(files), test_file


def count(log: Path) -> dict:
    """part -> test file -> {kind: kernels first compiled there, "rawmodule <file>": n, ...}: the log's tests
    (each with every kernel it used) replayed in gpu_check.sh's order, a kernel compiled at its first use."""
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    file_of = lambda r: r["test"].split("::")[0].split("/")[-1]  # noqa: E731
    rows = sorted(enumerate(rows), key=lambda ir: (*check_order(file_of(ir[1])), ir[0]))
    seen, parts = set(), {p: {} for p in ("pytest-core", "pytest-more", "pytest-nccl")}
    for _, r in rows:
        part = parts[part_of(file_of(r))].setdefault(file_of(r), {})
        for key in r["kernels"]:
            if key in seen:
                continue
            seen.add(key)
            kind = key.split("'")[1]  # repr of a tuple whose first item is the kind
            if kind == "rawmodule":
                kind = f"rawmodule {key.split(chr(39))[3]}"
            part[kind] = part.get(kind, 0) + 1
    return parts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("log", help="the NPGPT_FAKE_KERNEL_LOG of a NPGPT_FAKE_CUDA=1 pytest -m cuda run")
    ap.add_argument("--nvcc", default=shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args(argv)
    times = measure(args.nvcc, args.repeats)
    print(f"compile CPU seconds, least of {args.repeats} (nvcc, sm_90 cubin):")
    for k, v in times.items():
        print(f"  {k:32s} {v:6.2f} s")
    parts = count(Path(args.log))
    print("\nkernels first compiled in each part and test file, and the estimated compile CPU seconds (every "
          "reduction a CUB one):")
    result = {"compile_s": times, "parts": {}}
    for part, files in parts.items():
        part_s = 0.0
        for name, kinds in files.items():
            seconds = sum(n * times.get(k, times["elementwise"]) for k, n in kinds.items())
            part_s += seconds
            summary = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
            print(f"  {part:12s} {name:28s} {seconds:6.0f} s: {summary or 'none'}")
        result["parts"][part] = {"files": files, "compile_s": round(part_s, 1)}
        print(f"  {part:12s} {'(all)':28s} {part_s:6.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
