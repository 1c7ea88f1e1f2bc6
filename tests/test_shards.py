"""Reading token shards: llm.c's format (headers checked), nanoGPT's raw files, folders `npgpt prepare`
wrote; the window sampler's order, its resumption across shard and epoch boundaries, its split among
MPI ranks, and memory that does not grow with the corpus.

Files here are written by an independent writer made from the format's description (struct), and
read back by an independent reader, never through the module under test alone."""

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from conftest import write_llmc

from npgpt.prepare import PrepareConfig, prepare
from npgpt.shard_sampler import ShardWindows, WindowSampler, shard_batches
from npgpt.shards import ShardFile, data_kind, find_shards, open_shard, verify_prepared
from npgpt.tokenizer import EOT_ID, get_tokenizer

ASSETS = Path(__file__).resolve().parents[1] / "npgpt" / "assets"


def read_llmc(path):
    """llm.c's loader, from its description: check magic and version, the size against the count."""
    data = Path(path).read_bytes()
    magic, version, count = struct.unpack("<3i", data[:12])
    assert magic == 20240520 and version == 1 and len(data) == 1024 + 2 * count
    return list(struct.unpack(f"<{count}H", data[1024:]))


def make_shards(folder, sizes, seed=0, prefix="train"):
    rng = np.random.default_rng(seed)
    paths, tokens = [], []
    for i, n in enumerate(sizes):
        toks = rng.integers(0, 50257, n)
        paths.append(write_llmc(Path(folder) / f"{prefix}_{i:06d}.bin", toks))
        tokens.append(toks)
    return paths, tokens


# --- formats ---------------------------------------------------------------------------------------------------
def test_prepare_writes_what_an_independent_llmc_reader_reads(tmp_path):
    """Interop: prepare's shards, read with a reader written from llm.c's format description, give back
    <|endoftext|> + the document's tokens, document after document."""
    docs = [p for p in (ASSETS / "the-verdict.txt").read_text(encoding="utf-8").split("\n\n") if p.strip()][:40]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    prepare(PrepareConfig(data=[str(tmp_path / "docs.jsonl")], out=str(tmp_path / "out"), shard_tokens=1000,
                          val_tokens=0, workers=0, progress=False), say=lambda *a: None)  # fmt: skip
    enc = get_tokenizer()
    tokens = sum((read_llmc(p) for p in sorted((tmp_path / "out").glob("train_*.bin"))), [])
    assert tokens == sum(([EOT_ID] + enc.encode_ordinary(d) for d in docs), [])
    assert len(read_llmc(tmp_path / "out" / "train_000000.bin")) == 1000
    assert verify_prepared(tmp_path / "out") == []
    shards = find_shards(tmp_path / "out")
    assert shards.kind == "npgpt prepare" and shards.tokens("train") == len(tokens) and shards.val == []


def test_llmc_files_by_name_glob_and_folder(tmp_path):
    train = [write_llmc(tmp_path / f"fineweb_train_{i:06d}.bin", range(i * 100, i * 100 + 300)) for i in (1, 2)]
    val = write_llmc(tmp_path / "fineweb_val_000000.bin", range(50))
    for specs in ([str(tmp_path / "fineweb_train_*.bin"), str(val)], [str(tmp_path)]):
        found = find_shards(specs)
        assert [Path(s.path).name for s in found.train] == [p.name for p in train]
        assert [Path(s.path).name for s in found.val] == [val.name] and found.kind == "llm.c"
        assert list(found.train[1].tokens()) == list(range(200, 500))
    write_llmc(tmp_path / "tiny_shakespeare_val.bin", [1, 2, 3])
    write_llmc(tmp_path / "tiny_shakespeare_train.bin", [4, 5, 6])
    found = find_shards(str(tmp_path / "tiny_shakespeare_*.bin"))
    assert [Path(s.path).name for s in found.val] == ["tiny_shakespeare_val.bin"]
    assert [Path(s.path).name for s in found.train] == ["tiny_shakespeare_train.bin"]
    assert data_kind([str(tmp_path)]) == data_kind(["x/train_*.bin"]) == "shards" and data_kind(["a.txt"]) == "text"


@pytest.mark.parametrize("kw, expected", [
    ({"magic": 12345}, "does not start with llm.c's magic number 20240520"),
    ({"version": 2}, "version 2 (uint32 tokens"),
    ({"version": 7}, "header version 7"),
    ({"count": 99}, "its header says 99 tokens"),
])  # fmt: skip
def test_a_bad_llmc_header_is_a_clear_error(tmp_path, kw, expected):
    path = write_llmc(tmp_path / "train_000000.bin", range(10), **kw)
    with pytest.raises(ValueError, match="train_000000.bin") as e:
        find_shards([str(path)])
    assert expected in str(e.value)


def test_short_files_and_formats_mixed_up(tmp_path):
    (tmp_path / "train.bin").write_bytes(np.arange(100, dtype="<u2").tobytes())  # nanoGPT's raw file
    with pytest.raises(ValueError, match="shorter than llm.c's 1024-byte header.*--data-format nanogpt"):
        find_shards([str(tmp_path / "train.bin")])
    llmc = write_llmc(tmp_path / "x_train.bin", range(10))
    with pytest.raises(ValueError, match="starts with llm.c's header.*leave out --data-format nanogpt"):
        open_shard(llmc, "nanogpt")
    (tmp_path / "odd.bin").write_bytes(b"abc")
    with pytest.raises(ValueError, match="odd number"):
        open_shard(tmp_path / "odd.bin", "nanogpt")
    with pytest.raises(ValueError, match="no training shards"):
        find_shards([str(write_llmc(tmp_path / "only_val.bin", range(5)))])


def test_nanogpt_train_and_val_bin(tmp_path):
    rng = np.random.default_rng(3)
    train, val = rng.integers(0, 50257, 5000).astype(np.uint16), rng.integers(0, 50257, 700).astype(np.uint16)
    train.tofile(tmp_path / "train.bin")  # nanoGPT's prepare.py: np.array(ids, dtype=np.uint16).tofile(...)
    val.tofile(tmp_path / "val.bin")
    found = find_shards([str(tmp_path)], data_format="nanogpt")
    assert found.kind == "nanoGPT" and len(found.train) == len(found.val) == 1
    assert np.array_equal(found.train[0].tokens(), train) and np.array_equal(found.val[0].tokens(), val)
    windows = ShardWindows(found.train, context_length=64)
    x, y = windows.batch([0, 5])
    assert np.array_equal(x[1], train[320:384]) and np.array_equal(y[1], train[321:385])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty: the folder holds no train.bin / val.bin"):
        find_shards([str(tmp_path / "empty")], data_format="nanogpt")


def test_a_prepared_folder_is_checked_against_its_manifest(tmp_path):
    (tmp_path / "a.txt").write_text("some text " * 200)
    out = tmp_path / "out"
    prepare(PrepareConfig(data=[str(tmp_path / "a.txt")], out=str(out), workers=0, progress=False), say=lambda *a: None)
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    with pytest.raises(ValueError, match="not complete.*run the same npgpt prepare command again"):
        find_shards(out)
    manifest["shards"][0]["tokens"] += 1
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="but the manifest says"):
        find_shards(out)
    data = bytearray((out / "train_000000.bin").read_bytes())
    data[-1] ^= 1
    (out / "train_000000.bin").write_bytes(bytes(data))
    assert "sha256" in verify_prepared(out)[0]


def test_a_token_beyond_the_vocabulary_is_refused(tmp_path):
    path = write_llmc(tmp_path / "train_000000.bin", [1, 2, 60000, 3, 4])
    with pytest.raises(ValueError, match="token id 60000, beyond GPT-2's vocabulary"):
        ShardWindows([open_shard(path)], context_length=3).batch([0])


# --- windows and the sampler -------------------------------------------------------------------------------------
def test_windows_lie_inside_shards_with_the_right_tokens(tmp_path):
    paths, tokens = make_shards(tmp_path, [100, 33, 16, 250])
    w = ShardWindows([open_shard(p) for p in paths], context_length=16, stride=8)
    counts = [(n - 17) // 8 + 1 if n > 16 else 0 for n in (100, 33, 16, 250)]
    assert len(w) == sum(counts) and list(w.counts) == counts
    expected = [t[j * 8 : j * 8 + 17] for t, c in zip(tokens, counts) for j in range(c)]
    x, y = w.batch(np.arange(len(w)))
    assert np.array_equal(x, np.array(expected)[:, :-1]) and np.array_equal(y, np.array(expected)[:, 1:])
    assert x.dtype == np.int64 and x.shape == (len(w), 16)
    assert sum(len(bx) for bx, _ in w.ordered_batches(7)) == len(w)
    with pytest.raises(ValueError, match="no window of context_length \\+ 1 = 300 tokens"):
        ShardWindows([open_shard(p) for p in paths], context_length=299)


@pytest.fixture
def sampler_shards(tmp_path):
    paths, _ = make_shards(tmp_path, [400, 130, 61, 300, 90])
    return [open_shard(p) for p in paths]


def draw(sampler, n):
    return [sampler.next_indices() for _ in range(n)]


def test_each_epoch_visits_every_window_once_in_a_seeded_order(sampler_shards):
    w = ShardWindows(sampler_shards, context_length=12)
    s = WindowSampler(w, batch_size=5, seed=4)
    seen = np.concatenate(draw(s, len(w) // 5 * 3))  # three epochs (the stream runs on across them)
    per_epoch = [seen[i * len(w) : (i + 1) * len(w)] for i in range(len(seen) // len(w))]
    for epoch in per_epoch:
        assert sorted(epoch) == list(range(len(w)))
        shard_of = np.searchsorted(w.first, epoch, side="right") - 1
        assert (np.diff(shard_of) != 0).sum() == len(sampler_shards) - 1  # one shard after another
    assert not np.array_equal(per_epoch[0], per_epoch[1])
    again = WindowSampler(w, batch_size=5, seed=4)
    assert np.array_equal(np.concatenate(draw(again, 10)), seen[:50])
    other = WindowSampler(w, batch_size=5, seed=5)
    assert not np.array_equal(np.concatenate(draw(other, 10)), seen[:50])
    plain = WindowSampler(w, batch_size=5, shuffle=False)
    assert list(np.concatenate(draw(plain, 4))) == list(range(20))


@pytest.mark.parametrize("stop", [1, 7, 13, 29, 60])
def test_restore_continues_exactly_across_shard_and_epoch_boundaries(sampler_shards, stop):
    w = ShardWindows(sampler_shards, context_length=12)
    straight = WindowSampler(w, batch_size=6, seed=11)
    expected = [straight.next() for _ in range(70)]  # ~5 epochs: many shard and epoch boundaries
    first = WindowSampler(w, batch_size=6, seed=11)
    for _ in range(stop):
        first.next()
    state = json.loads(json.dumps(first.state()))  # as a checkpoint stores it
    assert len(json.dumps(state)) < 300
    resumed = WindowSampler(ShardWindows(sampler_shards, context_length=12), batch_size=6, seed=0)
    resumed.restore(state)
    for x_y in expected[stop:]:
        x, y = resumed.next()
        assert np.array_equal(x, x_y[0]) and np.array_equal(y, x_y[1])


def test_restore_refuses_other_data_or_batch(sampler_shards):
    w = ShardWindows(sampler_shards, context_length=12)
    state = WindowSampler(w, batch_size=6).state()
    with pytest.raises(ValueError, match="batches of 6.*same --data"):
        WindowSampler(w, batch_size=4).restore(state)
    with pytest.raises(ValueError, match="same --data"):
        WindowSampler(ShardWindows(sampler_shards[:3], context_length=12), batch_size=6).restore(state)
    with pytest.raises(ValueError, match="not one of token shards"):
        WindowSampler(w, batch_size=6).restore({"epoch": 0, "cursor": 3})


def test_each_rank_reads_its_own_rows_of_the_global_batch(sampler_shards, monkeypatch):
    w = ShardWindows(sampler_shards, context_length=12)
    whole = WindowSampler(w, batch_size=8, seed=2)
    expected = [whole.next() for _ in range(12)]
    reads = []
    original = ShardFile.read

    def counting(self, starts, length):
        reads.append(len(starts))
        return original(self, starts, length)

    monkeypatch.setattr(ShardFile, "read", counting)
    ranks = [WindowSampler(w, batch_size=8, seed=2, rank=r, world_size=4) for r in range(4)]
    for step in range(12):
        reads.clear()
        parts = [r.next() for r in ranks]
        assert sum(reads) == 8  # each rank read its 2 windows, no more
        assert np.array_equal(np.concatenate([p[0] for p in parts]), expected[step][0])
    assert all(r.state() == whole.state() for r in ranks)  # one global position
    with pytest.raises(ValueError, match="split evenly among 3 ranks"):
        WindowSampler(w, batch_size=8, rank=0, world_size=3)


def rss_kb():
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0])


def test_resident_memory_does_not_grow_with_the_corpus(tmp_path):
    """24M tokens (48 MB) in 6 shards, all of it read once: the process's resident memory (file pages
    included) grows by far less than what was read, since each read unmaps its pages."""
    rng = np.random.default_rng(0)
    shards = []
    for i in range(6):
        path = tmp_path / f"train_{i:06d}.bin"
        with open(path, "wb") as f:
            f.write(struct.pack("<256i", 20240520, 1, 4_000_000, *([0] * 253)))
            rng.integers(0, 50257, 4_000_000, dtype=np.uint16).astype("<u2").tofile(f)
        shards.append(open_shard(path))
    sampler = WindowSampler(ShardWindows(shards, context_length=1024), batch_size=64, seed=0)
    sampler.next()
    before = rss_kb()
    for _ in range(370):  # 370 x 64 windows: every window of every shard once (an epoch), 48 MB read
        sampler.next()
    grown = rss_kb() - before
    assert sampler.epoch == 1
    assert grown < 6_000, f"resident memory grew by {grown} kB"


def test_shard_batches_builds_what_a_run_needs(tmp_path):
    make_shards(tmp_path, [500, 300])
    make_shards(tmp_path, [200], seed=1, prefix="val")
    sampler, val, shards = shard_batches([str(tmp_path)], context_length=32, batch_size=4, seed=3, rank=1, world_size=2)
    x, y = sampler.next()
    assert x.shape == (2, 32) and len(val) == (200 - 33) // 32 + 1 and len(shards.train) == 2
    assert sampler.state()["window"] == 4  # the global position: 4 windows of the first shard taken
    (tmp_path / "val_000000.bin").unlink()
    assert shard_batches([str(tmp_path)], 32, 4)[1] is None
