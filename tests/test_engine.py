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
@pytest.mark.parametrize("drop", [0.0, 0.2])
def test_cuda_kernel_path_matches_reference_in_emulation(drop):
    """The engine's CUDA path (every kernel of kernels/*.cu), run through npgpt.cuda.emulate on the CPU,
    against the readable reference. With dropout on, attention falls back to the reference attention."""
    from npgpt.cuda import KERNEL_NAMES

    cfg = tiny_config(emb_dim=32, n_heads=2, n_layers=2, drop_rate=drop)  # head size 16: the kernel's smallest
    model = npgpt.GPT(cfg, dtype=np.float32, device="cpu")
    model.params = {k: v.astype(np.float32) for k, v in random_params(cfg, np.random.default_rng(0)).items()}
    engine = FastLossAndGrads(model, 2, 8, kernels=KERNEL_NAMES)
    assert "attention" in engine.kernels
    rng = np.random.default_rng(3)
    for b, t in [(2, 8), (1, 5)]:
        x, y = rng.integers(0, 37, (b, t)), rng.integers(0, 37, (b, t))
        _, loss, cache = model.forward(x, y, training=drop > 0, rng=HostRandom(5))
        ref = model.backward(cache)
        fast = engine(x, y, training=drop > 0, rng=HostRandom(5))
        assert engine.used_flash[0] == (drop == 0)
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
@pytest.mark.parametrize("kernels", [["bmm"], "all"])
def test_cuda_engine_with_its_kernels_matches_numpy(kernels, monkeypatch):
    """The fast step on CuPy with every hand-written kernel (flash attention, LayerNorm, GELU, the loss)
    and with bmm, in full float32 (TF32 off), against the NumPy fast step."""
    from npgpt.backend import set_tf32
    from npgpt.cuda import KERNEL_NAMES

    monkeypatch.setenv("CUPY_TF32", "0")
    set_tf32(False)
    (cpu_loss, cpu, _), (gpu_loss, gpu, engine) = _gpu_and_cpu_steps(list(KERNEL_NAMES) if kernels == "all" else kernels)
    if kernels == "all":
        assert engine.kernels == set(KERNEL_NAMES) and engine.used_flash == [True, True]
    assert abs(gpu_loss - cpu_loss) <= 1e-5 * cpu_loss
    for k in cpu:
        assert relative_error(gpu[k], cpu[k]) < 5e-5, k


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("kernels", [[], ["bmm"]])
def test_cuda_engine_in_16_bits_matches_numpy(precision, kernels):
    """bf16 / fp16 on CuPy, with and without "bmm": attention's 16-bit products go through cuBLAS either
    way (CuPy's N-D matmul raises for bfloat16). Against the NumPy 16-bit step, within 16-bit rounding."""
    pytest.importorskip("ml_dtypes")
    (cpu_loss, cpu, _), (gpu_loss, gpu, _) = _gpu_and_cpu_steps(kernels, precision=precision)
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
