"""`npgpt prepare`: documents come back exactly from the shards, whatever the number of processes or the size
of the pieces; the split follows its stated rule; a killed run continues to byte-identical shards; bad
input is one line naming the file and line.

Expectations are computed here independently: the documents from the inputs with plain Python (json,
gzip, lzma, str.splitlines), their tokens with tiktoken's own encode_ordinary on the whole document, the
split rule re-implemented from its description, the shard layout read with struct."""

import gzip
import hashlib
import json
import lzma
import os
import random
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from npgpt.cli import main
from npgpt.corpus import Piecer, is_safe_cut, find_sources, read_pieces
from npgpt.prepare import PrepareConfig, TokenizerPool, prepare
from npgpt.tokenizer import EOT_ID, get_tokenizer

ASSETS = Path(__file__).resolve().parents[1] / "npgpt" / "assets"
VERDICT = (ASSETS / "the-verdict.txt").read_text(encoding="utf-8")
TANG = (ASSETS / "tang300.txt").read_text(encoding="utf-8")
ENC = get_tokenizer()


def quiet(**kw):
    return {"progress": False, "workers": 0, **kw}


def run(data, out, **kw):
    return prepare(PrepareConfig(data=[str(d) for d in data], out=str(out), **quiet(**kw)), say=lambda *a: None)


def read_split(out, split):
    """(tokens of the split's shards one after the other, [(name, header count, size)]) read with struct."""
    tokens, shards = [], []
    for path in sorted(Path(out).glob(f"{split}_*.bin")):
        data = path.read_bytes()
        magic, version, count = struct.unpack("<3i", data[:12])
        assert (magic, version) == (20240520, 1) and struct.unpack("<253i", data[12:1024]) == (0,) * 253
        assert len(data) == 1024 + 2 * count
        tokens += struct.unpack(f"<{count}H", data[1024:])
        shards.append((path.name, count))
    return tokens, shards


def documents_of(tokens):
    """Cut at <|endoftext|>: every document starts with it."""
    assert not tokens or tokens[0] == EOT_ID
    cuts = [i for i, t in enumerate(tokens) if t == EOT_ID] + [len(tokens)]
    return [ENC.decode(tokens[a + 1 : b]) for a, b in zip(cuts, cuts[1:])]


def split_by_rule(docs, share=None, val_tokens=None):
    """The documented rule: val_tokens N takes the first documents until validation holds >= N tokens;
    share F puts a document (n tokens with its <|endoftext|>) into validation when 2v + n < 2F(t + n)."""
    val, train, v, t = [], [], 0, 0
    for d in docs:
        n = len(ENC.encode_ordinary(d)) + 1
        to_val = v < val_tokens if val_tokens is not None else 2 * v + n < 2 * share * (t + n)
        (val if to_val else train).append(d)
        v, t = v + n * to_val, t + n
    return val, train


def tree(out):
    return {p.name: p.read_bytes() for p in sorted(Path(out).iterdir())}


@pytest.fixture
def corpus(tmp_path):
    """Every kind of input, and the documents they hold, in order."""
    src = tmp_path / "src"
    (src / "folder" / "deeper").mkdir(parents=True)
    docs = []
    a = VERDICT[:3000]
    (src / "a.txt").write_text(a, encoding="utf-8")
    docs.append(a)
    bom = "Hello <|endoftext|> world\r\nsecond line, no newline at the end"  # the literal text is text
    (src / "bom.txt").write_bytes(b"\xef\xbb\xbf" + bom.encode())
    docs.append(bom)
    b = TANG[:2500]
    with gzip.open(src / "b.txt.gz", "wt", encoding="utf-8") as f:
        f.write(b)
    docs.append(b)
    paragraphs = [p for p in VERDICT[3000:9000].split("\n\n") if p.strip()]
    lines, records = [], []
    for i, p in enumerate(paragraphs):
        records.append({"id": i, "text": p, "meta": {"n": i}})
        if i == 3:
            records.append({"text": ""})  # empty: left out
    for r in records:
        lines.append(json.dumps(r, ensure_ascii=i % 2 == 0))
        if r.get("id") == 5:
            lines.append("   ")  # a blank line: left out
    (src / "c.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    docs += [r["text"] for r in records if r["text"]]
    d = ["émigré 😀 naïve", "中文 and English\n\nwith a blank line inside", "  leading spaces and trailing  "]
    with lzma.open(src / "d.jsonl.xz", "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps({"text": t}) + "\n" for t in d))
    docs += d
    e = TANG[2500:4000]
    (src / "folder" / "deeper" / "e.md").write_text(e, encoding="utf-8")
    (src / "folder" / "skipped.csv").write_text("a,b\n")  # not a kind the folder search reads
    docs.append(e)
    specs = [src / "a.txt", src / "bom.txt", src / "b.txt.gz", src / "c.jsonl", src / "d.jsonl.xz", src / "folder"]
    return specs, docs


# --- cutting documents into pieces --------------------------------------------------------------------------
def test_unicode_whitespace_is_whitespace_to_python():
    """is_safe_cut relies on it: every White_Space character (what GPT-2's `\\s` matches) is str.isspace()."""
    white_space = [*range(0x9, 0xE), 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B), 0x2028, 0x2029, 0x202F, 0x205F, 0x3000]
    assert all(chr(c).isspace() for c in white_space)


def test_safe_cuts_give_the_tokens_of_the_whole():
    rng = random.Random(7)
    alphabet = list("ab xyZ\n\n  \t'sdtmlvre12.,!?-") + ["\u00a0", "\u3000", "中", "é", "\r", "\x1c", "😀", "'s", "'ll", " \n"]
    cuts = 0
    for _ in range(600):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60)))
        whole = ENC.encode_ordinary(text)
        for p in range(1, len(text)):
            if is_safe_cut(text, p):
                cuts += 1
                assert ENC.encode_ordinary(text[:p]) + ENC.encode_ordinary(text[p:]) == whole, (text, p)
    assert cuts > 1000
    for text in (VERDICT[:4000], TANG[:3000]):  # every cut of real text, English and Chinese
        whole = ENC.encode_ordinary(text)
        found = [p for p in range(1, len(text)) if is_safe_cut(text, p)]
        assert len(found) > 30
        for p in found[::7]:
            assert ENC.encode_ordinary(text[:p]) + ENC.encode_ordinary(text[p:]) == whole


@pytest.mark.parametrize("piece_chars", [16, 40, 300])
def test_pieces_depend_on_the_text_alone_and_tokenize_as_the_whole(piece_chars):
    rng = random.Random(piece_chars)
    for text in (VERDICT[:5000], TANG[:2000], "x" * 500 + " y" * 10, " \n" * 50, ("ab" * 97 + "\n\n") * 30 + VERDICT[:900]):
        at_once = Piecer(piece_chars)
        pieces = [p for p, *_ in [*at_once.feed(text), *at_once.finish()]]
        dribbled, fed, i = Piecer(piece_chars), [], 0
        while i < len(text):
            k = rng.randint(1, 3 * piece_chars)
            fed += [p for p, *_ in dribbled.feed(text[i : i + k])]
            i += k
        fed += [p for p, *_ in dribbled.finish()]
        assert fed == pieces and "".join(pieces) == text
        assert sum((ENC.encode_ordinary(p) for p in pieces), []) == ENC.encode_ordinary(text)
        at = 0
        for piece in pieces[:-1]:  # the stated rule: the last cut within piece_chars, else the first one after
            rest = text[at:]
            within = [q for q in range(1, min(piece_chars, len(rest)) + 1) if is_safe_cut(rest, q)]
            assert is_safe_cut(rest, len(piece)) and len(piece) == (within[-1] if within else len(piece))
            assert within or not any(is_safe_cut(rest, q) for q in range(1, len(piece)))
            at += len(piece)
        assert len(pieces) > 1 or len(text) <= piece_chars or not any(is_safe_cut(text, q) for q in range(len(text)))


# --- what comes out ------------------------------------------------------------------------------------------
def test_documents_come_back_exactly_in_llmc_shards(corpus, tmp_path):
    specs, docs = corpus
    out = tmp_path / "out"
    result = run(specs, out, shard_tokens=700, val_share=0.1)
    val_docs, train_docs = split_by_rule(docs, share=0.1)
    assert len(val_docs) >= 2 and len(train_docs) > 10
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and "resume" not in manifest
    for split, expected in (("val", val_docs), ("train", train_docs)):
        tokens, shards = read_split(out, split)
        assert documents_of(tokens) == expected
        assert tokens == sum(([EOT_ID] + ENC.encode_ordinary(d) for d in expected), [])
        assert [count for _, count in shards[:-1]] == [700] * (len(shards) - 1) and 0 < shards[-1][1] <= 700
        listed = [e for e in manifest["shards"] if e["split"] == split]
        assert [(e["file"], e["tokens"]) for e in listed] == shards
        assert manifest["totals"][f"{split}_tokens"] == len(tokens)
        assert manifest["totals"][f"{split}_documents"] == len(expected)
    assert [e["split"] for e in manifest["shards"]][0] == "val"  # the validation shard first
    for e in manifest["shards"]:
        assert hashlib.sha256((out / e["file"]).read_bytes()).hexdigest() == e["sha256"]
        assert {s["path"] for s in e["sources"]} <= {s.path for s in find_sources(specs)}
    assert result.documents == len(docs) and result.notes == ["left out 1 empty document(s)"]
    assert os.stat(out / "manifest.json").st_mode & 0o044 == os.stat(out / "train_000000.bin").st_mode & 0o044


def test_blank_lines_split_documents(tmp_path):
    text = ("\n \n" + VERDICT[:9000].replace("\n\n", "\n\t \n\n") + "\r\n\r\nlast paragraph\r\nwithout an end")
    path = tmp_path / "p.txt"
    path.write_bytes(text.encode())
    expected, current = [], []
    for line in text.splitlines(keepends=True):
        if line.strip():
            current.append(line)
        elif current:
            expected.append("".join(current))
            current = []
    expected.append("".join(current))
    run([path], tmp_path / "out", split_on_blank_lines=True, val_tokens=0, shard_tokens=10_000, piece_chars=64)
    assert documents_of(read_split(tmp_path / "out", "train")[0]) == expected and len(expected) > 10
    assert read_split(tmp_path / "out", "val")[0] == []


def test_val_tokens_takes_the_first_documents(corpus, tmp_path):
    specs, docs = corpus
    run(specs, tmp_path / "out", val_tokens=1500, shard_tokens=100_000)
    val_docs, train_docs = split_by_rule(docs, val_tokens=1500)
    assert val_docs == docs[: len(val_docs)] and len(val_docs) >= 1
    assert documents_of(read_split(tmp_path / "out", "val")[0]) == val_docs
    assert documents_of(read_split(tmp_path / "out", "train")[0]) == train_docs


def test_output_depends_neither_on_processes_nor_on_piece_sizes(corpus, tmp_path):
    specs, _ = corpus
    run(specs, tmp_path / "ref", shard_tokens=900)
    run(specs, tmp_path / "small", shard_tokens=900, piece_chars=48, task_chars=150)
    run(specs, tmp_path / "two", shard_tokens=900, workers=2, piece_chars=200, task_chars=1000)
    assert tree(tmp_path / "ref") == tree(tmp_path / "small") == tree(tmp_path / "two")


def test_tokenizer_processes_keep_few_tasks_in_flight():
    """The bound on memory: the pool takes a new task only when fewer than 2 per process are out. And the
    processes never see Ctrl-C (one interrupted while it starts would print a traceback)."""
    pulled, seen = [0], []

    def tasks():
        for i in range(12):
            pulled[0] += 1
            yield [type("P", (), {"text": f"task {i} " * 50, "starts_document": i % 2 == 0})()]

    with TokenizerPool(2) as pool:
        for proc in pool.procs:  # Ctrl-C at a terminal never reaches them (a session of their own)
            assert os.getsid(proc.pid) == proc.pid != os.getsid(0)
        for i, (task, (lengths, tokens)) in enumerate(pool.map(tasks())):
            seen.append(pulled[0] - i)  # tasks taken but not yet handed back, this one included
            assert list(tokens) == [EOT_ID] * (i % 2 == 0) + ENC.encode_ordinary(task[0].text) and list(lengths) == [len(tokens)]
    assert max(seen) <= 4 and len(seen) == 12


# --- a run that was stopped ---------------------------------------------------------------------------------
def resume_corpus(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "verdict.txt").write_text(VERDICT, encoding="utf-8")
    with gzip.open(src / "tang.jsonl.gz", "wt", encoding="utf-8") as f:
        for poem in TANG[:20000].split("\n\n"):
            f.write(json.dumps({"text": poem}) + "\n")
    (src / "big.txt").write_text(VERDICT * 3, encoding="utf-8")  # one document of many pieces
    return [src / "verdict.txt", src / "tang.jsonl.gz", src / "big.txt"]


SMALL = {"piece_chars": 300, "task_chars": 2000, "save_every": 0.0}


class Crash(Exception):
    pass


@pytest.mark.parametrize("where, nth, after_progress", [
    ("replace", 2, False),  # the first save after the start (the first document still waits for its split)
    ("replace", 9, False),
    ("replace", 24, True),
    ("sha256", 1, False),  # the first shard closes while the first document is written
    ("sha256", 2, True),
    ("sha256", 4, True),
])  # fmt: skip
def test_a_run_crashed_at_each_step_of_a_save_continues_to_the_same_shards(tmp_path, monkeypatch, where, nth, after_progress):
    """A crash between the steps of a save (partial shards synced, manifest renamed into place, closed
    shards renamed; a shard hashed), then a second run: the same shards as a run never stopped."""
    data = resume_corpus(tmp_path)
    run(data, tmp_path / "ref", shard_tokens=3000, val_share=0.05)
    calls = [0]
    target = {"replace": "os.replace", "sha256": "npgpt.prepare.file_sha256"}[where]
    original = os.replace if where == "replace" else __import__("npgpt.prepare", fromlist=["x"]).file_sha256

    def crashing(*args):
        calls[0] += 1
        if calls[0] == nth:
            raise Crash(f"crash at {where} #{nth}")
        return original(*args)

    monkeypatch.setattr(target, crashing)
    with pytest.raises(Crash):
        run(data, tmp_path / "out", shard_tokens=3000, val_share=0.05, **SMALL)
    monkeypatch.undo()
    saved = sum(json.loads((tmp_path / "out" / "manifest.json").read_text())["totals"][f"{s}_tokens"] for s in ("val", "train"))
    result = run(data, tmp_path / "out", shard_tokens=3000, val_share=0.05, **SMALL)
    assert tree(tmp_path / "out") == tree(tmp_path / "ref")
    assert result.tokens_written == result.train_tokens + result.val_tokens - saved  # it went on from the save
    assert (saved > 0) == after_progress


def children(pid):
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def gone(pids, within=10.0):
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not any(Path(f"/proc/{p}").exists() and "Z" not in Path(f"/proc/{p}/stat").read_text().split()[2] for p in pids):
            return True
        time.sleep(0.05)
    return False


def saved_tokens(out) -> int:
    try:
        totals = json.loads((out / "manifest.json").read_text())["totals"]
    except (OSError, ValueError, KeyError):
        return 0
    return totals["train_tokens"] + totals["val_tokens"]


def test_sigkill_at_random_moments_gives_byte_identical_shards(tmp_path):
    """`prepare` killed with SIGKILL again and again (two tokenizer processes, saving after every task),
    started again each time: the shards and manifest are byte for byte those of an uninterrupted run,
    every shard visible between the kills is already the final one, and the tokenizer processes of a
    killed run end with it."""
    data = resume_corpus(tmp_path)
    ref, out = tmp_path / "ref", tmp_path / "out"
    run(data, ref, shard_tokens=2000, val_share=0.05)
    final = tree(ref)
    code = ("from npgpt.prepare import PrepareConfig, prepare; "
            f"prepare(PrepareConfig(data={[str(d) for d in data]!r}, out={str(out)!r}, shard_tokens=2000, val_share=0.05, "
            "workers=2, progress=False, piece_chars=300, task_chars=600, save_every=0.0))")  # fmt: skip
    rng = random.Random(29)
    kills, progress = 0, [0]
    while True:
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if kills < 4:
            if kills:  # the first kill lands in the start-up, the others once this run has saved progress of its own
                deadline = time.monotonic() + 60
                while saved_tokens(out) <= progress[-1] and proc.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.4) if not kills else rng.uniform(0.0, 0.03))
            workers = children(proc.pid)
            proc.send_signal(signal.SIGKILL)
        rc = proc.wait(timeout=120)
        if rc == 0:
            break
        assert rc == -signal.SIGKILL, proc.stderr.read()
        kills += 1
        assert gone(workers), "the tokenizer processes outlived the killed run"
        for name, content in (tree(out) if out.exists() else {}).items():
            if not name.startswith("."):
                assert name == "manifest.json" or content == final[name], name  # a visible shard is a whole one
        progress.append(saved_tokens(out))
    assert kills >= 3 and all(0 < a < b for a, b in zip(progress[2:], progress[3:])), progress  # each after new progress
    assert tree(out) == final


def test_ctrl_c_stops_at_once_in_one_line_and_the_run_continues(tmp_path):
    """Ctrl-C while the tokenizer processes start: exit 130, one line, no traceback from any process, the
    processes gone, and the same command finishes the run to the shards of one never stopped."""
    data = resume_corpus(tmp_path)
    out = tmp_path / "out"
    run(data, tmp_path / "ref", shard_tokens=2000)
    argv = [sys.executable, "-m", "npgpt", "prepare", "--data", *map(str, data), "--out", str(out), "--shard-tokens", "2000",
            "--workers", "2", "--no-progress"]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    deadline = time.monotonic() + 60
    while len(children(proc.pid)) < 2 and time.monotonic() < deadline:  # the tokenizer processes are starting
        time.sleep(0.01)
    workers = children(proc.pid)
    os.killpg(proc.pid, signal.SIGINT)  # as Ctrl-C in a terminal: to every process of the group
    t0 = time.monotonic()
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and time.monotonic() - t0 < 10, (proc.returncode, stderr)
    assert "Traceback" not in stderr and stderr.strip().splitlines() == ["npgpt prepare: interrupted"], stderr
    assert "run the same command again to continue" in stdout
    assert gone(workers)
    assert main(argv[3:]) == 0 and tree(out) == tree(tmp_path / "ref")


def test_a_finished_folder_is_left_alone_and_other_settings_are_refused(corpus, tmp_path, capsys):
    specs, _ = corpus
    out = tmp_path / "out"
    args = ["prepare", "--data", *map(str, specs), "--out", str(out), "--workers", "0", "--no-progress"]
    assert main(args + ["--shard-tokens", "5000"]) == 0
    before = tree(out)
    capsys.readouterr()
    assert main(args + ["--shard-tokens", "5000"]) == 0
    assert "already prepared" in capsys.readouterr().out and tree(out) == before
    assert main(args + ["--shard-tokens", "4000"]) == 2
    err = capsys.readouterr().err
    assert "--shard-tokens 5000" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert tree(out) == before
    assert main(args + ["--shard-tokens", "4000", "--overwrite"]) == 0
    assert json.loads((out / "manifest.json").read_text())["settings"]["shard_tokens"] == 4000
    assert not (out / "train_000001.bin").exists() or (out / "train_000001.bin").stat().st_size <= 1024 + 8000
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert main(["prepare", "--data", str(specs[0]), "--out", str(foreign), "--no-progress"]) == 2
    assert "not empty" in capsys.readouterr().err and (foreign / "notes.txt").read_text() == "mine"


# --- bad input -------------------------------------------------------------------------------------------------
def one_error(capsys, argv):
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("name, content, expected", [
    ("bad.txt", b"fine\nstill fine\nnot \xff fine\n", ["bad.txt: line 3: invalid UTF-8 at byte offset 20", "--errors replace"]),
    ("bad.txt.gz", gzip.compress(b"one\ntwo \xc3\x28\n"), ["bad.txt.gz: line 2: invalid UTF-8 at byte offset 8"]),
    ("bad.jsonl", b'{"text": "a"}\n[1, 2]\n', ["bad.jsonl: line 2: a JSON line must be an object", "is a list"]),
    ("bad.jsonl", b'{"text": "a"}\n\n{"body": "b"}\n', ["bad.jsonl: line 3: no field 'text'", "'body'", "--text-field"]),
    ("bad.jsonl", b'{"text": "a"}\n{"text": "b",\n', ["bad.jsonl: line 2: not valid JSON"]),
    ("bad.jsonl", b'{"text": 5}\n', ["bad.jsonl: line 1: field 'text' is int, not a string"]),
    ("bad.jsonl", b'{"text": "\\ud800 x"}\n', ["bad.jsonl: line 1: the text holds an unpaired surrogate"]),
    ("bad.jsonl", b'{"text": "invalid \xfe"}\n', ["bad.jsonl: line 1: invalid UTF-8"]),
    ("bad.txt.xz", b"not xz at all", ["bad.txt.xz: damaged xz data"]),
    ("empty.txt", b"", ["the inputs hold no text"]),
    ("empty.jsonl", b'{"text": ""}\n\n', ["the inputs hold no text", "--text-field"]),
])  # fmt: skip
def test_bad_input_is_one_line_naming_file_and_line(tmp_path, capsys, name, content, expected):
    (tmp_path / name).write_bytes(content)
    out = tmp_path / "out"
    line = one_error(capsys, ["prepare", "--data", str(tmp_path / name), "--out", str(out), "--workers", "0", "--no-progress"])
    for part in expected:
        assert part in line, line
    if "no text" in line:
        assert not out.exists()  # nothing left behind


def test_errors_replace_goes_on_and_says_what_it_did(tmp_path, capsys):
    (tmp_path / "a.txt").write_bytes(b"good text\nbad \xff byte\n")
    (tmp_path / "b.jsonl").write_bytes(b'{"text": "kept"}\n[1]\n{"body": "x"}\n{"text": "kept too"}\n')
    out = tmp_path / "out"
    argv = ["prepare", "--data", str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl"), "--out", str(out), "--workers", "0",
            "--no-progress", "--val-tokens", "0"]  # fmt: skip
    assert main(argv) == 2
    capsys.readouterr()
    assert main(argv + ["--errors", "replace"]) == 0  # the stopped run goes on
    said = capsys.readouterr().out
    fresh = [*argv[:5], str(tmp_path / "fresh"), *argv[6:], "--errors", "replace"]
    assert main(fresh) == 0 and tree(out) == tree(tmp_path / "fresh")
    assert "replaced invalid UTF-8 with U+FFFD in 1 place(s) (first: " in said and "a.txt: line 2, byte offset 14" in said
    assert "skipped 2 JSON line(s)" in said and "b.jsonl: line 2" in said
    assert documents_of(read_split(out, "train")[0]) == ["good text\nbad \ufffd byte\n", "kept", "kept too"]


def test_globs_and_folders(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    for name in ("b.txt", "a.txt", ".hidden.txt"):
        (tmp_path / "x" / name).write_text(name)
    sources = find_sources([str(tmp_path / "x" / "*.txt"), str(tmp_path / "x")])
    assert [Path(s.path).name for s in sources] == ["a.txt", "b.txt"]  # sorted, each once, no hidden files
    assert main(["prepare", "--data", str(tmp_path / "x"), "--out", str(tmp_path / "x" / "out"), "--workers", "0", "--no-progress"]) == 0
    (tmp_path / "x" / "out" / "notes.txt").write_text("inside the output")
    again = find_sources([str(tmp_path / "x" / "**"), str(tmp_path / "x")], exclude=tmp_path / "x" / "out")
    assert [Path(s.path).name for s in again] == ["a.txt", "b.txt"]  # never the output folder's files
    line = one_error(capsys, ["prepare", "--data", str(tmp_path / "x" / "*.jsonl"), "--out", str(tmp_path / "o")])
    assert "matches no file" in line and "--data" in line


def test_read_pieces_resumes_inside_a_document(tmp_path):
    """The Position after each piece starts reading at exactly the next piece (all three kinds of input)."""
    (tmp_path / "a.txt").write_text(VERDICT[:3000])
    (tmp_path / "p.txt").write_text(VERDICT[3000:7000])
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in VERDICT[7000:12000].split("\n\n")))
    for blank in (False, True):
        sources = find_sources([tmp_path / "a.txt", tmp_path / "p.txt", tmp_path / "c.jsonl"])
        pieces = list(read_pieces(sources, split_on_blank_lines=blank, piece_chars=100))
        assert len(pieces) > 60
        for i in range(0, len(pieces) - 1, 5):
            again = next(read_pieces(sources, pieces[i].after, split_on_blank_lines=blank, piece_chars=100))
            nxt = pieces[i + 1]
            assert (again.text, again.source, again.doc_line, again.starts_document) == (nxt.text, nxt.source, nxt.doc_line, nxt.starts_document)
