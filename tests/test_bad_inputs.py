"""Every command, every numeric and path flag, fed bad values: each is refused with exit code 2 and one
line on stderr that names the flag, without a traceback, and an existing run's files stay byte for byte
what they were (sha256 before and after), although every `train` case also passes --overwrite. Then
combinations of flags (and files) that are each fine alone: the same, the line naming what is wrong.

The cases run in-process through npgpt.cli.main (fast); a few run through `python -m npgpt` as well, to
see what the interpreter itself prints."""

import os
import struct
import subprocess
import sys

import pytest
from conftest import sha256_tree

from npgpt.cli import main
from npgpt.prepare import PrepareConfig, prepare

TINY = ["--preset", "nano", "--emb-dim", "8", "--n-heads", "2", "--n-layers", "1", "--tie-weights", "--context-length",
        "16", "--batch-size", "2", "--no-progress", "--sample-tokens", "2"]  # fmt: skip

# Placeholders, replaced by paths of the fixture: RUN (an existing training run), FILE (a file), DIR (an empty
# folder), MISSING (a path that does not exist), BELOW (a path below FILE), WEIGHTS (weights without config.json),
# PAIRS (a small TSV of sentence pairs), CSV (a small labelled table), S2S (an existing translation run), CSV2 (a
# table whose header names "text" twice), BADUTF8 (a table that is not UTF-8), BADQUOTE (a quote never closed);
# token shards: SHARDS (a prepared corpus), NOVAL (one prepared without a validation shard), NOTCORPUS (a folder of
# text, not prepared), BADHEADER (an llm.c shard whose magic number is wrong), ODDBIN (a train.bin of an odd number
# of bytes). A value given as a list is several arguments.
BASE = {
    "train": ["train", *TINY, "--max-steps", "2", "--out-dir", "RUN", "--overwrite"],
    "generate": ["generate", "--checkpoint", "RUN", "--max-new-tokens", "2"],
    "gradcheck": ["gradcheck", "--only", "^linear$"],
    "bench": ["bench", "--preset", "nano", "--context-length", "8", "--steps", "1", "--warmup", "0", "--generate", "0",
              "--no-memory"],  # fmt: skip
    "info": ["info"],
    "prepare": ["prepare", "--data", "FILE", "--out", "RUN/prepared", "--no-progress"],
    "seq2seq train": ["seq2seq", "train", "--data", "PAIRS", "--out-dir", "RUN", "--overwrite", "--max-steps", "2",
                      "--d-model", "16", "--n-heads", "2", "--d-ff", "16", "--batch-size", "4", "--no-progress"],  # fmt: skip
    "finetune": ["finetune", "--task", "classify", "--data", "CSV", "--epochs", "1", "--emb-dim", "8", "--n-heads", "2",
                 "--n-layers", "1", "--context-length", "16", "--batch-size", "2", "--out-dir", "RUN", "--overwrite",
                 "--no-progress"],  # fmt: skip
    "classify": ["classify", "--checkpoint", "RUN", "--data", "CSV"],
    "seq2seq translate": ["seq2seq", "translate", "--checkpoint", "S2S", "--text", "one"],
    "seq2seq eval": ["seq2seq", "eval", "--checkpoint", "S2S", "--data", "PAIRS"],
}

INT_POS = ["0", "-1", "nan", "abc", "-1e3"]  # for flags that take a whole number >= 1
INT_NONNEG = ["-1", "nan", "2.5", "abc"]  # for flags that take a whole number >= 0
UNIT_OPEN = ["-0.1", "1", "nan", "inf", "abc"]  # for a share or probability in [0, 1)
POSITIVE = ["0", "-1e-3", "nan", "inf", "abc"]  # for a finite number > 0
NONNEG = ["-1", "nan", "inf", "abc"]  # for a finite number >= 0

TABLE = {
    "train": {
        "--train-ratio": ["0", "-0.5", "1.5", "nan", "inf", "abc"],
        "--stride": INT_POS,
        "--cache-dir": ["FILE", "BELOW", ""],
        "--context-length": INT_POS + ["1000000"],  # more than the data holds
        "--emb-dim": INT_POS + ["10000000"],  # more memory than the machine has
        "--n-heads": INT_POS + ["3"],  # does not divide --emb-dim
        "--n-layers": INT_NONNEG + ["100000000"],
        "--drop-rate": UNIT_OPEN,
        "--init-from": ["MISSING", "FILE", "DIR", "WEIGHTS"],
        "--batch-size": INT_POS + ["1000000000"],
        "--grad-accum": INT_POS,
        "--epochs": POSITIVE + ["1e308"],  # finite, but more steps than a run can take
        "--max-steps": INT_POS + ["1.5", "inf"],
        "--lr": POSITIVE + ["1e400", "-inf"],
        "--min-lr": NONNEG + ["1"],  # above --lr
        "--warmup-steps": INT_NONNEG,
        "--weight-decay": NONNEG,
        "--weight-decay-on": ["none", "biases"],
        "--init": ["xavier"],
        "--split-by": ["words"],
        "--recipe": ["book", "book-ch6"],
        "--eval-offset": INT_NONNEG,
        "--eval-train-batches": INT_POS,
        "--beta1": UNIT_OPEN,
        "--beta2": UNIT_OPEN,
        "--grad-clip": ["-1", "nan", "inf", "abc"],
        "--max-bad-steps": INT_POS,
        "--out-dir": ["FILE", "BELOW", ""],  # "": not the current folder
        "--eval-interval": INT_POS,
        "--eval-batches": INT_POS,
        "--sample-prompt": [""],  # was token 0
        "--sample-tokens": ["-5", "nan", "abc"],
        "--sample-temperature": NONNEG,
        "--sample-top-k": INT_POS,
        "--checkpoint-interval": INT_POS,
        "--keep-last": INT_POS,
        "--seed": INT_NONNEG,
        "--loss-scale": ["0", "0.5", "1e30", "nan", "inf", "abc"],
        "--data": ["MISSING", "DIR", "", "NOTCORPUS", "BADHEADER", "NOVAL", ["ODDBIN", "--data-format", "nanogpt"],
                   ["SHARDS", "FILE"]],  # (shards and text mixed)  # fmt: skip
        "--data-format": ["parquet", "nanogpt"],  # nanogpt: on the default --data, a text corpus
        "--preset": ["gpt5"],
        "--engine": ["turbo"],
        "--recompute": ["everything"],
        "--dtype": ["float16"],
        "--precision": ["fp8"],
        "--device": ["gpu"],
        "--schedule": ["linear"],
    },
    "prepare": {  # every case fails before --out (inside RUN, whose files are checked) is made
        "--data": ["MISSING", "DIR", "DIR/*.txt"],
        "--out": ["FILE", "BELOW"],
        "--text-field": [""],
        "--shard-tokens": INT_POS + ["3000000000"],
        "--val-tokens": INT_NONNEG,
        "--val-share": UNIT_OPEN,
        "--workers": INT_NONNEG,
        "--errors": ["ignore"],
    },
    "generate": {
        "--checkpoint": ["MISSING", "FILE", "DIR", "WEIGHTS"],
        "--max-new-tokens": INT_NONNEG,
        "--temperature": NONNEG,
        "--top-k": INT_POS,
        "--top-p": ["0", "-0.5", "1.5", "nan", "inf", "abc"],
        "--seed": INT_NONNEG,
        "--num-samples": INT_POS,
        "--dtype": ["int8"],
        "--instruction": [" ", "Say hi."],  # empty; RUN was not instruction-tuned (it stores no template)
        "--input": ["kiwi"],  # without --instruction
    },
    "finetune": {  # every case fails before the run's folder (RUN, with --overwrite) is touched
        "--task": ["regress"],
        "--data": ["MISSING", "DIR", "FILE", ""],  # FILE: a .txt, not a table; "": was "is a folder"
        "--val-data": ["MISSING", "DIR", "FILE", ""],
        "--test-data": ["MISSING", "DIR", "FILE"],
        "--text-column": ["body"],  # the table has no such column
        "--label-column": ["class"],
        "--val-share": ["0", "1", "-0.5", "nan", "inf", "abc"],
        "--max-examples": ["1", "-1", "nan", "abc"],
        "--init-from": ["MISSING", "FILE", "DIR", "WEIGHTS"],
        "--preset": ["gpt5"],
        "--emb-dim": INT_POS + ["15", "10000000"],  # not divisible by --n-heads 2; more memory than the machine has
        "--n-heads": INT_POS + ["3"],
        "--n-layers": INT_NONNEG + ["100000000"],
        "--context-length": ["1", "-1", "nan", "abc", "100000000"],
        "--drop-rate": UNIT_OPEN,
        "--lm-weight": ["-0.1", "1.5", "nan", "inf", "abc"],
        "--trainable": ["some"],
        "--epochs": INT_POS,
        "--batch-size": INT_POS + ["1000000000"],
        "--lr": POSITIVE + ["1e400"],
        "--warmup-steps": INT_NONNEG,
        "--weight-decay": NONNEG,
        "--grad-clip": ["-1", "nan", "inf", "abc"],
        "--seed": INT_NONNEG,
        "--out-dir": ["FILE", "BELOW", ""],
        "--keep-last": INT_POS,
        "--samples": INT_NONNEG,
        "--engine": ["turbo"],
        "--dtype": ["float16"],
    },
    "classify": {
        "--checkpoint": ["MISSING", "FILE", "DIR", "WEIGHTS"],
        "--data": ["MISSING", "DIR", "FILE", ""],
        "--text-column": ["body"],
        "--label-column": ["class"],
        "--batch-size": INT_POS,
        "--dtype": ["int8"],
    },
    "gradcheck": {
        "--only": ["([", "*"],
        "--seed": INT_NONNEG,
        "--device": ["tpu"],
    },
    "bench": {
        "--preset": ["gpt5"],
        "--batch-size": INT_POS + ["100000000"],
        "--context-length": INT_POS + ["65"],  # longer than the preset's context
        "--steps": INT_POS,
        "--warmup": INT_NONNEG,
        "--drop-rate": UNIT_OPEN,
        "--threads": INT_POS,
        "--generate": INT_NONNEG,
        "--prompt-tokens": INT_POS,
        "--json": ["DIR", "BELOW", "MISSING/x.json", ""],
        "--seed": INT_NONNEG,
        "--engine": ["turbo"],
        "--recompute": ["everything"],
        "--rounds": INT_POS + ["2"],  # 2: without --isolate
    },
    "info": {
        "--device": ["gpu", "abc"],
    },
    "seq2seq train": {
        "--data": ["MISSING", "DIR", ""],
        "--val-data": ["MISSING"],
        "--held-out": ["-0.1", "1", "nan", "abc"],
        "--split-seed": INT_NONNEG,
        "--d-model": INT_POS + ["15"],  # not divisible by --n-heads 2
        "--n-heads": INT_POS,
        "--n-encoder-layers": INT_POS,
        "--n-decoder-layers": INT_POS,
        "--d-ff": INT_POS,
        "--dropout": UNIT_OPEN,
        "--max-len": INT_POS,
        "--batch-size": INT_POS,
        "--max-steps": INT_POS,
        "--lr": POSITIVE,
        "--min-lr": NONNEG + ["1"],
        "--warmup-steps": INT_NONNEG,
        "--weight-decay": NONNEG,
        "--beta1": UNIT_OPEN,
        "--beta2": UNIT_OPEN,
        "--grad-clip": ["-1", "nan", "inf"],
        "--max-bad-steps": INT_POS,
        "--out-dir": ["FILE", "BELOW", ""],
        "--eval-interval": INT_POS,
        "--eval-pairs": INT_NONNEG,
        "--final-beam": INT_POS + ["100000000"],  # more memory than the machine has, known before training
        "--checkpoint-interval": INT_POS,
        "--keep-last": INT_POS,
        "--seed": INT_NONNEG,
        "--norm": ["middle"],
        "--engine": ["turbo"],
    },
    "seq2seq translate": {
        "--beam": INT_POS + ["100000000"],  # estimated before anything is allocated (was 8-14 GB in seconds)
        "--length-penalty": NONNEG + ["400"],  # was an OverflowError
        "--checkpoint": ["MISSING"],
    },
    "seq2seq eval": {
        "--show": INT_NONNEG,
        "--data": ["MISSING", "DIR", ""],
        "--beam": ["0", "abc", "100000000"],
        "--length-penalty": ["-1", "nan", "400"],
        "--checkpoint": ["MISSING", "FILE"],
    },
}

CASES = [pytest.param(cmd, flag, value, id=f"{cmd}-{flag}={' '.join(value) if isinstance(value, list) else value}")
         for cmd, flags in TABLE.items() for flag, values in flags.items() for value in values]  # fmt: skip


@pytest.fixture(scope="module")
def places(tmp_path_factory):
    base = tmp_path_factory.mktemp("bad-inputs")
    run = base / "run"
    assert main(["train", *TINY, "--max-steps", "2", "--out-dir", str(run)]) == 0
    (base / "file.txt").write_text("a file, not a folder\n")
    (base / "empty").mkdir()
    weights = base / "weights-only"
    weights.mkdir()
    (weights / "model.safetensors").write_bytes((run / "checkpoints" / "step-00000002" / "model.safetensors").read_bytes())
    (base / "pairs.tsv").write_text("one\tsatu\ntwo\tdua\nthree\ttiga\n" * 10, encoding="utf-8")
    (base / "labelled.csv").write_text("text,label\n" + "a cat sat,cat\na dog ran,dog\n" * 6, encoding="utf-8")
    (base / "twice.csv").write_text("text,label,text\n" + "a cat,cat,sat\na dog,dog,ran\n" * 6, encoding="utf-8")
    (base / "latin1.csv").write_bytes("text,label\nun café,cat\nun chien,dog\n".encode("latin-1") * 3)
    (base / "quote.csv").write_text('text,label\na cat,cat\n"a dog ran,dog\na cow,cow\n', encoding="utf-8")
    s2s = base / "s2s"
    assert main(["seq2seq", "train", "--data", str(base / "pairs.tsv"), "--out-dir", str(s2s), "--max-steps", "2",
                 "--d-model", "16", "--n-heads", "2", "--d-ff", "16", "--batch-size", "4", "--eval-pairs", "2",
                 "--no-progress"]) == 0  # fmt: skip
    (base / "texts").mkdir()
    (base / "texts" / "a.txt").write_text("".join(f"paragraph {i} of a text file\n\n" for i in range(100)))
    for name, val_tokens in (("shards", 100), ("noval", 0)):
        prepare(PrepareConfig(data=[str(base / "texts")], out=str(base / name), val_tokens=val_tokens, workers=0,
                              split_on_blank_lines=True, progress=False), say=lambda *a: None)  # fmt: skip
    (base / "bad_train_000000.bin").write_bytes(struct.pack("<256i", 12345, 1, 8, *([0] * 253)) + bytes(16))
    (base / "odd").mkdir()
    (base / "odd" / "train.bin").write_bytes(b"abc")
    return {"RUN": run, "FILE": base / "file.txt", "DIR": base / "empty", "MISSING": base / "missing",
            "BELOW": base / "file.txt" / "below", "WEIGHTS": weights, "PAIRS": base / "pairs.tsv",
            "CSV": base / "labelled.csv", "CSV2": base / "twice.csv", "BADUTF8": base / "latin1.csv",
            "BADQUOTE": base / "quote.csv", "S2S": s2s, "SHARDS": base / "shards", "NOVAL": base / "noval",
            "NOTCORPUS": base / "texts", "BADHEADER": base / "bad_train_000000.bin", "ODDBIN": base / "odd" / "train.bin",
            "sha256": sha256_tree(run), "sha256_s2s": sha256_tree(s2s)}  # fmt: skip


def fill(args, places):
    out = []
    for a in args:
        for key in sorted((k for k in places if k.isupper()), key=len, reverse=True):
            if a == key or a.startswith(key + "/"):
                a = str(places[key]) + a[len(key) :]
                break
        out.append(a)
    return out


@pytest.mark.parametrize("cmd, flag, value", CASES)
def test_a_bad_value_is_one_line_exit_2_and_touches_nothing(cmd, flag, value, places, capsys):
    argv = fill(BASE[cmd] + [flag, *(value if isinstance(value, list) else [value])], places)
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (argv, out, err)
    assert len(lines) == 1, err
    assert flag in lines[0], err
    assert "Traceback" not in err
    assert sha256_tree(places["RUN"]) == places["sha256"]  # as the fixture made it


S2S_TRAIN = ["seq2seq", "train", "--data", "PAIRS", "--out-dir", "S2S", "--max-steps", "4", "--d-model", "16",
             "--n-heads", "2", "--d-ff", "16", "--batch-size", "4", "--no-progress", "--resume"]  # fmt: skip

# (name, command line, what its one line must say, what it must not say): flags (and files) that are fine
# alone but wrong together, and messages that pointed the wrong way.
COMBINATIONS = [
    # a resumed translation run keeps its model and seed (it ignored them)
    ("seq2seq --resume --d-model", S2S_TRAIN + ["--d-model", "32"], "--d-model 32 cannot be honoured by --resume", None),
    ("seq2seq --resume --n-heads", S2S_TRAIN + ["--n-heads", "4"], "--n-heads 4 cannot be honoured by --resume", None),
    ("seq2seq --resume --seed", S2S_TRAIN + ["--seed", "5"], "--seed 5 cannot be honoured by --resume", None),
    # accepted silently
    ("train --dry-run missing data", ["train", "--dry-run", "--data", "MISSING"], "--data", None),
    ("train shards --encoding-errors", BASE["train"] + ["--data", "SHARDS", "--encoding-errors", "replace"],
     "--encoding-errors replace decodes text files", None),
    ("train shards --cache-dir", BASE["train"] + ["--data", "SHARDS", "--cache-dir", "DIR"], "--cache-dir", None),
    ("finetune same columns", BASE["finetune"] + ["--text-column", "label"], "--text-column and --label-column are both", None),
    ("finetune a column twice", BASE["finetune"][:4] + ["CSV2"] + BASE["finetune"][5:], "names the column 'text' more than once", None),
    ("classify a column twice", BASE["classify"][:4] + ["CSV2"], "names the column 'text' more than once", None),
    ("generate --instruction --prompt", BASE["generate"] + ["--instruction", "Say hi.", "--prompt", "Hello"],
     "--prompt and --instruction", None),
    ("classify --probs --data", BASE["classify"] + ["--probs"], "--probs", None),
    ("bench reference recompute", BASE["bench"] + ["--engine", "reference", "--recompute", "block"],
     "--recompute block runs in the fast engine", None),
    # messages that pointed the wrong way
    ("finetune not UTF-8", BASE["finetune"][:4] + ["BADUTF8"] + BASE["finetune"][5:], "invalid UTF-8", "--encoding-errors"),
    ("classify not UTF-8", BASE["classify"][:4] + ["BADUTF8"], "invalid UTF-8", "--encoding-errors"),
    ("finetune open quote", BASE["finetune"][:4] + ["BADQUOTE"] + BASE["finetune"][5:],
     "line 3: a quoted field opens there and is never closed", None),
    ("classify open quote", BASE["classify"][:4] + ["BADQUOTE"], "is never closed", "the label is empty"),
    ("train --data empty", BASE["train"] + ["--data", ""], "--data is empty", "is a folder"),
    ("finetune --data empty", BASE["finetune"][:4] + [""] + BASE["finetune"][5:], "--data is empty", "is a folder"),
    ("recipe --resume", ["train", "--recipe", "book-ch5", "--out-dir", "RUN", "--resume", "--no-progress"],
     "(from --recipe book-ch5)", None),
    ("recipe --init-from", ["train", "--recipe", "book-ch5", "--init-from", "RUN", "--out-dir", "DIR/x", "--no-progress"],
     "--context-length 256 (from --recipe book-ch5)", None),
    ("generate a translation model", ["generate", "--checkpoint", "S2S"], "is a translation model", "unknown GPTConfig keys"),
]  # fmt: skip


@pytest.mark.parametrize("argv, said, not_said", [c[1:] for c in COMBINATIONS], ids=[c[0] for c in COMBINATIONS])
def test_a_bad_combination_is_one_line_exit_2_and_touches_nothing(argv, said, not_said, places, capsys):
    argv = fill(argv, places)
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (argv, out, err)
    assert len(lines) == 1 and said in lines[0] and "Traceback" not in err, err
    assert not_said is None or not_said not in lines[0], err
    assert sha256_tree(places["RUN"]) == places["sha256"] and sha256_tree(places["S2S"]) == places["sha256_s2s"]


def test_the_table_covers_every_numeric_and_path_flag():
    """Each command's flags that take a number or a path appear in TABLE (a new flag must be added)."""
    import argparse

    from npgpt.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parsers = dict(sub.choices)
    s2s = next(a for a in parsers["seq2seq"]._actions if isinstance(a, argparse._SubParsersAction))
    parsers.update({f"seq2seq {k}": v for k, v in s2s.choices.items()})
    skip = {"--help", "--prompt", "--sample-prompt", "--text", "--memory-worker", "--torch-attn", "--encoding-errors",
            "--activation", "--pos-encoding", "--tie-embeddings", "--device", "--dtype", "--precision", "--list",
            "--engine", "--schedule", "--preset", "--norm"}  # text, or choices (a few of them are in TABLE anyway)  # fmt: skip
    for name, parser in parsers.items():
        if name == "seq2seq":
            continue
        for action in parser._actions:
            flag = next((o for o in action.option_strings if o.startswith("--")), None)
            if flag is None or flag in skip or action.nargs == 0:
                continue
            assert flag in TABLE[name], f"npgpt {name} {flag} has no bad values in TABLE"


@pytest.mark.parametrize("argv", [
    ["train", "--lr", "-1e-3"],
    ["train", "--out-dir", "FILE"],
    ["gradcheck", "--only", "(["],
    ["bench", "--json", "DIR", "--preset", "nano", "--context-length", "8"],
    ["generate", "--checkpoint", "WEIGHTS"],
    ["info", "--device", "gpu"],
    ["finetune", "--lm-weight", "2", "--task", "classify"],
])  # fmt: skip
def test_through_the_interpreter_no_traceback(argv, places):
    env = {**os.environ, "NPGPT_DEVICE": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "npgpt", *fill(argv, places)], capture_output=True, text=True, env=env,
                          timeout=120)  # fmt: skip
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert argv[1] in lines[0]
