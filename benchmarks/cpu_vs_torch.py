"""Regenerate docs/benchmarks.md's CPU table: npgpt against PyTorch eager on this machine.

    python benchmarks/cpu_vs_torch.py            # runs `npgpt bench --vs-torch` and rewrites the table
    python benchmarks/cpu_vs_torch.py --steps 7

Everything is measured in one run of `npgpt bench` (steps alternate between npgpt and PyTorch in one
process; peak memory comes from a fresh process for each). Needs the parity extra (torch, transformers).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- cpu-table:begin -->", "<!-- cpu-table:end -->"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gpt2")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--context-length", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--torch-attn", default="sdpa")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        cmd = [sys.executable, "-m", "npgpt", "bench", "--vs-torch", "--engine", "both", "--preset", args.preset,
               "--batch-size", str(args.batch_size), "--context-length", str(args.context_length), "--steps",
               str(args.steps), "--warmup", str(args.warmup), "--torch-attn", args.torch_attn, "--json", str(out)]  # fmt: skip
        proc = subprocess.run(cmd, text=True, capture_output=True)
        print(proc.stdout, end="")
        if proc.returncode:
            print(proc.stderr, file=sys.stderr)
            return proc.returncode
        r = json.loads(out.read_text())
    import numpy
    import torch

    steps = r["steps"]
    torch_name = next(k for k in steps if k.startswith("torch"))
    fast, ref, tt = steps["npgpt fast"], steps["npgpt reference"], steps[torch_name]
    mem = r.get("peak_memory_mb", {})
    gen = r.get("generation", {})
    peak = r["peak_sgemm_gflops"]
    rows = [
        "| | ms/step | tokens/s | GFLOP/s | CPU MFU | vs PyTorch |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, s in (("npgpt (fast engine)", fast), ("npgpt (readable reference)", ref), (f"PyTorch eager ({args.torch_attn})", tt)):
        rows.append(f"| {name} | {s['ms']:.0f} | {s['tokens_per_s']:.1f} | {s['gflops']:.1f} | {100 * s['gflops'] / peak:.1f}% "
                    f"| {tt['ms'] / s['ms']:.2f}x |")  # fmt: skip
    table = "\n".join([
        f"Machine: {cpu_name()}, {r['threads']} BLAS threads; Python {platform.python_version()}, NumPy {numpy.__version__}, "
        f"PyTorch {torch.__version__}. Measured {date.today().isoformat()}.",
        "",
        f"Command: `python benchmarks/cpu_vs_torch.py` (runs `npgpt bench --vs-torch --engine both --preset {args.preset} "
        f"--batch-size {args.batch_size} --context-length {args.context_length} --steps {args.steps}`).",
        "",
        f"Training step of {args.preset} (forward, backward, AdamW), B={r['B']}, T={r['T']}, float32, dropout off; "
        f"median of {args.steps} steps after {args.warmup} warm-up, npgpt and PyTorch alternating in one process. "
        f"Peak sgemm in the same run: {peak:.1f} GFLOP/s.",
        "",
        *rows,
        "",
        "| peak memory of a training step (fresh process, VmHWM) | MB |",
        "| --- | ---: |",
        f"| npgpt | {mem.get('npgpt', float('nan')):,.0f} |",
        f"| PyTorch | {mem.get('torch', float('nan')):,.0f} |",
        "",
        f"Greedy generation with the KV cache, {gen.get('npgpt_tokens_per_s', 0):.1f} tokens/s for npgpt against "
        f"{gen.get('torch_tokens_per_s', 0):.1f} for transformers' generate (ratio "
        f"{gen.get('npgpt_tokens_per_s', 0) / max(gen.get('torch_tokens_per_s', 1e-9), 1e-9):.2f}; identical tokens: "
        f"{gen.get('same_tokens')}).",
    ])  # fmt: skip
    text = DOC.read_text() if DOC.exists() else f"# Benchmarks\n\n## CPU\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text:
        text += f"\n## CPU\n\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(f"{head}{BEGIN}\n{table}\n{END}{tail}")
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
