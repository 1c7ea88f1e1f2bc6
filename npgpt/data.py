"""Text in, (B, T) windows of token ids out.

1. `read_text`: strict UTF-8 (an invalid byte is an error naming the file and its byte offset, unless
   errors="replace").
2. `load_token_ids`: tokenise once with GPT-2's BPE and cache the ids as a uint16 .npy keyed by a hash
   of the content and the tokenizer, so the next run starts at once. Several files are joined with
   <|endoftext|> between them.
3. `split_ids`: the first `train_ratio` of the tokens for training, the rest for validation.
4. `TokenWindows`: the sliding-window dataset of the lecture: window i starts at i * stride, inputs are
   ids[s : s+T], targets ids[s+1 : s+T+1] (the next token at every position).
5. `Batches`: seeded shuffling, epochs, and a position (epoch, cursor) that can be saved and restored.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import numpy as np

from .atomic import atomic_path
from .tokenizer import EOT_ID, N_VOCAB, encode, tokenizer_hash

BUNDLED = {"the-verdict": "the-verdict.txt", "tang300": "tang300.txt"}


def bundled_path(name: str) -> Path:
    """Path of a corpus shipped with npgpt: 'the-verdict' or 'tang300'."""
    from importlib import resources

    if name not in BUNDLED:
        raise ValueError(f"no bundled corpus {name!r}; choose one of {', '.join(BUNDLED)}")
    return Path(str(resources.files("npgpt.assets").joinpath(BUNDLED[name])))


def resolve_data_path(spec: str) -> Path:
    """A file path, or the name of a bundled corpus."""
    if spec in BUNDLED and not Path(spec).exists():
        return bundled_path(spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        raise ValueError(f"--data {spec} is a folder; give UTF-8 text files (e.g. --data {Path(spec) / '*.txt'}) "
                         f"or one of the bundled corpora: {', '.join(BUNDLED)}")  # fmt: skip
    if not path.is_file():
        raise ValueError(f"--data {spec} does not exist (or is not a file); give a UTF-8 text file "
                         f"or one of the bundled corpora: {', '.join(BUNDLED)}")  # fmt: skip
    return path


def read_text(path, errors: str = "strict", fix: str | None = None) -> str:
    """The file's text. errors="strict": invalid UTF-8 raises ValueError with the byte offset and `fix`
    (what the caller's command offers; default: npgpt train's --encoding-errors replace);
    errors="replace": invalid bytes become U+FFFD. A leading byte-order mark is dropped."""
    if errors not in ("strict", "replace"):
        raise ValueError(f"errors must be 'strict' or 'replace', got {errors!r}")
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        fix = fix or "convert the file to UTF-8, or pass --encoding-errors replace to replace bad bytes with U+FFFD"
        raise ValueError(f"{path}: invalid UTF-8 at byte offset {e.start} (byte {data[e.start:e.start + 1].hex()}); "
                         f"{fix}") from None  # fmt: skip
    return text.removeprefix("\ufeff")


def default_cache_dir() -> Path:
    return Path(os.environ.get("NPGPT_CACHE_DIR") or Path.home() / ".cache" / "npgpt") / "tokens"


def load_token_ids(paths, cache_dir=None, errors: str = "strict", use_cache: bool = True) -> np.ndarray:
    """Tokenise the files (joined with <|endoftext|>) -> 1-D uint16 ids, cached by content hash."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("no data files given")
    blobs = [p.read_bytes() for p in paths]
    h = hashlib.sha256()
    h.update(f"npgpt-tokens-v1|{tokenizer_hash()}|{errors}|{len(blobs)}".encode())
    for b in blobs:
        h.update(hashlib.sha256(b).digest())
    key = h.hexdigest()[:32]
    cache_file = Path(cache_dir or default_cache_dir()) / f"{key}.npy"
    if use_cache and cache_file.is_file():
        try:
            ids = np.load(cache_file, allow_pickle=False)
            if ids.dtype == np.uint16 and ids.ndim == 1:
                return ids
        except (OSError, ValueError):
            pass  # a damaged cache file is rebuilt below
    ids: list[int] = []
    for i, (p, _) in enumerate(zip(paths, blobs)):
        if i:
            ids.append(EOT_ID)
        ids.extend(encode(read_text(p, errors), allow_endoftext=False))
    arr = np.asarray(ids, dtype=np.uint16)
    assert N_VOCAB <= 65536  # GPT-2 ids fit uint16
    if use_cache:
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(cache_file) as tmp, open(tmp, "wb") as f:
                np.save(f, arr, allow_pickle=False)
        except OSError as e:  # a full or read-only cache is not an error; the ids are still returned
            print(f"npgpt: warning: the token cache {cache_file} could not be written ({e.strerror or e}); the data "
                  "will be tokenised again next time", file=sys.stderr)  # fmt: skip
    return arr


def split_ids(ids: np.ndarray, train_ratio: float = 0.9):
    """(train, val): the first train_ratio of the tokens, then the rest."""
    if not 0.0 < train_ratio <= 1.0:
        raise ValueError(f"train ratio must be in (0, 1], got {train_ratio}")
    cut = int(round(len(ids) * train_ratio))
    return ids[:cut], ids[cut:]


def split_text_ids(texts: list[str], train_ratio: float = 0.9):
    """(train, val) uint16 ids, cutting the text rather than the tokens: the first train_ratio of the
    characters (of the texts one after the other) are tokenised for training, the rest for validation,
    as the book's chapter 5 does (`text[:int(0.9 * len(text))]`). Texts are joined with <|endoftext|>
    on each side of the cut, as load_token_ids joins files."""
    if not 0.0 < train_ratio <= 1.0:
        raise ValueError(f"train ratio must be in (0, 1], got {train_ratio}")
    cut = int(train_ratio * sum(len(t) for t in texts))
    sides: tuple[list, list] = ([], [])
    start = 0
    for t in texts:
        here = min(max(cut - start, 0), len(t))  # characters of this text before the cut
        for side, piece in zip(sides, (t[:here], t[here:])):
            if piece:
                side.append(piece)
        start += len(t)

    def ids(pieces):
        out: list[int] = []
        for i, piece in enumerate(pieces):
            out += ([EOT_ID] if i else []) + encode(piece, allow_endoftext=False)
        return np.asarray(out, dtype=np.uint16)

    return ids(sides[0]), ids(sides[1])


class TokenWindows:
    """Sliding windows over a 1-D id array: window i has inputs ids[s:s+T], targets ids[s+1:s+T+1], s = i*stride."""

    def __init__(self, ids: np.ndarray, context_length: int, stride: int | None = None, name: str = "train"):
        T = int(context_length)
        stride = T if stride is None else int(stride)
        if stride < 1:
            raise ValueError(f"stride must be at least 1, got {stride}")
        if len(ids) < T + 1:
            fixes = [f"lower --context-length to at most {len(ids) - 1}"] if len(ids) >= 2 else []
            fixes.append("give more text")
            if name in ("train", "val"):
                fixes.append("lower --train-ratio" if name == "val" else "raise --train-ratio")
            hint = ", ".join(fixes[:-1]) + " or " + fixes[-1] if len(fixes) > 1 else fixes[0]
            raise ValueError(
                f"the {name} split has {len(ids)} tokens, fewer than context_length + 1 = {T + 1}; {hint}"
            )
        self.ids = np.asarray(ids)
        self.context_length = T
        self.stride = stride
        self.name = name
        self.starts = np.arange(0, len(ids) - T, stride)

    def __len__(self) -> int:
        return len(self.starts)

    def batch(self, window_indices):
        """(inputs, targets), each (B, T) int64, for the given window indices."""
        T = self.context_length
        starts = self.starts[np.asarray(window_indices)]
        w = np.lib.stride_tricks.sliding_window_view(self.ids, T + 1)[starts]  # (B, T+1)
        w = w.astype(np.int64)
        return w[:, :-1], w[:, 1:]  # (B, T), (B, T)

    def ordered_batches(self, batch_size: int):
        """Every window once, in order, the last batch possibly smaller (for evaluation)."""
        for i in range(0, len(self), batch_size):
            yield self.batch(np.arange(i, min(i + batch_size, len(self))))


class Batches:
    """Endless training batches: each epoch a seeded permutation of the windows, drop_last.

    The position is (epoch, cursor); `state_dict()` / `load_state_dict()` save and restore it, and the
    permutation of epoch e is a pure function of (seed, e), so a resumed run sees the same batches.
    """

    def __init__(self, windows: TokenWindows, batch_size: int, shuffle: bool = True, seed: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {batch_size}")
        if len(windows) < batch_size:
            raise ValueError(
                f"the {windows.name} split has {len(windows)} windows of {windows.context_length} tokens, fewer than "
                f"batch size {batch_size}; lower --batch-size, --context-length or --stride, or give more text"
            )
        self.windows = windows
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.cursor = 0  # batches already taken in this epoch
        self._order_epoch, self._order = None, None

    @property
    def batches_per_epoch(self) -> int:
        return len(self.windows) // self.batch_size

    def _epoch_order(self):
        if self._order_epoch != self.epoch:
            n = len(self.windows)
            self._order = np.random.default_rng([self.seed, self.epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._order_epoch = self.epoch
        return self._order

    def next(self):
        """The next (inputs, targets) pair, each (batch_size, T) int64."""
        if self.cursor >= self.batches_per_epoch:
            self.epoch += 1
            self.cursor = 0
        order = self._epoch_order()
        i = self.cursor * self.batch_size
        self.cursor += 1
        return self.windows.batch(order[i : i + self.batch_size])

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "batch_size": self.batch_size,
                "shuffle": self.shuffle, "n_windows": len(self.windows)}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        if state.get("n_windows") != len(self.windows) or state.get("batch_size") != self.batch_size:
            raise ValueError(
                f"the saved data position is for {state.get('n_windows')} windows in batches of "
                f"{state.get('batch_size')}, but this run has {len(self.windows)} windows in batches of "
                f"{self.batch_size}; resume with the same --data, --train-ratio, --context-length, --stride and --batch-size"
            )
        self.epoch, self.cursor, self.seed, self.shuffle = state["epoch"], state["cursor"], state["seed"], state["shuffle"]
