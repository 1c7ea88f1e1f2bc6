"""The memory estimate (npgpt/memory.py) against what a training step really reaches: the peak resident
set size of a fresh process, within 10%, on three shapes (each recompute family, with and without dropout).

How it is measured: a child process imports npgpt, runs one large matrix product (so BLAS's own buffers
are touched: the estimate does not count the interpreter, NumPy or BLAS), frees it and reads its resident
size (VmRSS); then it builds the model, the fast engine and AdamW and runs one full training step (forward,
backward, clipping, AdamW) and reads its peak resident size (VmHWM). Measured = peak - the size before
the model. One BLAS thread and one npgpt thread, so the machine's load does not change the buffers."""

import json
import os
import subprocess
import sys

import pytest

from npgpt import GPTConfig
from npgpt.memory import estimate_training

CHILD = r"""
import gc, json, sys
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
kw = json.loads(sys.argv[1])
B, T, recompute = kw.pop("B"), kw.pop("T"), kw.pop("recompute")
cfg = GPTConfig(**kw)
model = GPT(cfg, seed=0, dtype=np.float32)
engine = make_engine("fast", model, B, T, recompute=recompute)
updater = Updater(engine, AdamW(model.params), grad_clip=1.0)
x = np.random.default_rng(0).integers(0, cfg.vocab_size, (B, T))
updater([(x, x, make_rng(0, np))], lr=1e-4)
print(status("VmHWM") - before)
"""

SHAPES = [  # activations (attention probabilities, logits) far above the step's other memory
    dict(vocab_size=8000, context_length=256, emb_dim=32, n_heads=8, n_layers=2, drop_rate=0.1, B=4, T=256, recompute="none"),
    dict(vocab_size=4000, context_length=256, emb_dim=32, n_heads=8, n_layers=3, drop_rate=0.1, B=4, T=256, recompute="attention"),
    dict(vocab_size=8000, context_length=256, emb_dim=48, n_heads=8, n_layers=3, drop_rate=0.0, B=4, T=256, recompute="block"),
]  # fmt: skip


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmRSS / VmHWM from /proc (Linux)")
@pytest.mark.parametrize("shape", SHAPES, ids=[s["recompute"] for s in SHAPES])
def test_the_estimate_is_within_10_percent_of_the_peak_rss(shape):
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", NPGPT_THREADS="1")
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(shape)], capture_output=True, text=True, env=env,
                         timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr
    measured = int(out.stdout.strip().splitlines()[-1])
    kw = dict(shape)
    B, T, recompute = kw.pop("B"), kw.pop("T"), kw.pop("recompute")
    est = estimate_training(GPTConfig(**kw), B, T, "float32", recompute=recompute)
    assert measured > 32 * 2**20  # the step's memory, not noise, is what is compared
    assert abs(est.total - measured) <= 0.10 * measured, (est.describe(), measured / 2**20)
