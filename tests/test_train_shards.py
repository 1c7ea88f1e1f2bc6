"""`npgpt train --data` on token shards: a folder `npgpt prepare` wrote, llm.c's `.bin` files, nanoGPT's
train.bin / val.bin. The batches a run trains on are the windows of the sampler's documented order, read
back here with a reader of our own; a run resumed across a shard boundary ends bit for bit as an
uninterrupted one; the validation loss is the model's loss on the validation files' windows; memory does
not grow with the corpus. The MPI side (each rank reads its own rows) is in test_distributed.py, the
one-line refusals of bad data in test_bad_inputs.py."""

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import write_llmc

import npgpt
from npgpt.cli import main
from npgpt.prepare import PrepareConfig, prepare
from npgpt.shards import ShardFile
from npgpt.train import TrainConfig, train

ASSETS = Path(__file__).resolve().parents[1] / "npgpt" / "assets"
T = 16
TINY = dict(preset="nano", emb_dim=16, n_heads=2, n_layers=1, context_length=T, batch_size=4, progress=False,
            sample_tokens=2, eval_interval=100)  # fmt: skip
TINY_ARGS = ["--preset", "nano", "--emb-dim", "16", "--n-heads", "2", "--n-layers", "1", "--context-length", str(T),
             "--no-progress", "--sample-tokens", "2"]  # fmt: skip


def read_tokens(path, header=True):
    """A shard's tokens, read from the format's description (llm.c: 256 int32 of header; nanoGPT: none)."""
    data = Path(path).read_bytes()
    if header:
        magic, version, count = struct.unpack("<3i", data[:12])
        assert (magic, version, len(data)) == (20240520, 1, 1024 + 2 * count)
        data = data[1024:]
    return np.frombuffer(data, dtype="<u2").astype(np.int64)


def expected_batches(shard_tokens, batch_size, seed, n_batches, stride=T):
    """The batches of the order docs/data.md states: epoch e takes the shards in the order
    default_rng([seed, e]).permutation(n_shards), and shard s's windows (the window j covers its tokens
    j*stride .. j*stride + T) in the order default_rng([seed, e, s]).permutation(its windows); a batch is
    the next batch_size windows of that stream."""
    stream, epoch = [], 0
    while len(stream) < n_batches * batch_size:
        for s in np.random.default_rng([seed, epoch]).permutation(len(shard_tokens)):
            toks = shard_tokens[s]
            count = (len(toks) - T - 1) // stride + 1 if len(toks) > T else 0
            for j in np.random.default_rng([seed, epoch, s]).permutation(count):
                stream.append(toks[j * stride : j * stride + T + 1])
        epoch += 1
    w = np.array(stream[: n_batches * batch_size]).reshape(n_batches, batch_size, T + 1)
    return [(b[:, :-1], b[:, 1:]) for b in w]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The bundled story, a document per paragraph, prepared into 500-token shards: about nine training
    shards of 31 windows each, and a validation shard."""
    root = tmp_path_factory.mktemp("shard-corpus")
    prepare(PrepareConfig(data=[str(ASSETS / "the-verdict.txt")], out=str(root / "corpus"), split_on_blank_lines=True,
                          shard_tokens=500, val_tokens=600, workers=0, progress=False), say=lambda *a: None)  # fmt: skip
    return root / "corpus"


def train_shards(corpus):
    return [read_tokens(p) for p in sorted(corpus.glob("train_*.bin"))]


def record_batches(monkeypatch):
    """The (x, y) of every micro-batch the updater is given, as numpy arrays."""
    from npgpt.update import Updater

    seen, original = [], Updater.__call__

    def recording(self, micro_batches, **kw):
        seen.extend((np.array(x), np.array(y)) for x, y, _ in micro_batches)
        return original(self, micro_batches, **kw)

    monkeypatch.setattr(Updater, "__call__", recording)
    return seen


def state(run, step):
    return json.loads((run / "checkpoints" / f"step-{step:08d}" / "trainer_state.json").read_text())


def test_a_prepared_folder_trains_on_the_windows_of_the_seeded_order(corpus, tmp_path, monkeypatch):
    seen = record_batches(monkeypatch)
    r = train(TrainConfig(**TINY, data=[str(corpus)], max_steps=12, grad_accum=2, seed=7, out_dir=str(tmp_path / "run")))
    shards = train_shards(corpus)
    assert len(shards) >= 8 and r.steps == 12 and r.val_loss is not None
    expected = expected_batches(shards, 4, seed=7, n_batches=24)  # 12 steps of 2 micro-batches
    assert len(seen) == 24
    for (x, y), (ex, ey) in zip(seen, expected):
        assert np.array_equal(x, ex) and np.array_equal(y, ey)
    saved = state(tmp_path / "run", 12)["data"]  # the sampler's position, in the checkpoint
    assert saved["kind"] == "shard windows" and saved["batch_size"] == 4 and saved["seed"] == 7
    assert (saved["epoch"], saved["shard"]) != (0, 0)  # 96 windows: past the first shards


def test_a_run_resumed_across_a_shard_boundary_ends_bit_for_bit_as_an_uninterrupted_one(corpus, tmp_path):
    """14 steps of 4 windows straight, against 5 steps, a stop, and a resume to 14: the checkpoint of step
    5 stands inside a shard (31 windows each, but the last), and the resumed run crosses into the next."""
    kw = dict(TINY, data=[str(corpus)], drop_rate=0.1, seed=3)
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(TrainConfig(**kw, max_steps=14, out_dir=str(straight)))
    train(TrainConfig(**kw, max_steps=14, checkpoint_interval=5, out_dir=str(split)))
    at5, at14 = state(split, 5)["data"], state(split, 14)["data"]
    assert at5["epoch"] == at14["epoch"] == 0 and at5["window"] > 0
    assert at14["shard"] > at5["shard"]  # a shard boundary lies between the two
    for later in ("step-00000010", "step-00000014"):  # as if killed after step 5
        shutil.rmtree(split / "checkpoints" / later)
    r = train(TrainConfig(**kw, max_steps=14, out_dir=str(split), resume=True))
    assert r.steps == 14 and state(split, 14)["data"] == state(straight, 14)["data"]
    a, b = npgpt.load_pretrained(straight), npgpt.load_pretrained(split)
    assert all(np.array_equal(a.params[k], b.params[k]) for k in a.params)

    def losses(run):
        return [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                if r["kind"] == "step"]  # fmt: skip

    assert losses(straight) == losses(split) and len(losses(split)) == 14


def model_loss(run, x, y) -> float:
    model = npgpt.load_pretrained(run)
    return float(model.forward(x, y, training=False)[1])


@pytest.mark.parametrize("fmt", ["llm.c", "nanoGPT"])
def test_llmc_and_nanogpt_files_train_and_evaluate_on_their_validation_file(fmt, tmp_path, capsys):
    """llm.c's shards by a quoted glob plus their val file, nanoGPT's folder with --data-format nanogpt.
    The validation loss is the final model's mean loss on the first 20 batches of the validation
    file's windows (read here with our own reader), not on all 62 of its windows."""
    rng = np.random.default_rng(5)
    d = tmp_path / "data"
    d.mkdir()
    train_toks = [rng.integers(0, 1000, n) for n in (700, 450, 900)]
    val_toks = rng.integers(0, 1000, 1000)
    if fmt == "llm.c":
        for i, toks in enumerate(train_toks):
            write_llmc(d / f"fineweb_train_{i + 1:06d}.bin", toks)
        write_llmc(d / "fineweb_val_000000.bin", val_toks)
        data = [str(d / "fineweb_train_*.bin"), str(d / "fineweb_val_000000.bin")]
        train_toks = [read_tokens(p) for p in sorted(d.glob("fineweb_train_*.bin"))]
        val = read_tokens(d / "fineweb_val_000000.bin")
    else:
        train_toks = [np.concatenate(train_toks)]
        train_toks[0].astype("<u2").tofile(d / "train.bin")  # nanoGPT's prepare.py: np.array(ids, np.uint16).tofile
        val_toks.astype("<u2").tofile(d / "val.bin")
        data = [str(d), "--data-format", "nanogpt"]
        val = read_tokens(d / "val.bin", header=False)
    out = tmp_path / "run"
    assert main(["train", *TINY_ARGS, "--batch-size", "2", "--max-steps", "6", "--eval-interval", "3", "--data", *data,
                 "--out-dir", str(out)]) == 0  # fmt: skip
    banner = capsys.readouterr().out.splitlines()[0]
    assert f"({fmt}, {len(train_toks) + 1} shards, read by memory map): {sum(map(len, train_toks)):,} train tokens, 1,000 val" in banner
    windows = np.lib.stride_tricks.sliding_window_view(val, T + 1)[::T][:40]  # 20 batches of 2
    assert len(np.lib.stride_tricks.sliding_window_view(val, T + 1)[::T]) == 62
    expected = model_loss(out, windows[:, :-1], windows[:, 1:])
    assert json.loads((out / "summary.json").read_text())["val_loss"] == pytest.approx(expected, rel=1e-5)


def test_epochs_are_passes_over_the_training_windows(corpus, tmp_path, capsys, monkeypatch):
    """--epochs 2: 2 x floor(windows / B) batches, each epoch every window of the shards once (the few left
    over at an epoch's end open the next one); --dry-run says so without reading a token."""
    windows = sum((len(t) - T - 1) // T + 1 for t in train_shards(corpus))
    per_epoch = windows // 16
    args = ["train", *TINY_ARGS, "--data", str(corpus), "--batch-size", "16", "--epochs", "2"]
    original = ShardFile.read
    monkeypatch.setattr(ShardFile, "read", lambda *a: pytest.fail("--dry-run read tokens"))
    assert main([*args, "--dry-run", "--out-dir", str(tmp_path / "dry")]) == 0
    report = capsys.readouterr().out
    assert f"{windows:,} train windows: an epoch is {per_epoch:,} steps of 16 x 1 x {T} tokens; this run: {2 * per_epoch:,} steps" in report
    n_val = sum((len(read_tokens(v)) - T - 1) // T + 1 for v in corpus.glob("val_*.bin"))
    assert f"each evaluation on {n_val} of the {n_val} validation windows" in report and n_val < 20 * 16
    assert not (tmp_path / "dry").exists()
    monkeypatch.setattr(ShardFile, "read", original)
    seen = record_batches(monkeypatch)
    assert main([*args, "--eval-interval", "1000", "--out-dir", str(tmp_path / "run")]) == 0
    assert len(seen) == 2 * per_epoch
    first = np.concatenate([x for x, _ in seen[:per_epoch]])
    assert len({row.tobytes() for row in first}) == per_epoch * 16  # one epoch: distinct windows, none twice


def test_a_checkpoint_resumes_only_on_the_kind_of_data_it_was_trained_on(corpus, tmp_path, capsys):
    shards, text = tmp_path / "shards", tmp_path / "text"
    assert main(["train", *TINY_ARGS, "--data", str(corpus), "--max-steps", "2", "--out-dir", str(shards)]) == 0
    assert main(["train", *TINY_ARGS, "--max-steps", "2", "--out-dir", str(text)]) == 0
    capsys.readouterr()
    assert main(["train", *TINY_ARGS, "--max-steps", "4", "--out-dir", str(shards), "--resume"]) == 2
    assert "trained on token shards, and --data names text files" in capsys.readouterr().err
    assert main(["train", *TINY_ARGS, "--data", str(corpus), "--max-steps", "4", "--out-dir", str(text), "--resume"]) == 2
    assert "not one of token shards; resume with the --data the run started with" in capsys.readouterr().err


def test_train_ratio_one_trains_without_validation(corpus, tmp_path):
    r = train(TrainConfig(**TINY, data=[str(corpus)], train_ratio=1.0, max_steps=2, out_dir=str(tmp_path / "run")))
    assert r.val_loss is None and r.steps == 2


PEAK = """
import json, sys
import npgpt.train
from npgpt.metrics import peak_rss_mb
plot, peak = npgpt.train.plot_losses, {}

def peak_then_plot(*args, **kw):  # the training's peak, before the plot of the end (matplotlib) adds its own
    peak["mb"] = peak_rss_mb()
    return plot(*args, **kw)

npgpt.train.plot_losses = peak_then_plot
npgpt.train.train(npgpt.train.TrainConfig(data=[sys.argv[1]], preset="nano", emb_dim=16, n_heads=2, n_layers=1,
                  context_length=16, batch_size=4, max_steps=3, eval_interval=2, eval_train_batches=2, progress=False,
                  sample_tokens=1, out_dir=sys.argv[2]))
print(json.dumps(peak))
"""


def test_peak_memory_does_not_grow_with_the_corpus(tmp_path):
    """The same short run on 2M and on 32M training tokens (4 MB and 64 MB of shards; --eval-train-batches
    on, whose windows are drawn from all of them): the peak resident memory differs by far less than the
    corpora do: measured 0.004 MB apart. (Drawing the train-eval windows from a permutation of all 2M
    windows of the larger one put them 13 MB apart.)"""
    rng = np.random.default_rng(0)
    peaks = {}
    for name, n_shards in (("small", 1), ("large", 16)):
        folder = tmp_path / name
        folder.mkdir()
        for i in range(n_shards):
            write_llmc(folder / f"x_train_{i:06d}.bin", rng.integers(0, 50257, 2_000_000, dtype=np.uint16))
        write_llmc(folder / "x_val_000000.bin", rng.integers(0, 50257, 4000, dtype=np.uint16))
        env = {**os.environ, "NPGPT_DEVICE": "cpu"}
        proc = subprocess.run([sys.executable, "-c", PEAK, str(folder), str(tmp_path / f"run-{name}")], capture_output=True,
                              text=True, env=env, timeout=300)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        peaks[name] = json.loads(proc.stdout.strip().splitlines()[-1])["mb"]
    assert abs(peaks["large"] - peaks["small"]) < 8, peaks  # the corpora differ by 60 MB


def load_prepare_bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location("prepare_bench", ASSETS.parents[1] / "benchmarks" / "prepare_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_benchmark_times_the_data_inside_the_training_loop(corpus):
    """benchmarks/prepare_bench.py's train_data_wait on a small corpus: one timed read per step (the first
    left out), shorter than the step it belongs to."""
    w = load_prepare_bench().train_data_wait(corpus, 4, T, 4, preset="nano", emb_dim=16, n_heads=2, n_layers=1)
    assert w["steps"] == 4 and w["parameters"] == npgpt.GPT(npgpt.GPTConfig.from_preset(
        "nano", emb_dim=16, n_heads=2, n_layers=1, context_length=T)).num_params()  # fmt: skip
    assert 0 < w["wait_median_ms"] <= w["wait_max_ms"] and 0 < w["wait_share"] < 1


def test_benchmarks_md_quotes_the_training_figures_it_comes_from():
    figures = json.loads((ASSETS.parents[1] / "docs" / "train_shards_bench.json").read_text())
    text = " ".join((ASSETS.parents[1] / "docs" / "benchmarks.md").read_text(encoding="utf-8").split())
    big, small = figures["training"]["wait_in_loop"]
    assert (f"{big['wait_median_ms']:.1f} ms (max {big['wait_max_ms']:.1f} ms) per step of {big['step_median_ms'] / 1e3:.1f} s: "
            f"{100 * big['wait_share']:.3f}% of the step") in text  # fmt: skip
    assert (f"{small['wait_median_ms']:.1f} ms (max {small['wait_max_ms']:.1f} ms) per step of "
            f"{small['step_median_ms'] / 1e3:.1f} s: {100 * small['wait_share']:.2f}%") in text  # fmt: skip
    rss = figures["training"]["rss"]
    at = {k: round(v) for k, v in rss["rss_mb_at_step"].items()}
    assert f"{at['1']} MB at step 1, {at['100']} MB at steps 100, 200, 300 and 399" in text and len(set(at.values())) <= 2
    assert f"{rss['rss_min_mb']:.0f}-{rss['rss_max_mb']:.0f} MB from the first step to the last" in text
