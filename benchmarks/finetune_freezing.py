"""Step time of classification fine-tuning on the readable layers, by what trains (--trainable).

    python benchmarks/finetune_freezing.py [--preset nano] [--batch-size 8] [--T 128] [--lm-weight 0.5] [--repeats 5]

Each repeat times one step (forward, backward of the trainable parameters, AdamW over them) for every
choice in turn, on the same batch, so the machine's load falls alike on all of them; the table gives
the median per choice and its ratio to "all". Frozen layers get no weight-gradient GEMM and nothing
below the lowest trainable layer is differentiated (GPT.backward's trainable=).
"""

import argparse
import time

import numpy as np

import npgpt
from npgpt.finetune.classifier import Classifier
from npgpt.finetune.config import TRAINABLE, trainable_names
from npgpt.finetune.steps import ClassifierStep
from npgpt.optim import AdamW

ap = argparse.ArgumentParser()
ap.add_argument("--preset", default="nano")
ap.add_argument("--batch-size", type=int, default=8)
ap.add_argument("--T", type=int, default=128)
ap.add_argument("--lm-weight", type=float, default=0.5)
ap.add_argument("--repeats", type=int, default=5)
args = ap.parse_args()

cfg = npgpt.GPTConfig.from_preset(args.preset, context_length=args.T)
clf = Classifier.new(npgpt.GPT(cfg, seed=0), ["a", "b", "c", "d", "e"])
rng = np.random.default_rng(0)
batch = (rng.integers(0, 50256, size=(args.batch_size, args.T)), rng.integers(0, 5, size=args.batch_size))
runs = {}
for choice in TRAINABLE:
    names = trainable_names("classify", choice, clf.params, cfg.n_layers, cfg.tie_weights, args.lm_weight)
    runs[choice] = (ClassifierStep(clf, names, args.lm_weight), AdamW({n: clf.params[n] for n in names}, lr=1e-9), names)
times = {c: [] for c in runs}
for r in range(args.repeats + 1):  # the first round warms up (allocations, caches)
    for choice, (step, opt, _) in runs.items():
        t0 = time.perf_counter()
        opt.step(step(batch, np.random.default_rng(r)).grads)
        if r:
            times[choice].append(time.perf_counter() - t0)
base = float(np.median(times["all"]))
print(f"{args.preset}, B={args.batch_size}, T={args.T}, lambda={args.lm_weight}: median of {args.repeats} steps")
for choice, (_, _, names) in runs.items():
    med = float(np.median(times[choice]))
    n = sum(int(clf.params[k].size) for k in names)
    print(f"  --trainable {choice:<10} {n:>11,} parameters  {1e3 * med:8.0f} ms/step  {med / base:5.2f}x of all")
