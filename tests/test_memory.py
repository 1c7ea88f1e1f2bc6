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


@pytest.mark.parametrize("precision, dtype, accumulate", [
    ("fp32", "float32", False), ("fp32", "float64", True), ("bf16", "float32", False), ("fp16", "float32", True),
])  # fmt: skip
def test_the_estimate_equals_the_fast_engines_buffers(precision, dtype, accumulate):
    """After steps that touch every buffer (the attention probabilities and the accumulation scratch are
    allocated on first use), FastLossAndGrads.nbytes() equals the estimate to the byte; the weights
    and AdamW's moments equal the parameters' bytes."""
    cfg = GPTConfig(vocab_size=300, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.1)
    B, T = 3, 12
    model = GPT(cfg, dtype=np.dtype(dtype))
    engine = make_engine("fast", model, B, T, precision=precision)
    opt = AdamW(model.params)
    x = np.random.default_rng(0).integers(0, 300, (B, T))
    engine(x, x, training=True, rng=make_rng(0, np), accumulate=False)
    if accumulate:
        engine(x, x, training=True, rng=make_rng(1, np), accumulate=True)
    acts, work, grads = fast_engine_bytes(cfg, B, T, dtype, precision, accumulate=accumulate)
    assert acts == engine.acts.nbytes()
    assert acts + work + grads == engine.nbytes()
    est = estimate_training(cfg, B, T, dtype, precision, "fast", grad_accum=2 if accumulate else 1)
    assert est.weights == model.nbytes() == param_count(cfg) * np.dtype(dtype).itemsize
    assert est.optimizer == sum(int(m.nbytes) + int(v.nbytes) for m, v in zip(opt.m.values(), opt.v.values()))
    assert est.activations + est.workspace + est.gradients == engine.nbytes()
    assert est.total == model.nbytes() + est.optimizer + engine.nbytes()


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
