import os
from pathlib import Path

import numpy as np
import pytest

from npgpt.backend import cuda_available, cuda_unavailable_reason

FAKE_CUDA = os.environ.get("NPGPT_FAKE_CUDA") == "1"
if FAKE_CUDA:  # a dry run of the GPU tests' own logic on the CPU stand-in
    import sys

    import fake_cupy

    sys.modules.update(fake_cupy.modules())
    fake_cupy.reset()

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
# On a GPU machine, NPGPT_REQUIRE_CUDA=1 turns every skip for want of CUDA into a failure that says why
# CUDA is not usable, so `pytest -m cuda` cannot pass with everything skipped.
REQUIRE_CUDA = os.environ.get("NPGPT_REQUIRE_CUDA") == "1"


def _skips_for_want_of_cuda(item) -> bool:
    for mark in item.iter_markers("skipif"):
        reason = str(mark.kwargs.get("reason", ""))
        if mark.args and mark.args[0] is True and ("CUDA" in reason or "GPU" in reason):
            return True
    return False


def pytest_collection_modifyitems(config, items):
    """Every test that skips because CUDA is missing carries the `cuda` marker, so -m cuda selects it."""
    for item in items:
        if _skips_for_want_of_cuda(item) and item.get_closest_marker("cuda") is None:
            item.add_marker(pytest.mark.cuda)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    if REQUIRE_CUDA and _skips_for_want_of_cuda(item):
        pytest.fail(f"NPGPT_REQUIRE_CUDA=1 but CUDA is not usable: {cuda_unavailable_reason()}", pytrace=False)


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
def fake_cupy(monkeypatch):
    """CuPy's CPU stand-in (tests/fake_cupy.py) installed as `cupy` for one test: npgpt's CuPy code paths
    run on DeviceArrays, and the module counts host transfers, records GEMMs, devices and allocations."""
    import fake_cupy as fc

    yield fc.install(monkeypatch)
    fc.uninstall()


@pytest.fixture
def split_small_work(monkeypatch):
    """The fast ops keep small arrays on one thread (npgpt.fast.common.PARALLEL_MIN_ELEMENTS); tests of the
    threaded paths use small arrays, so this lifts the threshold and threads=2 really splits the rows."""
    monkeypatch.setattr("npgpt.fast.common.PARALLEL_MIN_ELEMENTS", 0)
