"""Checkpoint cleanup never loses the last good checkpoint: only good checkpoints count toward --keep-last,
a manifest must list every file a resume needs, and non-finite weights make a checkpoint damaged."""

import json

import numpy as np
import pytest

import npgpt
from npgpt.checkpoint import checkpoint_problem, latest_checkpoint, verify_manifest
from npgpt.cli import main
from npgpt.safetensors_io import load_safetensors

S = ["--preset", "nano", "--context-length", "16", "--batch-size", "2", "--no-progress", "--sample-tokens", "2"]


def names(out):
    return sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step-"))


def flip_a_byte(path, offset=-5):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def train_cli(*args):
    return main(["train", *S, *args])


def test_the_data_loss_sequence_of_the_issue_keeps_the_good_checkpoints(tmp_path, capsys):
    out = tmp_path / "R"
    assert train_cli("--max-steps", "6", "--checkpoint-interval", "2", "--out-dir", str(out)) == 0
    assert names(out) == ["step-00000002", "step-00000004", "step-00000006"]
    flip_a_byte(out / "checkpoints" / "step-00000006" / "optimizer.safetensors")
    capsys.readouterr()
    assert train_cli("--out-dir", str(out), "--resume", "--keep-last", "1", "--max-steps", "5") == 0
    stdout = capsys.readouterr().out
    assert "resuming at step 4" in stdout and "step-00000005" in stdout
    # kept: step 5 (just written, the one --keep-last 1 asks for) and step 4 (resumed from: never removed by
    # the save that follows the resume); the damaged step 6 did not count toward --keep-last
    assert names(out) == ["step-00000004", "step-00000005", "step-00000006"]
    assert latest_checkpoint(out, warn=False).name == "step-00000005"
    assert npgpt.load_pretrained(out).config.context_length == 16  # generate finds a checkpoint
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(out), "--max-new-tokens", "3"]) == 0


def test_keep_last_2_with_the_two_newest_damaged(tmp_path):
    out = tmp_path / "R"
    assert train_cli("--max-steps", "8", "--checkpoint-interval", "2", "--keep-last", "4", "--out-dir", str(out)) == 0
    for step in (6, 8):
        flip_a_byte(out / "checkpoints" / f"step-{step:08d}" / "model.safetensors")
    assert train_cli("--out-dir", str(out), "--resume", "--keep-last", "2", "--max-steps", "5") == 0
    # resumed from 4, wrote 5: the two newest good ones are 4 and 5; the damaged 6 and 8 are newer, kept to inspect
    assert names(out) == ["step-00000004", "step-00000005", "step-00000006", "step-00000008"]
    assert latest_checkpoint(out, warn=False).name == "step-00000005"
    assert train_cli("--out-dir", str(out), "--resume", "--keep-last", "2", "--max-steps", "7",
                     "--checkpoint-interval", "1") == 0  # fmt: skip
    # step 6 was written again (replacing the damaged one); good: 6, 7; the damaged 8 stays
    assert names(out) == ["step-00000006", "step-00000007", "step-00000008"]
    assert checkpoint_problem(out / "checkpoints" / "step-00000006") is None


def test_resuming_to_max_steps_at_or_below_the_checkpoint_touches_nothing(tmp_path, capsys):
    out = tmp_path / "R"
    assert train_cli("--max-steps", "4", "--checkpoint-interval", "2", "--out-dir", str(out)) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for steps in ("4", "3"):
        capsys.readouterr()
        assert train_cli("--out-dir", str(out), "--resume", "--max-steps", steps) == 2
        err = capsys.readouterr().err
        assert f"--max-steps {steps} is not beyond step 4" in err and "Traceback" not in err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("damage", ["empty files", "one file unlisted", "not a dict"])
def test_a_manifest_that_does_not_list_every_file_is_damaged(tmp_path, damage):
    out = tmp_path / "R"
    assert train_cli("--max-steps", "4", "--checkpoint-interval", "2", "--out-dir", str(out)) == 0
    newest = out / "checkpoints" / "step-00000004"
    mpath = newest / "manifest.json"
    manifest = json.loads(mpath.read_text())
    if damage == "empty files":
        manifest["files"] = {}
    elif damage == "one file unlisted":
        del manifest["files"]["optimizer.safetensors"]
    else:
        manifest["files"] = ["model.safetensors"]
    mpath.write_text(json.dumps(manifest))
    assert checkpoint_problem(newest) is not None
    assert latest_checkpoint(out, warn=False).name == "step-00000002"
    assert train_cli("--out-dir", str(out), "--resume", "--max-steps", "3") == 0  # falls back to step 2
    if damage == "one file unlisted":  # a model-only manifest is still fine for loading weights
        assert verify_manifest(newest) is None


def test_non_finite_weights_make_a_checkpoint_damaged(tmp_path, capsys):
    from npgpt.checkpoint import MODEL_FILE, save_tensors, write_manifest

    out = tmp_path / "R"
    assert train_cli("--max-steps", "4", "--checkpoint-interval", "2", "--out-dir", str(out)) == 0
    newest = out / "checkpoints" / "step-00000004"
    tensors = load_safetensors(newest / MODEL_FILE)
    tensors["ln_f.bias"] = tensors["ln_f.bias"].copy()
    tensors["ln_f.bias"][3] = np.nan
    save_tensors(newest / MODEL_FILE, tensors)
    write_manifest(newest, 4)  # a manifest that matches the bad file
    assert verify_manifest(newest) is None
    problem = checkpoint_problem(newest)
    assert problem is not None and "ln_f.bias" in problem and "NaN or Inf" in problem
    capsys.readouterr()
    assert latest_checkpoint(out).name == "step-00000002"
    err = capsys.readouterr().err.splitlines()  # one plain line, not a UserWarning with its source line
    assert len(err) == 1 and err[0].startswith("npgpt: warning: skipping checkpoint") and "step-00000004" in err[0]
    assert "NaN or Inf" in err[0]
