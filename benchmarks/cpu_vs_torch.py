"""Regenerate docs/benchmarks.md's CPU table: npgpt against PyTorch eager on this machine.

    python benchmarks/cpu_vs_torch.py                      # B=2 T=256 and B=4 T=1024, one library per process
    python benchmarks/cpu_vs_torch.py --shapes 2x256 --steps 7
    python benchmarks/cpu_vs_torch.py --in-process         # npgpt and PyTorch alternating in one process

Each shape is one run of `npgpt bench --vs-torch --isolate --rounds R`: the fast engine, the readable
reference (small shapes only) and PyTorch eager (transformers) each run warm-up and timed steps in their
own fresh process, one after the other, R times over (the libraries alternating, so a machine whose
speed drifts affects both alike); the median of every round's timed steps is reported, the same
processes give peak memory, and each measures the peak sgemm rate after its steps (MFU is against
their median). Needs the parity extra (torch, transformers).
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

from npgpt.bench import cpu_name

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- cpu-table:begin -->", "<!-- cpu-table:end -->"


def shape(text: str) -> tuple[int, int]:
    try:
        b, t = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a shape is BxT, e.g. 2x256; got {text!r}") from None
    if b < 1 or t < 1:
        raise argparse.ArgumentTypeError(f"a shape's B and T are at least 1; got {text!r}")
    return b, t


def bench(args, B: int, T: int) -> dict | None:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        large = T * B > 2048
        steps, rounds = (args.large_steps, args.large_rounds) if large else (args.steps, args.rounds)
        cmd = [sys.executable, "-m", "npgpt", "bench", "--vs-torch", "--engine", "fast" if large else "both",
               "--preset", args.preset, "--batch-size", str(B), "--context-length", str(T), "--steps", str(steps),
               "--warmup", str(args.warmup), "--torch-attn", args.torch_attn, "--json", str(out)]  # fmt: skip
        if not args.in_process:
            cmd += ["--isolate", "--rounds", str(rounds)]
        if large:
            cmd += ["--generate", "0"]  # generation is measured once, at the small shape
        print(" ".join(cmd[2:]), flush=True)
        proc = subprocess.run(cmd, text=True, stdout=subprocess.PIPE)
        print(proc.stdout, end="")
        if proc.returncode:
            return None
        return json.loads(out.read_text())


def rows_for(r: dict, torch_attn: str) -> list[str]:
    steps, peak, mem = r["steps"], r["peak_sgemm_gflops"], r.get("peak_memory_mb", {})
    tt = steps[next(k for k in steps if k.startswith("torch"))]
    rows = []
    for name, key, mb in (("npgpt (fast engine)", "npgpt fast", mem.get("npgpt")), ("npgpt (readable reference)", "npgpt reference", None),
                          (f"PyTorch eager ({torch_attn})", next(k for k in steps if k.startswith("torch")), mem.get("torch"))):  # fmt: skip
        if key not in steps:  # the reference is timed at the small shapes only
            continue
        s = steps[key]
        ratio = f"{tt['ms'] / s['ms']:.2f}x"
        if key == "npgpt fast" and len(r.get("per_round_ms", [])) > 1:
            each = [x[next(k for k in x if k.startswith("torch"))] / x[key] for x in r["per_round_ms"]]
            ratio += f" ({', '.join(f'{e:.2f}' for e in each)})"
        rows.append(f"| B={r['B']}, T={r['T']} | {name} | {s['ms']:,.0f} | {s['tokens_per_s']:.1f} | {s['gflops']:.1f} "
                    f"| {100 * s['gflops'] / peak:.1f}% | {ratio} | {f'{mb:,.0f}' if mb else '-'} |")  # fmt: skip
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gpt2")
    ap.add_argument("--shapes", nargs="+", type=shape, default=[(2, 256), (4, 1024)], metavar="BxT")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per library at the small shapes")
    ap.add_argument("--large-steps", type=int, default=3, help="timed steps when B*T > 2048")
    ap.add_argument("--rounds", type=int, default=3, help="process rounds at the small shapes")
    ap.add_argument("--large-rounds", type=int, default=1, help="process rounds when B*T > 2048")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--torch-attn", default="sdpa")
    ap.add_argument("--in-process", action="store_true", help="alternate the libraries' steps in one process instead")
    args = ap.parse_args()
    runs = []
    for B, T in args.shapes:
        r = bench(args, B, T)
        if r is None:
            return 1
        runs.append(r)
    import numpy
    import torch

    first = runs[0]
    gen = first.get("generation", {})
    how = ("npgpt and PyTorch alternating in one process" if args.in_process else
           "each library (and engine) in its own fresh process, one after the other")  # fmt: skip
    shapes = " and ".join(f"B={r['B']}, T={r['T']} ({r['peak_sgemm_gflops']:.1f})" for r in runs)
    rounds = f"{args.rounds} rounds ({args.large_rounds} at the large shape)"
    table = "\n".join([
        f"Machine: {cpu_name()}, {first['threads']} BLAS threads; Python {platform.python_version()}, NumPy {numpy.__version__}, "
        f"PyTorch {torch.__version__}. Measured {date.today().isoformat()}.",
        "",
        f"Command: `python benchmarks/cpu_vs_torch.py{' --in-process' if args.in_process else ''}` (for each shape, "
        f"`npgpt bench --vs-torch --engine both --preset {args.preset} --batch-size B --context-length T"
        f"{'' if args.in_process else ' --isolate --rounds R'}`; the large shape with `--engine fast`).",
        "",
        f"Training step of {args.preset} (forward, backward, AdamW), float32, dropout off; median of {args.steps} timed "
        f"steps ({args.large_steps} at the large shape) after {args.warmup} warm-up, {how}"
        f"{'' if args.in_process else ', ' + rounds}; in brackets after the fast engine's ratio, each round's. MFU is "
        f"against the peak sgemm rate measured in the same run (GFLOP/s, in brackets): {shapes}. Peak memory: peak "
        f"resident set size of the process that ran the steps.",
        "",
        "| shape | | ms/step | tokens/s | GFLOP/s | CPU MFU | vs PyTorch (per round) | peak MB |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        *(row for r in runs for row in rows_for(r, args.torch_attn)),
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
    (DOC.parent / "cpu_vs_torch.json").write_text(json.dumps(runs, indent=1))
    print(f"wrote {DOC} and docs/cpu_vs_torch.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
