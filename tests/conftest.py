import hashlib
import json
import os
import re
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

from npgpt.backend import cuda_available, cuda_unavailable_reason

FAKE_CUDA = os.environ.get("NPGPT_FAKE_CUDA") == "1"
if FAKE_CUDA:  # a dry run of the GPU tests' own logic on the CPU stand-in
    import fake_cupy

    sys.modules.update(fake_cupy.modules())
    fake_cupy.reset()

KERNEL_LOG = os.environ.get("NPGPT_FAKE_KERNEL_LOG")  # with NPGPT_FAKE_CUDA=1: the kernels each test makes CuPy compile


def pytest_runtest_teardown(item):
    """With NPGPT_FAKE_KERNEL_LOG (and the stand-in for the session): one JSON line per test with every kernel
    it made CuPy use (benchmarks/gpu_compile_budget.py replays them in the GPU check's order: the first
    use of each is a compile)."""
    if KERNEL_LOG and FAKE_CUDA:
        import json

        used = sys.modules["fake_cupy"].kernels_used
        with open(KERNEL_LOG, "a") as f:
            f.write(json.dumps({"test": item.nodeid, "kernels": sorted(repr(k) for k in used)}) + "\n")
        used.clear()


REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(autouse=True, scope="session")
def _isolated_token_cache(tmp_path_factory):
    """Tests never write into the user's ~/.cache."""
    old = os.environ.get("NPGPT_CACHE_DIR")
    os.environ["NPGPT_CACHE_DIR"] = str(tmp_path_factory.mktemp("npgpt-cache"))
    yield
    if old is None:
        os.environ.pop("NPGPT_CACHE_DIR", None)
    else:
        os.environ["NPGPT_CACHE_DIR"] = old


needs_cuda = pytest.mark.skipif(not cuda_available(), reason="needs CuPy and a working CUDA GPU")
# For the tests that start Python processes of their own: those import the real CuPy, not the stand-in.
not_with_the_stand_in = pytest.mark.skipif(FAKE_CUDA, reason="starts its own Python processes, which the CPU stand-in (fake_cupy) does not reach")
# On a GPU machine, NPGPT_REQUIRE_CUDA=1 makes every CUDA test that does not run a failure that says why,
# so `pytest -m cuda` cannot pass with tests skipped: a skip for want of CUDA fails at setup naming why
# CUDA is not usable, and any other skip of a `cuda` test (a missing mpi4py, a torch without CUDA, a
# pytest.skip inside the test) fails in the report hook below. The one exception: a test marked
# gpus(n) on a machine with fewer GPUs, which skips saying how many it needs and how many there are.
REQUIRE_CUDA = os.environ.get("NPGPT_REQUIRE_CUDA") == "1"


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs CuPy and a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "gpus(n): needs n CUDA GPUs; on a machine with fewer it skips saying so, "
                                       "even under NPGPT_REQUIRE_CUDA=1 (a `cuda` test)")  # fmt: skip


def _skips_for_want_of_cuda(item) -> bool:
    """A skipif whose condition held and whose reason is a missing CUDA or GPU, where CUDA is missing
    (a test that skips *because* this machine has CUDA is not one)."""
    if cuda_available():
        return False
    for mark in item.iter_markers("skipif"):
        reason = str(mark.kwargs.get("reason", ""))
        if mark.args and mark.args[0] is True and ("CUDA" in reason or "GPU" in reason):
            return True
    return False


def pytest_collection_modifyitems(config, items):
    """Every test that skips because CUDA is missing, or asks for GPUs, carries the `cuda` marker, so
    -m cuda selects it."""
    for item in items:
        wants_cuda = _skips_for_want_of_cuda(item) or item.get_closest_marker("gpus") is not None
        if wants_cuda and item.get_closest_marker("cuda") is None:
            item.add_marker(pytest.mark.cuda)


def gpu_count() -> int:
    import cupy

    return int(cupy.cuda.runtime.getDeviceCount())


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    if REQUIRE_CUDA and _skips_for_want_of_cuda(item):
        pytest.fail(f"NPGPT_REQUIRE_CUDA=1 but CUDA is not usable: {cuda_unavailable_reason()}", pytrace=False)
    mark = item.get_closest_marker("gpus")
    if mark is not None and cuda_available():
        need, have = int(mark.args[0]), gpu_count()
        if have < need:
            item.stash[_TOO_FEW_GPUS] = True
            pytest.skip(f"needs {need} GPUs; this machine has {have}")


_TOO_FEW_GPUS = pytest.StashKey[bool]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under NPGPT_REQUIRE_CUDA=1 a skipped `cuda` test is a failure that quotes why it skipped."""
    outcome = yield
    rep = outcome.get_result()
    if not (REQUIRE_CUDA and rep.skipped and item.get_closest_marker("cuda") is not None):
        return
    if hasattr(rep, "wasxfail") or item.stash.get(_TOO_FEW_GPUS, False):
        return
    reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
    reason = reason.removeprefix("Skipped: ")
    rep.outcome = "failed"
    rep.longrepr = (f"NPGPT_REQUIRE_CUDA=1: a CUDA test may not pass by skipping, and this one skipped: {reason} "
                    "(install what it names, or run without NPGPT_REQUIRE_CUDA=1)")  # fmt: skip


def pytest_collectreport(report):
    """Under NPGPT_REQUIRE_CUDA=1 a test file with CUDA tests that skips whole (a module-level
    importorskip) is a failure too."""
    if not (REQUIRE_CUDA and report.skipped and str(report.nodeid).endswith(".py")):
        return
    path = Path(str(report.fspath))
    if path.is_file() and re.search(r"mark\.cuda|needs_cuda|needs_gpu", path.read_text(errors="replace")):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        report.outcome = "failed"
        report.longrepr = f"NPGPT_REQUIRE_CUDA=1: {path.name} holds CUDA tests but skipped whole: {reason}"


# --- TF32 is a run's state, never a test's: it must be as it was after every test ------------------------------


def _tf32_state() -> tuple:
    """($CUPY_TF32, the float32 compute type CuPy would use next) as they stand: the stand-in's read without
    deciding it; a real CuPy's read through get_compute_type (which decides it from $CUPY_TF32, as the next
    float32 product would)."""
    env = os.environ.get("CUPY_TF32")
    cupy = sys.modules.get("cupy")
    if cupy is None:
        return env, None
    if getattr(cupy, "__file__", None) == getattr(sys.modules.get("fake_cupy"), "__file__", 0):
        return env, sys.modules["fake_cupy"].effective_compute_type()
    try:
        from cupy._core import _routines_linalg as linalg

        return env, int(linalg.get_compute_type(np.float32))
    except Exception:
        return env, None


def _restore_tf32(state: tuple) -> None:
    env, kind = state
    if env is None:
        os.environ.pop("CUPY_TF32", None)
    else:
        os.environ["CUPY_TF32"] = env
    if kind is not None:
        from cupy._core import _routines_linalg as linalg

        linalg.set_compute_type(np.float32, kind)


_ON_THE_STAND_IN = pytest.StashKey[bool]()


@pytest.fixture(autouse=True)
def _tf32_left_as_found(request):
    """Every test leaves $CUPY_TF32 and CuPy's float32 compute type as it found them (a leaked TF32 turns
    every later float32 product on the GPU into a TF32 one, and float32 tolerances fail far away). A test
    that had the stand-in installed for itself (the fake_cupy fixture, which starts it with TF32 off, as
    CuPy starts) must leave it off. Checked after the test's monkeypatch has been undone; what was left
    is put back, so that only the test that left it fails."""
    before = _tf32_state()
    yield
    left, after = [], _tf32_state()
    if after != before:
        _restore_tf32(before)
        left.append(f"($CUPY_TF32, CuPy's float32 compute type) {after}, found {before}")
    if request.node.stash.get(_ON_THE_STAND_IN, False):
        import fake_cupy as fc

        kind = fc.compute_types[2]
        if kind not in (fc.COMPUTE_TYPE_TBD, fc.COMPUTE_TYPE_DEFAULT):
            fc.compute_types[2] = fc.COMPUTE_TYPE_TBD
            left.append(f"the CuPy stand-in's float32 compute type {kind} (7 is TF32), found off")
    if left:
        pytest.fail(f"{request.node.nodeid} left TF32 changed: {'; '.join(left)}. A run sets TF32 inside "
                    "npgpt.backend.tf32_mode(), which puts it back", pytrace=False)  # fmt: skip


def backend_params():
    """numpy always; cupy as a case that skips cleanly without a GPU."""
    return [pytest.param("numpy", id="numpy"), pytest.param("cupy", id="cupy", marks=[needs_cuda, pytest.mark.cuda])]


@pytest.fixture(params=backend_params())
def xp(request):
    if request.param == "numpy":
        return np
    import cupy

    return cupy


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(scope="session")
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is not there (CI places ../shared beside the clone)")
    return SHARED_DATA


@pytest.fixture
def fake_cupy(monkeypatch, request):
    """CuPy's CPU stand-in (tests/fake_cupy.py) installed as `cupy` for one test: npgpt's CuPy code paths
    run on DeviceArrays, and the module counts host transfers, records GEMMs, devices and allocations."""
    import fake_cupy as fc

    request.node.stash[_ON_THE_STAND_IN] = True  # _tf32_left_as_found checks the stand-in's TF32 too
    yield fc.install(monkeypatch)
    fc.uninstall()


@pytest.fixture
def split_small_work(monkeypatch):
    """The fast ops keep small arrays on one thread (npgpt.fast.common.PARALLEL_MIN_ELEMENTS); tests of the
    threaded paths use small arrays, so this lifts the threshold and threads=2 really splits the rows."""
    monkeypatch.setattr("npgpt.fast.common.PARALLEL_MIN_ELEMENTS", 0)


# --- helpers several test files share (from conftest import ...) -----------------------------------------------


def sha256_tree(root, skip=()) -> dict:
    """{path relative to root: sha256 of its bytes} for every file under root whose name is not in skip."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(root).rglob("*"))
            if p.is_file() and p.name not in skip}  # fmt: skip


def err_lines(capsys) -> list:
    """The non-blank lines written to stderr since capsys was last read."""
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def metrics_records(out, kind) -> list:
    """The records of `kind` ("step", "eval", "skip", ...) in out/metrics.jsonl (the file must be there)."""
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines() if f'"kind": "{kind}"' in line]


def step_losses(out) -> list:
    """[(step, loss)] of out/metrics.jsonl's step records, in the order written."""
    return [(r["step"], r["loss"]) for r in metrics_records(out, "step")]


def write_llmc(path, tokens, magic=20240520, version=1, count=None):
    """llm.c's write_datafile, from its description: 256 int32 (magic, version, count, zeros), uint16 tokens."""
    tokens = list(map(int, tokens))
    header = struct.pack("<256i", magic, version, len(tokens) if count is None else count, *([0] * 253))
    Path(path).write_bytes(header + struct.pack(f"<{len(tokens)}H", *tokens))
    return path
