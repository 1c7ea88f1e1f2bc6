"""npgpt/memory.py: the estimate before allocating equals what the fast engine and the model really hold,
and a run too big for the machine is refused with the numbers, before anything is allocated."""

import numpy as np
import pytest

from npgpt import GPT, GPTConfig
from npgpt.engine import make_engine
from npgpt.memory import MemoryEstimate, available_memory, check_fits, estimate_training, fast_engine_bytes, param_count
from npgpt.model import make_rng, param_shapes
from npgpt.optim import AdamW


@pytest.mark.parametrize("kw", [dict(), dict(qkv_bias=True), dict(tie_weights=False), dict(n_layers=0)])
def test_param_count_is_the_sum_of_the_shapes(kw):
    cfg = GPTConfig(vocab_size=321, context_length=16, emb_dim=24, n_heads=3, **{"n_layers": 2, **kw})
    assert param_count(cfg) == sum(int(np.prod(s)) for s in param_shapes(cfg).values())


@pytest.mark.parametrize("precision, dtype, accumulate, recompute", [
    ("fp32", "float32", False, "none"), ("fp32", "float64", True, "none"), ("bf16", "float32", False, "none"),
    ("fp16", "float32", True, "none"), ("fp32", "float32", False, "attention"), ("fp32", "float32", True, "mlp"),
    ("fp32", "float64", False, "block"), ("bf16", "float32", True, "block"),
])  # fmt: skip
def test_the_estimate_equals_the_fast_engines_buffers(precision, dtype, accumulate, recompute):
    """After steps that touch every buffer (the attention probabilities and the accumulation scratch are
    allocated on first use), FastLossAndGrads.nbytes() equals the estimate to the byte; the weights
    and AdamW's moments equal the parameters' bytes."""
    cfg = GPTConfig(vocab_size=300, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.1)
    B, T = 3, 12
    model = GPT(cfg, dtype=np.dtype(dtype))
    engine = make_engine("fast", model, B, T, precision=precision, recompute=recompute)
    opt = AdamW(model.params)
    x = np.random.default_rng(0).integers(0, 300, (B, T))
    engine(x, x, training=True, rng=make_rng(0, np), accumulate=False)
    if accumulate:
        engine(x, x, training=True, rng=make_rng(1, np), accumulate=True)
    acts, work, grads = fast_engine_bytes(cfg, B, T, dtype, precision, accumulate=accumulate, recompute=recompute)
    assert engine.masks_nbytes() > 0  # dropout is on: the keep-masks are part of the activations
    assert acts == engine.acts.nbytes() + engine.masks_nbytes()
    assert acts + work + grads == engine.nbytes()
    est = estimate_training(cfg, B, T, dtype, precision, "fast", grad_accum=2 if accumulate else 1, recompute=recompute)
    assert est.weights == model.nbytes() == param_count(cfg) * np.dtype(dtype).itemsize
    assert est.optimizer == sum(int(m.nbytes) + int(v.nbytes) for m, v in zip(opt.m.values(), opt.v.values()))
    assert est.activations + est.workspace + est.gradients == engine.nbytes()
    assert est.transient == (4 if recompute in ("none", "mlp") else 5) * B * cfg.n_heads * T * T  # a mask's uniforms
    assert est.total == model.nbytes() + est.optimizer + engine.nbytes() + est.transient


def test_the_reference_estimate_counts_the_same_weights_and_more_activations():
    cfg = GPTConfig(vocab_size=300, context_length=16, emb_dim=32, n_heads=4, n_layers=2)
    fast = estimate_training(cfg, 4, 16, engine="fast")
    ref = estimate_training(cfg, 4, 16, engine="reference")
    assert ref.weights == fast.weights and ref.gradients == fast.gradients and ref.optimizer == fast.optimizer
    assert ref.activations > 0 and ref.workspace > 0


def test_too_big_is_refused_with_the_numbers():
    est = MemoryEstimate(weights=3 * 2**30, gradients=3 * 2**30, optimizer=6 * 2**30, activations=2**30, workspace=0)
    with pytest.raises(ValueError, match=r"needs about 13\.0 GiB \(weights 3\.0 GiB, .*AdamW moments 6\.0 GiB.*\), but "
                                         r"this machine has 4\.0 GiB available; lower --emb-dim"):  # fmt: skip
        check_fits(est, "cpu", fix="lower --emb-dim", available=4 * 2**30)
    check_fits(est, "cpu", available=13 * 2**30)  # fits exactly: no error


def test_available_memory_is_read_from_the_machine():
    avail = available_memory("cpu")
    assert avail is None or 2**20 < avail < 2**50


def test_a_huge_model_is_refused_before_anything_is_allocated(tmp_path, capsys, monkeypatch):
    from npgpt.cli import main

    def no_allocation(*a, **k):
        raise AssertionError("the model was built")

    monkeypatch.setattr("npgpt.train.GPT", no_allocation)
    out = tmp_path / "run"
    assert main(["train", "--emb-dim", "10000000", "--n-heads", "1", "--max-steps", "1", "--out-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "TiB" in err and "available" in err and "--emb-dim" in err, err
    assert not out.exists()


def test_largest_batch_is_the_largest_that_fits():
    from npgpt.memory import largest_batch

    cfg = GPTConfig(vocab_size=300, context_length=64, emb_dim=32, n_heads=4, n_layers=2)
    avail = estimate_training(cfg, 37, 64).total + 1
    assert largest_batch(cfg, 64, avail) == 37
    assert largest_batch(cfg, 64, estimate_training(cfg, 1, 64).total - 1) == 0
    assert largest_batch(cfg, 64, None) is None
    # keeping less fits more
    assert largest_batch(cfg, 64, avail, recompute="block") > largest_batch(cfg, 64, avail, recompute="attention") > 37


def test_step_flops_match_the_benchmarks_count():
    from npgpt.bench import flops_per_token
    from npgpt.memory import step_flops

    cfg = GPTConfig.from_preset("gpt2")
    model, extra = step_flops(cfg, 2, 256)
    assert model == flops_per_token(cfg, 256) * 512 and extra == 0
    assert abs(model / 1e9 - 394) < 1  # the 394 GFLOP at B=2, T=256
    _, att = step_flops(cfg, 2, 256, "attention")
    _, block = step_flops(cfg, 2, 256, "block")
    assert att == 12 * 2 * 2 * 256 * 256 * 768 and block > att


def test_dry_run_prints_the_plan_and_allocates_nothing(tmp_path, capsys, monkeypatch):
    from npgpt.cli import main

    def no_allocation(*a, **k):
        raise AssertionError("the model was built")

    monkeypatch.setattr("npgpt.train.GPT", no_allocation)
    out = tmp_path / "run"
    assert main(["train", "--preset", "gpt2", "--batch-size", "16", "--context-length", "1024", "--recompute", "block",
                 "--dry-run", "--out-dir", str(out)]) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert "124,439,808 parameters" in text and "recompute block" in text
    for part in ("weights", "gradients", "AdamW moments", "activations", "scratch", "total", "largest batch", "GFLOP"):
        assert part in text, part
    assert "474.7 MiB" in text  # 124,439,808 float32 weights
    assert not out.exists()


def test_bench_dry_run(capsys):
    from npgpt.cli import main

    assert main(["bench", "--preset", "nano", "--context-length", "64", "--engine", "both", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "fast engine, recompute none" in text and "reference engine" in text and "largest batch" in text


def test_recompute_is_refused_with_the_reference_engine(tmp_path, capsys):
    from npgpt.cli import main

    assert main(["train", "--engine", "reference", "--recompute", "mlp", "--out-dir", str(tmp_path / "r")]) == 2
    assert "--recompute mlp runs in the fast engine" in capsys.readouterr().err


def test_the_refusal_names_recompute_and_dry_run(monkeypatch):
    from npgpt.train import TrainConfig, check_memory

    cfg = TrainConfig(preset="gpt2", batch_size=64)
    monkeypatch.setattr("npgpt.train.available_memory", lambda device: 8 * 2**30)
    with pytest.raises(ValueError, match=r"needs about .* but this machine has 8\.0 GiB available; .*--grad-accum.*"
                                         r"--recompute attention\|mlp\|block.*--dry-run"):  # fmt: skip
        check_memory(cfg, cfg.model_config(), 64)
