"""Fine-tuning data: tables in four formats, labels, splits, padding, prompt masking, the bundled sets."""

import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from npgpt.finetune.config import BUNDLED, bundled_file
from npgpt.finetune.instructions import ALPACA, IGNORE_INDEX, InstructionSet, Record, read_instructions, render_prompt
from npgpt.finetune.tables import PAD_ID, ClassificationSet, LabelMap, Row, batch_order, read_labelled, stratified_split
from npgpt.tokenizer import EOT_ID, encode

REPO = Path(__file__).resolve().parents[1]
ROWS = [("a good film, truly", "pos"), ("dull, slow,\n\"long\"", "neg"), ("loved it\r\n\nsecond line", "pos")]


def write_table(tmp_path, suffix, rows=ROWS, text="text", label="label"):
    path = tmp_path / f"t{suffix}"
    if suffix in (".csv", ".tsv"):
        import csv

        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f, delimiter="," if suffix == ".csv" else "\t")
            w.writerow([text, label])
            w.writerows(rows)
    elif suffix == ".jsonl":
        path.write_text("".join(json.dumps({text: t, label: y}) + "\n" for t, y in rows), encoding="utf-8")
    else:
        path.write_text(json.dumps([{text: t, label: y} for t, y in rows]), encoding="utf-8")
    return path


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".json"])
def test_every_format_reads_the_same_rows(tmp_path, suffix):
    rows = read_labelled(write_table(tmp_path, suffix))
    assert [(r.text, r.label) for r in rows] == ROWS


def test_labels_are_strings_and_sorted_ids(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"text": "x", "label": 1}\n{"text": "y", "label": "0"}\n{"text": "z", "label": 1}\n')
    rows = read_labelled(path)
    labels = LabelMap.from_rows(rows)
    assert labels.names == ("0", "1") and labels.id2label == {0: "0", 1: "1"} and labels.label2id == {"0": 0, "1": 1}
    assert labels.ids(rows).tolist() == [1, 0, 1]


@pytest.mark.parametrize("content, suffix, message", [
    ([("x", "a")], ".csv", None),
    ("no_text", ".csv", "no column 'text'.*--text-column"),
    ("no_label", ".csv", "no column 'label'.*--label-column"),
    ([("x", "a"), ("y", "a")], ".csv", "single label.*at least two"),
    ([("x", "a"), ("  ", "b")], ".csv", "row 2: the text is empty"),
    ([("x", "a"), ("y", "")], ".csv", "row 2: the label is empty"),
    ('{"text": "x", "label": "a"}', ".json", "JSON list of records"),
    ('[1, 2]', ".json", "not a record"),
    ('{"text": "x"', ".jsonl", "not valid JSON"),
    ("x", ".txt", "unknown table format"),
])  # fmt: skip
def test_bad_tables_are_named(tmp_path, content, suffix, message):
    if content == "no_text":
        path = write_table(tmp_path, suffix, text="body")
    elif content == "no_label":
        path = write_table(tmp_path, suffix, label="class")
    elif isinstance(content, list):
        path = write_table(tmp_path, suffix, rows=content)
    else:
        path = tmp_path / f"t{suffix}"
        path.write_text(content)
    if message is None:
        with pytest.raises(ValueError, match="single label"):
            LabelMap.from_rows(read_labelled(path))
        return
    with pytest.raises(ValueError, match=message):
        LabelMap.from_rows(read_labelled(path))


def test_a_label_never_seen_in_training_is_an_error():
    labels = LabelMap(("neg", "pos"))
    with pytest.raises(ValueError, match="test.csv row 4: label 'meh' was never seen in training"):
        labels.ids([Row("x", "pos", "test.csv row 3"), Row("y", "meh", "test.csv row 4")])


def test_stratified_split_keeps_each_labels_share():
    rows = [Row(str(i), "a" if i < 60 else "b" if i < 90 else "c", "") for i in range(91)]
    train, val = stratified_split(rows, 0.2, seed=3)
    assert Counter(r.label for r in val) == {"a": 12, "b": 6}  # "c" has one row: it stays in training
    assert len(train) + len(val) == 91 and not {r.text for r in train} & {r.text for r in val}
    assert stratified_split(rows, 0.2, seed=3) == (train, val)
    assert stratified_split(rows, 0.2, seed=4) != (train, val)


def test_batches_cover_every_example_once_padded_on_the_right():
    lengths = [3, 9, 1, 4, 4, 7, 2, 8, 5, 6, 2]
    for shuffle in (False, True):
        order = batch_order(lengths, 3, shuffle, seed=1, epoch=2)
        assert sorted(np.concatenate(order).tolist()) == list(range(11))
    assert [b.tolist() for b in batch_order(lengths, 3, True, 1, 2)] == [b.tolist() for b in batch_order(lengths, 3, True, 1, 2)]
    assert [b.tolist() for b in batch_order(lengths, 3, True, 1, 2)] != [b.tolist() for b in batch_order(lengths, 3, True, 1, 3)]
    data = ClassificationSet.build([Row("one two three four", "a", ""), Row("hi", "b", "")], LabelMap(("a", "b")), 3)
    (idx, y), = list(data.batches(2))
    assert idx.tolist() == [encode("one two three four")[:3], encode("hi") + [PAD_ID] * 2] and y.tolist() == [0, 1]
    assert data.truncated == 1


def test_a_literal_endoftext_in_a_text_never_becomes_the_padding_id():
    data = ClassificationSet.build([Row("end <|endoftext|> here", "a", "")], None, 64)
    assert PAD_ID not in data.ids[0]


def test_prompt_and_padding_are_masked_and_the_response_ends_with_the_end_token():
    recs = [Record("Add one.", "41", "42", "r0"), Record("Say hi.", "", "hi there", "r1")]
    data = InstructionSet.build(recs, ALPACA, context_length=100)
    (x, y), = list(data.batches(2))
    for b, r in enumerate(recs):
        prompt = encode(render_prompt(ALPACA, r.instruction, r.input))
        full = prompt + encode(r.output) + [EOT_ID]
        n = len(full) - 1
        assert x[b, :n].tolist() == full[:-1] and (x[b, n:] == EOT_ID).all()
        assert (y[b, : len(prompt) - 1] == IGNORE_INDEX).all()  # the prompt's tokens are not targets
        assert y[b, len(prompt) - 1 : n].tolist() == encode(r.output) + [EOT_ID]  # the response and its end are
        assert (y[b, n:] == IGNORE_INDEX).all()  # padding
    unmasked = InstructionSet.build(recs, ALPACA, context_length=100, mask_prompt=False)
    x2, y2 = unmasked.example(0)
    assert (y2 != IGNORE_INDEX).all() and y2.tolist() == x2[1:].tolist() + [EOT_ID]


def test_examples_longer_than_the_context_are_left_out_and_all_of_them_is_an_error():
    recs = [Record("Say hi.", "", "hi", "r0"), Record("Say hi.", "", "hi " * 50, "r1")]
    data = InstructionSet.build(recs, ALPACA, context_length=60)
    assert len(data) == 1 and data.skipped == 1
    with pytest.raises(ValueError, match="every example in x.json is longer than the context of 10 tokens"):
        InstructionSet.build(recs, ALPACA, context_length=10, source="x.json")


def test_template_fields_fill_in_one_pass():
    p = render_prompt(ALPACA, "Echo {input} literally", "a {instruction} b")
    assert "### Instruction:\nEcho {input} literally\n\n### Input:\na {instruction} b\n\n### Response:\n" in p
    assert "### Input" not in render_prompt(ALPACA, "Say hi.", "  ")


@pytest.mark.parametrize("content, message", [
    ('{"instruction": "x", "output": "y"}', "JSON list of records"),
    ('[{"instruction": "x"}]', 'record 0 has no "output" text'),
    ('[{"instruction": "x", "output": "y", "input": 3}]', '"input" must be a string'),
    ("[]", "holds no records"),
])  # fmt: skip
def test_bad_instruction_files(tmp_path, content, message):
    path = tmp_path / "i.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        read_instructions(path)


def test_bundled_sets_are_what_the_script_makes():
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "make_finetune_data.py"), "--check"],
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    forms = {s: read_labelled(bundled_file(BUNDLED["tang-forms"][s])) for s in ("train", "val", "test")}
    assert {s: len(r) for s, r in forms.items()} == {"train": 246, "val": 53, "test": 53}  # 352 distinct poems
    texts = {s: {r.text for r in rows} for s, rows in forms.items()}
    assert not texts["train"] & texts["test"] and not texts["train"] & texts["val"] and not texts["val"] & texts["test"]
    assert set(LabelMap.from_rows(forms["train"]).names) == {
        "5-char quatrain", "7-char quatrain", "5-char regulated", "7-char regulated", "other"}
    for label, shape in (("5-char quatrain", [5] * 4), ("7-char regulated", [7] * 8)):
        for r in forms["train"]:
            if r.label == label:  # the label is the shape: parts between punctuation marks
                assert [len(p) for p in re.split(r"[，。？！；：、\n]", r.text) if p] == shape, r.text
    inst = {s: read_instructions(bundled_file(BUNDLED["tang-instruct"][s])) for s in ("train", "val", "test")}
    assert {s: len(r) for s, r in inst.items()} == {"train": 246, "val": 53, "test": 53}
    assert {r.instruction for r in inst["test"]} == {"Continue this line of the poem.",
                                                     "Is this the first or the second half of a line?"}
    lines = {line for r in forms["train"] for line in r.text.split("\n")}
    for r in inst["train"]:  # every record is cut from a line of a training poem
        if r.instruction.startswith("Is this"):
            assert r.output in ("first", "second")
            assert any(line.startswith(r.input) if r.output == "first" else line.endswith(r.input) for line in lines), r
        else:
            assert any(line == r.input + r.output or line.startswith(r.input + r.output) for line in lines), r
