"""The PyTorch twin of `npgpt bench --vs-torch` (npgpt/bench_torch.py) and its precision and GPU-peak
wiring in bench.py, on the CPU with tiny models. The CUDA path (device="cuda", TF32, peak memory) needs
a GPU and a CUDA build of torch; the tests marked cuda run it there."""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from npgpt import GPT, GPTConfig  # noqa: E402
from npgpt.bench import NpgptStep, torch_precision  # noqa: E402
from npgpt.bench_torch import TorchStep  # noqa: E402
from npgpt.cli import main  # noqa: E402

needs_torch_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA build of torch and a GPU")


def tiny_model(n_layers=2):
    cfg = GPTConfig(vocab_size=101, context_length=16, emb_dim=32, n_heads=4, n_layers=n_layers, drop_rate=0.0)
    return GPT(cfg, seed=0, device="cpu")


def batch(B=2, T=8, V=101):
    rng = np.random.default_rng(0)
    return rng.integers(0, V, size=(B, T)), rng.integers(0, V, size=(B, T))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_step_matches_the_float32_first_loss(precision):
    model, (x, y) = tiny_model(), batch()
    fp32, mixed = TorchStep(model, "sdpa"), TorchStep(model, "sdpa", precision=precision)
    first32, first16 = fp32(x, y), mixed(x, y)
    # the same weights; 16-bit products (8 or 11 mantissa bits) change the loss by well under 2%
    assert first16 == pytest.approx(first32, rel=2e-2)
    assert first16 != first32  # autocast really ran the products in 16 bits
    assert all(p.dtype == torch.float32 for p in mixed.hf.parameters())  # float32 master weights
    assert mixed(x, y) < first16  # it took an AdamW step on the batch it is fitting


def test_precision_and_device_are_validated():
    model = tiny_model(n_layers=1)
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        TorchStep(model, "sdpa", precision="fp8")
    with pytest.raises(ValueError, match="TF32 is a GPU mode"):
        TorchStep(model, "sdpa", precision="tf32")
    with pytest.raises(ValueError, match="unknown device"):
        TorchStep(model, "sdpa", device="mps")
    with pytest.raises(ValueError, match="peak RSS"):
        TorchStep(model, "sdpa").peak_memory_mb()


def test_torch_precision_follows_precision_and_tf32():
    assert torch_precision("fp32", tf32=True) == "tf32"
    assert torch_precision("fp32", tf32=False) == "fp32"
    for p in ("bf16", "fp16"):
        assert torch_precision(p, tf32=True) == torch_precision(p, tf32=False) == p
    with pytest.raises(ValueError, match="choose fp32, bf16 or fp16"):
        torch_precision("tf32", tf32=True)


def test_npgpt_fp16_step_scales_the_loss_as_the_torch_twin_does():
    model, (x, y) = tiny_model(), batch()
    theirs = TorchStep(model, "sdpa", precision="fp16")
    ours = NpgptStep(model, 2, 8, "fast", precision="fp16")
    before = {k: np.array(v) for k, v in model.params.items()}
    assert ours(x, y, False, None) == pytest.approx(theirs(x, y), rel=2e-2)  # both fp16 products, same weights
    assert ours.scaler.scale == 2.0**16  # no overflow at the initial scale, so the update was applied
    assert any(not np.array_equal(before[k], v) for k, v in model.params.items())
    with pytest.raises(ValueError, match="use --engine fast"):
        NpgptStep(tiny_model(n_layers=1), 2, 8, "reference", precision="bf16")


BENCH = ["bench", "--preset", "nano", "--context-length", "16", "--batch-size", "1", "--steps", "1", "--warmup", "0",
         "--vs-torch", "--no-memory", "--generate", "0"]  # fmt: skip


def test_bench_vs_torch_on_the_cpu_reports_precision(tmp_path, capsys):
    out = tmp_path / "b.json"
    assert main([*BENCH, "--json", str(out)]) == 0
    assert "precision fp32, cpu" in capsys.readouterr().out
    report = json.loads(out.read_text())
    # --tf32 is on by default, but TF32 is a GPU mode: on the CPU both sides run true float32
    assert (report["precision"], report["tf32"], report["torch_precision"]) == ("fp32", False, "fp32")
    ours, theirs = report["steps"]["npgpt fast"]["losses"], report["steps"]["torch eager (sdpa)"]["losses"]
    assert ours[0] == pytest.approx(theirs[0], rel=1e-5)


def test_bench_rejects_what_it_cannot_compare_fairly(capsys):
    assert main([a for a in BENCH if a != "--vs-torch"] + ["--torch-compile"]) == 2
    assert main([*BENCH, "--torch-compile"]) == 2  # --warmup 0 would time the compilation
    assert main([*BENCH, "--dtype", "float64"]) == 2
    err = capsys.readouterr().err
    assert "add --vs-torch" in err and "use --warmup 1" in err and "drop --dtype" in err


def test_bench_bf16_against_torch_autocast(tmp_path):
    out = tmp_path / "b.json"
    assert main([*BENCH, "--precision", "bf16", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["torch_precision"] == "bf16"
    ours, theirs = report["steps"]["npgpt fast"]["losses"], report["steps"]["torch eager (sdpa)"]["losses"]
    assert ours[0] == pytest.approx(theirs[0], rel=2e-2)  # both bf16 products from the same weights


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("NPGPT_TEST_TORCH_COMPILE"),
                    reason="torch.compile on the CPU takes about a minute even for a 1-layer model (inductor "
                           "builds C++); set NPGPT_TEST_TORCH_COMPILE=1 to run it")  # fmt: skip
def test_torch_compile_gives_the_eager_first_loss():
    model, (x, y) = tiny_model(n_layers=1), batch()
    assert TorchStep(model, "sdpa", compile=True)(x, y) == pytest.approx(TorchStep(model, "sdpa")(x, y), rel=1e-4)


@pytest.mark.cuda
@needs_torch_cuda
@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16", "fp16"])
def test_cuda_twin_matches_the_cpu_first_loss(precision):
    model, (x, y) = tiny_model(), batch()
    cpu = TorchStep(model, "sdpa")(x, y)
    step = TorchStep(model, "sdpa", device="cuda", precision=precision)
    assert step(x, y) == pytest.approx(cpu, rel=1e-5 if precision == "fp32" else 2e-2)
    assert step.peak_memory_mb() > 0
