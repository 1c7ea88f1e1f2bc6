"""Step time of classification fine-tuning on the readable layers, by what trains (--trainable).

    python benchmarks/finetune_freezing.py [--preset nano] [--batch-size 8] [--T 128] [--lm-weight 0.5] [--repeats 5]

Each repeat times one step (forward, backward of the trainable parameters, AdamW over them) for every
choice, in a new random order each time, on the same batch, so the machine's load falls alike on all of them; the table gives
the medians per choice (wall clock and this process's CPU time) and their ratios to "all". The row
"last-block, every gradient computed" freezes in the optimizer only, for comparison. Frozen layers get no weight-gradient GEMM and nothing
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
class EveryGradient(ClassifierStep):
    """Freezing done only in the optimizer: every gradient computed, the frozen ones then dropped."""

    def __call__(self, batch, rng=None):
        keep, self.trainable = self.trainable, list(clf.params)
        super().__call__(batch, rng)
        self.trainable, self.grads = keep, {n: self.grads[n] for n in keep}
        return self


runs = {}
for choice in TRAINABLE:
    names = trainable_names("classify", choice, clf.params, cfg.n_layers, cfg.tie_weights, args.lm_weight)
    runs[choice] = (ClassifierStep(clf, names, args.lm_weight), AdamW({n: clf.params[n] for n in names}, lr=1e-9), names)
    if choice == "last-block":
        runs["last-block, every gradient computed"] = (EveryGradient(clf, names, args.lm_weight),
                                                       AdamW({n: clf.params[n] for n in names}, lr=1e-9), names)  # fmt: skip
wall, cpu = {c: [] for c in runs}, {c: [] for c in runs}
order = np.random.default_rng(1)
for r in range(args.repeats + 1):  # the first round warms up (allocations, caches)
    for choice in order.permutation(list(runs)):  # a new order each round: no choice always runs first
        step, opt, _ = runs[choice]
        t0, c0 = time.perf_counter(), time.process_time()
        opt.step(step(batch, np.random.default_rng(r)).grads)
        if r:
            wall[choice].append(time.perf_counter() - t0)
            cpu[choice].append(time.process_time() - c0)
print(f"{args.preset}, B={args.batch_size}, T={args.T}, lambda={args.lm_weight}: median of {args.repeats} steps "
      "(wall clock, and CPU time of this process, which other jobs on the machine disturb less)")
for choice, (_, _, names) in runs.items():
    n = sum(int(clf.params[k].size) for k in names)
    w, c = float(np.median(wall[choice])), float(np.median(cpu[choice]))
    w0, c0 = float(np.median(wall["all"])), float(np.median(cpu["all"]))
    print(f"  --trainable {choice:<36} {n:>11,} parameters  wall {1e3 * w:6.0f} ms ({w / w0:4.2f}x)  "
          f"CPU {1e3 * c:6.0f} ms ({c / c0:4.2f}x)")
