"""Reading a corpus for `npgpt prepare`: input files -> documents -> pieces of text to tokenize.

Inputs (`find_sources`): UTF-8 text files, where each file is one document, or, with split_on_blank_lines,
each run of non-blank lines is one; JSON lines (`.jsonl`, `.ndjson`: one object per line, the document is
its text field); any of them compressed (`.gz`, `.xz`, `.bz2`); globs and folders (searched recursively).

A long document is cut into pieces of about `piece_chars` characters (`Piecer`), only at places where
GPT-2's pre-tokenizer cuts anyway (`safe_cut`), so tokenizing the pieces one by one gives exactly the
tokens of the whole document and memory stays bounded whatever a document's size.

Every piece says where it comes from (file, lines) and where reading resumes after it (`Position`), which
is what `prepare` saves to continue a killed run. Pieces are a function of the file's content alone (never
of read sizes or of where a run started), so a resumed run cuts exactly where an uninterrupted one did.

Bad input is a ValueError naming the file, the line and the fix; with errors="replace" invalid UTF-8
becomes U+FFFD and JSON lines that cannot be used are skipped, each counted in `Notes`.
"""

from __future__ import annotations

import bz2
import glob
import gzip
import json
import lzma
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

JSONL_SUFFIXES = (".jsonl", ".ndjson")
TEXT_SUFFIXES = (".txt", ".text", ".md")
COMPRESSORS = {".gz": gzip.GzipFile, ".xz": lzma.LZMAFile, ".bz2": bz2.BZ2File}
READ_BYTES = 1 << 20  # bytes read at a time (a line longer than this arrives in parts)
BOM = b"\xef\xbb\xbf"
NEWLINE = b"\n"


# --- the inputs ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Source:
    """One input file: its path as given or found, "text" or "jsonl", its compression suffix ("" for none)
    and its size on disk."""

    path: str
    kind: str
    compression: str
    size: int


def source_of(path: str) -> Source:
    p = Path(path)
    compression = p.suffix.lower() if p.suffix.lower() in COMPRESSORS else ""
    inner = p.name[: len(p.name) - len(compression)].lower()
    kind = "jsonl" if inner.endswith(JSONL_SUFFIXES) else "text"
    return Source(str(path), kind, compression, p.stat().st_size)


def _readable_name(name: str) -> bool:
    low = name.lower()
    for c in COMPRESSORS:
        low = low.removesuffix(c)
    return low.endswith(TEXT_SUFFIXES + JSONL_SUFFIXES)


def _folder_files(folder: Path, exclude: Path | None) -> list[str]:
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and (exclude is None or Path(root, d).resolve() != exclude))
        found += [os.path.join(root, f) for f in sorted(files) if not f.startswith(".") and _readable_name(f)]
    return found


def find_sources(specs, exclude=None) -> list[Source]:
    """Files, globs (`corpus/*.txt`, `**` for any depth) and folders -> the input files, in the order given
    (each glob and folder sorted by name), each once. `exclude`: a folder never read (the output)."""
    if isinstance(specs, (str, os.PathLike)):
        specs = [specs]
    exclude = Path(exclude).resolve() if exclude is not None else None
    paths: list[str] = []
    for spec in map(str, specs):
        if glob.has_magic(spec):
            matches = sorted(glob.glob(os.path.expanduser(spec), recursive=True))
            if not matches:
                raise ValueError(f"--data {spec!r} matches no file; check the pattern (quote it so the shell leaves it to npgpt)")
            for m in matches:
                if exclude is not None and (Path(m).resolve() == exclude or exclude in Path(m).resolve().parents):
                    continue  # the output folder (a glob like 'data/**' reaches it)
                paths += _folder_files(Path(m), exclude) if os.path.isdir(m) else [m]
        elif os.path.isdir(os.path.expanduser(spec)):
            files = _folder_files(Path(os.path.expanduser(spec)), exclude)
            if not files:
                kinds = ", ".join(TEXT_SUFFIXES + JSONL_SUFFIXES)
                raise ValueError(f"--data {spec}: the folder holds no {kinds} files (compressed or not); name the files or a glob")
            paths += files
        elif os.path.isfile(os.path.expanduser(spec)):
            paths.append(os.path.expanduser(spec))
        else:
            raise ValueError(f"--data {spec} does not exist; give text or JSON-lines files, globs or folders")
    seen, unique = set(), []
    for p in paths:
        key = os.path.realpath(p)
        if key not in seen:
            seen.add(key)
            unique.append(p)
    if not unique:
        raise ValueError("no input files: give --data FILES, globs or folders")
    return [source_of(p) for p in unique]


def open_source(source: Source):
    """(decompressed binary stream, the raw file): the raw file's tell() is the position on disk."""
    raw = open(source.path, "rb")
    if not source.compression:
        return raw, raw
    if source.compression == ".gz":
        return gzip.GzipFile(fileobj=raw, mode="rb"), raw
    return COMPRESSORS[source.compression](raw, "rb"), raw


# --- where reading is, what was skipped ---------------------------------------------------------------------
@dataclass(frozen=True)
class Position:
    """Where reading resumes: document number `doc` of file number `file` starts at byte `offset` of the
    file's (decompressed) content, on line `line`; its first `chars` characters are already done."""

    file: int = 0
    offset: int = 0
    line: int = 1
    doc: int = 0
    chars: int = 0


@dataclass
class Piece:
    """Text to tokenize: from `source` (an index into the sources), of the document that begins on line
    `doc_line`; the first piece of a document has starts_document (its tokens get <|endoftext|> in front); `after` is
    where reading resumes once this piece is written; `disk` is how far into the file's bytes on disk
    reading has come (for the progress bar)."""

    text: str
    source: int
    doc_line: int
    starts_document: bool
    after: Position
    disk: int


@dataclass
class Notes:
    """What reading let pass under errors="replace", and the empty documents left out (counted in this run)."""

    empty: int = 0
    replaced: int = 0  # pieces of text in which invalid UTF-8 became U+FFFD
    skipped: int = 0  # JSON lines that could not be used
    first_replaced: str = ""
    first_skipped: str = ""

    def summary(self) -> list[str]:
        out = []
        if self.replaced:
            out.append(f"replaced invalid UTF-8 with U+FFFD in {self.replaced:,} place(s) (first: {self.first_replaced})")
        if self.skipped:
            out.append(f"skipped {self.skipped:,} JSON line(s) that could not be used (first: {self.first_skipped})")
        if self.empty:
            out.append(f"left out {self.empty:,} empty document(s)")
        return out


# --- cutting a document where the pre-tokenizer cuts anyway ---------------------------------------------------
def _solid(ch: str) -> bool:
    """Not whitespace. Python's isspace() holds for every Unicode White_Space character (the `\\s` of
    GPT-2's pattern) and a few more, so `_solid` never calls a tokenizer-whitespace character solid."""
    return not ch.isspace()


def is_safe_cut(text: str, p: int) -> bool:
    """True when text[:p] and text[p:] tokenize to the tokens of text: either "x y" cut before the
    space, or "x\\ny" cut after the newline, with x and y not whitespace.

    Why: every alternative of GPT-2's pattern that can take a whitespace character starts with it (` ?\\p{L}++`
    and its kin take an optional space in front; `\\s++$`, `\\s+(?!\\S)` and `\\s` are all whitespace), so the
    pre-token holding x ends at x, and the next one starts at the space (or after the newline, which
    `\\s` alone takes, since y is not whitespace; at the end of a piece `\\s++$` takes the same newline).
    The pattern has no look-behind, and no match before the cut looks past it. So both sides split into
    the pre-tokens of the whole, and BPE works within each pre-token."""
    n = len(text)
    if not 0 < p < n:
        return False
    if text[p] == " ":
        return p + 1 < n and _solid(text[p - 1]) and _solid(text[p + 1])
    return text[p - 1] == "\n" and p >= 2 and _solid(text[p - 2]) and _solid(text[p])


def last_safe_cut(text: str, limit: int) -> int | None:
    """The largest p <= limit with is_safe_cut(text, p), or None."""
    space, newline = text.rfind(" ", 0, limit + 1), text.rfind("\n", 0, limit)  # cut at a space, after a newline
    while space > 0 or newline > 0:
        if space > newline:
            if is_safe_cut(text, space):
                return space
            space = text.rfind(" ", 0, space)
        else:
            if is_safe_cut(text, newline + 1):
                return newline + 1
            newline = text.rfind("\n", 0, newline)
    return None


def first_safe_cut(text: str, start: int) -> int | None:
    """The smallest p >= start with is_safe_cut(text, p) that can be told from `text` alone, or None."""
    space, newline = text.find(" ", start), text.find("\n", max(start - 1, 0))
    while space != -1 or newline != -1:
        if newline == -1 or (space != -1 and space < newline + 1):
            if is_safe_cut(text, space):
                return space
            space = text.find(" ", space + 1)
        else:
            if newline + 1 >= start and is_safe_cut(text, newline + 1):
                return newline + 1
            newline = text.find("\n", newline + 1)
    return None


class Piecer:
    """Collects one document's text and hands it out in pieces: each ends at the last safe cut within
    `piece_chars` characters (or, when there is none, at the first one after; or at the document's end).
    Which cuts are made depends only on the document's text, never on how it arrived; `skip` leaves out
    the pieces that end at or before that many characters (done in an earlier run)."""

    def __init__(self, piece_chars: int, skip: int = 0):
        self.piece_chars = piece_chars
        self.parts: list[str] = []
        self.size = 0  # characters in parts
        self.done = 0  # characters of the document handed out (or skipped) before parts
        self.skip = skip
        self.searched = 0  # where the search for a first cut past piece_chars may resume
        self.next_try = piece_chars + 2  # characters needed before cutting is tried again

    def feed(self, text: str) -> Iterator[tuple[str, int]]:
        if text:
            self.parts.append(text)
            self.size += len(text)
            if self.size >= self.next_try:
                yield from self._cut(final=False)

    def finish(self) -> Iterator[tuple[str, int]]:
        yield from self._cut(final=True)

    def _cut(self, final: bool):
        """-> (piece, characters of the document done after it) for each piece ready."""
        buf = "".join(self.parts)
        self.next_try = self.piece_chars + 2
        while buf:
            n = len(buf)
            if n <= self.piece_chars and final:
                p = n
            elif n < self.piece_chars + 2 and not final:
                break
            else:
                p = last_safe_cut(buf, self.piece_chars)
                if p is None:
                    p = first_safe_cut(buf, max(self.piece_chars + 1, self.searched))
                    if p is None:
                        if not final:  # no cut yet: look again once the text has doubled (no quadratic rescans)
                            self.searched = max(n - 2, self.piece_chars + 1)
                            self.next_try = 2 * n
                            break
                        p = n
            piece, buf = buf[:p], buf[p:]
            self.searched = 0
            self.done += p
            if self.done > self.skip:
                yield piece, self.done
        self.parts = [buf] if buf else []
        self.size = len(buf)


# --- bytes -> text --------------------------------------------------------------------------------------------
def _complete_utf8(data: bytes) -> int:
    """Length of the longest prefix of `data` that does not end inside a UTF-8 sequence that more bytes
    could complete (the rest is carried to the next read)."""
    n = len(data)
    for back in range(1, min(4, n + 1)):
        b = data[n - back]
        if b & 0xC0 == 0x80:  # a continuation byte: look further back for the lead
            continue
        need = 2 if b & 0xE0 == 0xC0 else 3 if b & 0xF0 == 0xE0 else 4 if b & 0xF8 == 0xF0 else 1
        return n - back if need > back else n
    return n


class _Decoder:
    """UTF-8 bytes, read in parts, -> text; strict (an error names the file, line and byte offset) or
    replace (U+FFFD, noted). A character split between two reads is carried to the next."""

    def __init__(self, source: Source, errors: str, notes: Notes):
        self.source, self.errors, self.notes = source, errors, notes
        self.carry = b""

    def decode(self, data: bytes, offset: int, line: int, final: bool = False) -> str:
        """`data` starts at byte `offset` of the content, on line `line`."""
        data = self.carry + data
        offset -= len(self.carry)
        cut = len(data) if final else _complete_utf8(data)
        data, self.carry = data[:cut], data[cut:]
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            where = f"{self.source.path}: line {line + data.count(NEWLINE, 0, e.start)}"
            if self.errors == "replace":
                self.notes.replaced += 1
                self.notes.first_replaced = self.notes.first_replaced or f"{where}, byte offset {offset + e.start}"
                return data.decode("utf-8", errors="replace")
            raise ValueError(
                f"{where}: invalid UTF-8 at byte offset {offset + e.start} (byte 0x{data[e.start]:02x}); convert the "
                "file to UTF-8, or pass --errors replace to replace bad bytes with U+FFFD"
            ) from None


def _damaged(source: Source, e: Exception) -> ValueError:
    what = {"": "file", ".gz": "gzip data", ".xz": "xz data", ".bz2": "bzip2 data"}[source.compression]
    return ValueError(f"{source.path}: damaged {what} ({e}); check or replace the file, or leave it out of --data")


# --- files -> pieces ------------------------------------------------------------------------------------------
def read_pieces(sources: list[Source], start: Position = Position(), *, split_on_blank_lines: bool = False,
                text_field: str = "text", errors: str = "strict", piece_chars: int = 1 << 20,
                notes: Notes | None = None) -> Iterator[Piece]:  # fmt: skip
    """Every piece of every document, from `start` on, in order."""
    if errors not in ("strict", "replace"):
        raise ValueError(f"errors must be 'strict' or 'replace', got {errors!r}")
    notes = notes if notes is not None else Notes()
    for index in range(start.file, len(sources)):
        source = sources[index]
        here = start if index == start.file else Position(index)
        stream, raw = open_source(source)
        try:
            if source.kind == "jsonl":
                reader = _jsonl_pieces
            elif split_on_blank_lines:
                reader = _paragraph_pieces
            else:
                reader = _file_pieces
            yield from reader(source, index, stream, raw, here, text_field, errors, piece_chars, notes)
        except (OSError, EOFError, zlib.error, lzma.LZMAError) as e:
            if isinstance(e, OSError) and not isinstance(e, gzip.BadGzipFile) and e.errno is not None:
                raise  # the environment (a vanished file, a disk error), not the data
            raise _damaged(source, e) from None
        finally:
            stream.close()
            raw.close()


def _skip_bom(stream, position: Position) -> int:
    """The offset reading starts at: `position.offset`, or 3 past a byte-order mark at the file's start."""
    if position.offset == 0:
        head = stream.read(3)
        if head == BOM:
            return 3
        stream.seek(0)
    else:
        stream.seek(position.offset)
    return position.offset


def _emit(items, index: int, raw, doc_line: int, mid_doc, done: Position | None):
    """Pieces from the Piecer's items, of the document on line doc_line; mid_doc(chars) is where reading resumes after a piece inside the
    document, `done` (when the items end the document) where it resumes after the last one."""
    items = list(items)
    for i, (text, chars) in enumerate(items):
        after = done if done is not None and i == len(items) - 1 else mid_doc(chars)
        yield Piece(text, index, doc_line, chars == len(text), after, raw.tell())


def _file_pieces(source, index, stream, raw, here: Position, text_field, errors, piece_chars, notes):
    """The whole file is one document. A resumed run reads it again from its start and skips the
    characters done (`here.chars`): only reading and cutting, no tokenizing."""
    offset = _skip_bom(stream, Position(index))
    piecer = Piecer(piece_chars, skip=here.chars)
    decoder = _Decoder(source, errors, notes)
    line, empty = 1, True

    def mid_doc(chars):
        return Position(index, 0, 1, 0, chars)

    while data := stream.read(READ_BYTES):
        text = decoder.decode(data, offset, line)
        offset += len(data)
        line += data.count(b"\n")
        empty = empty and not text
        yield from _emit(piecer.feed(text), index, raw, 1, mid_doc, None)
    tail = decoder.decode(b"", offset, line, final=True)
    empty = empty and not tail
    items = list(piecer.feed(tail)) + list(piecer.finish())
    yield from _emit(items, index, raw, 1, mid_doc, Position(index + 1))
    if empty and here.chars == 0:
        notes.empty += 1


def _lines(stream, offset: int, line: int):
    """(bytes, their offset, their line, whether they end the line): each line from `offset` on, or the
    next READ_BYTES of a longer one (a line's parts depend only on where the line starts)."""
    while data := stream.readline(READ_BYTES):
        ends = data.endswith(b"\n")
        yield data, offset, line, ends
        offset += len(data)
        line += ends


def _paragraph_pieces(source, index, stream, raw, here: Position, text_field, errors, piece_chars, notes):
    """Each run of non-blank lines is a document (its lines with their line ends); blank lines (empty or
    whitespace only) separate documents and belong to none. A resumed run starts at its document's
    first line."""
    offset = _skip_bom(stream, here)
    decoder = _Decoder(source, errors, notes)
    doc, piecer, doc_at, at_line_start, skip = here.doc, None, (offset, here.line), True, here.chars
    end, line = offset, here.line

    def mid_doc(chars):
        return Position(index, doc_at[0], doc_at[1], doc, chars)

    for data, at, line, ends in _lines(stream, offset, here.line):
        text = decoder.decode(data, at, line, final=ends)
        end = at + len(data)
        blank = at_line_start and ends and not text.strip()
        at_line_start = ends
        if blank:
            if piecer is not None:
                yield from _emit(piecer.finish(), index, raw, doc_at[1], mid_doc, Position(index, at, line, doc + 1))
                doc, piecer, skip = doc + 1, None, 0
            continue
        if piecer is None:
            piecer, doc_at = Piecer(piece_chars, skip=skip), (at, line)
        yield from _emit(piecer.feed(text), index, raw, doc_at[1], mid_doc, None)
    if piecer is not None:  # the file ends inside a document
        text = decoder.decode(b"", end, line, final=True)  # an incomplete character at the very end
        items = list(piecer.feed(text)) + list(piecer.finish())
        yield from _emit(items, index, raw, doc_at[1], mid_doc, Position(index + 1))


def _whole_lines(stream, offset: int, line: int):
    """(bytes of one whole line, its offset, its line number) from `offset` on."""
    parts, start = [], offset
    for data, at, number, ends in _lines(stream, offset, line):
        if not parts:
            start = at
        parts.append(data)
        if ends:
            yield b"".join(parts), start, number
            parts = []
    if parts:
        yield b"".join(parts), start, number


def _jsonl_pieces(source, index, stream, raw, here: Position, text_field, errors, piece_chars, notes):
    """One JSON object per line; its `text_field` is the document. Blank lines are left out. A line is held
    whole (a JSON value cannot be parsed in parts); its text is then cut into pieces."""
    offset = _skip_bom(stream, here)
    decoder = _Decoder(source, errors, notes)
    doc, skip = here.doc, here.chars
    for record, start, line in _whole_lines(stream, offset, here.line):
        text = _document_of(decoder.decode(record, start, line, final=True), source, line, text_field, errors, notes)
        if text is None:  # a blank line, or one skipped under errors="replace"
            continue
        if not text:
            notes.empty += 1
        else:
            piecer = Piecer(piece_chars, skip=skip)
            items = [*piecer.feed(text), *piecer.finish()]
            done = Position(index, start + len(record), line + 1, doc + 1)
            yield from _emit(items, index, raw, line, lambda chars: Position(index, start, line, doc, chars), done)
        doc, skip = doc + 1, 0


def _document_of(line_text: str, source: Source, line: int, text_field: str, errors: str, notes: Notes) -> str | None:
    """The text field of one JSON line; None for a blank line, or for a bad one under errors="replace"."""
    if not line_text.strip():
        return None
    where = f"{source.path}: line {line}"
    try:
        obj = json.loads(line_text)
        if not isinstance(obj, dict):
            kind = {list: "a list", str: "a string", int: "a number", float: "a number", bool: "true/false"}.get(type(obj), "null")
            raise _Unusable(f"a JSON line must be an object with a {text_field!r} field, this one is {kind}")
        if text_field not in obj:
            have = ", ".join(map(repr, list(obj)[:8])) or "none"
            raise _Unusable(f"no field {text_field!r} (the object's fields: {have}); choose the field with --text-field")
        text = obj[text_field]
        if not isinstance(text, str):
            raise _Unusable(f"field {text_field!r} is {type(text).__name__}, not a string")
    except json.JSONDecodeError as e:
        problem = f"not valid JSON ({e.msg} at column {e.colno})"
    except _Unusable as e:
        problem = str(e)
    else:
        try:
            text.encode("utf-8")
            return text
        except UnicodeEncodeError as e:  # JSON's \\ud800-style escapes can name a lone surrogate
            if errors == "replace":
                notes.replaced += 1
                notes.first_replaced = notes.first_replaced or where
                return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
            raise ValueError(
                f"{where}: the text holds an unpaired surrogate ({text[e.start]!r}), which is not valid Unicode; "
                "fix the line, or pass --errors replace to replace it with U+FFFD"
            ) from None
    if errors == "replace":
        notes.skipped += 1
        notes.first_skipped = notes.first_skipped or f"{where}: {problem}"
        return None
    raise ValueError(f"{where}: {problem}; fix the line, or pass --errors replace to skip lines that cannot be used")


class _Unusable(Exception):
    pass
