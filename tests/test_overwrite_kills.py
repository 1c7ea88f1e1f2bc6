"""--overwrite killed at random moments, for every command that trains (issue 31, item 2): after each SIGKILL
at least one checkpoint verifies, and the folder holds one run, never a mix: either the earlier run exactly
as it was (nothing of it is removed or rewritten before the new run's first checkpoint is complete), or the
new run, its own metrics and checkpoints only (a commit cut short is finished or undone by the next start,
which the next kill's run is). Then an --overwrite to the end leaves the new run alone.

Four kills per command, each at a moment drawn from a seeded generator: somewhere in the start-up, a few
milliseconds after one of the new run's first steps, around its first save (when its temporary checkpoint
folder appears), and just after its first checkpoint is committed. Tiny models: about 6 s per command."""

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from npgpt.checkpoint import checkpoint_dirs, checkpoint_problem
from npgpt.cli import main

PENDING, LOCK = ".pending", ".npgpt-lock"
GPT = ["--emb-dim", "8", "--n-heads", "2", "--n-layers", "1", "--no-progress"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("overwrite-data")
    (root / "t.csv").write_text("text,label\n" + "a cat sat,cat\na dog ran,dog\na cow ate,cow\n" * 8, encoding="utf-8")
    words = ["apple", "pear", "plum", "fig", "kiwi", "lime", "date", "peach", "grape", "melon", "mango", "lemon"]
    recs = [{"instruction": "Say it.", "input": w, "output": w} for w in words]
    (root / "inst.json").write_text(json.dumps(recs))
    (root / "test.json").write_text(json.dumps(recs[:2]))
    (root / "pairs.tsv").write_text("one\tsatu\ntwo\tdua\nthree\ttiga\nfour\tempat\nfive\tlima\n" * 6, encoding="utf-8")
    return root


def command(name, data, out, seed):
    if name == "train":
        return ["train", *GPT, "--tie-weights", "--context-length", "16", "--batch-size", "2", "--sample-tokens", "2",
                "--max-steps", "12", "--checkpoint-interval", "4", "--eval-interval", "4", "--seed", seed, "--out-dir", out]  # fmt: skip
    if name == "classify":  # 20 training texts in batches of 4: 5 steps an epoch, a checkpoint after each
        return ["finetune", "--task", "classify", "--data", str(data / "t.csv"), *GPT, "--context-length", "8",
                "--batch-size", "4", "--epochs", "3", "--seed", seed, "--out-dir", out]  # fmt: skip
    if name == "instruct":  # 10 training records in batches of 2
        return ["finetune", "--task", "instruct", "--data", str(data / "inst.json"), "--test-data", str(data / "test.json"),
                *GPT, "--batch-size", "2", "--epochs", "2", "--samples", "0", "--seed", seed, "--out-dir", out]  # fmt: skip
    return ["seq2seq", "train", "--data", str(data / "pairs.tsv"), "--d-model", "16", "--n-heads", "2", "--d-ff", "16",
            "--n-encoder-layers", "1", "--n-decoder-layers", "1", "--batch-size", "4", "--max-steps", "12",
            "--checkpoint-interval", "4", "--eval-interval", "4", "--eval-pairs", "2", "--no-progress", "--seed", seed,
            "--out-dir", out]  # fmt: skip


def files(out) -> dict:
    """sha256 of the run's files, less what only a start in progress has (its pending files and temporary
    checkpoint folders, which the next start clears) and the lock."""
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != LOCK and not str(p.relative_to(out)).startswith((PENDING, "checkpoints/.tmp"))}  # fmt: skip


def steps(path) -> list[int]:
    try:
        return [json.loads(line)["step"] for line in path.read_text().splitlines()
                if line.startswith('{"kind": "step"') and line.endswith("}")]  # fmt: skip
    except OSError:
        return []


def seeds_of_checkpoints(out) -> set:
    seeds = set()
    for d in checkpoint_dirs(out):
        state = json.loads((d / "trainer_state.json").read_text())
        seeds.add(state.get("seed", (state.get("finetune_config") or state.get("train_config") or {}).get("seed")))
    return seeds


def wait_until(proc, condition) -> None:
    deadline = time.monotonic() + 120
    while proc.poll() is None and not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def newer(path, started_ns: int) -> bool:
    """Written by the run started at started_ns (not left by an earlier one)."""
    try:
        return path.stat().st_mtime_ns > started_ns
    except OSError:
        return False


def kill_at_a_random_moment(proc, out, moment, rng, started_ns: int) -> int:
    """The moments are told by what the new run writes, wherever it writes it (.pending/ or the folder itself)."""
    root = out / "checkpoints"

    def its_checkpoints(prefix):
        return root.is_dir() and any(p.name.startswith(prefix) and newer(p, started_ns) for p in root.iterdir())

    if moment == "start-up":
        time.sleep(rng.uniform(0.0, 1.0))
    else:  # once it has logged a step
        logs = [out / PENDING / "metrics.jsonl", out / "metrics.jsonl"]
        wait_until(proc, lambda: any(newer(m, started_ns) and steps(m) for m in logs))
        if moment == "the first save":  # its temporary checkpoint folder appears (or the checkpoint is there)
            wait_until(proc, lambda: its_checkpoints(".tmp-step") or its_checkpoints("step-"))
        if moment == "after the first save":  # its checkpoint took its name, and the commit is over
            wait_until(proc, lambda: its_checkpoints("step-") and not (out / PENDING).exists())
        time.sleep(rng.uniform(0.0, 0.05 if moment == "the first save" else 0.02))
    proc.send_signal(signal.SIGKILL)
    return proc.wait(timeout=60)


@pytest.mark.parametrize("name", ["train", "classify", "instruct", "seq2seq"])
def test_overwrite_killed_at_random_moments_never_loses_the_last_checkpoint(name, data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(command(name, data, str(out), "1")) == 0  # the earlier run
    rng = random.Random(f"overwrite-{name}")
    env = {**os.environ, "NPGPT_DEVICE": "cpu", "PYTHONUNBUFFERED": "1"}
    checked = []  # the moments after which the new run's committed folder was checked for a mix of two runs
    for moment in ("start-up", "a step", "the first save", "after the first save"):
        before, started_ns = files(out), time.time_ns()
        proc = subprocess.Popen([sys.executable, "-m", "npgpt", *command(name, data, str(out), "2"), "--overwrite"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
        code = kill_at_a_random_moment(proc, out, moment, rng, started_ns)
        assert code in (0, -signal.SIGKILL), proc.stderr.read()
        good = [d for d in checkpoint_dirs(out) if checkpoint_problem(d) is None]
        assert good, f"{name}, killed at {moment}: no checkpoint verifies"
        after = files(out)
        if after != before:  # the new run committed (its first checkpoint is complete), or the commit was cut short
            in_progress = (out / PENDING / "commit.json").is_file()
            if not in_progress:  # the new run alone: its checkpoints, its metrics, no earlier summary
                checked.append(moment)
                assert seeds_of_checkpoints(out) == {2}, f"{name}, killed at {moment}: checkpoints of two runs"
                logged = steps(out / "metrics.jsonl")
                assert logged == list(range(1, len(logged) + 1)), f"{name}, killed at {moment}: metrics of two runs"
                if code != 0:  # killed: the earlier run's summary went with its checkpoints (a summary there is
                    # the new run's own, when the kill came after its end, while Python was exiting)
                    earlier = before.get("summary.json")
                    assert earlier is None or after.get("summary.json") != earlier, (
                        f"{name}, killed at {moment}: the earlier run's summary is left")  # fmt: skip
    # some kill came after a commit ("after the first save" at the latest, unless an earlier one had committed):
    # without this the checks of a mix of two runs above could all be skipped unseen
    assert checked, f"{name}: no kill came after the new run's commit, so its folder was never checked"
    # the next start finishes (or undoes) whatever was cut short; an --overwrite to the end leaves the new run alone
    capsys.readouterr()
    assert main([*command(name, data, str(out), "2"), "--overwrite"]) == 0
    assert seeds_of_checkpoints(out) == {2}
    logged = steps(out / "metrics.jsonl")
    assert logged == list(range(1, logged[-1] + 1))
    assert not (out / PENDING).exists() and not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    assert json.loads((out / "summary.json").read_text())["steps"] == logged[-1]
