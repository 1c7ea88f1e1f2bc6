"""The encoder-decoder's fast engine (seq2seq/engine.py) against the readable model (Seq2Seq.forward /
backward): loss and every parameter gradient, float64 to 1e-12 and float32 to 3e-6 (relative error as in
tests/test_engine.py), padded batches, dropout with the same masks (one HostRandom seed for both), the
options (post/pre-norm, ReLU/GELU, sinusoidal/learned positions, the three ways of tying), smaller batches
in the buffers planned for the largest, and a model big enough that every CPU op enters its threads and
row blocks."""

import numpy as np
import pytest

from npgpt.backend import to_numpy
from npgpt.gradcheck import HostRandom, relative_error
from npgpt.seq2seq import Seq2Seq
from npgpt.seq2seq.check import padded_batch, random_params, tiny_config
from npgpt.seq2seq.engine import Seq2SeqFastLossAndGrads, Seq2SeqReferenceLossAndGrads, make_engine

CASES = {
    "post-norm relu sinusoidal tied": dict(),
    "pre-norm gelu learned decoder-tied": dict(norm="pre", activation="gelu", pos_encoding="learned",
                                               tie_embeddings="decoder", src_vocab_size=11),
    "untied output, one head, 3+1 layers, unscaled": dict(tie_embeddings="none", n_heads=1, n_encoder_layers=3,
                                                          n_decoder_layers=1, scale_embeddings=False, tgt_vocab_size=17,
                                                          src_vocab_size=11),
    "dropout post-norm relu": dict(dropout=0.2),
    "dropout pre-norm gelu learned untied": dict(dropout=0.2, norm="pre", activation="gelu", pos_encoding="learned",
                                                 tie_embeddings="none"),
}  # fmt: skip
SHAPES = [(3, 6, 5), (2, 4, 3), (1, 1, 1), (3, 6, 5)]  # the planned (B, S, T), smaller ones, then full again


def make(cfg, dtype, xp=np, seed=0):
    model = Seq2Seq(cfg, dtype=dtype, device="cpu")
    model.params = {k: xp.asarray(v, dtype=dtype) for k, v in random_params(cfg, np.random.default_rng(seed)).items()}
    return model


def assert_same(engine, ref_loss, ref_grads, fast_loss, tol, what):
    assert abs(fast_loss - ref_loss) <= tol * abs(ref_loss), f"{what}: loss {fast_loss} vs {ref_loss}"
    assert list(engine.grads) == list(ref_grads)
    for k in ref_grads:
        err = relative_error(to_numpy(engine.grads[k]), to_numpy(ref_grads[k]))
        assert err < tol, f"{what} {k}: {err:.2e}"


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-12), (np.float32, 3e-6)])
@pytest.mark.parametrize("case", list(CASES))
def test_fast_engine_equals_reference(case, dtype, tol, xp):
    cfg = tiny_config(**CASES[case])
    model = make(cfg, dtype, xp)
    engine = Seq2SeqFastLossAndGrads(model, 3, 6, 5)
    training = cfg.dropout > 0
    rng = np.random.default_rng(1)
    for b, s, t in SHAPES:
        src, tgt_in, targets = (xp.asarray(a) for a in padded_batch(cfg, rng, b, s, t))
        _, loss, cache = model.forward(src, tgt_in, targets, training=training, rng=HostRandom(5, xp))
        ref = model.backward(cache, dloss=0.7)
        fast_loss = engine((src, tgt_in), targets, training=training, rng=HostRandom(5, xp), dloss=0.7)
        assert_same(engine, float(loss), ref, fast_loss, tol, f"{case} {b}x{s}x{t}")
        want = float(model.forward(src, tgt_in, targets)[1])
        assert engine.loss((src, tgt_in), targets) == pytest.approx(want, rel=tol)


@pytest.mark.parametrize("threads", ["1", "2"])
def test_fast_engine_equals_reference_in_the_threads_and_row_blocks(threads, monkeypatch):
    """Ns = 5 * 23 and Nt = 5 * 31 rows (ReLU's row blocks are 32), head size 64, five pairs (two threads
    split the batch), padded, dropout on, both norm placements."""
    monkeypatch.setenv("NPGPT_THREADS", threads)
    for norm, activation in (("post", "relu"), ("pre", "gelu")):
        cfg = tiny_config(d_model=128, n_heads=2, d_ff=96, max_len=32, n_encoder_layers=1, n_decoder_layers=2,
                          dropout=0.1, norm=norm, activation=activation, src_vocab_size=29, tgt_vocab_size=29)  # fmt: skip
        model = make(cfg, np.float64)
        engine = Seq2SeqFastLossAndGrads(model, 5, 23, 31)
        assert engine.threads == int(threads)
        src, tgt_in, targets = padded_batch(cfg, np.random.default_rng(2), 5, 23, 31)
        _, loss, cache = model.forward(src, tgt_in, targets, training=True, rng=HostRandom(5))
        ref = model.backward(cache)
        fast_loss = engine((src, tgt_in), targets, training=True, rng=HostRandom(5))
        assert_same(engine, float(loss), ref, fast_loss, 1e-12, f"{norm}-norm {activation}")


def test_padding_contributes_nothing(rng):
    """Changing what lies under the padding (other ids padded away is not possible, so: appending padding
    columns) leaves the loss and every gradient as they were."""
    cfg = tiny_config(dropout=0.0)
    model = make(cfg, np.float64)
    engine = Seq2SeqFastLossAndGrads(model, 3, 8, 8)
    src, tgt_in, targets = padded_batch(cfg, rng, 3, 5, 4)
    loss = engine((src, tgt_in), targets)
    grads = {k: v.copy() for k, v in engine.grads.items()}
    pad = lambda a, n: np.pad(a, ((0, 0), (0, n)), constant_values=cfg.pad_id)  # noqa: E731
    assert engine((pad(src, 3), pad(tgt_in, 2)), pad(targets, 2)) == pytest.approx(loss, rel=1e-12)
    for k in grads:
        assert relative_error(engine.grads[k], grads[k]) < 1e-12, k


def test_gradient_accumulation_adds_scaled_gradients():
    cfg = tiny_config(norm="pre", tie_embeddings="decoder", pos_encoding="learned", src_vocab_size=11)
    model = make(cfg, np.float64)
    rng = np.random.default_rng(3)
    b1, b2 = padded_batch(cfg, rng, 3, 6, 5), padded_batch(cfg, rng, 2, 4, 5)
    want = {}
    for batch, dloss in ((b1, 0.3), (b2, 0.7)):
        _, _, cache = model.forward(*batch)
        for k, g in model.backward(cache, dloss=dloss).items():
            want[k] = want.get(k, 0.0) + g
    engine = Seq2SeqFastLossAndGrads(model, 3, 6, 5)
    engine(b1[:2], b1[2], dloss=0.3)
    engine(b2[:2], b2[2], dloss=0.7, accumulate=True)
    for k in want:
        assert relative_error(engine.grads[k], want[k]) < 1e-12, k


def test_make_engine_flattens_and_gradients_are_views_of_one_buffer():
    from npgpt.backend import flat_base

    cfg = tiny_config()
    model = make(cfg, np.float32)
    values = {k: v.copy() for k, v in model.params.items()}
    engine = make_engine("fast", model, 2, 4, 4)
    assert flat_base(model.params) is not None and all(np.array_equal(model.params[k], values[k]) for k in values)
    assert flat_base(engine.grads) is engine.grad_flat and list(engine.grads) == list(model.params)
    assert engine.nbytes() > engine.acts.nbytes() + engine.work.nbytes() > 0
    assert isinstance(make_engine("reference", model, 2, 4, 4), Seq2SeqReferenceLossAndGrads)
    with pytest.raises(ValueError, match="engine must be 'fast' or 'reference'"):
        make_engine("quick", model, 2, 4, 4)


def test_fast_engine_rejects_what_does_not_fit():
    cfg = tiny_config()
    model = make(cfg, np.float32)
    engine = Seq2SeqFastLossAndGrads(model, 2, 4, 4)
    src, tgt_in, targets = padded_batch(cfg, np.random.default_rng(0), 3, 4, 4)
    with pytest.raises(ValueError, match="does not fit this engine's buffers"):
        engine((src, tgt_in), targets)
    with pytest.raises(ValueError, match="as a pair"):
        engine(src[:2], targets[:2])
    with pytest.raises(ValueError, match="every target equals pad_id"):
        engine((src[:2], tgt_in[:2]), np.zeros_like(targets[:2]))
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 13\)"):
        engine((src[:2], tgt_in[:2]), targets[:2] + 13)
    with pytest.raises(ValueError, match="exceed the model's max_len"):
        Seq2SeqFastLossAndGrads(model, 2, 9, 4)


@pytest.mark.skipif(__import__("shutil").which("g++") is None, reason="the CUDA emulation needs g++")
def test_cuda_kernels_in_the_engine_in_emulation():
    """LayerNorm, GELU and the loss through the CUDA kernels of kernels/ (run by npgpt.cuda.emulate on
    the CPU), against the readable model, float32 (the kernels' dtype)."""
    cfg = tiny_config(activation="gelu", dropout=0.2)
    model = make(cfg, np.float32)
    engine = Seq2SeqFastLossAndGrads(model, 3, 6, 5, kernels=["layernorm", "gelu", "cross_entropy", "attention",
                                                                "attention_softmax", "bmm"])  # fmt: skip
    assert engine.kernels == {"layernorm", "gelu", "cross_entropy", "bmm"}  # the causal attention kernels do not apply
    src, tgt_in, targets = padded_batch(cfg, np.random.default_rng(4), 3, 6, 5)
    _, loss, cache = model.forward(src, tgt_in, targets, training=True, rng=HostRandom(5))
    ref = model.backward(cache)
    assert_same(engine, float(loss), ref, engine((src, tgt_in), targets, training=True, rng=HostRandom(5)), 2e-5, "kernels")
