"""A stand-in for CuPy on the CPU, so that tests without a GPU run npgpt's CuPy code paths (the branches
taken for CuPy arrays) and see what CuPy would do there.

    def test_something(fake_cupy):            # the fixture (conftest.py) installs it as `cupy`
        model = npgpt.GPT(cfg, device="cuda")  # parameters are fake_cupy.DeviceArray, model.xp the fake
        ...
        assert fake_cupy.host_transfers == 1   # device-to-host conversions since the last reset()

What it models, each from CuPy 14.2's source (cupy/_core/_routines_linalg.pyx, cupy/cublas.py) or
CUDA's documented behaviour:
- DeviceArray, a NumPy array subclass, plays cupy.ndarray: reductions and scalar indexing give 0-d
  arrays (as CuPy's do), and every conversion to a host value (float(), int(), bool(), index use,
  .item(), .tolist(), .get(), cupy.asnumpy, formatting) is counted in `host_transfers`: on a GPU
  each is a device-to-host copy that waits for the queued work (a synchronisation).
  `get_current_stream().synchronize()` is counted in `stream_syncs`, Stream.null's in `null_syncs`.
- `matmul` as CuPy's: an N-D product (ndim > 2) of a dtype outside 'efdFD' (bfloat16 is 'E') goes
  to CuPy's integer GEMM, which fails (the issue's TypeError); N-D float16 is computed in float32;
  2-D products in float32 for the 16-bit dtypes (cuBLAS gemmEx), rounded once into `out`.
- `cupy_backends.cuda.libs.cublas.gemmStridedBatchedEx`: the NumPy model of cuBLAS's column-major
  strided-batched GEMM, run on the arrays' own memory (pointers are real host addresses here; a
  call that would touch memory outside every live DeviceArray is an AssertionError, not a crash).
  Each call's types are recorded in `gemm_calls`.
- `cupy.cublas.nrm2`, `cupyx.scatter_add`, `cupy.random.default_rng` (arrays on the "device").
- `RawModule`: the kernels of kernels/*.cu through npgpt.cuda.emulate (g++), so the CUDA-kernel
  wrappers' CuPy branch runs too.
- `cuda.Device(i).use()` and allocations: `events` records ("use", i) and ("alloc", current device)
  in order, so a test can see which GPU memory was allocated on; `runtime.getDeviceCount()` says
  `device_count`.
Nothing here is fast; use tiny models.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import re
import sys
import types
import weakref

import numpy as np

# --- state, reset by reset() --------------------------------------------------------------------------

host_transfers = 0
stream_syncs = 0
null_syncs = 0
gemm_calls: list = []  # (data_type, compute_type, batch) per gemmStridedBatchedEx call
matmul_calls: list = []  # (ndim, dtype name) per cupy.matmul call
events: list = []  # ("use", device) and ("alloc", device)
device_count = 1
current_device = 0
compute_types: dict = {}  # what set_tf32 asked of cupy._core._routines_linalg
_live: list = []  # (weakref to a DeviceArray owning memory, lo, hi) byte ranges


def reset(devices: int = 1) -> None:
    global host_transfers, stream_syncs, null_syncs, device_count, current_device
    host_transfers = stream_syncs = null_syncs = 0
    device_count, current_device = devices, 0
    gemm_calls.clear()
    matmul_calls.clear()
    events.clear()
    compute_types.clear()


def reset_counts() -> None:
    global host_transfers, stream_syncs, null_syncs
    host_transfers = stream_syncs = null_syncs = 0


def _transfer() -> None:
    global host_transfers
    host_transfers += 1


try:  # NumPy 2 moved it
    from numpy.lib.array_utils import byte_bounds
except ImportError:  # NumPy 1.x
    byte_bounds = np.byte_bounds

# --- the array ------------------------------------------------------------------------------------------


class _Memory:
    def __init__(self, ptr: int, device_id: int):
        self.ptr, self.device_id = ptr, device_id


class DeviceArray(np.ndarray):
    """A NumPy array standing for a CuPy array on the fake device."""

    def __array_finalize__(self, obj):
        root = self
        while isinstance(root.base, np.ndarray):
            root = root.base
        if root is self or not isinstance(root, DeviceArray):  # new memory on the current device
            lo, hi = byte_bounds(root) if root.size else (0, 0)
            _live.append((weakref.ref(self), lo, hi))
            events.append(("alloc", current_device))

    def __array_wrap__(self, obj, context=None, return_scalar=False):
        if isinstance(obj, DeviceArray):
            return obj
        return np.asarray(obj).view(DeviceArray)  # 0-d results stay arrays, as CuPy's do

    def __getitem__(self, key):
        r = super().__getitem__(key)
        return r if isinstance(r, np.ndarray) else np.asarray(r).view(DeviceArray)

    @property
    def data(self):  # cupy.ndarray.data is a MemoryPointer: .ptr, .device_id
        return _Memory(self.__array_interface__["data"][0], 0)

    def _host(self):
        return self.view(np.ndarray)

    def __repr__(self):  # not counted: pytest prints arrays in its reports
        return f"fake-device {self._host()!r}"

    __str__ = __repr__

    def __float__(self):
        _transfer()
        return float(self._host())

    def __int__(self):
        _transfer()
        return int(self._host())

    def __index__(self):
        _transfer()
        return self._host().__index__()

    def __bool__(self):
        _transfer()
        return bool(self._host())

    def __format__(self, spec):
        _transfer()
        return format(self._host().item() if self.ndim == 0 else self._host(), spec)

    def item(self, *args):
        _transfer()
        return self._host().item(*args)

    def tolist(self):
        _transfer()
        return self._host().tolist()

    def get(self):
        _transfer()
        return np.array(self._host())

    def set(self, host):
        self[...] = host


def _device(x):
    """x as a DeviceArray that owns its memory (results of NumPy functions, host data copied over)."""
    if isinstance(x, DeviceArray):
        return x
    x = np.asarray(x)
    out = DeviceArray(x.shape, x.dtype)
    out[...] = x
    return out


def _wrap(r):
    if isinstance(r, DeviceArray):
        return r
    if isinstance(r, (np.ndarray, np.generic)):
        return _device(r)
    if isinstance(r, tuple):
        return tuple(_wrap(v) for v in r)
    if isinstance(r, list):
        return [_wrap(v) for v in r]
    return r


def _wrapped(fn):
    def call(*args, **kwargs):
        return _wrap(fn(*args, **kwargs))

    call.__name__ = getattr(fn, "__name__", "fn")
    return call


# --- module functions with CuPy's behaviour ------------------------------------------------------------------


def matmul(a, b, out=None):
    a, b = _device(a), _device(b)
    dtype = np.result_type(a.dtype, b.dtype)
    ndim = max(a.ndim, b.ndim)
    matmul_calls.append((ndim, dtype.name))
    if ndim > 2:
        if dtype.char not in "efdFD":  # CuPy 14.2's N-D matmul: anything else is an integer GEMM
            raise TypeError(f"data type {dtype.char!r} not understood")
        if dtype.char == "e":  # float16 computed in float32 (no tensor cores), then cast
            r = np.matmul(a._host().astype(np.float32), b._host().astype(np.float32)).astype(np.float16)
        else:
            r = np.matmul(a._host(), b._host())
    elif dtype.itemsize == 2:  # gemmEx: 16-bit operands, float32 accumulation, rounded once
        r = np.matmul(a._host().astype(np.float32), b._host().astype(np.float32)).astype(dtype)
    else:
        r = np.matmul(a._host(), b._host())
    if out is None:
        return _device(r)
    out[...] = r
    return out


def asnumpy(a):
    if isinstance(a, DeviceArray):
        return a.get()
    return np.asarray(a)


def asarray(a, dtype=None):
    if isinstance(a, DeviceArray) and (dtype is None or np.dtype(dtype) == a.dtype):
        return a
    if isinstance(a, DeviceArray):
        return _device(a._host().astype(dtype))
    return _device(np.asarray(a, dtype=dtype))


def ascontiguousarray(a, dtype=None):
    a = asarray(a, dtype)
    return a if a.flags.c_contiguous else _device(np.ascontiguousarray(a._host()))


class _Generator:
    """cupy.random.Generator: numbers drawn on the device."""

    def __init__(self, seed):
        self._g = np.random.default_rng(seed)

    def __getattr__(self, name):
        return _wrapped(getattr(self._g, name))


class _Random(types.SimpleNamespace):
    def default_rng(self, seed=None):
        return _Generator(seed)

    def __getattr__(self, name):
        return _wrapped(getattr(np.random, name))


class _Stream:
    def __init__(self, null: bool):
        self.null_stream, self.ptr = null, 0

    def synchronize(self):
        global stream_syncs, null_syncs
        if self.null_stream:
            null_syncs += 1
        else:
            stream_syncs += 1


_CURRENT_STREAM = _Stream(False)


class _Device:
    def __init__(self, device=None):
        self.id = current_device if device is None else int(device)
        self.compute_capability = "90"
        self._prev = None

    def use(self):
        global current_device
        if not 0 <= self.id < device_count:
            raise RuntimeError(f"cudaErrorInvalidDevice: device {self.id} of {device_count}")
        current_device = self.id
        events.append(("use", self.id))

    def __enter__(self):
        global current_device
        self._prev, current_device = current_device, self.id
        return self

    def __exit__(self, *exc):
        global current_device
        current_device = self._prev


class _Runtime:
    @staticmethod
    def getDeviceCount():
        return device_count

    @staticmethod
    def getDeviceProperties(i):
        return {"name": b"Fake GPU", "totalGlobalMem": 1 << 34}


class _MemoryPool:
    def total_bytes(self):
        return sum(hi - lo for ref, lo, hi in _live if ref() is not None)

    used_bytes = total_bytes


# --- cuBLAS's strided-batched GEMM on host memory ------------------------------------------------------------


CUDA_DTYPES = {0: np.dtype(np.float32), 1: np.dtype(np.float64), 2: np.dtype(np.float16)}


def _cuda_dtype(code):
    if code == 14:
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return CUDA_DTYPES[code]


def to_tf32(x):
    """float32 values rounded to TF32's 10-bit mantissa (to nearest), as the tensor cores read them."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((bits + np.uint32(0x1000)) & np.uint32(0xFFFFE000)).view(np.float32)


def gemm_strided_batched(args, alpha, A, a_off, B, b_off, beta, C, c_off, tf32=False):
    """cuBLAS's gemmStridedBatched on flat 1-D buffers: for i < args.batch, the column-major matrices
    A at element a_off + i * stride_a (leading dimension lda), B and C likewise; C = alpha op(A) op(B)
    + beta C, with op = transpose for CUBLAS_OP_T, and C not read when beta == 0. Asserts cuBLAS's
    rules on the leading dimensions and that every element read or written lies inside its buffer.
    16-bit operands are multiplied in float32 and the result rounded once (CUBLAS_COMPUTE_32F); with
    tf32 the float32 operands are rounded to TF32 first (CUBLAS_COMPUTE_32F_FAST_TF32)."""
    m, n, k = args.m, args.n, args.k
    assert args.transa in (0, 1) and args.transb in (0, 1)
    a_rows, a_cols = (m, k) if args.transa == 0 else (k, m)
    b_rows, b_cols = (k, n) if args.transb == 0 else (n, k)
    assert args.lda >= max(1, a_rows) and args.ldb >= max(1, b_rows) and args.ldc >= max(1, m), args
    up = (lambda x: x.astype(np.float32)) if C.dtype.itemsize == 2 else (lambda x: x)
    if tf32:
        up = to_tf32

    def index(buf, off, rows, cols, ld):
        idx = off + np.arange(rows)[:, None] + np.arange(cols)[None, :] * ld
        assert idx.size == 0 or (idx.min() >= 0 and idx.max() < buf.size), f"touches elements outside: {args}"
        return idx

    for i in range(args.batch):
        ia = index(A, a_off + i * args.stride_a, a_rows, a_cols, args.lda)
        ib = index(B, b_off + i * args.stride_b, b_rows, b_cols, args.ldb)
        ic = index(C, c_off + i * args.stride_c, m, n, args.ldc)
        op_a = up(A[ia]) if args.transa == 0 else up(A[ia]).T
        op_b = up(B[ib]) if args.transb == 0 else up(B[ib]).T
        product = alpha * (op_a @ op_b)
        C[ic] = product if beta == 0 else product + beta * C[ic].astype(product.dtype)


def _extent(rows, cols, ld, stride, batch) -> int:
    """Elements from a matrix stack's first element to one past its last."""
    if rows == 0 or cols == 0 or batch == 0:
        return 0
    return (batch - 1) * stride + (cols - 1) * ld + rows


def _host_buffer(ptr: int, count: int, dtype) -> np.ndarray:
    """The `count` elements at address `ptr` as a NumPy array, after checking that they lie inside a
    live DeviceArray's memory (a wrong leading dimension or stride fails here instead of crashing)."""
    lo, hi = ptr, ptr + count * dtype.itemsize
    if count and not any(ref() is not None and a <= lo and hi <= b for ref, a, b in _live):
        raise AssertionError(f"cuBLAS would touch bytes [{lo:#x}, {hi:#x}) outside every device allocation")
    raw = (ctypes.c_char * max(1, count * dtype.itemsize)).from_address(ptr)
    return np.frombuffer(raw, dtype=np.uint8)[: count * dtype.itemsize].view(dtype)


def _gemm_strided_batched_ex(handle, transa, transb, m, n, k, alpha_ptr, a_ptr, a_type, lda, stride_a, b_ptr, b_type,
                             ldb, stride_b, beta_ptr, c_ptr, c_type, ldc, stride_c, batch, compute_type, algo):  # fmt: skip
    from npgpt.cuda.blas import CUBLAS_COMPUTE_32F_FAST_TF32, CUBLAS_COMPUTE_64F, GemmArgs

    assert a_type == b_type == c_type, (a_type, b_type, c_type)
    dtype = _cuda_dtype(c_type)
    gemm_calls.append((c_type, compute_type, batch))
    scalar = ctypes.c_double if compute_type == CUBLAS_COMPUTE_64F else ctypes.c_float
    alpha, beta = scalar.from_address(alpha_ptr).value, scalar.from_address(beta_ptr).value
    args = GemmArgs(transa, transb, m, n, k, lda, stride_a, ldb, stride_b, ldc, stride_c, batch, "A", "B")
    a_rows, a_cols = (m, k) if transa == 0 else (k, m)
    b_rows, b_cols = (k, n) if transb == 0 else (n, k)
    A = _host_buffer(a_ptr, _extent(a_rows, a_cols, lda, stride_a, batch), dtype)
    B = _host_buffer(b_ptr, _extent(b_rows, b_cols, ldb, stride_b, batch), dtype)
    C = _host_buffer(c_ptr, _extent(m, n, ldc, stride_c, batch), dtype)
    gemm_strided_batched(args, alpha, A, 0, B, 0, beta, C, 0, tf32=compute_type == CUBLAS_COMPUTE_32F_FAST_TF32)


def _nrm2(x, out=None):
    assert x.ndim == 1 and x.dtype in (np.float32, np.float64)
    return _device(np.asarray(np.sqrt(np.dot(x._host().astype(np.float64), x._host().astype(np.float64))), x.dtype))


# --- CUDA kernels through the CPU emulation --------------------------------------------------------------------


class _RawModule:
    def __init__(self, code: str, options=()):
        self.defines = tuple(re.findall(r"^#define (\w+) (\S+)$", code.split("\n\n", 1)[0], re.M))

    def get_function(self, name):
        from npgpt.cuda import emulate
        from npgpt.cuda.kernels import KERNEL_ENTRIES

        filename = next(f for f, names in KERNEL_ENTRIES.items() if name in names)

        def launch(grid, block, args):
            emulate.launch(filename, name, grid, int(block[0]), args, defines=self.defines)

        return launch


# --- the modules -----------------------------------------------------------------------------------------------


class _FakeCupy(types.ModuleType):
    """`cupy`: NumPy's functions with results on the device, and the pieces above."""

    def __getattr__(self, name):
        attr = getattr(np, name)
        if callable(attr) and not isinstance(attr, type):
            return _wrapped(attr)
        return attr


def modules() -> dict:
    """The sys.modules entries that make `import cupy` (and the pieces npgpt imports) find the fake."""
    cupy = _FakeCupy("cupy")
    cupy.__file__ = __file__
    cupy.__spec__ = importlib.machinery.ModuleSpec("cupy", None)  # importlib.util.find_spec("cupy") finds it
    cupy.ndarray = DeviceArray
    cupy.matmul, cupy.asnumpy, cupy.asarray, cupy.ascontiguousarray = matmul, asnumpy, asarray, ascontiguousarray
    cupy.array = lambda a, dtype=None, copy=True: _device(np.array(a, dtype=dtype))
    cupy.random = _Random()
    cupy.RawModule = _RawModule
    cupy.get_default_memory_pool = _MemoryPool
    cupy.__version__ = "14.2.0 (fake, tests/fake_cupy.py)"
    runtime = _Runtime()
    device_mod = types.SimpleNamespace(get_cublas_handle=lambda: 0, Device=_Device)
    cupy.cuda = types.SimpleNamespace(Device=_Device, runtime=runtime, device=device_mod,
                                      get_current_stream=lambda: _CURRENT_STREAM,
                                      Stream=types.SimpleNamespace(null=_Stream(True)))  # fmt: skip
    cupy.cublas = types.ModuleType("cupy.cublas")
    cupy.cublas.nrm2 = _nrm2
    cupyx = types.ModuleType("cupyx")
    cupyx.scatter_add = lambda target, idx, values: np.add.at(target, np.asarray(idx), values)
    cublas = types.ModuleType("cupy_backends.cuda.libs.cublas")
    cublas.gemmStridedBatchedEx = _gemm_strided_batched_ex
    cublas.CUBLAS_GEMM_DEFAULT = -1
    cublas.CUBLAS_OP_N, cublas.CUBLAS_OP_T = 0, 1
    cublas.CUBLAS_COMPUTE_32F, cublas.CUBLAS_COMPUTE_64F, cublas.CUBLAS_COMPUTE_32F_FAST_TF32 = 68, 70, 77
    libs = types.ModuleType("cupy_backends.cuda.libs")
    libs.cublas = cublas
    backends = types.ModuleType("cupy_backends")
    backends.cuda = types.ModuleType("cupy_backends.cuda")
    backends.cuda.libs = libs

    linalg = types.ModuleType("cupy._core._routines_linalg")
    linalg.COMPUTE_TYPE_DEFAULT, linalg.COMPUTE_TYPE_TF32 = 1, 7
    linalg.set_compute_type = lambda dtype, kind: compute_types.__setitem__(np.dtype(dtype).name, kind)
    core = types.ModuleType("cupy._core")
    core._routines_linalg = linalg
    cupy._core = core
    return {"cupy": cupy, "cupy.cublas": cupy.cublas, "cupy._core": core, "cupy._core._routines_linalg": linalg,
            "cupyx": cupyx, "cupy_backends": backends, "cupy_backends.cuda": backends.cuda,
            "cupy_backends.cuda.libs": libs, "cupy_backends.cuda.libs.cublas": cublas}  # fmt: skip


def install(monkeypatch, devices: int = 1):
    """Put the fake in sys.modules (undone by monkeypatch) and make npgpt's CUDA probe see it; returns
    this module, whose counters tests read."""
    reset(devices)
    for name, mod in modules().items():
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setenv("CUPY_TF32", "0")
    monkeypatch.setenv("NPGPT_CUDA_KERNELS", "none")  # not even npgpt.cuda.DEFAULT_ON: tests that want kernels say so
    _clear_caches()
    return sys.modules[__name__]


def _clear_caches() -> None:
    """Forget every CuPy object npgpt cached, so neither the fake nor the real CuPy outlives its turn."""
    from npgpt import backend
    from npgpt.cuda import kernels

    backend._import_cupy.cache_clear()
    backend.cuda_available.cache_clear()
    kernels._module.cache_clear()
    kernels._function.cache_clear()


def uninstall() -> None:
    _clear_caches()
    _live.clear()


__all__ = ["DeviceArray", "install", "uninstall", "reset", "reset_counts", "gemm_strided_batched"]
