"""npgpt's CuPy code paths, run on the CPU through tests/fake_cupy.py (a NumPy stand-in for CuPy that
behaves as CuPy 14.2 where it matters: N-D matmul, cuBLAS's strided-batched GEMM, 0-d device results,
host transfers counted). Each test names the bug of issue 13 it would have caught on the first GPU run:

1. bf16 attention products went to CuPy's N-D matmul, which raises for bfloat16 (fp16 and TF32 are
   silently slow there); they must go through cuBLAS's strided-batched GEMM (npgpt.cuda.blas.bmm).
3. under MPI every rank allocated its model on GPU 0 before choosing its own GPU.
4. float64 with NPGPT_CUDA_KERNELS=all raised "must be float32" (no kernel of ours takes float64).
5. CPU training touched CuPy's TF32 state (and crashed where CuPy was importable but no GPU worked).
6. about 150 host-device synchronisations per training step; the budget is one (the loss and the
   gradient norm, read together).
7. the one-rank NCCL run never reached the all-reduce.
The same paths on a real GPU: tests/test_gpu_training.py, test_engine.py, test_cuda_blas.py (`-m cuda`).
"""

import json

import numpy as np
import pytest

import npgpt
from npgpt import backend
from npgpt.backend import to_numpy
from npgpt.cuda import blas
from npgpt.distributed import SingleProcess
from npgpt.engine import FastLossAndGrads
from npgpt.gradcheck import relative_error
from npgpt.model_check import random_params, tiny_config
from npgpt.optim import AdamW, clip_grad_norm, grad_norm
from npgpt.precision import LossScaler
from npgpt.update import Updater

EMULATION = pytest.mark.skipif(__import__("shutil").which("g++") is None, reason="the kernel emulation needs g++")


def make_model(device, dtype=np.float32, **cfg_kw):
    """The same random weights on the CPU or on the fake GPU (init scale of a real model, so that 16-bit
    rounding is what it would be in training)."""
    cfg = tiny_config(**{"emb_dim": 32, "n_heads": 2, "n_layers": 2, **cfg_kw})
    host = {k: v.astype(dtype) for k, v in random_params(cfg, np.random.default_rng(0)).items()}
    model = npgpt.GPT(cfg, dtype=dtype, device="cpu")
    if device == "cuda":
        import cupy

        host = {k: cupy.asarray(v) for k, v in host.items()}
    model.params = host
    return model


def batch(cfg, b=2, t=8, seed=1):
    rng = np.random.default_rng(seed)
    return rng.integers(0, cfg.vocab_size, (b, t)), rng.integers(0, cfg.vocab_size, (b, t))


def step_pair(fake_cupy, precision="fp32", dtype=np.float32, kernels=None, **cfg_kw):
    """(loss, grad_flat) of one fast step on the CPU and on the fake GPU, same weights and batch."""
    out = []
    for device in ("cpu", "cuda"):
        model = make_model(device, dtype, **cfg_kw)
        engine = FastLossAndGrads(model, 2, 8, precision=precision, kernels=kernels if device == "cuda" else None)
        x, y = batch(model.config)
        loss = engine(x, y, dloss=0.5)
        out.append((loss, to_numpy(engine.grad_flat).astype(np.float64), engine))
    return out


# --- 1. 16-bit and TF32 attention products -----------------------------------------------------------------


@pytest.mark.parametrize("precision, data_type", [("bf16", blas.CUDA_R_16BF), ("fp16", blas.CUDA_R_16F)])
def test_16bit_attention_products_go_through_cublas_not_cupy_matmul(fake_cupy, precision, data_type):
    """Without NPGPT_CUDA_KERNELS: every 4-D product of attention is one strided-batched cuBLAS call
    with float32 accumulation; none reaches CuPy's N-D matmul (which raises for bf16, and multiplies
    fp16 in float32 without tensor cores). The step matches the CPU's 16-bit step."""
    (cpu_loss, cpu_g, _), (gpu_loss, gpu_g, engine) = step_pair(fake_cupy, precision=precision)
    assert engine.kernels == set()
    assert [c for c in fake_cupy.matmul_calls if c[0] > 2] == []
    L = engine.model.config.n_layers
    assert fake_cupy.gemm_calls == [(data_type, blas.CUBLAS_COMPUTE_32F, 2 * 2)] * (6 * L)  # B * NH matrices each
    assert abs(gpu_loss - cpu_loss) <= 2e-3 * abs(cpu_loss)
    assert relative_error(gpu_g, cpu_g) < 2e-2  # 16-bit activations: rounding differs where the sum order does


@pytest.mark.parametrize("tf32", [True, False])
def test_float32_attention_products_honour_tf32(fake_cupy, tf32):
    """With TF32 on, attention's float32 products use TF32 tensor cores (cuBLAS compute type
    FAST_TF32), which CuPy's N-D matmul would ignore; with it off they stay CuPy's exact float32."""
    with backend.tf32_mode(tf32):
        (cpu_loss, cpu_g, _), (gpu_loss, gpu_g, engine) = step_pair(fake_cupy)
    nd = [c for c in fake_cupy.matmul_calls if c[0] > 2]
    if tf32:
        assert nd == [] and {c[1] for c in fake_cupy.gemm_calls} == {blas.CUBLAS_COMPUTE_32F_FAST_TF32}
    else:
        assert fake_cupy.gemm_calls == [] and len(nd) == 6 * engine.model.config.n_layers
    tol = 1e-3 if tf32 else 1e-6  # TF32 keeps 10 of float32's 23 mantissa bits in the products
    assert abs(gpu_loss - cpu_loss) <= tol * abs(cpu_loss)
    assert relative_error(gpu_g, cpu_g) < 10 * tol


def test_bmm_enabled_routes_every_dtype_through_cublas(fake_cupy, monkeypatch):
    """NPGPT_CUDA_KERNELS=bmm: float64 attention too goes through bmm (no copies of transposed operands)."""
    monkeypatch.setenv("NPGPT_CUDA_KERNELS", "bmm")
    (cpu_loss, cpu_g, _), (gpu_loss, gpu_g, engine) = step_pair(fake_cupy, dtype=np.float64)
    assert engine.kernels == {"bmm"}
    assert {c[:2] for c in fake_cupy.gemm_calls} == {(blas.CUDA_R_64F, blas.CUBLAS_COMPUTE_64F)}
    assert abs(gpu_loss - cpu_loss) <= 1e-12 * abs(cpu_loss)
    assert relative_error(gpu_g, cpu_g) < 1e-12


# --- 4. float64 with every kernel enabled --------------------------------------------------------------------


def test_float64_with_every_kernel_enabled_uses_only_what_supports_it(fake_cupy, monkeypatch):
    """NPGPT_CUDA_KERNELS=all on a float64 model: the float32-only kernels stay off (the step, AdamW and
    the gradient norm), bmm stays on, and a whole update equals the CPU's to 1e-12."""
    monkeypatch.setenv("NPGPT_CUDA_KERNELS", "all")
    results = []
    for device in ("cpu", "cuda"):
        model = make_model(device, np.float64)
        engine = FastLossAndGrads(model, 2, 8)
        updater = Updater(engine, AdamW(model.params, lr=1e-3), grad_clip=0.5)
        x, y = batch(model.config)
        r = updater([(x, y, None)])
        results.append((r.loss, r.grad_norm, to_numpy(model.params["h.0.attn.c_attn.weight"])))
        if device == "cuda":
            assert engine.kernels == {"bmm"}
    (l0, n0, w0), (l1, n1, w1) = results
    assert abs(l1 - l0) <= 1e-12 * l0 and abs(n1 - n0) <= 1e-12 * n0
    assert relative_error(w1, w0) < 1e-12


def test_resolve_kernels_keeps_each_kernel_to_the_dtypes_it_takes():
    """float32: every kernel; 16 bits: LayerNorm, GELU, the loss, AdamW, the norm, the fused attention
    softmax and bmm, not the float32 flash attention; float64: bmm alone. From $NPGPT_CUDA_KERNELS the
    others are left out; named, an error."""
    from npgpt.engine import resolve_kernels

    gpu = object()  # any module other than numpy: $NPGPT_CUDA_KERNELS applies
    every = resolve_kernels(["layernorm", "gelu", "bmm"], gpu, "fp32", np.float32, 64)
    assert every == {"layernorm", "gelu", "bmm"}
    assert resolve_kernels(None, gpu, "fp32", np.float64, 64) == set()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NPGPT_CUDA_KERNELS", "all")
        assert resolve_kernels(None, gpu, "fp32", np.float64, 64) == {"bmm"}
        sixteen = {"layernorm", "gelu", "cross_entropy", "adamw", "sq_norm", "bmm", "attention_softmax"}
        assert resolve_kernels(None, gpu, "fp16", np.dtype("float16"), 64) == sixteen
        assert resolve_kernels(None, gpu, "fp32", np.float32, 64) == set(npgpt.cuda.KERNEL_NAMES)
    with pytest.raises(ValueError, match=r"dtype float64 cannot use the CUDA kernel\(s\) layernorm \(float32/bfloat16/float16 only\)"):
        resolve_kernels(["layernorm"], gpu, "fp32", np.float64, 64)
    with pytest.raises(ValueError, match=r"attention_softmax \(float32/bfloat16/float16 only\)"):
        resolve_kernels(["attention_softmax"], gpu, "fp32", np.float64, 64)  # float32 and 16-bit storage only
    with pytest.raises(ValueError, match=r"attention \(float32 only\); name only kernels that take float16: adamw, attention_softmax, bmm"):
        resolve_kernels(["gelu", "attention"], gpu, "fp16", np.dtype("float16"), 64)


# --- 6. one host transfer per step -----------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_an_update_reads_the_device_once(fake_cupy, precision):
    """A whole optimizer update (two accumulated micro-batches, clipping, the finite test, AdamW) reads
    from the GPU once: the loss and the gradient norm together. Before: four reads in the id checks,
    one per loss, and one per gradient tensor in the norm."""
    model = make_model("cuda")
    engine = FastLossAndGrads(model, 2, 8, precision=precision)
    scaler = LossScaler(scale=1024.0) if precision == "fp16" else None
    updater = Updater(engine, AdamW(model.params, lr=1e-3), grad_clip=0.01, scaler=scaler)
    x, y = batch(model.config)
    for _ in range(3):
        fake_cupy.reset_counts()
        r = updater([(x, y, None), (y, x, None)])
        assert fake_cupy.host_transfers == 1, fake_cupy.host_transfers
        assert r.applied and np.isfinite(r.loss) and r.grad_norm > 0.01


@EMULATION
def test_an_update_with_every_kernel_reads_the_device_once(fake_cupy, monkeypatch):
    """The same with NPGPT_CUDA_KERNELS=all (the kernels run in the CPU emulation): the cross-entropy
    kernel's loss and the sq_norm kernel's norm stay on the device until the one read."""
    monkeypatch.setenv("NPGPT_CUDA_KERNELS", "all")
    model = make_model("cuda", emb_dim=32, n_heads=2)  # head size 16: the flash kernel's smallest
    engine = FastLossAndGrads(model, 2, 8)
    assert engine.kernels >= {"attention", "cross_entropy", "layernorm", "gelu"}
    updater = Updater(engine, AdamW(model.params, lr=1e-3), grad_clip=0.01)
    x, y = batch(model.config)
    fake_cupy.reset_counts()
    r = updater([(x, y, None)])
    assert fake_cupy.host_transfers == 1
    cpu = make_model("cpu")
    ref = Updater(FastLossAndGrads(cpu, 2, 8), AdamW(cpu.params, lr=1e-3), grad_clip=0.01)([(x, y, None)])
    assert abs(r.loss - ref.loss) <= 1e-5 * ref.loss and abs(r.grad_norm - ref.grad_norm) <= 1e-5 * ref.grad_norm
    assert relative_error(to_numpy(model.params["wte.weight"]), cpu.params["wte.weight"]) < 1e-5


def test_device_ids_are_checked_on_the_host_before_the_copy(fake_cupy):
    """Bad ids fail before anything is copied to the GPU, and good ones cost no read from it."""
    model = make_model("cuda")
    engine = FastLossAndGrads(model, 2, 8)
    x, y = batch(model.config)
    fake_cupy.reset_counts()
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 37\)"):
        engine(np.where(x == x[0, 0], 37, x), y)
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 37\) or equal ignore_index"):
        engine(x, np.where(y == y[0, 0], -3, y))
    assert fake_cupy.host_transfers == 0
    import cupy

    engine(cupy.asarray(x), cupy.asarray(y), sync=False)  # ids already on the GPU: one read for all the checks
    assert fake_cupy.host_transfers == 1


def test_grad_norm_and_clipping_on_the_device_match_the_host(fake_cupy):
    rng = np.random.default_rng(5)
    host = {"a": rng.standard_normal((3, 4)).astype(np.float32), "b": rng.standard_normal(7).astype(np.float32)}
    flat = np.concatenate([v.reshape(-1) for v in host.values()])
    import cupy

    dev_flat = cupy.asarray(flat)
    dev = npgpt.backend.views_into(dev_flat, host)
    fake_cupy.reset_counts()
    norm = grad_norm(dev, sync=False)
    clipped = clip_grad_norm(dev, 1.0, sync=False)
    assert fake_cupy.host_transfers == 0
    assert float(norm) == pytest.approx(float(np.linalg.norm(flat.astype(np.float64))), rel=1e-6)
    assert float(clipped) == pytest.approx(float(norm), rel=1e-6)
    assert float(np.linalg.norm(to_numpy(dev_flat).astype(np.float64))) == pytest.approx(1.0, rel=1e-5)
    assert to_numpy(dev_flat)[1] == pytest.approx(flat[1] / np.linalg.norm(flat), rel=1e-5)
    dev_flat[0] = np.nan
    before = to_numpy(dev_flat)
    assert np.isnan(float(clip_grad_norm(dev, 1.0, sync=False)))  # a non-finite norm leaves the gradients as they are
    np.testing.assert_array_equal(to_numpy(dev_flat), before)


def test_bench_step_waits_on_the_current_stream(fake_cupy):
    """`npgpt bench` times a step by waiting for CuPy's current stream (where npgpt's work is queued),
    not the legacy null stream."""
    from npgpt.bench import NpgptStep

    model = make_model("cuda")
    step = NpgptStep(model, 2, 8, "fast")
    x, y = batch(model.config)
    fake_cupy.reset_counts()
    step(x, y, False, None)
    assert (fake_cupy.stream_syncs, fake_cupy.null_syncs, fake_cupy.host_transfers) == (1, 0, 1)


# --- the trainer on the fake GPU: 3, 5 and 6 together ----------------------------------------------------------


TINY = dict(preset="nano", emb_dim=32, n_heads=2, n_layers=1, context_length=16, batch_size=2, drop_rate=0.0,
            progress=False, sample_tokens=2, eval_batches=1, eval_interval=100, max_steps=3)  # fmt: skip


class LocalRankOne(SingleProcess):
    """An MPI world as rank 0 sees it on a node whose GPU 1 is its own (one process, so the
    collectives stay trivial); records what the trainer asks of it."""

    backend, local_rank = "mpi", 1
    nccl_setups = 0

    def setup_nccl(self):
        self.nccl_setups += 1


def test_each_rank_allocates_on_its_own_gpu(fake_cupy, monkeypatch, tmp_path):
    """Under MPI the rank's GPU (local rank 1 here, of 2) is chosen before anything is allocated:
    every allocation of the run, the CUDA probe's included, lands on GPU 1."""
    from npgpt import train as train_mod

    fake_cupy.reset(devices=2)
    world = LocalRankOne()
    monkeypatch.setattr(train_mod, "get_world", lambda: world)
    train_mod.train(train_mod.TrainConfig(**TINY, device="cuda", out_dir=str(tmp_path / "run")))
    uses = [e for e in fake_cupy.events if e[0] == "use"]
    allocs = {e[1] for e in fake_cupy.events if e[0] == "alloc"}
    assert uses and uses[0] == ("use", 1) and fake_cupy.events.index(uses[0]) == 0, fake_cupy.events[:3]
    assert allocs == {1}
    assert world.nccl_setups == 1


def test_cuda_training_reads_the_device_once_per_step(fake_cupy, monkeypatch, tmp_path, capsys):
    """`npgpt train` on the (fake) GPU: one host read per optimizer step, with gradient accumulation
    and clipping on; TF32 is on for the CUDA model while it trains (the banner says so), and off again
    once the run has ended (issue 25: it leaked into every later float32 product)."""
    from npgpt import train as train_mod

    per_step, tf32 = [], []
    real_step = train_mod.Pretraining.train_step

    def counted(self, number):
        before = fake_cupy.host_transfers
        tf32.append(fake_cupy.effective_compute_type())
        out = real_step(self, number)
        per_step.append(fake_cupy.host_transfers - before)
        return out

    monkeypatch.setattr(train_mod.Pretraining, "train_step", counted)
    result = train_mod.train(train_mod.TrainConfig(**{**TINY, "grad_accum": 2}, device="cuda", out_dir=str(tmp_path / "r")))
    assert per_step == [1, 1, 1] and result.steps == 3
    assert tf32 == [fake_cupy.COMPUTE_TYPE_TF32] * 3
    assert "on cuda (TF32 on), float32" in capsys.readouterr().out
    assert fake_cupy.effective_compute_type() == fake_cupy.COMPUTE_TYPE_DEFAULT and not backend.tf32_enabled()
    assert "CUPY_TF32" not in __import__("os").environ


def test_cpu_training_and_bench_leave_cuda_alone(fake_cupy, monkeypatch, tmp_path):
    """CuPy importable (here, the fake) but the run is on the CPU: neither `npgpt train` nor `npgpt bench`
    touches CUDA state (CuPy's TF32 compute type, $CUPY_TF32) or makes a CUDA allocation."""
    from npgpt import train as train_mod
    from npgpt.cli import main

    monkeypatch.setenv("CUPY_TF32", "00")  # valid for CuPy, and not what set_tf32 writes
    train_mod.train(train_mod.TrainConfig(**TINY, device="cpu", out_dir=str(tmp_path / "run")))
    assert main(["bench", "--preset", "nano", "--context-length", "8", "--batch-size", "1", "--steps", "1",
                 "--warmup", "0", "--no-memory", "--generate", "0", "--device", "cpu"]) == 0  # fmt: skip
    assert fake_cupy.compute_types == [fake_cupy.COMPUTE_TYPE_TBD] * 4  # never read, never set
    assert [e for e in fake_cupy.events if e[0] == "alloc"] == []
    import os

    assert os.environ["CUPY_TF32"] == "00"


# --- 7. the all-reduce of a one-rank MPI world ------------------------------------------------------------------


def test_a_forced_mpi_world_of_one_rank_reaches_the_all_reduce():
    """NPGPT_DIST=mpi with one rank is how the NCCL path is tried on one GPU: the all-reduce must run."""
    from npgpt.distributed import allreduce_grads_

    calls = []

    class OneRankMPI(SingleProcess):
        backend = "mpi+nccl"

        def allreduce_mean_(self, buf):
            calls.append(buf)

    flat = np.arange(6.0)
    grads = npgpt.backend.views_into(flat, {"a": np.empty((2, 2)), "b": np.empty(2)})
    allreduce_grads_(OneRankMPI(), grads, flat)
    assert len(calls) == 1 and calls[0] is flat
    allreduce_grads_(SingleProcess(), grads, flat)  # no MPI: nothing to do
    assert len(calls) == 1


def test_report_of_the_fake(fake_cupy):
    """The stand-in itself: CuPy-like 0-d results, counted reads, CuPy's N-D bf16 failure."""
    import cupy
    import ml_dtypes

    a = cupy.asarray(np.arange(6.0, dtype=np.float32))
    fake_cupy.reset_counts()
    s = a.sum()
    assert isinstance(s, cupy.ndarray) and s.shape == () and fake_cupy.host_transfers == 0
    assert float(s) == 15.0 and int(a[1]) == 1 and fake_cupy.host_transfers == 2
    x = cupy.asarray(np.ones((2, 3, 4), dtype=ml_dtypes.bfloat16))
    with pytest.raises(TypeError, match="'E' not understood"):
        cupy.matmul(x, cupy.swapaxes(x, -1, -2))
    json.dumps(fake_cupy.gemm_calls)  # plain data


# --- the encoder-decoder with "bmm": every attention product one cuBLAS strided-batched call ----------------------


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-12), (np.float32, 3e-6)])
def test_the_encoder_decoder_sends_every_attention_product_to_cublas_with_bmm(fake_cupy, monkeypatch, dtype, tol):
    """With NPGPT_CUDA_KERNELS=bmm (TF32 off, where without it CuPy's own N-D matmul would run them), each
    attention product of the encoder-decoder is one strided-batched cuBLAS call on the copied head views:
    6 per attention (2 forward, 4 backward) and none through CuPy's N-D matmul; the step equals the CPU's."""
    import cupy

    from npgpt.gradcheck import HostRandom
    from npgpt.seq2seq import Seq2Seq
    from npgpt.seq2seq.check import padded_batch, random_params, tiny_config
    from npgpt.seq2seq.engine import Seq2SeqFastLossAndGrads

    monkeypatch.setenv("NPGPT_CUDA_KERNELS", "bmm")
    cfg = tiny_config(dropout=0.2, n_encoder_layers=2, n_decoder_layers=1)
    out = []
    for xp in (np, cupy):
        model = Seq2Seq(cfg, dtype=dtype, device="cpu")
        model.params = {k: xp.asarray(v.astype(dtype)) for k, v in random_params(cfg, np.random.default_rng(0)).items()}
        engine = Seq2SeqFastLossAndGrads(model, 3, 5, 4)
        src, tgt_in, targets = padded_batch(cfg, np.random.default_rng(1), 3, 5, 4)
        fake_cupy.gemm_calls.clear()
        fake_cupy.matmul_calls.clear()
        loss = engine((src, tgt_in), targets, training=True, rng=HostRandom(5, xp))
        out.append((loss, {k: to_numpy(g) for k, g in engine.grads.items()}))
    assert engine.kernels == {"bmm"}
    attentions = cfg.n_encoder_layers + 2 * cfg.n_decoder_layers  # self-attention each, and the decoder's cross-attention
    assert len(fake_cupy.gemm_calls) == 6 * attentions and {c[2] for c in fake_cupy.gemm_calls} == {3 * cfg.n_heads}
    assert not [c for c in fake_cupy.matmul_calls if c[0] > 2]
    (cpu_loss, cpu), (gpu_loss, gpu) = out
    assert abs(gpu_loss - cpu_loss) <= tol * abs(cpu_loss)
    for k in cpu:
        assert relative_error(gpu[k], cpu[k]) < tol, k
