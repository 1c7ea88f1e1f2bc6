import os
from pathlib import Path

import numpy as np
import pytest

from npgpt.backend import cuda_available

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
