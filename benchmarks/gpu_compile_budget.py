"""How much of each pytest part of benchmarks/gpu_check.sh a cold CuPy kernel cache costs, in one process and
spread over the GPU machine's cores: the estimate behind the parts' time limits (issue 25, section 3;
docs/benchmarks.md, "GPU check").

    NPGPT_FAKE_CUDA=1 NPGPT_KERNEL_ORDER_LOG=/tmp/kernels.jsonl PYTHONPATH=benchmarks \\
        python -m pytest -m cuda -p gpu_compile_budget                                        # 1. count
    python benchmarks/gpu_compile_budget.py /tmp/kernels.jsonl --cores 16 \\
        --json docs/gpu_compile_budget.json --table benchmarks/gpu_test_kernels.json          # 2. time, plan

1. Counting: on the CPU stand-in (tests/fake_cupy.py) every CUDA test runs as on a GPU, and the stand-in
   records each kernel CuPy would compile: an elementwise kernel per ufunc, dtypes, merged dimensions and
   contiguity (CuPy's cache key, roughly), a reduction per function, dtype and whole/axis, a RawModule
   per kernels/*.cu source and defines. Loaded as a pytest plugin, this module writes, per test, every
   kernel it used in the order it first used it (the order a GPU process compiles them in).
2. Timing: this script compiles, with nvcc to a cubin for sm_90 (NVRTC's work: the same front end and
   ptxas), a kernel of each kind as CuPy 14.2 builds it: an elementwise kernel over the headers CuPy's
   cupy/carray.cuh pulls in (thrust's tuple, pair and swap, <tuple>, cuda_fp16.h), a CUB reduction over
   cub/block/block_reduce.cuh and block_load.cuh (cupy/_core/_cub_reduction.pyx, _get_cub_header_include),
   and each kernels/*.cu. Each is compiled --repeats times and the least CPU time (user + system of
   nvcc and its children) taken: CPU seconds are what a compile costs on an idle core, and on a shared
   machine they are disturbed far less than wall seconds. Every reduction is counted as a CUB one (CuPy
   14.2's default accelerator is CUB), an upper bound. (--times-from JSON reuses the figures of an
   earlier run instead of measuring again.)
3. One process: replaying the log in gpu_check.sh's order of parts (a kernel compiled in an earlier part
   is cached for the later ones), it prints each part's kernels and estimated compile seconds.
4. Spread over --cores: each part planned and simulated as gpu_check.sh runs it (benchmarks/gpu_shards.py:
   the shards the driver would start, each test in the shard the plan gives it, a kernel compiled once
   any shard has it and twice when two shards need it at the same moment), after the earlier parts: the
   part's estimated wall seconds, which the parts' time limits in gpu_check.sh are made from.
--table writes what the shards plan with: per test the kernels it needs, and the seconds of each kind.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = {  # as gpu_check.sh splits them (pytest-more: every other test file)
    "pytest-core": ("test_layers.py", "test_engine.py", "test_cuda_kernels.py", "test_cuda_blas.py", "test_gpu_training.py"),
    "pytest-nccl": ("test_distributed.py",),
}
ORDER = ("pytest-core", "pytest-more", "pytest-nccl")
SHARDS_AT_MOST = {"pytest-nccl": 1}  # gpu_check.sh runs NCCL's few tests in one process
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
    part = part_of(test_file)
    files = PARTS.get(part, ())
    return ORDER.index(part), files.index(test_file) if test_file in files else len(files), test_file


def file_of(test: str) -> str:
    return test.split("::")[0].split("/")[-1]


def kind_of(key: str) -> str:
    """'elementwise', 'reduction' or 'rawmodule <file>.cu', from the repr of a stand-in's kernel key."""
    kind = key.split("'")[1]  # repr of a tuple whose first item is the kind
    return f"rawmodule {key.split(chr(39))[3]}" if kind == "rawmodule" else kind


def read_log(log: Path) -> list:
    """The log's tests (each with every kernel it used), in gpu_check.sh's order of parts and files."""
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return [r for _, r in sorted(enumerate(rows), key=lambda ir: (*check_order(file_of(ir[1]["test"])), ir[0]))]


def count(log: Path) -> dict:
    """part -> test file -> {kind: kernels first compiled there, "rawmodule <file>": n, ...}: the log's tests
    replayed in gpu_check.sh's order in one process, a kernel compiled at its first use."""
    seen, parts = set(), {p: {} for p in ORDER}
    for r in read_log(log):
        part = parts[part_of(file_of(r["test"]))].setdefault(file_of(r["test"]), {})
        for key in r["kernels"]:
            if key in seen:
                continue
            seen.add(key)
            part[kind_of(key)] = part.get(kind_of(key), 0) + 1
    return parts


def table(log: Path, times: dict) -> dict:
    """What the shards plan with (benchmarks/gpu_test_kernels.json): each kernel numbered by its first use
    in the check's order, its kind, and per test the numbers of the kernels it uses, in its order."""
    number, kinds, tests = {}, [], {}
    for r in read_log(log):
        ids = []
        for key in r["kernels"]:
            if key not in number:
                number[key] = len(kinds)
                kinds.append(kind_of(key))
            ids.append(number[key])
        tests[f"{file_of(r['test'])}::{r['test'].split('::', 1)[1]}"] = ids
    return {"about": "benchmarks/gpu_compile_budget.py --table: the kernels each CUDA test makes CuPy compile "
                     "(from the CPU stand-in), for benchmarks/gpu_shards.py's plan",
            "compile_s": {k: round(v, 3) for k, v in times.items()}, "kernels": kinds, "tests": tests}  # fmt: skip


def spread(tab: dict, cores: int) -> dict:
    """Each part planned and simulated over `cores` as gpu_check.sh runs it, after the earlier parts."""
    import gpu_shards

    t = gpu_shards.Table(tab)
    cached, out = set(), {}
    for part in ORDER:
        ids = [i for i in tab["tests"] if part_of(file_of(i)) == part]
        alone = gpu_shards.simulate(ids, [0] * len(ids), t, 1, cached)
        n, sim = gpu_shards.shards_needed(ids, t, min(cores, SHARDS_AT_MOST.get(part, cores)))
        sim = gpu_shards.simulate(ids, gpu_shards.plan(ids, t, n), t, n, cached)  # after the earlier parts
        out[part] = {"tests": len(ids), "shards": n, "wall_s": round(sim["makespan_s"], 1),
                     "compile_cpu_s": round(sim["compile_s"], 1), "kernels": len(sim["compiled"]),
                     "duplicated_kernels": sim["duplicated"], "duplicated_s": round(sim["duplicated_s"], 1),
                     "longest_shard_compile_s": round(max((s["compile_s"] for s in sim["shards"]), default=0), 1),
                     "one_process_wall_s": round(alone["makespan_s"], 1)}  # fmt: skip
        cached |= alone["compiled"]
    return {"cores": cores, "startup_s": gpu_shards.STARTUP_S, "run_s": gpu_shards.RUN_S, "parts": out}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("log", help="the NPGPT_KERNEL_ORDER_LOG of a NPGPT_FAKE_CUDA=1 pytest -m cuda -p gpu_compile_budget run")
    ap.add_argument("--nvcc", default=shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--times-from", help="take the compile seconds from this earlier --json instead of measuring")
    ap.add_argument("--cores", type=int, default=16, help="the GPU machine's cores (default 16)")
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument("--table", help="write the kernels of each test here, for gpu_shards.py")
    args = ap.parse_args(argv)
    if args.times_from:
        times = json.loads(Path(args.times_from).read_text())["compile_s"]
        print(f"compile CPU seconds, from {args.times_from}:")
    else:
        times = measure(args.nvcc, args.repeats)
        print(f"compile CPU seconds, least of {args.repeats} (nvcc, sm_90 cubin):")
    for k, v in times.items():
        print(f"  {k:32s} {v:6.2f} s")
    parts = count(Path(args.log))
    print("\nin one process: kernels first compiled in each part and test file, and the estimated compile CPU "
          "seconds (every reduction a CUB one):")
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
    tab = table(Path(args.log), times)
    result["spread"] = spread(tab, args.cores)
    s = result["spread"]
    print(f"\nspread over {args.cores} cores as gpu_check.sh runs it (gpu_shards.py; {s['startup_s']:.0f} s to start a "
          f"shard, {s['run_s']} s per test on the GPU):")  # fmt: skip
    for part, p in s["parts"].items():
        print(f"  {part:12s} {p['tests']:4d} tests, {p['shards']:2d} shards: {p['wall_s']:5.0f} s (one process: "
              f"{p['one_process_wall_s']:.0f} s); {p['kernels']} kernels, {p['compile_cpu_s']:.0f} s of compiling in all, "
              f"{p['duplicated_kernels']} compiled twice ({p['duplicated_s']:.0f} s), longest shard compiling "
              f"{p['longest_shard_compile_s']:.0f} s")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    if args.table:
        Path(args.table).write_text(json.dumps(tab, separators=(",", ":")) + "\n")
    return 0


# --- as a pytest plugin: the kernels of each test in the order it first used them -----------------------------


class _InOrder(set):
    """The stand-in's `kernels_used` (a set, emptied after each test by conftest.py) that also remembers
    the order its kernels were first added in."""

    def __init__(self):
        super().__init__()
        self.order = []

    def add(self, key):
        if key not in self:
            self.order.append(key)
        super().add(key)

    def clear(self):
        super().clear()
        self.order.clear()


def pytest_configure(config):
    fake = sys.modules.get("fake_cupy")  # (tests/conftest.py imports it under NPGPT_FAKE_CUDA=1)
    if fake is not None and os.environ.get("NPGPT_KERNEL_ORDER_LOG"):
        fake.kernels_used = _InOrder()


def pytest_runtest_teardown(item):
    fake, path = sys.modules.get("fake_cupy"), os.environ.get("NPGPT_KERNEL_ORDER_LOG")
    if fake is not None and path and isinstance(fake.kernels_used, _InOrder):
        with open(path, "a") as f:
            f.write(json.dumps({"test": item.nodeid, "kernels": [repr(k) for k in fake.kernels_used.order]}) + "\n")
        fake.kernels_used.clear()


try:
    import pytest

    pytest_runtest_teardown = pytest.hookimpl(tryfirst=True)(pytest_runtest_teardown)  # before conftest.py empties the set
except ImportError:  # run as a script: no plugin
    pass


if __name__ == "__main__":
    sys.exit(main())
