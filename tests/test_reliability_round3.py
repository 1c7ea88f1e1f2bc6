"""Issue 31, reliability round three: one test (or a few) for each numbered item; the bad values of items 4 to 7
are also in tests/test_bad_inputs.py's table. Item 2's kills at random moments of all four training commands
are in tests/test_overwrite_kills.py.

1. one run per --out-dir (a lock that dies with its process)      6. instruct's context sized on every split
2. --overwrite removes nothing of the earlier run before its       7. messages that name the right cause
   first checkpoint is complete (and a commit cut by a crash)      8. a signal during the final evaluation
3. --resume falls back past a checkpoint whose contents disagree   9. permissions follow the umask
4, 5. tracebacks, unbounded work and silent acceptances
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import err_lines, sha256_tree

from npgpt.checkpoint import CRASH_IN_SAVE_ENV, checkpoint_dirs, checkpoint_problem, good_checkpoints, write_manifest
from npgpt.cli import main
from npgpt.safetensors_io import load_safetensors

# (What is new with this issue is imported inside the tests that use it, so that the rest run on the code
# before it, and fail there for the reason each one names.)
PENDING_DIR = ".pending"  # npgpt.loop.folder.PENDING_DIR
LOCK_FILE = ".npgpt-lock"  # npgpt.loop.lock.LOCK_FILE

TINY = ["--preset", "nano", "--emb-dim", "8", "--n-heads", "2", "--n-layers", "1", "--tie-weights", "--context-length",
        "16", "--batch-size", "2", "--no-progress", "--sample-tokens", "2"]  # fmt: skip
ENV = {**os.environ, "NPGPT_DEVICE": "cpu", "PYTHONUNBUFFERED": "1"}


def start(args, env=None):
    return subprocess.Popen([sys.executable, "-m", "npgpt", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**ENV, **(env or {})})  # fmt: skip


def steps_in(path):
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.startswith('{"kind": "step"')]
    except (OSError, ValueError):
        return []


def step_losses(out):
    return [(r["step"], r["loss"]) for r in steps_in(out / "metrics.jsonl")]


def wait_for(predicate, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"the run ended first: {proc.communicate()[1]}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def earlier(tmp_path_factory):
    """A finished 4-step pretraining run (seed 1) with checkpoints at steps 2 and 4, summary.json and loss.png."""
    out = tmp_path_factory.mktemp("earlier") / "run"
    assert main(["train", *TINY, "--max-steps", "4", "--checkpoint-interval", "2", "--seed", "1", "--out-dir", str(out)]) == 0
    assert [d.name for d in checkpoint_dirs(out)] == ["step-00000002", "step-00000004"]
    assert (out / "summary.json").is_file() and (out / "loss.png").is_file()
    return out


@pytest.fixture
def run(earlier, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(earlier, out)
    return out


# --- 1. one run per folder -------------------------------------------------------------------------------------


def test_a_second_run_in_a_folder_is_refused_while_the_first_lives_and_free_once_it_is_killed(tmp_path, capsys):
    out = tmp_path / "run"
    first = start(["train", *TINY, "--max-steps", "100000", "--eval-interval", "100000", "--out-dir", str(out)])
    try:
        wait_for(lambda: steps_in(out / "metrics.jsonl"), first)  # it holds the folder and trains
        for argv in (["train", *TINY, "--max-steps", "2", "--out-dir", str(out)],
                     ["train", *TINY, "--max-steps", "2", "--out-dir", str(out), "--overwrite"],
                     ["seq2seq", "train", "--max-steps", "2", "--out-dir", str(out), "--overwrite"],
                     ["finetune", "--task", "classify", "--out-dir", str(out), "--resume"]):  # fmt: skip
            capsys.readouterr()
            assert main(argv) == 2
            lines = err_lines(capsys)
            assert len(lines) == 1 and f"{out} is in use by another run" in lines[0], lines
            assert f"pid {first.pid} on {socket.gethostname()}" in lines[0] and "npgpt train" in lines[0]
            assert "--max-steps 100000" in lines[0]  # the holder's command
        assert first.poll() is None  # untouched by the refusals
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    # the kernel dropped the lock with the process: no stale lock to clear by hand
    assert main(["train", *TINY, "--max-steps", "2", "--out-dir", str(out), "--overwrite"]) == 0
    assert [d.name for d in checkpoint_dirs(out)] == ["step-00000002"]


def test_two_runs_started_together_one_is_refused(tmp_path):
    """Both pass the checks of an empty folder at once (main: both exited 0, one's checkpoints holding the other's
    weights, metrics.jsonl interleaved); the lock taken before anything is written lets one in."""
    out = tmp_path / "run"
    procs = [start(["train", *TINY, "--max-steps", "60", "--eval-interval", "1000", "--seed", str(s), "--out-dir", str(out)])
             for s in (1, 2)]  # fmt: skip
    results = [p.communicate(timeout=300) + (p.returncode,) for p in procs]
    codes = sorted(code for _, _, code in results)
    if codes == [0, 0]:  # one ended before the other opened the folder (a loaded machine): then it went on after it
        pytest.skip("the two runs did not overlap")
    assert codes == [0, 2], results
    refused = next(err for _, err, code in results if code == 2)
    assert len(refused.strip().splitlines()) == 1 and "is in use by another run" in refused
    winner = next(i for i, (_, _, code) in enumerate(results) if code == 0)
    state = json.loads((checkpoint_dirs(out)[-1] / "trainer_state.json").read_text())
    assert state["seed"] == winner + 1 and [s for s, _ in step_losses(out)] == list(range(1, 61))


def test_the_lock_in_one_process(tmp_path):
    from npgpt.loop.lock import FolderBusy, FolderLock, holder

    a, b = FolderLock(tmp_path), FolderLock(tmp_path)
    assert holder(tmp_path) is None  # no lock file: nobody, and nothing created
    assert not (tmp_path / LOCK_FILE).exists()
    a.acquire()
    assert f"pid {os.getpid()} on {socket.gethostname()}" in holder(tmp_path)
    with pytest.raises(FolderBusy, match=f"is in use by another run \\(pid {os.getpid()} "):
        b.acquire()
    a.release()
    assert holder(tmp_path) is None
    b.acquire()
    b.release()


# --- 2. --overwrite: nothing of the earlier run goes before the new run's first checkpoint ------------------------


def test_overwrite_that_stops_before_its_first_checkpoint_leaves_the_earlier_run_as_it_was(run, capsys):
    """Main truncated metrics.jsonl at once (and seq2seq / finetune removed the checkpoints): a killed
    --overwrite followed by --resume spliced two histories."""
    before = sha256_tree(run, skip=(LOCK_FILE,))
    # diverges at its first step: no checkpoint of its own, so nothing of the earlier run may change
    assert main(["train", *TINY, "--max-steps", "3", "--lr", "1e30", "--out-dir", str(run), "--overwrite"]) == 1
    assert sha256_tree(run, skip=(LOCK_FILE,)) == before
    # killed inside its first save: the same, less what the next start clears (.pending, a temporary folder)
    proc = start(["train", *TINY, "--max-steps", "4", "--checkpoint-interval", "2", "--seed", "2", "--out-dir", str(run),
                  "--overwrite"], env={CRASH_IN_SAVE_ENV: "1"})  # fmt: skip
    assert proc.wait(timeout=120) == -signal.SIGKILL
    assert (run / PENDING_DIR / "metrics.jsonl").is_file()
    assert {k: v for k, v in sha256_tree(run, skip=(LOCK_FILE,)).items() if not k.startswith((PENDING_DIR, "checkpoints/.tmp"))} == before
    # so --resume continues the earlier run, with its own history
    old = step_losses(run)
    capsys.readouterr()
    assert main(["train", *TINY, "--max-steps", "6", "--checkpoint-interval", "2", "--seed", "1", "--out-dir", str(run),
                 "--resume"]) == 0  # fmt: skip
    assert "resuming at step 4" in capsys.readouterr().out
    assert step_losses(run)[:4] == old and [s for s, _ in step_losses(run)] == [1, 2, 3, 4, 5, 6]
    assert not (run / PENDING_DIR).exists()


@pytest.fixture(scope="module")
def new_reference(tmp_path_factory):
    """The run an --overwrite below starts (seed 2), never interrupted: its step losses."""
    out = tmp_path_factory.mktemp("new") / "run"
    assert main(["train", *TINY, "--max-steps", "6", "--checkpoint-interval", "2", "--seed", "2", "--out-dir", str(out)]) == 0
    return step_losses(out)


@pytest.mark.parametrize("point, committed", [("commit-marker", False), ("aside", False), ("commit-placed", True),
                                              ("commit-removed", True), ("commit-moved", True)])  # fmt: skip
def test_a_commit_cut_by_a_kill_is_finished_or_undone_by_the_next_start(run, point, committed, new_reference, capsys):
    """SIGKILL at each point of the first save's commit (its new step-2 replaces the earlier run's step-2: the
    'aside' point lies between the two renames). After each, at least one good checkpoint, and --resume
    continues one run with that run's own history: the earlier one (seed 1) before the new checkpoint had its
    name, the new one (seed 2) after."""
    from npgpt.checkpoint import CRASH_AT_ENV
    from npgpt.loop.folder import run_checkpoints

    old = step_losses(run)
    proc = start(["train", *TINY, "--max-steps", "6", "--checkpoint-interval", "2", "--seed", "2", "--out-dir", str(run),
                  "--overwrite"], env={CRASH_AT_ENV: point})  # fmt: skip
    assert proc.wait(timeout=120) == -signal.SIGKILL, proc.stderr.read()
    assert good_checkpoints(run)  # at least one, at every point
    if point == "aside":  # the earlier step-2 is under its aside name for the moment; step-4 is still there
        assert [d.name for d in good_checkpoints(run)] == ["step-00000004"]
    view = [d.name for d in run_checkpoints(run)]  # what --resume sees, before anything is repaired
    expected = {"commit-marker": ["step-00000002", "step-00000004"], "aside": ["step-00000004"]}
    assert view == expected.get(point, ["step-00000002"])
    capsys.readouterr()
    seed = "2" if committed else "1"
    assert main(["train", *TINY, "--max-steps", "6", "--checkpoint-interval", "2", "--seed", seed, "--out-dir", str(run),
                 "--resume"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    losses = step_losses(run)
    assert [s for s, _ in losses] == [1, 2, 3, 4, 5, 6]  # one history, never a splice of two
    if committed:
        assert "resuming at step 2" in out and losses == new_reference
    else:
        assert "resuming at step 4" in out and losses[:4] == old
    assert not (run / PENDING_DIR).exists() and not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]


def test_overwrite_replaces_the_earlier_summary_and_plots_only_when_it_has_a_checkpoint(run, capsys):
    """Once the new run's first checkpoint is complete, the earlier run's summary.json and loss.png go (a new run
    killed after that must not leave the earlier run's summary beside its own checkpoints)."""
    proc = start(["train", *TINY, "--max-steps", "200", "--checkpoint-interval", "2", "--eval-interval", "1000", "--seed",
                  "2", "--out-dir", str(run), "--overwrite"])  # fmt: skip
    try:  # the commit: the earlier step-4 goes, then .pending/ (after the earlier summary and plot)
        wait_for(lambda: not (run / "checkpoints" / "step-00000004").exists() and not (run / PENDING_DIR).exists(), proc)
        assert not (run / "summary.json").exists() and not (run / "loss.png").exists()
        assert [s for s, _ in step_losses(run)][:2] == [1, 2]  # its own metrics, moved into place
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)


# --- 3. --resume falls back past a checkpoint whose contents do not fit -------------------------------------------


def rewrite_tensors(path, change):
    from npgpt.checkpoint import save_tensors

    tensors = load_safetensors(path)
    change(tensors)
    save_tensors(path, tensors)
    write_manifest(path.parent, int(path.parent.name[5:]))  # as a hand edit with a new manifest would


def edit_state(d, change):
    state = json.loads((d / "trainer_state.json").read_text())
    change(state)
    (d / "trainer_state.json").write_text(json.dumps(state))
    write_manifest(d, int(d.name[5:]))


@pytest.mark.parametrize("damage", ["weights", "optimizer", "state", "config"])
def test_resume_falls_back_past_a_newest_checkpoint_whose_contents_disagree(run, damage, capsys):
    newest = run / "checkpoints" / "step-00000004"
    if damage == "weights":  # a shape that does not match the config (and the optimizer's moments)
        rewrite_tensors(newest / "model.safetensors", lambda t: t.update({"wpe.weight": t["wpe.weight"][:8]}))
        said = "wpe.weight"
    elif damage == "optimizer":
        rewrite_tensors(newest / "optimizer.safetensors", lambda t: t.update({"m.ln_f.bias": np.zeros(3, np.float32)}))
        said = "m.ln_f.bias"
    elif damage == "state":
        edit_state(newest, lambda s: s["optimizer"].update(t="ten"))
        said = "t = 'ten'"
    else:
        config = json.loads((newest / "config.json").read_text())
        config["npgpt"]["config"]["n_heads"] = 3
        (newest / "config.json").write_text(json.dumps(config))
        write_manifest(newest, 4)
        said = "config.json"
    capsys.readouterr()
    assert main(["train", *TINY, "--max-steps", "5", "--seed", "1", "--out-dir", str(run), "--resume"]) == 0
    captured = capsys.readouterr()
    assert "resuming at step 2" in captured.out
    warning = [line for line in captured.err.splitlines() if line.strip()]
    assert len(warning) == 1 and warning[0].startswith(f"npgpt: warning: skipping checkpoint {newest}") and said in warning[0]


def test_seq2seq_and_finetune_resume_fall_back_too(tmp_path, capsys):
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("one\tsatu\ntwo\tdua\nthree\ttiga\nfour\tempat\n" * 6, encoding="utf-8")
    table = tmp_path / "t.csv"
    table.write_text("text,label\n" + "a cat sat,cat\na dog ran,dog\n" * 6, encoding="utf-8")
    s2s = ["seq2seq", "train", "--data", str(pairs), "--d-model", "16", "--n-heads", "2", "--d-ff", "16", "--batch-size",
           "4", "--checkpoint-interval", "2", "--keep-last", "3", "--eval-pairs", "2", "--no-progress"]  # fmt: skip
    cls = ["finetune", "--task", "classify", "--data", str(table), "--emb-dim", "8", "--n-heads", "2", "--n-layers", "1",
           "--context-length", "8", "--batch-size", "4", "--no-progress"]  # fmt: skip
    for args, short, longer, name in ((s2s, ["--max-steps", "4"], ["--max-steps", "6"], "embed.weight"),
                                      (cls, ["--epochs", "2"], ["--epochs", "3"], "score.weight")):  # fmt: skip
        out = tmp_path / args[0]
        assert main([*args, *short, "--out-dir", str(out)]) == 0
        newest, before = checkpoint_dirs(out)[-1], checkpoint_dirs(out)[-2]
        key = name if args is s2s else "transformer.wte.weight"
        rewrite_tensors(newest / "model.safetensors", lambda t: t.update({key: t[key][:, :4]}))
        capsys.readouterr()
        assert main([*args, *longer, "--out-dir", str(out), "--resume"]) == 0
        captured = capsys.readouterr()
        assert f"resuming at step {int(before.name[5:])}" in captured.out
        assert f"skipping checkpoint {newest}" in captured.err and key.removeprefix("transformer.") in captured.err


# --- 4, 5. tracebacks and silent acceptances (more in test_bad_inputs.py) -----------------------------------------


def test_weights_cast_to_integers_are_a_damaged_checkpoint(run, capsys):
    newest = run / "checkpoints" / "step-00000004"
    rewrite_tensors(newest / "model.safetensors", lambda t: t.update({k: v.astype(np.int32) for k, v in t.items()}))
    assert "not floating point" in checkpoint_problem(newest)
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(run), "--max-new-tokens", "2"]) == 0  # the run: its newest good one
    assert "skipping checkpoint" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", str(newest), "--max-new-tokens", "2"]) == 2  # that checkpoint itself
    lines = err_lines(capsys)
    assert len(lines) == 1 and "int32" in lines[0] and "not floating point" in lines[0]
    assert main(["train", *TINY, "--max-steps", "5", "--seed", "1", "--out-dir", str(run), "--resume"]) == 0
    assert "resuming at step 2" in capsys.readouterr().out


def test_a_translation_state_without_history_resumes(tmp_path, capsys):
    """Was a KeyError (the run loop's merge had already fixed it; kept as a regression test)."""
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("one\tsatu\ntwo\tdua\nthree\ttiga\n" * 6, encoding="utf-8")
    args = ["seq2seq", "train", "--data", str(pairs), "--d-model", "16", "--n-heads", "2", "--d-ff", "16", "--batch-size",
            "4", "--eval-pairs", "2", "--no-progress", "--out-dir", str(tmp_path / "run")]  # fmt: skip
    assert main([*args, "--max-steps", "2"]) == 0
    edit_state(checkpoint_dirs(tmp_path / "run")[-1], lambda s: s.pop("history"))
    assert main([*args, "--max-steps", "3", "--resume"]) == 0


def test_generate_with_its_standard_output_closed_is_one_line(earlier):
    proc = subprocess.run(["sh", "-c", f'exec "{sys.executable}" -m npgpt generate --checkpoint "{earlier}" '
                           "--max-new-tokens 2 >&-"], capture_output=False, stderr=subprocess.PIPE, text=True, env=ENV,
                          timeout=120)  # fmt: skip
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "standard output is closed" in lines[0], proc.stderr


def test_a_repeated_data_flag_adds_its_files():
    from npgpt.cli import build_parser
    from npgpt.cli.train import config_from_args

    parse = build_parser().parse_args
    assert config_from_args(parse(["train", "--data", "the-verdict", "--data", "tang300"])).data == ["the-verdict", "tang300"]
    assert config_from_args(parse(["train"])).data == ["the-verdict"]
    assert config_from_args(parse(["train", "--recipe", "book-ch5", "--data", "tang300"])).data == ["tang300"]


def test_eval_offset_is_the_first_evaluated_step(tmp_path):
    """(s - offset) % interval == 0 held at step 2 for offset 7 and interval 5 (Python's -5 % 5 == 0)."""
    from test_run_loop import Approach, settings

    from npgpt.loop import run_task

    task = Approach()
    run_task(task, settings(tmp_path / "run", total_steps=12, eval_interval=5, eval_offset=7))
    assert [s for s, _ in task.evaluated] == [7, 12]


def test_the_token_cache_is_never_ignored_without_a_word(tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("NPGPT_CACHE_DIR", str(tmp_path / "file"))
    assert main(["train", *TINY, "--max-steps", "1", "--out-dir", str(tmp_path / "run")]) == 2
    lines = err_lines(capsys)
    assert len(lines) == 1 and "NPGPT_CACHE_DIR" in lines[0] and "is a file" in lines[0]
    assert not (tmp_path / "run").exists()
    # a cache that cannot be written when it comes to it (a full disk): a warning, and the run goes on
    import npgpt.data

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setenv("NPGPT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(npgpt.data, "atomic_path", full)
    text = tmp_path / "story.txt"
    text.write_text("Every effort moves you, and every step a little further along the road. " * 40)
    assert main(["train", *TINY, "--max-steps", "1", "--data", str(text), "--out-dir", str(tmp_path / "run")]) == 0
    warning = [line for line in err_lines(capsys) if "warning" in line]
    assert len(warning) == 1 and "token cache" in warning[0] and "No space left on device" in warning[0]


# --- 6. instruct: the default context fits every split, and any limit says what it drops ------------------------


def test_instruct_sizes_its_context_on_every_split(tmp_path, capsys):
    words = ["apple", "pear", "plum", "fig", "kiwi", "lime"]
    train = [{"instruction": "Say it.", "input": w, "output": w} for w in words]
    val = [{"instruction": "Say it twice, then once more, slowly.", "input": "pomegranate", "output": "pomegranate " * 3}]
    for name, recs in (("train", train), ("val", val), ("test", train[:2])):
        (tmp_path / f"{name}.json").write_text(json.dumps(recs))
    args = ["finetune", "--task", "instruct", "--data", str(tmp_path / "train.json"), "--val-data", str(tmp_path / "val.json"),
            "--test-data", str(tmp_path / "test.json"), "--emb-dim", "8", "--n-heads", "2", "--n-layers", "1", "--epochs",
            "1", "--batch-size", "3", "--samples", "0", "--no-progress"]  # fmt: skip
    capsys.readouterr()
    assert main([*args, "--out-dir", str(tmp_path / "a")]) == 0  # was: "every example ... is longer than the context"
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["val_examples"] == 1 and summary["skipped_examples"] == 0
    assert "left out" not in capsys.readouterr().out
    # an explicit limit that drops records says how many of each split
    assert main([*args, "--out-dir", str(tmp_path / "b"), "--context-length", "60"]) == 2  # the only val record goes
    assert "every example" in err_lines(capsys)[0]
    long_train = train + [{"instruction": "Say it twice, then once more, slowly.", "input": "pomegranate",
                           "output": "pomegranate " * 3}]  # fmt: skip
    (tmp_path / "train.json").write_text(json.dumps(long_train))
    (tmp_path / "val.json").write_text(json.dumps(train[:3]))
    assert main([*args, "--out-dir", str(tmp_path / "c"), "--context-length", "60"]) == 0
    assert "left out, longer than 60 tokens: 1 of 7 train, 0 of 3 val, 0 of 2 test records" in capsys.readouterr().out


# --- 7. messages that point the right way ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def others(tmp_path_factory):
    """A classifier run and a translation run (tiny), for the commands that are given the wrong one."""
    root = tmp_path_factory.mktemp("others")
    (root / "t.csv").write_text("text,label\n" + "a cat sat,cat\na dog ran,dog\n" * 6, encoding="utf-8")
    (root / "pairs.tsv").write_text("one\tsatu\ntwo\tdua\nthree\ttiga\n" * 6, encoding="utf-8")
    assert main(["finetune", "--task", "classify", "--data", str(root / "t.csv"), "--emb-dim", "8", "--n-heads", "2",
                 "--n-layers", "1", "--context-length", "8", "--batch-size", "4", "--epochs", "1", "--no-progress",
                 "--out-dir", str(root / "cls")]) == 0  # fmt: skip
    assert main(["seq2seq", "train", "--data", str(root / "pairs.tsv"), "--d-model", "16", "--n-heads", "2", "--d-ff", "16",
                 "--batch-size", "4", "--max-steps", "2", "--eval-pairs", "2", "--no-progress",
                 "--out-dir", str(root / "s2s")]) == 0  # fmt: skip
    return root


@pytest.mark.parametrize("kind, said", [("cls", "is a classifier (written by npgpt finetune --task classify)"),
                                        ("s2s", "this is a translation model (written by npgpt seq2seq train)")])  # fmt: skip
def test_generate_says_what_kind_of_checkpoint_it_was_given(others, kind, said, capsys):
    for where in (others / kind, checkpoint_dirs(others / kind)[-1]):
        assert main(["generate", "--checkpoint", str(where), "--max-new-tokens", "2"]) == 2
        lines = err_lines(capsys)
        assert len(lines) == 1 and said in lines[0], lines
        assert ("npgpt classify --checkpoint" if kind == "cls" else "npgpt seq2seq translate") in lines[0]


def test_a_bad_config_is_named(run, capsys):
    newest = run / "checkpoints" / "step-00000004"
    config = json.loads((newest / "config.json").read_text())
    config["npgpt"]["config"]["n_heads"] = 3
    (newest / "config.json").write_text(json.dumps(config))
    write_manifest(newest, 4)
    assert main(["generate", "--checkpoint", str(newest), "--max-new-tokens", "2"]) == 2
    lines = err_lines(capsys)
    assert len(lines) == 1 and str(newest / "config.json") in lines[0]


def test_the_recipe_is_named_when_its_settings_do_not_fit(run, tmp_path, capsys):
    assert main(["train", "--recipe", "book-ch5", "--out-dir", str(run), "--resume", "--no-progress"]) == 2
    lines = err_lines(capsys)
    assert len(lines) == 1 and "--preset gpt2 (from --recipe book-ch5) cannot be honoured by --resume" in lines[0]
    assert "leave --recipe book-ch5 out" in lines[0]
    assert main(["train", "--recipe", "book-ch5", "--init-from", str(run), "--out-dir", str(tmp_path / "b")]) == 2
    lines = err_lines(capsys)
    assert len(lines) == 1 and "--context-length 256 (from --recipe book-ch5) exceeds" in lines[0]
    # a damaged --init-from: the damage is named, not a setting that disagrees with it
    damaged = tmp_path / "damaged"
    shutil.copytree(run / "checkpoints" / "step-00000004", damaged)
    with open(damaged / "model.safetensors", "r+b") as f:
        f.seek(-4, os.SEEK_END)
        f.write(b"\0\0\0\0")
    assert main(["train", "--recipe", "book-ch5", "--init-from", str(damaged), "--out-dir", str(tmp_path / "c")]) == 2
    lines = err_lines(capsys)
    assert len(lines) == 1 and "refusing a damaged checkpoint" in lines[0] and "sha256" in lines[0]


def test_gradcheck_on_a_missing_gpu_refuses_before_the_cpu_suite(capsys):
    from npgpt.backend import cuda_available

    if cuda_available():
        pytest.skip("this machine has a working GPU")
    assert main(["gradcheck", "--device", "cuda"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "cuda" in captured.err  # nothing ran first


def test_a_deleted_current_folder_is_named(tmp_path):
    gone = tmp_path / "gone"
    gone.mkdir()
    code = ("import os, sys; os.chdir(sys.argv[1]); os.rmdir(sys.argv[1]); from npgpt.cli import main; "
            "sys.exit(main(['train', '--max-steps', '1']))")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code, str(gone)], capture_output=True, text=True, env=ENV, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "the current folder, which no longer exists" in lines[0], proc.stderr
    from npgpt.atomic import explain_os_error

    assert "removed while it ran" in explain_os_error(FileNotFoundError(2, "No such file or directory"))


# --- 8. a signal during the final evaluation -----------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_translations_final_evaluation_ends_with_a_line_and_a_summary(tmp_path, sig):
    """The final evaluation scores every held-out pair of the bundled corpus (4,127) with a beam: seconds, even
    for a tiny model. A signal there stops it at once; the training numbers still make a summary."""
    out = tmp_path / "run"
    proc = start(["seq2seq", "train", "--d-model", "16", "--n-heads", "2", "--n-encoder-layers", "1", "--n-decoder-layers",
                  "1", "--d-ff", "16", "--batch-size", "8", "--max-steps", "2", "--eval-pairs", "1", "--final-beam", "4",
                  "--no-progress", "--out-dir", str(out)])  # fmt: skip
    wait_for(lambda: (out / "checkpoints" / "step-00000002" / "manifest.json").is_file(), proc)
    time.sleep(0.5)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "npgpt seq2seq train: interrupted: a signal stopped the final evaluation" in lines[0]
    assert "npgpt seq2seq eval --checkpoint" in lines[0] and "Traceback" not in stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] is True and summary["steps"] == 2 and summary["exact_match"] is None
    assert np.isfinite(summary["train_loss"])


def test_sigterm_during_fine_tunings_test_scoring(tmp_path):
    """Instruction tuning's end generates a response for each of its test records (30 of the bundled ones)."""
    out = tmp_path / "run"
    proc = start(["finetune", "--task", "instruct", "--max-examples", "30", "--emb-dim", "8", "--n-heads", "2",
                  "--n-layers", "1", "--batch-size", "30", "--epochs", "1", "--samples", "0", "--no-progress",
                  "--out-dir", str(out)])  # fmt: skip
    wait_for(lambda: any(r["kind"] == "epoch" and r["epoch"] == 1 for r in map(json.loads, _lines(out / "metrics.jsonl"))),
             proc)  # fmt: skip
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "interrupted: a signal stopped the final evaluation (the test records' loss and exact match)" in stderr
    assert json.loads((out / "summary.json").read_text())["exact_match"] is None


def test_a_signal_during_the_last_save_does_not_start_the_final_evaluation(tmp_path, capsys):
    """Noted by the save (which always completes), it was then forgotten: the final evaluation ran in full."""
    from test_run_loop import Approach, settings

    from npgpt.loop import run_task

    class SignalInTheLastSave(Approach):
        def write_model(self, directory):
            super().write_model(directory)
            if self.batches.i == 6:
                os.kill(os.getpid(), signal.SIGINT)

        def finish(self, report):
            self.finished_as_interrupted = report.interrupted
            return super().finish(report)

    task = SignalInTheLastSave()
    run_task(task, settings(tmp_path / "run", total_steps=6, checkpoint_interval=3))
    assert task.finished_as_interrupted is True
    assert "npgpt approach: interrupted: a signal stopped the end of the run" in capsys.readouterr().err
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 6


def _lines(path):
    try:
        return [line for line in path.read_text().splitlines() if line.endswith("}")]
    except OSError:
        return []


# --- 9. permissions follow the umask --------------------------------------------------------------------------


@pytest.mark.parametrize("umask, folder, file", [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600), (0o002, 0o775, 0o664)])
def test_a_runs_files_follow_the_umask(tmp_path, umask, folder, file):
    old = os.umask(umask)
    try:
        out = tmp_path / "run"
        assert main(["train", *TINY, "--max-steps", "2", "--out-dir", str(out)]) == 0
        ckpt = checkpoint_dirs(out)[-1]
        assert oct(ckpt.stat().st_mode & 0o777) == oct(folder)
        for p in [*ckpt.iterdir(), out / "metrics.jsonl", out / "summary.json", out / "loss.png"]:
            assert oct(p.stat().st_mode & 0o777) == oct(file), p
        # a file that is replaced keeps the mode it was given
        (out / "summary.json").chmod(0o640)
        assert main(["train", *TINY, "--max-steps", "3", "--out-dir", str(out), "--resume"]) == 0
        assert oct((out / "summary.json").stat().st_mode & 0o777) == oct(0o640)
    finally:
        os.umask(old)


@pytest.mark.parametrize("stderr_too", [False, True], ids=["stdout", "stdout and stderr"])
def test_a_reader_that_leaves_does_not_end_the_run(tmp_path, stderr_too):
    """`npgpt train ... | head -1` (and `2>&1 | head -1`, progress bar on): the reader leaving after the first
    line no longer ends the run with "error: Broken pipe" before its summary; the run ends as usual, exit 0,
    and says on stderr (when stderr still has a reader) that its output was cut."""
    run = tmp_path / "run"
    args = [a for a in TINY if not (stderr_too and a == "--no-progress")]
    proc = subprocess.Popen([sys.executable, "-m", "npgpt", "train", *args, "--max-steps", "6", "--eval-interval", "2",
                             "--out-dir", str(run)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT if stderr_too else subprocess.PIPE, env=ENV)  # fmt: skip
    first = proc.stdout.readline()
    proc.stdout.close()  # the reader leaves while the run has its steps ahead of it
    err = b"" if stderr_too else proc.stderr.read()
    assert proc.wait(timeout=120) == 0, err.decode()
    assert first.strip(), "the run printed nothing before the reader left"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 6 and not summary["interrupted"] and Path(summary["checkpoint"]).name == "step-00000006"
    assert len(steps_in(run / "metrics.jsonl")) == 6
    if not stderr_too:
        assert b"its output's reader left" in err and b"Traceback" not in err, err.decode()


def test_generate_stops_when_its_reader_leaves(earlier):
    """`npgpt generate ... | head -c 1`: generation stops at the first token written after the reader left (exit
    0, one line saying so), rather than generating the rest for nobody or ending with a traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "npgpt", "generate", "--checkpoint", str(earlier),
                             "--max-new-tokens", "100000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)  # fmt: skip
    proc.stdout.read(1)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == ["npgpt generate: its output's reader left (a pipe's end was closed); nothing more was printed"], err


def test_resume_refuses_other_adamw_settings(tmp_path, capsys):
    """--weight-decay / --beta1 / --beta2 on --resume were silently replaced by the saved optimizer's values,
    while the new checkpoints recorded the flags' values: now refused by name, with the values to resume with."""
    run = str(tmp_path / "run")
    assert main(["train", *TINY, "--max-steps", "2", "--weight-decay", "0.2", "--out-dir", run]) == 0
    capsys.readouterr()
    assert main(["train", *TINY, "--max-steps", "3", "--resume", "--out-dir", run]) == 2  # the default 0.1 is not 0.2
    assert err_lines(capsys) == ["npgpt train: error: --weight-decay 0.1 cannot be honoured by --resume: the run being "
                                 "resumed has --weight-decay 0.2 (its AdamW state continues with its own settings); "
                                 "resume with --weight-decay 0.2 (or start a new run in another --out-dir)"]  # fmt: skip
    assert main(["train", *TINY, "--max-steps", "3", "--resume", "--weight-decay", "0.2", "--beta1", "0.8", "--out-dir", run]) == 2
    assert "--beta1 0.8 cannot be honoured by --resume: the run being resumed has --beta1 0.9" in err_lines(capsys)[0]
    assert main(["train", *TINY, "--max-steps", "3", "--resume", "--weight-decay", "0.2", "--out-dir", run]) == 0
