"""Step time of fine-tuning: the readable reference against the fast engine, by task and by what trains.

    python benchmarks/finetune_freezing.py [--preset nano] [--batch-size 8] [--T 128] [--repeats 9]

Rows: classification with lambda 0.5 and with lambda 0, and instruction tuning (the masked LM loss,
a quarter of the targets at -100), each with --trainable all, last-block and head, each on both
engines. A step is what the trainer times: forward, backward of the trainable parameters, AdamW over
them. Each round times one step of every row, in a new random order (so the load of a shared machine
falls alike on all rows); the first round warms up. The table gives medians (wall clock, and this
process's CPU time, which other jobs disturb less), fast / reference per row, and on the fast engine
each setting against --trainable all. Freezing skips the frozen layers' weight-gradient GEMMs and the
backward below the lowest trainable layer (GPT.backward and FastLossAndGrads, trainable=).
"""

import argparse
import time

import numpy as np

import npgpt
from npgpt.finetune.classifier import Classifier
from npgpt.finetune.config import TRAINABLE, trainable_names
from npgpt.finetune.steps import classifier_step, instruct_step
from npgpt.optim import AdamW

ap = argparse.ArgumentParser()
ap.add_argument("--preset", default="nano")
ap.add_argument("--batch-size", type=int, default=8)
ap.add_argument("--T", type=int, default=128)
ap.add_argument("--repeats", type=int, default=9)
ap.add_argument("--dtype", default="float32")
args = ap.parse_args()

B, T = args.batch_size, args.T
cfg = npgpt.GPTConfig.from_preset(args.preset, context_length=T)
clf = Classifier.new(npgpt.GPT(cfg, seed=0, dtype=np.dtype(args.dtype)), ["a", "b", "c", "d", "e"])
rng = np.random.default_rng(0)
cls_batch = (rng.integers(0, 50256, size=(B, T)), rng.integers(0, 5, size=B))
x = rng.integers(0, 50256, size=(B, T))
y = np.where(np.arange(T) < T // 4, -100, rng.integers(0, 50256, size=(B, T)))  # a masked prompt
inst_batch = (x, y)

TASKS = {"classify, lambda 0.5": 0.5, "classify, lambda 0": 0.0, "instruct": None}
ENGINES = ("reference", "fast")
rows = {}
for task, lam in TASKS.items():
    for choice in TRAINABLE:
        for engine in ENGINES:
            if lam is None:
                names = trainable_names("instruct", choice, clf.model.params, cfg.n_layers, cfg.tie_weights, 0.0)
                step, batch = instruct_step(engine, clf.model, names, B, T), inst_batch
            else:
                names = trainable_names("classify", choice, clf.params, cfg.n_layers, cfg.tie_weights, lam)
                step, batch = classifier_step(engine, clf, names, lam, B, T), cls_batch
            opt = AdamW({n: clf.params[n] for n in names}, lr=0.0)  # lr 0: every row sees the same weights
            rows[(task, choice, engine)] = (step, opt, batch, sum(int(clf.params[n].size) for n in names))

wall, cpu = {r: [] for r in rows}, {r: [] for r in rows}
order = np.random.default_rng(1)
keys = list(rows)
for r in range(args.repeats + 1):  # the first round warms up (allocations, caches)
    for i in order.permutation(len(keys)):
        step, opt, batch, _ = rows[keys[i]]
        t0, c0 = time.perf_counter(), time.process_time()
        opt.step(step(batch, np.random.default_rng(r)).grads)
        if r:
            wall[keys[i]].append(time.perf_counter() - t0)
            cpu[keys[i]].append(time.process_time() - c0)

med = {k: (1e3 * float(np.median(wall[k])), 1e3 * float(np.median(cpu[k]))) for k in rows}
print(f"{args.preset} (C={cfg.emb_dim}, L={cfg.n_layers}, V={cfg.vocab_size}), B={B}, T={T}, {args.dtype}: median of "
      f"{args.repeats} steps, wall clock (CPU time of this process)")
print(f"{'task':<22}{'--trainable':<12}{'parameters':>12}{'reference':>20}{'fast':>20}{'fast/ref':>10}{'fast vs all':>13}")
for task in TASKS:
    for choice in TRAINABLE:
        (rw, rc), (fw, fc) = med[(task, choice, "reference")], med[(task, choice, "fast")]
        all_w = med[(task, "all", "fast")][0]
        n = rows[(task, choice, "fast")][3]
        print(f"{task:<22}{choice:<12}{n:>12,}{rw:>11.0f} ({rc:>5.0f}){fw:>11.0f} ({fc:>5.0f}){fw / rw:>9.2f}x"
              f"{fw / all_w:>12.2f}x")
