"""Peak memory and step time of each --recompute setting, against memory.py's estimate.

    python benchmarks/recompute_memory.py --preset gpt2 --batch-size 2 --context-length 1024

Each setting runs in a fresh process: import npgpt, touch BLAS's buffers with one large product, read the
resident size (VmRSS), build the model, the fast engine and AdamW, run `--steps` training steps (dropout
as the preset has it) and read the peak resident size (VmHWM). "measured" is the difference: the
memory of the run itself, which is what the estimate counts. The time is the last step's.

tests/test_memory_rss.py runs the same child (CHILD, measure) on small shapes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys

CHILD = r"""
import gc, json, sys, time
import numpy as np

def status(key):
    return int([l for l in open("/proc/self/status") if l.startswith(key)][0].split()[1]) * 1024

a = np.ones((1024, 1024), np.float32)
a @ a
del a
from npgpt import GPT, GPTConfig
from npgpt.engine import make_engine
from npgpt.model import make_rng
from npgpt.optim import AdamW
from npgpt.update import Updater
gc.collect()
before = status("VmRSS")
kw = json.loads(sys.argv[1])  # {"config": GPTConfig's fields, "B", "T", "recompute", "steps"}
cfg = GPTConfig(**kw["config"])
B, T = kw["B"], kw["T"]
model = GPT(cfg, seed=0, dtype=np.float32)
engine = make_engine("fast", model, B, T, recompute=kw["recompute"])
updater = Updater(engine, AdamW(model.params), grad_clip=1.0)
x = np.random.default_rng(0).integers(0, cfg.vocab_size, (B, T))
for i in range(kw["steps"]):
    t = time.perf_counter()
    loss = updater([(x, x, make_rng(i, np))], lr=1e-4).loss
    seconds = time.perf_counter() - t
print(json.dumps({"measured": status("VmHWM") - before, "seconds": seconds, "loss": loss}))
"""


def measure(config: dict, B: int, T: int, recompute: str, steps: int = 1, env=None, timeout=None) -> dict:
    """Run CHILD in a fresh process: {"measured": peak bytes above the interpreter, "seconds", "loss"}."""
    kw = dict(config=config, B=B, T=T, recompute=recompute, steps=steps)
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(kw)], capture_output=True, text=True, env=env,
                         timeout=timeout)  # fmt: skip
    if out.returncode:
        raise RuntimeError(out.stderr.strip() or f"the child exited {out.returncode}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="gpt2")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--context-length", type=int, default=1024)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--recompute", nargs="+", default=["none", "attention", "mlp", "block"])
    args = p.parse_args()
    from npgpt import GPTConfig
    from npgpt.memory import estimate_training, fmt_bytes

    cfg = GPTConfig.from_preset(args.preset)
    print(f"{args.preset}, B={args.batch_size}, T={args.context_length}, float32, dropout {cfg.drop_rate}, fast engine")
    print("| --recompute | estimate | measured peak RSS (above the interpreter) | estimate / measured | step s | loss |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for mode in args.recompute:
        try:
            r = measure(dataclasses.asdict(cfg), args.batch_size, args.context_length, mode, args.steps)
        except RuntimeError as e:
            print(f"| {mode} | failed: {str(e).splitlines()[-1:]} |")
            continue
        est = estimate_training(cfg, args.batch_size, args.context_length, recompute=mode).total
        print(f"| {mode} | {fmt_bytes(est)} | {fmt_bytes(r['measured'])} | {est / r['measured']:.3f} | "
              f"{r['seconds']:.1f} | {r['loss']:.6f} |", flush=True)


if __name__ == "__main__":
    main()
