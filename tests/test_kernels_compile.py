"""Every CUDA source in kernels/ must compile: with nvcc for sm_80 and sm_90 when nvcc is on the PATH,
and through NVRTC (the compiler CuPy uses at run time) when an NVRTC library can be found (CuPy's, the
pip package nvidia-cuda-nvrtc-cu12 from `pip install 'npgpt[kernels]'`, or a CUDA toolkit's) together
with the CUDA runtime headers the kernels' 16-bit types come from (cuda_bf16.h, cuda_fp16.h: the pip
package nvidia-cuda-runtime-cu12 from the same extra, or a toolkit's; CuPy puts them on NVRTC's include
path itself). Neither needs a GPU."""

import importlib
import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from npgpt.cuda import KERNEL_FILES
from npgpt.cuda.kernels import ATTENTION_HEAD_SIZES, KERNEL_ENTRIES, LAUNCH_BLOCKS, expanded_source, launch_block
from npgpt.cuda.nvrtc import compile_to_ptx, compile_with_log, find_cuda_headers, find_nvrtc
from npgpt.cuda.sources import kernel_dir, kernel_source, kernel_sources

_spec = importlib.util.spec_from_file_location("kernel_resources", Path(__file__).parents[1] / "benchmarks" / "kernel_resources.py")
kernel_resources = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kernel_resources)

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
def test_nvcc_compiles_without_register_spills(source, arch, tmp_path):
    """Warning-free with CuPy's options, every kernel KERNEL_ENTRIES lists reported by ptxas (and no other),
    and none spills registers to local memory (ptxas -v: 0 bytes spill stores and loads). Not a GPU test:
    it runs wherever nvcc is, and fails there rather than skip."""
    out = tmp_path / (source.stem + ".cubin")
    proc = subprocess.run([NVCC, "-cubin", f"-arch={arch}", *kernel_resources.NVCC_OPTIONS, "-Werror", "all-warnings",
                           "-Xptxas", "-v", "-o", str(out), str(source)], capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_size > 0
    report = kernel_resources.parse_ptxas(proc.stdout + proc.stderr)
    assert sorted(report) == sorted(KERNEL_ENTRIES[source.name]), "ptxas's entries are not the kernels KERNEL_ENTRIES lists"
    assert {r["arch"] for r in report.values()} == {arch}
    spilled = {k: (r["spill_stores"], r["spill_loads"]) for k, r in report.items() if r["spill_stores"] or r["spill_loads"]}
    assert not spilled, f"register spills (bytes stored, loaded) for {arch}: {spilled}"


def test_ptxas_report_is_read_as_ptxas_writes_it():
    text = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'k_bf16' for 'sm_90'
ptxas info    : Function properties for k_bf16
    8 bytes stack frame, 12 bytes spill stores, 16 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 2112 bytes smem, 400 bytes cmem[0]
ptxas info    : Compiling entry function 'k' for 'sm_90'
ptxas info    : Function properties for k
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 18 registers, used 0 barriers, 380 bytes cmem[0]
"""
    assert kernel_resources.parse_ptxas(text) == {
        "k_bf16": {"arch": "sm_90", "registers": 255, "stack": 8, "spill_stores": 12, "spill_loads": 16, "smem": 2112},
        "k": {"arch": "sm_90", "registers": 18, "stack": 0, "spill_stores": 0, "spill_loads": 0, "smem": 0},
    }
    with pytest.raises(ValueError, match="no register count for k"):
        kernel_resources.parse_ptxas("ptxas info    : Compiling entry function 'k' for 'sm_80'\n")


def test_occupancy_from_the_sm_limits():
    """Worked by hand from SM_LIMITS: 32 registers x 32 lanes = 1024 a warp, 16 warps in each 16384-register
    partition, 64 an SM, 8 blocks of 8 warps: 100%. 245 registers: 7840 a warp, allocated 7936, 2 warps a
    partition, 8 an SM: one block of 256 (12.5%). 40 registers, 128 threads: 1280 a warp, 12 a partition,
    48 an SM, 12 blocks of 4 warps (75%). 33 KB of static shared memory on sm_80: 33 KB + 1 KB reserved =
    34 KB a block, 164 // 34 = 4 blocks of 8 warps (50%), 6 on sm_90 (228 KB)."""
    occ = kernel_resources.occupancy
    assert occ(32, 0, 256, "sm_80") == (8, 1.0, "-")
    assert occ(245, 33024, 256, "sm_90") == (1, 0.125, "registers")
    assert occ(40, 0, 128, "sm_80") == (12, 0.75, "registers")
    assert occ(16, 33 * 1024, 256, "sm_80") == (4, 0.5, "shared memory")
    assert occ(16, 33 * 1024, 256, "sm_90") == (6, 0.75, "shared memory")
    assert occ(256, 0, 32, "sm_90")[0] == 0  # more than 255 registers a thread: no block fits


_OCC_HARNESS = r"""
#include <cuda_occupancy.h>
#include <cstdio>
int main() {
    int major, minor, regs, block;
    long smem_sm, smem;
    while (std::scanf("%d %d %ld %d %ld %d", &major, &minor, &smem_sm, &regs, &smem, &block) == 6) {
        cudaOccDeviceProp prop;
        prop.computeMajor = major;
        prop.computeMinor = minor;
        prop.maxThreadsPerBlock = 1024;
        prop.maxThreadsPerMultiprocessor = 2048;
        prop.regsPerBlock = 65536;
        prop.regsPerMultiprocessor = 65536;
        prop.warpSize = 32;
        prop.sharedMemPerBlock = 48 * 1024;
        prop.sharedMemPerMultiprocessor = smem_sm;
        prop.numSms = 132;
        prop.sharedMemPerBlockOptin = smem_sm - 1024;
        prop.reservedSharedMemPerBlock = 1024;
        cudaOccFuncAttributes attr;
        attr.maxThreadsPerBlock = 1024;
        attr.numRegs = regs;
        attr.sharedSizeBytes = smem;
        cudaOccDeviceState state;
        cudaOccResult result;
        int err = (int)cudaOccMaxActiveBlocksPerMultiprocessor(&result, &prop, &attr, &state, block, 0);
        std::printf("%d %d\n", err, result.activeBlocksPerMultiprocessor);
    }
}
"""


def _occupancy_header():
    for folder in filter(None, [find_cuda_headers(), "/usr/local/cuda/include"]):
        if (Path(folder) / "cuda_occupancy.h").is_file():
            return folder
    return None


@pytest.mark.skipif(shutil.which("g++") is None or _occupancy_header() is None,
                    reason="needs g++ and cuda_occupancy.h (the CUDA runtime headers: pip install 'npgpt[kernels]')")  # fmt: skip
def test_occupancy_agrees_with_nvidias_calculator(tmp_path):
    """kernel_resources.occupancy against cuda_occupancy.h's cudaOccMaxActiveBlocksPerMultiprocessor (a
    header-only C++ library, compiled for the host), over registers, static shared memory and block sizes."""
    (tmp_path / "occ.cpp").write_text(_OCC_HARNESS)
    build = subprocess.run(["g++", "-std=c++17", "-I", _occupancy_header(), "-o", str(tmp_path / "occ"), str(tmp_path / "occ.cpp")],
                           capture_output=True, text=True)  # fmt: skip
    assert build.returncode == 0, build.stderr
    cases = [(arch, regs, smem, block) for arch in kernel_resources.ARCHS
             for regs in (16, 24, 32, 33, 40, 48, 56, 64, 72, 80, 96, 128, 166, 200, 232, 245, 255)
             for smem in (0, 256, 2112, 8192, 33024, 47000) for block in (64, 128, 256, 512, 1024)]  # fmt: skip
    lines = "".join(f"{arch[3]} {arch[4]} {kernel_resources.SM_LIMITS[arch]['smem']} {r} {s} {b}\n" for arch, r, s, b in cases)
    run = subprocess.run([str(tmp_path / "occ")], input=lines, capture_output=True, text=True, check=True)
    theirs = [tuple(map(int, line.split())) for line in run.stdout.splitlines()]
    assert len(theirs) == len(cases)
    for (arch, regs, smem, block), (err, blocks) in zip(cases, theirs):
        assert err == 0, (arch, regs, smem, block)
        assert kernel_resources.occupancy(regs, smem, block, arch)[0] == blocks, (arch, regs, smem, block, blocks)


def test_every_kernel_file_has_its_launch_block():
    assert set(LAUNCH_BLOCKS) == set(KERNEL_ENTRIES)
    for name, block in LAUNCH_BLOCKS.items():
        for b in block.values() if isinstance(block, dict) else [block]:
            assert b % 32 == 0 and 32 <= b <= 1024, name


def test_launch_block_names_the_missing_entry():
    """A kernel with no launch block is a clear ValueError pointing at LAUNCH_BLOCKS (kernel_resources.py
    and the launch spy of test_cuda_kernels.py ask for every kernel), not a bare KeyError."""
    from npgpt.cuda import kernels as K

    assert launch_block("layernorm.cu", "layernorm_fwd") == K.BLOCK
    with pytest.raises(ValueError, match=r"no launch block for foo in nothing\.cu: add it to LAUNCH_BLOCKS"):
        launch_block("nothing.cu", "foo")
    blocks = dict(LAUNCH_BLOCKS, **{"split.cu": {"first": 128}})
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(K, "LAUNCH_BLOCKS", blocks)
        assert launch_block("split.cu", "first") == 128
        with pytest.raises(ValueError, match="no launch block for second in split.cu"):
            launch_block("split.cu", "second")


def test_the_resource_report_in_the_docs_lists_every_kernel():
    """docs/benchmarks.md's section from benchmarks/kernel_resources.py names every kernel: after adding one,
    rerun `python benchmarks/kernel_resources.py`."""
    doc = kernel_resources.DOCS.read_text()
    start, end = doc.find(kernel_resources.RESOURCES_BEGIN), doc.find(kernel_resources.RESOURCES_END)
    assert 0 <= start < end, "docs/benchmarks.md lost the kernel resources section's markers"
    section = doc[start:end]
    missing = [k for names in KERNEL_ENTRIES.values() for k in names if f"`{k}`" not in section]
    assert not missing, f"rerun python benchmarks/kernel_resources.py: the report lacks {missing}"
    assert "Register spills: none." in section


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
