"""Attention on tensor cores: the fused softmax kernels (kernels/attention_softmax.cu, float32 and 16-bit
storage) and their dropout generator (Philox-4x32-10, kernels/philox.cuh), against their NumPy twins
(npgpt/fast/attention.py, npgpt/fast/dropout.py); and the engine's path built on them
(npgpt/engine/attention.py's FusedSoftmaxAttention), on the CPU stand-in of CuPy, whose recorded calls
show that every product is one cuBLAS strided-batched GEMM and everything between them the kernels.
The emulation's 16-bit conversions (its cuda_bf16.h / cuda_fp16.h stand-ins) are held to ml_dtypes and
NumPy in test_cuda_kernels.py.

Executors as in test_cuda_kernels.py: "emulated" (npgpt.cuda.emulate on the CPU, a shuffled schedule)
and "cupy" (a real GPU; skipped without one). Tolerances are stated where they are asserted.
"""

import numpy as np
import pytest
from conftest import needs_cuda

import npgpt
from npgpt import fast
from npgpt.backend import to_numpy
from npgpt.cuda import emulate
from npgpt.cuda import kernels as K
from npgpt.engine import FastLossAndGrads, FusedSoftmaxAttention
from npgpt.fast.dropout import AttentionDropoutRandom, attention_dropout_uniforms, philox4x32_10, seed_key, uniform24
from npgpt.gradcheck import HostRandom, relative_error
from npgpt.model_check import random_params, tiny_config

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)
EMU_REASON = emulate.unavailable_reason()
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": BF16, "float16": np.dtype(np.float16)}
SEED = np.array([0.6180339887498949])  # a float64 uniform, as the engine draws it


@pytest.fixture(params=[pytest.param("emulated", marks=pytest.mark.skipif(bool(EMU_REASON), reason=EMU_REASON or "-")),
                        pytest.param("cupy", marks=[needs_cuda, pytest.mark.cuda])])  # fmt: skip
def xp(request):
    if request.param == "emulated":
        return np
    import cupy

    return cupy


def wide(a):
    return to_numpy(a).astype(np.float64)


def ulp(dtype) -> float:
    """The spacing of `dtype` just below 1 (the probabilities' largest binade): 2^-24 float32, 2^-8
    bfloat16, 2^-11 float16."""
    return {"float32": 2.0**-24, "bfloat16": 2.0**-8, "float16": 2.0**-11}[np.dtype(dtype).name]


# --- Philox-4x32-10 and the mask it draws ----------------------------------------------------------------

# Random123's known-answer vectors (tests/kat_vectors of its distribution): counter, key, output.
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0), (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter, key, expected", PHILOX_KAT)
def test_philox_twin_matches_the_published_known_answers(counter, key, expected):
    assert tuple(int(w) for w in philox4x32_10(counter, key)) == expected


def test_the_mask_is_keyed_by_seed_layer_and_position_only():
    """Element (bh, i, j) is word j & 3 of Philox((j >> 2, i, bh, layer), seed's key), whatever the shape
    it is drawn in: the mask of a shorter batch is the corner of a longer one's, so it never depends on t
    or on the buffers, and the backward can draw it again from the seed alone."""
    u = attention_dropout_uniforms(SEED, 3, (2, 3, 9, 9))
    k0, k1 = seed_key(SEED)
    assert (k1 << 32 | k0) == int(SEED[0] * 2**53) and k1 < 2**21
    for bh, i, j in [(0, 0, 0), (5, 8, 8), (2, 4, 1), (4, 7, 6)]:
        words = philox4x32_10((j >> 2, i, bh, 3), (k0, k1))
        assert u.reshape(6, 9, 9)[bh, i, j] == uniform24(words[j & 3])
    np.testing.assert_array_equal(attention_dropout_uniforms(SEED, 3, (2, 3, 5, 5)), u[:, :, :5, :5])
    assert not np.array_equal(attention_dropout_uniforms(SEED, 2, (2, 3, 9, 9)), u)  # another layer
    assert not np.array_equal(attention_dropout_uniforms(np.array([0.25]), 3, (2, 3, 9, 9)), u)  # another seed


def test_the_mask_drops_a_fraction_p_uniformly():
    """Over 2^20 uniforms: mean 1/2 and the dropped fraction p, each within 5 standard errors; the two
    halves of the rows and of the columns drop alike (no position bias), and there are 2^24 levels."""
    u = attention_dropout_uniforms(SEED, 0, (4, 4, 256, 256)).astype(np.float64)
    n = u.size
    assert abs(u.mean() - 0.5) < 5 * np.sqrt(1 / 12 / n)
    for p in (0.1, 0.5):
        dropped = u < p
        assert abs(dropped.mean() - p) < 5 * np.sqrt(p * (1 - p) / n)
        for half in (dropped[..., :128, :], dropped[..., 128:, :], dropped[..., :, :128], dropped[..., :, 128:]):
            assert abs(half.mean() - p) < 5 * np.sqrt(p * (1 - p) / half.size)
    assert np.all(u * 2**24 == np.floor(u * 2**24))


def test_the_readable_model_gets_the_kernels_masks_from_attention_dropout_random():
    """AttentionDropoutRandom: a 4-D draw is layer `count`'s Philox uniforms, keyed by a seed drawn once
    from the wrapped generator as the engine draws it (random((1,), float64)); other draws pass through,
    so the wrapped generator ends where the engine's does."""
    r = AttentionDropoutRandom(np.random.default_rng(7))
    plain = np.random.default_rng(7)
    np.testing.assert_array_equal(r.random((2, 3, 4)), plain.random((2, 3, 4), dtype=np.float32))
    u0 = r.random((2, 3, 5, 5))
    seed = plain.random((1,), dtype=np.float64)
    np.testing.assert_array_equal(r.seed, seed)
    np.testing.assert_array_equal(u0, attention_dropout_uniforms(seed, 0, (2, 3, 5, 5)))
    np.testing.assert_array_equal(r.random((2, 3, 5, 5)), attention_dropout_uniforms(seed, 1, (2, 3, 5, 5)))
    np.testing.assert_array_equal(r.random(4), plain.random(4, dtype=np.float32))


# --- the kernels against their NumPy twins ----------------------------------------------------------------

SHAPES = [(1, 1, 1), (2, 3, 7), (1, 3, 129), (2, 1, 33)]  # (b, NH, t): t not a multiple of 4, 8, 32 or 128; odd NH


def _stacks(xp, rng, b, NH, t, dtype, extra=3):
    """(host scores (b, NH, t, t), device buffers (B, NH, T, T) with B = b + 1, T = t + extra, NaN
    outside the view the kernels work on: a read past the view poisons, a write past it shows)."""
    s = (rng.standard_normal((b, NH, t, t)) * 3).astype(dtype)

    def view(values):
        buf = np.full((b + 1, NH, t + extra, t + extra), np.nan, dtype)
        buf[:b, :, :t, :t] = values
        dev = xp.asarray(buf)
        return dev, dev[:b, :, :t, :t]

    return s, view


def _outside_is_nan(buf, b, t):
    host = wide(buf)
    inside = np.zeros(host.shape, bool)
    inside[:b, :, :t, :t] = True
    assert np.isnan(host[~inside]).all(), "written outside the (b, NH, t, t) view"


@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("b, NH, t", SHAPES)
def test_softmax_kernels_match_the_fast_ops(xp, b, NH, t, dtype, p):
    """forward: P within `tol` of the twin's and exactly 0 right of the diagonal, the dropout mask equal
    bit for bit; backward (given the same P and gradient): dS within `tol` of the twin's largest;
    regeneration: the dropped probabilities equal the forward's bit for bit. tol: 2e-6 in float32 (the
    exponentials' few ulps), one unit in the last place of 16 bits (a float32 result a few ulps away
    rounds to the neighbour at most), 4 units for dS (its rounding, and g * P before it)."""
    dtype = DTYPES[dtype]
    rng = np.random.default_rng(t)
    s, view = _stacks(xp, rng, b, NH, t, dtype)
    scale, layer, seed = 0.37, 5, xp.asarray(SEED)
    tol = 2e-6 if dtype == np.float32 else ulp(dtype)
    # forward
    ref_att, ref_drop = s.copy(), np.zeros_like(s)
    fast.attention_softmax_forward_(ref_att, ref_drop, scale, p, SEED, layer)
    abuf, att = view(s)
    dbuf, dropped = view(np.zeros_like(s))
    K.attention_softmax_forward_(att, dropped, scale, p, seed, layer)
    _outside_is_nan(abuf, b, t)
    got = wide(att)
    assert np.abs(got - wide(ref_att)).max() <= tol
    upper = np.triu(np.ones((t, t), bool), 1)
    assert (got[..., upper] == 0).all() and np.allclose(got.sum(-1), 1, atol=t * tol)
    if p > 0:
        _outside_is_nan(dbuf, b, t)
        keep = fast.attention_dropout_keep(SEED, layer, s.shape, p)
        assert (wide(dropped)[~keep] == 0).all() and (wide(dropped)[keep & (got > 0)] > 0).all()
        assert 0 < (~keep[..., ~upper]).mean() < 1 or t == 1
        expected = np.empty_like(s)
        fast.attention_dropout_(expected, to_numpy(att), p, SEED, layer)  # from the kernel's P: the same formula
        np.testing.assert_array_equal(to_numpy(dropped).view(np.uint8), expected.view(np.uint8))
        regen_buf, regen = view(np.zeros_like(s))
        K.attention_dropout_(regen, att, p, seed, layer)
        np.testing.assert_array_equal(to_numpy(regen).view(np.uint8), to_numpy(dropped).view(np.uint8))
        _outside_is_nan(regen_buf, b, t)
    # backward, from the same P and gradient on both sides
    P = ref_att
    g = rng.standard_normal(s.shape).astype(dtype)
    ref_ds = g.copy()
    fast.attention_softmax_backward_(ref_ds, P, scale, p, SEED, layer)
    gbuf, ds = view(g)
    _, Pd = view(P)
    K.attention_softmax_backward_(ds, Pd, scale, p, seed, layer)
    _outside_is_nan(gbuf, b, t)
    ref = wide(ref_ds)
    big = max(np.abs(ref).max(), 1e-30)
    assert np.abs(wide(ds) - ref).max() <= (tol if dtype == np.float32 else 4 * tol) * big
    assert (wide(ds)[..., upper] == 0).all()


def test_the_fast_ops_are_attention_itself():
    """The twins against layers/attention.py's arithmetic in float64: the forward is the readable
    softmax of the scaled, masked scores with the readable dropout (the same keep-mask), the backward
    its derivative (central differences of a random projection of the dropped probabilities)."""
    rng = np.random.default_rng(1)
    b, NH, t, p, scale = 2, 3, 6, 0.3, 0.5
    s = rng.standard_normal((b, NH, t, t))
    keep = fast.attention_dropout_keep(SEED, 2, s.shape, p)

    def readable(scores):  # layers/attention.py: scores / sqrt(hs) + mask, softmax, dropout
        z = np.where(np.tril(np.ones((t, t), bool)), scores * scale, -np.inf)
        e = np.exp(z - z.max(-1, keepdims=True))
        P = e / e.sum(-1, keepdims=True)
        return P, P * keep / (1 - p)

    att, dropped = s.copy(), np.empty_like(s)
    fast.attention_softmax_forward_(att, dropped, scale, p, SEED, 2)
    P, D = readable(s)
    assert np.abs(att - P).max() < 1e-15 and np.abs(dropped - D).max() < 1e-15
    w = rng.standard_normal(s.shape)  # L = sum(w * D): dL/dD = w
    ds = w.copy()
    fast.attention_softmax_backward_(ds, att, scale, p, SEED, 2)
    num, h = np.empty_like(s), 1e-6
    for idx in np.ndindex(s.shape):
        e = np.zeros_like(s)
        e[idx] = h
        num[idx] = ((readable(s + e)[1] * w).sum() - (readable(s - e)[1] * w).sum()) / (2 * h)
    assert relative_error(ds, num) < 1e-8


@pytest.mark.skipif(bool(EMU_REASON), reason=EMU_REASON or "-")
def test_the_kernels_do_not_depend_on_the_schedule(monkeypatch):
    """Blocks and threads in order, reversed and shuffled (two seeds): the same bits out."""
    rng = np.random.default_rng(3)
    s = rng.standard_normal((2, 3, 37, 37)).astype(np.float32)
    g = rng.standard_normal(s.shape).astype(np.float32)
    results = []
    for seed in (0, 1, 2, 9):
        monkeypatch.setattr(emulate, "schedule_seed", seed)
        att, dropped, ds = s.copy(), np.empty_like(s), g.copy()
        K.attention_softmax_forward_(att, dropped, 0.3, 0.1, SEED, 1)
        K.attention_softmax_backward_(ds, att, 0.3, 0.1, SEED, 1)
        results.append(np.concatenate([att, dropped, ds]))
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])


def test_the_wrappers_refuse_what_the_kernels_cannot_take():
    a = np.zeros((2, 3, 5, 5), np.float32)
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        K.attention_softmax_forward_(a.astype(np.float64), None, 1.0)
    with pytest.raises(ValueError, match="needs seed"):
        K.attention_softmax_forward_(a, np.zeros_like(a), 1.0, 0.1, None)
    with pytest.raises(ValueError, match="dtype, shape and strides"):
        K.attention_softmax_backward_(a, np.zeros((2, 3, 6, 6), np.float32)[:, :, :5, :5], 1.0)
    with pytest.raises(ValueError, match="square"):
        K.attention_softmax_forward_(np.zeros((2, 5, 4), np.float32), None, 1.0)
    with pytest.raises(ValueError, match="collapse into one stride"):
        K.attention_softmax_forward_(np.zeros((3, 2, 5, 5), np.float32).transpose(1, 0, 2, 3), None, 1.0)
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        K.attention_dropout_(a, np.zeros_like(a), 1.0, SEED)


# --- the engine's path -------------------------------------------------------------------------------------


def _model(dtype, xp=np, **cfg_kw):
    cfg = tiny_config(**{"emb_dim": 24, "n_heads": 3, "n_layers": 2, "context_length": 16, **cfg_kw})  # hs 8, odd NH
    model = npgpt.GPT(cfg, dtype=dtype, device="cpu")
    model.params = {k: xp.asarray(v.astype(dtype)) for k, v in random_params(cfg, np.random.default_rng(0)).items()}
    return model


def _twins(engine):
    """Bind the path's ops to the NumPy twins instead of the kernels (any dtype, float64 included)."""
    import dataclasses

    engine.ops = dataclasses.replace(engine.ops, batched_matmul=fast.matmul, softmax_forward=fast.attention_softmax_forward_,
                                     softmax_backward=fast.attention_softmax_backward_,
                                     softmax_dropout=fast.attention_dropout_)  # fmt: skip


@pytest.mark.parametrize("drop", [0.0, 0.2])
@pytest.mark.parametrize("dtype, tol, ops", [(np.float64, 1e-12, "twins"),
                                             pytest.param(np.float32, 3e-5, "kernels", marks=pytest.mark.skipif(
                                                 bool(EMU_REASON), reason=EMU_REASON or "-"))])  # fmt: skip
def test_fused_softmax_path_equals_the_readable_model(dtype, tol, ops, drop):
    """The whole step through FusedSoftmaxAttention (with the NumPy twins in float64, with the emulated
    kernels in float32) against model.forward / model.backward, loss and every gradient, with dropout
    (the readable model given AttentionDropoutRandom: the kernels' masks), and buffers reused by
    smaller batches."""
    model = _model(dtype, drop_rate=drop)
    engine = FastLossAndGrads(model, 3, 9, kernels=["attention_softmax"] if ops == "kernels" else None)
    if ops == "twins":
        _twins(engine)
    assert isinstance(engine.attention, FusedSoftmaxAttention)
    rng = np.random.default_rng(3)
    V = model.config.vocab_size
    for b, t in [(3, 9), (2, 7), (1, 1)]:
        x, y = rng.integers(0, V, (b, t)), rng.integers(0, V, (b, t))
        twin = AttentionDropoutRandom(HostRandom(5))
        _, loss, cache = model.forward(x, y, training=drop > 0, rng=twin)
        ref = model.backward(cache, dloss=0.7)
        assert twin.layer == (2 if drop else 0)  # the readable model drew each layer's attention mask through it
        got = engine(x, y, training=drop > 0, rng=HostRandom(5), dloss=0.7)
        assert abs(got - float(loss)) <= tol * float(loss)
        for k in ref:
            assert relative_error(engine.grads[k], ref[k]) < tol, (b, t, k)
        if drop:  # the engine kept the seed, not a mask
            assert set(engine.masks) - {"emb"} == {"att_seed"} | {f"res{i}_{l}" for i in (1, 2) for l in range(2)}
            np.testing.assert_array_equal(engine.masks["att_seed"], twin.seed)


def _launches(monkeypatch):
    """The kernel names npgpt.cuda.emulate runs from now on (the stand-in's RawModule goes through it)."""
    names, launch = [], emulate.launch

    def spy(filename, name, *args, **kwargs):
        names.append(name)
        return launch(filename, name, *args, **kwargs)

    monkeypatch.setattr(emulate, "launch", spy)
    return names


@pytest.mark.skipif(bool(EMU_REASON), reason=EMU_REASON or "-")
@pytest.mark.parametrize("precision, drop", [("fp32", 0.0), ("fp32", 0.2), ("bf16", 0.2)])
def test_the_gpu_engine_runs_attention_on_cublas_and_the_fused_kernels(fake_cupy, monkeypatch, precision, drop):
    """On the CPU stand-in of CuPy with NPGPT_CUDA_KERNELS=all (the flash kernel on too): the engine takes
    FusedSoftmaxAttention, and the recorded calls show per layer the two forward products and the four
    backward ones as cuBLAS strided-batched GEMMs (in the activations' type, batch b * NH), none through
    CuPy's N-D matmul, and the softmax (and with dropout, the regeneration) kernels of that type; the
    step equals the readable model's on the host (float32: 3e-5; bf16: the CPU's 16-bit fast step's
    tolerance, 2e-2 on the gradients, a loss within 5e-3)."""
    from npgpt.cuda.blas import CUDA_R_16BF, CUDA_R_32F

    monkeypatch.setenv("NPGPT_CUDA_KERNELS", "all")
    host = _model(np.float32, drop_rate=drop, emb_dim=48)  # hs 16: the flash kernel could run, and does not
    model = _model(np.float32, xp=__import__("cupy"), drop_rate=drop, emb_dim=48)
    engine = FastLossAndGrads(model, 2, 9, precision=precision)
    assert isinstance(engine.attention, FusedSoftmaxAttention)
    assert ("attention" in engine.kernels) == (precision == "fp32")  # the flash kernel is float32-only
    assert engine.used_flash == [False, False] and engine.acts.lse == []
    x, y = np.random.default_rng(4).integers(0, 37, (2, 9)), np.random.default_rng(5).integers(0, 37, (2, 9))
    _, loss, cache = host.forward(x, y, training=drop > 0, rng=AttentionDropoutRandom(HostRandom(5)))
    ref = host.backward(cache)
    fake_cupy.gemm_calls.clear()
    fake_cupy.matmul_calls.clear()
    names = _launches(monkeypatch)
    got = engine(x, y, training=drop > 0, rng=HostRandom(5, __import__("cupy")))
    kind, suffix = (CUDA_R_32F, "") if precision == "fp32" else (CUDA_R_16BF, "_bf16")
    assert [c for c in fake_cupy.gemm_calls if c[2] == 2 * 3] == [(kind, c[1], 6) for c in fake_cupy.gemm_calls] and len(
        fake_cupy.gemm_calls) == 6 * 2  # fmt: skip
    assert not [c for c in fake_cupy.matmul_calls if c[0] > 2]
    per_layer = ["attention_softmax_fwd" + suffix, "attention_softmax_bwd" + suffix]
    per_layer += ["attention_dropout" + suffix] if drop else []
    assert sorted(n for n in names if n.startswith("attention")) == sorted(per_layer * 2)
    tol_loss, tol_grad = (3e-5, 3e-5) if precision == "fp32" else (5e-3, 2e-2)
    assert abs(got - float(loss)) <= tol_loss * float(loss)
    for k in ref:
        assert relative_error(to_numpy(engine.grads[k]).astype(np.float64), ref[k]) < tol_grad, k
