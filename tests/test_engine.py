"""The fast training step (engine.py) against the readable reference (model.forward / model.backward)."""

import numpy as np
import pytest

import npgpt
from conftest import needs_cuda
from npgpt.backend import to_numpy
from npgpt.engine import FastLossAndGrads
from npgpt.gradcheck import HostRandom, relative_error
from npgpt.model_check import random_params, tiny_config

CASES = {
    "tied": dict(),
    "untied, no qkv bias": dict(tie_weights=False, qkv_bias=False),
    "one head, three layers": dict(n_heads=1, n_layers=3),
    "dropout": dict(drop_rate=0.2),
    "no layers": dict(n_layers=0),
}


def make(cfg_kw, dtype, xp=np):
    cfg = tiny_config(**cfg_kw)
    model = npgpt.GPT(cfg, dtype=dtype, device="cpu")
    model.params = {k: xp.asarray(v, dtype=dtype) for k, v in random_params(cfg, np.random.default_rng(0)).items()}
    return model


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-12), (np.float32, 3e-6)])
@pytest.mark.parametrize("case", list(CASES))
def test_fast_step_equals_reference(case, dtype, tol, xp):
    model = make(CASES[case], dtype, xp)
    V = model.config.vocab_size
    rng = np.random.default_rng(1)
    training = model.config.drop_rate > 0
    engine = FastLossAndGrads(model, 3, 8)
    for b, t in [(3, 8), (2, 5), (1, 1)]:  # full buffers, then smaller batches in the same buffers
        x = xp.asarray(rng.integers(0, V, (b, t)))
        y = xp.asarray(rng.integers(0, V, (b, t)))
        _, loss, cache = model.forward(x, y, training=training, rng=HostRandom(5, xp))
        ref = model.backward(cache, dloss=0.7)
        fast_loss = engine(x, y, training=training, rng=HostRandom(5, xp), dloss=0.7)
        assert abs(fast_loss - float(loss)) <= tol * abs(float(loss))
        assert engine.loss(x, y) == pytest.approx(float(model.forward(x, y)[1]), rel=tol)
        for k in ref:
            err = relative_error(to_numpy(engine.grads[k]), to_numpy(ref[k]))
            assert err < tol, f"{case} {b}x{t} {k}: {err:.2e}"


def test_gradient_accumulation_in_the_engine():
    model = make({}, np.float64)
    rng = np.random.default_rng(2)
    x, y = rng.integers(0, 37, (4, 6)), rng.integers(0, 37, (4, 6))
    big = FastLossAndGrads(model, 4, 6)
    big(x, y)
    expected = {k: v.copy() for k, v in big.grads.items()}
    acc = FastLossAndGrads(model, 2, 6)
    acc(x[:2], y[:2], dloss=0.5)
    acc(x[2:], y[2:], dloss=0.5, accumulate=True)
    for k in expected:
        assert relative_error(acc.grads[k], expected[k]) < 1e-12, k


def test_gradients_are_views_of_one_flat_buffer():
    model = make({}, np.float32)
    engine = FastLossAndGrads(model, 2, 4)
    assert list(engine.grads) == list(model.params)
    total = sum(g.size for g in engine.grads.values())
    assert engine.grad_flat.size == total
    assert all(np.shares_memory(g, engine.grad_flat) for g in engine.grads.values())
    assert engine.nbytes() > engine.grad_flat.nbytes


def test_engine_rejects_what_does_not_fit():
    engine = FastLossAndGrads(make({}, np.float32), 2, 4)
    with pytest.raises(ValueError, match="does not fit"):
        engine(np.zeros((3, 4), dtype=np.int64), np.zeros((3, 4), dtype=np.int64))
    with pytest.raises(ValueError, match="exceeds the model's context_length"):
        FastLossAndGrads(make({}, np.float32), 2, 9)


@pytest.mark.skipif(__import__("shutil").which("g++") is None, reason="the CUDA emulation needs g++")
@pytest.mark.parametrize("attention", ["fused", "flash"])
@pytest.mark.parametrize("drop", [0.0, 0.2])
def test_cuda_kernel_path_matches_reference_in_emulation(drop, attention):
    """The engine's CUDA path (every kernel of kernels/*.cu), run through npgpt.cuda.emulate on the CPU,
    against the readable reference. Attention: the fused softmax kernels (every kernel on), whose
    dropout the readable model draws through AttentionDropoutRandom; or the flash kernel (every kernel
    but attention_softmax), which with dropout on falls back to the reference attention."""
    from npgpt.cuda import KERNEL_NAMES
    from npgpt.engine import FusedSoftmaxAttention
    from npgpt.fast.dropout import AttentionDropoutRandom

    cfg = tiny_config(emb_dim=32, n_heads=2, n_layers=2, drop_rate=drop)  # head size 16: the kernel's smallest
    model = npgpt.GPT(cfg, dtype=np.float32, device="cpu")
    model.params = {k: v.astype(np.float32) for k, v in random_params(cfg, np.random.default_rng(0)).items()}
    names = [k for k in KERNEL_NAMES if attention == "fused" or k != "attention_softmax"]
    engine = FastLossAndGrads(model, 2, 8, kernels=names)
    assert "attention" in engine.kernels
    assert isinstance(engine.attention, FusedSoftmaxAttention) == (attention == "fused")
    rng = np.random.default_rng(3)
    for b, t in [(2, 8), (1, 5)]:
        x, y = rng.integers(0, 37, (b, t)), rng.integers(0, 37, (b, t))
        ref_rng = AttentionDropoutRandom(HostRandom(5)) if attention == "fused" else HostRandom(5)
        _, loss, cache = model.forward(x, y, training=drop > 0, rng=ref_rng)
        ref = model.backward(cache)
        fast = engine(x, y, training=drop > 0, rng=HostRandom(5))
        assert engine.used_flash[0] == (drop == 0 and attention == "flash")
        assert abs(fast - float(loss)) < 1e-5 * float(loss)
        for k in ref:
            assert relative_error(engine.grads[k], ref[k]) < 2e-5, k


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-12), (np.float32, 3e-6)])
def test_fast_step_ignores_targets_as_the_reference_does(dtype, tol):
    """Targets equal to ignore_index (-100) count neither in the mean loss nor in any gradient."""
    model = make({"drop_rate": 0.2}, dtype)
    rng = np.random.default_rng(4)
    x, y = rng.integers(0, 37, (3, 8)), rng.integers(0, 37, (3, 8))
    y[0, :3] = -100
    y[2, 5] = -100
    _, loss, cache = model.forward(x, y, training=True, rng=HostRandom(5))
    ref = model.backward(cache, dloss=0.7)
    engine = FastLossAndGrads(model, 3, 8)
    fast_loss = engine(x, y, training=True, rng=HostRandom(5), dloss=0.7)
    assert abs(fast_loss - float(loss)) <= tol * abs(float(loss))
    for k in ref:
        assert relative_error(engine.grads[k], ref[k]) < tol, k
    assert engine.loss(x, y) == pytest.approx(float(model.forward(x, y)[1]), rel=tol)
    with pytest.raises(ValueError, match="every target equals ignore_index"):
        engine(x, np.full_like(y, -100))
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 37\) or equal ignore_index"):
        engine(x, np.where(y == -100, -3, y))


def test_fast_step_equals_reference_in_the_row_blocks_with_two_threads(monkeypatch, split_small_work):
    """Big enough that every CPU op splits its rows over two threads and loops over row blocks (N = 74
    rows, ROW_BLOCK = 32; attention in causal blocks of 16 query rows, 37 = 16 + 16 + 5), head size 64,
    dropout on: the whole model against the reference."""
    monkeypatch.setenv("NPGPT_THREADS", "2")
    monkeypatch.setattr(npgpt.fast, "CAUSAL_ROWS", 16)
    cfg = tiny_config(vocab_size=61, context_length=40, emb_dim=128, n_heads=2, n_layers=1, drop_rate=0.1)
    model = npgpt.GPT(cfg, dtype=np.float64, device="cpu")
    model.params = random_params(cfg, np.random.default_rng(0))
    engine = FastLossAndGrads(model, 2, 40)
    assert engine.threads == 2 and engine.causal_rows == 16
    rng = np.random.default_rng(1)
    x, y = rng.integers(0, 61, (2, 37)), rng.integers(0, 61, (2, 37))
    _, loss, cache = model.forward(x, y, training=True, rng=HostRandom(5))
    ref = model.backward(cache)
    fast_loss = engine(x, y, training=True, rng=HostRandom(5))
    assert abs(fast_loss - float(loss)) <= 1e-12 * abs(float(loss))
    for k in ref:
        assert relative_error(engine.grads[k], ref[k]) < 1e-12, k


# --- the engine on a real GPU, with its fast paths: kernels, bmm, 16 bits, float64 (skipped without one) -------


def _gpu_and_cpu_steps(kernels, dtype=np.float32, precision="fp32", drop=0.0):
    """(loss, grads as float64 NumPy) of one step of the same model and batch: the NumPy fast engine,
    and the CuPy fast engine with `kernels` (a list, or None for $NPGPT_CUDA_KERNELS)."""
    import cupy

    cfg = tiny_config(emb_dim=64, n_heads=4, n_layers=2, drop_rate=drop)  # head size 16: the flash kernel fits
    host = {k: v.astype(dtype) for k, v in random_params(cfg, np.random.default_rng(0)).items()}
    rng = np.random.default_rng(3)
    x, y = rng.integers(0, cfg.vocab_size, (2, 8)), rng.integers(0, cfg.vocab_size, (2, 8))
    out = []
    for xp in (np, cupy):
        model = npgpt.GPT(cfg, dtype=dtype, device="cpu")
        model.params = {k: xp.asarray(v) for k, v in host.items()}
        engine = FastLossAndGrads(model, 2, 8, precision=precision, kernels=kernels if xp is cupy else None)
        loss = engine(x, y, dloss=0.5)
        out.append((loss, {k: to_numpy(g).astype(np.float64) for k, g in engine.grads.items()}, engine))
    return out


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("kernels", [["bmm"], "all", "flash"])
def test_cuda_engine_with_its_kernels_matches_numpy(kernels, monkeypatch):
    """The fast step on CuPy with every hand-written kernel (LayerNorm, GELU, the loss, and attention:
    the fused softmax kernels with "all", the flash kernel with every kernel but those) and with bmm,
    in full float32 (TF32 off), against the NumPy fast step."""
    from npgpt.backend import set_tf32
    from npgpt.cuda import KERNEL_NAMES
    from npgpt.engine import FusedSoftmaxAttention

    monkeypatch.setenv("CUPY_TF32", "0")
    set_tf32(False)
    names = kernels
    if kernels in ("all", "flash"):
        names = [k for k in KERNEL_NAMES if kernels == "all" or k != "attention_softmax"]
    (cpu_loss, cpu, _), (gpu_loss, gpu, engine) = _gpu_and_cpu_steps(names)
    if kernels == "all":
        assert engine.kernels == set(KERNEL_NAMES) and isinstance(engine.attention, FusedSoftmaxAttention)
    if kernels == "flash":
        assert engine.used_flash == [True, True]
    assert abs(gpu_loss - cpu_loss) <= 1e-5 * cpu_loss
    for k in cpu:
        assert relative_error(gpu[k], cpu[k]) < 5e-5, k


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("kernels", [[], ["bmm"], "all"])
def test_cuda_engine_in_16_bits_matches_numpy(precision, kernels):
    """bf16 / fp16 on CuPy, with and without "bmm": attention's 16-bit products go through cuBLAS either
    way (CuPy's N-D matmul raises for bfloat16); with "all", every kernel that takes 16-bit activations
    (all but the float32 flash kernel: the 16-bit LayerNorm, GELU, loss and fused attention softmax,
    AdamW's is not in a step). Against the NumPy 16-bit step, within 16-bit rounding."""
    from npgpt.cuda.kernels import KERNEL_DTYPES
    from npgpt.engine import FusedSoftmaxAttention

    pytest.importorskip("ml_dtypes")
    if kernels == "all":
        kernels = [k for k, dtypes in KERNEL_DTYPES.items() if "float16" in dtypes]
    (cpu_loss, cpu, _), (gpu_loss, gpu, engine) = _gpu_and_cpu_steps(kernels, precision=precision)
    assert engine.kernels == set(kernels)
    assert isinstance(engine.attention, FusedSoftmaxAttention) == ("attention_softmax" in kernels)
    assert abs(gpu_loss - cpu_loss) <= 5e-3 * cpu_loss
    for k in cpu:
        assert relative_error(gpu[k], cpu[k]) < 5e-2, k


@pytest.mark.cuda
@needs_cuda
def test_cuda_engine_in_float64_with_every_kernel_enabled(monkeypatch):
    """NPGPT_CUDA_KERNELS=all on a float64 model: the float32 kernels stand aside, bmm runs in float64."""
    monkeypatch.setenv("NPGPT_CUDA_KERNELS", "all")
    (cpu_loss, cpu, _), (gpu_loss, gpu, engine) = _gpu_and_cpu_steps(None, dtype=np.float64)
    assert engine.kernels == {"bmm"}
    assert abs(gpu_loss - cpu_loss) <= 1e-12 * cpu_loss
    for k in cpu:
        assert relative_error(gpu[k], cpu[k]) < 1e-10, k


@pytest.mark.skipif(__import__("shutil").which("g++") is None, reason="the CUDA emulation needs g++")
def test_cross_entropy_kernel_in_the_step_ignores_targets():
    """The cross-entropy kernel (emulated) inside the step, with ignored targets, against the reference."""
    model = make({}, np.float32)
    engine = FastLossAndGrads(model, 3, 8, kernels=["cross_entropy"])
    rng = np.random.default_rng(6)
    x, y = rng.integers(0, 37, (3, 8)), rng.integers(0, 37, (3, 8))
    y[1, 2:6] = -100
    _, loss, cache = model.forward(x, y)
    ref = model.backward(cache)
    assert abs(engine(x, y) - float(loss)) < 1e-5 * float(loss)
    for k in ref:
        assert relative_error(engine.grads[k], ref[k]) < 2e-5, k


# --- the padded output head (ends.LMHead): Vp columns for the GEMMs, V everywhere else ---------------------------


@pytest.mark.parametrize("case", ["tied", "untied, no qkv bias"])
def test_padded_head_equals_the_unpadded_one_on_the_gpu_stand_in(fake_cupy, case):
    """On the CPU stand-in of CuPy, where padding is the default (37 -> 128 columns), in float64: loss and
    every gradient equal the unpadded engine's to 1e-12, with dropout, gradient accumulation and a
    smaller batch in the same buffers. The padded rows of the head's weights stay zero, and nothing the
    caller sees has them: the logits are (n, V), the gradients and the model's parameters (what a
    checkpoint saves) keep their (V, C) shapes."""
    import cupy

    from npgpt.memory import padded_vocab

    cfg = tiny_config(drop_rate=0.1, **CASES[case])
    host = random_params(cfg, np.random.default_rng(0))
    model = npgpt.GPT(cfg, dtype=np.float64, device="cpu")
    model.params = {k: cupy.asarray(v) for k, v in host.items()}
    padded, plain = FastLossAndGrads(model, 3, 8), FastLossAndGrads(model, 3, 8, vocab_multiple=1)
    V, C = cfg.vocab_size, cfg.emb_dim
    assert padded.padded_vocab == padded_vocab(V, 128) == 128 and plain.padded_vocab == V
    assert padded.acts.logits.shape == (24, 128) and plain.acts.logits.shape == (24, V)
    rng = np.random.default_rng(1)
    for b, t, accumulate in [(3, 8, False), (2, 5, True), (1, 1, False)]:
        x, y = rng.integers(0, V, (b, t)), rng.integers(0, V, (b, t))
        losses = [e(x, y, training=True, rng=HostRandom(5, cupy), dloss=0.7, accumulate=accumulate) for e in (padded, plain)]
        assert abs(losses[0] - losses[1]) <= 1e-12 * abs(losses[1])
        for k in plain.grads:
            assert padded.grads[k].shape == plain.grads[k].shape == model.params[k].shape
            assert relative_error(to_numpy(padded.grads[k]), to_numpy(plain.grads[k])) < 1e-12, (b, t, k)
        assert padded.logits.shape == (b * t, V)
        np.testing.assert_array_equal(to_numpy(padded.work.head_weight[V:]), 0)
        assert padded.loss(x, y) == pytest.approx(plain.loss(x, y), rel=1e-12)
    assert model.params["wte.weight"].shape == (V, C)


@pytest.mark.parametrize("kernel", [False, pytest.param(True, marks=pytest.mark.skipif(
    __import__("shutil").which("g++") is None, reason="the CUDA emulation needs g++"))])  # fmt: skip
def test_padded_head_in_fine_tunings_two_halves(kernel):
    """forward(lm_head=True) without targets, a loss of the caller's on `engine.logits` (the (n, V) view
    of the padded rows: through the engine's loss op, which with the CUDA kernel takes a contiguous
    copy), then backward(dlogits=engine.logits, dhidden=...): equal to the unpadded engine (float64 and
    the fast op: 1e-12; float32 and the emulated loss kernel: 1e-6)."""
    dtype, tol = (np.float32, 1e-6) if kernel else (np.float64, 1e-12)
    model = make({"drop_rate": 0.0}, dtype)
    kernels = ["cross_entropy"] if kernel else None
    engines = [FastLossAndGrads(model, 2, 8, kernels=kernels, vocab_multiple=m) for m in (16, 1)]
    assert engines[0].acts.logits.shape[1] == 48
    rng = np.random.default_rng(2)
    x, y = rng.integers(0, 37, (2, 7)), rng.integers(0, 37, (2, 7))
    dh = rng.standard_normal((2, 7, model.config.emb_dim)).astype(dtype)
    losses = []
    for e in engines:
        e.forward(x, None, backward=True, lm_head=True)
        assert e.logits.shape == (14, 37)
        losses.append(float(e.ops.cross_entropy_(e.logits, y.reshape(-1), True, 0.5, n_valid=14)))
        e.backward(dhidden=dh, dlogits=e.logits)
    assert abs(losses[0] - losses[1]) <= tol * losses[1]
    for k in engines[1].grads:
        assert relative_error(engines[0].grads[k], engines[1].grads[k]) < tol, k


@pytest.mark.skipif(__import__("shutil").which("g++") is None, reason="the CUDA emulation needs g++")
@pytest.mark.parametrize("precision, accumulate", [("fp32", False), ("bf16", True)])
def test_the_memory_estimate_counts_the_fused_softmax_path_and_the_padded_head(precision, accumulate):
    """memory.fast_engine_bytes(fused_softmax=True, vocab_multiple=...) equals FastLossAndGrads.nbytes()
    to the byte after training steps with dropout (probabilities kept, their masks not: one float64
    seed; the padded head's (N, Vp) logits, (Vp, C) weights and weight-gradient product), and the step
    draws no (B, NH, T, T) uniforms (transient 0)."""
    from npgpt.memory import fast_engine_bytes, fast_engine_transient

    pytest.importorskip("ml_dtypes")
    cfg = tiny_config(drop_rate=0.1, n_heads=2, emb_dim=32, context_length=16)
    model = npgpt.GPT(cfg, dtype=np.float32, device="cpu")
    engine = FastLossAndGrads(model, 3, 12, kernels=["attention_softmax"], precision=precision, vocab_multiple=16)
    x = np.random.default_rng(0).integers(0, 37, (3, 12))
    engine(x, x, training=True, rng=HostRandom(0))
    if accumulate:
        engine(x, x, training=True, rng=HostRandom(1), accumulate=True)
    acts, work, grads = fast_engine_bytes(cfg, 3, 12, "float32", precision, accumulate=accumulate, fused_softmax=True,
                                          vocab_multiple=16)  # fmt: skip
    assert engine.masks_nbytes() == 3 * 12 * 32 * (1 + 2 * 2) + 8  # the embeddings' and residuals' masks, the seed
    assert acts == engine.acts.nbytes() + engine.masks_nbytes()
    assert acts + work + grads == engine.nbytes()
    assert fast_engine_transient(cfg, 3, 12, fused_softmax=True) == 0
