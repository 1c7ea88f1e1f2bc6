"""Splits a pytest part of benchmarks/gpu_check.sh over several pytest processes ("shards"), so that a cold
CuPy kernel cache is compiled on all of the GPU machine's cores at once instead of on one (issue 25,
section 3; docs/benchmarks.md, "GPU check").

Why. A GPU machine starts with no CuPy kernel cache: CuPy compiles each kernel (NVRTC, one thread, 1-5 s of
CPU) the first time a process needs it and stores it on disk, where every later use, in any process, finds
it. One pytest process compiles the ~300 kernels of the CUDA tests one after another (about 545 s,
docs/gpu_compile_budget.json), more than the whole check's 540 s. N processes over a partition of the
tests compile different kernels at the same time. Two things bound the gain: a test compiles the kernels
it needs in the order it uses them, so one that needs 90 kernels no process has compiled yet takes ~150 s
whatever N is; and two processes that need the same uncompiled kernel at the same moment both compile it
(CuPy takes no lock; see "Concurrent writers").

The plan. Which kernels each CUDA test needs is known from the CPU stand-in (tests/fake_cupy.py records
them; benchmarks/gpu_compile_budget.py writes them, with the compile seconds of each kind of kernel, to
benchmarks/gpu_test_kernels.json). The tests are taken in the order pytest collected them, which is the
check's order (most informative first), and each goes to the shard where the simulated part would have it
end soonest, or, among the shards where it would end within TIE_S of that, to the one where it compiles
least itself: every shard starts STARTUP_S after the part, runs its tests in order, and a test takes RUN_S
plus the compile seconds of each kernel it needs that no shard has compiled by then (a kernel is cached for
every shard from the moment one has compiled it). A test the table does not know (new since it was made)
counts UNKNOWN_S. Tests that share kernels therefore gather where those kernels are, and tests that need
other kernels spread over the other shards. The plan is a function of the collected node ids, N and the
table only, so every shard computes the same plan and keeps its own share; each writes the digest of
what it collected, so the driver (gpu_check_tools.py pytest) can check that they agreed.

`simulate` replays a plan event by event (a shard that needs a kernel another shard is still compiling
compiles it too, as CuPy does): the makespan it gives is the estimate behind the parts' time limits.

As a pytest plugin (`-p gpu_shards`, with NPGPT_SHARD=i/N in the environment, i from 1) it keeps shard i's
tests and deselects the rest; without NPGPT_SHARD it does nothing.

Concurrent writers. CuPy 14.2's on-disk kernel cache is safe for processes that write it at once (source
of cupy/cupy at tag v14.2.0):
- cupy/cuda/compiler.py:690-712: a kernel's file name is a hash of all that makes it (source, options,
  NVRTC version, architecture, CuPy's own key), so two writers of one name write the same kernel; it is
  read with the backend's load (718) and written with its save (781);
- compiler.py:393-398: each compile writes its source into a temporary directory of its own;
- cupy/cuda/_compiler_cache.py:95-96: the cache directory is made with os.makedirs(exist_ok=True);
- _compiler_cache.py:139-145: a kernel is written to a fresh tempfile.NamedTemporaryFile (a unique name,
  opened O_EXCL) in the cache directory and then moved onto its name with os.replace, an atomic rename on
  POSIX: a reader sees no file, a whole old file or a whole new one, never a part;
- _compiler_cache.py:111-126 and 159-166: what is read is checked against the SHA-1 stored in front of it,
  and a file that does not match is treated as missing (compiled again), not loaded.
What is not safe is the optional copy of each kernel's source (_compiler_cache.py:179-182, a plain
open(..., "w") under CUPY_CACHE_SAVE_CUDA_SOURCE=1): the driver unsets that variable in the shards. A
shard killed between writing its temporary file and the rename leaves a tmpXXXXXXXX file in the cache
directory, never read, since no kernel has that name.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import os
from pathlib import Path

import pytest

TABLE = Path(__file__).with_name("gpu_test_kernels.json")
STARTUP_S = 10.0  # a shard's start: Python, NumPy, CuPy, torch, npgpt, collecting the part's files, a CUDA context
RUN_S = 0.5  # a CUDA test's own time on the GPU once its kernels are compiled (the tests are small)
UNKNOWN_S = 2.0  # a test the table does not know: about the mean compile seconds per test in the table
TIE_S = 2.0  # ends this much later count as a tie, won by the shard that compiles least
SHARD_GPU_GIB = 4.0  # GPU memory one shard may take: a CUDA context (~0.5 GiB), CuPy's and torch's pools


def table_key(nodeid: str) -> str:
    """A node id as the table keys it, whatever directory pytest wrote it from: 'test_x.py::test_y[p]'."""
    path, _, rest = nodeid.partition("::")
    return f"{path.replace(os.sep, '/').rsplit('/', 1)[-1]}::{rest}"


class Table:
    """The kernels each CUDA test needs, from benchmarks/gpu_test_kernels.json: `compile_s` (seconds of
    one compile of each kind of kernel), `kernels` (the kind of kernel i) and `tests` (node id -> the
    kernels it uses, in the order the stand-in's log gives them)."""

    def __init__(self, data: dict):
        self.compile_s = data.get("compile_s", {})
        default = self.compile_s.get("elementwise", 1.8)
        self.cost = [float(self.compile_s.get(kind, default)) for kind in data.get("kernels", [])]
        self.tests = {table_key(t): list(ks) for t, ks in data.get("tests", {}).items()}

    @classmethod
    def load(cls, path=None) -> Table:
        path = Path(path or os.environ.get("NPGPT_SHARD_TABLE") or TABLE)
        return cls(json.loads(path.read_text()) if path.exists() else {})

    def kernels(self, nodeid: str):
        return self.tests.get(table_key(nodeid))


def _walk(start: float, kernels, table: Table, ready: dict, commit: bool) -> tuple:
    """(when a test that starts at `start` ends, the seconds it compiles itself), given when each kernel
    became ready in some shard's cache (`ready`); with commit, the kernels it compiles are recorded as
    ready when it has compiled each."""
    if kernels is None:
        return start + UNKNOWN_S + RUN_S, UNKNOWN_S
    t = start
    for k in kernels:
        if ready.get(k, float("inf")) <= t:
            continue
        t += table.cost[k]
        if commit:
            ready[k] = min(ready.get(k, float("inf")), t)
    return t + RUN_S, t - start


def plan(nodeids: list, table: Table, shards: int) -> list:
    """The shard (0 .. shards-1) of each test, in the order given: each to the shard where it would end
    soonest or, among those where it would end within TIE_S of that, where it compiles least itself (so a
    test does not take a free shard to compile again what another shard has compiled: that shard may be
    needed by the next family). As if the part started with no kernel compiled: what an earlier part left
    is not known."""
    clock = [STARTUP_S] * shards
    ready = {}
    out = []
    for nodeid in nodeids:
        kernels = table.kernels(nodeid)
        walks = [_walk(clock[s], kernels, table, ready, commit=False) for s in range(shards)]
        soonest = min(end for end, _ in walks)
        s = min((i for i in range(shards) if walks[i][0] <= soonest + TIE_S), key=lambda i: (walks[i][1], walks[i][0], i))
        clock[s] = _walk(clock[s], kernels, table, ready, commit=True)[0]
        out.append(s)
    return out


def simulate(nodeids: list, assignment: list, table: Table, shards: int, cached=()) -> dict:
    """The part replayed event by event: each shard runs its tests in order; a kernel it needs is free if
    some shard finished compiling it by then, else it compiles it (also when another shard is compiling
    it at that moment: CuPy does not wait). Returns the makespan, and per shard its end, compile seconds
    and kernels compiled, and the kernels (and seconds) compiled more than once."""
    work = [[] for _ in range(shards)]
    for nodeid, s in zip(nodeids, assignment):
        work[s].append(table.kernels(nodeid))
    steps = [[] for _ in range(shards)]  # ("k", kernel) or ("t", seconds)
    for s, tests in enumerate(work):
        for kernels in tests:
            steps[s] += [("t", UNKNOWN_S)] if kernels is None else [("k", k) for k in kernels]
            steps[s].append(("t", RUN_S))
    ready = {k: float("-inf") for k in cached}
    compiled = {}  # kernel -> how many times
    per = [{"end": STARTUP_S, "compile_s": 0.0, "kernels": 0, "tests": len(work[s])} for s in range(shards)]
    heap = [(STARTUP_S, s, 0) for s in range(shards) if steps[s]]
    heapq.heapify(heap)
    while heap:
        t, s, i = heapq.heappop(heap)
        kind, what = steps[s][i]
        if kind == "t":
            t += what
        elif ready.get(what, float("inf")) > t:
            t += table.cost[what]
            ready[what] = min(ready.get(what, float("inf")), t)
            compiled[what] = compiled.get(what, 0) + 1
            per[s]["compile_s"] += table.cost[what]
            per[s]["kernels"] += 1
        per[s]["end"] = t
        if i + 1 < len(steps[s]):
            heapq.heappush(heap, (t, s, i + 1))
    again = {k: n - 1 for k, n in compiled.items() if n > 1}
    return {"makespan_s": max(p["end"] for p in per) if per else 0.0, "shards": per,
            "compiled": set(compiled), "compile_s": sum(p["compile_s"] for p in per),
            "duplicated": sum(again.values()), "duplicated_s": sum(table.cost[k] * n for k, n in again.items())}  # fmt: skip


def shards_needed(nodeids: list, table: Table, most: int, slack: float = 0.05) -> tuple:
    """The fewest shards (at most `most`) whose simulated part ends within `slack` (and a second) of the
    best: no process is started that would not make the part end sooner. Returns (shards, the simulation)."""
    sims = {}
    for n in range(1, max(1, most) + 1):
        sims[n] = simulate(nodeids, plan(nodeids, table, n), table, n)
    best = min(s["makespan_s"] for s in sims.values())
    n = min(n for n, s in sims.items() if s["makespan_s"] <= best * (1 + slack) + 1)
    return n, sims[n]


def digest(nodeids: list) -> str:
    return hashlib.sha1("\n".join(nodeids).encode()).hexdigest()[:16]


# --- as a pytest plugin --------------------------------------------------------------------------------------

_NOTE = pytest.StashKey[str]()


@pytest.hookimpl(trylast=True)  # after -m and -k have deselected theirs, and after conftest.py's marks
def pytest_collection_modifyitems(session, config, items):
    spec = os.environ.get("NPGPT_SHARD", "")
    if not spec:
        return
    try:
        index, count = (int(x) for x in spec.split("/"))
    except ValueError:
        index = count = 0
    if not 1 <= index <= count:
        raise pytest.UsageError(f"NPGPT_SHARD={spec!r}: expected i/N with 1 <= i <= N, e.g. 2/16")
    table = Table.load()
    ids = [item.nodeid for item in items]
    assignment = plan(ids, table, count)
    sim = simulate(ids, assignment, table, count)
    mine = [item for item, s in zip(items, assignment) if s == index - 1]
    others = [item for item, s in zip(items, assignment) if s != index - 1]
    if others:
        config.hook.pytest_deselected(items=others)
    items[:] = mine
    known = sum(1 for i in ids if table.kernels(i) is not None)
    me = sim["shards"][index - 1]
    config.stash[_NOTE] = (f"[shard {index}/{count}] {len(mine)} of the {len(ids)} tests collected "
                           f"({known} known to the kernel table); the plan's estimate: {me['kernels']} kernels, "
                           f"{me['compile_s']:.0f} s compiling, ends at {me['end']:.0f} s "
                           f"(the part: {sim['makespan_s']:.0f} s)")  # fmt: skip
    record = os.environ.get("NPGPT_SHARD_RECORD")
    if record:
        Path(record).write_text(json.dumps({"shard": index, "shards": count, "collected": len(ids), "digest": digest(ids),
                                            "tests": len(mine), "estimate_end_s": round(me["end"], 1),
                                            "estimate_part_s": round(sim["makespan_s"], 1)}))  # fmt: skip


def pytest_report_collectionfinish(config, start_path, items):
    return config.stash.get(_NOTE, None)
