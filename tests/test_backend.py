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
