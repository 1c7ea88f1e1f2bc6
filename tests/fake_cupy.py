"""A stand-in for CuPy on the CPU, so that tests without a GPU run npgpt's CuPy code paths (the branches
taken for CuPy arrays) and see what CuPy 14.2 would do there.

    def test_something(fake_cupy):            # the fixture (conftest.py) installs it as `cupy`
        model = npgpt.GPT(cfg, device="cuda")  # parameters are fake_cupy.DeviceArray, model.xp the fake
        ...
        assert fake_cupy.host_transfers == 1   # device-to-host conversions since the last reset()

`NPGPT_FAKE_CUDA=1 python -m pytest -m cuda` runs every CUDA test on it (conftest.py).

What it models, each behaviour citing the line of CuPy's source (tag v14.2.0) it follows ("core.pyx:1803"
is cupy/_core/core.pyx, line 1803; "linalg.pyx" is cupy/_core/_routines_linalg.pyx):

- DeviceArray plays cupy.ndarray. It is *not* a NumPy array (CuPy's is not), so NumPy cannot take one
  for a host array: `np.asarray(x)`, `np.array(x)`, `np.testing.*(x, ...)` raise CuPy's TypeError
  ("Implicit conversion to a NumPy array is not allowed", core.pyx:1803-1810).
- NumPy's functions and ufuncs on device arrays run on the device (__array_ufunc__, core.pyx:1969;
  __array_function__, core.pyx:2028) and give device arrays, reductions 0-d ones.
- A host (NumPy) array given to an elementwise operation beside a device array is CuPy's TypeError
  "Unsupported type <class 'numpy.ndarray'>": `x + host`, `cupy.exp(host)`, `cupy.where(c, host, 0)`
  (_kernel.pyx:147-156 hands anything that is not a device array to CScalar, _scalar.pyx:344 refuses
  it); so is `cupy.concatenate`/`stack` of a host array (_routines_manipulation.pyx:672). Host arrays
  *are* accepted as indices (_routines_indexing.pyx:291) and as values assigned into a device array
  (_routines_indexing.pyx:917, 1036): both are copied to the device.
- Every conversion to a host value is counted in `host_transfers` (each is a device-to-host copy that
  waits for the queued work): float(), int(), complex(), bool(), .item(), .tolist(), .get(),
  cupy.asnumpy, format() (core.pyx:2048-2054, 2074, 1537, 680-692, 2098). There is no __index__ (CuPy's
  ndarray has none): a device scalar cannot index a Python sequence. repr() is not counted (pytest
  prints arrays in its reports). `get_current_stream().synchronize()` counts in `stream_syncs`,
  Stream.null's in `null_syncs`.
- `matmul` (and `@`, np.matmul, cupy.dot on matrices) as CuPy's: an N-D product (ndim > 2) makes its
  operands contiguous (linalg.pyx:903), computes float16 in float32 (linalg.pyx:900), sends any dtype
  outside 'efdFD' (bfloat16 is 'E') to the integer GEMM, which fails (linalg.pyx:992), and calls
  gemmStridedBatchedEx with the legacy compute type, so TF32 is ignored there (linalg.pyx:1014-1023).
  A 2-D product goes to dot -> tensordot_core_v11 (linalg.pyx:856), which asks get_compute_type
  (linalg.pyx:719): float32 with COMPUTE_TYPE_TF32 runs CUBLAS_COMPUTE_32F_FAST_TF32 (linalg.pyx:727-729),
  modelled by rounding both operands to TF32's 10-bit mantissa first, so a TF32 setting left on shows in
  float32 results; 16-bit dtypes accumulate in float32, rounded once (linalg.pyx:731).
- The compute type as CuPy keeps it: a module-global list, one entry per dtype, COMPUTE_TYPE_TBD until
  the first get_compute_type reads $CUPY_TF32 and stores the answer (linalg.pyx:40-43, 448-457), which
  then holds whatever $CUPY_TF32 says later; set_compute_type stores TF32 only on compute capability
  8.0 and newer (linalg.pyx:70-85). `compute_types` is that list; `effective_compute_type()` what the
  next float32 product would use, without deciding it.
- `cupy_backends.cuda.libs.cublas.gemmStridedBatchedEx`: the NumPy model of cuBLAS's column-major
  strided-batched GEMM, run on the arrays' own memory (pointers are real host addresses here; a call
  that would touch memory outside every live device allocation is an AssertionError, not a crash).
  Each call's types are recorded in `gemm_calls`.
- `cupy.cuda.nccl` as in v14: `available` is False and nothing else is there when the library did not
  load (cupy/cuda/nccl.py:11-19, the ImportError swallowed); else get_unique_id() gives 128 bytes
  (cupy_backends/cuda/libs/nccl.pyx:159-170), NcclCommunicator(ndev: int, commId: bytes, rank: int)
  refuses another length or type (nccl.pyx:323-333; Cython's typed arguments), allReduce takes device
  pointers as ints (nccl.pyx:470-477), and the constants are nccl.pxd:4-24's. One process: a
  communicator of one rank (`nccl_calls` records the all-reduces; `nccl_available` switches it).
- `cupy.cublas.nrm2`, `cupyx.scatter_add`, `cupy.random.default_rng` (arrays on the "device").
- `RawModule`: the kernels of kernels/*.cu through npgpt.cuda.emulate (g++), so the CUDA-kernel
  wrappers' CuPy branch runs too.
- `cuda.Device(i).use()` and allocations: `events` records ("use", i) and ("alloc", current device)
  in order, so a test can see which GPU memory was allocated on; `runtime.getDeviceCount()` says
  `device_count`, getDeviceProperties `device_name`.
- `kernels`: the elementwise and reduction kernels CuPy would compile for what ran (a key per ufunc,
  dtypes, dimensions after CuPy merges contiguous axes, and contiguity; per reduction and dtype), an
  estimate of a cold kernel cache's compile work (benchmarks/gpu_compile_budget.py).
Nothing here is fast; use tiny models.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import os
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
nccl_calls: list = []  # (count, datatype, op) per NcclCommunicator.allReduce
events: list = []  # ("use", device) and ("alloc", device)
kernels: set = set()  # the kernels CuPy would have compiled (see _note_kernel)
kernels_used: set = set()  # the same, since the last clear() (conftest.py: per test)
device_count = 1
current_device = 0
device_name = "Fake GPU"
nccl_available = True

# CuPy's compute types (cupy/_core/_routines_linalg.pxd) and its per-dtype list (linalg.pyx:40-43)
COMPUTE_TYPE_TBD, COMPUTE_TYPE_DEFAULT, COMPUTE_TYPE_PEDANTIC = 0, 1, 2
COMPUTE_TYPE_FP16, COMPUTE_TYPE_FP32, COMPUTE_TYPE_FP64, COMPUTE_TYPE_BF16, COMPUTE_TYPE_TF32 = 3, 4, 5, 6, 7
compute_types = [COMPUTE_TYPE_TBD] * 4  # bfloat16, float16, float32, float64
COMPUTE_CAPABILITY = 90


def reset(devices: int = 1) -> None:
    global host_transfers, stream_syncs, null_syncs, device_count, current_device, device_name, nccl_available
    host_transfers = stream_syncs = null_syncs = 0
    device_count, current_device, device_name, nccl_available = devices, 0, "Fake GPU", True
    gemm_calls.clear()
    matmul_calls.clear()
    nccl_calls.clear()
    events.clear()
    kernels.clear()
    kernels_used.clear()
    compute_types[:] = [COMPUTE_TYPE_TBD] * 4


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

# --- device memory: the NumPy arrays that own it ------------------------------------------------------------

_roots: dict = {}  # id(root ndarray) -> (weakref to it, lo, hi, device): every live device allocation


def _root(a: np.ndarray) -> np.ndarray:
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


def _forget(key):
    return lambda ref: _roots.pop(key, None)


def _adopt(a: np.ndarray) -> DeviceArray:
    """`a` as a DeviceArray: a view of device memory stays a view; memory NumPy just made for a result is
    a new allocation on the current device; anything else (host memory) is copied to a new one."""
    root = _root(a)
    if id(root) not in _roots:
        if not (a is root and a.flags.owndata):
            copy = np.empty(a.shape, a.dtype)
            copy[...] = a
            a = root = copy
        lo, hi = byte_bounds(root) if root.size else (0, 0)
        _roots[id(root)] = (weakref.ref(root, _forget(id(root))), lo, hi, current_device)
        events.append(("alloc", current_device))
    return DeviceArray._of(a)


def _device_of(a: np.ndarray) -> int:
    entry = _roots.get(id(_root(a)))
    return entry[3] if entry else current_device


def _to_device(x) -> DeviceArray:
    """x on the device: a DeviceArray as it is, host data (arrays, lists, scalars) copied over."""
    if isinstance(x, DeviceArray):
        return x
    host = np.asarray(x)
    copy = np.empty(host.shape, host.dtype)
    copy[...] = host
    return _adopt(copy)


class _Memory:
    """cupy.ndarray.data: a MemoryPointer (.ptr, .device_id, .device)."""

    def __init__(self, ptr: int, device_id: int):
        self.ptr, self.device_id = ptr, device_id

    @property
    def device(self):
        return _Device(self.device_id)


# --- arguments in, results out ---------------------------------------------------------------------------------


def _unwrap(x, memo: dict, strict: bool):
    """The NumPy array under each DeviceArray in x (lists, tuples and dicts walked). A host array is CuPy's
    TypeError when `strict` (an elementwise kernel's argument: _kernel.pyx:147-156, _scalar.pyx:344),
    else copied to the device as CuPy's converting functions do."""
    if isinstance(x, DeviceArray):
        memo[id(x._a)] = x
        return x._a
    if isinstance(x, np.ndarray):
        if strict:
            raise TypeError(f"Unsupported type {type(x)}")
        return _to_device(x)._a
    if isinstance(x, (list, tuple)):
        return type(x)(_unwrap(v, memo, strict) for v in x)
    if isinstance(x, dict):
        return {k: _unwrap(v, memo, strict) for k, v in x.items()}
    return x


def _rewrap(r, memo: dict):
    """A result back as device arrays: `out` arguments as the very DeviceArray passed, NumPy scalars as 0-d
    arrays (CuPy's reductions and scalar indexing give 0-d arrays)."""
    if isinstance(r, np.ndarray):
        known = memo.get(id(r))
        return known if known is not None and known._a is r else _adopt(r)
    if isinstance(r, np.generic):
        return _adopt(np.asarray(r))
    if isinstance(r, tuple):
        return tuple(_rewrap(v, memo) for v in r)
    if isinstance(r, list):
        return [_rewrap(v, memo) for v in r]
    return r


def _merged_ndim(shape, strides_list) -> int:
    """The dimensions CuPy's kernels see after dropping length-1 axes and merging axes that are contiguous
    in every operand (cupy/_core/_kernel.pyx, _reduce_dims): what a kernel is specialised for."""
    axes = [i for i, n in enumerate(shape) if n != 1]
    if not axes:
        return 0
    merged = 1
    for i, j in zip(axes, axes[1:]):
        if not all(s[i] == s[j] * shape[j] for s in strides_list):
            merged += 1
    return merged


def _note_kernel(name: str, arrays: list, out_dtype=None) -> None:
    """Record the elementwise kernel CuPy compiles for `name` on these operands (its cache key: the
    ufunc, the dtypes, the merged dimensions and whether every operand is C-contiguous)."""
    arrays = [a for a in arrays if isinstance(a, np.ndarray)]
    if not arrays:
        return
    shape = np.broadcast_shapes(*(a.shape for a in arrays))
    strides = [np.broadcast_to(a, shape).strides for a in arrays]
    key = ("elementwise", name, tuple(a.dtype.str for a in arrays), out_dtype and np.dtype(out_dtype).str,
           _merged_ndim(shape, strides), all(a.flags.c_contiguous for a in arrays))  # fmt: skip
    kernels.add(key)
    kernels_used.add(key)


# x + y, y + x and x += y run CuPy's ufunc kernel (cupy.add, with out=x for +=): one name for all three
_OPERATOR_UFUNCS = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "truediv": np.true_divide,
                    "floordiv": np.floor_divide, "mod": np.remainder, "pow": np.power, "and": np.bitwise_and,
                    "or": np.bitwise_or, "xor": np.bitwise_xor, "lshift": np.left_shift, "rshift": np.right_shift,
                    "lt": np.less, "le": np.less_equal, "eq": np.equal, "ne": np.not_equal, "gt": np.greater,
                    "ge": np.greater_equal}  # fmt: skip


REDUCTIONS = {"sum", "mean", "max", "min", "amax", "amin", "argmax", "argmin", "prod", "any", "all", "var", "std",
              "nansum", "cumsum", "logsumexp", "count_nonzero"}  # fmt: skip


def _note_reduction(name: str, a: np.ndarray, axis) -> None:
    if name in REDUCTIONS and isinstance(a, np.ndarray):
        whole = axis is None or (a.ndim <= 1)
        key = ("reduction", name, a.dtype.str, "all" if whole else "axis", a.flags.c_contiguous)
        kernels.add(key)
        kernels_used.add(key)


# --- the array ----------------------------------------------------------------------------------------------


class DeviceArray:
    """cupy.ndarray on the fake device: a NumPy array (`_a`, its memory "device memory") behind CuPy's
    interface. `cupy.ndarray(shape, dtype)` allocates, as CuPy's constructor does."""

    __slots__ = ("_a", "__weakref__")
    __hash__ = None

    def __init__(self, shape, dtype=float):
        self._a = _adopt(np.empty(shape, dtype))._a

    @classmethod
    def _of(cls, a: np.ndarray) -> DeviceArray:
        self = object.__new__(cls)
        self._a = a
        return self

    # -- what CuPy refuses
    def __array__(self, dtype=None, copy=None):  # core.pyx:1803-1810
        raise TypeError("Implicit conversion to a NumPy array is not allowed. "
                        "Please use `.get()` to construct a NumPy array explicitly.")  # fmt: skip

    # -- NumPy's protocols: run on the device
    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):  # core.pyx:1969
        if ufunc is np.matmul and method == "__call__":
            return matmul(*inputs, **kwargs)
        memo: dict = {}
        args = _unwrap(inputs, memo, strict=True)
        kw = _unwrap(kwargs, memo, strict=True)
        if method == "__call__":
            _note_kernel(ufunc.__name__, [*args, *kw.get("out", ())], kw.get("dtype"))
        elif method == "reduce":
            _note_reduction(ufunc.__name__ if ufunc is not np.add else "sum", args[0], kw.get("axis", 0))
        return _rewrap(getattr(ufunc, method)(*args, **kw), memo)

    def __array_function__(self, func, types, args, kwargs):  # core.pyx:2028
        return _call_numpy(func, args, kwargs)

    # -- attributes and methods: NumPy's, on the device
    def __getattr__(self, name):
        if name == "_a" or name.startswith("__") or name == "ctypes":
            # not NumPy's array interfaces (NumPy would take the object for a host array through them) nor
            # a host pointer: CuPy's ndarray has neither
            raise AttributeError(f"'cupy.ndarray' object has no attribute {name!r}")
        attr = getattr(self._a, name)
        if not callable(attr):
            return _rewrap(attr, {id(self._a): self})

        def method(*args, **kwargs):
            memo = {id(self._a): self}
            args, kwargs = _unwrap(args, memo, strict=False), _unwrap(kwargs, memo, strict=False)
            _note_reduction(name, self._a, kwargs.get("axis", args[0] if args else None))
            if name in ("astype", "copy", "fill"):  # elementwise copy / fill kernels
                _note_kernel(name, [self._a], args[0] if name == "astype" and args else None)
            return _rewrap(attr(*args, **kwargs), memo)

        method.__name__ = name
        return method

    def __setattr__(self, name, value):
        if name == "_a":
            object.__setattr__(self, name, value)
        else:  # x.shape = (...) reshapes in place, as on CuPy
            setattr(self._a, name, value)

    @property
    def data(self):  # a MemoryPointer: .ptr, .device_id
        return _Memory(self._a.__array_interface__["data"][0], _device_of(self._a))

    @property
    def device(self):  # core.pyx:2094
        return _Device(_device_of(self._a))

    def __len__(self):  # core.pyx:1826
        return len(self._a)

    def __iter__(self):  # core.pyx:1821-1824: device arrays, not host values
        if self._a.ndim == 0:
            raise TypeError("iteration over a 0-d array")
        return (self[i] for i in range(self._a.shape[0]))

    def __getitem__(self, key):
        memo = {id(self._a): self}
        return _rewrap(self._a[_unwrap(key, memo, strict=False)], memo)  # host index arrays: copied (:291)

    def __setitem__(self, key, value):  # host values are copied to the device (_routines_indexing.pyx:917, 1036)
        memo: dict = {}
        value = value._a if isinstance(value, DeviceArray) else value
        key = _unwrap(key, memo, strict=False)
        self._a[key] = value
        _note_kernel("setitem", [self._a[key]] + ([value] if isinstance(value, np.ndarray) else []))

    def __deepcopy__(self, memo):
        return self.copy()

    def __copy__(self):
        return self.copy()

    # -- conversions to host values: each one a device-to-host copy
    def _host(self) -> np.ndarray:
        return self._a

    def __repr__(self):  # not counted: pytest prints arrays in its reports
        return f"fake-device {self._a!r}"

    __str__ = __repr__

    def __float__(self):  # core.pyx:2051
        _transfer()
        return float(self._a)

    def __int__(self):  # core.pyx:2048
        _transfer()
        return int(self._a)

    def __complex__(self):  # core.pyx:2054
        _transfer()
        return complex(self._a)

    def __bool__(self):  # core.pyx:1529-1541
        if self._a.size == 1:
            _transfer()
        return bool(self._a)

    def __format__(self, spec):  # core.pyx:2074
        _transfer()
        return format(self._a.item() if self._a.ndim == 0 else self._a, spec)

    def item(self, *args):  # core.pyx:680-692
        _transfer()
        return self._a.item(*args)

    def tolist(self):
        _transfer()
        return self._a.tolist()

    def get(self, stream=None, order="C", out=None, blocking=True):  # core.pyx:2098
        _transfer()
        if out is not None:
            out[...] = self._a
            return out
        return np.array(self._a, order=order)

    def set(self, host, stream=None):
        self._a[...] = host


def _operator(name: str, inplace: bool = False):
    base = name.strip("_")
    base = base[1:] if base[1:] in _OPERATOR_UFUNCS and base[0] in "ir" else base  # __iadd__, __radd__ -> add
    kernel = _OPERATOR_UFUNCS[base].__name__ if base in _OPERATOR_UFUNCS else base

    def op(self, other):
        memo = {id(self._a): self}
        other = _unwrap(other, memo, strict=True)  # a host array beside a device one: CuPy's TypeError
        r = getattr(self._a, name)(other)
        if r is NotImplemented:
            return r
        _note_kernel(kernel, [self._a, other])
        return self if inplace else _rewrap(r, memo)

    op.__name__ = name
    return op


for _name in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "and", "or", "xor", "lshift", "rshift"):
    for _fmt, _inplace in (("__{}__", False), ("__r{}__", False), ("__i{}__", True)):
        setattr(DeviceArray, _fmt.format(_name), _operator(_fmt.format(_name), _inplace))
for _name in ("lt", "le", "eq", "ne", "gt", "ge"):
    setattr(DeviceArray, f"__{_name}__", _operator(f"__{_name}__"))
for _name in ("neg", "pos", "abs", "invert"):
    setattr(DeviceArray, f"__{_name}__", lambda self, _n=_name: _rewrap(getattr(self._a, f"__{_n}__")(), {}))
DeviceArray.__matmul__ = lambda self, other: matmul(self, other)
DeviceArray.__rmatmul__ = lambda self, other: matmul(other, self)


# --- module functions ---------------------------------------------------------------------------------------

# Functions that hand their arrays to an elementwise kernel or insist on device arrays: a host array is
# CuPy's TypeError there (see _unwrap); the rest copy host arrays to the device, as CuPy's converting
# functions do.
STRICT = {"where", "concatenate", "stack", "hstack", "vstack", "clip", "maximum", "minimum", "copyto"}


def _call_numpy(func, args, kwargs):
    name = getattr(func, "__name__", "")
    if name == "dot" and all(getattr(a, "ndim", 3) <= 2 for a in args[:2]):
        return matmul(*args[:2], **kwargs)  # CuPy's dot on matrices: tensordot_core_v11 (linalg.pyx:719)
    memo: dict = {}
    strict = name in STRICT
    a, kw = _unwrap(tuple(args), memo, strict), _unwrap(dict(kwargs), memo, strict)
    if name in REDUCTIONS and a:
        _note_reduction(name, a[0], kw.get("axis", a[1] if len(a) > 1 else None))
    elif name == "where" and len(a) == 3:
        _note_kernel("where", list(a))
    return _rewrap(func(*a, **kw), memo)


def _wrapped(fn):
    def call(*args, **kwargs):
        return _call_numpy(fn, args, kwargs)

    call.__name__ = getattr(fn, "__name__", "fn")
    return call


class _Ufunc:
    """cupy.exp and friends: NumPy's ufunc on device arrays; a host array is CuPy's TypeError."""

    def __init__(self, ufunc):
        self._u = ufunc
        self.__name__ = ufunc.__name__

    def __call__(self, *args, **kwargs):
        if self._u is np.matmul:
            return matmul(*args, **kwargs)
        memo: dict = {}
        a, kw = _unwrap(args, memo, strict=True), _unwrap(kwargs, memo, strict=True)
        out = kw.get("out")
        _note_kernel(self.__name__, [*a, *(out if isinstance(out, tuple) else [out])], kw.get("dtype"))
        return _rewrap(self._u(*a, **kw), memo)

    def __getattr__(self, method):  # reduce, at, outer, accumulate
        fn = getattr(self._u, method)

        def call(*args, **kwargs):
            memo: dict = {}
            return _rewrap(fn(*_unwrap(args, memo, strict=False), **_unwrap(kwargs, memo, strict=False)), memo)

        return call


def to_tf32(x):
    """float32 values rounded to TF32's 10-bit mantissa (to nearest), as the tensor cores read them."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((bits + np.uint32(0x1000)) & np.uint32(0xFFFFE000)).view(np.float32)


def matmul(a, b, out=None):
    """cupy.matmul (linalg.pyx:821): see the module docstring for what it models."""
    for name, x in (("a", a), ("b", b), ("out", out)):
        if x is not None and not isinstance(x, DeviceArray):  # a cpdef taking _ndarray_base
            raise TypeError(f"Argument '{name}' has incorrect type (expected cupy._core.core._ndarray_base, "
                            f"got {type(x).__name__})")  # fmt: skip
    A, B = a._a, b._a
    dtype = np.result_type(A.dtype, B.dtype)
    ndim = max(A.ndim, B.ndim)
    matmul_calls.append((ndim, dtype.name))
    if ndim > 2:
        if dtype.char not in "efdFD":  # linalg.pyx:992: anything else is an integer GEMM
            raise TypeError(f"data type {dtype.char!r} not understood")
        if dtype.char == "e":  # linalg.pyx:900: float16 computed in float32 (no tensor cores), then cast
            r = np.matmul(A.astype(np.float32), B.astype(np.float32)).astype(np.float16)
        else:  # linalg.pyx:1014-1023: the legacy compute type, TF32 never used
            r = np.matmul(A, B)
    elif dtype.itemsize == 2:  # linalg.pyx:731: gemmEx, 16-bit operands, float32 accumulation, rounded once
        r = np.matmul(A.astype(np.float32), B.astype(np.float32)).astype(dtype)
    elif dtype == np.float32 and _get_compute_type(dtype) == COMPUTE_TYPE_TF32:  # linalg.pyx:719, 727-729
        r = np.matmul(to_tf32(A), to_tf32(B))
    else:
        r = np.matmul(A, B)
    if out is None:
        return _adopt(r)
    out._a[...] = r
    return out


def asnumpy(a, stream=None, order="C", out=None, blocking=True):
    if isinstance(a, DeviceArray):
        return a.get(order=order, out=out)
    return np.asarray(a, order=order)


def asarray(a, dtype=None, order=None, *, blocking=False):
    if isinstance(a, DeviceArray):
        if dtype is None or np.dtype(dtype) == a.dtype:
            return a
        return _adopt(a._a.astype(dtype))
    return _to_device(np.asarray(a, dtype=dtype))


def array(a, dtype=None, copy=True, order="K", subok=False, ndmin=0, *, blocking=False):
    if isinstance(a, DeviceArray):
        return _adopt(np.array(a._a, dtype=dtype, copy=True))
    return _to_device(np.array(a, dtype=dtype))


def ascontiguousarray(a, dtype=None):
    a = asarray(a, dtype)
    return a if a._a.flags.c_contiguous else _adopt(np.ascontiguousarray(a._a))


class _Generator:
    """cupy.random.Generator: numbers drawn on the device."""

    def __init__(self, seed=None):
        self._g = np.random.default_rng(seed)

    def __getattr__(self, name):
        return _wrapped(getattr(self._g, name))


class _Random(types.ModuleType):
    Generator = _Generator

    def default_rng(self, seed=None):
        return _Generator(seed)

    def __getattr__(self, name):
        if name.startswith("__"):  # a module's own attributes (inspect walks sys.modules reading __file__)
            raise AttributeError(name)
        attr = getattr(np.random, name)
        return _wrapped(attr) if callable(attr) and not isinstance(attr, type) else attr


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
        self.compute_capability = str(COMPUTE_CAPABILITY)
        self._prev = None

    def use(self):
        global current_device
        if not 0 <= self.id < device_count:
            raise RuntimeError(f"cudaErrorInvalidDevice: device {self.id} of {device_count}")
        current_device = self.id
        events.append(("use", self.id))

    def synchronize(self):
        pass

    def __enter__(self):
        global current_device
        self._prev, current_device = current_device, self.id
        return self

    def __exit__(self, *exc):
        global current_device
        current_device = self._prev


class _Runtime(types.ModuleType):
    @staticmethod
    def getDeviceCount():
        return device_count

    @staticmethod
    def getDeviceProperties(i):
        return {"name": device_name.encode(), "totalGlobalMem": 1 << 34, "major": COMPUTE_CAPABILITY // 10,
                "minor": COMPUTE_CAPABILITY % 10}  # fmt: skip

    @staticmethod
    def memGetInfo():
        return (1 << 33, 1 << 34)

    @staticmethod
    def runtimeGetVersion():
        return 12080

    @staticmethod
    def driverGetVersion():
        return 12080


class _MemoryPool:
    def total_bytes(self):
        return sum(hi - lo for ref, lo, hi, _ in list(_roots.values()) if ref() is not None)

    used_bytes = total_bytes

    def free_all_blocks(self):
        pass


# --- the compute type (cupy/_core/_routines_linalg.pyx) ---------------------------------------------------------


def _compute_type_index(dtype) -> int:  # linalg.pyx:56-67
    dtype = np.dtype(dtype)
    if dtype.char == "e":
        return 1
    if dtype.char in "fF":
        return 2
    if dtype.char in "dD":
        return 3
    if dtype.name == "bfloat16":
        return 0
    raise TypeError(f"dtype is not supported: {dtype}")


def _set_compute_type(dtype, compute_type) -> None:  # linalg.pyx:70-85
    if compute_type in (COMPUTE_TYPE_TBD, COMPUTE_TYPE_DEFAULT, COMPUTE_TYPE_PEDANTIC, COMPUTE_TYPE_FP16,
                        COMPUTE_TYPE_FP32, COMPUTE_TYPE_FP64):  # fmt: skip
        compute_types[_compute_type_index(dtype)] = compute_type
    elif compute_type in (COMPUTE_TYPE_BF16, COMPUTE_TYPE_TF32):
        compute_types[_compute_type_index(dtype)] = (compute_type if COMPUTE_CAPABILITY >= 80
                                                     else COMPUTE_TYPE_DEFAULT)  # fmt: skip
    else:
        raise ValueError(f"Unknown compute type: {compute_type}")


def _env_compute_type(dtype) -> int:  # linalg.pyx:452-455: what a TBD entry becomes
    tf32 = np.dtype(dtype).char in "fF" and int(os.getenv("CUPY_TF32", "0") or "0") > 0
    return COMPUTE_TYPE_TF32 if tf32 else COMPUTE_TYPE_DEFAULT


def _get_compute_type(dtype) -> int:  # linalg.pyx:448-457: decided (and kept) on first use
    index = _compute_type_index(dtype)
    if compute_types[index] == COMPUTE_TYPE_TBD:
        _set_compute_type(dtype, _env_compute_type(dtype))
    return compute_types[index]


def effective_compute_type(dtype=np.float32) -> int:
    """The compute type the next product of `dtype` would use, without deciding it (for the fixture that
    checks no test leaves TF32 changed)."""
    kind = compute_types[_compute_type_index(dtype)]
    return _env_compute_type(dtype) if kind == COMPUTE_TYPE_TBD else kind


# --- cuBLAS's strided-batched GEMM on host memory ------------------------------------------------------------


CUDA_DTYPES = {0: np.dtype(np.float32), 1: np.dtype(np.float64), 2: np.dtype(np.float16)}


def _cuda_dtype(code):
    if code == 14:
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return CUDA_DTYPES[code]


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
    live device allocation (a wrong leading dimension or stride fails here instead of crashing)."""
    lo, hi = ptr, ptr + count * dtype.itemsize
    if count and not any(ref() is not None and a <= lo and hi <= b for ref, a, b, _ in list(_roots.values())):
        raise AssertionError(f"the GPU would touch bytes [{lo:#x}, {hi:#x}) outside every device allocation")
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
    assert isinstance(x, DeviceArray) and x.ndim == 1 and x.dtype in (np.float32, np.float64)
    h = x._a.astype(np.float64)
    return _to_device(np.asarray(np.sqrt(np.dot(h, h)), x.dtype))


def _scatter_add(target, indices, values):
    memo: dict = {}
    np.add.at(target._a, _unwrap(indices, memo, strict=False), _unwrap(values, memo, strict=False))


# --- NCCL (cupy/cuda/nccl.py, cupy_backends/cuda/libs/nccl.pyx and .pxd) -------------------------------------

NCCL_CONSTANTS = {"NCCL_SUM": 0, "NCCL_PROD": 1, "NCCL_MAX": 2, "NCCL_MIN": 3, "NCCL_AVG": 4, "NCCL_INT8": 0,
                  "NCCL_UINT8": 1, "NCCL_INT32": 2, "NCCL_UINT32": 3, "NCCL_INT64": 4, "NCCL_UINT64": 5,
                  "NCCL_FLOAT16": 6, "NCCL_FLOAT32": 7, "NCCL_FLOAT64": 8, "NCCL_BFLOAT16": 9}  # fmt: skip
_NCCL_DTYPES = {6: np.dtype(np.float16), 7: np.dtype(np.float32), 8: np.dtype(np.float64)}
NCCL_UNIQUE_ID_BYTES = 128


def _int_argument(fn: str, name: str, value) -> int:
    """Cython's coercion of a Python object to a C integer argument (int, intptr_t, size_t)."""
    if isinstance(value, (bool, int, np.integer)) and not isinstance(value, DeviceArray):
        return int(value)
    raise TypeError(f"{fn}: an integer is required for {name}, got {type(value).__name__}")


class _NcclCommunicator:
    """NcclCommunicator(ndev, commId, rank) of a one-process world (nccl.pyx:323-346)."""

    def __init__(self, ndev, commId, rank, config=None):
        ndev, rank = _int_argument("NcclCommunicator", "ndev", ndev), _int_argument("NcclCommunicator", "rank", rank)
        if not isinstance(commId, bytes):
            raise TypeError(f"Argument 'commId' has incorrect type (expected bytes, got {type(commId).__name__})")
        if len(commId) != NCCL_UNIQUE_ID_BYTES:
            raise ValueError(f"commId length {len(commId)} != {NCCL_UNIQUE_ID_BYTES}.")
        if ndev != 1 or rank != 0:  # every rank would wait here for the others; the stand-in has one process
            raise AssertionError(f"the NCCL stand-in runs one rank of one, not rank {rank} of {ndev}")
        self._ndev, self._rank = ndev, rank

    def allReduce(self, sendbuf, recvbuf, count, datatype, op, stream):  # nccl.pyx:470-477
        sendbuf, recvbuf = _int_argument("allReduce", "sendbuf", sendbuf), _int_argument("allReduce", "recvbuf", recvbuf)
        count, datatype = _int_argument("allReduce", "count", count), _int_argument("allReduce", "datatype", datatype)
        op, stream = _int_argument("allReduce", "op", op), _int_argument("allReduce", "stream", stream)
        dtype = _NCCL_DTYPES[datatype]
        src, dst = _host_buffer(sendbuf, count, dtype), _host_buffer(recvbuf, count, dtype)
        nccl_calls.append((count, datatype, op))
        if sendbuf != recvbuf:
            dst[...] = src  # any reduction over one rank is the identity

    def size(self):
        return self._ndev

    def rank_id(self):
        return self._rank

    def destroy(self):
        pass


def _nccl_module() -> types.ModuleType:
    nccl = types.ModuleType("cupy.cuda.nccl")
    nccl.available = nccl_available
    if not nccl_available:  # cupy/cuda/nccl.py:16-19: the ImportError is swallowed, nothing else is defined
        return nccl
    nccl.__dict__.update(NCCL_CONSTANTS)
    nccl.get_unique_id = lambda: bytes(np.random.default_rng().integers(0, 256, NCCL_UNIQUE_ID_BYTES, np.uint8))
    nccl.get_version = lambda: 22703
    nccl.NcclCommunicator = _NcclCommunicator
    return nccl


# --- CUDA kernels through the CPU emulation --------------------------------------------------------------------


class _RawModule:
    def __init__(self, code: str, options=()):
        self.defines = tuple(re.findall(r"^#define (\w+) (\S+)$", code.split("\n\n", 1)[0], re.M))

    def get_function(self, name):
        from npgpt.cuda import emulate
        from npgpt.cuda.kernels import KERNEL_ENTRIES

        filename = next(f for f, names in KERNEL_ENTRIES.items() if name in names)

        def launch(grid, block, args):
            key = ("rawmodule", filename, self.defines)  # CuPy compiles a RawModule once per source and defines
            kernels.add(key)
            kernels_used.add(key)
            host = [a._a if isinstance(a, DeviceArray) else a for a in args]
            emulate.launch(filename, name, grid, int(block[0]), host, defines=self.defines)

        return launch


# --- the modules -----------------------------------------------------------------------------------------------


class _FakeCupy(types.ModuleType):
    """`cupy`: NumPy's functions with results on the device, and the pieces above."""

    def __getattr__(self, name):
        if name.startswith("__"):  # a module's own attributes: not NumPy's (its __path__ would make this a package)
            raise AttributeError(name)
        attr = getattr(np, name)
        if isinstance(attr, np.ufunc):
            return _Ufunc(attr)
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
    cupy.array = array
    cupy.random = _Random("cupy.random")
    cupy.RawModule = _RawModule
    cupy.get_default_memory_pool = _MemoryPool
    cupy.__version__ = "14.2.0 (fake, tests/fake_cupy.py)"
    cuda = types.ModuleType("cupy.cuda")
    cuda.Device, cuda.runtime = _Device, _Runtime("cupy.cuda.runtime")
    cuda.device = types.SimpleNamespace(get_cublas_handle=lambda: 0, Device=_Device)
    cuda.get_current_stream = lambda: _CURRENT_STREAM
    cuda.Stream = types.SimpleNamespace(null=_Stream(True))
    cuda.nccl = _nccl_module()
    cupy.cuda = cuda
    cupy.cublas = types.ModuleType("cupy.cublas")
    cupy.cublas.nrm2 = _nrm2
    cupyx = types.ModuleType("cupyx")
    cupyx.scatter_add = _scatter_add
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
    for name in ("TBD", "DEFAULT", "PEDANTIC", "FP16", "FP32", "FP64", "BF16", "TF32"):
        setattr(linalg, f"COMPUTE_TYPE_{name}", globals()[f"COMPUTE_TYPE_{name}"])
    linalg.set_compute_type, linalg.get_compute_type = _set_compute_type, _get_compute_type
    core = types.ModuleType("cupy._core")
    core._routines_linalg = linalg
    cupy._core = core
    return {"cupy": cupy, "cupy.cuda": cuda, "cupy.cuda.nccl": cuda.nccl, "cupy.cuda.runtime": cuda.runtime,
            "cupy.random": cupy.random, "cupy.cublas": cupy.cublas, "cupy._core": core,
            "cupy._core._routines_linalg": linalg, "cupyx": cupyx, "cupy_backends": backends,
            "cupy_backends.cuda": backends.cuda, "cupy_backends.cuda.libs": libs,
            "cupy_backends.cuda.libs.cublas": cublas}  # fmt: skip


def install(monkeypatch, devices: int = 1):
    """Put the fake in sys.modules (undone by monkeypatch) and make npgpt's CUDA probe see it; returns
    this module, whose counters tests read."""
    reset(devices)
    for name, mod in modules().items():
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.delenv("CUPY_TF32", raising=False)  # CuPy's default: TF32 off
    monkeypatch.setenv("NPGPT_CUDA_KERNELS", "none")  # not even npgpt.cuda.DEFAULT_ON: tests that want kernels say so
    _clear_caches()
    return sys.modules[__name__]


def set_nccl_available(available: bool) -> None:
    """Make `cupy.cuda.nccl` the module CuPy leaves when NCCL did (not) load; on the installed fake."""
    global nccl_available
    nccl_available = available
    mod = _nccl_module()
    sys.modules["cupy.cuda.nccl"] = mod
    sys.modules["cupy"].cuda.nccl = mod


def _clear_caches() -> None:
    """Forget every CuPy object npgpt cached, so neither the fake nor the real CuPy outlives its turn."""
    from npgpt import backend
    from npgpt.cuda import kernels as cuda_kernels

    backend._import_cupy.cache_clear()
    backend.cuda_available.cache_clear()
    cuda_kernels._module.cache_clear()
    cuda_kernels._function.cache_clear()


def uninstall() -> None:
    _clear_caches()


__all__ = ["DeviceArray", "install", "uninstall", "reset", "reset_counts", "gemm_strided_batched", "to_tf32",
           "effective_compute_type", "set_nccl_available"]  # fmt: skip
