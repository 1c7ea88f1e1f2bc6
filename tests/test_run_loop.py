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
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import metrics_records, step_losses

from npgpt.checkpoint import checkpoint_dirs, checkpoint_problem, latest_checkpoint
from npgpt.cli import main
from npgpt.loop import find_resume
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
    """The command line of each task's run: 24 to 30 steps of a tiny model, dropout on."""
    if task == "pretrain":
        return ["train", *GPT_TINY, "--context-length", "16", "--drop-rate", "0.1", "--max-steps", "30",
                "--eval-interval", "10", "--checkpoint-interval", "12", "--sample-tokens", "2", "--out-dir", str(out)]  # fmt: skip
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


TOTAL = {"pretrain": 30, "classify": 30, "instruct": 24, "seq2seq": 30}


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
    assert json.loads((out / "summary.json").read_text())["interrupted"] is True  # complete: steps, finite numbers
    # 2. --resume, killed with SIGKILL at a random later step: every checkpoint left behind verifies
    proc = start(command(task, data, out) + ["--resume"])
    wait_for_step(proc, out, rng.randint(stopped + 2, total - 8))
    time.sleep(rng.uniform(0.0, 0.004))  # (a step takes longer: the kill lands before the last one)
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


# --- the loop itself, with a task of three numbers (no model: milliseconds) -----------------------------


class Counter:
    """A batch source whose batch is its position: next() -> i, state() / restore() of i."""

    def __init__(self):
        self.i = 0

    def next(self):
        self.i += 1
        return self.i

    def state(self):
        return {"i": self.i}

    def restore(self, state):
        self.i = state["i"]


class Approach:
    """A task of the loop's shape: AdamW moves w towards `target`; batch i scales the target by 1 + 0.01 i (so
    the data order matters); steps listed in `nan_at` get a NaN gradient; `nan_weights_at` poisons w;
    report_nan: its result's train_loss is NaN. resume_dir: the checkpoint whose weights it starts from."""

    summary_numbers = ("train_loss", "ms_per_step")

    def __init__(self, nan_at=(), nan_weights_at=None, report_nan=False, resume_dir=None):
        from npgpt.distributed import SingleProcess
        from npgpt.optim import AdamW

        self.world, self.batches = SingleProcess(), Counter()
        self.w = {"w": np.zeros(3)}
        if resume_dir is not None:  # a task loads its own weights; the loop restores the rest
            self.w = {"w": load_safetensors(resume_dir / "model.safetensors")["w"]}
        self.optimizer = AdamW(self.w, lr=0.1, weight_decay=0.0)
        self.nan_at, self.nan_weights_at, self.report_nan = set(nan_at), nan_weights_at, report_nan
        self.evaluated, self.restored = [], None

    def banner(self, step):
        return f"approach: resuming at step {step}" if step else "approach"

    def train_step(self, number):
        from npgpt.loop import StepResult

        target = np.array([1.0, -2.0, 3.0]) * (1 + 0.01 * self.batches.next())
        g = 2 * (self.w["w"] - target)
        loss = float(np.sum((self.w["w"] - target) ** 2))
        if number in self.nan_at:
            g[0], loss = np.nan, float("nan")
        applied = np.isfinite(loss)
        if applied:
            self.optimizer.step({"w": g})
        if number == self.nan_weights_at:
            self.w["w"][1] = np.inf
        return StepResult(loss, float(np.linalg.norm(g)), 0.1, bool(applied), record={"extra": number})

    def evaluate(self, at):
        self.evaluated.append((at.step, at.train_loss))
        return {"kind": "eval", "step": at.step, "train_loss": at.train_loss}, f"eval at {at.step}"

    def weights_problem(self):
        return None if np.isfinite(self.w["w"]).all() else "the weights are no longer finite"

    def write_model(self, directory):
        from npgpt.checkpoint import CONFIG_FILE, MODEL_FILE, atomic_write_json, save_tensors

        save_tensors(directory / MODEL_FILE, self.w)
        atomic_write_json(directory / CONFIG_FILE, {"approach": True})

    def state(self):
        return {"evaluated": self.evaluated}

    def restore(self, state):
        self.restored = state

    def finish(self, report):
        from dataclasses import make_dataclass

        Result = make_dataclass("Result", ["train_loss", "ms_per_step", "steps"])
        return Result(float("nan") if self.report_nan else report.train_loss, report.ms_per_step, report.steps)


def settings(out, **kw):
    from npgpt.loop import LoopSettings

    base = dict(command="npgpt approach", out_dir=str(out), total_steps=10, lr=0.1, eval_interval=4, keep_last=2,
                progress=False)  # fmt: skip
    return LoopSettings(**{**base, **kw})


def test_cadence_checkpoints_and_the_summary(tmp_path, capsys):
    from npgpt.loop import run_task

    out, task = tmp_path / "run", Approach()
    result = run_task(task, settings(tmp_path / "run", eval_offset=1, eval_at_start=True, checkpoint_interval=3))
    assert [s for s, _ in task.evaluated] == [0, 1, 5, 9, 10]  # the start, (s - 1) % 4 == 0, and the last
    assert task.evaluated[0][1] is None  # nothing trained yet
    steps = metrics_records(out, "step")
    losses = [r["loss"] for r in steps]
    assert [r["step"] for r in steps] == list(range(1, 11)) and [r["extra"] for r in steps] == list(range(1, 11))
    assert task.evaluated[2][1] == pytest.approx(np.mean(losses[1:5]))  # the mean of steps 2..5
    assert [d.name for d in checkpoint_dirs(out)] == ["step-00000009", "step-00000010"]  # 3, 6, 9, the end; keep 2
    state = json.loads((out / "checkpoints" / "step-00000010" / "trainer_state.json").read_text())
    assert state["step"] == 10 and state["data"] == {"i": 10} and state["evaluated"][-1] == [10, result.train_loss]
    assert json.loads((out / "summary.json").read_text())["steps"] == 10
    assert "summary.json not written" not in capsys.readouterr().out


def test_a_result_with_a_non_finite_number_never_replaces_the_summary(tmp_path, capsys):
    from npgpt.loop import run_task

    out = tmp_path / "run"
    run_task(Approach(), settings(out, total_steps=4))
    before = (out / "summary.json").read_bytes()
    capsys.readouterr()
    resume_dir, state = find_resume(out, resume=True, overwrite=False)
    run_task(Approach(report_nan=True, resume_dir=resume_dir), settings(out, total_steps=6), resume_dir, state)
    assert "summary.json not written" in capsys.readouterr().out
    assert (out / "summary.json").read_bytes() == before


def test_resume_restores_everything_the_loop_saved(tmp_path, capsys):
    from npgpt.loop import run_task

    straight = Approach()
    run_task(straight, settings(tmp_path / "straight"))
    out = tmp_path / "split"
    run_task(Approach(), settings(out, checkpoint_interval=6))
    shutil.rmtree(out / "checkpoints" / "step-00000010")  # as if killed after the save of step 6
    capsys.readouterr()
    resume_dir, state = find_resume(out, resume=True, overwrite=False)
    resumed = Approach(resume_dir=resume_dir)
    run_task(resumed, settings(out), resume_dir, state)
    assert "approach: resuming at step 6" in capsys.readouterr().out
    assert resumed.restored["step"] == 6 and resumed.batches.i == 10 and resumed.optimizer.t == 10
    assert np.array_equal(resumed.w["w"], straight.w["w"])  # the same ten updates on the same ten batches
    without_time = [[{k: v for k, v in r.items() if k != "ms"} for r in metrics_records(run, "step")] for run in (out, tmp_path / "straight")]
    assert without_time[0] == without_time[1] and len(without_time[0]) == 10
    # the mean loss of steps 5..8 spans the resume (the loop saved the losses since the last evaluation)
    assert resumed.evaluated[0][1] == straight.evaluated[1][1]


def test_a_finished_run_is_not_resumed(tmp_path):
    from npgpt.loop import run_task

    out = tmp_path / "run"
    run_task(Approach(), settings(out, total_steps=4))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match=r"already at step 4 of 4, so there is nothing to train; give a larger --max-steps"):
        run_task(Approach(), settings(out, total_steps=4), *find_resume(out, resume=True, overwrite=False))
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_non_finite_steps_and_weights_stop_the_run(tmp_path):
    from npgpt.loop import TrainingAborted, run_task

    out = tmp_path / "run"
    with pytest.raises(TrainingAborted, match=r"3 consecutive steps had a non-finite loss .*last at step 7.*step-00000004"):
        run_task(Approach(nan_at={2, 5, 6, 7}), settings(out, checkpoint_interval=4, max_bad_steps=3))
    assert [r["step"] for r in metrics_records(out, "skip")] == [2, 5, 6, 7]
    out = tmp_path / "run2"
    with pytest.raises(TrainingAborted, match=r"step 6: training diverged: the weights are no longer finite.*"
                                              r"the last finite training loss was .* at step 5, 1 non-finite steps skipped.*step-00000003 is kept"):  # fmt: skip
        run_task(Approach(nan_weights_at=5), settings(out, checkpoint_interval=3))
    assert [d.name for d in checkpoint_dirs(out)] == ["step-00000003"]
    assert metrics_records(out, "error")[0]["step"] == 6
