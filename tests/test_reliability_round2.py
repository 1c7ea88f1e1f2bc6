"""Issue 14's numbered items 3 to 7, one test (or a few) each: nothing touched before a run is known to be
valid, no tracebacks, no silent nonsense, divergence is not success, messages in the command line's terms.
(Items 1 and 2 are tests/test_checkpoint_cleanup.py; the table of bad values is tests/test_bad_inputs.py;
the SIGKILL loop is tests/test_sigkill.py.)"""

import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
from conftest import err_lines, sha256_tree

import npgpt.loop.folder as folder
import npgpt.train as T
from npgpt.checkpoint import checkpoint_dirs, checkpoint_problem, latest_checkpoint, write_manifest
from npgpt.cli import main

TINY = ["--preset", "nano", "--emb-dim", "8", "--n-heads", "2", "--n-layers", "1", "--tie-weights", "--context-length",
        "16", "--batch-size", "2", "--no-progress", "--sample-tokens", "2"]  # fmt: skip


def strays(out):
    return [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp")]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("master") / "run"
    assert main(["train", *TINY, "--max-steps", "4", "--checkpoint-interval", "2", "--out-dir", str(out)]) == 0
    return out


@pytest.fixture
def run(finished_run, tmp_path):
    """A finished 4-step run with checkpoints at steps 2 and 4 (a copy for each test)."""
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    return out


# --- 3. nothing is deleted or overwritten before the run is known to be valid --------------------------------


@pytest.mark.parametrize("late", [["--sample-top-k", "0"], ["--sample-temperature", "-1"], ["--eval-batches", "0"]])
def test_overwrite_with_a_bad_setting_touches_nothing(run, capsys, late):
    """Checked today only at the first evaluation; --overwrite had already removed the old run by then."""
    before = sha256_tree(run)
    capsys.readouterr()
    assert main(["train", *TINY, "--max-steps", "60", "--out-dir", str(run), "--overwrite", *late]) == 2
    lines = err_lines(capsys)
    assert len(lines) == 1 and late[0] in lines[0]
    assert sha256_tree(run) == before


def test_overwrite_keeps_the_old_checkpoints_until_the_new_run_has_one(run, capsys):
    """A new run that diverges before its first checkpoint leaves the earlier run's checkpoints in place."""
    old = {d.name: sha256_tree(d) for d in checkpoint_dirs(run)}
    assert main(["train", *TINY, "--max-steps", "3", "--lr", "1e30", "--out-dir", str(run), "--overwrite"]) == 1
    assert {d.name: sha256_tree(d) for d in checkpoint_dirs(run)} == old
    assert main(["train", *TINY, "--max-steps", "1", "--out-dir", str(run), "--overwrite"]) == 0
    assert [d.name for d in checkpoint_dirs(run)] == ["step-00000001"]  # replaced once the new run had one


def test_resuming_a_finished_run_changes_nothing(tmp_path, capsys):
    """--resume with no new steps (the run reached its --epochs) is refused; summary.json is not rewritten."""
    out = tmp_path / "run"
    args = ["train", *TINY, "--epochs", "0.02", "--out-dir", str(out)]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] >= 1 and all(summary[k] is not None for k in ("train_loss", "val_loss", "ms_per_step"))
    before = sha256_tree(out)
    capsys.readouterr()
    assert main(args + ["--resume"]) == 2
    lines = err_lines(capsys)
    assert len(lines) == 1 and f"already at step {summary['steps']} of {summary['steps']}" in lines[0]
    assert "--max-steps" in lines[0] and sha256_tree(out) == before


# --- 4. no tracebacks -----------------------------------------------------------------------------------------


def test_a_read_only_out_dir_is_one_line(tmp_path, capsys, monkeypatch):
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        out = ro / "run"
    elif not os.access("/proc/sys", os.W_OK):  # not writable even by root
        out = "/proc/sys/npgpt-run"
    else:
        out = None
    if out is not None:
        assert main(["train", *TINY, "--max-steps", "1", "--out-dir", str(out)]) == 2
        lines = err_lines(capsys)
        assert len(lines) == 1 and "--out-dir" in lines[0] and "not writable" in lines[0]
    # a folder that becomes read-only after the checks: the first write fails
    def read_only(*a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(tmp_path / "run2"))

    monkeypatch.setattr(folder, "clean_stray_temporaries", read_only)
    assert main(["train", *TINY, "--max-steps", "1", "--out-dir", str(tmp_path / "run2")]) == 2
    lines = err_lines(capsys)
    assert len(lines) == 1 and "Read-only file system" in lines[0] and "choose a folder you can write to" in lines[0]


def test_disk_full_while_saving_keeps_the_previous_checkpoint(run, capsys, monkeypatch):
    """safetensors' writer fails (its error, not an OSError, made a traceback): one line, exit 2, the
    previous checkpoint intact, nothing half-written left."""
    from safetensors import SafetensorError
    from safetensors import numpy as st_numpy

    real = st_numpy.save_file

    def full_disk(tensors, filename, metadata=None):
        if "optimizer" in str(filename):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(st_numpy, "save_file", full_disk)
    before = sha256_tree(run / "checkpoints")
    capsys.readouterr()
    assert main(["train", *TINY, "--max-steps", "6", "--out-dir", str(run), "--resume"]) == 2
    lines = err_lines(capsys)
    assert len(lines) == 1, lines
    assert "checkpoint of step 6 could not be written: No space left on device" in lines[0]
    assert "free some space" in lines[0] and "the newest checkpoint is still" in lines[0] and "step-00000004" in lines[0]
    assert sha256_tree(run / "checkpoints") == before and not strays(run)


def test_a_real_write_failure_while_saving(run):
    """The same through the operating system: a file-size limit (RLIMIT_FSIZE) that the optimizer file
    exceeds makes the kernel refuse the write (EFBIG), in a subprocess."""
    size = (run / "checkpoints" / "step-00000004" / "optimizer.safetensors").stat().st_size
    limit = size * 3 // 4  # the weights (half of it) fit, the optimizer state does not

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    before = sha256_tree(run / "checkpoints")
    proc = subprocess.run([sys.executable, "-m", "npgpt", "train", *TINY, "--max-steps", "6", "--out-dir", str(run),
                           "--resume"], capture_output=True, text=True, env={**os.environ, "NPGPT_DEVICE": "cpu"},
                          preexec_fn=limit_file_size, timeout=300)  # fmt: skip
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "File too large" in lines[0] and "step-00000004" in lines[0]
    assert sha256_tree(run / "checkpoints") == before and not strays(run)
    assert checkpoint_problem(run / "checkpoints" / "step-00000004") is None


def test_bench_json_is_checked_before_the_benchmark(tmp_path, capsys, monkeypatch):
    import npgpt.cli.bench as bench_cli

    def no_benchmark(*a, **k):
        raise AssertionError("the benchmark ran")

    monkeypatch.setattr(bench_cli, "time_steps", no_benchmark)
    assert main(["bench", "--preset", "nano", "--context-length", "8", "--json", str(tmp_path)]) == 2
    lines = err_lines(capsys)
    assert len(lines) == 1 and "--json" in lines[0] and "is a folder" in lines[0]


def test_ctrl_c_during_generate(run):
    env = {**os.environ, "NPGPT_DEVICE": "cpu", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "npgpt", "generate", "--checkpoint", str(run), "--max-new-tokens",
                             "100000", "--no-stop-at-eot", "--temperature", "1"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
    proc.stdout.read(40)  # the prompt and some generated text: generation is under way
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert proc.returncode == 130 and lines == ["npgpt generate: interrupted"], stderr


def test_a_second_signal_during_a_save_lets_the_save_finish(tmp_path, capsys, monkeypatch):
    """The first Ctrl-C (during step 3) asks for a save; the second arrives while that checkpoint is being
    written: the save completes (a checkpoint that verifies, no temporary left), then training stops."""
    real_save, real_step = folder.save_training_checkpoint, T.Pretraining.train_step

    def save_with_signal(*a, **k):
        signal.raise_signal(signal.SIGINT)
        return real_save(*a, **k)

    def step_with_signal(self, number):
        result = real_step(self, number)
        if number == 3:
            signal.raise_signal(signal.SIGINT)
        return result

    monkeypatch.setattr(folder, "save_training_checkpoint", save_with_signal)
    monkeypatch.setattr(T.Pretraining, "train_step", step_with_signal)
    out = tmp_path / "run"
    assert main(["train", *TINY, "--max-steps", "50", "--out-dir", str(out)]) == 130
    lines = err_lines(capsys)
    assert len(lines) == 1 and "after the checkpoint of step 3 was written" in lines[0], lines
    assert [d.name for d in checkpoint_dirs(out)] == ["step-00000003"] and not strays(out)
    assert checkpoint_problem(out / "checkpoints" / "step-00000003") is None


def test_a_second_signal_between_saves_stops_at_once(run, capsys, monkeypatch):
    real_step = T.Pretraining.train_step

    def step_with_two_signals(self, number):
        if number == 6:
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGTERM)
        return real_step(self, number)

    monkeypatch.setattr(T.Pretraining, "train_step", step_with_two_signals)
    before = sha256_tree(run / "checkpoints")
    capsys.readouterr()
    assert main(["train", *TINY, "--max-steps", "50", "--out-dir", str(run), "--resume"]) == 130
    lines = err_lines(capsys)
    assert len(lines) == 1 and "without saving it" in lines[0] and "step-00000004" in lines[0], lines
    assert sha256_tree(run / "checkpoints") == before


def test_a_negative_step_in_the_training_state_is_a_damaged_checkpoint(run, capsys):
    """It made a ZeroDivisionError in the schedule. The manifest is rewritten to match, as a hand edit would."""
    newest = run / "checkpoints" / "step-00000004"
    state = json.loads((newest / "trainer_state.json").read_text())
    state["step"] = -3
    (newest / "trainer_state.json").write_text(json.dumps(state))
    write_manifest(newest, 4)
    assert "holds step -3" in checkpoint_problem(newest)
    capsys.readouterr()
    assert main(["train", *TINY, "--max-steps", "5", "--out-dir", str(run), "--resume"]) == 0
    captured = capsys.readouterr()
    assert "resuming at step 2" in captured.out
    warning = [line for line in captured.err.splitlines() if line.strip()]
    assert len(warning) == 1 and warning[0].startswith("npgpt: warning: skipping checkpoint") and "step -3" in warning[0]


# --- 5. no silent nonsense ------------------------------------------------------------------------------------


def test_flags_a_resume_cannot_honour_are_refused_by_name(run, capsys):
    before = sha256_tree(run)
    capsys.readouterr()
    assert main(["train", *TINY, "--max-steps", "6", "--out-dir", str(run), "--resume", "--n-layers", "2"]) == 2
    line = err_lines(capsys)[0]
    assert line.startswith("npgpt train: error: --n-layers 2 cannot be honoured by --resume") and "n_layers=1" in line
    assert main(["train", *TINY, "--max-steps", "6", "--out-dir", str(run), "--resume", "--seed", "7"]) == 2
    assert "--seed 7" in err_lines(capsys)[0]
    assert main(["train", *TINY, "--max-steps", "6", "--out-dir", str(run), "--resume", "--overwrite"]) == 2
    assert "--resume" in err_lines(capsys)[0]
    assert sha256_tree(run) == before
    # the same model flags as the run's are fine (the command line of the run, plus --resume)
    assert main(["train", *TINY, "--max-steps", "5", "--out-dir", str(run), "--resume"]) == 0


def test_init_from_refuses_a_preset(run, tmp_path, capsys):
    out = tmp_path / "ft"
    assert main(["train", "--init-from", str(run), "--preset", "gpt2", "--context-length", "16", "--out-dir", str(out)]) == 2
    lines = err_lines(capsys)
    assert len(lines) == 1 and "--preset cannot be combined with --init-from" in lines[0]
    assert not out.exists()


# --- 6. divergence is not success -----------------------------------------------------------------------------


def test_divergence_stops_without_a_checkpoint_and_says_so(tmp_path, capsys):
    """--lr 1e30: step 1's update blows the weights up; later steps are NaN and skipped. That run used to end
    with exit 0, a garbage checkpoint and "train loss 10.864" from step 1."""
    out = tmp_path / "run"
    assert main(["train", *TINY, "--max-steps", "4", "--lr", "1e30", "--out-dir", str(out)]) == 1
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in captured.err
    assert "training diverged" in lines[0] and "no checkpoint was kept" in lines[0] and "--lr" in lines[0]
    assert "the last finite training loss was 10.8" in lines[0] and "at step 1" in lines[0]
    assert "3 non-finite steps skipped" in lines[0]
    assert checkpoint_dirs(out) == [] and not (out / "summary.json").exists()
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "skip"] == [2, 3, 4]  # numbered as their step
    assert [r["step"] for r in records if r["kind"] == "step"] == [1, 2, 3, 4]


def test_divergence_keeps_the_last_good_checkpoint(run, capsys):
    before = sha256_tree(run / "checkpoints")
    summary = (run / "summary.json").read_bytes()
    capsys.readouterr()
    assert main(["train", *TINY, "--max-steps", "8", "--lr", "1e30", "--checkpoint-interval", "1", "--keep-last", "1",
                 "--out-dir", str(run), "--resume"]) == 1  # fmt: skip
    lines = err_lines(capsys)
    assert len(lines) == 1 and "step 5: training diverged" in lines[0]
    assert "the last good checkpoint" in lines[0] and "step-00000004 is kept" in lines[0]
    assert sha256_tree(run / "checkpoints") == before and (run / "summary.json").read_bytes() == summary
    assert latest_checkpoint(run, warn=False).name == "step-00000004"


def test_a_transient_non_finite_step_is_not_divergence(tmp_path, monkeypatch):
    """One NaN gradient is skipped and training goes on: the run succeeds and reports the skip."""
    from test_reliability import _nan_on_calls

    _nan_on_calls(monkeypatch, {2})
    r = T.train(T.TrainConfig(preset="nano", emb_dim=8, n_heads=2, n_layers=1, context_length=16, batch_size=2,
                              progress=False, sample_tokens=2, max_steps=4, out_dir=str(tmp_path / "run")))  # fmt: skip
    assert r.steps == 4 and r.skipped_steps == 1 and np.isfinite(r.train_loss)


# --- 7. messages that speak the command line ------------------------------------------------------------------


@pytest.mark.parametrize("argv, expected", [
    (["train", "--lr", "-1e-3"], "npgpt train: error: --lr must be a finite number > 0, got -0.001"),
    (["train", "--lr", "-inf"], "npgpt train: error: --lr must be a finite number > 0, got -inf"),
    (["train", "--seed", "-1"], "npgpt train: error: --seed must be at least 0, got -1"),
    (["train", "--context-length", "0"], "npgpt train: error: --context-length must be at least 1, got 0"),
    (["bench", "--batch-size", "0"], "npgpt bench: error: --batch-size must be at least 1, got 0"),
    (["bench", "--steps", "0"], "npgpt bench: error: --steps must be at least 1, got 0"),
    (["generate", "--temperature", "-0.5"], "npgpt generate: error: --temperature must be a finite number >= 0"),
    (["train", "--batch-size", "two"], "npgpt train: error: argument --batch-size: invalid int value: 'two' (see npgpt train --help)"),
])  # fmt: skip
def test_messages_name_the_flag(argv, expected, capsys):
    assert main(argv) == 2
    lines = err_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith(expected), lines
    assert "GPTConfig" not in lines[0] and "expected one argument" not in lines[0]


def test_a_missing_config_json_is_explained_for_the_command_line(run, tmp_path, capsys):
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "model.safetensors").write_bytes((run / "checkpoints" / "step-00000004" / "model.safetensors").read_bytes())
    assert main(["generate", "--checkpoint", str(weights)]) == 2
    lines = err_lines(capsys)
    assert len(lines) == 1 and "--checkpoint" in lines[0] and "no config.json" in lines[0] and "config=" not in lines[0]
