"""What each --recompute setting costs in time: the fast engine's forward+backward, every setting
alternating in one process (so a shared machine's load falls on all of them alike), median ratios to
"none".

    python benchmarks/recompute_time.py --preset gpt2 --n-layers 4 --batch-size 2 --context-length 512
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="gpt2")
    p.add_argument("--n-layers", type=int, default=4, help="fewer layers than the preset: the ratios are per layer")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--context-length", type=int, default=512)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--drop-rate", type=float, default=0.1)
    args = p.parse_args()
    from npgpt import GPT, GPTConfig
    from npgpt.engine import make_engine
    from npgpt.model import make_rng

    cfg = GPTConfig.from_preset(args.preset, n_layers=args.n_layers, drop_rate=args.drop_rate)
    B, T = args.batch_size, args.context_length
    x = np.random.default_rng(0).integers(0, cfg.vocab_size, (B, T))
    modes = ["none", "attention", "mlp", "block"]
    engines = {m: make_engine("fast", GPT(cfg, seed=0), B, T, recompute=m) for m in modes}
    times = {m: [] for m in modes}
    losses = {m: [] for m in modes}
    for r in range(args.rounds + 1):
        for m in modes:
            t = time.perf_counter()
            losses[m].append(engines[m](x, x, training=True, rng=make_rng(r, np)))
            if r:  # the first round warms up
                times[m].append(time.perf_counter() - t)
    print(f"{args.preset} with {args.n_layers} layers, B={B}, T={T}, dropout {args.drop_rate}: forward+backward, "
          f"median of {args.rounds} alternating rounds")  # fmt: skip
    for m in modes:
        ratio = statistics.median(a / b for a, b in zip(times[m], times["none"]))
        same = all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(losses[m], losses["none"]))
        print(f"  {m:<10} {statistics.median(times[m]) * 1e3:8.0f} ms   {ratio:.2f}x none   same losses: {same}")


if __name__ == "__main__":
    main()
