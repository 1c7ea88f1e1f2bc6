"""Times CuPy's kernel compilation in each Python process of benchmarks/gpu_check.sh, so that the check logs
compile time apart from run time (a GPU machine starts with no CuPy kernel cache: every elementwise and
reduction kernel is compiled by NVRTC on first use, a CUB reduction ~1.6 s of CPU).

gpu_check.sh puts a .pth file in its venv that runs `import gpu_compile_timer; gpu_compile_timer.install()`
in every Python process started from it (the parts, and the processes they start). install() wraps two
functions of cupy.cuda.compiler as soon as it is imported, read from CuPy's source (tag v14.2.0):
- `_compile_module_with_cache`, through which cupy/_core/core.pyx's compile_with_cache gets every kernel
  module (hits of CuPy's on-disk kernel cache and loading the module included): "fetch";
- `_compile_using_nvrtc_no_warning`, which `_compile_with_cache_cuda` calls by its module-global name on
  a cache miss: "nvrtc", the compiles themselves.
At exit one JSON line goes to $NPGPT_COMPILE_LOG: the part ($NPGPT_CHECK_PART) and shard ($NPGPT_CHECK_SHARD,
when gpu_check_tools.py runs the part in shards), the command, the process's wall seconds, and the count
and seconds of each. A CuPy whose compiler module lacks either function is logged as not timed, and
nothing else changes. Processes that compile at once (the shards) all read and write CuPy's one on-disk
cache, which is safe for concurrent writers (benchmarks/gpu_shards.py says why, from CuPy's source).

Loaded into pytest too (`-p gpu_compile_timer`), it prints after the run, per test file, the seconds its
tests took and how many of them were spent compiling.
"""

from __future__ import annotations

import atexit
import importlib.abc
import importlib.machinery
import json
import os
import sys
import time

WRAPPED = ("_compile_module_with_cache", "_compile_using_nvrtc_no_warning")
STATS = {"fetch_n": 0, "fetch_s": 0.0, "nvrtc_n": 0, "nvrtc_s": 0.0, "timed": False}
_START = time.perf_counter()  # (an NVRTC compile happens inside a fetch: its seconds count in both)


def _timed(fn, kind: str):
    def call(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            STATS[f"{kind}_n"] += 1
            STATS[f"{kind}_s"] += time.perf_counter() - t0

    call.__wrapped__ = fn
    return call


def patch(compiler) -> None:
    """Wrap the two functions of a loaded cupy.cuda.compiler module (once)."""
    if STATS["timed"] or not all(callable(getattr(compiler, name, None)) for name in WRAPPED):
        return
    compiler._compile_module_with_cache = _timed(compiler._compile_module_with_cache, "fetch")
    compiler._compile_using_nvrtc_no_warning = _timed(compiler._compile_using_nvrtc_no_warning, "nvrtc")
    STATS["timed"] = True


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when cupy.cuda.compiler is about to load, lets the normal finders find it and
    patches the module right after it has run."""

    def find_spec(self, name, path, target=None):
        if name != "cupy.cuda.compiler":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            patch(module)

        spec.loader.exec_module = exec_module
        return spec


def _write_log() -> None:
    path = os.environ.get("NPGPT_COMPILE_LOG")
    if not path or "cupy" not in sys.modules:
        return
    record = {"part": os.environ.get("NPGPT_CHECK_PART", ""), "shard": os.environ.get("NPGPT_CHECK_SHARD", ""),
              "argv": " ".join(sys.argv)[:200], "pid": os.getpid(),
              "wall_s": round(time.perf_counter() - _START, 2), **{k: round(v, 2) if isinstance(v, float) else v
                                                                     for k, v in STATS.items()}}  # fmt: skip
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError:
        pass


def install() -> None:
    """Patch cupy.cuda.compiler now if it is loaded, else when it is; log at exit."""
    if "cupy.cuda.compiler" in sys.modules:
        patch(sys.modules["cupy.cuda.compiler"])
    elif not any(isinstance(f, _PatchOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())
    atexit.register(_write_log)


# --- as a pytest plugin: compile time per test file ------------------------------------------------------------

_per_file: dict = {}


def pytest_configure(config):
    install()  # (already done by the venv's .pth; this covers a run without it)


def pytest_runtest_protocol(item, nextitem):
    item.stash[_KEY] = (time.perf_counter(), STATS["nvrtc_s"], STATS["nvrtc_n"])


def pytest_runtest_teardown(item, nextitem):
    t0, c0, n0 = item.stash.get(_KEY, (time.perf_counter(), STATS["nvrtc_s"], STATS["nvrtc_n"]))
    row = _per_file.setdefault(item.nodeid.split("::")[0].split("/")[-1], [0, 0.0, 0.0, 0])
    row[0] += 1
    row[1] += time.perf_counter() - t0
    row[2] += STATS["nvrtc_s"] - c0
    row[3] += STATS["nvrtc_n"] - n0


def pytest_terminal_summary(terminalreporter):
    if not _per_file:
        return
    tr = terminalreporter
    how = "NVRTC compiles (CuPy's kernel cache missed)" if STATS["timed"] else "not timed (CuPy not loaded or unknown)"
    tr.write_line(f"[compile time] per test file: tests, seconds in all, seconds compiling, kernels compiled ({how})")
    for name, (n, wall, comp, kernels) in _per_file.items():
        tr.write_line(f"[compile time] {name:32s} {n:4d} tests {wall:7.1f} s, compiling {comp:6.1f} s ({kernels} kernels)")
    total = [sum(r[i] for r in _per_file.values()) for i in range(4)]
    tr.write_line(f"[compile time] {'all':32s} {total[0]:4d} tests {total[1]:7.1f} s, compiling {total[2]:6.1f} s "
                  f"({total[3]} kernels)")  # fmt: skip


try:
    import pytest

    _KEY = pytest.StashKey[tuple]()
except ImportError:  # not under pytest: the plugin hooks are never called
    _KEY = None
