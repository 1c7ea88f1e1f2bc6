"""kill -9 at random moments: every checkpoint left behind verifies, and --resume, again and again, ends
with the same weights (and the same loss at every step) as a run that was never interrupted.

A subprocess loop bounded in time (about 30 s): start or resume training, wait until it reaches a random
step (or a random moment of its start-up), SIGKILL it a random few milliseconds later, check every
step-* folder. Checkpoints are written at every step, so many kills land inside a save; the first kill
is placed inside one on purpose (the NPGPT_TEST_CRASH_IN_SAVE hook)."""

import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
from conftest import step_losses

from npgpt.checkpoint import CRASH_IN_SAVE_ENV, checkpoint_dirs, checkpoint_problem, good_checkpoints
from npgpt.safetensors_io import load_safetensors

STEPS = 40
ARGS = ["train", "--preset", "nano", "--emb-dim", "8", "--n-heads", "2", "--n-layers", "1", "--tie-weights",
        "--context-length", "16", "--batch-size", "2", "--no-progress", "--sample-tokens", "2", "--drop-rate", "0.1",
        "--max-steps", str(STEPS), "--checkpoint-interval", "1", "--keep-last", "2", "--eval-interval", "10"]  # fmt: skip
BUDGET_S = 30


def start(out, env_extra=None, args=ARGS):
    resume = ["--resume"] if good_checkpoints(out) else []
    env = {**os.environ, "NPGPT_DEVICE": "cpu", **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "npgpt", *args, "--out-dir", str(out), *resume],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip


def last_step_logged(out) -> int:
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return 0
    steps = [int(line.split('"step": ')[1].split(",")[0]) for line in lines if line.startswith('{"kind": "step"')]
    return max(steps, default=0)


def test_sigkill_at_random_moments(tmp_path):
    ref = tmp_path / "ref"
    i = ARGS.index("--checkpoint-interval")
    proc = start(ref, args=ARGS[:i] + ARGS[i + 2 :])  # saved at the end only
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    out = tmp_path / "killed"
    rng = random.Random(14)
    deadline = time.monotonic() + BUDGET_S
    kills, finished, in_save = 0, False, False
    while time.monotonic() < deadline and not finished:
        hook = {CRASH_IN_SAVE_ENV: "3"} if not in_save else None  # the first kill: inside the 3rd save
        proc = start(out, hook)
        base = max((int(d.name[5:]) for d in good_checkpoints(out)), default=0)  # where this start resumes
        if hook is None and base + 2 <= STEPS:  # (else: let it finish)
            if rng.random() < 0.2:
                time.sleep(rng.uniform(0.0, 1.5))  # somewhere in the start-up
            else:  # a record beyond base + 1 is this process's own (a killed run may have logged base + 1)
                target = rng.randint(base + 2, STEPS)
                while proc.poll() is None and last_step_logged(out) < target:
                    time.sleep(0.002)
                time.sleep(rng.uniform(0.0, 0.05))
            proc.send_signal(signal.SIGKILL)
        code = proc.wait(timeout=300)
        in_save = True
        if code == 0:
            finished = True
        else:
            assert code == -signal.SIGKILL, proc.stderr.read()
            kills += 1
        for d in checkpoint_dirs(out):  # .tmp-* leftovers are allowed: the next start removes them
            assert checkpoint_problem(d) is None, f"after kill {kills}: {checkpoint_problem(d)}"
    while not finished:  # the time is up: resume to the end without killing
        proc = start(out)
        assert proc.wait(timeout=300) == 0, proc.stderr.read()
        finished = True
    assert kills >= 3, "too few kills to mean anything"
    assert [d.name for d in checkpoint_dirs(out)] == [f"step-{STEPS - 1:08d}", f"step-{STEPS:08d}"]
    a = load_safetensors(ref / "checkpoints" / f"step-{STEPS:08d}" / "model.safetensors")  # never interrupted
    b = load_safetensors(out / "checkpoints" / f"step-{STEPS:08d}" / "model.safetensors")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert step_losses(out) == step_losses(ref)  # every step redone after a kill computed the same loss
