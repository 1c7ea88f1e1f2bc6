"""Issue 25, the GPU path's second review: each fault a CPU can show, with the test that would have caught
it before a GPU run, on the CuPy stand-in (tests/fake_cupy.py) where it needs CuPy.

1. TF32 leaked from one run (and one test) into the next: `npgpt bench` and `train()` set it and nothing
   put it back, so every later float32 product ran in TF32. Now a run sets it inside
   npgpt.backend.tf32_mode, and conftest.py fails any test that leaves it changed.
2. The encoder-decoder crashed on a GPU whenever TF32 was on: its strided heads reached cuBLAS's
   strided-batched call, which cannot take them, and blas.py raised. Now they are copied first.
3. CUDA tests passed by skipping under NPGPT_REQUIRE_CUDA=1 (a module skipped for want of mpiexec, a
   runtime pytest.skip). Now any skipped `cuda` test fails there, bar gpus(n) tests with too few GPUs.
4. A CuPy without NCCL gave an AttributeError deep in setup_nccl. Now one line says what to install.
(5: gpu_check_tools.py's probe, 6 and 7: gpu_bench.py and the GPU peaks; tests/test_gpu_check.py and
test_bench_torch.py.)
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from npgpt import backend
from npgpt.backend import tf32_mode, to_numpy
from npgpt.cuda import blas
from npgpt.gradcheck import relative_error

TESTS = Path(__file__).resolve().parent


def rel(got, ref) -> float:
    return float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))


# --- 1. TF32 is a run's state ----------------------------------------------------------------------------------


def test_a_gpu_benchmark_leaves_tf32_as_it_found_it(fake_cupy, capsys):
    """`npgpt bench --device cuda` runs float32 with TF32 (its default) and afterwards TF32 is off again
    and $CUPY_TF32 unset, as before it: before issue 25 both stayed on for the rest of the process. (7:
    the MFU line names the part whose peak it used, here an H100 PCIe's, not an SXM's.)"""
    from npgpt.cli import main

    fake_cupy.device_name = "NVIDIA H100 PCIe"
    args = ["bench", "--device", "cuda", "--preset", "nano", "--context-length", "8", "--batch-size", "1", "--steps", "1",
            "--warmup", "0", "--no-memory", "--generate", "0"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "precision fp32 with TF32, cuda" in out
    assert "MFU against the H100 PCIe's dense TF32 peak, 378.0 TFLOP/s (device 'NVIDIA H100 PCIe')" in out
    assert fake_cupy.effective_compute_type() == fake_cupy.COMPUTE_TYPE_DEFAULT
    assert "CUPY_TF32" not in os.environ


def test_npgpt_info_says_whether_tf32_is_on_and_whether_nccl_is_there(fake_cupy, capsys):
    """(1 and 4) `npgpt info` on a GPU: TF32's state in this process and where it comes from, and NCCL's
    version or what to install."""
    from npgpt.cli import main

    assert main(["info", "--device", "cuda"]) == 0
    out = capsys.readouterr().out
    assert _line(out, "TF32").startswith("off (CuPy's default, $CUPY_TF32 unset); npgpt train and npgpt bench turn")
    assert _line(out, "NCCL") == "available (NCCL 2.27.3)"
    with tf32_mode(True):
        assert main(["info"]) == 0
        assert _line(capsys.readouterr().out, "TF32").startswith("on ($CUPY_TF32=1)")
    fake_cupy.set_nccl_available(False)
    assert main(["info"]) == 0
    assert _line(capsys.readouterr().out, "NCCL").startswith("not available to CuPy (pip install nvidia-nccl-cu12")


def _line(out: str, key: str) -> str:
    """The value `npgpt info` prints for `key`."""
    for line in out.splitlines():
        if line.split("  ")[0].strip() == key:
            return line[len(key):].strip()
    raise AssertionError(f"no {key!r} line in:\n{out}")


def test_tf32_left_on_shows_in_float32_products_on_the_stand_in(fake_cupy):
    """The stand-in's 2-D products honour CuPy's compute type as CuPy's do (TF32 rounding of both
    operands), and its N-D products ignore it as CuPy's do: a TF32 setting left on is visible in a float32
    result, and gone once tf32_mode has put it back."""
    import cupy

    rng = np.random.default_rng(0)
    a64, b64 = rng.standard_normal((64, 96)), rng.standard_normal((96, 32))
    a, b = cupy.asarray(a64, dtype=np.float32), cupy.asarray(b64, dtype=np.float32)
    exact = a64.astype(np.float32).astype(np.float64) @ b64.astype(np.float32).astype(np.float64)
    a3, b3 = cupy.broadcast_to(a, (2, 64, 96)), cupy.broadcast_to(b, (2, 96, 32))
    assert rel((a @ b).get(), exact) < 1e-6
    with tf32_mode(True):
        assert backend.tf32_enabled() and os.environ["CUPY_TF32"] == "1"
        assert rel((a @ b).get(), exact) > 1e-4  # 10-bit mantissas: ~5e-4 of each operand
        assert rel(cupy.matmul(a3, b3).get()[1], exact) < 1e-6  # CuPy's N-D matmul: legacy compute type
    assert rel((a @ b).get(), exact) < 1e-6 and not backend.tf32_enabled()


def test_tf32_mode_puts_back_what_it_found(fake_cupy, monkeypatch):
    """Nested modes, an unset and a set $CUPY_TF32, CuPy's choice made before the mode: each is as it was
    after the block; a mode that changes nothing (a CPU run) never touches CuPy's compute type."""
    with tf32_mode():
        pass
    assert fake_cupy.compute_types == [fake_cupy.COMPUTE_TYPE_TBD] * 4 and "CUPY_TF32" not in os.environ
    with tf32_mode(True):
        with tf32_mode(False):
            assert not backend.tf32_enabled() and os.environ["CUPY_TF32"] == "0"
        assert backend.tf32_enabled() and os.environ["CUPY_TF32"] == "1"
        backend.set_tf32(False)  # inside a mode: undone with it
    assert "CUPY_TF32" not in os.environ and fake_cupy.effective_compute_type() == fake_cupy.COMPUTE_TYPE_DEFAULT
    fake_cupy.compute_types[2] = fake_cupy.COMPUTE_TYPE_TBD  # a fresh process whose user exported CUPY_TF32=1
    monkeypatch.setenv("CUPY_TF32", "1")
    with tf32_mode(False):
        assert not backend.tf32_enabled()
    assert os.environ["CUPY_TF32"] == "1" and backend.tf32_enabled()
    with tf32_mode(False):  # an exception inside still restores
        with pytest.raises(RuntimeError):
            with tf32_mode(True):
                raise RuntimeError("boom")
        assert not backend.tf32_enabled()
    assert backend.tf32_enabled()
    from npgpt.cuda.blas import needs_bmm

    assert needs_bmm(np.float32)  # the batched products follow CuPy's choice, whatever set it
    monkeypatch.delenv("CUPY_TF32")
    fake_cupy.compute_types[2] = fake_cupy.COMPUTE_TYPE_TBD  # as this test found it


def pytest_in_a_subprocess(tmp_path, source: str, *args, env=None) -> subprocess.CompletedProcess:
    """Run pytest on a test file with this suite's conftest.py (as a plugin) and fake_cupy importable, the
    NPGPT_ variables of this run left out unless `env` gives them."""
    test = tmp_path / "test_probe.py"
    test.write_text(textwrap.dedent(source))
    full = {k: v for k, v in os.environ.items() if k not in ("NPGPT_REQUIRE_CUDA", "NPGPT_FAKE_CUDA")}
    full["PYTHONPATH"] = os.pathsep.join([str(TESTS), *filter(None, [os.environ.get("PYTHONPATH")])])
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider", "-q", "-rfEs",
                           str(test), *args], capture_output=True, text=True, env=full, cwd=tmp_path)  # fmt: skip


def test_a_test_that_leaves_tf32_on_fails(tmp_path):
    """conftest.py's fixture: a test that turns TF32 on and leaves it (as `npgpt bench` did) fails, naming
    what it left, and the next test finds TF32 off again."""
    proc = pytest_in_a_subprocess(tmp_path, """
        import os
        from npgpt import backend

        def test_leaks(fake_cupy):
            backend.set_tf32(True)

        def test_leaks_the_variable():
            os.environ["CUPY_TF32"] = "1"

        def test_next(fake_cupy):
            assert not backend.tf32_enabled() and "CUPY_TF32" not in os.environ
    """)
    out = proc.stdout
    assert proc.returncode == 1, out
    assert "test_leaks left TF32 changed: ($CUPY_TF32, CuPy's float32 compute type) ('1', None), found (None, None); " \
           "the CuPy stand-in's float32 compute type 7 (7 is TF32), found off" in out
    assert "test_leaks_the_variable left TF32 changed: ($CUPY_TF32, CuPy's float32 compute type) ('1', None)" in out
    assert "3 passed, 2 errors" in out  # the leaks fail at teardown; test_next finds TF32 off


# --- 2. the encoder-decoder with TF32 on ----------------------------------------------------------------------


def seq2seq_step(device: str, cfg):
    from npgpt.gradcheck import HostRandom
    from npgpt.seq2seq import Seq2Seq
    from npgpt.seq2seq.check import padded_batch, random_params
    from npgpt.seq2seq.engine import Seq2SeqFastLossAndGrads

    model = Seq2Seq(cfg, dtype=np.float32, device="cpu")
    params = {k: v.astype(np.float32) for k, v in random_params(cfg, np.random.default_rng(0)).items()}
    if device == "cuda":
        import cupy

        params = {k: cupy.asarray(v) for k, v in params.items()}
    model.params = params
    engine = Seq2SeqFastLossAndGrads(model, 3, 5, 4)
    src, tgt_in, targets = padded_batch(cfg, np.random.default_rng(1), 3, 5, 4)
    loss = engine((src, tgt_in), targets, training=False, rng=HostRandom(5, model.xp))
    return loss, {k: to_numpy(g).astype(np.float64) for k, g in engine.grads.items()}


def test_the_encoder_decoder_trains_on_a_gpu_with_tf32_on(fake_cupy):
    """Its attention heads are strided views whose batch axes (b, NH) do not collapse into one stride;
    with TF32 on, matmul_where_needed sent them to the strided-batched call, which raised "batch axes
    of shape (3, 2) ... cannot be collapsed". Now the step runs (the heads copied first), in TF32
    through cuBLAS, and matches the CPU's float32 step to TF32's precision."""
    from npgpt.seq2seq.check import tiny_config

    cfg = tiny_config()
    cpu_loss, cpu_grads = seq2seq_step("cpu", cfg)
    with tf32_mode(True):
        gpu_loss, gpu_grads = seq2seq_step("cuda", cfg)
    assert fake_cupy.gemm_calls and {c[1] for c in fake_cupy.gemm_calls} == {blas.CUBLAS_COMPUTE_32F_FAST_TF32}
    assert abs(gpu_loss - cpu_loss) <= 2e-3 * abs(cpu_loss)
    for k in cpu_grads:
        assert relative_error(gpu_grads[k], cpu_grads[k]) < 2e-2, k


@pytest.mark.parametrize("which", ["a", "b", "out", "all"])
def test_bmm_matmul_copies_what_one_batched_call_cannot_take(fake_cupy, which):
    """blas.matmul with the encoder-decoder's head views (b, NH, t, hs) of (b, t, C) rows as any operand:
    the product is right, one cuBLAS call is made, and out's buffer changes only in out's elements."""
    import cupy

    b_, nh, t, hs = 3, 2, 5, 4
    rng = np.random.default_rng(0)

    def heads(rows):  # (b, t, C) -> (b, NH, t, hs), a strided view
        return cupy.swapaxes(rows.reshape(b_, t, nh, hs), 1, 2)

    q_rows, k_rows = (cupy.asarray(rng.standard_normal((b_, t, nh * hs))) for _ in range(2))
    q = heads(q_rows) if which in ("a", "all") else cupy.ascontiguousarray(heads(q_rows))
    kt = cupy.swapaxes(heads(k_rows) if which in ("b", "all") else cupy.ascontiguousarray(heads(k_rows)), -1, -2)
    big = cupy.asarray(np.full((b_, t, nh, t + 3), np.nan))
    out = cupy.swapaxes(big[..., :t], 1, 2) if which in ("out", "all") else cupy.empty((b_, nh, t, t))
    assert not blas.takes_strided_batch(heads(q_rows).shape, heads(q_rows).strides, 8)
    blas.matmul(out, q, kt)
    ref = np.matmul(np.swapaxes(q_rows.get().reshape(b_, t, nh, hs), 1, 2),
                    np.swapaxes(np.swapaxes(k_rows.get().reshape(b_, t, nh, hs), 1, 2), -1, -2))  # fmt: skip
    np.testing.assert_allclose(out.get(), ref, rtol=1e-12, atol=1e-12)
    assert len(fake_cupy.gemm_calls) == 1
    if which in ("out", "all"):
        assert np.isnan(big.get()[..., t:]).all()


def test_takes_strided_batch():
    """Which layouts one strided-batched call takes as they are (no GPU needed: shapes and strides)."""
    x = np.empty((3, 2, 5, 4))
    assert blas.takes_strided_batch(x.shape, x.strides, 8)
    assert blas.takes_strided_batch(np.swapaxes(x, -1, -2).shape, np.swapaxes(x, -1, -2).strides, 8)  # column-major
    assert not blas.takes_strided_batch(np.swapaxes(x, -1, -2).shape, np.swapaxes(x, -1, -2).strides, 8, is_out=True)
    h = np.swapaxes(np.empty((3, 5, 2, 4)), 1, 2)  # heads of (b, t, C) rows
    assert not blas.takes_strided_batch(h.shape, h.strides, 8)
    assert blas.takes_strided_batch(x[:, :1].shape, x[:, :1].strides, 8)  # a length-1 axis is never looked at
    assert not blas.takes_strided_batch(x[..., ::2].shape, x[..., ::2].strides, 8)  # no unit stride
    overlap = np.lib.stride_tricks.as_strided(x, (3, 5, 4), (32, 32, 8))  # matrices overlap
    assert blas.takes_strided_batch(overlap.shape, overlap.strides, 8)
    assert not blas.takes_strided_batch(overlap.shape, overlap.strides, 8, is_out=True)
    assert not blas.takes_strided_batch((4,), (8,), 8)


# --- 3. no CUDA test passes by skipping under NPGPT_REQUIRE_CUDA=1 ---------------------------------------------

SKIPPING = """
    import pytest
    from conftest import needs_cuda

    pytestmark = pytest.mark.skipif(True, reason="needs mpi4py and mpiexec")  # names neither CUDA nor a GPU

    @pytest.mark.cuda
    def test_skipped_by_the_module():
        pass
"""
RUNTIME_SKIP = """
    import pytest
    from conftest import needs_cuda

    @pytest.mark.cuda
    @needs_cuda
    def test_skips_at_run_time():
        pytest.skip("this PyTorch build has no CUDA")

    @needs_cuda
    @pytest.mark.gpus(2)
    def test_two_gpus():
        pass
"""


def test_under_require_cuda_every_skipped_cuda_test_fails(tmp_path):
    """Without a GPU: a module-level skip whose reason names neither CUDA nor a GPU, a test skipped
    for want of CUDA, and a two-GPU test all fail under NPGPT_REQUIRE_CUDA=1, each saying why."""
    proc = pytest_in_a_subprocess(tmp_path, SKIPPING, "-m", "cuda", env={"NPGPT_REQUIRE_CUDA": "1"})
    assert proc.returncode == 1 and "1 error" in proc.stdout, proc.stdout  # (a failure at setup is an error)
    assert "may not pass by skipping, and this one skipped: needs mpi4py and mpiexec" in proc.stdout
    if backend.cuda_available():
        return
    proc = pytest_in_a_subprocess(tmp_path, RUNTIME_SKIP, "-m", "cuda", env={"NPGPT_REQUIRE_CUDA": "1"})
    assert proc.returncode == 1 and "2 errors" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], proc.stdout
    errors = proc.stdout.split("short test summary info")[0]  # the summary repeats each line, cut to the terminal's width
    assert errors.count("NPGPT_REQUIRE_CUDA=1 but CUDA is not usable: CuPy is not installed") == 2, proc.stdout


def test_on_one_gpu_the_two_gpu_tests_skip_saying_so(tmp_path):
    """With CUDA (the stand-in's one GPU), a skip inside a CUDA test still fails, and a gpus(2) test skips
    with the counts, the one skip NPGPT_REQUIRE_CUDA=1 lets through."""
    proc = pytest_in_a_subprocess(tmp_path, RUNTIME_SKIP, "-m", "cuda",
                                  env={"NPGPT_REQUIRE_CUDA": "1", "NPGPT_FAKE_CUDA": "1"})  # fmt: skip
    assert "1 failed, 1 skipped" in proc.stdout, proc.stdout
    assert "this one skipped: this PyTorch build has no CUDA" in proc.stdout
    assert "needs 2 GPUs; this machine has 1" in proc.stdout


@pytest.mark.slow
def test_require_cuda_fails_the_distributed_cuda_tests_without_a_gpu(tmp_path):
    """tests/test_distributed.py's CUDA tests, NCCL's included, fail under NPGPT_REQUIRE_CUDA=1 on this
    GPU-less machine instead of skipping with the module (which needed mpiexec)."""
    if backend.cuda_available():
        pytest.skip("this machine has CUDA")  # not a `cuda` test: it checks the GPU-less case
    env = {**os.environ, "NPGPT_REQUIRE_CUDA": "1"}
    env.pop("NPGPT_FAKE_CUDA", None)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda",
                           str(TESTS / "test_distributed.py")], capture_output=True, text=True, env=env, cwd=tmp_path)  # fmt: skip
    last = proc.stdout.strip().splitlines()[-1]
    assert proc.returncode == 1 and "4 errors" in last and "passed" not in last and "skipped" not in last, proc.stdout


# --- 4. NCCL missing --------------------------------------------------------------------------------------------


class OneRankComm:
    """mpi4py's COMM_WORLD as one rank sees it alone (bcast returns what it is given)."""

    def bcast(self, obj, root=0):
        return obj


def one_rank_world():
    from npgpt.distributed import MPIComm

    world = MPIComm.__new__(MPIComm)  # without MPI_Init: the collectives setup_nccl uses are bcast only
    world.comm, world.rank, world.size, world.local_rank, world.local_size, world.nccl = OneRankComm(), 0, 1, 0, 1, None
    return world


def test_a_cupy_without_nccl_says_what_to_install(fake_cupy):
    """cupy.cuda.nccl swallows its ImportError and leaves `available = False` and nothing else: before,
    setup_nccl died with "module 'cupy.cuda.nccl' has no attribute 'get_unique_id'"."""
    fake_cupy.set_nccl_available(False)
    with pytest.raises(ValueError) as e:
        one_rank_world().setup_nccl()
    msg = str(e.value)
    assert "\n" not in msg and "cupy.cuda.nccl.available is False" in msg and "pip install nvidia-nccl-cu12" in msg


def test_nccl_setup_and_all_reduce_on_the_stand_in(fake_cupy):
    """With NCCL: the communicator is built from v14's bytes id, and the gradients' all-reduce passes
    device pointers as integers, the count and NCCL's float32 code; a mean over one rank changes nothing."""
    import cupy

    from npgpt.distributed import allreduce_grads_

    world = one_rank_world()
    world.setup_nccl()
    assert world.backend == "mpi+nccl"
    flat = cupy.arange(10, dtype=cupy.float32)
    allreduce_grads_(world, {"a": flat[:6].reshape(2, 3), "b": flat[6:]}, flat)
    assert fake_cupy.nccl_calls == [(10, 7, 0)]  # count, NCCL_FLOAT32, NCCL_SUM
    assert flat.get().tolist() == [float(i) for i in range(10)]


# --- the stand-in itself ----------------------------------------------------------------------------------------


def test_the_stand_in_refuses_what_cupy_refuses(fake_cupy):
    """NumPy cannot take a device array for a host one (np.asarray, np.testing), a host array cannot
    join an elementwise operation on device arrays, and a device scalar is no Python index; host arrays
    are fine as indices and as values assigned into device arrays."""
    import cupy

    x = cupy.arange(6, dtype=cupy.float32)
    host = np.ones(6, np.float32)
    for convert in (np.asarray, np.array, np.ascontiguousarray, lambda a: np.testing.assert_allclose(a, host)):
        with pytest.raises(TypeError, match="Implicit conversion to a NumPy array is not allowed"):
            convert(x)
    for op in (lambda: x + host, lambda: host * x, lambda: cupy.exp(host), lambda: cupy.where(x > 2, host, 0),
               lambda: cupy.concatenate([x, host])):  # fmt: skip
        with pytest.raises(TypeError, match="Unsupported type <class 'numpy.ndarray'>"):
            op()
    with pytest.raises(TypeError):
        [1, 2, 3][x[1]]
    fake_cupy.reset_counts()
    y = x[np.array([0, 2])]
    x[np.array([1])] = np.float32(7)
    x[:2] = host[:2]
    assert isinstance(y, cupy.ndarray) and fake_cupy.host_transfers == 0
    assert x.get().tolist() == [1, 1, 2, 3, 4, 5] and fake_cupy.host_transfers == 1
    assert not isinstance(x, np.ndarray) and isinstance(np.exp(x), cupy.ndarray)


def test_the_stand_in_models_cupys_compute_type(fake_cupy, monkeypatch):
    """As cupy/_core/_routines_linalg.pyx: undecided until first read, then decided from $CUPY_TF32 and
    kept whatever $CUPY_TF32 says later; set_compute_type overrides it."""
    from cupy._core import _routines_linalg as linalg

    assert fake_cupy.compute_types[2] == linalg.COMPUTE_TYPE_TBD
    monkeypatch.setenv("CUPY_TF32", "1")
    assert linalg.get_compute_type(np.float32) == linalg.COMPUTE_TYPE_TF32
    monkeypatch.setenv("CUPY_TF32", "0")
    assert linalg.get_compute_type(np.float32) == linalg.COMPUTE_TYPE_TF32  # kept
    assert linalg.get_compute_type(np.float64) == linalg.COMPUTE_TYPE_DEFAULT
    linalg.set_compute_type(np.float32, linalg.COMPUTE_TYPE_DEFAULT)
    assert fake_cupy.effective_compute_type() == linalg.COMPUTE_TYPE_DEFAULT
