"""NVRTC (NVIDIA's run-time CUDA compiler, the one CuPy uses) through ctypes, without CuPy or a GPU.

Compiling CUDA C to PTX needs only the NVRTC shared library, not a driver or a device, so this works
on a CPU-only machine (CI): `tests/test_kernels_compile.py` compiles every kernels/*.cu with it.

    path = find_nvrtc()                     # None when no libnvrtc is found
    ptx = compile_to_ptx(source, "layernorm.cu", include_dirs=[kernel_dir()])

Where the library is looked for, first found wins:
  1. $NPGPT_NVRTC (a path to libnvrtc.so*);
  2. CuPy's own, when CuPy imports (the library its NVRTC bindings have loaded);
  3. the pip packages nvidia-cuda-nvrtc-cu12 (nvidia/cuda_nvrtc/lib/libnvrtc.so.12) and
     nvidia-cuda-nvrtc 13 (nvidia/cu13/lib/libnvrtc.so.13), e.g. from `pip install 'npgpt[kernels]'`;
  4. a CUDA toolkit: $CUDA_PATH, $CUDA_HOME, /usr/local/cuda, /usr/local/cuda-* (lib64/ and
     targets/*/lib/), then the system's library search path.

The kernels include two CUDA headers, cuda_bf16.h and cuda_fp16.h (the 16-bit types). NVRTC has no
built-in copy of them; CuPy 14 puts the CUDA runtime headers' directory on the include path of every
kernel it compiles (cupy/_core/core.pyx, assemble_cupy_compiler_options), and compile_to_ptx does the
same with the directory find_cuda_headers() gives: $NPGPT_CUDA_INCLUDE, CuPy's own choice (cuda.pathfinder),
the pip packages nvidia-cuda-runtime-cu12 (nvidia/cuda_runtime/include, from `pip install 'npgpt[kernels]'`)
and nvidia-cuda-runtime 13 (nvidia/cu13/include), or a CUDA toolkit's include/.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import glob
import importlib.util
import os
import re
import sys
from pathlib import Path

_NVRTC_SUCCESS = 0


def _is_nvrtc_lib(path: str) -> bool:
    name = os.path.basename(path)
    # libnvrtc.so, libnvrtc.so.12, libnvrtc.so.12.9.86; not libnvrtc-builtins*, libnvrtc.alt.so*, *_static.a
    return re.fullmatch(r"libnvrtc\.so(\.\d+)*", name) is not None and os.path.isfile(path)


def _best(paths) -> str | None:
    found = sorted({p for p in paths if _is_nvrtc_lib(p)}, key=lambda p: (len(os.path.basename(p)), p))
    return found[0] if found else None


def _from_cupy() -> str | None:
    """The libnvrtc that CuPy's bindings load (read back from the process's memory map, Linux only)."""
    if importlib.util.find_spec("cupy") is None or not os.path.exists("/proc/self/maps"):
        return None
    try:
        from cupy.cuda import nvrtc as cupy_nvrtc

        cupy_nvrtc.getVersion()  # makes sure the library is loaded
        maps = Path("/proc/self/maps").read_text()
    except Exception:  # CuPy without a usable NVRTC, or a broken install
        return None
    return _best(line.split()[-1] for line in maps.splitlines() if "libnvrtc" in line and "/" in line)


def _from_pip() -> str | None:
    candidates = []
    roots = []
    spec = importlib.util.find_spec("nvidia")
    if spec is not None and spec.submodule_search_locations:
        roots += list(spec.submodule_search_locations)
    roots += [os.path.join(p, "nvidia") for p in sys.path if p]
    for root in roots:
        for sub in ("cuda_nvrtc/lib", "cu13/lib", "cu12/lib"):
            candidates += glob.glob(os.path.join(root, sub, "libnvrtc.so*"))
    return _best(candidates)


def _from_toolkit() -> str | None:
    homes = [os.environ.get("CUDA_PATH"), os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    homes += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    candidates = []
    for home in filter(None, homes):
        for sub in ("lib64", "lib", "targets/*/lib"):
            candidates += glob.glob(os.path.join(home, sub, "libnvrtc.so*"))
    found = _best(candidates)
    if found:
        return found
    name = ctypes.util.find_library("nvrtc")  # e.g. "libnvrtc.so.12" from the ld cache
    return name or None


@functools.lru_cache(maxsize=None)
def find_nvrtc() -> str | None:
    """Path (or loadable name) of an NVRTC shared library, or None. See the module docstring for the order."""
    env = os.environ.get("NPGPT_NVRTC")
    if env:  # an explicit choice: used when it exists, and nothing else is tried
        return env if os.path.exists(env) else None
    for finder in (_from_cupy, _from_pip, _from_toolkit):
        found = finder()
        if found:
            return found
    return None


def _has_headers(folder) -> bool:
    return bool(folder) and os.path.isfile(os.path.join(folder, "cuda_bf16.h")) and os.path.isfile(os.path.join(folder, "cuda_fp16.h"))


def _headers_from_cupy() -> str | None:
    if importlib.util.find_spec("cuda") is None:
        return None
    try:
        from cuda.pathfinder import find_nvidia_header_directory  # what CuPy 14 asks (core.pyx)

        return find_nvidia_header_directory("cudart")
    except Exception:  # an older cuda-pathfinder, or none
        return None


@functools.lru_cache(maxsize=None)
def find_cuda_headers() -> str | None:
    """The directory holding the CUDA runtime headers the kernels include (cuda_bf16.h, cuda_fp16.h), or
    None. See the module docstring for the order."""
    env = os.environ.get("NPGPT_CUDA_INCLUDE")
    if env:  # an explicit choice: used when it holds the headers, and nothing else is tried
        return env if _has_headers(env) else None
    candidates = [_headers_from_cupy()]
    roots = []
    spec = importlib.util.find_spec("nvidia")
    if spec is not None and spec.submodule_search_locations:
        roots += list(spec.submodule_search_locations)
    roots += [os.path.join(p, "nvidia") for p in sys.path if p]
    candidates += [os.path.join(root, sub) for root in roots for sub in ("cuda_runtime/include", "cu13/include", "cu12/include")]
    homes = [os.environ.get("CUDA_PATH"), os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    homes += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    candidates += [os.path.join(home, "include") for home in filter(None, homes)]
    candidates += glob.glob(os.path.join(os.environ.get("CUDA_PATH") or "/usr/local/cuda", "targets", "*", "include"))
    return next((c for c in candidates if _has_headers(c)), None)


@functools.lru_cache(maxsize=None)
def _load(path: str):
    lib = ctypes.CDLL(path)
    lib.nvrtcGetErrorString.restype = ctypes.c_char_p
    lib.nvrtcGetErrorString.argtypes = [ctypes.c_int]
    lib.nvrtcVersion.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int)]
    lib.nvrtcCreateProgram.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int,
                                       ctypes.POINTER(ctypes.c_char_p), ctypes.POINTER(ctypes.c_char_p)]  # fmt: skip
    lib.nvrtcCompileProgram.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
    lib.nvrtcGetProgramLogSize.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t)]
    lib.nvrtcGetProgramLog.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.nvrtcGetPTXSize.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t)]
    lib.nvrtcGetPTX.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.nvrtcDestroyProgram.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
    return lib


def _library(path: str | None = None):
    path = path or find_nvrtc()
    if path is None:
        raise RuntimeError("no NVRTC library found: pip install 'npgpt[kernels]' (nvidia-cuda-nvrtc-cu12), install CuPy "
                           "or a CUDA toolkit, or point $NPGPT_NVRTC at libnvrtc.so")  # fmt: skip
    return _load(path)


def nvrtc_version(path: str | None = None) -> tuple[int, int]:
    """(major, minor) of the NVRTC library that compile_to_ptx uses."""
    lib = _library(path)
    major, minor = ctypes.c_int(), ctypes.c_int()
    _check(lib, lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
    return major.value, minor.value


def _check(lib, result: int, what: str) -> None:
    if result != _NVRTC_SUCCESS:
        raise RuntimeError(f"{what} failed: {lib.nvrtcGetErrorString(result).decode(errors='replace')}")


def compile_to_ptx(source: str, name: str, arch: str = "compute_80", include_dirs=(), options=(),
                   nvrtc_path: str | None = None) -> str:  # fmt: skip
    """Compile CUDA C `source` (shown in messages as `name`) to PTX text with NVRTC.

    arch: a virtual architecture such as "compute_80" (PTX needs no device). include_dirs: folders
    searched by #include "..."; options: further NVRTC options. The options are those CuPy uses:
    --gpu-architecture=<arch>, -std=c++17, -ftz=true (CuPy adds it to every kernel it compiles), and
    last the CUDA runtime headers' directory (find_cuda_headers(), when there is one), as CuPy 14 does.
    Raises ValueError carrying NVRTC's log when the source does not compile, RuntimeError when no
    NVRTC library can be found or loaded.
    """
    return compile_with_log(source, name, arch, include_dirs, options, nvrtc_path)[0]


def compile_with_log(source: str, name: str, arch: str = "compute_80", include_dirs=(), options=(),
                     nvrtc_path: str | None = None) -> tuple[str, str]:  # fmt: skip
    """As compile_to_ptx, returning (ptx, log): the log holds NVRTC's warnings ("" when it is silent)."""
    lib = _library(nvrtc_path)
    opts = [f"--gpu-architecture={arch}", "-std=c++17", "-ftz=true"]
    opts += [f"--include-path={os.fspath(d)}" for d in include_dirs]
    opts += list(options)
    headers = find_cuda_headers()
    if headers:
        opts.append(f"--include-path={headers}")
    prog = ctypes.c_void_p()
    _check(lib, lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None, None),
           "nvrtcCreateProgram")  # fmt: skip
    try:
        c_opts = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
        result = lib.nvrtcCompileProgram(prog, len(opts), c_opts)
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log_buf = ctypes.create_string_buffer(max(size.value, 1))
        lib.nvrtcGetProgramLog(prog, log_buf)
        log = log_buf.value.decode(errors="replace").strip()
        if result != _NVRTC_SUCCESS:
            err = lib.nvrtcGetErrorString(result).decode(errors="replace")
            raise ValueError(f"NVRTC could not compile {name} ({err}; options {' '.join(opts)}):\n{log}")
        _check(lib, lib.nvrtcGetPTXSize(prog, ctypes.byref(size)), "nvrtcGetPTXSize")
        ptx = ctypes.create_string_buffer(size.value)
        _check(lib, lib.nvrtcGetPTX(prog, ptx), "nvrtcGetPTX")
        return ptx.value.decode(), log
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))
