"""The one run loop (npgpt/loop/), the same guarantees for its four tasks: pretraining, classification,
instruction tuning and translation.

For each task, one chain of processes with a tiny model: SIGINT at a random step (the step finishes, a
checkpoint of exactly that step is written, exit code 130, the resume hint printed), --resume killed with
SIGKILL at a random later step (every checkpoint left verifies), --resume to the end; the final weights are
bit for bit those of an uninterrupted run with the same seed, and so is the loss of every step
(metrics.jsonl). Fine-tuning saves only after each epoch, so its SIGINT checkpoint is in the middle of an
epoch and the resume after SIGKILL goes on from that one or from an epoch's end."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from npgpt.checkpoint import checkpoint_dirs, checkpoint_problem, latest_checkpoint
from npgpt.cli import main
from npgpt.safetensors_io import load_safetensors
from npgpt.seq2seq.data import bundled_pairs_path

GPT_TINY = ["--emb-dim", "16", "--n-heads", "2", "--n-layers", "1", "--batch-size", "2", "--no-progress"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Small data files for fine-tuning and translation."""
    root = tmp_path_factory.mktemp("loop-data")
    words = ["apple", "pear", "plum", "fig", "kiwi", "lime", "date", "peach", "grape", "melon", "mango", "lemon"]
    recs = [{"instruction": "Say the word twice.", "input": w, "output": f"{w} {w}"} for w in words]
    for name, part in (("train", recs), ("val", recs[:3]), ("test", recs[9:])):
        (root / f"inst-{name}.json").write_text(json.dumps(part))
    lines = bundled_pairs_path().read_text(encoding="utf-8").splitlines()[::200][:120]
    (root / "pairs.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def command(task, data, out):
    """The command line of each task's run: 24 to 40 steps of a tiny model, dropout on."""
    if task == "pretrain":
        return ["train", *GPT_TINY, "--context-length", "16", "--drop-rate", "0.1", "--max-steps", "40",
                "--eval-interval", "10", "--checkpoint-interval", "15", "--sample-tokens", "2", "--out-dir", str(out)]  # fmt: skip
    if task == "classify":  # 40 poems, batches of 4: 10 steps per epoch, 3 epochs
        return ["finetune", "--task", "classify", *GPT_TINY[:-3], "--batch-size", "4", "--max-examples", "40",
                "--epochs", "3", "--context-length", "24", "--drop-rate", "0.1", "--lm-weight", "0.5", "--no-progress",
                "--out-dir", str(out)]  # fmt: skip
    if task == "instruct":  # 12 records, batches of 2: 6 steps per epoch, 4 epochs
        return ["finetune", "--task", "instruct", "--data", str(data / "inst-train.json"), "--val-data",
                str(data / "inst-val.json"), "--test-data", str(data / "inst-test.json"), *GPT_TINY, "--epochs", "4",
                "--drop-rate", "0.1", "--samples", "1", "--out-dir", str(out)]  # fmt: skip
    return ["seq2seq", "train", "--data", str(data / "pairs.tsv"), "--d-model", "16", "--n-heads", "2",
            "--n-encoder-layers", "1", "--n-decoder-layers", "1", "--d-ff", "32", "--batch-size", "8", "--max-len", "32",
            "--max-steps", "30", "--eval-interval", "10", "--eval-pairs", "4", "--checkpoint-interval", "12",
            "--no-progress", "--out-dir", str(out)]  # fmt: skip


TOTAL = {"pretrain": 40, "classify": 30, "instruct": 24, "seq2seq": 30}


def start(args):
    env = {**os.environ, "NPGPT_DEVICE": "cpu", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "npgpt", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)  # fmt: skip


def steps_logged(out) -> list[int]:
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return []
    return [json.loads(line)["step"] for line in lines if line.startswith('{"kind": "step"') and line.endswith("}")]


def wait_for_step(proc, out, step):
    deadline = time.monotonic() + 120
    while proc.poll() is None and max(steps_logged(out), default=0) < step and time.monotonic() < deadline:
        time.sleep(0.002)
    assert proc.poll() is None, f"the run ended before step {step}: {proc.communicate()[1]}"


def step_losses(out):
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if r["kind"] == "step"]


def weights(out):
    return load_safetensors(latest_checkpoint(out, warn=False) / "model.safetensors")


@pytest.mark.parametrize("task", ["pretrain", "classify", "instruct", "seq2seq"])
def test_sigint_then_sigkill_then_resume_ends_bit_for_bit_as_an_uninterrupted_run(task, data, tmp_path, capsys):
    total, rng = TOTAL[task], random.Random(f"loop-{task}")
    ref = tmp_path / "ref"
    assert main(command(task, data, ref)) == 0  # never interrupted
    capsys.readouterr()
    out = tmp_path / "run"
    # 1. SIGINT at a random step: that step finishes, is saved, and the run exits with 130
    proc = start(command(task, data, out))
    wait_for_step(proc, out, rng.randint(3, total // 3))
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "--resume" in stdout and "Traceback" not in stderr
    stopped = max(steps_logged(out))
    assert latest_checkpoint(out, warn=False).name == f"step-{stopped:08d}" and stopped < total
    # 2. --resume, killed with SIGKILL at a random later step: every checkpoint left behind verifies
    proc = start(command(task, data, out) + ["--resume"])
    wait_for_step(proc, out, rng.randint(stopped + 2, total - 4))
    time.sleep(rng.uniform(0.0, 0.02))
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    for d in checkpoint_dirs(out):
        assert checkpoint_problem(d) is None, checkpoint_problem(d)
    # 3. --resume to the end: the same weights, bit for bit, and the same loss at every step
    assert main(command(task, data, out) + ["--resume"]) == 0
    assert "resuming at step" in capsys.readouterr().out
    a, b = weights(ref), weights(out)
    assert latest_checkpoint(out, warn=False).name == f"step-{total:08d}"
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert step_losses(out) == step_losses(ref) and len(step_losses(ref)) == total
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == total and not summary["interrupted"]
