"""The CPU training step of today's npgpt against the same step at an older commit, the two alternating in
one process (so a shared machine's drift falls on both alike): per-pair ratios new/old and their median.

The older package is taken from git (`git archive COMMIT npgpt`) into a temporary folder as `npgpt_old`,
its absolute imports renamed, so both can be imported side by side. Both build the model from the same
seed and take the same batch; the script checks the parameters and every step's loss agree.

    python benchmarks/step_against_commit.py --commit 3d03f7c --threads 1 --pairs 10
"""

from __future__ import annotations

import argparse
import io
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
_ABSOLUTE = re.compile(r"^(\s*)(from|import) npgpt\b", re.M)


def import_old_package(commit: str, into: Path):
    """npgpt as it was at `commit`, importable as npgpt_old (absolute imports renamed)."""
    tar = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "npgpt"], capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        t.extractall(into, filter="data")
    (into / "npgpt").rename(into / "npgpt_old")
    for f in (into / "npgpt_old").rglob("*.py"):
        f.write_text(_ABSOLUTE.sub(r"\1\2 npgpt_old", f.read_text(encoding="utf-8")), encoding="utf-8")
    sys.path.insert(0, str(into))
    import npgpt_old.bench
    import npgpt_old.config
    import npgpt_old.model

    return npgpt_old


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--commit", required=True, help="the older commit (e.g. 3d03f7c, main before issue 28)")
    p.add_argument("--preset", default="gpt2")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--context-length", type=int, default=256)
    p.add_argument("--pairs", type=int, default=10, help="timed steps of each, alternating (after one warm-up each)")
    p.add_argument("--threads", type=int, default=1, help="BLAS threads (default 1: steadier on a shared machine)")
    args = p.parse_args()
    from npgpt import GPT, GPTConfig
    from npgpt import bench as new_bench

    new_bench.set_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        old = import_old_package(args.commit, Path(tmp))
        B, T = args.batch_size, args.context_length
        new_model = GPT(GPTConfig.from_preset(args.preset), seed=0, device="cpu", dtype=np.dtype("float32"))
        old_model = old.model.GPT(old.config.GPTConfig.from_preset(args.preset), seed=0, device="cpu",
                                  dtype=np.dtype("float32"))  # fmt: skip
        if any(not np.array_equal(new_model.params[k], old_model.params[k]) for k in new_model.params):
            raise SystemExit("the two commits build different models from the same seed: nothing to compare")
        steps = {"old": old.bench.NpgptStep(old_model, B, T, "fast"), "new": new_bench.NpgptStep(new_model, B, T, "fast")}
        x, y = new_bench.make_batch(new_model.config, B, T, 0)
        times, losses = new_bench.time_steps(steps, x, y, args.pairs, 1, False, 0, raw=True)
    ratios = [n / o for n, o in zip(times["new"], times["old"])]
    print(f"{args.preset} B={B} T={T}, float32, {args.threads} BLAS thread(s); {args.commit} against the working tree")
    print("old ms:", " ".join(f"{t * 1e3:.0f}" for t in times["old"]))
    print("new ms:", " ".join(f"{t * 1e3:.0f}" for t in times["new"]))
    print(f"new/old per pair {min(ratios):.3f}-{max(ratios):.3f}, median {statistics.median(ratios):.3f}")
    same = np.allclose(losses["old"], losses["new"], rtol=1e-6, atol=0)
    print(f"losses of every step {'equal' if same else 'DIFFERENT'} (last {losses['new'][-1]:.6f})")


if __name__ == "__main__":
    main()
