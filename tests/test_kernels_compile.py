"""Every CUDA source in kernels/ must compile: with nvcc for sm_80 and sm_90 when nvcc is on the PATH,
and through NVRTC (the compiler CuPy uses at run time) when CuPy can load it."""

import shutil
import subprocess

import pytest

from npgpt.kernels import kernel_dir, kernel_source, kernel_sources

SOURCES = kernel_sources()
NVCC = shutil.which("nvcc")


def test_kernels_folder_is_documented():
    readme = (kernel_dir() / "README.md").read_text()
    assert "one op per file" in readme.lower() and "reference" in readme


def test_kernel_source_names_what_is_available():
    with pytest.raises(ValueError, match="no kernel source"):
        kernel_source("does-not-exist")


@pytest.mark.skipif(not SOURCES, reason="no .cu files in kernels/ yet")
@pytest.mark.skipif(NVCC is None, reason="nvcc is not on the PATH")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("source", SOURCES, ids=[p.name for p in SOURCES])
def test_nvcc_compiles(source, arch, tmp_path):
    out = tmp_path / (source.stem + ".cubin")
    proc = subprocess.run([NVCC, "-cubin", f"-arch={arch}", "-std=c++17", "-Werror", "all-warnings", "-o", str(out), str(source)],
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_size > 0


@pytest.mark.skipif(not SOURCES, reason="no .cu files in kernels/ yet")
@pytest.mark.parametrize("source", SOURCES, ids=[p.name for p in SOURCES])
def test_header_states_math_shapes_launch_and_reference(source):
    head = source.read_text()[:4000].lower()
    for word in ("math", "shape", "launch", "reference"):
        assert word in head, f"{source.name}'s header does not state its {word}"
