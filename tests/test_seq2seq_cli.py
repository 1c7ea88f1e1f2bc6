"""`npgpt seq2seq train | translate | eval`: a short training run end to end, resuming, and bad input
(one line on stderr, exit 2, nothing lost)."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from npgpt.checkpoint import latest_checkpoint, verify_manifest
from npgpt.cli import main
from npgpt.safetensors_io import load_safetensors
from npgpt.seq2seq.data import bundled_pairs_path

TINY = ["--d-model", "32", "--n-heads", "2", "--n-encoder-layers", "1", "--n-decoder-layers", "1", "--d-ff", "64",
        "--batch-size", "16", "--eval-pairs", "16", "--max-len", "32", "--no-progress"]  # fmt: skip


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    """400 pairs of every kind (every 100th line of the bundled corpus)."""
    lines = bundled_pairs_path().read_text(encoding="utf-8").splitlines()[::100][:400]
    path = tmp_path_factory.mktemp("data") / "pairs.tsv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained(pairs_file, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "run"
    code = main(["seq2seq", "train", "--data", str(pairs_file), "--out-dir", str(run), "--max-steps", "40",
                 "--eval-interval", "20", "--lr", "3e-3", "--warmup-steps", "5", *TINY])  # fmt: skip
    assert code == 0
    return run


def run_cli(capsys, *argv):
    code = main(["seq2seq", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_training_run_writes_everything(trained):
    assert (trained / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "step"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert len(steps) == 40 and [r["step"] for r in evals] == [20, 40]
    assert all(" -> " in r["sample"] for r in evals)  # a sample translation at each evaluation
    assert np.mean([r["loss"] for r in steps[-5:]]) < np.mean([r["loss"] for r in steps[:5]]) - 1.0  # it learns (7.2 -> 5.8)
    summary = json.loads((trained / "summary.json").read_text())
    assert summary["n_held_out"] == 40 and len((trained / "heldout.tsv").read_text().splitlines()) == 40
    assert 0.0 <= summary["exact_match"] <= 1.0 and 0.0 <= summary["bleu"] <= 100.0
    ck = latest_checkpoint(trained)
    assert ck.name == "step-00000040" and verify_manifest(ck) is None
    config = json.loads((ck / "config.json").read_text())["npgpt_seq2seq"]
    assert config["config"]["d_model"] == 32 and len(config["vocab"]["gpt2_ids"]) + 3 == config["config"]["tgt_vocab_size"]


def test_translate_and_eval(trained, capsys):
    held = [line.split("\t") for line in (trained / "heldout.tsv").read_text(encoding="utf-8").splitlines()]
    code, out, _ = run_cli(capsys, "translate", "--checkpoint", str(trained), "--text", held[0][0], "--text", held[1][0])
    assert code == 0 and len(out.splitlines()) == 2
    code, out, _ = run_cli(capsys, "translate", "--checkpoint", str(trained), "--text", held[0][0], "--beam", "3")
    assert code == 0 and len(out.splitlines()) == 1
    code, out, _ = run_cli(capsys, "eval", "--checkpoint", str(trained))  # default: the run's held-out pairs
    assert code == 0 and "BLEU" in out
    exact = float(out.split("exact match ")[1].split("%")[0]) / 100
    assert exact == pytest.approx(json.loads((trained / "summary.json").read_text())["exact_match"], abs=1e-4)


def test_resume_continues_exactly(pairs_file, tmp_path):
    """10 steps, then --resume to 20, gives the weights of 20 steps in one go (dropout on)."""
    common = ["--data", str(pairs_file), "--eval-interval", "10", *TINY]
    assert main(["seq2seq", "train", "--out-dir", str(tmp_path / "a"), "--max-steps", "20", *common]) == 0
    assert main(["seq2seq", "train", "--out-dir", str(tmp_path / "b"), "--max-steps", "10", *common]) == 0
    assert main(["seq2seq", "train", "--out-dir", str(tmp_path / "b"), "--max-steps", "20", "--resume", *common]) == 0
    a = load_safetensors(latest_checkpoint(tmp_path / "a") / "model.safetensors")
    b = load_safetensors(latest_checkpoint(tmp_path / "b") / "model.safetensors")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_fast_and_reference_engines_train_alike(pairs_file, tmp_path):
    """8 steps of the default (fast) engine and of --engine reference, float64, dropout on: the same weights
    (the engines agree to ~1e-15 per step in float64, and AdamW carries that through)."""
    common = ["--data", str(pairs_file), "--max-steps", "8", "--eval-interval", "8", "--eval-pairs", "0", "--dtype", "float64",
              "--warmup-steps", "2", *TINY]  # fmt: skip
    assert main(["seq2seq", "train", "--out-dir", str(tmp_path / "fast"), *common]) == 0
    assert main(["seq2seq", "train", "--out-dir", str(tmp_path / "ref"), "--engine", "reference", *common]) == 0
    a = load_safetensors(latest_checkpoint(tmp_path / "fast") / "model.safetensors")
    b = load_safetensors(latest_checkpoint(tmp_path / "ref") / "model.safetensors")
    worst = max(float(np.abs(a[k] - b[k]).max() / (np.abs(b[k]).max() + 1e-30)) for k in a)
    assert worst < 1e-12, worst  # measured: 3.5e-15
    steps = [json.loads(r) for r in (tmp_path / "fast" / "metrics.jsonl").read_text().splitlines()]
    ref_steps = [json.loads(r) for r in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in steps if r["kind"] == "step"]
    assert losses == pytest.approx([r["loss"] for r in ref_steps if r["kind"] == "step"], rel=1e-10)
    assert losses[-1] < losses[0]


# --- bad input: one line, exit 2, nothing lost ----------------------------------------------------------


def one_line_error(code, err, *fragments):
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("npgpt seq2seq: error: "), err
    for f in fragments:
        assert f in err, err


@pytest.mark.parametrize("bad_line, fragments", [
    ("two dua", ["line 31 has no tab"]),
    ("\tdua", ["line 31 has an empty source"]),
    ("two\t", ["line 31 has an empty target"]),
    ("one two three four five six seven eight nine ten\tsatu", ["the source has 10 tokens, more than the 8", "--max-len"]),
])  # fmt: skip
def test_bad_training_data(tmp_path, capsys, bad_line, fragments):
    data = tmp_path / "bad.tsv"
    data.write_text("one\tsatu\n" * 30 + bad_line + "\n" + "three\ttiga\n" * 30, encoding="utf-8")
    code, _, err = run_cli(capsys, "train", "--data", str(data), "--out-dir", str(tmp_path / "run"), *TINY, "--max-len", "8")
    one_line_error(code, err, *fragments)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_bad_translate_input(trained, capsys):
    code, _, err = run_cli(capsys, "translate", "--checkpoint", str(trained), "--text", "Monday 你好")
    one_line_error(code, err, "'Monday 你好'", "not in the model's vocabulary")
    long_text = " ".join(["1"] * 40)  # "1" and " 1" are tokens of the training data: 40 known tokens
    code, _, err = run_cli(capsys, "translate", "--checkpoint", str(trained), "--text", long_text)
    one_line_error(code, err, "has 40 tokens but the model takes at most 32")
    code, _, err = run_cli(capsys, "translate", "--checkpoint", str(trained.parent / "nowhere"), "--text", "Monday")
    one_line_error(code, err, "nowhere")
    code, _, err = run_cli(capsys, "translate", "--checkpoint", str(trained), "--text", "Monday", "--beam", "0")
    one_line_error(code, err, "--beam must be at least 1")
    code, _, err = run_cli(capsys, "eval", "--checkpoint", str(trained), "--data", str(trained / "missing.tsv"))
    one_line_error(code, err, "missing.tsv")


def test_a_finished_run_is_never_clobbered(trained, pairs_file, tmp_path, capsys):
    ck = latest_checkpoint(trained)
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in ck.iterdir()}
    code, _, err = run_cli(capsys, "train", "--data", str(pairs_file), "--out-dir", str(trained), *TINY)
    one_line_error(code, err, "already holds checkpoints", "--resume", "--overwrite")
    other = tmp_path / "other.tsv"
    other.write_text("one\tsatu\n" * 50, encoding="utf-8")
    code, _, err = run_cli(capsys, "train", "--data", str(other), "--out-dir", str(trained), "--resume", "--max-steps", "99", *TINY)
    one_line_error(code, err, "other data")
    code, _, err = run_cli(capsys, "train", "--data", str(pairs_file), "--out-dir", str(tmp_path / "x"), "--d-model", "30",
                           "--n-heads", "4", "--no-progress")  # fmt: skip
    one_line_error(code, err, "--d-model 30 is not divisible by --n-heads 4")
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in latest_checkpoint(trained).iterdir()}
    assert after == before
    assert Path(latest_checkpoint(trained)) == ck
