"""How much memory a training run needs, estimated before anything is allocated, and how much there is.

Glossary: B=batch (one rank's rows), T=time, C=channels, NH=heads, V=vocab, L=n_layers, N=B*T rows,
P=parameters.

    est = estimate_training(config, batch_size=4, seq_len=256, dtype="float32")
    est.total                  # bytes: weights + gradients + AdamW moments + activations + scratch
    est.describe()             # "3.1 GiB (weights 475 MiB, gradients 475 MiB, ...)"
    check_fits(est, "cpu")     # ValueError with the numbers and the fix when it cannot fit

What is counted, for `npgpt train` (and `npgpt bench`'s step):
- weights: P in the model's dtype; gradients: P in the model's dtype (the fast engine's one flat buffer,
  or the reference engine's fresh arrays); AdamW: two moments, 2P in the model's dtype;
- the fast engine (engine.py): exactly the buffers plan_activations and plan_workspace allocate for
  (B, T), the attention probabilities allocated on first use, the 16-bit weight copy of bf16/fp16,
  and the weight-gradient scratch of accumulation and 16-bit steps. A test holds this sum equal to
  FastLossAndGrads.nbytes() after a step;
- the reference engine (model.py): the caches its forward keeps (each layer's inputs, q|k|v, the
  attention probabilities and their dropout masks, the MLP's pre-activation and GELU output, the
  logits and probabilities), a rough figure: the layers allocate fresh arrays and temporaries.
Not counted: Python, NumPy and BLAS themselves (about 100-200 MB), the data, the token cache, and
the brief second copy of the weights while the fast engine lays them out in one buffer.

The available memory: on the CPU, MemAvailable of /proc/meminfo (or the free physical pages that
os.sysconf reports), lowered to the room left under a cgroup's memory.max when one is set; on a GPU,
the free device memory plus what CuPy's pool holds unused.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import GPTConfig


@dataclass
class MemoryEstimate:
    weights: int
    gradients: int
    optimizer: int  # AdamW's m and v
    activations: int  # what the forward keeps for the backward
    workspace: int  # scratch reused by every layer, the 16-bit weight copy

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.workspace

    def describe(self) -> str:
        parts = [("weights", self.weights), ("gradients", self.gradients), ("AdamW moments", self.optimizer),
                 ("activations", self.activations), ("scratch", self.workspace)]  # fmt: skip
        return f"{fmt_bytes(self.total)} (" + ", ".join(f"{name} {fmt_bytes(n)}" for name, n in parts if n) + ")"


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit in ("B", "KiB") else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError  # unreachable


def param_count(config: GPTConfig) -> int:
    """P, in closed form (model.param_shapes lists them one by one, which a huge n_layers makes slow):
    wte V*C, wpe T*C; per block ln_1 2C, c_attn 3C^2 (+3C bias), c_proj C^2+C, ln_2 2C, c_fc 4C^2+4C,
    mlp c_proj 4C^2+C; ln_f 2C; an untied lm_head V*C."""
    V, T, C, L = config.vocab_size, config.context_length, config.emb_dim, config.n_layers
    block = 12 * C * C + 10 * C + (3 * C if config.qkv_bias else 0)
    return V * C + T * C + L * block + 2 * C + (0 if config.tie_weights else V * C)


def _largest_matrix(config: GPTConfig) -> int:
    """Elements of the largest 2-D parameter (the weight-gradient scratch is sized by it)."""
    V, T, C = config.vocab_size, config.context_length, config.emb_dim
    return max(V * C, T * C, *((3 * C * C, 4 * C * C) if config.n_layers else ()))


def fast_engine_bytes(config: GPTConfig, batch_size: int, seq_len: int, dtype="float32", precision: str = "fp32",
                      accumulate: bool = False, threads: int | None = None, gpu: bool = False,
                      flash: bool = False) -> tuple[int, int, int]:  # fmt: skip
    """(activations, workspace, gradients) in bytes: what FastLossAndGrads allocates for (B, T), the
    attention buffers it allocates on first use included. accumulate: gradient accumulation (or any
    step with accumulate=True), which adds the weight-gradient scratch; flash: the CUDA flash-attention
    kernel is in use (no T x T buffers)."""
    from . import fast
    from .parallel import num_threads
    from .precision import compute_dtype, is_low_precision

    stat = np.dtype(dtype).itemsize
    cdt = compute_dtype(precision, np.dtype(dtype))
    a = cdt.itemsize
    lowp = is_low_precision(cdt)
    threads = (num_threads() if not gpu else 1) if threads is None else threads
    B, T, C, L, NH, V = batch_size, seq_len, config.emb_dim, config.n_layers, config.n_heads, config.vocab_size
    N = B * T
    att = B * NH * T * T  # one layer's attention probabilities
    acts = a * ((L + 1) * N * C  # resid
                + 4 * L * N * C  # ln1, atty, resid_mid, ln2
                + 3 * L * N * C  # qkv_heads
                + 2 * L * N * 4 * C  # fc, act
                + N * C + N * V  # lnf, logits
                + (L * B * NH * T if flash else L * att))  # lse, or the probabilities  # fmt: skip
    acts += stat * (4 * L * N + 2 * N)  # LayerNorm means and reciprocal standard deviations
    rows = min(N, fast.ROW_BLOCK if not gpu else fast.GPU_ROW_BLOCK)
    gelu = threads * rows * (4 if lowp else 2) * 4 * C * stat  # fast.gelu_scratch, in the weights' dtype
    work = a * (3 * N * C + 3 * N * C + 4 * N * C + 3 * N * C  # dresid, nc, nc2; n3c; n4c; heads
                + (N * C if flash else att)  # flash_out, or the dropped probabilities / datt
                + T * T)  # causal_bias  # fmt: skip
    work += gelu
    P = param_count(config)
    if accumulate or lowp:  # the weight-gradient products go through a compute-dtype buffer
        work += a * _largest_matrix(config)
    if lowp:
        work += a * P  # the 16-bit copy of the weights
    return int(acts), int(work), int(stat * P)


def reference_engine_bytes(config: GPTConfig, batch_size: int, seq_len: int, dtype="float32") -> tuple[int, int, int]:
    """(activations, workspace, gradients) of the readable engine, roughly: what model.forward's caches
    keep, one layer's temporaries, and the fresh gradient arrays."""
    a = np.dtype(dtype).itemsize
    B, T, C, L, NH, V = batch_size, seq_len, config.emb_dim, config.n_layers, config.n_heads, config.vocab_size
    N = B * T
    att = B * NH * T * T
    drop = config.drop_rate > 0
    per_layer = a * (14 * N * C + 2 * att) + (att + 3 * N * C if drop else 0)  # + boolean dropout masks
    acts = L * per_layer + a * (3 * N * C + 2 * N * V)  # embeddings, ln_f; logits and probabilities
    work = a * (4 * N * 4 * C + 2 * att + N * V)  # one layer's temporaries in the backward, dlogits
    return int(acts), int(work), int(a * param_count(config))


def estimate_training(config: GPTConfig, batch_size: int, seq_len: int, dtype="float32", precision: str = "fp32",
                      engine: str = "fast", grad_accum: int = 1, gpu: bool = False) -> MemoryEstimate:  # fmt: skip
    """The memory of one training process (see the module docstring). batch_size: the rows this process
    computes at once (under MPI, the global batch divided by the ranks)."""
    P = param_count(config)
    item = np.dtype(dtype).itemsize
    if engine == "fast":
        acts, work, grads = fast_engine_bytes(config, batch_size, seq_len, dtype, precision, accumulate=grad_accum > 1, gpu=gpu)
    else:
        acts, work, grads = reference_engine_bytes(config, batch_size, seq_len, dtype)
    return MemoryEstimate(weights=item * P, gradients=grads, optimizer=2 * item * P, activations=acts, workspace=work)


def _cgroup_room() -> int | None:
    """Bytes left under this process's cgroup v2 memory limit, or None when there is none."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit == "max":
            return None
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        return max(int(limit) - used, 0)
    except (OSError, ValueError):
        return None


def available_memory(device: str = "cpu") -> int | None:
    """Bytes this process can still allocate on `device` ("cpu" or "cuda"), or None when unknown."""
    if device == "cuda":
        try:
            import cupy

            free, _ = cupy.cuda.runtime.memGetInfo()
            pool = cupy.get_default_memory_pool()
            return int(free + pool.total_bytes() - pool.used_bytes())
        except Exception:  # no CuPy, no device: unknown
            return None
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    room = _cgroup_room()
    return min(avail, room) if room is not None else avail


def check_fits(est: MemoryEstimate, device: str = "cpu", fix: str = "", available: int | None = None) -> None:
    """ValueError when `est` is more than the memory available on `device` (nothing is checked when
    that is unknown). fix: what to change, in the caller's terms (e.g. its flags)."""
    available = available_memory(device) if available is None else available
    if available is None or est.total <= available:
        return
    where = "the GPU" if device == "cuda" else "this machine"
    raise ValueError(f"this run needs about {est.describe()}, but {where} has {fmt_bytes(available)} available; "
                     + (fix or "make the model or the batch smaller, or use a machine with more memory"))  # fmt: skip
