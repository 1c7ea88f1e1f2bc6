"""`npgpt bench` runs end to end on a small preset (timings themselves are never asserted)."""

import json

import numpy as np
import pytest

from conftest import needs_cuda
from npgpt.bench import GPU_PEAKS, describe_peak, flops_per_token, gpu_part, peak_for_name
from npgpt.cli import main
from npgpt.config import GPTConfig
from npgpt.engine import FastLossAndGrads
from npgpt.model import GPT


def test_flops_per_token_counts_the_gemms_the_fast_step_makes(monkeypatch):
    """Every matrix product of a fast forward + backward, counted as 2 m n k multiply-adds as it runs
    (np.matmul wrapped), adds up to flops_per_token * tokens: the formula matches the work."""
    cfg = GPTConfig(vocab_size=61, context_length=16, emb_dim=32, n_heads=2, n_layers=2, tie_weights=False)
    B, T = 3, 16
    step = FastLossAndGrads(GPT(cfg, seed=0), B, T)
    x = np.random.default_rng(0).integers(0, 61, (B, T))
    counted, real = [0], np.matmul

    def counting_matmul(a, b, out=None):
        result = real(a, b, out=out)
        counted[0] += 2 * result.size * a.shape[-1]
        return result

    monkeypatch.setattr(np, "matmul", counting_matmul)
    step(x, x)
    assert counted[0] == flops_per_token(cfg, T) * B * T


def test_bench_runs_and_writes_json(tmp_path, capsys):
    out = tmp_path / "b.json"
    args = ["bench", "--preset", "nano", "--context-length", "16", "--batch-size", "1", "--steps", "2", "--warmup", "1",
            "--engine", "both", "--no-memory", "--generate", "3", "--json", str(out)]  # fmt: skip
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "npgpt fast" in text and "npgpt reference" in text and "MFU" in text and "peak sgemm" in text
    report = json.loads(out.read_text())
    fast, ref = report["steps"]["npgpt fast"], report["steps"]["npgpt reference"]
    assert fast["losses"][:2] == pytest.approx(ref["losses"][:2], rel=1e-5)  # same model, same batch, same first steps
    assert report["generation"]["npgpt_tokens_per_s"] > 0


@pytest.mark.cuda
@needs_cuda
def test_bench_on_cuda(tmp_path, capsys):
    """`npgpt bench --device cuda`: the step runs on the GPU, its first loss is the CPU's (same weights
    and batch, TF32 off), and the GPU memory and MFU lines are there."""
    common = ["bench", "--preset", "nano", "--context-length", "64", "--batch-size", "2", "--steps", "2", "--warmup", "1",
              "--no-memory", "--generate", "4", "--no-tf32"]  # fmt: skip
    reports = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / f"{device}.json"
        assert main([*common, "--device", device, "--json", str(out)]) == 0
        reports[device] = json.loads(out.read_text())
    text = capsys.readouterr().out
    gpu = reports["cuda"]
    assert gpu["device"] == "cuda" and gpu["tf32"] is False and gpu["gpu_pool_mb"] > 0
    assert "GPU memory: npgpt's CuPy pool held" in text
    cpu_losses, gpu_losses = reports["cpu"]["steps"]["npgpt fast"]["losses"], gpu["steps"]["npgpt fast"]["losses"]
    assert gpu_losses[0] == pytest.approx(cpu_losses[0], rel=1e-5)
    assert gpu["steps"]["npgpt fast"]["tokens_per_s"] > 0 and gpu["generation"]["npgpt_tokens_per_s"] > 0


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_bench_on_cuda_against_torch(tmp_path, precision):
    """`npgpt bench --device cuda --vs-torch` in float32 (TF32 off) and bf16: both steps run and start
    from the same loss (identical weights and batch). (torch.compile: benchmarks/gpu_check.sh times it.)"""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    if not torch.cuda.is_available():
        pytest.skip("this PyTorch build has no CUDA")
    out = tmp_path / "b.json"
    args = ["bench", "--device", "cuda", "--preset", "nano", "--context-length", "64", "--batch-size", "2", "--steps", "2",
            "--warmup", "1", "--no-memory", "--generate", "0", "--vs-torch", "--precision", precision,
            "--json", str(out)] + (["--no-tf32"] if precision == "fp32" else [])  # fmt: skip
    assert main(args) == 0
    report = json.loads(out.read_text())
    losses = {k: v["losses"][0] for k, v in report["steps"].items()}
    assert len(losses) == 2, losses
    ours = losses.pop("npgpt fast")
    for name, theirs in losses.items():
        assert ours == pytest.approx(theirs, rel=1e-5 if precision == "fp32" else 2e-2), name


def test_bench_against_torch(tmp_path, capsys):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    out = tmp_path / "b.json"
    args = ["bench", "--preset", "nano", "--context-length", "16", "--batch-size", "1", "--steps", "1", "--warmup", "1",
            "--vs-torch", "--generate", "4", "--json", str(out)]  # fmt: skip
    assert main(args) == 0
    report = json.loads(out.read_text())
    ours = report["steps"]["npgpt fast"]["losses"]
    theirs = next(v for k, v in report["steps"].items() if k.startswith("torch"))["losses"]
    assert ours[0] == pytest.approx(theirs[0], rel=1e-5)  # identical weights and batch: identical first loss
    assert report["generation"]["same_tokens"] is True
    mem = report["peak_memory_mb"]
    assert mem["npgpt"] > 0 and mem["torch"] > 0
    assert "npgpt fast / torch eager (sdpa)" in report["ratios"]


def test_bench_isolate_times_each_engine_in_its_own_process(tmp_path, capsys):
    """--isolate --rounds 2: each engine runs in a fresh process, twice, alternating; the first losses agree
    (same weights and batch), each round is reported, each process measured its sgemm peak, and the peak
    memory comes from those processes. (The torch twin takes the same path as a worker: --memory-worker
    torch, run by test_bench_against_torch; here it is left out because importing it costs seconds.)"""
    out = tmp_path / "isolate.json"
    args = ["bench", "--preset", "nano", "--context-length", "16", "--batch-size", "1", "--steps", "2", "--warmup", "1",
            "--engine", "both", "--generate", "0", "--isolate", "--rounds", "2", "--json", str(out)]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "each in its own process, 2 rounds" in printed and "round 2:" in printed and "(per round: " in printed
    report = json.loads(out.read_text())
    assert report["isolated"] is True and report["rounds"] == 2
    assert set(report["steps"]) == {"npgpt fast", "npgpt reference"}
    fast_losses, ref_losses = (report["steps"][k]["losses"] for k in ("npgpt fast", "npgpt reference"))
    assert len(fast_losses) == len(ref_losses) == 3
    assert fast_losses == pytest.approx(ref_losses, rel=1e-5)
    assert len(report["per_round_ms"]) == 2 and len(report["worker_peak_sgemm_gflops"]) == 4  # 2 processes a round
    assert report["peak_memory_mb"]["npgpt"] > 0


def test_bench_isolate_refuses_the_gpu_and_torch_compile(capsys):
    for extra in (["--device", "cuda"], ["--vs-torch", "--torch-compile"]):  # (--rounds without it: test_bad_inputs)
        assert main(["bench", "--preset", "nano", "--context-length", "16", "--isolate", *extra]) == 2
        err = capsys.readouterr().err
        assert "--isolate" in err and len(err.strip().splitlines()) == 1, err


def test_bench_isolate_reports_a_failed_process_in_one_line(monkeypatch, capsys):
    from npgpt.cli import bench as cli_bench

    monkeypatch.setattr(cli_bench, "run_worker", lambda *a, **k: {"error": "MemoryError: boom"})
    assert main(["bench", "--preset", "nano", "--context-length", "16", "--isolate", "--generate", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "isolated run of npgpt fast failed: MemoryError: boom" in err[0], err


def test_gpu_peak_is_picked_by_name_and_precision():
    h100 = "NVIDIA H100 80GB HBM3"  # how CUDA names the SXM part
    assert peak_for_name(h100, "bf16", tf32=True) == peak_for_name(h100, "fp16", tf32=False) == 989_400
    assert peak_for_name(h100, "fp32", tf32=True) == 494_700
    assert peak_for_name(h100, "fp32", tf32=False) == 67_000
    assert peak_for_name("NVIDIA H200", "bf16", tf32=True) == 989_400
    assert peak_for_name("NVIDIA A100-SXM4-80GB", "bf16", tf32=True) == 312_000
    assert peak_for_name("NVIDIA L4", "fp16", tf32=True) == 121_000
    assert peak_for_name("NVIDIA L40S", "bf16", tf32=True) is None  # not an L4
    assert peak_for_name("NVIDIA GeForce RTX 4090", "fp32", tf32=True) is None
    assert all(set(p) == {"fp32", "tf32", "16-bit"} for p in GPU_PEAKS.values())
    with pytest.raises(ValueError, match="unknown precision"):
        peak_for_name(h100, "fp64", tf32=False)


def test_the_h100s_form_factors_have_their_own_peaks():
    """Issue 25 (7): every H100 was measured against the SXM part's peaks; a PCIe card has 76% of its
    16-bit peak and an NVL 84%, so their MFU read low. Each part by the name CUDA gives it, and the
    line `npgpt bench` prints names the part and the figure used."""
    parts = {"NVIDIA H100 80GB HBM3": "H100 SXM", "NVIDIA H100 PCIe": "H100 PCIe", "NVIDIA H100 NVL": "H100 NVL",
             "NVIDIA H200": "H200 SXM", "NVIDIA H200 NVL": "H200 NVL", "NVIDIA GH200 480GB": "GH200",
             "NVIDIA A100 80GB PCIe": "A100", "NVIDIA RTX A6000": None}  # fmt: skip
    assert {name: gpu_part(name) for name in parts} == parts
    assert peak_for_name("NVIDIA H100 PCIe", "bf16", tf32=False) == 756_500
    assert peak_for_name("NVIDIA H100 PCIe", "fp32", tf32=True) == 378_000
    assert peak_for_name("NVIDIA H100 NVL", "bf16", tf32=False) == 835_500
    assert describe_peak("NVIDIA H100 PCIe", "fp32", True) == (
        "MFU against the H100 PCIe's dense TF32 peak, 378.0 TFLOP/s (device 'NVIDIA H100 PCIe')")
    assert describe_peak("NVIDIA RTX A6000", "bf16", False).startswith("no peak known for 'NVIDIA RTX A6000'")
