"""CPU threads for NumPy's elementwise work.

NumPy runs a GEMM on all cores (through its BLAS) but every elementwise ufunc on one. NumPy releases
the GIL inside its loops, so splitting a big elementwise job into blocks and handing the blocks to a
few threads uses the other cores too. `parallel_blocks` does that for the jobs that pay for it (AdamW
over all the parameters, GELU over the MLP activations); the threads never run during a GEMM.
NPGPT_THREADS sets the number of threads (default: the cores this process may use).
"""

from __future__ import annotations

import contextvars
import os
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import Callable, Sequence


def num_threads() -> int:
    env = os.environ.get("NPGPT_THREADS")
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            raise ValueError(f"NPGPT_THREADS must be a positive integer, got {env!r}") from None
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


@lru_cache(maxsize=None)
def _pool(n: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=n, thread_name_prefix="npgpt")


def parallel_blocks(blocks: Sequence, work: Callable[[Sequence, int], None], threads: int | None = None) -> None:
    """Call work(part, worker_index) on `threads` contiguous parts of `blocks` at once, and wait.

    Each worker gets its own index, so it can use its own scratch buffer. With one thread (or one block)
    this is a plain call."""
    n = min(threads or num_threads(), len(blocks))
    if n <= 1:
        work(blocks, 0)
        return
    size = -(-len(blocks) // n)
    parts = [blocks[i * size : (i + 1) * size] for i in range(n)]
    futures = [_pool(n).submit(_in_callers_context(), work, part, w) for w, part in enumerate(parts) if len(part)]
    for f in futures:
        f.result()  # re-raises a worker's exception here


def parallel_ranges(n: int, work: Callable[[int, int, int], None], threads: int | None = None) -> None:
    """Split range(n) into one contiguous piece per thread and call work(lo, hi, worker) on each at once."""
    t = min(threads or num_threads(), n)
    if t <= 1:
        work(0, n, 0)
        return
    bounds = [n * i // t for i in range(t + 1)]
    futures = [_pool(t).submit(_in_callers_context(), work, bounds[i], bounds[i + 1], i) for i in range(t)]
    for f in futures:
        f.result()


def _in_callers_context():
    """A runner that calls a function in a copy of the calling thread's context, so the workers see the
    caller's NumPy error state (np.errstate lives in a context variable)."""
    return contextvars.copy_context().run


@lru_cache(maxsize=None)
def _blas_controller():
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController().select(user_api="blas")


def single_threaded_blas():
    """A context in which BLAS runs on the calling thread only, so several Python threads can each run
    their own small GEMMs side by side (used for attention's per-head products)."""
    return _blas_controller().limit(limits=1)
