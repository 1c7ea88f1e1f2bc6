"""`npgpt gradcheck`: every layer's (and the model's) backward against float64 finite differences.

With a CUDA device (`--device cuda`, or auto when one works) it also runs every layer and the model
on CuPy and compares outputs and gradients with NumPy in float32 and float64.
"""

from __future__ import annotations

import argparse
import re
import time

import numpy as np


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--only", metavar="REGEX", help="run only the checks whose name matches (e.g. 'attention|block')")
    p.add_argument("--device", default=None, choices=["cpu", "cuda", "auto"],
                   help="cuda also compares CuPy with NumPy (default: $NPGPT_DEVICE or auto)")
    p.add_argument("--seed", type=int, default=0, help="seed for inputs, upstream gradients and sampled coordinates")
    p.add_argument("--list", action="store_true", help="list the checks and exit")


def run(args) -> int:
    from ..backend import get_xp, resolve_device
    from ..gradcheck import format_results
    from ..gradcheck_suite import all_checks

    from .. import validate as V

    V.integer("--seed", args.seed, 0)
    device = resolve_device(args.device)  # --device cuda without a usable GPU is refused before the CPU suite runs
    checks = all_checks()
    if args.only:
        try:
            pattern = re.compile(args.only)
        except re.error as e:
            raise ValueError(f"--only {args.only!r} is not a regular expression ({e}); write special characters with a "
                             r"backslash (e.g. 'c_attn\.weight') or give part of a name (see --list)") from None  # fmt: skip
        checks = [c for c in checks if pattern.search(c.layer)]
        if not checks:
            raise ValueError(f"no check matches --only {args.only!r}; see `npgpt gradcheck --list`")
    if args.list:
        print("\n".join(c.layer for c in checks))
        return 0
    t0 = time.perf_counter()
    results = [r for c in checks for r in c.run(seed=args.seed)]
    print(f"Finite differences, float64, NumPy ({len(checks)} checks, {len(results)} tensors)")
    print(format_results(results))
    if device == "cuda":
        xp = get_xp("cuda")
        for dtype in (np.float32, np.float64):
            gpu = [r for c in checks for r in c.run_on(xp, dtype=dtype, seed=args.seed)]
            print(f"\nCuPy against NumPy, {np.dtype(dtype).name}")
            print(format_results(gpu))
            results += gpu
    failed = [r for r in results if not r.passed]
    print(f"\n{len(results) - len(failed)}/{len(results)} passed in {time.perf_counter() - t0:.1f}s"
          + ("" if device == "cuda" else " (CPU only: no CuPy comparison)"))
    return 1 if failed else 0
