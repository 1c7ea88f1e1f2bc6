"""Every CUDA source in kernels/ must compile: with nvcc for sm_80 and sm_90 when nvcc is on the PATH,
and through NVRTC (the compiler CuPy uses at run time) when an NVRTC library can be found (CuPy's, the
pip package nvidia-cuda-nvrtc-cu12 from `pip install 'npgpt[kernels]'`, or a CUDA toolkit's) together
with the CUDA runtime headers the kernels' 16-bit types come from (cuda_bf16.h, cuda_fp16.h: the pip
package nvidia-cuda-runtime-cu12 from the same extra, or a toolkit's; CuPy puts them on NVRTC's include
path itself). Neither needs a GPU."""

import importlib
import re
import shutil
import subprocess

import pytest

from npgpt.cuda import KERNEL_FILES
from npgpt.cuda.kernels import ATTENTION_HEAD_SIZES, KERNEL_ENTRIES, expanded_source
from npgpt.cuda.nvrtc import compile_to_ptx, compile_with_log, find_cuda_headers, find_nvrtc
from npgpt.cuda.sources import kernel_dir, kernel_source, kernel_sources

SOURCES = kernel_sources()
NVCC = shutil.which("nvcc")
NVRTC = find_nvrtc()
needs_nvrtc = pytest.mark.skipif(NVRTC is None, reason="no NVRTC library found (pip install 'npgpt[kernels]' provides one)")
needs_headers = pytest.mark.skipif(find_cuda_headers() is None, reason="no CUDA runtime headers (cuda_bf16.h) found for NVRTC "
                                   "(pip install 'npgpt[kernels]' provides them, or set $NPGPT_CUDA_INCLUDE)")  # fmt: skip


def test_kernels_folder_is_documented():
    readme = (kernel_dir() / "README.md").read_text()
    assert "one op per file" in readme.lower() and "reference" in readme
    for name in KERNEL_FILES:
        assert name in readme, f"kernels/README.md does not list {name}"


def test_kernel_source_names_what_is_available():
    with pytest.raises(ValueError, match="no kernel source"):
        kernel_source("does-not-exist")


def test_every_source_has_its_entry_list():
    assert sorted(p.name for p in SOURCES) == sorted(KERNEL_ENTRIES)
    assert set(KERNEL_FILES.values()) <= set(KERNEL_ENTRIES)


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


def _resolve(dotted: str):
    module, _, attr = dotted.rpartition(".")
    return importlib.import_module(module), getattr(importlib.import_module(module), attr)


@pytest.mark.skipif(not SOURCES, reason="no .cu files in kernels/ yet")
@pytest.mark.parametrize("source", SOURCES, ids=[p.name for p in SOURCES])
def test_header_names_the_python_function_it_must_match(source):
    """The header's `// Matches:` line names Python functions that exist, and a fast op named there
    names this kernel file back in its module docstring: renaming either side fails here."""
    (line,) = re.findall(r"^// Matches: (.+)$", source.read_text()[:6000], flags=re.M)
    for dotted in [name.strip() for name in line.split(",")]:
        module, fn = _resolve(dotted)
        assert callable(fn), dotted
        if module.__name__.startswith("npgpt.fast."):
            assert f"kernels/{source.name}" in module.__doc__, f"{module.__name__} does not name kernels/{source.name}"


def test_every_wrapper_names_a_fast_op_that_exists():
    from npgpt.cuda import kernels

    named = re.findall(r"Fast op it matches: (npgpt\.fast\.[\w.]+)", "\n".join(
        f.__doc__ or "" for f in vars(kernels).values() if callable(f)))  # fmt: skip
    assert len(named) >= 9  # layernorm x2, gelu x2, cross-entropy, attention x2 at the level of heads, flash x2
    for dotted in named:
        assert callable(_resolve(dotted)[1]), dotted


def _entries(ptx):
    return re.findall(r"\.entry\s+(\w+)", ptx)


@needs_nvrtc
@needs_headers
@pytest.mark.parametrize("source", SOURCES, ids=[p.name for p in SOURCES])
def test_nvrtc_compiles_with_the_include_path(source):
    """The file as it is on disk, with kernels/ on the include path, warning-free; every kernel the
    wrappers call is in the PTX, and nothing else."""
    ptx, log = compile_with_log(source.read_text(), source.name, arch="compute_80", include_dirs=[kernel_dir()])
    assert log == "", log
    assert sorted(_entries(ptx)) == sorted(KERNEL_ENTRIES[source.name])


@needs_nvrtc
@needs_headers
@pytest.mark.parametrize("arch", ["compute_80", "compute_90"])
@pytest.mark.parametrize("source", SOURCES, ids=[p.name for p in SOURCES])
def test_nvrtc_compiles_what_the_wrappers_hand_to_cupy(source, arch):
    """The text npgpt.cuda.kernels gives cupy.RawModule: the header inlined, no include path, and for
    attention one head size at a time (-DNPGPT_ATTENTION_ONLY_HS)."""
    variants = [()]
    if source.name == "attention.cu":
        variants = [(("NPGPT_ATTENTION_ONLY_HS", hs),) for hs in (ATTENTION_HEAD_SIZES[0], 64, ATTENTION_HEAD_SIZES[-1])]
    for defines in variants:
        ptx = compile_to_ptx(expanded_source(source.name, defines), source.name, arch=arch)
        entries = set(_entries(ptx))
        if defines:
            hs = defines[0][1]
            assert entries == {"attention_bwd_rowdot"} | {f"attention_{k}_hs{hs}" for k in ("fwd", "bwd_dkdv", "bwd_dq")}
        else:
            assert entries == set(KERNEL_ENTRIES[source.name])


@needs_nvrtc
def test_nvrtc_reports_errors_with_its_log():
    with pytest.raises(ValueError, match="NVRTC could not compile broken.cu") as e:
        compile_to_ptx('extern "C" __global__ void k(float* x) { x[0] = undefined_name; }', "broken.cu")
    assert "undefined_name" in str(e.value)


def test_cuda_headers_are_found_where_npgpt_cuda_include_says(tmp_path, monkeypatch):
    """$NPGPT_CUDA_INCLUDE is used when it holds both 16-bit headers, and then nothing else is tried."""
    find_cuda_headers.cache_clear()
    try:
        monkeypatch.setenv("NPGPT_CUDA_INCLUDE", str(tmp_path))
        (tmp_path / "cuda_bf16.h").write_text("")
        assert find_cuda_headers() is None  # cuda_fp16.h missing
        find_cuda_headers.cache_clear()
        (tmp_path / "cuda_fp16.h").write_text("")
        assert find_cuda_headers() == str(tmp_path)
    finally:
        find_cuda_headers.cache_clear()
