"""How much memory a training run needs, estimated before anything is allocated, and how much there is.

Glossary: B=batch (one rank's rows), T=time, C=channels, NH=heads, V=vocab, L=n_layers, N=B*T rows,
P=parameters.
Also here: the FLOPs of a training step (flops_per_token, step_flops), which --dry-run reports beside
the memory and `npgpt bench` divides its times by.

    est = estimate_training(config, batch_size=4, seq_len=256, dtype="float32", recompute="none")
    est.total                  # bytes: weights + gradients + AdamW moments + activations + scratch + temporaries
    est.describe()             # "3.1 GiB (weights 475 MiB, gradients 475 MiB, ...)"
    check_fits(est, "cpu")     # ValueError with the numbers and the fix when it cannot fit
    largest_batch(config, 256, available_memory("cpu"))   # the largest batch whose estimate fits
    print(plan_report(config, 16, 1024, recompute="block"))   # what `npgpt train --dry-run` prints

What is counted, for `npgpt train` (and `npgpt bench`'s step):
- weights: P in the model's dtype; gradients: P in the model's dtype (the fast engine's one flat buffer,
  or the reference engine's fresh arrays); AdamW: two moments, 2P in the model's dtype;
- the fast engine (npgpt/engine/): exactly the buffers plan_activations and plan_workspace allocate
  for (B, T) and the recompute setting (shared buffers counted once), the attention probabilities
  allocated on first use, the dropout keep-masks a training forward keeps (one byte an element), the
  16-bit weight copy of bf16/fp16, and the weight-gradient scratch of accumulation and 16-bit steps
  (held by the engine's Gradients part; counted here under the workspace).
  Under the fused softmax kernels (attention_softmax) the probabilities' dropout mask is not kept (one
  float64 seed is); with the padded LM head (a GPU's default, VOCAB_MULTIPLE) the logits have Vp
  columns and the head keeps a (Vp, C) weight copy and a (Vp, C) weight-gradient product.
  A test holds this sum equal to FastLossAndGrads.nbytes() after a step. Beside them, the largest
  temporary of a step ("temporaries"): the float32 uniforms from which one layer's attention dropout
  mask is drawn. A test holds the total within 10% of the peak resident memory a training step
  really reaches (tests/test_memory_rss.py);
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
    activations: int  # what the forward keeps for the backward (dropout masks included)
    workspace: int  # scratch reused by every layer, the 16-bit weight copy
    transient: int = 0  # the largest temporary allocated during a step and freed in it

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.workspace + self.transient

    def describe(self) -> str:
        parts = [("weights", self.weights), ("gradients", self.gradients), ("AdamW moments", self.optimizer),
                 ("activations", self.activations), ("scratch", self.workspace), ("temporaries", self.transient)]  # fmt: skip
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


def _keeps_probabilities(recompute: str, flash: bool) -> bool:
    """Whether the fast engine keeps every layer's (B, NH, T, T) attention probabilities."""
    return not flash and recompute in ("none", "mlp")


def fast_engine_bytes(config: GPTConfig, batch_size: int, seq_len: int, dtype="float32", precision: str = "fp32",
                      accumulate: bool = False, threads: int | None = None, gpu: bool = False,
                      flash: bool = False, recompute: str = "none", training: bool = True, fused_softmax: bool = False,
                      vocab_multiple: int | None = None) -> tuple[int, int, int]:  # fmt: skip
    """(activations, workspace, gradients) in bytes: what FastLossAndGrads allocates for (B, T) with
    this recompute setting, the attention buffers it allocates on first use included, and (training
    with dropout) the keep-masks it holds. accumulate: gradient accumulation (or any step with
    accumulate=True), which adds the weight-gradient scratch; flash: the CUDA flash-attention kernel is
    in use (no T x T buffers); fused_softmax: the fused softmax kernels run attention (the
    probabilities kept, their dropout mask not: one float64 seed instead). vocab_multiple: the LM
    head's padding (default VOCAB_MULTIPLE of the device): (N, Vp) logits, and beside them the padded
    head's (Vp, C) weight copy and, training, its (Vp, C) weight-gradient product."""
    from . import fast
    from .fast import attention as fast_attention
    from .parallel import num_threads
    from .precision import compute_dtype, is_low_precision

    stat = np.dtype(dtype).itemsize
    cdt = compute_dtype(precision, np.dtype(dtype))
    a = cdt.itemsize
    lowp = is_low_precision(cdt)
    threads = (num_threads() if not gpu else 1) if threads is None else threads
    B, T, C, L, NH, V = batch_size, seq_len, config.emb_dim, config.n_layers, config.n_heads, config.vocab_size
    Vp = padded_vocab(V, VOCAB_MULTIPLE["gpu" if gpu else "cpu"] if vocab_multiple is None else vocab_multiple)
    N = B * T
    att = B * NH * T * T  # one layer's attention probabilities
    keep_att = _keeps_probabilities(recompute, flash)
    fused_softmax = fused_softmax and keep_att
    Lp = 1 if recompute == "block" and L else L  # per-layer buffers: one shared by all layers under "block"
    La = 1 if recompute in ("mlp", "block") and L else L  # GELU's output
    acts = a * ((L + 1) * N * C  # resid
                + 4 * Lp * N * C  # ln1, atty, resid_mid, ln2
                + 3 * Lp * N * C  # qkv_heads
                + Lp * N * 4 * C + La * N * 4 * C  # fc, act
                + N * C + N * Vp  # lnf, logits (padded)
                + (Lp * B * NH * T if flash else 0) + (L * att if keep_att else 0))  # lse; the probabilities  # fmt: skip
    acts += stat * (4 * Lp * N + 2 * N)  # LayerNorm means and reciprocal standard deviations
    if training and config.drop_rate > 0:  # boolean keep-masks: embeddings, two residual branches a layer
        acts += N * C + 2 * L * N * C + (L * att if keep_att and not fused_softmax else 0)  # and the probabilities' (else redrawn)
        acts += 8 if fused_softmax and L else 0  # the fused kernels' float64 seed, from which they draw the mask again
    rows = min(N, fast.ROW_BLOCK if not gpu else fast.GPU_ROW_BLOCK)
    gelu = threads * rows * (4 if lowp else 2) * 4 * C * stat  # fast.gelu_scratch, in the weights' dtype
    work = a * (3 * N * C + 3 * N * C + 4 * N * C + 3 * N * C  # dresid, nc, nc2; n3c; n4c; heads
                + (N * C if flash else att if keep_att else 0)  # flash_out, or the dropped probabilities / datt
                + T * T)  # causal_bias  # fmt: skip
    if not flash and not keep_att:  # recomputed attention: two blocks of rows of probabilities, a head_tmp
        work += a * (2 * B * NH * min(fast_attention.ATTENTION_ROWS, T) * T + N * C)
    work += gelu
    if Vp != V:  # the padded head's weight copy, and its weight-gradient product when training
        work += a * Vp * C * (2 if training else 1)
    P = param_count(config)
    if accumulate or lowp:  # the weight-gradient products go through a compute-dtype buffer
        work += a * _largest_matrix(config)
    if lowp:
        work += a * P  # the 16-bit copy of the weights
    return int(acts), int(work), int(stat * P)


def fast_engine_transient(config: GPTConfig, batch_size: int, seq_len: int, recompute: str = "none",
                          flash: bool = False, training: bool = True, fused_softmax: bool = False) -> int:  # fmt: skip
    """The largest temporary of a fast training step: drawing one layer's attention dropout mask makes
    B*NH*T*T float32 uniforms (and, when the mask is redrawn rather than kept, its booleans too); the
    fused softmax kernels draw theirs inside the kernels (none)."""
    if not training or config.drop_rate <= 0 or flash or not config.n_layers:
        return 0
    if fused_softmax and _keeps_probabilities(recompute, flash):
        return 0
    att = batch_size * config.n_heads * seq_len * seq_len
    return (4 if _keeps_probabilities(recompute, flash) else 5) * att


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
                      engine: str = "fast", grad_accum: int = 1, gpu: bool = False,
                      recompute: str = "none") -> MemoryEstimate:  # fmt: skip
    """The memory of one training process (see the module docstring). batch_size: the rows this process
    computes at once (under MPI, the global batch divided by the ranks)."""
    P = param_count(config)
    item = np.dtype(dtype).itemsize
    transient = 0
    if engine == "fast":
        acts, work, grads = fast_engine_bytes(config, batch_size, seq_len, dtype, precision, accumulate=grad_accum > 1,
                                              gpu=gpu, recompute=recompute)  # fmt: skip
        transient = fast_engine_transient(config, batch_size, seq_len, recompute)
    else:
        acts, work, grads = reference_engine_bytes(config, batch_size, seq_len, dtype)
    return MemoryEstimate(weights=item * P, gradients=grads, optimizer=2 * item * P, activations=acts, workspace=work,
                          transient=transient)  # fmt: skip


def largest_batch(config: GPTConfig, seq_len: int, available: int | None, limit: int = 1 << 20, **kw) -> int | None:
    """The largest batch size whose estimate_training(config, batch, seq_len, **kw) fits in `available`
    bytes: 0 when not even one row fits, None when the available memory is unknown."""
    if available is None:
        return None
    fits = lambda b: estimate_training(config, b, seq_len, **kw).total <= available  # noqa: E731
    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:  # fits(lo), not fits(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def flops_per_token(config, T: int) -> float:
    """Training FLOPs per token: 6 * (matmul parameters) + 12 * L * T * C (attention scores and mixing).

    Half of the attention products are masked in a causal model; the formula counts them anyway, as
    the PaLM paper's MFU definition does, so figures compare with other reports."""
    C, L, V = config.emb_dim, config.n_layers, config.vocab_size
    matmul_params = L * (12 * C * C) + V * C  # c_attn 3C^2, c_proj C^2, c_fc 4C^2, mlp c_proj 4C^2; head V*C
    return 6.0 * matmul_params + 12.0 * L * T * C


def step_flops(config: GPTConfig, batch_size: int, seq_len: int, recompute: str = "none") -> tuple[float, float]:
    """(the model's FLOPs for one training step, the FLOPs recompute adds). The first is
    flops_per_token's count (what `npgpt bench` reports GFLOP/s and MFU from); recompute adds
    attention's q @ k^T again ("attention"; "block" also reruns every block's forward up to GELU)."""
    B, T, C, L = batch_size, seq_len, config.emb_dim, config.n_layers
    N = B * T
    model = flops_per_token(config, T) * N
    extra = 0.0
    if recompute in ("attention", "block"):
        extra += L * 2.0 * B * T * T * C  # the scores, once more in the backward
    if recompute == "block":
        extra += L * (2.0 * N * C * (3 * C + C + 4 * C) + 4.0 * B * T * T * C)  # c_attn, c_proj, c_fc, attention
    return model, extra


def plan_report(config: GPTConfig, batch_size: int, seq_len: int, dtype="float32", precision: str = "fp32",
                engine: str = "fast", grad_accum: int = 1, recompute: str = "none", device: str = "cpu",
                available: int | None = None, name: str = "") -> str:  # fmt: skip
    """What `npgpt train --dry-run` and `npgpt bench --dry-run` print: the parameters, each part of the
    memory estimate, the available memory, the largest batch that fits (for each recompute setting of
    the fast engine), and the step's FLOPs. Computes only: nothing is allocated."""
    gpu = device == "cuda"
    kw = dict(dtype=dtype, precision=precision, engine=engine, grad_accum=grad_accum, gpu=gpu)
    est = estimate_training(config, batch_size, seq_len, recompute=recompute, **kw)
    P = param_count(config)
    lines = [f"{name or 'model'}: {P:,} parameters ({P / 1e6:.1f}M), batch {batch_size} x {seq_len} tokens"
             f"{f' x {grad_accum} micro-batches' if grad_accum > 1 else ''}, {dtype}, precision {precision}, "
             f"{engine} engine, recompute {recompute}"]  # fmt: skip
    for label, n in [("weights", est.weights), ("gradients", est.gradients), ("AdamW moments", est.optimizer),
                     ("activations", est.activations), ("scratch", est.workspace), ("temporaries", est.transient),
                     ("total", est.total)]:  # fmt: skip
        if n or label != "temporaries":
            lines.append(f"  {label:<16}{fmt_bytes(n):>12}")
    if available is None:
        available = available_memory(device)
    where = "the GPU" if gpu else "this machine"
    if available is None:
        lines.append(f"  available       unknown on {where}")
    else:
        verdict = "fits" if est.total <= available else "does NOT fit"
        lines.append(f"  available       {fmt_bytes(available):>12} on {where}: {verdict}")
        modes = RECOMPUTE_MODES if engine == "fast" else ("none",)
        best = {m: largest_batch(config, seq_len, available, recompute=m, **kw) for m in modes}
        lines.append(f"  largest batch that fits at {seq_len} tokens: "
                     + ", ".join(f"{b} (recompute {m})" for m, b in best.items()))  # fmt: skip
    model, extra = step_flops(config, batch_size, seq_len, recompute if engine == "fast" else "none")
    lines.append(f"  FLOPs per micro-batch: {model / 1e9:,.1f} GFLOP"
                 + (f" + {extra / 1e9:,.1f} GFLOP recomputed" if extra else "")
                 + (f" ({grad_accum} micro-batches a step)" if grad_accum > 1 else ""))  # fmt: skip
    return "\n".join(lines)


RECOMPUTE_MODES = ("none", "attention", "mlp", "block")  # engine.RECOMPUTE (not imported: the engine imports memory.py)
# The fast engine's LM head pads the vocabulary to a multiple of this for its three GEMMs (engine/ends.py):
# on a GPU 128 (GPT-2's 50257 -> 50304, as llm.c), so every dimension and leading dimension of the step's
# largest GEMMs is a multiple of 128 elements; on the CPU none (1): measured no faster there
# (docs/benchmarks.md, "The padded output head"). Defined here, where the estimates need it too.
VOCAB_MULTIPLE = {"cpu": 1, "gpu": 128}


def padded_vocab(vocab_size: int, multiple: int) -> int:
    """vocab_size rounded up to a multiple of `multiple` (>= 1)."""
    if int(multiple) < 1:
        raise ValueError(f"vocab_multiple must be a positive integer, got {multiple}")
    return -(-int(vocab_size) // int(multiple)) * int(multiple)


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
