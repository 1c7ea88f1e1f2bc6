"""`npgpt prepare`: text files and JSON lines -> GPT-2 token shards in llm.c's format, once, in parallel.

    prepare(PrepareConfig(data=["corpus/*.txt", "more.jsonl"], out="data/mycorpus"))

The pipeline, in one process plus K tokenizer processes:

1. read (npgpt.corpus): the inputs, in order, as documents, cut into pieces of at most ~1M characters
   where GPT-2's pre-tokenizer cuts anyway (the tokens are those of the whole document);
2. tokenize: pieces go out in tasks of ~1M characters to K processes, at most 2 tasks per process in
   flight, and come back in the order they went out (round robin), so the output never depends on K;
3. write: each document's tokens, <|endoftext|> (50256) first as llm.c's shards have it, go whole to the
   validation split or to the training split (see `Splitter`), each split a stream of shards of exactly
   `shard_tokens` tokens (the last one shorter; a document may continue into the next shard).
   A shard is written to a hidden `.partial` file and renamed when complete, so a visible shard is
   always whole, its header and sha256 final.

Memory is bounded whatever the corpus and its documents: the reader holds about two pieces of the
current document (for JSON lines, also the line being parsed: a JSON value is parsed whole), at most 2K
tasks of ~1M characters are in flight (their text, then their tokens), a document waiting for its split
holds at most SPLIT_LOOKAHEAD tokens (2 MB), shards grow on disk, and each tokenizer process holds Python,
NumPy and tiktoken's tables. Peak resident memory of the whole process tree, measured on 1 GB at K = 2:
210 MB (benchmarks/prepare_bench.py; docs/benchmarks.md).

Resuming: every `save_every` seconds and whenever a shard completes, the partial shards are flushed to
disk and `manifest.json` is rewritten atomically with where reading is (npgpt.corpus.Position), each
split's partial shard (its index, token count and sources) and the tokens counted so far. A killed run,
started again with the same arguments, truncates the partial shards to the saved lengths and goes on
from there; shards come out byte for byte as an uninterrupted run writes them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np

from .atomic import atomic_path, fsync_dir
from .corpus import Notes, Position, Source, find_sources, read_pieces
from .shards import HEADER_BYTES, MANIFEST, MANIFEST_FORMAT, TOKEN_DTYPE, file_sha256, header_bytes, read_manifest, shard_name
from .tokenizer import EOT_ID, N_VOCAB, get_tokenizer, tokenizer_hash

DEFAULT_VAL_SHARE = 0.01
SPLIT_LOOKAHEAD = 1 << 20  # tokens of a document counted before its split is decided (2 MB held at most)
SPLITS = ("val", "train")


@dataclass
class PrepareConfig:
    data: list  # files, globs, folders
    out: str
    text_field: str = "text"
    split_on_blank_lines: bool = False
    shard_tokens: int = 100_000_000  # llm.c's shard size
    val_tokens: int | None = None  # the first documents, until validation holds at least this many tokens
    val_share: float | None = None  # or: documents spread through the corpus, this share of the tokens (default 0.01)
    workers: int | None = None  # tokenizer processes (default: the cores; 0: tokenize in this process)
    errors: str = "strict"  # "replace": invalid UTF-8 -> U+FFFD, unusable JSON lines skipped
    overwrite: bool = False
    progress: bool = True
    # how the work is cut up; never changes the shards (only a resume needs the same piece_chars, and
    # takes it from the manifest)
    piece_chars: int = 1 << 20
    task_chars: int = 1 << 20
    save_every: float = 10.0  # seconds between saves of the position (and at every shard)

    def check(self) -> None:
        if isinstance(self.data, (str, os.PathLike)):
            self.data = [self.data]
        if not self.data:
            raise ValueError("no input: give --data FILES, globs or folders")
        if not 1 <= self.shard_tokens < 2**31:
            raise ValueError(f"--shard-tokens must be in [1, 2^31), got {self.shard_tokens:,}")
        if self.val_tokens is not None and self.val_share is not None:
            raise ValueError("give either --val-tokens or --val-share, not both")
        if self.val_tokens is not None and self.val_tokens < 0:
            raise ValueError(f"--val-tokens must be at least 0, got {self.val_tokens}")
        if self.val_share is not None and not 0.0 <= self.val_share < 1.0:
            raise ValueError(f"--val-share must be in [0, 1), got {self.val_share}")
        if self.workers is not None and self.workers < 0:
            raise ValueError(f"--workers must be at least 0, got {self.workers}")
        if self.errors not in ("strict", "replace"):
            raise ValueError(f"--errors must be strict or replace, got {self.errors!r}")
        if not self.text_field:
            raise ValueError("--text-field must name a field")
        if self.piece_chars < 16 or self.task_chars < 1:
            raise ValueError("piece_chars must be at least 16 and task_chars at least 1")

    @property
    def n_workers(self) -> int:
        if self.workers is not None:
            return self.workers
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass
class PrepareResult:
    out: str
    shards: list  # the manifest's entries
    train_tokens: int
    val_tokens: int
    documents: int
    seconds: float = 0.0  # this run
    bytes_read: int = 0  # this run, on disk
    tokens_written: int = 0  # this run
    resumed: bool = False
    already_complete: bool = False
    notes: list = dataclasses.field(default_factory=list)


# --- tokenizer processes ------------------------------------------------------------------------------------
def tokenize_texts(texts: list[str], starts: list[bool], enc=None) -> tuple[np.ndarray, np.ndarray]:
    """(tokens per text, all the tokens one after the other as uint16), with GPT-2's BPE, ignoring special
    tokens (a literal "<|endoftext|>" in the text is text, as tiktoken's encode_ordinary has it); a text
    that starts a document gets <|endoftext|> (50256) in front."""
    enc = enc or get_tokenizer()
    parts = [np.array([EOT_ID] * first + enc.encode_ordinary(t), dtype=np.uint16) for t, first in zip(texts, starts)]
    lengths = np.array([len(p) for p in parts], dtype=np.int64)
    return lengths, (np.concatenate(parts) if parts else np.empty(0, np.uint16))


def tokenizer_process_main() -> None:
    """A tokenizer process (started by TokenizerPool): tasks (texts, starts) arrive pickled on stdin,
    (lengths, tokens) go back on stdout, until stdin closes (the main process ended, or was killed). A
    thread takes the tasks off the pipe as they come, so the main process never blocks sending one."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    tasks_in = Connection(os.dup(0), writable=False)
    results_out = Connection(os.dup(1), readable=False)
    os.dup2(2, 1)  # anything printed goes to stderr, never into the results
    enc = get_tokenizer()
    tasks: queue.Queue = queue.Queue()

    def receive():
        try:
            while (task := tasks_in.recv()) is not None:
                tasks.put(task)
        except (EOFError, OSError):
            pass
        tasks.put(None)

    threading.Thread(target=receive, daemon=True).start()
    try:
        while (task := tasks.get()) is not None:
            results_out.send(tokenize_texts(*task, enc))
    except (EOFError, OSError):  # the main process is gone
        pass
    os._exit(0)


def _payload(task) -> tuple[list[str], list[bool]]:
    return [p.text for p in task], [p.starts_document for p in task]


class TokenizerPool:
    """K processes tokenizing tasks; results come back in the order the tasks went out. K = 0 tokenizes
    in this process. Use as a context manager (the processes end with it).

    The processes are fresh interpreters in a session of their own: Ctrl-C at the terminal reaches only
    the main process, which ends them (a process interrupted while it starts would print a traceback),
    and when the main process dies, even by SIGKILL, their stdin closes and they end too."""

    def __init__(self, workers: int, depth: int = 2):
        self.depth = depth
        self.procs, self.senders, self.receivers = [], [], []
        package_parent = str(Path(__file__).resolve().parents[1])  # the npgpt this process runs, not another
        code = f"import sys; sys.path.insert(0, {package_parent!r}); from npgpt.prepare import tokenizer_process_main; tokenizer_process_main()"
        for _ in range(workers):
            proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    start_new_session=True)  # fmt: skip
            self.senders.append(Connection(os.dup(proc.stdin.fileno()), readable=False))
            self.receivers.append(Connection(os.dup(proc.stdout.fileno()), writable=False))
            proc.stdin.close()
            proc.stdout.close()
            self.procs.append(proc)

    def map(self, tasks):
        """(task, (lengths, tokens)) for each task (a list of Pieces), in order."""
        if not self.procs:
            enc = get_tokenizer()
            for task in tasks:
                yield task, tokenize_texts(*_payload(task), enc)
            return
        k, sent, pending = len(self.procs), 0, deque()
        tasks = iter(tasks)
        exhausted = False
        while True:
            while not exhausted and len(pending) < self.depth * k:
                task = next(tasks, None)
                if task is None:
                    exhausted = True
                    break
                self.senders[sent % k].send(_payload(task))
                pending.append((task, sent % k))
                sent += 1
            if not pending:
                return
            task, w = pending.popleft()
            try:
                result = self.receivers[w].recv()
            except (EOFError, OSError):
                code = self.procs[w].poll()
                raise OSError(f"a tokenizer process stopped unexpectedly (exit code {code}; killed by the system, "
                              "perhaps for memory?); run the same command again to continue from the last save, "
                              "perhaps with fewer --workers") from None  # fmt: skip
            yield task, result

    def close(self, at_once: bool = False) -> None:
        """End the processes: after the tasks they hold, or (at_once, on an error or Ctrl-C) now."""
        for conn in self.senders:
            try:
                if not at_once:
                    conn.send(None)
                conn.close()
            except OSError:
                pass
        for proc in self.procs:
            if at_once:
                proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for conn in self.receivers:
            conn.close()
        self.procs, self.senders, self.receivers = [], [], []

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        self.close(at_once=exc_type is not None)


# --- writing shards ------------------------------------------------------------------------------------------
class ShardStream:
    """The shards of one split, written one after the other: tokens go into a hidden partial file (header
    first, its count filled in when the shard closes); a full shard closes and, once the manifest lists
    it, is renamed to its name (`rename_closed`)."""

    def __init__(self, out: Path, split: str, shard_tokens: int, state: dict | None = None):
        self.out, self.split, self.shard_tokens = out, split, shard_tokens
        state = state or {}
        self.index = state.get("index", 0)
        self.tokens = state.get("tokens", 0)
        self.documents = state.get("documents", 0)
        self.sources = {path: lines for path, *lines in state.get("sources", [])}  # path -> [first, last doc_line]
        self.file = None
        self.closed: list[tuple[Path, Path]] = []  # (partial, final) to rename after the next save
        if self.tokens:
            partial = self.partial_path(self.index)
            size = partial.stat().st_size if partial.is_file() else -1
            if size < HEADER_BYTES + 2 * self.tokens:
                raise ValueError(f"{partial} is missing or shorter than {out / MANIFEST} says: the folder was changed; "
                                 "start afresh with --overwrite")  # fmt: skip
            self.file = open(partial, "r+b")
            self.file.truncate(HEADER_BYTES + 2 * self.tokens)  # drop what was written after the last save
            self.file.seek(0, os.SEEK_END)

    def partial_path(self, index: int) -> Path:
        return self.out / f".{shard_name(self.split, index)}.partial"

    def write(self, tokens: np.ndarray, path: str, doc_line: int, starts_document: bool) -> list:
        """Append tokens of the document on line `doc_line` of `path`; the entries of the shards it completed."""
        done = []
        while len(tokens):
            if self.file is None:
                self.file = open(self.partial_path(self.index), "w+b")
                self.file.write(header_bytes(0))
            part, tokens = tokens[: self.shard_tokens - self.tokens], tokens[self.shard_tokens - self.tokens :]
            self.file.write(part.astype(TOKEN_DTYPE, copy=False).tobytes())
            self.tokens += len(part)
            lines = self.sources.setdefault(path, [doc_line, doc_line])
            lines[0], lines[1] = min(lines[0], doc_line), max(lines[1], doc_line)
            self.documents += starts_document
            starts_document = False
            if self.tokens == self.shard_tokens:
                done.append(self.close_shard())
        return done

    def close_shard(self) -> dict:
        """Write the header's count, flush to disk, hash: the shard's manifest entry."""
        self.file.seek(0)
        self.file.write(header_bytes(self.tokens))
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        self.file = None
        partial, name = self.partial_path(self.index), shard_name(self.split, self.index)
        entry = {"file": name, "split": self.split, "tokens": self.tokens, "documents": self.documents,
                 "sha256": file_sha256(partial), "sources": [{"path": p, "lines": lines} for p, lines in self.sources.items()]}  # fmt: skip
        self.closed.append((partial, self.out / name))
        self.index, self.tokens, self.documents, self.sources = self.index + 1, 0, 0, {}
        return entry

    def sync(self) -> None:
        if self.file is not None:
            self.file.flush()
            os.fsync(self.file.fileno())

    def rename_closed(self) -> None:
        for partial, final in self.closed:
            os.replace(partial, final)
        if self.closed:
            fsync_dir(self.out)
        self.closed = []

    def state(self) -> dict:
        return {"index": self.index, "tokens": self.tokens, "documents": self.documents,
                "sources": [[p, *lines] for p, lines in self.sources.items()]}  # fmt: skip

    def abandon(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


class Splitter:
    """Which split a document goes to, from the tokens counted before it and its own.

    val_tokens=N: the first documents, until validation holds at least N tokens (llm.c's way: its
    validation shard is the corpus's first tokens). val_share=F: a document goes to validation when that
    brings validation's share of all tokens nearer to F: with v validation tokens of t so far and n in
    the document (with its <|endoftext|>; counted up to SPLIT_LOOKAHEAD, so a huge document need not be
    held whole), |v + n - F(t + n)| < |v - F(t + n)|, that is 2v + n < 2F(t + n). So validation is spread
    evenly through the corpus and holds F of its tokens to within a document. Both rules depend on the
    documents alone, never on how the work was cut up."""

    def __init__(self, val_tokens: int | None, val_share: float | None):
        self.val_tokens, self.val_share = val_tokens, val_share

    def __call__(self, counts: dict, n: int) -> str:
        v, t = counts["val"], counts["val"] + counts["train"]
        if self.val_tokens is not None:
            return "val" if v < self.val_tokens else "train"
        return "val" if 2 * v + n < 2 * self.val_share * (t + n) else "train"


# --- the run ------------------------------------------------------------------------------------------------
def _settings(cfg: PrepareConfig, sources: list[Source]) -> dict:
    """What the shards are a function of (a resumed run must match it)."""
    val = {"val_tokens": cfg.val_tokens} if cfg.val_tokens is not None else {"val_share": cfg.val_share if cfg.val_share is not None else DEFAULT_VAL_SHARE}
    return {"inputs": [{"path": s.path, "bytes": s.size} for s in sources], "text_field": cfg.text_field,
            "split_on_blank_lines": cfg.split_on_blank_lines, "shard_tokens": cfg.shard_tokens, **val,
            "errors": cfg.errors}  # fmt: skip


_FLAGS = {"text_field": "--text-field", "split_on_blank_lines": "--split-on-blank-lines", "shard_tokens": "--shard-tokens",
          "val_tokens": "--val-tokens", "val_share": "--val-share", "errors": "--errors"}  # fmt: skip


def _difference(old: dict, new: dict) -> str | None:
    if old.get("inputs") != new["inputs"]:
        before = {(i["path"], i["bytes"]) for i in old.get("inputs", [])}
        now = {(i["path"], i["bytes"]) for i in new["inputs"]}
        extra, missing = sorted(now - before), sorted(before - now)
        first = (f"{extra[0][0]} ({extra[0][1]:,} bytes) is new" if extra else f"{missing[0][0]} ({missing[0][1]:,} bytes) is gone") if extra or missing else "their order differs"
        return f"its inputs differ ({first})"

    def given(flag, value):
        return "without " + flag if value in (None, False) else "with " + flag + ("" if value is True else f" {value}")

    for key, flag in _FLAGS.items():
        if key == "errors" and (old.get(key), new.get(key)) == ("strict", "replace"):
            continue  # a run stopped by bad input goes on: until then strict and replace wrote the same
        if old.get(key) != new.get(key):
            return f"it was made {given(flag, old.get(key))}, this run is {given(flag, new.get(key))}"
    return None


def _manifest(settings: dict, shards: list, complete: bool, totals: dict, resume: dict | None) -> dict:
    order = {"val": 0, "train": 1}
    return {"format": MANIFEST_FORMAT, "version": 1, "complete": complete,
            "tokenizer": {"name": "gpt2", "ranks_sha256": tokenizer_hash(), "eot": EOT_ID, "vocab_size": N_VOCAB},
            "shard_format": {"header_int32": 256, "magic": 20240520, "version": 1, "dtype": "uint16 little-endian",
                             "note": "llm.c's .bin format; each document starts with <|endoftext|> (50256)"},
            "settings": settings, "totals": totals,
            "shards": sorted(shards, key=lambda e: (order[e["split"]], e["file"])),
            **({"resume": resume} if resume is not None else {})}  # fmt: skip


_PARTIAL = re.compile(r"^\.(val|train)_\d{6}\.bin\.partial$")


def _ours(name: str) -> bool:
    """Files `prepare` leaves in its folder besides the shards its manifest lists: the manifest, and the
    partial shards and temporary manifests a killed run may leave."""
    return name == MANIFEST or (name.startswith(f".{MANIFEST}.") and name.endswith(".tmp")) or bool(_PARTIAL.match(name))


class Preparation:
    """One `prepare` run's state: the manifest, the two shard streams, the counts and where reading is."""

    def __init__(self, cfg: PrepareConfig, sources: list[Source], say):
        self.cfg, self.sources, self.say = cfg, sources, say
        self.out = Path(cfg.out)
        self.settings = _settings(cfg, sources)
        self.splitter = Splitter(cfg.val_tokens, self.settings.get("val_share"))
        self.shards: list = []
        self.counts = {"val": 0, "train": 0}
        self.documents = {"val": 0, "train": 0}
        self.position = Position()
        self.split: str | None = "train"  # the split of the document being written (None: not decided yet)
        self.waiting: list = []  # (piece, tokens) of a document whose split is not decided yet
        self.waiting_tokens = 0
        self.piece_chars = cfg.piece_chars
        self.resumed = self.complete = self.created = False
        self.streams: dict = {}

    # -- starting: afresh, resumed, or already done ----------------------------------------------------------
    def open(self) -> None:
        out = self.out
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out} is a file; give a folder for the shards")
        self.created = not out.exists()
        try:
            out.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as e:
            raise ValueError(f"--out {out}: cannot make the folder ({e.strerror}: a file stands in its path); choose another --out") from None
        manifest = read_manifest(out) if (out / MANIFEST).is_file() else None
        if manifest is not None and self.cfg.overwrite:
            for entry in manifest.get("shards", []):
                (out / entry["file"]).unlink(missing_ok=True)
            self._remove_ours()
            manifest = None
        if manifest is None:
            others = [p.name for p in out.iterdir() if not _ours(p.name)]
            if others:
                raise ValueError(f"--out {out} is not empty and holds no {MANIFEST} of npgpt prepare ({others[0]}, ...); "
                                 "choose a new or empty folder")  # fmt: skip
            self._remove_ours()
            self.streams = {split: ShardStream(out, split, self.cfg.shard_tokens) for split in SPLITS}
            self.save()
            return
        why = _difference(manifest.get("settings", {}), self.settings)
        if why:
            raise ValueError(f"--out {out} holds shards of another preparation: {why}; run with its arguments to "
                             "continue it, or pass --overwrite to start afresh (or choose another --out)")  # fmt: skip
        self.shards = manifest["shards"]
        totals = manifest.get("totals", {})
        self.counts = {s: totals.get(f"{s}_tokens", 0) for s in SPLITS}
        self.documents = {s: totals.get(f"{s}_documents", 0) for s in SPLITS}
        self._finish_renames()
        if manifest.get("complete"):
            self.complete = True
            return
        resume = manifest["resume"]
        self.position = Position(**resume["position"])
        self.split = resume["split"]
        self.piece_chars = resume["piece_chars"]
        self.resumed = self.position != Position() or any(resume["streams"][s]["tokens"] for s in SPLITS)
        self.streams = {split: ShardStream(out, split, self.cfg.shard_tokens, resume["streams"][split]) for split in SPLITS}
        self._remove_strays()

    def _finish_renames(self) -> None:
        """Shards the manifest lists whose rename a killed run did not reach."""
        for entry in self.shards:
            final = self.out / entry["file"]
            partial = self.out / f".{entry['file']}.partial"
            if not final.is_file():
                if not partial.is_file():
                    raise ValueError(f"{final} is listed in {self.out / MANIFEST} but missing; start afresh with --overwrite")
                os.replace(partial, final)
        fsync_dir(self.out)

    def _remove_strays(self) -> None:
        """Partial shards past the saved position, and temporary manifests, that a killed run left."""
        keep = {f".{shard_name(s, st.index)}.partial" for s, st in self.streams.items() if st.tokens}
        for p in self.out.iterdir():
            if _ours(p.name) and p.name != MANIFEST and p.name not in keep:
                p.unlink()

    def _remove_ours(self) -> None:
        for p in self.out.iterdir():
            if _ours(p.name) and p.is_file():
                p.unlink()

    def discard(self) -> None:
        """Leave the folder as it was before this run (a run that wrote nothing)."""
        self.abandon()
        self._remove_ours()
        if self.created and not any(self.out.iterdir()):
            self.out.rmdir()

    # -- writing ----------------------------------------------------------------------------------------------
    def totals(self) -> dict:
        return {"train_tokens": self.counts["train"], "val_tokens": self.counts["val"],
                "train_documents": self.documents["train"], "val_documents": self.documents["val"]}  # fmt: skip

    def save(self, complete: bool = False) -> None:
        """Partial shards to disk, then the manifest (atomically), then the renames of closed shards."""
        for stream in self.streams.values():
            stream.sync()
        resume = None if complete else {
            "position": dataclasses.asdict(self.position), "split": self.split, "piece_chars": self.piece_chars,
            "streams": {s: self.streams[s].state() for s in SPLITS}}  # fmt: skip
        manifest = _manifest(self.settings, self.shards, complete, self.totals(), resume)
        with atomic_path(self.out / MANIFEST) as tmp:
            Path(tmp).write_text(json.dumps(manifest, indent=2) + "\n")
            os.chmod(tmp, 0o666 & ~_umask())  # readable as the shards are (a temporary file starts private)
        for stream in self.streams.values():
            stream.rename_closed()

    def write(self, task, lengths: np.ndarray, tokens: np.ndarray) -> bool:
        """A task's tokens into the shards; True when a shard closed. A document's tokens wait until its
        split is decided (at its end, or once SPLIT_LOOKAHEAD of them are in), and `position` moves past
        a piece only when its tokens are written, so a saved position never lies inside a waiting document."""
        closed, at = [], 0
        for piece, n in zip(task, lengths.tolist()):
            toks, at = tokens[at : at + n], at + n
            if piece.starts_document:  # (its tokens begin with <|endoftext|>)
                self.split, self.waiting, self.waiting_tokens = None, [], 0
            if self.split is not None:
                closed += self._put(piece, toks)
                continue
            piece.text = ""  # (only its tokens are needed now)
            self.waiting.append((piece, toks))
            self.waiting_tokens += len(toks)
            if piece.after.chars == 0 or self.waiting_tokens >= SPLIT_LOOKAHEAD:  # the document ended, or is long
                self.split = self.splitter(self.counts, min(self.waiting_tokens, SPLIT_LOOKAHEAD))
                self.documents[self.split] += 1
                for waiting, waiting_toks in self.waiting:
                    closed += self._put(waiting, waiting_toks)
                self.waiting, self.waiting_tokens = [], 0
        self.shards += closed
        return bool(closed)

    def _put(self, piece, toks: np.ndarray) -> list:
        self.counts[self.split] += len(toks)
        self.position = piece.after
        path = self.sources[piece.source].path
        return self.streams[self.split].write(toks, path, piece.doc_line, piece.starts_document)

    def finish(self) -> None:
        for split in SPLITS:
            if self.streams[split].tokens:
                self.shards.append(self.streams[split].close_shard())
        self.position = Position(len(self.sources))
        self.save(complete=True)
        self.complete = True

    def abandon(self) -> None:
        for stream in self.streams.values():
            stream.abandon()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000


def _duration(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _tasks(pieces, task_chars: int):
    task, size = [], 0
    for piece in pieces:
        task.append(piece)
        size += len(piece.text)
        if size >= task_chars:
            yield task
            task, size = [], 0
    if task:
        yield task


def prepare(cfg: PrepareConfig, say=print) -> PrepareResult:
    """Tokenize the inputs into shards in cfg.out (or continue a run that was stopped); see the module."""
    from tqdm.auto import tqdm

    cfg.check()
    sources = find_sources(cfg.data, exclude=cfg.out)
    if not any(s.size for s in sources):
        raise ValueError(f"the inputs hold no text ({len(sources)} file(s), all empty); give files with text")
    run = Preparation(cfg, sources, say)
    run.open()
    if run.complete:
        result = _result(run, 0.0, 0, 0, Notes(), already=True)
        say(f"{cfg.out} is already prepared from these inputs: " + _shards_line(result))
        return result
    notes = Notes()
    sizes = [s.size for s in sources]
    before = [sum(sizes[:i]) for i in range(len(sizes))]
    workers = cfg.n_workers
    t0 = time.perf_counter()
    tokens_at_start = run.counts["val"] + run.counts["train"]
    last_save, last_postfix = time.monotonic(), 0.0
    bar = tqdm(total=sum(sizes), initial=before[run.position.file] if run.position.file < len(sources) else sum(sizes),
               unit="B", unit_scale=True, desc="prepare", disable=not cfg.progress, dynamic_ncols=True)  # fmt: skip
    start_bytes = bar.n
    if run.resumed:
        say(f"continuing {cfg.out} from {sources[min(run.position.file, len(sources) - 1)].path} "
            f"(line {run.position.line}); {tokens_at_start:,} tokens were written before")  # fmt: skip
    pieces = read_pieces(sources, run.position, split_on_blank_lines=cfg.split_on_blank_lines, text_field=cfg.text_field,
                         errors=cfg.errors, piece_chars=run.piece_chars, notes=notes)  # fmt: skip
    try:
        with TokenizerPool(workers) as pool:
            for task, (lengths, tokens) in pool.map(_tasks(pieces, cfg.task_chars)):
                closed = run.write(task, lengths, tokens)
                now = time.monotonic()
                if closed or now - last_save >= cfg.save_every:
                    run.save()
                    last_save = now
                bar.update(max(0, before[task[-1].source] + task[-1].disk - bar.n))
                if now - last_postfix > 0.5:
                    written = run.counts["val"] + run.counts["train"] - tokens_at_start
                    bar.set_postfix_str(f"{written / max(time.perf_counter() - t0, 1e-9):,.0f} tok/s, {written:,} tokens", refresh=False)
                    last_postfix = now
        if run.counts["train"] + run.counts["val"] == 0:
            run.discard()
            raise ValueError(f"the inputs hold no text: {len(sources)} file(s) with only empty documents"
                             + (" or blank lines" if cfg.split_on_blank_lines else "")
                             + (f" (is the text in another field than --text-field {cfg.text_field}?)" if any(s.kind == "jsonl" for s in sources) else ""))  # fmt: skip
        if run.counts["train"] == 0:
            run.save()
            raise ValueError(f"every token went to validation ({run.counts['val']:,} tokens): lower --val-tokens or "
                             "--val-share, and run again with --overwrite")  # fmt: skip
        run.finish()
    except KeyboardInterrupt:
        bar.close()
        say(f"stopped; run the same command again to continue from the last save ({len(run.shards)} shard(s) complete)")
        raise
    finally:
        run.abandon()
        bar.close()
    seconds = time.perf_counter() - t0
    result = _result(run, seconds, sum(sizes) - start_bytes, run.counts["val"] + run.counts["train"] - tokens_at_start, notes)
    _summary(result, sources, workers, say)
    return result


def _result(run: Preparation, seconds, bytes_read, tokens_written, notes: Notes, already=False) -> PrepareResult:
    return PrepareResult(str(run.out), run.shards, run.counts["train"], run.counts["val"],
                         run.documents["train"] + run.documents["val"], seconds, bytes_read, tokens_written,
                         run.resumed, already, notes.summary())  # fmt: skip


def _shards_line(r: PrepareResult) -> str:
    n_val = sum(e["split"] == "val" for e in r.shards)
    return (f"{len(r.shards) - n_val} train shard(s) ({r.train_tokens:,} tokens) and {n_val} validation shard(s) "
            f"({r.val_tokens:,} tokens), {r.documents:,} documents")  # fmt: skip


def _summary(r: PrepareResult, sources, workers: int, say) -> None:
    rate = f"{_size(r.bytes_read / max(r.seconds, 1e-9))}/s, {r.tokens_written / max(r.seconds, 1e-9):,.0f} tokens/s"
    total = _size(sum(s.size for s in sources))
    say(f"prepared {r.out}: {_shards_line(r)} from {len(sources)} file(s) ({total})")
    say(f"  {'this run (resumed)' if r.resumed else 'in'} {_duration(r.seconds)}: {rate} with "
        f"{workers if workers else 'no'} tokenizer process{'es' if workers != 1 else ''}")  # fmt: skip
    for line in r.notes:
        say(f"  {line}")
    if r.val_tokens == 0:
        say("  warning: the validation split is empty (too few documents for --val-share, or --val-tokens 0); "
            "give --val-tokens N, a larger --val-share, more documents or --split-on-blank-lines")  # fmt: skip
    say(f"  files: {r.out}/val_*.bin and {r.out}/train_*.bin (llm.c's format), listed in {r.out}/{MANIFEST}")


def decode_documents(folder, split: str | None = None):
    """The documents of a prepared folder as text, in the order written (each split on its own), for
    checking: every shard's tokens one after the other, cut at <|endoftext|>."""
    from .shards import prepared_shards
    from .tokenizer import decode

    shards = prepared_shards(folder)
    for name in SPLITS if split is None else (split,):
        tokens = np.concatenate([s.tokens() for s in getattr(shards, name)] or [np.empty(0, np.uint16)])
        cuts = np.flatnonzero(tokens == EOT_ID)
        for a, b in zip(cuts, list(cuts[1:]) + [len(tokens)]):
            yield name, decode(tokens[a + 1 : b])

