"""Token shards on disk: llm.c's `.bin` format, nanoGPT's raw files, and the folders `npgpt prepare` writes.

llm.c's format (dev/data/data_common.py, llmc/dataloader.h): a header of 256 little-endian int32,
[0] = 20240520 (the magic number), [1] = 1 (version: GPT-2 tokens as uint16), [2] = the token count,
the rest 0; then the tokens as little-endian uint16. The file is exactly 1024 + 2 * count bytes.
nanoGPT's `train.bin` / `val.bin` are the tokens alone, raw uint16, no header.

A prepared folder holds `manifest.json` (what it was made from, and per shard its token count, sha256
and sources) beside `val_000000.bin`, ..., `train_000000.bin`, ... in llm.c's format, so llm.c reads
them as they are (`-i 'data/x/train_*.bin' -j 'data/x/val_*.bin'`).

    shards = find_shards(["data/mycorpus"])            # a prepared folder (or llm.c files, globs)
    shards = find_shards(["data/shakespeare"], "nanogpt")  # nanoGPT's train.bin and val.bin
    shards.train[0].read(starts, T + 1)                 # (len(starts), T+1) uint16 windows

Shards are read through a memory map opened for each read and closed after it, so the pages a read
touches leave the process with it: resident memory does not grow with the corpus (nanoGPT reopens its
map for every batch for the same reason).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .tokenizer import N_VOCAB

MAGIC = 20240520
VERSION = 1  # uint16 tokens (GPT-2); llm.c's version 2 holds uint32 tokens (LLaMA 3)
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_DTYPE = np.dtype("<u2")
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "npgpt token shards"
DATA_FORMATS = ("auto", "nanogpt")
_VAL_NAME = re.compile(r"(?:^|[_.-])val(?:idation)?(?:[_.-]|$)", re.IGNORECASE)


def header_bytes(n_tokens: int) -> bytes:
    """llm.c's header for a shard of n_tokens GPT-2 tokens."""
    if not 0 <= n_tokens < 2**31:
        raise ValueError(f"a shard holds at most {2**31 - 1:,} tokens (llm.c's header is int32), got {n_tokens:,}")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = MAGIC, VERSION, n_tokens
    return header.tobytes()


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:06d}.bin"


@dataclass(frozen=True)
class ShardFile:
    """One file of tokens: `n_tokens` uint16 from byte `offset` (1024 for llm.c's header, 0 for nanoGPT's)."""

    path: str
    n_tokens: int
    offset: int

    def tokens(self) -> np.memmap:
        """All of the shard's tokens, memory-mapped (read-only)."""
        return np.memmap(self.path, dtype=TOKEN_DTYPE, mode="r", offset=self.offset, shape=(self.n_tokens,))

    def read(self, starts, length: int) -> np.ndarray:
        """(len(starts), length) uint16: the tokens starts[i] : starts[i] + length. The map is closed
        again before returning, so the pages read do not stay resident."""
        starts = np.asarray(starts, dtype=np.int64)
        if len(starts) and (starts.min() < 0 or starts.max() + length > self.n_tokens):
            raise IndexError(f"{self.path}: windows of {length} tokens at {starts.min()}..{starts.max()} "
                             f"run past its {self.n_tokens:,} tokens")  # fmt: skip
        rows = np.array(np.lib.stride_tricks.sliding_window_view(self.tokens(), length)[starts])  # (k, length)
        # (a copy: no reference to the map survives this line, so it is unmapped here)
        if rows.size and int(rows.max()) >= N_VOCAB:
            bad = int(rows.max())
            raise ValueError(f"{self.path} holds token id {bad}, beyond GPT-2's vocabulary of {N_VOCAB}: "
                             "it was made with another tokenizer; prepare the text again with npgpt prepare")  # fmt: skip
        return rows


def read_llmc_header(path) -> int:
    """The token count of an llm.c shard, after checking its header and size; ValueError naming the problem."""
    path = str(path)
    size = os.path.getsize(path)
    if size < HEADER_BYTES:
        raise ValueError(f"{path} is {size} bytes, shorter than llm.c's {HEADER_BYTES}-byte header: not an llm.c token "
                         "shard (for nanoGPT's raw uint16 train.bin / val.bin pass --data-format nanogpt)")  # fmt: skip
    with open(path, "rb") as f:
        magic, version, count = np.frombuffer(f.read(12), dtype="<i4")
    if magic != MAGIC:
        raise ValueError(f"{path} does not start with llm.c's magic number {MAGIC} (it starts with {int(magic)}): not "
                         "an llm.c token shard; for nanoGPT's raw uint16 train.bin / val.bin pass --data-format nanogpt")  # fmt: skip
    if version == 2:
        raise ValueError(f"{path} is an llm.c shard of version 2 (uint32 tokens, LLaMA 3's tokenizer); npgpt trains "
                         "on GPT-2's tokens, version 1")  # fmt: skip
    if version != VERSION:
        raise ValueError(f"{path} has llm.c header version {int(version)}; npgpt reads version {VERSION} (GPT-2, uint16)")
    expected = HEADER_BYTES + 2 * int(count)
    if count < 0 or size != expected:
        raise ValueError(f"{path}: its header says {int(count):,} tokens, which is {expected:,} bytes, but the file has "
                         f"{size:,}: it is truncated or damaged; prepare or download it again")  # fmt: skip
    return int(count)


def open_shard(path, data_format: str = "auto") -> ShardFile:
    """An llm.c shard (header checked), or with data_format="nanogpt" a raw uint16 file."""
    path = str(path)
    if data_format not in DATA_FORMATS:
        raise ValueError(f"data format must be one of {', '.join(DATA_FORMATS)}, got {data_format!r}")
    if data_format == "nanogpt":
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(4)
        if len(head) == 4 and int(np.frombuffer(head, "<i4")[0]) == MAGIC:
            raise ValueError(f"{path} starts with llm.c's header, so it is not a raw nanoGPT file: leave out --data-format nanogpt")
        if size % 2 or size == 0:
            raise ValueError(f"{path} has {size:,} bytes, {'none' if size == 0 else 'an odd number'}: not a file of "
                             "uint16 tokens (nanoGPT's train.bin / val.bin); give the files nanoGPT's prepare.py wrote, "
                             "whole")  # fmt: skip
        return ShardFile(path, size // 2, 0)
    return ShardFile(path, read_llmc_header(path), HEADER_BYTES)


@dataclass
class ShardSet:
    """The shards of one data source, split into training and validation."""

    train: list[ShardFile] = field(default_factory=list)
    val: list[ShardFile] = field(default_factory=list)
    kind: str = ""  # "npgpt prepare", "llm.c" or "nanoGPT"
    where: str = ""

    def tokens(self, split: str) -> int:
        return sum(s.n_tokens for s in getattr(self, split))

    def describe(self) -> str:
        return (f"{self.where} ({self.kind}): {len(self.train)} train shard(s), {self.tokens('train'):,} tokens; "
                f"{len(self.val)} validation shard(s), {self.tokens('val'):,} tokens")  # fmt: skip


def is_val_name(path) -> bool:
    """llm.c's and nanoGPT's names: fineweb_val_000000.bin, tiny_shakespeare_val.bin, val.bin."""
    return bool(_VAL_NAME.search(Path(path).stem))


def read_manifest(folder) -> dict:
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e.msg}); prepare the folder again with npgpt prepare --overwrite") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path} is not a manifest of npgpt prepare; give a folder npgpt prepare wrote "
                         "(npgpt prepare --data TEXT_FILES --out FOLDER)")  # fmt: skip
    return manifest


def prepared_shards(folder) -> ShardSet:
    """The shards of a folder `npgpt prepare` wrote, checked against its manifest (token counts, sizes)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if not manifest.get("complete"):
        raise ValueError(f"{folder} is not complete (npgpt prepare was stopped before it ended): run the same "
                         "npgpt prepare command again to finish it")  # fmt: skip
    found = ShardSet(kind="npgpt prepare", where=str(folder))
    for entry in manifest["shards"]:
        path = folder / entry["file"]
        if not path.is_file():
            raise ValueError(f"{path} is listed in {folder / MANIFEST} but missing; prepare the folder again (npgpt prepare --overwrite)")
        shard = open_shard(path)
        if shard.n_tokens != entry["tokens"]:
            raise ValueError(f"{path} holds {shard.n_tokens:,} tokens but the manifest says {entry['tokens']:,}; "
                             "prepare the folder again (npgpt prepare --overwrite)")  # fmt: skip
        (found.val if entry["split"] == "val" else found.train).append(shard)
    return found


def verify_prepared(folder) -> list[str]:
    """The problems of a prepared folder, shard by shard against the manifest's sha256 (reads every byte)."""
    folder = Path(folder)
    problems = []
    for entry in read_manifest(folder)["shards"]:
        path = folder / entry["file"]
        try:
            digest = file_sha256(path)
        except OSError as e:
            problems.append(f"{path}: {e.strerror}")
            continue
        if digest != entry["sha256"]:
            problems.append(f"{path}: sha256 {digest}, the manifest says {entry['sha256']}")
    return problems


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def _expand(spec: str) -> list[str]:
    spec = os.path.expanduser(spec)
    if glob.has_magic(spec):
        matches = sorted(glob.glob(spec, recursive=True))
        if not matches:
            raise ValueError(f"--data {spec!r} matches no file; check the path")
        return matches
    if not os.path.exists(spec):
        raise ValueError(f"--data {spec} does not exist")
    return [spec]


def find_shards(specs, data_format: str = "auto") -> ShardSet:
    """Token shards from folders, files and globs.

    - a folder `npgpt prepare` wrote (it holds manifest.json): its shards, checked against the manifest;
    - llm.c shards (`fineweb_train_*.bin`, `tiny_shakespeare_val.bin`), or a folder of them: headers checked;
    - with data_format="nanogpt", nanoGPT's raw `train.bin` / `val.bin`, or the folder holding them.
    A file whose name has `val` in it (val.bin, *_val_*.bin) is validation data, any other training data."""
    if isinstance(specs, (str, os.PathLike)):
        specs = [specs]
    if data_format not in DATA_FORMATS:
        raise ValueError(f"data format must be one of {', '.join(DATA_FORMATS)}, got {data_format!r}")
    found = ShardSet(kind="nanoGPT" if data_format == "nanogpt" else "llm.c", where=" ".join(map(str, specs)))
    files: list[str] = []
    for spec in map(str, specs):
        for path in _expand(spec):
            if os.path.isdir(path):
                if (Path(path) / MANIFEST).is_file() and data_format == "auto":
                    if len(specs) > 1:
                        raise ValueError(f"--data {path} is a prepared folder: give it alone")
                    return prepared_shards(path)
                inside = sorted(glob.glob(os.path.join(path, "*.bin")))
                if data_format == "nanogpt":
                    inside = [p for p in inside if Path(p).name in ("train.bin", "val.bin")]
                if not inside:
                    wanted = "train.bin / val.bin" if data_format == "nanogpt" else f"{MANIFEST} (npgpt prepare) or .bin shards"
                    raise ValueError(f"--data {path}: the folder holds no {wanted}; "
                                     "make shards with: npgpt prepare --data TEXT_FILES --out FOLDER")  # fmt: skip
                files += inside
            else:
                files.append(path)
    for path in dict.fromkeys(files):
        shard = open_shard(path, data_format)
        (found.val if is_val_name(path) else found.train).append(shard)
    if not found.train:
        raise ValueError(f"--data {found.where}: no training shards among {', '.join(files)} (a file named *val* is "
                         "validation data); add the training files")  # fmt: skip
    return found


def data_kind(specs, data_format: str = "auto") -> str:
    """What --data names, looking only at names and folder listings: "shards" (a folder npgpt prepare
    wrote, llm.c `.bin` shards, globs or a folder of them; with data_format="nanogpt", nanoGPT's
    train.bin / val.bin or their folder) or "text" (text files, bundled corpora by name). ValueError,
    naming the fix, for a mix of the two, a folder that holds neither a manifest nor shards, or a file
    that is not a .bin given with data_format="nanogpt"."""
    if isinstance(specs, (str, os.PathLike)):
        specs = [specs]
    shards, text = [], []
    for spec in map(str, specs):
        path = os.path.expanduser(spec)
        if glob.has_magic(path):
            matches = sorted(glob.glob(path, recursive=True)) or [path]  # (no match: find_shards or the text reader says so)
        else:
            matches = [path]
        for match in matches:
            if os.path.isdir(match):
                if data_format == "nanogpt" or (Path(match) / MANIFEST).is_file() or glob.glob(os.path.join(match, "*.bin")):
                    shards.append(spec)
                    continue
                raise ValueError(f"--data {spec} is a folder but neither a prepared corpus (it has no {MANIFEST}) nor a folder "
                                 f"of .bin token shards; make one with: npgpt prepare --data {spec} --out data/NAME, then "
                                 f"train with --data data/NAME (or give its text files: --data {os.path.join(spec, '*.txt')})")  # fmt: skip
            elif match.endswith(".bin"):
                shards.append(spec)
            elif data_format == "nanogpt":
                raise ValueError(f"--data-format nanogpt reads nanoGPT's raw train.bin / val.bin, and --data {spec} is not a "
                                 ".bin file; leave out --data-format nanogpt to train on text files")  # fmt: skip
            else:
                text.append(spec)
    if shards and text:
        raise ValueError(f"--data mixes token shards ({', '.join(dict.fromkeys(shards))}) and text files "
                         f"({', '.join(dict.fromkeys(text))}); train on one kind: make shards of the text files with "
                         "npgpt prepare --data TEXT_FILES --out FOLDER, or give only text files")  # fmt: skip
    return "shards" if shards else "text"
