"""Labelled text for classification: read a table, map labels to ids, split, tokenise, pad.

    rows = read_labelled(path, "text", "label")       # CSV, TSV, JSON or JSONL, chosen by extension
    labels = LabelMap.from_rows(rows)                 # sorted label strings <-> ids 0..k-1
    train, val = stratified_split(rows, 0.15, seed=0) # when there is no separate validation file
    data = ClassificationSet.build(rows, labels, context_length=128)
    for idx, y in data.batches(8, shuffle=True, seed=0, epoch=0):  # idx (B, T_longest), y (B,)

Texts are encoded with GPT-2's BPE as plain text (a literal "<|endoftext|>" in a text stays text), so
no real token equals the padding id <|endoftext|>. A text longer than the context keeps its first
context_length tokens. Batches are padded on the right to their longest text.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data import read_text
from ..tokenizer import EOT_ID, encode

PAD_ID = EOT_ID  # GPT-2 has no padding token; <|endoftext|> serves, as usual for GPT-2 classifiers
FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "json"}


@dataclass(frozen=True)
class Row:
    text: str
    label: str
    where: str  # "train.csv row 3", for messages


def read_records(path) -> list[tuple[str, dict]]:
    """[(where, record)] from a CSV/TSV (one record per row, keyed by the header), a JSONL file (one
    JSON object per line) or a JSON file (a list of objects)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data file {str(path)!r} does not exist (or is not a file)")
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise ValueError(f"{path}: unknown table format {path.suffix!r}; use .csv, .tsv, .jsonl or .json")
    text = read_text(path, fix="convert the file to UTF-8 (e.g. iconv -t UTF-8)")
    if kind in ("csv", "tsv"):
        return _read_table(path, text, "," if kind == "csv" else "\t")
    if kind == "jsonl":
        records = []
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                records.append((f"{path.name} line {i}", _json(line, f"{path} line {i}")))
    else:
        records = _json(text, str(path))
        if not isinstance(records, list):
            raise ValueError(f"{path} must hold a JSON list of records (objects), got a {type(records).__name__}")
        records = [(f"{path.name} record {i}", r) for i, r in enumerate(records)]
    for where, r in records:
        if not isinstance(r, dict):
            raise ValueError(f"{where} is a {type(r).__name__}, not a record: the file must hold JSON objects "
                             '(like {"text": "...", "label": "..."})')  # fmt: skip
    return records


def _read_table(path: Path, text: str, delimiter: str) -> list[tuple[str, dict]]:
    """[(where, record)] of a CSV / TSV whose first line names the columns (quoted fields keep their line
    breaks). A quote that is never closed, and a column named twice, are errors naming the place (the csv
    module would read the rest of the file as one field, or keep the last of the two columns)."""
    opened = _unclosed_quote(text, delimiter)
    if opened is not None:
        line = text.count("\n", 0, opened) + 1
        raise ValueError(f"{path} line {line}: a quoted field opens there and is never closed, so the rest of the file "
                         'would be read as one field; close the quote (a quote inside a field is written "")')  # fmt: skip
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    records = [(f"{path.name} row {i}", r) for i, r in enumerate(reader, 1)]
    if reader.fieldnames is None:
        raise ValueError(f"{path} is empty; it needs a header line naming the columns")
    twice = sorted({name for name in reader.fieldnames if reader.fieldnames.count(name) > 1})
    if twice:
        raise ValueError(f"{path} names the column {twice[0]!r} more than once in its header "
                         f"({', '.join(reader.fieldnames)}); rename one of them")  # fmt: skip
    return records


def _unclosed_quote(text: str, delimiter: str) -> int | None:
    """Where a quoted field that is still open at the end of `text` begins, or None: the csv module's reading
    (a quote opens a field only at its start; "" inside it is a quote)."""
    state, opened = "start", None  # start of a field | plain field | in quotes | a quote seen in quotes
    for i, ch in enumerate(text):
        if state == "quoted":
            if ch == '"':
                state = "quote"
        elif ch in (delimiter, "\n", "\r"):
            state = "start"
        elif state == "start" and ch == '"':
            state, opened = "quoted", i
        elif state == "quote" and ch == '"':
            state = "quoted"  # "" inside quotes
        else:
            state = "plain"
    return opened if state == "quoted" else None


def _json(text: str, where: str):
    try:
        return json.loads(text)
    except ValueError as e:
        raise ValueError(f"{where} is not valid JSON ({e})") from None


def read_labelled(path, text_column: str = "text", label_column: str = "label", need_labels: bool = True) -> list[Row]:
    """Rows of (text, label) from a table; labels are kept as strings ("1" and 1 are the same label).
    need_labels=False reads the texts only (label "")."""
    records = read_records(path)
    name = Path(path).name
    if not records:
        raise ValueError(f"{path} has no rows")
    columns = [text_column] + ([label_column] if need_labels else [])
    for column, flag in zip(columns, ("--text-column", "--label-column")):
        missing = [where for where, r in records if column not in r]
        if missing:
            have = sorted({k for _, r in records for k in r if k is not None})
            raise ValueError(f"{name} has no column {column!r} ({missing[0]}; its columns: {', '.join(have)}); "
                             f"pass {flag} NAME")  # fmt: skip
    rows = []
    for where, r in records:
        text, label = r[text_column], r.get(label_column, "") if need_labels else ""
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{where}: the text is empty; fill it in or remove the row")
        if label is None or isinstance(label, (dict, list)) or (need_labels and not str(label).strip()):
            raise ValueError(f"{where}: the label is empty (or not a plain value); fill it in or remove the row")
        rows.append(Row(text, str(label).strip(), where))
    return rows


@dataclass(frozen=True)
class LabelMap:
    """Label strings <-> ids, stored with the checkpoint as Hugging Face's id2label / label2id."""

    names: tuple  # id -> label

    @classmethod
    def from_rows(cls, rows: list[Row], source: str = "the training data") -> LabelMap:
        names = tuple(sorted({r.label for r in rows}))
        if len(names) < 2:
            raise ValueError(f"{source} has a single label ({names[0]!r}); a classifier needs at least two "
                             "different labels: check --label-column")  # fmt: skip
        return cls(names)

    @property
    def label2id(self) -> dict:
        return {n: i for i, n in enumerate(self.names)}

    @property
    def id2label(self) -> dict:
        return {i: n for i, n in enumerate(self.names)}

    def ids(self, rows: list[Row]) -> np.ndarray:
        """(N,) label ids; a label the map does not know is an error naming it and the row."""
        to_id = self.label2id
        for r in rows:
            if r.label not in to_id:
                raise ValueError(f"{r.where}: label {r.label!r} was never seen in training (known labels: "
                                 f"{', '.join(self.names)}); fix the label or retrain with it")  # fmt: skip
        return np.array([to_id[r.label] for r in rows], dtype=np.int64)


def stratified_split(rows: list[Row], share: float, seed: int) -> tuple[list[Row], list[Row]]:
    """(train, val): about `share` of each label's rows go to val (none from a label with one row),
    chosen by a generator seeded with `seed`; both keep the file's order."""
    if not 0.0 < share < 1.0:
        raise ValueError(f"--val-share must lie in (0, 1), got {share}")
    rng = np.random.default_rng(seed)
    val = set()
    for label in sorted({r.label for r in rows}):
        members = [i for i, r in enumerate(rows) if r.label == label]
        n_val = int(round(share * len(members))) if len(members) > 1 else 0
        n_val = min(max(n_val, 1 if len(members) > 1 else 0), len(members) - 1)
        val.update(rng.permutation(members)[:n_val].tolist())
    return [r for i, r in enumerate(rows) if i not in val], [r for i, r in enumerate(rows) if i in val]


@dataclass
class ClassificationSet:
    """Token ids per text (each at most context_length long) and label ids."""

    ids: list  # [list[int]]
    labels: np.ndarray  # (N,) int64
    truncated: int  # texts cut to the context

    @classmethod
    def build(cls, rows: list[Row], label_map: LabelMap | None, context_length: int) -> ClassificationSet:
        encoded = [encode(r.text, allow_endoftext=False) for r in rows]
        labels = label_map.ids(rows) if label_map is not None else np.zeros(len(rows), dtype=np.int64)
        truncated = sum(len(e) > context_length for e in encoded)
        return cls([e[:context_length] for e in encoded], labels, truncated)

    def __len__(self) -> int:
        return len(self.ids)

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0, epoch: int = 0):
        """Yield (idx (B, T) int64 right-padded with PAD_ID, labels (B,)); see batch_order."""
        for rows in batch_order([len(s) for s in self.ids], batch_size, shuffle, seed, epoch):
            yield pad_right([self.ids[i] for i in rows], PAD_ID), self.labels[rows]


BUCKET = 8  # batches whose examples are sorted by length together when shuffling


def batch_order(lengths: list, batch_size: int, shuffle: bool, seed: int = 0, epoch: int = 0) -> list:
    """Index arrays, one per batch. Unshuffled: the file's order. Shuffled (training): a permutation
    drawn from (seed, epoch), cut into runs of BUCKET batches whose examples are sorted by length (so
    a batch pads to a length close to its own texts'), then the batches in a random order. Every run
    with the same seed sees the same batches."""
    n = len(lengths)
    if not shuffle:
        return [np.arange(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n)
    span = BUCKET * batch_size
    batches = []
    for start in range(0, n, span):
        chunk = order[start : start + span]
        chunk = chunk[np.argsort([lengths[i] for i in chunk], kind="stable")]
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def pad_right(seqs: list, pad: int) -> np.ndarray:
    """[list[int]] -> (B, T_longest) int64, each row padded on the right with `pad`."""
    out = np.full((len(seqs), max(len(s) for s in seqs)), pad, dtype=np.int64)  # (B, T)
    for b, s in enumerate(seqs):
        out[b, : len(s)] = s
    return out
