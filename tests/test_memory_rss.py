"""The memory estimate (npgpt/memory.py) against what a training step really reaches: the peak resident
set size of a fresh process, within 10%, on three shapes (each recompute family, with and without dropout).

How it is measured: a child process imports npgpt, runs one large matrix product (so BLAS's own buffers
are touched: the estimate does not count the interpreter, NumPy or BLAS), frees it and reads its resident
size (VmRSS); then it builds the model, the fast engine and AdamW and runs one full training step (forward,
backward, clipping, AdamW) and reads its peak resident size (VmHWM). Measured = peak - the size before
the model. One BLAS thread and one npgpt thread, so the machine's load does not change the buffers."""

import importlib.util
import os
from pathlib import Path

import pytest

from npgpt import GPTConfig
from npgpt.memory import estimate_training

# the child process that benchmarks/recompute_memory.py runs: one training step, its peak RSS above the interpreter
spec = importlib.util.spec_from_file_location("recompute_memory", Path(__file__).parents[1] / "benchmarks" / "recompute_memory.py")
recompute_memory = importlib.util.module_from_spec(spec)
spec.loader.exec_module(recompute_memory)

SHAPES = [  # activations (attention probabilities, logits) far above the step's other memory
    dict(vocab_size=8000, context_length=256, emb_dim=32, n_heads=8, n_layers=2, drop_rate=0.1, B=4, T=256, recompute="none"),
    dict(vocab_size=4000, context_length=256, emb_dim=32, n_heads=8, n_layers=3, drop_rate=0.1, B=4, T=256, recompute="attention"),
    dict(vocab_size=8000, context_length=256, emb_dim=48, n_heads=8, n_layers=3, drop_rate=0.0, B=4, T=256, recompute="block"),
]  # fmt: skip


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmRSS / VmHWM from /proc (Linux)")
@pytest.mark.parametrize("shape", SHAPES, ids=[s["recompute"] for s in SHAPES])
def test_the_estimate_is_within_10_percent_of_the_peak_rss(shape):
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", NPGPT_THREADS="1")
    kw = dict(shape)
    B, T, recompute = kw.pop("B"), kw.pop("T"), kw.pop("recompute")
    measured = recompute_memory.measure(kw, B, T, recompute, env=env, timeout=300)["measured"]
    est = estimate_training(GPTConfig(**kw), B, T, "float32", recompute=recompute)
    assert measured > 32 * 2**20  # the step's memory, not noise, is what is compared
    assert abs(est.total - measured) <= 0.10 * measured, (est.describe(), measured / 2**20)
