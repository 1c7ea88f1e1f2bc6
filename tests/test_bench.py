"""`npgpt bench` runs end to end on a small preset (timings themselves are never asserted)."""

import json

import pytest

from npgpt.bench import flops_per_token
from npgpt.cli import main
from npgpt.config import GPTConfig


def test_flops_per_token_closed_form():
    cfg = GPTConfig.from_preset("gpt2")
    # 6 * (12 layers * 12 C^2 + V C) + 12 L T C, at T = 256
    assert flops_per_token(cfg, 256) == 6 * (12 * 12 * 768**2 + 50257 * 768) + 12 * 12 * 256 * 768


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
