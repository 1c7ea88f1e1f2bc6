"""Nothing is lost: crash-safe checkpoints, exact resume, signals, the non-finite guard, strict weight files."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import npgpt
from npgpt.checkpoint import CRASH_IN_SAVE_ENV, checkpoint_dirs, latest_checkpoint, verify_manifest
from npgpt.cli import main
from npgpt.train import TrainConfig, TrainingAborted, train

TINY = ["--preset", "nano", "--emb-dim", "32", "--n-heads", "2", "--n-layers", "1", "--context-length", "32",
        "--batch-size", "2", "--no-progress", "--sample-tokens", "2"]  # fmt: skip
TINY_KW = dict(preset="nano", emb_dim=32, n_heads=2, n_layers=1, context_length=32, batch_size=2, progress=False,
               sample_tokens=2)  # fmt: skip


def run_cli(args, env_extra=None, **kw):
    env = {**os.environ, "NPGPT_DEVICE": "cpu", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "npgpt", *args], capture_output=True, text=True, env=env, **kw)


def test_sigkill_during_a_save_keeps_the_previous_checkpoint(tmp_path):
    out = tmp_path / "run"
    args = ["train", *TINY, "--max-steps", "6", "--checkpoint-interval", "2", "--out-dir", str(out)]
    proc = run_cli(args, {CRASH_IN_SAVE_ENV: "2"})  # killed inside the save at step 4
    assert proc.returncode == -signal.SIGKILL
    root = out / "checkpoints"
    assert [p.name for p in checkpoint_dirs(out)] == ["step-00000002"]
    strays = [p for p in root.iterdir() if p.name.startswith(".tmp-")]
    assert strays and (strays[0] / "model.safetensors").exists()  # the half-written save is really there
    assert verify_manifest(root / "step-00000002") is None
    model = npgpt.load_pretrained(out)  # loads the last complete checkpoint
    assert model.config.emb_dim == 32
    proc = run_cli(args + ["--resume"])
    assert proc.returncode == 0, proc.stderr
    assert "resuming at step 2" in proc.stdout
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp-")]  # strays cleaned up
    assert [p.name for p in checkpoint_dirs(out)][-1] == "step-00000006"


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    out = tmp_path / "run"
    train(TrainConfig(**TINY_KW, max_steps=4, checkpoint_interval=2, out_dir=str(out)))
    newest = out / "checkpoints" / "step-00000004"
    data = bytearray((newest / "model.safetensors").read_bytes())
    data[-5] ^= 0xFF  # one flipped bit in the weights
    (newest / "model.safetensors").write_bytes(bytes(data))
    capsys.readouterr()
    assert latest_checkpoint(out).name == "step-00000002"
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "npgpt: warning: skipping checkpoint" in err[0] and "step-00000004" in err[0]
    assert "sha256" in err[0] and "Warning" not in err[0]
    with pytest.raises(ValueError, match="damaged checkpoint"):
        npgpt.load_pretrained(newest)
    r = train(TrainConfig(**TINY_KW, max_steps=5, out_dir=str(out), resume=True))
    assert r.steps == 5


def test_keep_last_k(tmp_path):
    out = tmp_path / "run"
    train(TrainConfig(**TINY_KW, max_steps=5, checkpoint_interval=1, keep_last=2, out_dir=str(out)))
    assert [p.name for p in checkpoint_dirs(out)] == ["step-00000004", "step-00000005"]


def test_training_state_is_complete(tmp_path):
    out = tmp_path / "run"
    train(TrainConfig(**TINY_KW, max_steps=3, out_dir=str(out)))
    ck = latest_checkpoint(out)
    state = json.loads((ck / "trainer_state.json").read_text())
    for key in ("format_version", "step", "tokens_seen", "data", "schedule", "tokenizer", "train_config", "optimizer", "seed"):
        assert key in state, key
    assert state["data"]["epoch"] == 0 and state["data"]["cursor"] == 3
    assert state["optimizer"]["t"] == 3 and state["schedule"]["max_lr"] == 1e-3
    assert state["tokenizer"] == npgpt.tokenizer.tokenizer_hash()
    manifest = json.loads((ck / "manifest.json").read_text())
    assert set(manifest["files"]) == {"model.safetensors", "config.json", "optimizer.safetensors", "trainer_state.json"}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_finishes_the_step_saves_and_exits_130(tmp_path, sig):
    out = tmp_path / "run"
    args = ["train", *TINY, "--max-steps", "100000", "--eval-interval", "100000", "--out-dir", str(out)]
    env = {**os.environ, "NPGPT_DEVICE": "cpu"}
    proc = subprocess.Popen([sys.executable, "-m", "npgpt", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)  # fmt: skip
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count('"kind": "step"') >= 2):
        time.sleep(0.05)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "--resume" in stdout and "Traceback" not in stderr
    steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines() if '"kind": "step"' in x]
    ck = latest_checkpoint(out)
    assert ck.name == f"step-{steps[-1]:08d}"  # the step in flight finished and was saved
    assert verify_manifest(ck) is None
    summary = json.loads((out / "summary.json").read_text())  # complete: a loss and finite timings
    assert summary["interrupted"] and summary["train_loss"] is not None and np.isfinite(summary["ms_per_step"])


def _nan_on_calls(monkeypatch, calls):
    """Make the backward (reference or fast engine) produce a NaN gradient on the given (1-based) calls."""
    from npgpt.engine import FastLossAndGrads

    count = {"n": 0}
    real_backward, real_step = npgpt.GPT.backward, FastLossAndGrads.__call__

    def backward(self, cache, *a, **k):
        count["n"] += 1
        grads = real_backward(self, cache, *a, **k)
        if count["n"] in calls:
            grads["h.0.mlp.c_fc.weight"][0, 0] = np.nan
        return grads

    def step(self, *a, **k):
        loss = real_step(self, *a, **k)
        if k.get("backward", True):
            count["n"] += 1
            if count["n"] in calls:
                self.grads["h.0.mlp.c_fc.weight"][0, 0] = np.nan
        return loss

    monkeypatch.setattr(npgpt.GPT, "backward", backward)
    monkeypatch.setattr(FastLossAndGrads, "__call__", step)


@pytest.mark.parametrize("engine", ["fast", "reference"])
def test_a_nan_gradient_skips_the_update_without_touching_the_optimizer(tmp_path, monkeypatch, engine):
    _nan_on_calls(monkeypatch, {3})
    updates = []
    real_step = npgpt.AdamW.step

    def spy(self, grads, lr=None):
        updates.append(self.t)
        return real_step(self, grads, lr)

    monkeypatch.setattr(npgpt.AdamW, "step", spy)
    out = tmp_path / "run"
    r = train(TrainConfig(**TINY_KW, max_steps=6, out_dir=str(out), engine=engine))
    assert r.steps == 6 and r.skipped_steps == 1
    assert updates == [0, 1, 2, 3, 4]  # five updates for six steps: the third was skipped
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    skips = [x for x in records if x["kind"] == "skip"]
    assert len(skips) == 1 and skips[0]["step"] == 3  # the third step, numbered as its "step" record
    state = json.loads((latest_checkpoint(out) / "trainer_state.json").read_text())
    assert state["optimizer"]["t"] == 5 and state["skipped_steps"] == 1
    m = npgpt.load_pretrained(out)
    assert all(np.isfinite(v).all() for v in m.params.values())


def test_repeated_non_finite_steps_stop_with_a_clear_message(tmp_path, monkeypatch, capsys):
    _nan_on_calls(monkeypatch, set(range(1, 100)))
    out = tmp_path / "run"
    rc = main(["train", *TINY, "--max-steps", "20", "--max-bad-steps", "3", "--out-dir", str(out)])
    err = capsys.readouterr().err
    assert rc == 1
    assert "3 consecutive steps had a non-finite loss or gradient" in err and "--lr" in err
    assert checkpoint_dirs(out) == []


def test_non_finite_weights_are_never_saved(tmp_path, monkeypatch):
    real_step = npgpt.AdamW.step

    def poisoning_step(self, grads, lr=None):
        real_step(self, grads, lr)
        if self.t == 2:
            self.params["ln_f.bias"][0] = np.inf

    monkeypatch.setattr(npgpt.AdamW, "step", poisoning_step)
    out = tmp_path / "run"
    with pytest.raises(TrainingAborted, match="no longer finite.*step-00000001"):
        train(TrainConfig(**TINY_KW, max_steps=4, checkpoint_interval=1, out_dir=str(out)))
    assert [p.name for p in checkpoint_dirs(out)] == ["step-00000001"]
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp")]


def test_no_pickle_anywhere_in_the_package():
    import re

    root = Path(npgpt.__file__).parent
    for path in root.rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"^\s*(import|from)\s+(c?pickle|dill|joblib)\b", text, re.M), path
        assert "torch.load" not in text, path
        for call in re.findall(r"np\.load\([^)]*\)", text):
            assert "allow_pickle=False" in call, (path, call)
