"""The CUDA kernels (kernels/*.cu, through the wrappers in npgpt.cuda.kernels) against their NumPy
references, at the tolerance each kernel's header states, on two executors:

- "cupy": a real GPU (skipped without CuPy and a working device);
- "emulated": the same kernels compiled as C++ and run on the CPU by npgpt.cuda.emulate (skipped
  without g++ / Linux). It checks indexing, bounds, masks, synchronisation (with a shuffled schedule)
  and the wrappers' launch arguments; not GPU rounding or speed. Its shapes are smaller.

References are evaluated in float64 on the same float32 inputs. Tolerance: |got - ref| <= rtol |ref| +
atol * scale, with scale = max|ref| unless stated.
"""

import math
import re

import numpy as np
import pytest
from conftest import FAKE_CUDA, needs_cuda

from npgpt import fast
from npgpt.cuda import KERNEL_NAMES, enabled_kernels, kernel_enabled
from npgpt.cuda import emulate
from npgpt.cuda import kernels as K
from npgpt.optim import _adamw_update

EMU_REASON = emulate.unavailable_reason()
f32, f64 = np.float32, np.float64


class Device:
    """Puts NumPy arrays on the executor and brings them back; `guarded` places an array inside a
    NaN-filled buffer so that reads past its ends poison the result and writes past them are seen."""

    def __init__(self, name):
        self.name = name
        self.emulated = name == "emulated"
        if self.emulated:
            self.xp = np
        else:
            import cupy

            self.xp = cupy

    def put(self, a):
        return self.xp.array(a)

    def get(self, a):
        return a if self.emulated else self.xp.asnumpy(a)

    def guarded(self, a, pad=16):
        a = np.ascontiguousarray(a)
        fill = np.nan if a.dtype.kind == "f" else 0x5A
        buf = np.full(a.size + 2 * pad, fill, dtype=a.dtype)
        buf[pad : pad + a.size] = a.reshape(-1)
        dbuf = self.put(buf)
        view = dbuf[pad : pad + a.size].reshape(a.shape)
        head, tail = buf[:pad].copy(), buf[pad + a.size :].copy()

        def check():
            host = self.get(dbuf)
            np.testing.assert_array_equal(host[:pad], head, err_msg="written before the start of the array")
            np.testing.assert_array_equal(host[pad + a.size :], tail, err_msg="written past the end of the array")

        return view, check


@pytest.fixture(params=[pytest.param("emulated", marks=pytest.mark.skipif(bool(EMU_REASON), reason=EMU_REASON or "-")),
                        pytest.param("cupy", marks=[needs_cuda, pytest.mark.cuda])])  # fmt: skip
def dev(request):
    return Device(request.param)


def gpu_only(*shape):
    return pytest.param(*shape, marks=pytest.mark.slow, id="gpu-" + "x".join(map(str, shape)))


def assert_close(got, ref, rtol, atol, what, scale=None):
    got = np.asarray(got, dtype=f64)
    ref = np.asarray(ref, dtype=f64)
    assert got.shape == ref.shape, (what, got.shape, ref.shape)
    assert np.isfinite(got).all(), f"{what}: non-finite values"
    if scale is None:
        scale = float(np.abs(ref).max()) if ref.size else 0.0
    err = np.abs(got - ref)
    bound = rtol * np.abs(ref) + atol * scale
    bad = err > bound
    if bad.any():
        i = tuple(np.argwhere(bad)[0])
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.size} outside rtol={rtol}, atol={atol}*{scale:.3g}; "
                             f"first at {i}: got {got[i]!r}, expected {ref[i]!r}")  # fmt: skip


def big(request):
    return "gpu-" in request.node.callspec.id


# --- LayerNorm: rtol 1e-5, atol 1e-5 * max|ref| -----------------------------------------------------------

LN_SHAPES = [(1, 1), (3, 5), (17, 33), (9, 100), (40, 768), gpu_only(4096, 768), gpu_only(1000, 1600)]


@pytest.mark.parametrize("N, C", LN_SHAPES)
def test_layernorm_fwd(dev, rng, request, N, C):
    if dev.emulated and big(request):
        pytest.skip("large shape: GPU only")
    x = (rng.standard_normal((N, C)) * 2 + 0.5).astype(f32)
    w, b = rng.standard_normal(C).astype(f32), rng.standard_normal(C).astype(f32)
    ref, ref_m, ref_r = np.empty((N, C)), np.empty(N), np.empty(N)
    fast.layernorm_forward(ref, ref_m, ref_r, x.astype(f64), w.astype(f64), b.astype(f64), 1e-5)
    out, c1 = dev.guarded(np.zeros((N, C), f32))
    mean, c2 = dev.guarded(np.zeros(N, f32))
    rstd, c3 = dev.guarded(np.zeros(N, f32))
    K.layernorm_forward(out, mean, rstd, dev.put(x), dev.put(w), dev.put(b), 1e-5)
    c1(), c2(), c3()
    assert_close(dev.get(out), ref, 1e-5, 1e-5, "out")
    assert_close(dev.get(mean), ref_m, 1e-5, 1e-5, "mean")
    assert_close(dev.get(rstd), ref_r, 1e-5, 1e-5, "rstd")


@pytest.mark.parametrize("alias", [False, True], ids=["dx", "dx-is-dout"])
@pytest.mark.parametrize("N, C", LN_SHAPES)
def test_layernorm_bwd(dev, rng, request, N, C, alias):
    if dev.emulated and big(request):
        pytest.skip("large shape: GPU only")
    x = (rng.standard_normal((N, C)) * 2 + 0.5).astype(f32)
    w = rng.standard_normal(C).astype(f32)
    dout = rng.standard_normal((N, C)).astype(f32)
    dw0, db0 = rng.standard_normal(C).astype(f32), rng.standard_normal(C).astype(f32)  # added into
    _, m64, r64 = np.empty((N, C)), np.empty(N), np.empty(N)
    fast.layernorm_forward(_, m64, r64, x.astype(f64), w.astype(f64), w.astype(f64), 1e-5)
    mean, rstd = m64.astype(f32), r64.astype(f32)
    ref_dx, ref_dw, ref_db = np.empty((N, C)), dw0.astype(f64), db0.astype(f64)
    fast.layernorm_backward(ref_dx, ref_dw, ref_db, dout.astype(f64), x.astype(f64), mean.astype(f64), rstd.astype(f64),
                            w.astype(f64), scratch=np.empty((N, C)))  # fmt: skip
    d_dout, c0 = dev.guarded(dout)
    dx, c1 = (d_dout, c0) if alias else dev.guarded(np.zeros((N, C), f32))
    dw, c2 = dev.guarded(dw0)
    db, c3 = dev.guarded(db0)
    K.layernorm_backward(dx, dw, db, d_dout, dev.put(x), dev.put(mean), dev.put(rstd), dev.put(w), scratch=None)
    c0(), c1(), c2(), c3()
    assert_close(dev.get(dx), ref_dx, 1e-5, 1e-5, "dx")
    assert_close(dev.get(dw), ref_dw, 1e-5, 1e-5, "dw")
    assert_close(dev.get(db), ref_db, 1e-5, 1e-5, "db")


def test_layernorm_bwd_is_deterministic_and_uses_scratch(dev, rng):
    N, C = 70, 48
    x = rng.standard_normal((N, C)).astype(f32)
    args = [dev.put(a) for a in (rng.standard_normal((N, C)).astype(f32), x, x.mean(1), 1 / x.std(1), np.ones(C, f32))]
    results = []
    for scratch in (None, dev.put(np.zeros((N, C), f32))):
        dx, dw, db = dev.put(np.zeros((N, C), f32)), dev.put(np.zeros(C, f32)), dev.put(np.zeros(C, f32))
        K.layernorm_backward(dx, dw, db, *args[:4], args[4], scratch=scratch)
        results.append([dev.get(a) for a in (dx, dw, db)])
    assert dev.get(scratch).any(), "the scratch handed in was not used for the partial sums"
    assert all(a.any() for a in results[0]), "nothing written: equal zeros would pass the comparison below"
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


# --- GELU: rtol 1e-5, atol 1e-6 * max|input| -----------------------------------------------------------------

GELU_SHAPES = [(1, 1), (3, 7), (5, 12), (33, 64), gpu_only(1024, 3072), gpu_only(77, 3001)]


def _gelu_ref(x64):
    out = np.empty_like(x64)
    fast.gelu_forward(out, x64, scratch=np.empty((1, fast.ROW_BLOCK, 8 * x64.shape[1])))
    return out


@pytest.mark.parametrize("layout", ["aligned", "offset"])  # offset: 4 bytes off 16-byte alignment -> scalar kernel
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("N, C", GELU_SHAPES)
def test_gelu_bias_fwd(dev, rng, request, N, C, with_bias, layout):
    if dev.emulated and big(request):
        pytest.skip("large shape: GPU only")
    h = (rng.standard_normal((N, C)) * 3).astype(f32)
    bias = rng.standard_normal(C).astype(f32)
    pre32 = (h + bias).astype(f32) if with_bias else h
    ref = _gelu_ref(pre32.astype(f64))
    if layout == "offset":
        hb = dev.put(np.concatenate([np.zeros(1, f32), h.reshape(-1)]))
        d_h = hb[1:].reshape(N, C)
        ob = dev.put(np.zeros(N * C + 1, f32))
        out, c1 = ob[1:].reshape(N, C), (lambda: None)
    else:
        d_h, _ = dev.guarded(h)
        out, c1 = dev.guarded(np.zeros((N, C), f32))
    K.gelu_forward(out, d_h, dev.put(bias) if with_bias else None)
    c1()
    assert_close(dev.get(out), ref, 1e-5, 1e-6, "gelu", scale=np.abs(pre32).max())
    assert_close(dev.get(d_h), pre32, 1e-6, 0, "h + bias, in place")


@pytest.mark.parametrize("N, C", GELU_SHAPES)
def test_gelu_bias_fwd_into_separate_pre(dev, rng, request, N, C):
    if dev.emulated and big(request):
        pytest.skip("large shape: GPU only")
    h = rng.standard_normal((N, C)).astype(f32)
    bias = rng.standard_normal(C).astype(f32)
    d_h = dev.put(h)
    pre, out = dev.put(np.zeros((N, C), f32)), dev.put(np.zeros((N, C), f32))
    K.gelu_forward(out, d_h, dev.put(bias), pre=pre)
    np.testing.assert_array_equal(dev.get(d_h), h)  # untouched
    assert_close(dev.get(pre), (h + bias).astype(f32), 1e-6, 0, "pre")
    pre32 = (h + bias).astype(f32)
    assert_close(dev.get(out), _gelu_ref(pre32.astype(f64)), 1e-5, 1e-6, "gelu", scale=np.abs(pre32).max())


@pytest.mark.parametrize("layout", ["aligned", "offset"])
@pytest.mark.parametrize("N, C", GELU_SHAPES)
def test_gelu_bwd(dev, rng, request, N, C, layout):
    if dev.emulated and big(request):
        pytest.skip("large shape: GPU only")
    x = (rng.standard_normal((N, C)) * 3).astype(f32)
    d0 = rng.standard_normal((N, C)).astype(f32)
    ref = d0.astype(f64)
    fast.gelu_backward_(ref, x.astype(f64), scratch=np.empty((1, fast.ROW_BLOCK, 8 * C)))
    if layout == "offset":
        db_ = dev.put(np.concatenate([np.zeros(1, f32), d0.reshape(-1)]))
        d, c = db_[1:].reshape(N, C), (lambda: None)
    else:
        d, c = dev.guarded(d0)
    K.gelu_backward_(d, dev.put(x))
    c()
    assert_close(dev.get(d), ref, 1e-5, 1e-6, "dgelu", scale=np.abs(d0).max())


# --- cross-entropy: mean loss rtol 1e-5; gradient rtol 1e-5, atol 1e-6 * max|ref| ------------------------

CE_SHAPES = [(1, 1), (3, 5), (5, 1000), (4, 50257), gpu_only(64, 50257), gpu_only(300, 4099)]


def _ce_ref(z, t, ignore_index, dloss):
    z = z.astype(f64)
    N = z.shape[0]
    valid = t != ignore_index
    tt = np.where(valid, t, 0)
    mx = z.max(-1, keepdims=True)
    lse = np.log(np.exp(z - mx).sum(-1)) + mx[:, 0]
    loss = np.where(valid, lse - z[np.arange(N), tt], 0.0).sum() / valid.sum()
    g = np.exp(z - lse[:, None])
    g[np.arange(N), tt] -= 1.0
    g *= (valid * (dloss / valid.sum()))[:, None]
    return loss, g


@pytest.mark.parametrize("want_grad", [True, False], ids=["grad", "loss-only"])
@pytest.mark.parametrize("N, V", CE_SHAPES)
def test_cross_entropy(dev, rng, request, N, V, want_grad):
    if dev.emulated and big(request):
        pytest.skip("large shape: GPU only")
    z0 = (rng.standard_normal((N, V)) * 3).astype(f32)
    t = rng.integers(0, V, N).astype(np.int64)
    if N >= 3:
        t[1] = -100  # an ignored row: no loss, zero gradient
    dloss = 0.7
    ref_loss, ref_g = _ce_ref(z0, t, -100, dloss)
    z, c = dev.guarded(z0)
    loss = K.cross_entropy_(z, dev.put(t), scale=None, want_grad=want_grad, dloss=dloss)
    c()
    assert_close(float(loss), ref_loss, 1e-5, 0, "mean loss")
    if want_grad:
        assert_close(dev.get(z), ref_g, 1e-5, 1e-6, "dlogits")
    else:
        np.testing.assert_array_equal(dev.get(z), z0)


def test_cross_entropy_matches_fast_op(dev, rng):
    N, V = 6, 50257
    z0 = (rng.standard_normal((N, V)) * 2).astype(f32)
    t = rng.integers(0, V, N)
    ref = z0.astype(f64)
    ref_loss = fast.cross_entropy_(ref, t, True)  # leaves (softmax - onehot) / N in ref
    z = dev.put(z0)
    loss = K.cross_entropy_(z, dev.put(t), scale=1.0 / N, want_grad=True)  # scale given: no host sync
    assert_close(float(loss), ref_loss, 1e-5, 0, "loss")
    assert_close(dev.get(z), ref, 1e-5, 1e-6, "dlogits")


# --- AdamW: rtol 1e-5, atol 1e-7 * max|ref|; squared norm rtol 1e-6 ---------------------------------------

ADAM_SIZES = [1, 7, 1000, 5003, gpu_only(3_000_017)]


@pytest.mark.parametrize("masked", [True, False], ids=["mask", "decay-all"])
@pytest.mark.parametrize("n", ADAM_SIZES)
def test_adamw_flat(dev, rng, request, n, masked):
    if dev.emulated and big(request):
        pytest.skip("large shape: GPU only")
    p0 = rng.standard_normal(n).astype(f32)
    m0 = (rng.standard_normal(n) * 0.01).astype(f32)
    v0 = (rng.random(n) * 1e-3).astype(f32)
    mask = rng.random(n) < 0.6 if masked else np.ones(n, bool)
    lr, b1, b2, eps, wd = 3e-4, 0.9, 0.95, 1e-8, 0.1
    P, M, Vv = p0.astype(f64), m0.astype(f64), v0.astype(f64)
    p, c = dev.guarded(p0)
    m, v = dev.put(m0), dev.put(v0)
    d_mask = dev.put(mask.astype(np.uint8)) if masked else None
    for step in (1, 2, 7):
        g = (rng.standard_normal(n) * 0.1).astype(f32)
        bc1, bc2 = 1 - b1**step, 1 - b2**step
        for sel, decay in ((mask, lr * wd), (~mask, 0.0)):
            if sel.any():
                pp, mm, vv = P[sel], M[sel], Vv[sel]
                _adamw_update(pp, g[sel].astype(f64), mm, vv, None, b1, b2, eps, lr, decay, bc1, bc2)
                P[sel], M[sel], Vv[sel] = pp, mm, vv
        K.adamw_flat_(p, dev.put(g), m, v, d_mask, lr, b1, b2, eps, wd, step)
        c()
        assert_close(dev.get(p), P, 1e-5, 1e-7, f"p after step {step}")
        assert_close(dev.get(m), M, 1e-5, 1e-7, f"m after step {step}")
        assert_close(dev.get(v), Vv, 1e-5, 1e-7, f"v after step {step}")


@pytest.mark.parametrize("n", [1, 7, 1000, 5003, gpu_only(10_000_019)])
def test_sq_norm(dev, rng, request, n):
    if dev.emulated and big(request):
        pytest.skip("large shape: GPU only")
    x = rng.standard_normal(n).astype(f32)
    ref = float((x.astype(f64) ** 2).sum())
    flat, c = dev.guarded(x)
    got = K.sq_norm(flat)
    c()
    assert isinstance(got, float)
    assert_close(got, ref, 1e-6, 0, "sum of squares")
    assert K.sq_norm(flat) == got  # deterministic


def test_decay_mask_for_follows_the_flat_layout():
    params = {"a": np.zeros((2, 3)), "b": np.zeros(4), "c": np.zeros((1, 2))}
    mask = K.decay_mask_for(params, {"a": True, "b": False, "c": True}, xp=np)
    assert mask.dtype == np.uint8
    np.testing.assert_array_equal(mask, [1] * 6 + [0] * 4 + [1] * 2)


# --- attention: rtol 1e-4, atol 1e-5 * max|ref| (gradients: * the largest of dq, dk, dv) ----------------

ATT_CASES = [
    # B, NH, T, hs, T_alloc (buffers for a longer T: head stride T_alloc * hs), engine convention
    (1, 1, 1, 16, 1, False),
    (1, 1, 1, 64, 4, True),
    (1, 2, 5, 64, 9, True),
    (2, 1, 33, 32, 40, False),
    (1, 1, 64, 64, 64, True),
    (1, 1, 65, 48, 70, False),
    (1, 1, 97, 128, 100, False),
    (1, 2, 130, 64, 131, True),
    (1, 1, 40, 80, 40, False),
    (1, 1, 40, 96, 41, True),
    (1, 1, 40, 112, 41, False),
    gpu_only(4, 12, 1024, 64, 1024, True),
    gpu_only(2, 4, 257, 128, 300, False),
    gpu_only(1, 3, 1000, 16, 1000, True),
]


def _attention_ref(q, k, v, dout, scale):
    """float64 out, lse, dq, dk, dv of scores = scale * q k^T (causal), via the fast ops at the head level."""
    q, k, v, dout = (a.astype(f64) for a in (q, k, v, dout))
    B, NH, T, hs = q.shape
    qs = q * scale
    bias = np.triu(np.full((T, T), -np.inf), k=1)
    att, out = np.empty((B, NH, T, T)), np.empty((B, NH, T, hs))
    fast.attention_heads_forward(out, att, qs, k, v, bias, None, 1.0)
    s = qs @ np.swapaxes(k, -1, -2) + bias
    mx = s.max(-1, keepdims=True)
    lse = np.log(np.exp(s - mx).sum(-1)) + mx[..., 0]
    dq, dk, dv = np.empty_like(q), np.empty_like(q), np.empty_like(q)
    dq[...] = dout
    fast.attention_heads_backward_(dq, dk, dv, np.empty((B, NH, T, T)), qs, k, v, att, None, 1.0, scale)
    return out, lse, dq, dk, dv


def _padded(dev, a, T_alloc):
    """a (B, NH, T, ...) as a view of a NaN-filled device buffer with T_alloc rows per head."""
    buf = np.full(a.shape[:2] + (T_alloc,) + a.shape[3:], np.nan, dtype=f32)
    buf[:, :, : a.shape[2]] = a
    d = dev.put(buf)
    return d[:, :, : a.shape[2]], d


@pytest.mark.parametrize("B, NH, T, hs, T_alloc, engine_convention", ATT_CASES)
def test_attention(dev, rng, request, B, NH, T, hs, T_alloc, engine_convention):
    if (dev.emulated or FAKE_CUDA) and big(request):  # the stand-in runs kernels in the emulation: 30 min at 4x12x1024
        pytest.skip("large shape: GPU only")
    q0, k0, v0, do0 = ((rng.standard_normal((B, NH, T, hs)) * s).astype(f32) for s in (1.5, 1.5, 1.0, 1.0))
    inv_sqrt = 1.0 / math.sqrt(hs)
    if engine_convention:  # q pre-scaled in float32; scale 1; dq for the unscaled q (dq_mult = 1/sqrt(hs))
        q_in, scale, dq_mult = (q0 * f32(inv_sqrt)).astype(f32), 1.0, inv_sqrt
        out64, lse64, dq64, dk64, dv64 = _attention_ref(q_in, k0, v0, do0, 1.0)
        dq64 = dq64 * inv_sqrt
    else:
        q_in, scale, dq_mult = q0, inv_sqrt, 1.0
        out64, lse64, dq64, dk64, dv64 = _attention_ref(q0, k0, v0, do0, scale)
    (q, _), (k, _), (v, _) = (_padded(dev, a, T_alloc) for a in (q_in, k0, v0))
    out, out_buf = _padded(dev, np.zeros_like(q0), T_alloc)
    lse, lse_buf = _padded(dev, np.zeros((B, NH, T), f32), T_alloc)
    K.attention_fwd(q, k, v, out, lse, scale)
    assert_close(dev.get(out), out64, 1e-4, 1e-5, "out")
    assert_close(dev.get(lse), lse64, 1e-4, 1e-5, "lse")
    assert np.isnan(dev.get(out_buf)[:, :, T:]).all() and np.isnan(dev.get(lse_buf)[:, :, T:]).all(), "wrote past T"

    # backward; dout lives in dq's buffer, as in the engine, on every other case
    dq, dq_buf = _padded(dev, np.zeros_like(q0), T_alloc)
    alias = T % 2 == 1
    if alias:
        dq[...] = dev.put(do0)
        dout = dq
    else:
        dout, _ = _padded(dev, do0, T_alloc)
    dk, dk_buf = _padded(dev, np.zeros_like(q0), T_alloc)
    dv, dv_buf = _padded(dev, np.zeros_like(q0), T_alloc)
    K.attention_bwd(q, k, v, out, lse, dout, dq, dk, dv, scale, dq_mult=dq_mult)
    gmax = max(np.abs(dq64).max(), np.abs(dk64).max(), np.abs(dv64).max())
    assert_close(dev.get(dq), dq64, 1e-4, 1e-5, "dq", scale=gmax)
    assert_close(dev.get(dk), dk64, 1e-4, 1e-5, "dk", scale=gmax)
    assert_close(dev.get(dv), dv64, 1e-4, 1e-5, "dv", scale=gmax)
    for buf in (dq_buf, dk_buf, dv_buf):
        assert np.isnan(dev.get(buf)[:, :, T:]).all(), "wrote past T"


def test_attention_rejects_unsupported_layouts():
    q = np.zeros((1, 1, 8, 24), f32)  # hs 24: not a multiple of 16
    with pytest.raises(ValueError, match="head sizes"):
        K.attention_fwd(q, q, q, q.copy(), np.zeros((1, 1, 8), f32), 1.0)
    q = np.zeros((1, 2, 8, 32), f32)
    with pytest.raises(ValueError, match="contiguous"):
        K.attention_fwd(q.transpose(0, 2, 1, 3).copy().transpose(0, 2, 1, 3), q, q, q.copy(), np.zeros((1, 2, 8), f32), 1.0)


@pytest.mark.skipif(bool(EMU_REASON), reason=EMU_REASON or "-")
@pytest.mark.parametrize("seed", [0, 1, 3])
def test_attention_result_does_not_depend_on_the_schedule(rng, seed, monkeypatch):
    """Blocks and threads in order, reversed, or shuffled: bitwise the same result (no races)."""
    B, NH, T, hs = 1, 2, 70, 32
    q, k, v, do = (rng.standard_normal((B, NH, T, hs)).astype(f32) for _ in range(4))

    def run():
        out, lse = np.zeros_like(q), np.zeros((B, NH, T), f32)
        K.attention_fwd(q, k, v, out, lse, 0.2)
        dq, dk, dv = np.zeros_like(q), np.zeros_like(q), np.zeros_like(q)
        K.attention_bwd(q, k, v, out, lse, do, dq, dk, dv, 0.2)
        return out, lse, dq, dk, dv

    base = run()
    monkeypatch.setattr(emulate, "schedule_seed", seed)
    for a, b in zip(base, run()):
        np.testing.assert_array_equal(a, b)


# --- 16 bits: bfloat16 / float16 activations, float32 arithmetic -----------------------------------------
#
# Each 16-bit kernel against the NumPy fast op at 16 bits (npgpt/fast/, as precision.py defines the CPU's
# 16-bit path: float32 arithmetic on float32 copies, one rounding per stored value) on the same inputs, at
# shapes that are not multiples of the tiles (rows 1, 7, 129; odd widths), in float32, bf16 and fp16, with
# the emulation's shuffling schedule (emulate.schedule_seed = 2). Tolerance at 16 bits: every 16-bit value
# within one unit in the last place (ulp) of T of the fast op's plus the float32 test's absolute term
# (atol * max|ref|: near zero the float32 arithmetic's own error, e.g. GELU's 1 + tanh cancelling, is more
# than an ulp of a tiny result), and where an ulp exceeds that term at most 2% of the values different at
# all (both round a float32 value to nearest even once; they differ only where the two float32 values,
# computed in different orders, straddle a rounding boundary: a kernel that truncated, or rounded twice,
# would differ in about half). float32 results (statistics, sums, the loss) against float64 on the same
# 16-bit inputs, at the float32 tolerances above. float32 activations: as the float32 tests above.

try:
    import ml_dtypes

    BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # ml_dtypes is in the test extra; without it only the fp16/fp32 cases run
    BF16 = None
NO_BF16 = pytest.mark.skipif(BF16 is None, reason="bfloat16 needs ml_dtypes (pip install ml_dtypes)")
DTYPES = [pytest.param("float32", id="fp32"), pytest.param("bfloat16", id="bf16", marks=NO_BF16),
          pytest.param("float16", id="fp16")]  # fmt: skip
SIXTEEN = DTYPES[1:]
EMU_ONLY = pytest.mark.skipif(bool(EMU_REASON), reason=EMU_REASON or "-")


def _dt(name):
    return BF16 if name == "bfloat16" else np.dtype(name)


def ulp(a, b, dtype):
    """One unit in the last place of `dtype` at the larger magnitude of a and b (elementwise; below the
    smallest normal, the smallest normal's)."""
    mant, tiny = {"bfloat16": (7, float(np.finfo(f32).tiny)), "float16": (10, 2.0**-14)}[np.dtype(dtype).name]
    mag = np.maximum(np.maximum(np.abs(a), np.abs(b)), tiny)
    return 2.0 ** (np.floor(np.log2(mag)) - mant)


def assert_16bit_close(got, ref, what, atol=0.0, scale=None):
    """The 16-bit result `got` against the fast op's `ref` (same dtype): each within one ulp plus atol *
    scale (scale = max|ref|: the float32 arithmetic's own error, which near zero exceeds an ulp of the
    result), and at most 2% different at all of those whose ulp exceeds that term (module comment above)."""
    assert got.dtype == ref.dtype and got.shape == ref.shape, (what, got.dtype, ref.dtype, got.shape, ref.shape)
    g, r = got.astype(f64), ref.astype(f64)
    assert np.isfinite(g).all() and np.isfinite(r).all(), f"{what}: non-finite values"
    if scale is None:
        scale = float(np.abs(r).max()) if r.size else 0.0
    err, one = np.abs(g - r), ulp(g, r, got.dtype)
    bad = err > one + atol * scale
    if bad.any():
        i = tuple(np.argwhere(bad)[0])
        raise AssertionError(f"{what}: {int(bad.sum())} of {err.size} more than one ulp + {atol}*{scale:.3g} apart; first "
                             f"at {i}: got {g[i]!r}, the fast op {r[i]!r} ({err[i] / one[i]:.3g} ulps)")  # fmt: skip
    judged = one > atol * scale  # where the float32 error cannot explain a difference of an ulp
    differ = int((judged & (err > 0)).sum())
    assert differ <= max(1, 0.02 * judged.sum()), f"{what}: {differ} of {int(judged.sum())} values differ from the fast op's"


def assert_act_close(got, ref, dtype, rtol, atol, what, scale=None):
    """float32 activations as the float32 tests above; 16-bit ones as assert_16bit_close (with atol)."""
    if np.dtype(dtype) == f32:
        assert_close(got, ref, rtol, atol, what, scale=scale)
    else:
        assert_16bit_close(got, ref, what, atol, scale)


@pytest.fixture(autouse=True)
def launched(monkeypatch):
    """The names of the kernels the wrappers launch (npgpt.cuda.kernels._launch), in order; every launch's
    block is the one LAUNCH_BLOCKS states (what benchmarks/kernel_resources.py computes occupancy from)."""
    names = []
    real = K._launch

    def spy(filename, name, grid, block, *args, **kwargs):
        assert block == K.launch_block(filename, name), f"{name} launched with {block} threads, LAUNCH_BLOCKS says otherwise"
        names.append(name)
        return real(filename, name, grid, block, *args, **kwargs)

    monkeypatch.setattr(K, "_launch", spy)
    return names


# float16's overflow edge (65504 the largest, 65520 the midpoint to 65536), its subnormals' (2^-14 the
# smallest normal, 2^-24 the smallest subnormal, 2^-25 the tie between it and 0, a hair above that tie,
# 3 * 2^-26 the tie between 2^-24 and 2^-23), far below them, bfloat16's largest values and float32's.
EDGES = np.array([65504, 65519.99, 65520, 65535.99, 65536, 2.0**-14, 2.0**-24, 2.0**-25, 2.0**-25 * 1.0000001, 3 * 2.0**-26,
                  1e-9, 0.0, -0.0, np.inf, -np.inf, 3.3895314e38, 3.4028235e38, 3.4e38], np.float32)  # fmt: skip


@EMU_ONLY
def test_standin_conversions_match_ml_dtypes_and_numpy():
    """The emulation's host cuda_bf16.h / cuda_fp16.h: widening every 16-bit pattern, and rounding to
    nearest even (random float32 bit patterns, every 16-bit value, its float32 neighbours and the midpoints
    between neighbouring 16-bit values: the ties, and EDGES), bit for bit as ml_dtypes' bfloat16 and NumPy's
    float16 (NaN: a NaN)."""
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    rng = np.random.default_rng(0)
    for dtype in [d for d in (BF16, np.dtype(np.float16)) if d is not None]:
        values = bits.view(dtype).astype(f32)
        widened = emulate.standin_widen(bits, dtype)
        same = (widened.view(np.uint32) == values.view(np.uint32)) | (np.isnan(widened) & np.isnan(values))
        assert same.all(), f"{dtype}: widening differs at {bits[~same][:5]}"
        finite = np.sort(values[np.isfinite(values)].astype(f64))
        with np.errstate(invalid="ignore", over="ignore"):
            x = np.concatenate([rng.integers(0, 1 << 32, 1 << 18, dtype=np.uint64).astype(np.uint32).view(f32), values,
                                np.nextafter(values, f32(np.inf)), np.nextafter(values, f32(-np.inf)),
                                ((finite[1:] + finite[:-1]) / 2).astype(f32), EDGES])  # fmt: skip
            want = x.astype(dtype).view(np.uint16)
        got = emulate.standin_round(x, dtype)
        nan = np.isnan(x)
        bad = (got != want) & ~nan
        assert not bad.any(), f"{dtype}: {int(bad.sum())} roundings differ, first {x[bad][:3]} -> {got[bad][:3]} not {want[bad][:3]}"
        assert np.isnan(got[nan].view(dtype).astype(f32)).all()


LN16_SHAPES = [(1, 1), (1, 33), (7, 67), (129, 33)]


@pytest.mark.parametrize("N, C", LN16_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_layernorm_16bit(dev, rng, launched, dtype, N, C):
    """Forward and backward (dx in dout's buffer) at the activation dtype, against the fast op on the same
    inputs; dw/db (float32, added into) against float64."""
    dt = _dt(dtype)
    x = (rng.standard_normal((N, C)) * 2 + 0.5).astype(dt)
    w, b = (1 + 0.3 * rng.standard_normal(C)).astype(f32), rng.standard_normal(C).astype(f32)
    ref, ref_m, ref_r = np.empty((N, C), dt), np.empty(N, f32), np.empty(N, f32)
    fast.layernorm_forward(ref, ref_m, ref_r, x, w, b, 1e-5)
    out, mean, rstd = (dev.put(a) for a in (np.zeros((N, C), dt), np.zeros(N, f32), np.zeros(N, f32)))
    K.layernorm_forward(out, mean, rstd, dev.put(x), dev.put(w), dev.put(b), 1e-5)
    out, mean, rstd = dev.get(out), dev.get(mean), dev.get(rstd)
    x64 = x.astype(f64)
    m64 = x64.mean(1)
    r64 = 1 / np.sqrt(((x64 - m64[:, None]) ** 2).mean(1) + 1e-5)
    assert_close(mean, m64, 1e-5, 1e-5, "mean")
    assert_close(rstd, r64, 1e-5, 1e-5, "rstd")
    assert_act_close(out, ref, dt, 1e-5, 1e-5, "out", scale=np.abs(ref.astype(f64)).max())

    dout = rng.standard_normal((N, C)).astype(dt)
    dw0, db0 = rng.standard_normal(C).astype(f32), rng.standard_normal(C).astype(f32)
    ref_dx, ref_dw, ref_db = np.empty((N, C), dt), dw0.copy(), db0.copy()
    fast.layernorm_backward(ref_dx, ref_dw, ref_db, dout, x, mean, rstd, w)
    dx, dw, db = dev.put(dout), dev.put(dw0), dev.put(db0)  # dx is dout's buffer, as the engine passes it
    K.layernorm_backward(dx, dw, db, dx, dev.put(x), dev.put(mean), dev.put(rstd), dev.put(w))
    dx, dw, db = dev.get(dx), dev.get(dw), dev.get(db)
    xhat = (x64 - mean.astype(f64)[:, None]) * rstd.astype(f64)[:, None]
    d64 = dout.astype(f64)
    assert_close(dw, dw0 + (d64 * xhat).sum(0), 1e-5, 1e-5, "dw")
    assert_close(db, db0 + d64.sum(0), 1e-5, 1e-5, "db")
    assert_act_close(dx, ref_dx, dt, 1e-5, 1e-5, "dx", scale=np.abs(ref_dx.astype(f64)).max())
    sfx = K.DTYPE_SUFFIX[dtype]
    assert launched == ["layernorm_fwd" + sfx, "layernorm_bwd_dwdb_partial" + sfx, "layernorm_bwd_dwdb_finalize", "layernorm_bwd_dx" + sfx]


GELU16_SHAPES = [(1, 8), (7, 33), (129, 24), (129, 13)]  # C % 8 == 0: 16-byte packs at every dtype; else scalar


@pytest.mark.parametrize("N, C", GELU16_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gelu_16bit(dev, rng, launched, dtype, N, C):
    """The bias add in place (pre bitwise the fast op's 16-bit x += bias), GELU of the rounded pre, and
    the backward in place, against the fast op on the same inputs; 16-byte packs where C allows."""
    dt = _dt(dtype)
    h = (rng.standard_normal((N, C)) * 3).astype(dt)
    bias = rng.standard_normal(C).astype(dt)
    ref_pre, ref_out = h.copy(), np.empty((N, C), dt)
    fast.gelu_forward(ref_out, ref_pre, bias)
    pre, out = dev.put(h), dev.put(np.zeros((N, C), dt))
    K.gelu_forward(out, pre, dev.put(bias))
    np.testing.assert_array_equal(dev.get(pre).view(np.uint8), ref_pre.view(np.uint8), err_msg="pre = h + bias")
    scale = np.abs(ref_pre.astype(f64)).max()
    assert_act_close(dev.get(out), ref_out, dt, 1e-5, 1e-6, "gelu", scale=scale)

    d0 = rng.standard_normal((N, C)).astype(dt)
    ref_d = d0.copy()
    fast.gelu_backward_(ref_d, ref_pre)
    d = dev.put(d0)
    K.gelu_backward_(d, pre)
    assert_act_close(dev.get(d), ref_d, dt, 1e-5, 1e-6, "dgelu", scale=np.abs(d0.astype(f64)).max())
    P, sfx = 16 // dt.itemsize, K.DTYPE_SUFFIX[dtype]
    vec = C % P == 0  # the test arrays are fresh allocations: 16-byte aligned (NumPy's, CuPy's 256)
    assert launched == ([f"gelu_bias_fwd_vec{P}{sfx}", f"gelu_bwd_inplace_vec{P}{sfx}"] if vec
                        else ["gelu_bias_fwd" + sfx, "gelu_bwd_inplace" + sfx])  # fmt: skip


CE16_SHAPES = [(1, 1), (7, 1001), (129, 67), (2, 50257)]


@pytest.mark.parametrize("N, V", CE16_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_16bit(dev, rng, launched, dtype, N, V):
    """16-bit logits: the loss in float32 (against float64 on the same logits), the gradient written back
    over them at 16 bits (against the fast op), an ignored row zero; fp16 with a loss scale of 1024."""
    dt = _dt(dtype)
    z0 = (rng.standard_normal((N, V)) * 3).astype(dt)
    t = rng.integers(0, V, N).astype(np.int64)
    if N >= 7:
        t[3] = -100
    dloss = 1024.0 if dtype == "float16" else 0.7
    n_valid = int((t != -100).sum())
    ref = z0.copy()
    ref_loss = fast.cross_entropy_(ref, t, True, dloss, n_valid=n_valid)
    loss64, g64 = _ce_ref(z0.astype(f64), t, -100, dloss)
    z = dev.put(z0)
    loss = K.cross_entropy_(z, dev.put(t), True, dloss, n_valid=n_valid)
    z = dev.get(z)
    assert_close(float(loss), loss64, 1e-5, 0, "mean loss")
    assert_close(ref_loss, loss64, 1e-5, 0, "the fast op's mean loss")
    assert_act_close(z, ref, dt, 1e-5, 1e-6, "dlogits")
    if dtype != "float32":  # and the fast op's 16-bit gradient is the float64 one, rounded
        assert_close(ref, g64, 2.0 ** -(8 if dtype == "bfloat16" else 11), 1e-6, "the fast op's dlogits")
    if N >= 7:
        assert not z[3].astype(f64).any(), "an ignored row's gradient is zero"
    assert launched == ["cross_entropy_fwd_bwd" + K.DTYPE_SUFFIX[dtype]]


@pytest.mark.parametrize("n", [1, 7, 1000, 5003])
@pytest.mark.parametrize("dtype", SIXTEEN)
def test_adamw_flat_writes_the_16bit_copy(dev, rng, launched, dtype, n):
    """AdamW with the weights' 16-bit copy: p, m, v as the float32 kernel's (bitwise: one template), and
    the copy bitwise p rounded to the 16-bit dtype, over three steps."""
    dt = _dt(dtype)
    p0, m0, v0 = rng.standard_normal(n).astype(f32), (rng.standard_normal(n) * 0.01).astype(f32), (rng.random(n) * 1e-3).astype(f32)
    mask = (rng.random(n) < 0.6).astype(np.uint8)
    p, m, v, p32, m32, v32 = (dev.put(a) for a in (p0, m0, v0, p0, m0, v0))
    copy, d_mask = dev.put(np.zeros(n, dt)), dev.put(mask)
    for step in (1, 2, 3):
        g = dev.put((rng.standard_normal(n) * 0.1).astype(f32))
        K.adamw_flat_(p, g, m, v, d_mask, 3e-4, 0.9, 0.95, 1e-8, 0.1, step, copy=copy)
        K.adamw_flat_(p32, g, m32, v32, d_mask, 3e-4, 0.9, 0.95, 1e-8, 0.1, step)
        for a, b, what in ((p, p32, "p"), (m, m32, "m"), (v, v32, "v")):
            np.testing.assert_array_equal(dev.get(a), dev.get(b), err_msg=what)
        np.testing.assert_array_equal(dev.get(copy).view(np.uint16), dev.get(p).astype(dt).view(np.uint16),
                                      err_msg=f"copy after step {step}")  # fmt: skip
    assert launched == [f"adamw_flat{K.DTYPE_SUFFIX[dtype]}", "adamw_flat"] * 3
    with pytest.raises(ValueError, match="bfloat16 or float16 array of 1000 elements"):
        K.adamw_flat_(np.zeros(1000, f32), *(np.zeros(1000, f32) for _ in range(3)), None, 1e-3, 0.9, 0.95, 1e-8, 0.0, 1,
                      copy=np.zeros(999, dt))  # fmt: skip


@EMU_ONLY
@pytest.mark.parametrize("seed", [0, 1, 3])
def test_16bit_kernels_do_not_depend_on_the_schedule(rng, seed, monkeypatch):
    """In order, reversed, or shuffled: bitwise the same 16-bit results (the kernels with barriers and
    shuffles: LayerNorm's backward, the loss)."""
    dt = np.dtype(np.float16)
    N, C, V = 70, 48, 300
    x, dout = rng.standard_normal((N, C)).astype(dt), rng.standard_normal((N, C)).astype(dt)
    w = rng.standard_normal(C).astype(f32)
    z0, t = (rng.standard_normal((5, V)) * 3).astype(dt), rng.integers(0, V, 5)

    def run():
        out, mean, rstd = np.zeros((N, C), dt), np.zeros(N, f32), np.zeros(N, f32)
        K.layernorm_forward(out, mean, rstd, x, w, w, 1e-5)
        dx, dw, db = np.zeros((N, C), dt), np.zeros(C, f32), np.zeros(C, f32)
        K.layernorm_backward(dx, dw, db, dout, x, mean, rstd, w)
        z = z0.copy()
        loss = K.cross_entropy_(z, t, True, 1.0, n_valid=5)
        return out, mean, rstd, dx, dw, db, z, np.asarray(loss)

    base = run()
    monkeypatch.setattr(emulate, "schedule_seed", seed)
    for a, b in zip(base, run()):
        np.testing.assert_array_equal(a, b)


def test_16bit_wrappers_refuse_mixed_dtypes():
    h = np.zeros((2, 8), np.float16)
    with pytest.raises(ValueError, match="out is float32, but the activations are float16"):
        K.gelu_forward(np.zeros((2, 8), f32), h, None)
    with pytest.raises(ValueError, match="x must be float32, bfloat16 or float16, got float64"):
        K.layernorm_forward(np.zeros((2, 8)), np.zeros(2, f32), np.zeros(2, f32), np.zeros((2, 8)), np.ones(8, f32),
                            np.zeros(8, f32), 1e-5)  # fmt: skip
    with pytest.raises(ValueError, match="weight must be float32"):  # LayerNorm reads the float32 master weights
        K.layernorm_forward(h.copy(), np.zeros(2, f32), np.zeros(2, f32), h, np.ones(8, np.float16), np.zeros(8, f32), 1e-5)


def test_every_kernel_name_says_which_dtypes_it_takes():
    """resolve_kernels keeps a kernel only for the dtypes KERNEL_DTYPES lists: a new kernel name must say."""
    assert set(K.KERNEL_DTYPES) == set(KERNEL_NAMES)
    for name, dtypes in K.KERNEL_DTYPES.items():
        assert set(dtypes) <= {"float32", "bfloat16", "float16", "float64"}, name


# --- host-side pieces (no GPU, no compiler) -------------------------------------------------------------


def test_enabled_kernels_reads_the_environment(monkeypatch):
    from npgpt.cuda import DEFAULT_ON

    monkeypatch.delenv("NPGPT_CUDA_KERNELS", raising=False)
    assert enabled_kernels() == set(DEFAULT_ON) and DEFAULT_ON <= set(KERNEL_NAMES)  # what a GPU verified
    monkeypatch.setattr("npgpt.cuda.DEFAULT_ON", frozenset({"gelu", "bmm"}))
    assert enabled_kernels() == {"gelu", "bmm"}
    monkeypatch.setenv("NPGPT_CUDA_KERNELS", "none")
    assert enabled_kernels() == set()
    monkeypatch.setenv("NPGPT_CUDA_KERNELS", " LayerNorm, gelu ,")
    assert enabled_kernels() == {"layernorm", "gelu"}
    assert kernel_enabled("gelu") and not kernel_enabled("attention")
    monkeypatch.setenv("NPGPT_CUDA_KERNELS", "all")
    assert enabled_kernels() == set(KERNEL_NAMES)
    assert enabled_kernels("none") == set() and enabled_kernels("") == set()
    with pytest.raises(ValueError, match="unknown kernel name"):
        enabled_kernels("layernrom")
    with pytest.raises(ValueError, match="unknown kernel"):
        kernel_enabled("softmax")


def test_expanded_source_inlines_the_shared_header():
    """Our headers are inlined (CuPy's cache key covers the source string); only the CUDA runtime's 16-bit
    type headers stay #include <...> lines (CuPy puts their folder on NVRTC's include path)."""
    for name in K.KERNEL_ENTRIES:
        text = K.expanded_source(name, defines=(("NPGPT_X", 1),))
        assert not re.search(r"^\s*#\s*(include\s*\"|pragma\s+once)", text, flags=re.M)
        assert set(re.findall(r"^\s*#\s*include\s*<([^>]+)>", text, flags=re.M)) <= {"cuda_bf16.h", "cuda_fp16.h"}
        assert text.startswith("#define NPGPT_X 1\n")
        assert "npgpt_warp_sum" in text  # common.cuh's text is in


# --- the 16-bit kernels in the engine, on the CPU stand-in for CuPy ------------------------------------------

SIXTEEN_BIT_KERNELS = {"layernorm", "gelu", "cross_entropy", "adamw", "sq_norm", "bmm", "attention_softmax"}


def _16bit_updates(device, precision, updates=2):
    """(losses, grad norms, float64 weights, the last gradients (float64), engine) after `updates` updates of a 2-layer model (emb 32, 2 heads)
    on one batch through update.Updater with AdamW and clipping (fp16: a loss scale), on "cpu" (the NumPy
    fast engine at 16 bits, its attention the GPU's path, FusedSoftmaxAttention, over the kernels' NumPy
    twins, so both round attention's values at the same points) or "cuda" (the stand-in, with
    $NPGPT_CUDA_KERNELS)."""
    import dataclasses

    import npgpt
    from npgpt import fast
    from npgpt.backend import to_numpy
    from npgpt.engine import FastLossAndGrads
    from npgpt.model_check import random_params, tiny_config
    from npgpt.optim import AdamW
    from npgpt.precision import LossScaler
    from npgpt.update import Updater

    cfg = tiny_config(emb_dim=32, n_heads=2, n_layers=2, vocab_size=61)
    host = {k: v.astype(f32) for k, v in random_params(cfg, np.random.default_rng(0)).items()}
    model = npgpt.GPT(cfg, dtype=f32, device="cpu")
    if device == "cuda":
        import cupy

        host = {k: cupy.asarray(v) for k, v in host.items()}
    model.params = host
    model.flatten_params_()
    engine = FastLossAndGrads(model, 2, 8, precision=precision)
    if device == "cpu":
        engine.ops = dataclasses.replace(engine.ops, batched_matmul=fast.matmul, softmax_forward=fast.attention_softmax_forward_,
                                         softmax_backward=fast.attention_softmax_backward_,
                                         softmax_dropout=fast.attention_dropout_)  # fmt: skip
    scaler = LossScaler(scale=1024.0) if precision == "fp16" else None
    updater = Updater(engine, AdamW(model.params, lr=3e-3), grad_clip=1.0, scaler=scaler)
    rng = np.random.default_rng(1)
    x, y = rng.integers(0, cfg.vocab_size, (2, 8)), rng.integers(0, cfg.vocab_size, (2, 8))
    results = [updater([(x, y, None)]) for _ in range(updates)]
    assert all(r.applied for r in results)
    weights = np.concatenate([to_numpy(p).reshape(-1).astype(f64) for p in model.params.values()])
    return [r.loss for r in results], [r.grad_norm for r in results], weights, to_numpy(engine.grad_flat).astype(f64), engine


@pytest.mark.skipif(bool(EMU_REASON), reason=EMU_REASON or "-")
@pytest.mark.parametrize("precision", [pytest.param("bf16", marks=NO_BF16), "fp16"])
def test_16bit_engine_on_the_stand_in_runs_the_16bit_kernels(fake_cupy, monkeypatch, launched, precision):
    """--precision bf16|fp16 with every kernel on (NPGPT_CUDA_KERNELS=all): the step launches the 16-bit
    LayerNorm, GELU, loss and attention-softmax kernels and no float32 one, AdamW writes the 16-bit weights in its pass (the
    second update's forward finds them current), and two updates match the CPU's 16-bit fast engine: losses
    and gradient norms to 2e-3, the last gradients to 1e-2 (gradcheck's relative_error), the weights'
    change to 10% of its norm. The CPU engine runs attention on the GPU's path (FusedSoftmaxAttention)
    over the kernels' NumPy twins (_16bit_updates), so the two differ only in the sums' order (a kernel's
    LayerNorm statistics, the loss's and the softmax's row sums) moving a value across a 16-bit rounding
    boundary now and then; measured: bf16 3e-8 everywhere (up to 3e-7 for the weights), fp16 losses 1e-4,
    norms 1.1e-3, gradients 1.6e-3, the weights' change 4% (AdamW moves each weight by about lr whatever
    its gradient's size, so a gradient that is rounding noise on both sides moves its weight either way)."""
    monkeypatch.setenv("NPGPT_CUDA_KERNELS", "all")
    refreshes = []
    real_refresh = __import__("npgpt.engine.gpt", fromlist=["x"]).FastLossAndGrads._refresh_low_precision_weights

    def refresh(self):
        refreshes.append(self.weights_copy_current)
        return real_refresh(self)

    monkeypatch.setattr("npgpt.engine.gpt.FastLossAndGrads._refresh_low_precision_weights", refresh)
    gpu_losses, gpu_norms, gpu_w, gpu_g, engine = _16bit_updates("cuda", precision)
    assert engine.kernels == SIXTEEN_BIT_KERNELS
    sfx = "_bf16" if precision == "bf16" else "_f16"
    want = {k + sfx for k in ("layernorm_fwd", "layernorm_bwd_dwdb_partial", "layernorm_bwd_dx", "gelu_bias_fwd_vec8",
                              "gelu_bwd_inplace_vec8", "cross_entropy_fwd_bwd", "adamw_flat", "attention_softmax_fwd",
                              "attention_softmax_bwd")}  # fmt: skip
    assert want <= set(launched), sorted(want - set(launched))
    assert {"layernorm_bwd_dwdb_finalize", "sq_norm_partial", "sq_norm_finalize"} <= set(launched)
    activation_files = ("layernorm.cu", "gelu.cu", "cross_entropy.cu", "attention_softmax.cu")
    float32_activation_kernels = {k for f in activation_files for k in K.KERNEL_ENTRIES[f]
                                  if not k.endswith(("_bf16", "_f16")) and k != "layernorm_bwd_dwdb_finalize"}  # fmt: skip
    assert not float32_activation_kernels & set(launched)
    assert launched.count("adamw_flat" + sfx) == 2 and "adamw_flat" not in launched
    assert refreshes == [False, True]  # the second update's forward: the copy AdamW wrote is current
    host = np.concatenate([p.get().reshape(-1) for p in engine.model.params.values()]).astype(engine.dtype)
    np.testing.assert_array_equal(engine.param_flat.get().view(np.uint16), host.view(np.uint16))

    from npgpt.gradcheck import relative_error

    cpu_losses, cpu_norms, cpu_w, cpu_g, _ = _16bit_updates("cpu", precision)
    w0 = _16bit_updates("cpu", precision, updates=0)[2]
    for a, b, what in ((gpu_losses, cpu_losses, "loss"), (gpu_norms, cpu_norms, "gradient norm")):
        assert np.allclose(a, b, rtol=2e-3, atol=0), (what, a, b)
    assert relative_error(gpu_g, cpu_g) < 1e-2
    assert np.linalg.norm(gpu_w - cpu_w) < 0.1 * np.linalg.norm(cpu_w - w0)
