import sys
import types

import numpy as np
import pytest

from npgpt import backend
from npgpt.backend import get_array_module, resolve_device, to_numpy


def test_numpy_arrays_give_numpy():
    assert get_array_module(np.ones(2)) is np
    assert get_array_module(None, np.ones(2), 3.0) is np
    assert get_array_module() is np


def test_to_numpy_passes_numpy_through():
    a = np.arange(3)
    assert to_numpy(a) is a
    assert isinstance(to_numpy([1, 2]), np.ndarray)


def test_resolve_device_by_argument_and_environment(monkeypatch):
    assert resolve_device("cpu") == "cpu"
    assert resolve_device(" CPU ") == "cpu"
    monkeypatch.setenv("NPGPT_DEVICE", "cpu")
    assert resolve_device(None) == "cpu"
    monkeypatch.setenv("NPGPT_DEVICE", "auto")
    assert resolve_device(None) == ("cuda" if backend.cuda_available() else "cpu")
    monkeypatch.setenv("NPGPT_DEVICE", "tpu")
    with pytest.raises(ValueError, match="NPGPT_DEVICE.*cpu, cuda, auto"):
        resolve_device(None)
    assert resolve_device("cpu") == "cpu"  # the argument wins over the environment


def test_unknown_device_argument_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        resolve_device("gpu")


@pytest.mark.skipif(backend.cuda_available(), reason="this machine has CUDA")
def test_asking_for_cuda_without_it_explains(monkeypatch):
    with pytest.raises(ValueError, match="device 'cuda' was asked for"):
        resolve_device("cuda")
    monkeypatch.setenv("NPGPT_DEVICE", "cuda")
    with pytest.raises(ValueError, match="from the NPGPT_DEVICE"):
        resolve_device(None)


def test_cuda_check_never_raises_when_cupy_is_broken(monkeypatch):
    """CuPy imports on a machine without a driver and fails at the first call: that is 'no CUDA'."""

    class Runtime:
        @staticmethod
        def getDeviceCount():
            raise RuntimeError("cudaErrorInsufficientDriver: CUDA driver version is insufficient")

    fake = types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=Runtime()))
    monkeypatch.setattr(backend, "_import_cupy", lambda: fake)
    backend.cuda_available.cache_clear()
    try:
        assert backend.cuda_available() is False
        assert "no CUDA driver answered" in backend.cuda_unavailable_reason()
    finally:
        backend.cuda_available.cache_clear()


def test_cuda_check_false_when_allocation_fails(monkeypatch):
    class Runtime:
        @staticmethod
        def getDeviceCount():
            return 1

    def zeros(*a, **k):
        raise MemoryError("cudaErrorNoDevice")

    fake = types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=Runtime()), zeros=zeros, float32=np.float32)
    monkeypatch.setattr(backend, "_import_cupy", lambda: fake)
    backend.cuda_available.cache_clear()
    try:
        assert backend.cuda_available() is False
    finally:
        backend.cuda_available.cache_clear()


def test_importing_npgpt_does_not_import_cupy_or_autograd():
    import subprocess

    code = (
        "import sys, npgpt, npgpt.layers, npgpt.train, npgpt.cli, npgpt.gradcheck_suite, npgpt.bench;"
        "npgpt.GPT(npgpt.GPTConfig.from_preset('nano'), device='cpu');"
        "bad=[m for m in ('torch','jax','autograd','cupy','transformers') if m in sys.modules];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"NPGPT_DEVICE": "cpu", "PATH": ""})
    assert out.returncode == 0, out.stdout + out.stderr


def test_package_source_never_imports_an_autograd_library():
    import re
    from pathlib import Path

    import npgpt

    pattern = re.compile(r"^\s*(import|from)\s+(torch|jax|autograd|tensorflow|transformers)\b", re.M)
    importers = sorted(p.name for p in Path(npgpt.__file__).parent.rglob("*.py") if pattern.search(p.read_text()))
    # the one exception: the PyTorch twin that `npgpt bench --vs-torch` times against, used by nothing else
    assert importers == ["bench_torch.py"]
    others = [p for p in Path(npgpt.__file__).parent.rglob("*.py") if p.name != "bench_torch.py"]
    assert not [str(p) for p in others if re.search(r"^\s*from\s+\.+bench_torch|import\s+npgpt\.bench_torch", p.read_text(), re.M)
                and p.name != "bench.py"]


def test_the_reason_names_the_exception_a_first_kernel_raised(monkeypatch):
    """CuPy 14 wheels ship no CUDA headers: the first kernel fails to compile. That must be said, not swallowed."""

    class Runtime:
        @staticmethod
        def getDeviceCount():
            return 1

    class Probe:
        def __iadd__(self, other):
            raise RuntimeError("CUDA headers not found: find_nvidia_header_directory('cudart') failed")

    fake = types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=Runtime()), zeros=lambda *a, **k: Probe(),
                                 float32=np.float32)  # fmt: skip
    monkeypatch.setattr(backend, "_import_cupy", lambda: fake)
    backend.cuda_available.cache_clear()
    try:
        assert backend.cuda_available() is False
        reason = backend.cuda_unavailable_reason()
        assert "RuntimeError" in reason and "find_nvidia_header_directory" in reason
    finally:
        backend.cuda_available.cache_clear()


def test_set_tf32_survives_a_cupy_without_a_working_gpu(monkeypatch):
    """CuPy importable but no GPU: CuPy raises CUDARuntimeError (not ImportError) when asked to change its
    cached compute type. CPU training must not crash on that."""
    import sys

    class CUDARuntimeError(RuntimeError):
        pass

    def set_compute_type(*a):
        raise CUDARuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected")

    linalg = types.SimpleNamespace(set_compute_type=set_compute_type, COMPUTE_TYPE_TF32=1, COMPUTE_TYPE_DEFAULT=0)
    core = types.ModuleType("cupy._core")
    core._routines_linalg = linalg
    monkeypatch.setitem(sys.modules, "cupy", types.ModuleType("cupy"))
    monkeypatch.setitem(sys.modules, "cupy._core", core)
    monkeypatch.setitem(sys.modules, "cupy._core._routines_linalg", linalg)
    monkeypatch.setenv("CUPY_TF32", "0")
    backend.set_tf32(True)  # does not raise
    assert backend.tf32_enabled()
    backend.set_tf32(False)
    assert not backend.tf32_enabled()


def test_require_cuda_turns_skips_into_failures_that_say_why(tmp_path):
    """NPGPT_REQUIRE_CUDA=1: a CUDA test cannot pass by skipping (on a GPU machine it runs and passes)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    tests = Path(__file__).parent
    env = {**os.environ, "NPGPT_REQUIRE_CUDA": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda",
                           str(tests / "test_cuda_blas.py")], capture_output=True, text=True, env=env,
                          cwd=tmp_path)  # fmt: skip
    if backend.cuda_available():
        assert proc.returncode == 0, proc.stdout[-2000:]
    else:
        assert proc.returncode == 1, proc.stdout[-2000:]
        assert "NPGPT_REQUIRE_CUDA=1 but CUDA is not usable: " in proc.stdout
        assert " skipped" not in proc.stdout.splitlines()[-1]
