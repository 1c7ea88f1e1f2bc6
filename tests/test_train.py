"""End-to-end training on the bundled data with a tiny model (seconds), through the API and the CLI."""

import json

import numpy as np
import pytest

import npgpt
from npgpt.checkpoint import verify_manifest
from npgpt.cli import main
from npgpt.safetensors_io import load_safetensors
from npgpt.checkpoint import latest_checkpoint
from npgpt.train import TrainConfig, train

TINY = dict(preset="nano", emb_dim=32, n_heads=2, n_layers=1, context_length=32, batch_size=2,
            progress=False, sample_tokens=6)  # fmt: skip
TINY_ARGS = ["--preset", "nano", "--emb-dim", "32", "--n-heads", "2", "--n-layers", "1", "--context-length", "32",
             "--batch-size", "2", "--no-progress", "--sample-tokens", "6"]  # fmt: skip


def test_training_lowers_the_loss_and_writes_everything(tmp_path):
    out = tmp_path / "run"
    r = train(TrainConfig(**TINY, max_steps=30, lr=1e-2, eval_interval=10, out_dir=str(out)))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [rec for rec in records if rec["kind"] == "step"]
    evals = [rec for rec in records if rec["kind"] == "eval"]
    assert len(steps) == 30 and [e["step"] for e in evals] == [10, 20, 30]
    assert steps[0]["loss"] > 10.0  # ~ln(50257) = 10.8 at initialisation
    assert evals[-1]["train_loss"] < steps[0]["loss"] - 2.0  # it learned something
    assert evals[-1]["val_loss"] < steps[0]["loss"] - 2.0
    assert all(set(s) >= {"loss", "lr", "grad_norm", "tokens_per_s"} for s in steps)
    assert r.steps == 30 and r.tokens_seen == 30 * 2 * 32 and r.val_loss == evals[-1]["val_loss"]
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "summary.json").read_text())["steps"] == 30
    ck = latest_checkpoint(out)
    assert ck.name == "step-00000030" and verify_manifest(ck) is None
    for f in ("model.safetensors", "config.json", "optimizer.safetensors", "trainer_state.json", "manifest.json"):
        assert (ck / f).is_file()
    assert isinstance(r.sample, str) and len(r.sample) > 0


def test_checkpoint_loads_back_into_the_same_model(tmp_path):
    out = tmp_path / "run"
    train(TrainConfig(**TINY, max_steps=3, out_dir=str(out)))
    model = npgpt.load_pretrained(out)
    saved = load_safetensors(latest_checkpoint(out) / "model.safetensors")
    assert set(model.params) <= set(saved)
    for k, v in model.params.items():
        assert np.array_equal(v, saved[k])
    assert model.config.emb_dim == 32 and model.config.n_layers == 1


@pytest.mark.parametrize("engine", ["fast", "reference"])
def test_resumed_run_equals_straight_run(tmp_path, engine):
    """8 steps straight versus 4 steps, stop, resume to 8: identical losses and identical weights."""
    kw = dict(TINY, drop_rate=0.1, eval_interval=100, engine=engine)
    straight = tmp_path / "straight"
    train(TrainConfig(**kw, max_steps=8, out_dir=str(straight)))
    split = tmp_path / "split"
    train(TrainConfig(**kw, max_steps=8, out_dir=str(split), checkpoint_interval=4))
    # throw away the later checkpoint as if the run had been killed after step 4 (the metrics of
    # steps 5-8 stay in metrics.jsonl; resuming must drop them)
    import shutil

    shutil.rmtree(split / "checkpoints" / "step-00000008")
    train(TrainConfig(**kw, max_steps=8, out_dir=str(split), resume=True))
    a = npgpt.load_pretrained(straight)
    b = npgpt.load_pretrained(split)
    for k in a.params:
        assert np.array_equal(a.params[k], b.params[k]), k
    def losses(run):
        records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"]) for r in records if r["kind"] == "step"]

    assert losses(straight) == losses(split) and len(losses(split)) == 8


@pytest.mark.parametrize("engine", ["fast", "reference"])
def test_gradient_accumulation_equals_one_big_batch(tmp_path, engine):
    """--batch-size 2 --grad-accum 2 sees the same four windows per step as --batch-size 4 (the shuffled
    order does not depend on the batch size), so without dropout, in float64, the runs are the same."""
    kw = dict(TINY, drop_rate=0.0, dtype="float64", max_steps=4, eval_interval=100, engine=engine)
    big = train(TrainConfig(**{**kw, "batch_size": 4}, out_dir=str(tmp_path / "big")))
    acc = train(TrainConfig(**{**kw, "batch_size": 2}, grad_accum=2, out_dir=str(tmp_path / "acc")))
    assert acc.tokens_seen == big.tokens_seen == 4 * 4 * 32
    steps = lambda run: [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                         if r["kind"] == "step"]  # noqa: E731
    np.testing.assert_allclose(steps(tmp_path / "acc"), steps(tmp_path / "big"), rtol=1e-12)
    a, b = (npgpt.load_pretrained(tmp_path / run, dtype=np.float64) for run in ("big", "acc"))
    for k in a.params:
        np.testing.assert_allclose(b.params[k], a.params[k], rtol=1e-9, atol=1e-12, err_msg=k)


def test_cli_train_then_generate(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY_ARGS, "--max-steps", "4", "--eval-interval", "2", "--out-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Done: 4 steps" in printed and "val loss" in printed and "sample:" in printed
    assert main(["generate", "--checkpoint", str(out), "--prompt", "Every effort moves you", "--max-new-tokens", "5"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("Every effort moves you") and len(text.strip()) > len("Every effort moves you")


def test_generate_streams_chinese_and_samples(tmp_path, capsys):
    out = tmp_path / "tang"
    assert main(["train", *TINY_ARGS, "--data", "tang300", "--max-steps", "3", "--out-dir", str(out),
                 "--sample-prompt", "床前明月光"]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(out), "--prompt", "床前", "--max-new-tokens", "8",
                 "--temperature", "0.9", "--top-k", "50", "--seed", "1", "--num-samples", "2"]) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert text.count("床前") == 2 and "--- sample 2 ---" in text


def test_too_little_data_is_a_one_line_error(tmp_path, capsys):
    f = tmp_path / "tiny.txt"
    f.write_text("Just a few words of text here.", encoding="utf-8")
    assert main(["train", *TINY_ARGS, "--data", str(f), "--out-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "split has" in err and "--context-length" in err and "Traceback" not in err


def test_invalid_utf8_data_is_a_one_line_error(tmp_path, capsys):
    f = tmp_path / "latin1.txt"
    f.write_bytes("café".encode("latin-1") * 100)
    assert main(["train", *TINY_ARGS, "--data", str(f), "--out-dir", str(tmp_path / "r")]) == 2
    assert "invalid UTF-8 at byte offset 3" in capsys.readouterr().err


def test_gradient_accumulation_equals_the_big_batch(tmp_path):
    """2 micro-batches of 2 give the gradient of the batch of 4 (the loss is a mean), so one step agrees."""
    from npgpt.data import TokenWindows, bundled_path, load_token_ids

    model = npgpt.GPT(npgpt.GPTConfig(vocab_size=50257, context_length=16, emb_dim=16, n_heads=2, n_layers=1, drop_rate=0.0),
                      dtype=np.float64)  # fmt: skip
    ids = load_token_ids(bundled_path("the-verdict"))[:400]
    x, y = TokenWindows(ids, 16).batch(np.arange(4))
    _, _, c = model.forward(x, y)
    big = model.backward(c)
    acc = None
    for part in (slice(0, 2), slice(2, 4)):
        _, _, c = model.forward(x[part], y[part])
        g = model.backward(c, dloss=0.5)
        acc = g if acc is None else {k: acc[k] + g[k] for k in acc}
    for k in big:
        np.testing.assert_allclose(acc[k], big[k], rtol=1e-10, atol=1e-14)


def test_an_earlier_run_is_never_overwritten_silently(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", *TINY_ARGS, "--max-steps", "2", "--out-dir", str(out)]
    assert main(args) == 0
    assert main(args) == 2
    assert "--resume" in capsys.readouterr().err and (out / "checkpoints" / "step-00000002").is_dir()
    assert main(args + ["--overwrite", "--max-steps", "1"]) == 0
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000001"]


def test_fine_tune_from_a_hugging_face_directory(tmp_path, capsys):
    from test_pretrained import TINY_HF, write_hf_dir

    from npgpt.model import param_shapes

    hf_cfg = {**TINY_HF, "vocab_size": 50257, "n_positions": 32, "n_ctx": 32}
    shapes = param_shapes(npgpt.GPTConfig.from_hf_config(hf_cfg))
    rng = np.random.default_rng(0)
    params = {k: (0.02 * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}
    src = write_hf_dir(tmp_path / "gpt2-like", params, config=hf_cfg)
    out = tmp_path / "ft"
    args = ["train", "--init-from", str(src), "--context-length", "16", "--batch-size", "2", "--max-steps", "2",
            "--no-progress", "--sample-tokens", "3", "--out-dir", str(out)]  # fmt: skip
    assert main(args) == 0
    tuned = npgpt.load_pretrained(out)
    assert tuned.config.qkv_bias and tuned.config.context_length == 32 and tuned.config.emb_dim == 16
    moved = [k for k in params if not np.array_equal(tuned.params[k], params[k])]
    assert len(moved) == len(params)  # every tensor was trained
    assert main(["generate", "--checkpoint", str(src), "--max-new-tokens", "3"]) == 0  # a HF directory generates too
    capsys.readouterr()
    assert main(args[:1] + ["--emb-dim", "64"] + args[1:] + ["--overwrite"]) == 2
    assert "cannot be combined with --init-from" in capsys.readouterr().err
