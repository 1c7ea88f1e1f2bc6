"""Data parallelism on the engines clusters already run: MPI between processes, NCCL between GPUs.

    mpiexec -n 4 npgpt train --batch-size 16 ...        # 4 processes, 4 rows of every batch of 16 each

Every rank builds the same global batch (same data order and seed) and takes its own contiguous share of
the rows, so the data position is global and a run can be resumed with any number of ranks. Each rank
computes the gradient of the mean loss over its rows; one all-reduce over the flat gradient buffer
averages them, which is the gradient of the mean over the global batch (the shares are equal). Every rank
then takes the same AdamW step from the same state, so the weights stay identical without being sent
again; they are broadcast from rank 0 once at the start. Only rank 0 writes logs, plots and checkpoints.

The optional extra `pip install "npgpt[mpi]"` brings mpi4py and an MPICH that installs from PyPI, so a
laptop can try it without system packages. Without MPI, or with one process, nothing here does anything.
On GPUs (one per rank) the all-reduce runs through NCCL (cupy.cuda.nccl), with MPI only for the rendezvous.
"""

from __future__ import annotations

import os

import numpy as np

from .backend import get_array_module, is_cupy_array

# Environment variables that MPI launchers set; any of them > 1 means we were started by mpiexec.
_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS", "PMIX_SIZE", "SLURM_NTASKS")


def launched_by_mpi() -> bool:
    for var in _SIZE_VARS:
        try:
            if int(os.environ.get(var, "1")) > 1:
                return True
        except ValueError:
            pass
    return False


class SingleProcess:
    """The world of one process: every collective is the identity."""

    backend = "none"
    rank, size, local_rank, local_size = 0, 1, 0, 1

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def allreduce_mean_(self, buf) -> None:
        pass

    def allreduce_sum(self, values):
        return np.asarray(values, dtype=np.float64)

    def allreduce_max(self, value: float) -> float:
        return value

    def broadcast_(self, buf) -> None:
        pass

    def broadcast_obj(self, obj):
        return obj

    def barrier(self) -> None:
        pass

    def describe(self) -> str:
        return "single process (no MPI)"


class MPIComm(SingleProcess):
    """Collectives over mpi4py's COMM_WORLD on host buffers; device buffers go through NCCL if set up."""

    backend = "mpi"

    def __init__(self):
        try:
            from mpi4py import MPI
        except ImportError:
            raise ValueError(
                "this process was started by an MPI launcher but mpi4py is not installed; "
                "pip install 'npgpt[mpi]' (or run without mpiexec)"
            ) from None
        self.MPI = MPI
        self.comm = MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        local = self.comm.Split_type(MPI.COMM_TYPE_SHARED)
        self.local_rank, self.local_size = local.Get_rank(), local.Get_size()
        self.nccl = None

    def setup_nccl(self) -> None:
        """One GPU per rank (the local rank's, chosen again here in case use_local_gpu was not called)
        and an NCCL communicator, its id sent over MPI."""
        import cupy

        nccl = nccl_module()
        cupy.cuda.Device(self.local_rank % cupy.cuda.runtime.getDeviceCount()).use()
        uid = nccl.get_unique_id() if self.rank == 0 else None
        uid = self.comm.bcast(uid, root=0)
        self.nccl = nccl.NcclCommunicator(self.size, uid, self.rank)
        self.backend = "mpi+nccl"

    def allreduce_mean_(self, buf) -> None:
        """buf = mean of buf over the ranks, in place (buf must be contiguous)."""
        if is_cupy_array(buf):
            if self.nccl is None:
                raise ValueError("a GPU buffer needs NCCL: call setup_nccl() first")
            import cupy

            nccl = nccl_module()
            dtype = {np.dtype(np.float32): nccl.NCCL_FLOAT32, np.dtype(np.float64): nccl.NCCL_FLOAT64}[buf.dtype]
            stream = cupy.cuda.get_current_stream()
            self.nccl.allReduce(buf.data.ptr, buf.data.ptr, buf.size, dtype, nccl.NCCL_SUM, stream.ptr)
            buf *= 1.0 / self.size
            return
        self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)
        buf *= buf.dtype.type(1.0 / self.size)

    def allreduce_sum(self, values):
        arr = np.asarray(values, dtype=np.float64).copy()
        self.comm.Allreduce(self.MPI.IN_PLACE, arr, op=self.MPI.SUM)
        return arr

    def allreduce_max(self, value: float) -> float:
        return float(self.comm.allreduce(float(value), op=self.MPI.MAX))

    def broadcast_(self, buf) -> None:
        if is_cupy_array(buf):
            host = buf.get()
            self.comm.Bcast(host, root=0)
            buf.set(host)
        else:
            self.comm.Bcast(buf, root=0)

    def broadcast_obj(self, obj):
        return self.comm.bcast(obj, root=0)

    def barrier(self) -> None:
        self.comm.Barrier()

    def describe(self) -> str:
        return f"{self.backend}: rank {self.rank} of {self.size} ({self.MPI.Get_library_version().splitlines()[0].strip()})"


def nccl_module():
    """cupy.cuda.nccl, or a ValueError that says what to install: CuPy's nccl module swallows the ImportError
    of a missing NCCL library and then holds nothing but `available = False` (cupy/cuda/nccl.py)."""
    from cupy.cuda import nccl

    if not getattr(nccl, "available", False):
        raise ValueError("GPU training under MPI needs NCCL, which CuPy could not load (cupy.cuda.nccl.available is "
                         "False): pip install nvidia-nccl-cu12 (nvidia-nccl-cu13 with CUDA 13), or train on one GPU "
                         "without mpiexec")  # fmt: skip
    return nccl


def nccl_status() -> str:
    """One line for `npgpt info`: NCCL's version as CuPy loads it, or why it is not there."""
    try:
        nccl = nccl_module()
        version = int(nccl.get_version())
    except ValueError:
        return "not available to CuPy (pip install nvidia-nccl-cu12, or -cu13): needed for multi-GPU training"
    except Exception as e:  # no CuPy, a broken one
        return f"unknown ({type(e).__name__}: {e})"
    major, rest = divmod(version, 10000) if version >= 10000 else divmod(version, 1000)
    minor, patch = divmod(rest, 100)
    return f"available (NCCL {major}.{minor}.{patch})"


_WORLD = None


def get_world():
    """The process group: MPIComm when started by an MPI launcher with more than one process (or when
    NPGPT_DIST=mpi forces it, even for one rank: how a 1-rank NCCL run is tested), else SingleProcess."""
    global _WORLD
    if _WORLD is None:
        forced = os.environ.get("NPGPT_DIST", "").strip().lower()
        if forced not in ("", "auto", "mpi", "none"):
            raise ValueError(f"NPGPT_DIST must be auto, mpi or none, got {forced!r}")
        use_mpi = forced == "mpi" or (forced != "none" and launched_by_mpi())
        _WORLD = MPIComm() if use_mpi else SingleProcess()
    return _WORLD


def use_local_gpu(world, device: str | None = None) -> int | None:
    """Make this rank's GPU (its local rank, modulo the node's GPUs) CuPy's current device, before anything
    touches CUDA: the CUDA probe, the model, its buffers and the NCCL communicator then all live on it,
    instead of every rank also holding memory on GPU 0. Call it as soon as the world is known. Nothing is
    done without MPI, for a run asked to be on the CPU (`device`, else $NPGPT_DEVICE), or where no CUDA
    device answers (resolve_device reports that later). Returns the device chosen, or None."""
    if world.backend == "none":
        return None
    wanted = device if device is not None else os.environ.get("NPGPT_DEVICE", "auto")
    if str(wanted or "auto").strip().lower() == "cpu":
        return None
    try:
        import cupy

        count = cupy.cuda.runtime.getDeviceCount()  # initialises the driver, allocates nothing
    except Exception:  # no CuPy, no driver: not a GPU run (or one that fails later with the reason)
        return None
    if count < 1:
        return None
    chosen = world.local_rank % count
    cupy.cuda.Device(chosen).use()
    return chosen


def limit_threads_per_rank(world) -> int | None:
    """Split the machine's cores among the ranks on it, so N ranks do not each start all-core BLAS pools."""
    if world.local_size <= 1:
        return None
    from threadpoolctl import threadpool_limits

    n = max(1, (os.cpu_count() or 1) // world.local_size)
    threadpool_limits(limits=n)
    return n


def broadcast_params_(world, params: dict) -> None:
    """Every rank gets rank 0's weights (they start equal anyway; this makes it a guarantee)."""
    for v in params.values():
        world.broadcast_(v)


def allreduce_grads_(world, grads: dict, flat=None) -> None:
    """Average the gradients over the ranks: one all-reduce over `flat` when the gradients are views of
    it (the fast engine), else through a packed copy. Without MPI nothing is done; an MPI world of one
    rank (NPGPT_DIST=mpi) still makes the call, so that one GPU can try the NCCL path."""
    if world.backend == "none":
        return
    if flat is not None:
        world.allreduce_mean_(flat)
        return
    xp = get_array_module(*grads.values())
    packed = xp.concatenate([g.reshape(-1) for g in grads.values()])
    world.allreduce_mean_(packed)
    off = 0
    for g in grads.values():
        g[...] = packed[off : off + g.size].reshape(g.shape)
        off += g.size
