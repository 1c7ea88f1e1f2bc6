"""Training on CuPy against training on NumPy (issue 6's "20 training steps on CuPy tracking NumPy's
losses"), in float32, with and without TF32, and in mixed precision. These need a GPU and skip cleanly
without one; the CPU halves of each comparison run in tests/test_train.py and test_mixed_precision.py.

Dropout is off: CuPy and NumPy draw different masks from the same seed.
"""

import json

import numpy as np
import pytest

from conftest import needs_cuda
from npgpt.train import TrainConfig, train

pytestmark = [needs_cuda, pytest.mark.cuda]

TINY = dict(preset="nano", emb_dim=64, n_heads=4, n_layers=2, context_length=32, batch_size=4, drop_rate=0.0,
            progress=False, sample_tokens=2, eval_batches=1, eval_interval=20, lr=3e-3)  # fmt: skip


def losses(tmp_path, name, **kw):
    out = tmp_path / name
    train(TrainConfig(**TINY, max_steps=20, out_dir=str(out), **kw))
    records = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    return np.array([r["loss"] for r in records if r["kind"] == "step"])


@pytest.mark.parametrize("tf32, tol", [(False, 1e-4), (True, 5e-3)])
def test_cupy_training_tracks_numpy(tmp_path, tf32, tol):
    cpu = losses(tmp_path, "cpu", device="cpu")
    gpu = losses(tmp_path, f"gpu-{tf32}", device="cuda", tf32=tf32)
    assert len(gpu) == len(cpu) == 20
    assert np.abs(gpu / cpu - 1).max() < tol, (gpu, cpu)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cupy_mixed_precision_tracks_numpy_float32(tmp_path, precision):
    cpu = losses(tmp_path, "cpu", device="cpu")
    gpu = losses(tmp_path, precision, device="cuda", precision=precision)
    assert np.abs(gpu / cpu - 1).max() < 5e-3, (gpu, cpu)


@pytest.mark.parametrize("kernels", ["all", "bmm"])
def test_cupy_training_with_the_fast_paths_tracks_numpy(tmp_path, monkeypatch, kernels):
    """The same 20 steps with NPGPT_CUDA_KERNELS=all (every hand-written kernel, AdamW and the gradient norm
    included) and with bmm alone, TF32 off, against NumPy."""
    cpu = losses(tmp_path, "cpu", device="cpu")
    monkeypatch.setenv("NPGPT_CUDA_KERNELS", kernels)
    gpu = losses(tmp_path, f"gpu-{kernels}", device="cuda", tf32=False)
    assert np.abs(gpu / cpu - 1).max() < 1e-4, (gpu, cpu)
