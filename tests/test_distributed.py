"""Data parallelism over MPI: 2 ranks with global batch 2b against one process with batch 2b.

Runs `mpiexec -n 2` from the mpi extra (mpi4py + the MPICH wheel); skipped when they are missing.
On GPUs (the `cuda` tests) the gradients go through NCCL. NCCL refuses two ranks on one GPU ("Duplicate
GPU detected", since NCCL 2.5), so with one GPU the NCCL tests run one rank (NPGPT_DIST=mpi, which needs
mpi4py but no mpiexec): the communicator is built and the all-reduce runs, but a mean over one rank is
the identity; the tests that check a real mean over two ranks need two GPUs (gpus(2)) and say so when
they skip. Under NPGPT_REQUIRE_CUDA=1 every other CUDA test here that skips fails (conftest.py): the
check's Python must have mpi4py (and mpiexec for two GPUs)."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import metrics_records, not_with_the_stand_in

import npgpt
from npgpt.gradcheck import relative_error

HAVE_MPI4PY = importlib.util.find_spec("mpi4py") is not None
MPIEXEC = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
if not HAVE_MPI4PY:
    MPIEXEC = None
needs_mpiexec = pytest.mark.skipif(MPIEXEC is None, reason="needs mpi4py and mpiexec (pip install 'npgpt[mpi]')")
needs_mpi4py = pytest.mark.skipif(not HAVE_MPI4PY, reason="needs mpi4py (pip install 'npgpt[mpi]')")

TINY = ["--preset", "nano", "--emb-dim", "32", "--n-heads", "2", "--n-layers", "1", "--context-length", "32",
        "--no-progress", "--sample-tokens", "2", "--drop-rate", "0", "--eval-interval", "2"]  # fmt: skip


def run(args, ranks=1):
    env = {**os.environ, "NPGPT_DEVICE": "cpu"}
    cmd = [sys.executable, "-m", "npgpt", "train", *TINY, *args]
    if ranks > 1:
        cmd = [MPIEXEC, "-n", str(ranks), *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@needs_mpiexec
def test_two_ranks_equal_one_process_with_the_same_global_batch(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    run(["--batch-size", "4", "--max-steps", "4", "--out-dir", str(one)])
    proc = run(["--batch-size", "4", "--max-steps", "4", "--out-dir", str(two)], ranks=2)
    # losses agree up to float32 summation order (the mean over 4 rows versus two means of 2, averaged)
    l1 = [r["loss"] for r in metrics_records(one, "step")]
    l2 = [r["loss"] for r in metrics_records(two, "step")]
    assert len(l1) == len(l2) == 4
    assert all(abs(a - b) / abs(a) < 1e-6 for a, b in zip(l1, l2)), (l1, l2)
    v1 = [r["val_loss"] for r in metrics_records(one, "eval")]
    v2 = [r["val_loss"] for r in metrics_records(two, "eval")]
    assert all(abs(a - b) / abs(a) < 1e-6 for a, b in zip(v1, v2)), (v1, v2)
    a, b = npgpt.load_pretrained(one), npgpt.load_pretrained(two)
    for k in a.params:
        assert relative_error(b.params[k], a.params[k]) < 1e-5, k
    # rank 0 alone wrote: one summary, one checkpoint directory, each step logged once
    assert proc.stdout.count("Done: 4 steps") == 1 and "on 2 ranks" in proc.stdout
    assert [p.name for p in (two / "checkpoints").iterdir()] == ["step-00000004"]


@needs_mpiexec
def test_a_two_rank_checkpoint_resumes_in_one_process(tmp_path):
    out = tmp_path / "run"
    run(["--batch-size", "4", "--max-steps", "2", "--out-dir", str(out)], ranks=2)
    proc = run(["--batch-size", "4", "--max-steps", "4", "--out-dir", str(out), "--resume"])
    assert "resuming at step 2" in proc.stdout
    steps = [r["step"] for r in metrics_records(out, "step")]
    assert steps == [1, 2, 3, 4]
    state = json.loads((out / "checkpoints" / "step-00000004" / "trainer_state.json").read_text())
    assert state["world_size"] == 1 and state["optimizer"]["t"] == 4


@needs_mpiexec
def test_batch_must_divide_among_ranks(tmp_path):
    env = {**os.environ, "NPGPT_DEVICE": "cpu"}
    cmd = [MPIEXEC, "-n", "2", sys.executable, "-m", "npgpt", "train", *TINY, "--batch-size", "3", "--max-steps", "1",
           "--out-dir", str(tmp_path / "r")]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode != 0 and "must be divisible by the 2 ranks" in proc.stderr


@needs_mpiexec
def test_info_reports_the_world(tmp_path):
    env = {**os.environ, "NPGPT_DEVICE": "cpu"}
    proc = subprocess.run([MPIEXEC, "-n", "2", sys.executable, "-m", "npgpt", "info"], capture_output=True, text=True, env=env,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "rank 0 of 2" in proc.stdout and "rank 1 of 2" in proc.stdout


def test_single_process_info_says_no_mpi(capsys):
    from npgpt.cli import main

    assert main(["info"]) == 0
    assert "distributed" in capsys.readouterr().out


@needs_mpi4py
def test_forced_mpi_world_of_one_rank_matches_a_plain_run(tmp_path):
    """NPGPT_DIST=mpi runs the MPI code path with a single rank (all-reduce over one process)."""
    plain, forced = tmp_path / "plain", tmp_path / "forced"
    run(["--batch-size", "2", "--max-steps", "3", "--out-dir", str(plain)])
    env = {**os.environ, "NPGPT_DEVICE": "cpu", "NPGPT_DIST": "mpi"}
    proc = subprocess.run([sys.executable, "-m", "npgpt", "train", *TINY, "--batch-size", "2", "--max-steps", "3",
                           "--out-dir", str(forced)], capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert [r["loss"] for r in metrics_records(plain, "step")] == [r["loss"] for r in metrics_records(forced, "step")]


# `npgpt train` with every ShardFile.read logged: rank r writes [file name, window start] of each window of
# T+1 tokens it read from a training shard to $READS.r
SHARD_WORKER = """
import json, os, sys
from npgpt.shards import ShardFile

reads, read = [], ShardFile.read

def logged(self, starts, length):
    if "_train_" in os.path.basename(self.path) and length == 33:
        reads.extend([os.path.basename(self.path), int(s)] for s in starts)
    return read(self, starts, length)

ShardFile.read = logged
from npgpt.cli import main
from npgpt.distributed import get_world

code = main(["train", *sys.argv[1:]])
with open(os.environ["READS"] + f".{get_world().rank}", "w") as f:
    json.dump(reads, f)
sys.exit(code)
"""


def test_on_token_shards_each_rank_reads_its_own_rows(tmp_path):
    """llm.c shards, 2 ranks with global batch 4 against one process: rank 0 and rank 1 each read 2 windows
    of every batch from the shards, none of the other's, together those of the one process; the losses and
    weights agree; and the two-rank run's checkpoint of step 2 resumes in one process to the same end."""
    import numpy as np

    rng = np.random.default_rng(0)
    for name, n in (("t_train_000000", 600), ("t_train_000001", 500), ("t_train_000002", 700), ("t_val_000000", 400)):
        (tmp_path / f"{name}.bin").write_bytes(np.array([20240520, 1, n] + [0] * 253, dtype="<i4").tobytes()
                                               + rng.integers(0, 50257, n).astype("<u2").tobytes())  # fmt: skip
    data = ["--data", str(tmp_path / "t_*.bin"), "--batch-size", "4", "--max-steps", "4"]

    def worker(out, ranks, *extra):
        env = {**os.environ, "NPGPT_DEVICE": "cpu", "READS": str(out) + ".reads"}
        cmd = [sys.executable, "-c", SHARD_WORKER, *TINY, *data, "--out-dir", str(out), *extra]
        proc = subprocess.run([MPIEXEC, "-n", str(ranks), *cmd] if ranks > 1 else cmd, capture_output=True, text=True,
                              env=env, timeout=300)  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return [[tuple(w) for w in json.loads(Path(f"{out}.reads.{r}").read_text())] for r in range(ranks)]

    one, two = tmp_path / "one", tmp_path / "two"
    (single,) = worker(one, 1)
    rank0, rank1 = worker(two, 2, "--checkpoint-interval", "2")
    assert len(single) == 16 and len(rank0) == len(rank1) == 8  # 4 steps: 4 windows, 2 a rank
    assert sorted(rank0 + rank1) == sorted(single) and not set(rank0) & set(rank1) and len(set(single)) == 16
    l1, l2 = [r["loss"] for r in metrics_records(one, "step")], [r["loss"] for r in metrics_records(two, "step")]
    assert len(l1) == len(l2) == 4 and all(abs(a - b) / abs(a) < 1e-6 for a, b in zip(l1, l2)), (l1, l2)
    a, b = npgpt.load_pretrained(one), npgpt.load_pretrained(two)
    assert all(relative_error(b.params[k], a.params[k]) < 1e-5 for k in a.params)
    shutil.rmtree(two / "checkpoints" / "step-00000004")
    (resumed,) = worker(two, 1, "--resume")
    assert sorted(resumed) == sorted(rank0[4:] + rank1[4:])  # steps 3 and 4: the windows the two ranks read
    c = npgpt.load_pretrained(two)
    assert all(relative_error(c.params[k], a.params[k]) < 1e-5 for k in a.params)


needs_gpu = pytest.mark.skipif(not __import__("npgpt.backend", fromlist=["x"]).cuda_available(), reason="needs CuPy and a GPU")

# Each rank r fills a flat float32 buffer with (r + 1) * [0, 1, ..., 9] and all-reduces it as training does
# (allreduce_grads_ over views of it); the mean over n ranks is (n + 1) / 2 * [0, ..., 9].
NCCL_WORKER = """
import json, cupy
from npgpt.distributed import allreduce_grads_, get_world, use_local_gpu
world = get_world()
chosen = use_local_gpu(world, "cuda")
world.setup_nccl()
flat = cupy.arange(10, dtype=cupy.float32) * (world.rank + 1)
grads = {"a": flat[:6].reshape(2, 3), "b": flat[6:]}
allreduce_grads_(world, grads, flat)
cupy.cuda.get_current_stream().synchronize()
print(json.dumps({"rank": world.rank, "size": world.size, "backend": world.backend, "device": chosen,
                  "flat": cupy.asnumpy(flat).tolist()}))
"""


def nccl_results(ranks: int) -> list:
    env = {**os.environ, "NPGPT_DIST": "mpi"}
    cmd = [sys.executable, "-c", NCCL_WORKER]
    if ranks > 1:
        cmd = [MPIEXEC, "-n", str(ranks), *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return sorted((json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")), key=lambda r: r["rank"])


@pytest.mark.cuda
@needs_gpu
@needs_mpi4py
@not_with_the_stand_in
def test_one_rank_nccl_all_reduce_runs():
    """One GPU: the NCCL communicator of a one-rank MPI world is built and the all-reduce runs on it
    (before issue 13 it was never called with one rank); the mean over one rank leaves the buffer as is."""
    (r,) = nccl_results(1)
    assert r["backend"] == "mpi+nccl" and r["size"] == 1 and r["device"] == 0
    assert r["flat"] == [float(i) for i in range(10)]


@pytest.mark.cuda
@pytest.mark.gpus(2)  # NCCL refuses two ranks on one GPU
@needs_gpu
@needs_mpiexec
@not_with_the_stand_in
def test_two_rank_nccl_all_reduce_averages():
    """Two GPUs: each rank on its own GPU, and the all-reduce leaves the mean on both."""
    results = nccl_results(2)
    assert [r["device"] for r in results] == [0, 1]
    for r in results:
        assert r["backend"] == "mpi+nccl" and r["flat"] == [1.5 * i for i in range(10)], r


@pytest.mark.cuda
@needs_gpu
@needs_mpi4py
@not_with_the_stand_in
def test_one_rank_nccl_run_matches_the_single_process_run(tmp_path):
    single, nccl = tmp_path / "single", tmp_path / "nccl"
    args = [*TINY, "--device", "cuda", "--batch-size", "2", "--max-steps", "3"]
    env = {**os.environ}
    for out, extra in ((single, {}), (nccl, {"NPGPT_DIST": "mpi"})):
        proc = subprocess.run([sys.executable, "-m", "npgpt", "train", *args, "--out-dir", str(out)], capture_output=True,
                              text=True, env={**env, **extra}, timeout=600)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
    a = [r["loss"] for r in metrics_records(single, "step")]
    b = [r["loss"] for r in metrics_records(nccl, "step")]
    assert len(a) == len(b) == 3, (a, b)
    assert all(abs(x - y) <= 1e-6 * abs(x) for x, y in zip(a, b)), (a, b)


@pytest.mark.cuda
@pytest.mark.gpus(2)
@needs_gpu
@needs_mpiexec
@not_with_the_stand_in
def test_two_ranks_on_two_gpus_equal_one_gpu(tmp_path):
    """Two ranks on two GPUs with the global batch of one GPU: the same losses (float32 summation order
    aside). Skipped on a machine with one GPU."""
    one, two = tmp_path / "one", tmp_path / "two"
    args = [*TINY, "--device", "cuda", "--no-tf32", "--batch-size", "4", "--max-steps", "4"]
    for out, ranks in ((one, 1), (two, 2)):
        cmd = [sys.executable, "-m", "npgpt", "train", *args, "--out-dir", str(out)]
        cmd = [MPIEXEC, "-n", "2", *cmd] if ranks == 2 else cmd
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ}, timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    a, b = [r["loss"] for r in metrics_records(one, "step")], [r["loss"] for r in metrics_records(two, "step")]
    assert len(a) == len(b) == 4 and all(abs(x - y) <= 1e-5 * abs(x) for x, y in zip(a, b)), (a, b)
