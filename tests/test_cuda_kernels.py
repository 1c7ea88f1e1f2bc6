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
    for name in K.KERNEL_ENTRIES:
        text = K.expanded_source(name, defines=(("NPGPT_X", 1),))
        assert not re.search(r"^\s*#\s*(include|pragma\s+once)", text, flags=re.M)
        assert text.startswith("#define NPGPT_X 1\n")
        assert "npgpt_warp_sum" in text  # common.cuh's text is in
