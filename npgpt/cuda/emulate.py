"""Run the CUDA kernels of kernels/*.cu on the CPU, for tests on machines without a GPU.

The kernels are plain CUDA C with no host code, so they also compile as C++ once a small shim (SHIM
below) supplies what the CUDA compiler would: threadIdx / blockIdx / blockDim / gridDim, float4,
__syncthreads, __shfl_xor_sync, __int_as_float, and `__shared__` as function-static storage. Each CUDA
thread of a block runs as a ucontext fiber; __syncthreads and warp shuffles are the scheduling points:

- a block barrier releases when every thread of the block that has not returned is waiting at it;
- a shuffle releases when all 32 lanes of the warp are at a shuffle; a full-mask shuffle with lanes
  that have already returned, or a mask other than 0xffffffff, is reported as an error (it is
  undefined behaviour on a GPU), as is a deadlock (threads waiting at different barriers);
- blocks run one after another and, between sync points, threads run one after another, in an order
  set by the schedule seed: 0 in order, 1 reversed, >= 2 shuffled by that seed. A kernel whose result
  depends on either order has a race; the tests run with a shuffling seed.

The two CUDA headers the kernels include (cuda_bf16.h, cuda_fp16.h, for the 16-bit types) are replaced by
host stand-ins (STANDIN_HEADERS): each type is 16 bits of storage with the conversions the kernels use,
widening exactly and narrowing to nearest with ties to even, as the GPU's cvt.rn does (tests compare them
with ml_dtypes' bfloat16 and NumPy's float16 bit for bit: `standin_round` / `standin_widen`).

This checks the logic (indexing, bounds, masks, synchronisation, the wrappers' launch arguments), not
the speed, and not the GPU's float rounding (FMA contraction, expf's ulps): the tolerances are the
same as on the GPU. The arguments a wrapper passes are checked against the kernel's C signature
(numpy scalar types against int / long long / float, array dtypes against the pointer types), which
catches the silent misreads a wrong-width argument causes on a GPU.

Used by npgpt.cuda.kernels when its wrappers are given NumPy arrays. Needs g++ (C++17) on Linux.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

from npgpt.cuda.sources import kernel_dir

SHIM = r"""
// npgpt.cuda.emulate: the CUDA execution model on the CPU (see the module docstring).
#pragma once
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

struct emu_uint3 {
    unsigned x = 0, y = 0, z = 0;
};
inline emu_uint3 threadIdx, blockIdx, blockDim, gridDim;

struct alignas(16) float4 {
    float x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
inline float __int_as_float(unsigned u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(x)

namespace emu {
enum State { RUN, AT_BLOCK, AT_WARP, DONE };
struct Fiber {
    ucontext_t ctx;
    std::vector<char> stack;
    State state = RUN;
    double send = 0, recv = 0;
    unsigned src_lane = 0, mask = 0;
};
inline ucontext_t sched;
inline std::vector<Fiber> fibers;
inline int current = -1;
inline std::function<void()> body;
inline unsigned seed = 0;
inline std::string error;

inline void yield(State s) {
    Fiber& f = fibers[current];
    f.state = s;
    swapcontext(&f.ctx, &sched);
}

inline void entry() {
    body();
    fibers[current].state = DONE;
    setcontext(&sched);
}

inline bool fail(const std::string& what) {
    error = what + " (block " + std::to_string(blockIdx.x) + "," + std::to_string(blockIdx.y) + ")";
    return false;
}

inline bool run_block(unsigned nthreads, std::mt19937& rng) {
    if (fibers.size() < nthreads) fibers.resize(nthreads);
    for (unsigned t = 0; t < nthreads; ++t) {
        Fiber& f = fibers[t];
        if (f.stack.empty()) f.stack.resize(1 << 18);
        f.state = RUN;
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = f.stack.data();
        f.ctx.uc_stack.ss_size = f.stack.size();
        f.ctx.uc_link = &sched;
        makecontext(&f.ctx, (void (*)())entry, 0);
    }
    std::vector<unsigned> order(nthreads);
    for (unsigned t = 0; t < nthreads; ++t) order[t] = t;
    const unsigned nwarps = (nthreads + 31) / 32;
    for (;;) {
        if (seed == 1) std::reverse(order.begin(), order.end());
        else if (seed > 1) std::shuffle(order.begin(), order.end(), rng);
        for (unsigned t : order) {
            if (fibers[t].state != RUN) continue;
            current = (int)t;
            threadIdx.x = t;
            swapcontext(&sched, &fibers[t].ctx);
        }
        bool all_done = true, all_block = true, released = false;
        for (unsigned t = 0; t < nthreads; ++t) {
            if (fibers[t].state != DONE) all_done = false;
            if (fibers[t].state != DONE && fibers[t].state != AT_BLOCK) all_block = false;
        }
        if (all_done) return true;
        for (unsigned w = 0; w < nwarps; ++w) {
            const unsigned lo = w * 32, hi = std::min(nthreads, lo + 32);
            unsigned at = 0, done = 0;
            for (unsigned t = lo; t < hi; ++t) {
                at += fibers[t].state == AT_WARP;
                done += fibers[t].state == DONE;
            }
            if (at == 0) continue;
            if (hi - lo != 32) return fail("warp shuffle in a partial warp");
            if (done) return fail("full-mask warp shuffle while lanes of the warp have returned");
            if (at != 32) continue;  // the rest of the warp is elsewhere: a deadlock unless it comes
            for (unsigned t = lo; t < hi; ++t) {
                if (fibers[t].mask != 0xffffffffu) return fail("warp shuffle with a mask other than 0xffffffff");
                fibers[t].recv = fibers[lo + fibers[t].src_lane].send;
                fibers[t].state = RUN;
            }
            released = true;
        }
        if (!released && all_block) {
            for (unsigned t = 0; t < nthreads; ++t)
                if (fibers[t].state == AT_BLOCK) fibers[t].state = RUN;
            released = true;
        }
        if (!released) return fail("deadlock: threads wait at different barriers");
    }
}

inline int launch(unsigned gx, unsigned gy, unsigned bx, unsigned sched_seed, std::function<void()> k) {
    gridDim.x = gx;
    gridDim.y = gy;
    gridDim.z = 1;
    blockDim.x = bx;
    blockDim.y = blockDim.z = 1;
    threadIdx = emu_uint3{};
    seed = sched_seed;
    error.clear();
    body = std::move(k);
    std::mt19937 rng(seed);
    std::vector<std::pair<unsigned, unsigned>> blocks;
    for (unsigned y = 0; y < gy; ++y)
        for (unsigned x = 0; x < gx; ++x) blocks.push_back({x, y});
    if (seed == 1) std::reverse(blocks.begin(), blocks.end());
    else if (seed > 1) std::shuffle(blocks.begin(), blocks.end(), rng);
    for (auto [x, y] : blocks) {
        blockIdx.x = x;
        blockIdx.y = y;
        blockIdx.z = 0;
        if (!run_block(bx, rng)) return 1;
    }
    return 0;
}
}  // namespace emu

inline void __syncthreads() { emu::yield(emu::AT_BLOCK); }

template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int lanemask) {
    emu::Fiber& f = emu::fibers[emu::current];
    f.send = (double)v;
    f.mask = mask;
    f.src_lane = (threadIdx.x & 31u) ^ (unsigned)lanemask;
    emu::yield(emu::AT_WARP);
    return (T)emu::fibers[emu::current].recv;
}

extern "C" const char* emu_error() { return emu::error.c_str(); }
"""

# Host stand-ins for the CUDA headers the kernels include (common.cuh), put first on the include path.
STANDIN_HEADERS = {
    "cuda_bf16.h": r"""
// npgpt.cuda.emulate's host stand-in for CUDA's cuda_bf16.h: bfloat16 as 16 bits of storage (the top half
// of a float32) and the two conversions the kernels use. Widening is exact; narrowing rounds to nearest,
// ties to even, as cvt.rn.bf16.f32 does (overflow gives inf); a NaN stays a quiet NaN.
#pragma once
#include <cstring>

struct __nv_bfloat16 {
    unsigned short bits;
};

inline float __bfloat162float(__nv_bfloat16 h) {
    const unsigned u = (unsigned)h.bits << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    unsigned u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{(unsigned short)((u >> 16) | 0x0040u)};  // NaN
    u += 0x7fffu + ((u >> 16) & 1u);  // add just under half a unit of the kept bits, plus one on a tie to odd
    return __nv_bfloat16{(unsigned short)(u >> 16)};
}
""",
    "cuda_fp16.h": r"""
// npgpt.cuda.emulate's host stand-in for CUDA's cuda_fp16.h: IEEE half precision (1 sign, 5 exponent, 10
// mantissa bits) as 16 bits of storage and the two conversions the kernels use. Widening is exact;
// narrowing rounds to nearest, ties to even, as cvt.rn.f16.f32 does: subnormal halves below 2^-14, inf
// from 65520 (halfway between 65504, the largest half, and 65536) up; a NaN stays a quiet NaN.
#pragma once
#include <cmath>
#include <cstring>

struct __half {
    unsigned short bits;
};

inline float __half2float(__half h) {
    const unsigned sign = (unsigned)(h.bits & 0x8000u) << 16, exp = (h.bits >> 10) & 0x1fu, man = h.bits & 0x3ffu;
    unsigned u;
    if (exp == 0x1fu) {
        u = sign | 0x7f800000u | (man << 13);  // inf, NaN
    } else if (exp != 0) {
        u = sign | ((exp + 112u) << 23) | (man << 13);  // normal: the exponent's bias 15 becomes 127
    } else {
        const float mag = std::ldexp((float)man, -24);  // zero, subnormal: man units of 2^-24
        std::memcpy(&u, &mag, 4);
        u |= sign;
    }
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

inline __half __float2half_rn(float f) {
    unsigned u;
    std::memcpy(&u, &f, 4);
    const unsigned sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return __half{(unsigned short)(sign | 0x7e00u)};  // NaN
    if (a >= 0x477ff000u) return __half{(unsigned short)(sign | 0x7c00u)};  // >= 65520: inf
    if (a < 0x38800000u) {  // below 2^-14: a subnormal half (or zero), a whole number of units of 2^-24
        float mag;
        std::memcpy(&mag, &a, 4);
        return __half{(unsigned short)(sign | (unsigned)std::nearbyint(mag * 16777216.0f))};  // exact scaling; nearest-even
    }
    unsigned r = a - 0x38000000u;  // the exponent's bias 127 becomes 15
    r += 0xfffu + ((r >> 13) & 1u);  // round 23 mantissa bits to 10, ties to even (a carry moves the exponent)
    return __half{(unsigned short)(sign | (r >> 13))};
}
""",
}

_SCALARS = {"int": (ctypes.c_int, np.int32), "unsigned": (ctypes.c_uint, np.uint32), "unsigned int": (ctypes.c_uint, np.uint32),
            "long long": (ctypes.c_longlong, np.int64), "float": (ctypes.c_float, np.float32),
            "double": (ctypes.c_double, np.float64)}  # fmt: skip
_POINTEES = {"float": np.float32, "float4": np.float32, "double": np.float64, "long long": np.int64, "int": np.int32,
             "unsigned char": np.uint8}  # fmt: skip


def _pointee(ty: str) -> np.dtype:
    """The array dtype a kernel's `ty*` argument must have (ml_dtypes' bfloat16 for __nv_bfloat16)."""
    if ty == "__half":
        return np.dtype(np.float16)
    if ty == "__nv_bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(_POINTEES[ty])


schedule_seed = 2  # 0 in order, 1 reversed, >= 2 shuffled (module docstring)
_lock = threading.Lock()


def unavailable_reason() -> str:
    """Why kernels cannot be emulated here ("" when they can)."""
    if not sys.platform.startswith("linux"):
        return "the CPU emulation of the kernels needs Linux (ucontext)"
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        return "the CPU emulation of the kernels needs g++ (or $CXX)"
    return ""


def _cache_dir() -> Path:
    d = Path(tempfile.gettempdir()) / f"npgpt-cuda-emulate-{os.getuid() if hasattr(os, 'getuid') else 0}"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _standin_dir() -> Path:
    """A folder holding STANDIN_HEADERS, named by their content (written once, atomically)."""
    text = "".join(k + v for k, v in sorted(STANDIN_HEADERS.items()))
    d = _cache_dir() / f"include-{hashlib.sha1(text.encode()).hexdigest()[:12]}"
    if not d.is_dir():
        tmp = d.with_name(f"{d.name}.{os.getpid()}.tmp")
        tmp.mkdir(exist_ok=True)
        for name, body in STANDIN_HEADERS.items():
            (tmp / name).write_text(body)
        try:
            os.replace(tmp, d)
        except OSError:  # another process got there first
            shutil.rmtree(tmp, ignore_errors=True)
    return d


def _parse_param(p: str):
    p = " ".join(p.replace("__restrict__", " ").split())
    name = re.findall(r"\w+$", p)[0]
    ty = p[: -len(name)].strip()
    if ty.endswith("*"):
        base = ty[:-1].replace("const", " ").strip()
        return ("ptr", " ".join(base.split()), name)
    return ("scalar", " ".join(ty.replace("const", " ").split()), name)


class _Module:
    def __init__(self, filename: str, defines: tuple):
        cxx = os.environ.get("CXX", "g++")
        src = kernel_dir() / filename
        d = _cache_dir()
        defs = [f"-D{k}={v}" for k, v in defines]
        flags = ["-std=c++17", "-O1", "-fPIC", "-Wno-unknown-pragmas", "-I", str(_standin_dir()), "-I", str(kernel_dir()), *defs]
        shim = d / f"shim-{hashlib.sha1(SHIM.encode()).hexdigest()[:12]}.h"
        if not shim.exists():
            tmp = shim.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(SHIM)
            os.replace(tmp, shim)
        pre = subprocess.run([cxx, *flags, "-E", "-include", str(shim), "-x", "c++", str(src)], capture_output=True, text=True)
        if pre.returncode:
            raise RuntimeError(f"preprocessing {filename} for the emulator failed:\n{pre.stderr}")
        self.sigs = {}
        for m in re.finditer(r'extern\s+"C"\s+void\s+(\w+)\s*\(([^)]*)\)\s*\{', pre.stdout):
            self.sigs[m.group(1)] = [_parse_param(p) for p in m.group(2).split(",")]
        lines = [f'#include "{src}"']
        for k, params in self.sigs.items():
            decl = ", ".join(f"void* a{i}" if kind == "ptr" else f"{ty} a{i}" for i, (kind, ty, _) in enumerate(params))
            call = ", ".join(f"({ty}*)a{i}" if kind == "ptr" else f"a{i}" for i, (kind, ty, _) in enumerate(params))
            lines.append(f'extern "C" int emu_{k}(unsigned gx, unsigned gy, unsigned bx, unsigned seed, {decl}) '
                         f"{{ return emu::launch(gx, gy, bx, seed, [=] {{ {k}({call}); }}); }}")  # fmt: skip
        harness = "\n".join(lines) + "\n"
        tag = hashlib.sha1((pre.stdout + harness + " ".join(flags)).encode()).hexdigest()[:16]
        so = d / f"{Path(filename).stem}-{tag}.so"
        if not so.exists():
            cpp = d / f"{Path(filename).stem}-{tag}.{os.getpid()}.cpp"
            cpp.write_text(harness)
            tmp = so.with_suffix(f".{os.getpid()}.tmp")
            proc = subprocess.run([cxx, *flags, "-shared", "-include", str(shim), "-o", str(tmp), str(cpp)],
                                  capture_output=True, text=True)  # fmt: skip
            cpp.unlink(missing_ok=True)
            if proc.returncode:
                raise RuntimeError(f"compiling {filename} for the emulator failed:\n{proc.stderr}")
            os.replace(tmp, so)
        self.lib = ctypes.CDLL(str(so))
        self.lib.emu_error.restype = ctypes.c_char_p

    def launch(self, name, grid, block, args):
        if name not in self.sigs:
            raise ValueError(f"no kernel {name!r} (have {', '.join(self.sigs)})")
        params = self.sigs[name]
        if len(args) != len(params):
            raise TypeError(f"{name} takes {len(params)} arguments, got {len(args)}")
        cargs = []
        for (kind, ty, pname), a in zip(params, args):
            if kind == "ptr":
                if not isinstance(a, np.ndarray):
                    raise TypeError(f"{name}: argument {pname} ({ty}*) must be an array, got {type(a).__name__}")
                want = _pointee(ty)
                if a.dtype != want:
                    raise TypeError(f"{name}: argument {pname} is {ty}* but the array is {a.dtype}")
                cargs.append(ctypes.c_void_p(a.ctypes.data))
            else:
                ctype, want = _SCALARS[ty]
                if not isinstance(a, np.generic) or a.dtype != want:
                    raise TypeError(f"{name}: argument {pname} is {ty}; pass numpy.{np.dtype(want).name}, got {type(a).__name__}")
                cargs.append(ctype(a.item()))
        gx, gy = (tuple(grid) + (1,))[:2]
        fn = getattr(self.lib, "emu_" + name)
        fn.restype = ctypes.c_int
        rc = fn(ctypes.c_uint(gx), ctypes.c_uint(gy), ctypes.c_uint(block), ctypes.c_uint(schedule_seed), *cargs)
        if rc:
            raise RuntimeError(f"{name}: {self.lib.emu_error().decode()}")


_modules: dict = {}


def launch(filename: str, name: str, grid, block: int, args, defines=()) -> None:
    """Run kernel `name` of kernels/<filename> over `grid` (x[, y]) blocks of `block` threads on the CPU.
    args: NumPy arrays for pointers, NumPy scalars (int32 / int64 / float32 ...) for the rest."""
    reason = unavailable_reason()
    if reason:
        raise RuntimeError(reason)
    key = (filename, tuple(defines))
    with _lock:
        mod = _modules.get(key)
        if mod is None:
            mod = _modules[key] = _Module(filename, tuple(defines))
        mod.launch(name, grid, block, args)


_CONVERT_SOURCE = r"""
#include <cuda_bf16.h>
#include <cuda_fp16.h>
extern "C" void round_bf16(const float* x, unsigned short* out, long long n) {
    for (long long i = 0; i < n; ++i) out[i] = __float2bfloat16_rn(x[i]).bits;
}
extern "C" void round_f16(const float* x, unsigned short* out, long long n) {
    for (long long i = 0; i < n; ++i) out[i] = __float2half_rn(x[i]).bits;
}
extern "C" void widen_bf16(const unsigned short* b, float* out, long long n) {
    for (long long i = 0; i < n; ++i) out[i] = __bfloat162float(__nv_bfloat16{b[i]});
}
extern "C" void widen_f16(const unsigned short* b, float* out, long long n) {
    for (long long i = 0; i < n; ++i) out[i] = __half2float(__half{b[i]});
}
"""


def _converters():
    """The stand-in headers' conversions, compiled on their own (for standin_round / standin_widen)."""
    global _convert_lib
    with _lock:
        if _convert_lib is None:
            cxx = os.environ.get("CXX", "g++")
            d = _cache_dir()
            tag = hashlib.sha1((_CONVERT_SOURCE + str(_standin_dir())).encode()).hexdigest()[:16]
            so = d / f"convert-{tag}.so"
            if not so.exists():
                cpp = d / f"convert-{tag}.{os.getpid()}.cpp"
                cpp.write_text(_CONVERT_SOURCE)
                tmp = so.with_suffix(f".{os.getpid()}.tmp")
                proc = subprocess.run([cxx, "-std=c++17", "-O1", "-fPIC", "-shared", "-I", str(_standin_dir()), "-o", str(tmp),
                                       str(cpp)], capture_output=True, text=True)  # fmt: skip
                cpp.unlink(missing_ok=True)
                if proc.returncode:
                    raise RuntimeError(f"compiling the stand-in conversions failed:\n{proc.stderr}")
                os.replace(tmp, so)
            _convert_lib = ctypes.CDLL(str(so))
    return _convert_lib


_convert_lib = None
_KINDS = {"bfloat16": "bf16", "float16": "f16"}


def standin_round(x, dtype) -> np.ndarray:
    """The bits (uint16) of float32 values `x` rounded to `dtype` ("bfloat16" or "float16") by the stand-in
    headers' __float2bfloat16_rn / __float2half_rn, the conversions the emulated kernels store with."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty(x.shape, dtype=np.uint16)
    getattr(_converters(), "round_" + _KINDS[np.dtype(dtype).name])(
        ctypes.c_void_p(x.ctypes.data), ctypes.c_void_p(out.ctypes.data), ctypes.c_longlong(x.size))
    return out


def standin_widen(bits, dtype) -> np.ndarray:
    """float32 values of the 16-bit patterns `bits` (uint16) of `dtype`, by the stand-in headers'
    __bfloat162float / __half2float, the conversions the emulated kernels load with."""
    bits = np.ascontiguousarray(bits, dtype=np.uint16)
    out = np.empty(bits.shape, dtype=np.float32)
    getattr(_converters(), "widen_" + _KINDS[np.dtype(dtype).name])(
        ctypes.c_void_p(bits.ctypes.data), ctypes.c_void_p(out.ctypes.data), ctypes.c_longlong(bits.size))
    return out
