"""`npgpt finetune`, `npgpt classify` and `npgpt generate --instruction` from the command line: one short
run per task, and every bad input the issue lists (one line, exit 2, nothing written)."""

import json

import pytest

from collections import Counter

from npgpt.checkpoint import latest_checkpoint
from npgpt.cli import main
from npgpt.finetune.config import bundled_file
from npgpt.finetune.tables import read_labelled

PNG = b"\x89PNG\r\n\x1a\n"


def write_csv(path, rows, header=("text", "label")):
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def classify_run(tmp_path_factory):
    """A short run on the bundled tang-forms set: 24 training poems, one epoch, 32-token context."""
    out = tmp_path_factory.mktemp("cls") / "run"
    code = main(["finetune", "--task", "classify", "--max-examples", "24", "--epochs", "1", "--context-length", "32",
                 "--emb-dim", "32", "--n-heads", "2", "--n-layers", "1", "--lm-weight", "0.5", "--out-dir", str(out),
                 "--no-progress"])  # fmt: skip
    assert code == 0
    return out


def test_classify_run_writes_plots_metrics_and_a_classifier(classify_run, capsys):
    for png in ("loss.png", "accuracy.png", "confusion.png"):
        assert (classify_run / png).read_bytes()[:8] == PNG
    records = [json.loads(line) for line in (classify_run / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [0, 1] and all(0 <= r["val_acc"] <= 1 for r in epochs)
    steps = [r for r in records if r["kind"] == "step"]
    assert len(steps) == 3 and all(r["lm_loss"] > 0 for r in steps)  # the LM term is on
    summary = json.loads((classify_run / "summary.json").read_text())
    train = read_labelled(bundled_file("tang-forms-train.csv"))[:24]  # --max-examples 24 cuts every file
    test = read_labelled(bundled_file("tang-forms-test.csv"))[:24]
    counts = Counter(r.label for r in train)
    majority = min(counts, key=lambda label: (-counts[label], label))  # ties: the first label id
    assert summary["test_examples"] == 24 and summary["val_examples"] == 24
    assert summary["majority_baseline"] == pytest.approx(sum(r.label == majority for r in test) / 24)
    assert sum(map(sum, summary["confusion"])) == 24
    ckpt = latest_checkpoint(classify_run)
    config = json.loads((ckpt / "config.json").read_text())
    assert config["architectures"] == ["GPT2ForSequenceClassification"] and config["pad_token_id"] == 50256
    assert config["id2label"]["4"] == "other" and config["label2id"]["5-char quatrain"] == 0
    assert main(["classify", "--checkpoint", str(classify_run), "--text", "床前明月光，疑是地上霜。"]) == 0
    assert capsys.readouterr().out.strip() in summary["labels"]
    assert main(["classify", "--checkpoint", str(classify_run), "--text", "床前明月光", "--probs"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    probs = [float(line.split()[0]) for line in lines]
    assert len(lines) == 5 and sum(probs) == pytest.approx(1, abs=1e-3) and probs == sorted(probs, reverse=True)


def test_the_reference_engine_gives_the_same_run(classify_run, tmp_path):
    """The fast engine (the default) and --engine reference: the same step losses and the same end."""
    out = tmp_path / "ref"
    assert main(["finetune", "--task", "classify", "--max-examples", "24", "--epochs", "1", "--context-length", "32",
                 "--emb-dim", "32", "--n-heads", "2", "--n-layers", "1", "--lm-weight", "0.5", "--out-dir", str(out),
                 "--no-progress", "--engine", "reference"]) == 0  # fmt: skip

    def steps(run):
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [r for r in records if r["kind"] == "step"]  # (each epoch's record names its step too)

    fast, ref = steps(classify_run), steps(out)
    assert len(fast) == len(ref) == 3
    for f, r in zip(fast, ref):
        for key in ("loss", "ft_loss", "lm_loss", "grad_norm"):
            assert f[key] == pytest.approx(r[key], rel=1e-4), key
    summaries = [json.loads((run / "summary.json").read_text()) for run in (classify_run, out)]
    assert summaries[0]["test_loss"] == pytest.approx(summaries[1]["test_loss"], rel=1e-4)


def test_classify_scores_a_file_like_the_run_scored_its_test_set(classify_run, tmp_path, capsys):
    rows = [(r.text, r.label) for r in read_labelled(bundled_file("tang-forms-test.csv"))[:24]]  # what the run scored
    path = write_csv(tmp_path / "test.csv", rows)
    assert main(["classify", "--checkpoint", str(classify_run), "--data", str(path)]) == 0
    out = capsys.readouterr().out
    summary = json.loads((classify_run / "summary.json").read_text())
    assert f"accuracy {summary['test_accuracy']:.1%}" in out and "confusion matrix" in out


def test_instruct_run_and_generate_with_the_stored_template(tmp_path, capsys):
    recs = [{"instruction": "Say the word.", "input": w, "output": w} for w in ("apple", "pear", "plum", "fig")]
    for name, part in (("train", recs), ("val", recs[:2]), ("test", recs[2:])):
        (tmp_path / f"{name}.json").write_text(json.dumps(part))
    out = tmp_path / "run"
    assert main(["finetune", "--task", "instruct", "--data", str(tmp_path / "train.json"), "--val-data",
                 str(tmp_path / "val.json"), "--test-data", str(tmp_path / "test.json"), "--epochs", "1",
                 "--emb-dim", "32", "--n-heads", "2", "--n-layers", "1", "--out-dir", str(out), "--no-progress"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "before tuning" in printed and "greedy response equals the expected output" in printed
    config = json.loads((latest_checkpoint(out) / "config.json").read_text())
    assert config["npgpt"]["instruct"]["name"] == "alpaca" and config["npgpt"]["instruct"]["mask_prompt"] is True
    assert (out / "loss.png").read_bytes()[:8] == PNG
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_examples"] == 4 and summary["scored_on"] == "test"
    assert main(["generate", "--checkpoint", str(out), "--instruction", "Say the word.", "--input", "kiwi",
                 "--max-new-tokens", "3"]) == 0  # fmt: skip
    response = capsys.readouterr().out
    assert "###" not in response and "Below is an instruction" not in response  # only the response is printed
    assert main(["generate", "--checkpoint", str(out), "--input", "kiwi"]) == 2
    assert "--input goes with --instruction" in capsys.readouterr().err


def bad(args, capsys, out_dir):
    """Run a command expected to refuse: exit 2, one line on stderr, and no output directory."""
    assert main(args + ["--out-dir", str(out_dir), "--no-progress"] if args[0] == "finetune" else args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert not out_dir.exists()
    return err


def test_bad_classification_input(tmp_path, capsys):
    out = tmp_path / "never"
    ok = write_csv(tmp_path / "ok.csv", [("a fine day", "sun"), ("rain again", "rain"), ("sunny", "sun")])
    cls = ["finetune", "--task", "classify", "--epochs", "1"]
    assert "no column 'body'" in bad(cls + ["--data", str(ok), "--text-column", "body"], capsys, out)
    assert "no column 'class'" in bad(cls + ["--data", str(ok), "--label-column", "class"], capsys, out)
    one = write_csv(tmp_path / "one.csv", [("x", "a"), ("y", "a"), ("z", "a")])
    assert "single label" in bad(cls + ["--data", str(one)], capsys, out)
    empty = write_csv(tmp_path / "empty.csv", [("x", "a"), ("", "b")])
    assert "row 2: the text is empty" in bad(cls + ["--data", str(empty)], capsys, out)
    unseen = write_csv(tmp_path / "test.csv", [("snow!", "snow")])
    assert "label 'snow' was never seen" in bad(cls + ["--data", str(ok), "--test-data", str(unseen)], capsys, out)
    for lam in ("1.5", "-0.1"):
        assert "must lie in [0, 1]" in bad(cls + ["--data", str(ok), "--lm-weight", lam], capsys, out)
    err = bad(["classify", "--checkpoint", str(tmp_path / "nowhere"), "--text", "x"], capsys, out)
    assert "does not exist" in err


def test_a_label_unseen_at_classify_time(classify_run, tmp_path, capsys):
    unseen = write_csv(tmp_path / "test.csv", [("床前明月光", "ballad")])
    err = bad(["classify", "--checkpoint", str(classify_run), "--data", str(unseen)], capsys, tmp_path / "never")
    assert "label 'ballad' was never seen in training" in err


def test_bad_instruction_input(tmp_path, capsys):
    out = tmp_path / "never"
    inst = ["finetune", "--task", "instruct", "--epochs", "1"]
    (tmp_path / "dict.json").write_text('{"instruction": "x", "output": "y"}')
    assert "JSON list" in bad(inst + ["--data", str(tmp_path / "dict.json")], capsys, out)
    (tmp_path / "long.json").write_text(json.dumps([{"instruction": "Say it.", "output": "word " * 30}] * 2))
    err = bad(inst + ["--data", str(tmp_path / "long.json"), "--context-length", "16"], capsys, out)
    assert "every example" in err and "longer than the context of 16 tokens" in err
    assert "--lm-weight" in bad(inst + ["--lm-weight", "0.5"], capsys, out)
    err = bad(["generate", "--checkpoint", str(tmp_path / "nowhere"), "--instruction", "x"], capsys, out)
    assert "does not exist" in err


def test_an_earlier_run_is_not_overwritten(classify_run, capsys):
    assert main(["finetune", "--task", "classify", "--out-dir", str(classify_run), "--no-progress"]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_resume_refuses_what_it_cannot_honour_and_touches_nothing(classify_run, tmp_path, capsys):
    """--resume continues a run only with the model, the examples, the data order and the seed it started
    with; each refusal is one line naming the flag, and the run's files stay as they were."""
    import hashlib
    import shutil

    run = tmp_path / "run"
    shutil.copytree(classify_run, run)
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run.rglob("*")) if p.is_file()}
    args = ["finetune", "--task", "classify", "--max-examples", "24", "--context-length", "32", "--emb-dim", "32",
            "--n-heads", "2", "--n-layers", "1", "--lm-weight", "0.5", "--out-dir", str(run), "--no-progress", "--resume"]  # fmt: skip
    for extra, expected in [
        (["--epochs", "1"], "already at step 3 of 3, so there is nothing to train; give a larger --epochs"),
        (["--epochs", "2", "--seed", "7"], "--seed is 7 here but 0 in the run being resumed"),
        (["--epochs", "2", "--lm-weight", "0.25"], "--lm-weight is 0.25 here but 0.5"),
        (["--epochs", "2", "--max-examples", "20"], "was trained on other examples"),
        (["--epochs", "2", "--overwrite"], "--resume continues the run in --out-dir and --overwrite replaces it"),
    ]:  # fmt: skip
        assert main(args + extra) == 2, extra
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expected in err, err
    after = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run.rglob("*")) if p.is_file()}
    assert after == before
    assert main(["finetune", "--task", "instruct", "--out-dir", str(tmp_path / "empty"), "--resume", "--no-progress"]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err and not (tmp_path / "empty").exists()
    assert main(args + ["--epochs", "2"]) == 0  # the same settings and more epochs: it goes on
    assert "resuming at step 3" in capsys.readouterr().out
    assert latest_checkpoint(run).name == "step-00000006"
