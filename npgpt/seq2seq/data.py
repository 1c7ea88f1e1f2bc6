"""Sentence pairs: read a TSV, split it by seed, encode, and batch with padding.

1. `read_pairs`: one `source<TAB>target` pair per line, UTF-8. A line without a tab, with more than one,
   or with an empty side is an error naming the file and line (blank lines are skipped).
2. `split_pairs`: a seeded permutation, the last `held_out` share kept for evaluation.
3. `encode_pairs`: ids through the restricted vocabulary (vocab.py); a pair longer than the model's
   max_len is an error naming the line (nothing is silently cut).
4. `PairBatches`: each epoch a seeded permutation; pairs of similar length are put in one batch (so
   little is padding), and the batches are shuffled. The position (epoch, cursor) can be saved and
   restored, and each epoch's order is a pure function of (seed, epoch), so a resumed run sees the
   same batches.
5. `collate`: src (B, S), tgt_in (B, T) = <bos> + target, targets (B, T) = target + <eos>, right-padded
   with <pad>.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np

from .vocab import BOS_ID, EOS_ID, PAD_ID, Vocab

BUNDLED_NAME = "en-ms"
BUNDLED_FILE = "en_ms_cldr.tsv"


def bundled_pairs_path() -> Path:
    """The English -> Malay CLDR phrase pairs shipped in npgpt/assets (scripts/make_en_ms_corpus.py)."""
    return Path(str(resources.files("npgpt.assets").joinpath(BUNDLED_FILE)))


def resolve_pairs_path(spec) -> Path:
    """A TSV path, or None / 'en-ms' for the bundled corpus."""
    if spec is None or (spec == BUNDLED_NAME and not Path(spec).exists()):
        return bundled_pairs_path()
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ValueError(f"pairs file {spec!r} does not exist (or is not a file); give a UTF-8 TSV of "
                         f"source<TAB>target lines, or leave --data out for the bundled {BUNDLED_NAME} corpus")  # fmt: skip
    return path


def parse_pairs(text: str, name: str = "<text>") -> list[tuple[str, str]]:
    """'source\\ttarget' lines -> pairs, each side stripped of surrounding spaces."""
    pairs = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        tabs = line.count("\t")
        if tabs != 1:
            what = "has no tab" if tabs == 0 else f"has {tabs} tabs"
            raise ValueError(f"{name} line {n} {what}; each line must be source<TAB>target: {line[:60]!r}")
        src, tgt = (side.strip() for side in line.split("\t"))
        if not src or not tgt:
            raise ValueError(f"{name} line {n} has an empty {'source' if not src else 'target'}; "
                             f"every pair needs text on both sides of the tab: {line[:60]!r}")  # fmt: skip
        pairs.append((src, tgt))
    if not pairs:
        raise ValueError(f"{name} holds no pairs; give source<TAB>target lines")
    return pairs


def read_pairs(path) -> list[tuple[str, str]]:
    path = Path(path)
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ValueError(f"{path} is not valid UTF-8 (line {line}, byte {e.start}); save it as UTF-8") from None
    return parse_pairs(text, str(path))


def split_pairs(pairs: list, held_out: float, seed: int):
    """(train, held-out): a permutation seeded by `seed`; the held-out share is round(held_out * n) pairs."""
    if not 0.0 <= held_out < 1.0:
        raise ValueError(f"the held-out share must be in [0, 1), got {held_out}")
    order = np.random.default_rng(seed).permutation(len(pairs))
    n_held = int(round(held_out * len(pairs)))
    cut = len(pairs) - n_held
    return [pairs[i] for i in order[:cut]], [pairs[i] for i in order[cut:]]


def encode_pairs(pairs: list, vocab: Vocab, max_len: int, name: str = "data"):
    """Pairs -> (source id lists, target id lists). The source may have max_len tokens, the target
    max_len - 1 (it gains <bos> in tgt_in and <eos> in targets). Longer is an error, not a cut."""
    srcs = vocab.encode_batch([s for s, _ in pairs], where=lambda i: f"{name} pair {i + 1} (source)")
    tgts = vocab.encode_batch([t for _, t in pairs], where=lambda i: f"{name} pair {i + 1} (target)")
    for i, (s, t) in enumerate(zip(srcs, tgts)):
        if len(s) > max_len or len(t) + 1 > max_len:
            side, n, limit = ("source", len(s), max_len) if len(s) > max_len else ("target", len(t), max_len - 1)
            raise ValueError(f"{name} pair {i + 1}: the {side} has {n} tokens, more than the {limit} that max_len={max_len} "
                             f"allows ({pairs[i][0][:40]!r}); raise --max-len or shorten or drop the pair")  # fmt: skip
        if not s:
            raise ValueError(f"{name} pair {i + 1} has an empty source after tokenisation")
    return srcs, tgts


def pad_rows(rows, width: int | None = None) -> np.ndarray:
    """Lists of ids -> (B, width) int64, right-padded with PAD_ID."""
    width = max(len(r) for r in rows) if width is None else width
    out = np.full((len(rows), width), PAD_ID, dtype=np.int64)
    for b, r in enumerate(rows):
        out[b, : len(r)] = r
    return out


def collate(srcs, tgts):
    """-> src (B, S), tgt_in (B, T), targets (B, T): tgt_in = <bos> + target, targets = target + <eos>."""
    src = pad_rows(srcs)
    tgt_in = pad_rows([[BOS_ID] + list(t) for t in tgts])
    targets = pad_rows([list(t) + [EOS_ID] for t in tgts])
    return src, tgt_in, targets


class PairBatches:
    """Endless training batches of encoded pairs, grouped by length, drop-last."""

    POOL = 32  # batches' worth of pairs sorted by length together: enough to make batches even, still random

    def __init__(self, srcs, tgts, batch_size: int, seed: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {batch_size}")
        if len(srcs) < batch_size:
            raise ValueError(f"the training split has {len(srcs)} pairs, fewer than --batch-size {batch_size}; "
                             "lower --batch-size or give more pairs")  # fmt: skip
        self.srcs, self.tgts = srcs, tgts
        self.lengths = np.asarray([1000 * len(s) + len(t) for s, t in zip(srcs, tgts)])  # by source, then target length
        self.batch_size, self.seed = batch_size, seed
        self.epoch, self.cursor = 0, 0
        self._plan_epoch, self._plan = None, None

    @property
    def batches_per_epoch(self) -> int:
        return len(self.srcs) // self.batch_size

    def _epoch_plan(self) -> list:
        if self._plan_epoch != self.epoch:
            rng = np.random.default_rng([self.seed, self.epoch])
            order = rng.permutation(len(self.srcs))[: self.batches_per_epoch * self.batch_size]
            pool = self.POOL * self.batch_size
            batches = []
            for i in range(0, len(order), pool):
                chunk = order[i : i + pool]
                chunk = chunk[np.argsort(self.lengths[chunk], kind="stable")]  # similar lengths side by side
                batches += [chunk[j : j + self.batch_size] for j in range(0, len(chunk), self.batch_size)]
            self._plan = [batches[k] for k in rng.permutation(len(batches))]
            self._plan_epoch = self.epoch
        return self._plan

    def next(self):
        """The next (src, tgt_in, targets)."""
        if self.cursor >= self.batches_per_epoch:
            self.epoch += 1
            self.cursor = 0
        rows = self._epoch_plan()[self.cursor]
        self.cursor += 1
        return collate([self.srcs[i] for i in rows], [self.tgts[i] for i in rows])

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "batch_size": self.batch_size,
                "n_pairs": len(self.srcs)}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        if state.get("n_pairs") != len(self.srcs) or state.get("batch_size") != self.batch_size:
            raise ValueError(f"the saved data position is for {state.get('n_pairs')} pairs in batches of "
                             f"{state.get('batch_size')}, but this run has {len(self.srcs)} pairs in batches of "
                             f"{self.batch_size}; resume with the same data, split and batch size")  # fmt: skip
        self.epoch, self.cursor, self.seed = state["epoch"], state["cursor"], state["seed"]
