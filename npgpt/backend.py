"""The array-module abstraction: the same layer code runs on NumPy (CPU) and CuPy (CUDA).

Every layer asks `get_array_module(x)` for the module that owns its input (`xp`) and calls
`xp.exp`, `xp.matmul`, ... on it, so a CuPy array in gives a CuPy array out. CuPy is an
optional extra: nothing here imports it until a CUDA device is asked for or a CuPy array
is seen, and a machine with CuPy installed but no driver or GPU is simply "no CUDA".

Device choice, strongest first: the `device=` argument, then the environment variable
`NPGPT_DEVICE=cpu|cuda|auto`, then "auto" (CUDA when it works, else CPU).
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from functools import lru_cache

import numpy as np

DEFAULT_DTYPE = np.float32
DEVICES = ("cpu", "cuda", "auto")


def _cupy_if_imported():
    """The cupy module if something already imported it, else None (never imports it)."""
    return sys.modules.get("cupy")


@lru_cache(maxsize=None)
def _import_cupy():
    try:
        import cupy  # noqa: F401  (optional dependency)
    except Exception:  # ImportError, or a broken install that fails while loading CUDA libs
        return None
    return cupy


@lru_cache(maxsize=None)
def _probe_cuda() -> str:
    """"" when CUDA works, else one line saying why not. Cached: the probe runs once per process."""
    cupy = _import_cupy()
    if cupy is None:
        return "CuPy is not installed (pip install 'npgpt[cuda12]' or 'npgpt[cuda13]')"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # no driver, no libcuda, ...
        return f"CuPy is installed but no CUDA driver answered ({type(e).__name__}: {e})"
    if n < 1:
        return "CuPy is installed but no CUDA device was found"
    try:
        # `+=` compiles an elementwise kernel through NVRTC: that needs the CUDA headers, which CuPy's
        # wheels do not carry (the [ctk] extra of cupy-cudaXXx, which npgpt's cuda12/cuda13 extras ask for).
        probe = cupy.zeros(1, dtype=cupy.float32)
        probe += 1
        if float(probe[0]) != 1.0:
            return f"CuPy is installed and a device exists, but 0 + 1 gave {float(probe[0])} on it"
    except Exception as e:
        text = " ".join(str(e).split())[:300]
        return (f"CuPy is installed and a device exists, but a first allocation and kernel failed "
                f"({type(e).__name__}: {text})")  # fmt: skip
    return ""


def cuda_available() -> bool:
    """True when CuPy imports *and* a CUDA device can allocate memory and run a kernel.

    CuPy imports fine on a machine without a driver or GPU and fails only at the first
    allocation (or, without the CUDA headers, at the first kernel it compiles), so this tries
    both. It never raises; cuda_unavailable_reason() says what failed."""
    return _probe_cuda() == ""


cuda_available.cache_clear = _probe_cuda.cache_clear  # tests fake a broken CuPy and probe again


def cuda_unavailable_reason() -> str:
    """One line saying why CUDA is not usable, with the exception that said so ("" when it is usable)."""
    return _probe_cuda()


def resolve_device(device: str | None = None) -> str:
    """Turn `device` (or $NPGPT_DEVICE, or "auto") into "cpu" or "cuda".

    Asking for "cuda" where it is not available is a ValueError that says why and how to fix it.
    """
    source = "device argument"
    if device is None:
        device = os.environ.get("NPGPT_DEVICE", "auto") or "auto"
        source = "NPGPT_DEVICE"
    dev = str(device).strip().lower()
    if dev not in DEVICES:
        raise ValueError(
            f"unknown device {device!r} (from the {source}); use one of cpu, cuda, auto"
        )
    if dev == "auto":
        return "cuda" if cuda_available() else "cpu"
    if dev == "cuda" and not cuda_available():
        raise ValueError(
            f"device 'cuda' was asked for (from the {source}) but {cuda_unavailable_reason()}; "
            "use device 'cpu' or 'auto', or install CuPy on a machine with an NVIDIA GPU"
        )
    return dev


def get_xp(device: str | None = None):
    """The array module (numpy or cupy) for a device name."""
    return _import_cupy() if resolve_device(device) == "cuda" else np


def is_cupy_array(a) -> bool:
    cupy = _cupy_if_imported()
    return cupy is not None and isinstance(a, cupy.ndarray)


def get_array_module(*arrays):
    """numpy or cupy: cupy if any of `arrays` is a CuPy array, else numpy. None entries are skipped."""
    for a in arrays:
        if is_cupy_array(a):
            return sys.modules["cupy"]
    return np


def device_of(a) -> str:
    """"cuda" for a CuPy array, "cpu" otherwise."""
    return "cuda" if is_cupy_array(a) else "cpu"


def to_numpy(a):
    """A NumPy array with the same values (copies device memory to the host; no-op for NumPy)."""
    if is_cupy_array(a):
        return a.get()
    return np.asarray(a)


def host_scalars(*values) -> list[float]:
    """Python floats of `values`, scalars that may live on a GPU (0-d CuPy arrays; None stays None).
    However many are on the GPU, they are read in one device-to-host copy: a single wait for the GPU,
    which is how the training step reads its loss and gradient norm together (update.py)."""
    out = list(values)
    on_gpu = [i for i, v in enumerate(values) if is_cupy_array(v)]
    if on_gpu:
        cupy = sys.modules["cupy"]
        host = cupy.stack([values[i].astype(np.float64).reshape(()) for i in on_gpu]).get()  # the one read
        for i, v in zip(on_gpu, host):
            out[i] = v
    return [None if v is None else float(v) for v in out]


def to_device(a, device: str | None = None, dtype=None):
    """Put `a` on `device` ("cpu" or "cuda", resolved as in `resolve_device`), optionally casting."""
    xp = get_xp(device)
    if xp is np:
        out = to_numpy(a)
        return out if dtype is None else out.astype(dtype, copy=False)
    return xp.asarray(a, dtype=dtype)


def scatter_add(target, indices, values) -> None:
    """target[indices[i]] += values[i] for every i, accumulating repeated indices (in place)."""
    if is_cupy_array(target):
        import cupyx

        cupyx.scatter_add(target, indices, values)
    else:
        np.add.at(target, indices, values)


def check_float_dtype(a, what: str) -> None:
    """ValueError unless `a` is float32 or float64 (the dtypes every layer supports)."""
    if a.dtype not in (np.float32, np.float64):
        raise ValueError(
            f"{what} has dtype {a.dtype}; npgpt layers work in float32 or float64 "
            f"(convert with .astype(np.float32))"
        )


def data_ptr(a) -> int:
    return int(a.data.ptr) if is_cupy_array(a) else int(a.__array_interface__["data"][0])


def views_into(flat, like: dict) -> dict:
    """Views into the 1-D buffer `flat`, one per array of `like` with its shape, laid out back to back
    in `like`'s key order (the layout flat_base recognises)."""
    views, off = {}, 0
    for k, a in like.items():
        views[k] = flat[off : off + a.size].reshape(a.shape)
        off += a.size
    return views


def flat_base(tensors: dict):
    """The 1-D buffer that `tensors` are consecutive, contiguous views of, in dict order, or None.

    (The fast engine's gradients and, after GPT.flatten_params_(), the parameters are laid out this
    way, so whole-model operations such as AdamW can run over one buffer in one go.)"""
    arrays = list(tensors.values())
    if not arrays:
        return None
    base = arrays[0].base
    while base is not None and getattr(base, "base", None) is not None:
        base = base.base
    if base is None or base.ndim != 1 or not base.flags.c_contiguous:
        return None
    if sum(a.size for a in arrays) != base.size:
        return None
    expect = data_ptr(base)
    for a in arrays:
        if not a.flags.c_contiguous or a.dtype != base.dtype or data_ptr(a) != expect:
            return None
        expect += a.nbytes
    return base


# --- TF32: a state a run sets and restores --------------------------------------------------------------------
#
# TensorFloat-32 (Ampere and newer) multiplies float32 matrices with 10-bit mantissas, float32 accumulation,
# about 8x the float32 rate. CuPy decides per dtype, once: its first float32 2-D product reads $CUPY_TF32 and
# stores the answer in a module global (cupy/_core/_routines_linalg.pyx, get_compute_type), which then holds
# for the rest of the process, whatever $CUPY_TF32 says later. So TF32 is process-wide state: a run turns it
# on or off inside `tf32_mode(...)`, which puts $CUPY_TF32 and CuPy's choice back as they were when it ends.

_COMPUTE_TYPE_TF32 = 7  # cupy._core._routines_linalg.COMPUTE_TYPE_TF32 (COMPUTE_TYPE_DEFAULT is 1)
_open_tf32_modes: list = []  # the _TF32Saved of every tf32_mode now open, innermost last


def _cupy_linalg():
    """cupy._core._routines_linalg when CuPy is already imported (never imports it), else None."""
    if _cupy_if_imported() is None:
        return None
    try:
        from cupy._core import _routines_linalg as linalg
    except Exception:  # an older or broken CuPy
        return None
    return linalg


def _cupy_float32_compute_type():
    """CuPy's compute type for float32 products (COMPUTE_TYPE_*), or None when CuPy is not imported or
    cannot say. Reading it fixes it: CuPy decides on first read from $CUPY_TF32, as its first product would."""
    linalg = _cupy_linalg()
    if linalg is None:
        return None
    try:
        return int(linalg.get_compute_type(np.float32))
    except Exception:
        return None


def tf32_enabled() -> bool:
    """Whether float32 matrix products on the GPU use TF32: CuPy's own choice once CuPy is imported (what its
    2-D products, every `linear`, do), else $CUPY_TF32 (what it will choose). CuPy's default: off."""
    kind = _cupy_float32_compute_type()
    if kind is not None:
        return kind == _COMPUTE_TYPE_TF32
    return os.environ.get("CUPY_TF32", "0") == "1"


def set_tf32(enabled: bool = True) -> None:
    """TF32 on or off for float32 matrix products on the GPU, from now on in this process: sets $CUPY_TF32
    (which CuPy reads at its first float32 product) and CuPy's stored choice if CuPy is imported. A run
    calls it inside `tf32_mode`, which undoes it when the run ends; called outside one, it stays."""
    for saved in _open_tf32_modes:  # each open tf32_mode keeps CuPy's choice from before its first change
        if saved.compute_type is None:
            saved.compute_type = _cupy_float32_compute_type()
    os.environ["CUPY_TF32"] = "1" if enabled else "0"
    linalg = _cupy_linalg()
    if linalg is None:
        return
    try:
        linalg.set_compute_type(np.float32, linalg.COMPUTE_TYPE_TF32 if enabled else linalg.COMPUTE_TYPE_DEFAULT)
    except Exception:  # a CuPy without a working GPU (TF32 asks for the compute capability): the variable holds
        pass


class _TF32Saved:
    """What a tf32_mode puts back: $CUPY_TF32 (None: unset) and CuPy's float32 compute type, read when
    set_tf32 first changes it inside the block (None: never changed there, so nothing to put back)."""

    def __init__(self):
        self.env = os.environ.get("CUPY_TF32")
        self.compute_type = None


@contextmanager
def tf32_mode(enabled: bool | None = None):
    """TF32 as `enabled` inside the block (None: as it is, while allowing the code inside to call set_tf32),
    and afterwards $CUPY_TF32 and CuPy's float32 compute type as they were before it. A run is

        with tf32_mode(cfg.tf32 if on_a_gpu else None):
            ...

    so that nothing after it (the next run in this process, the next test) inherits its TF32 setting.
    CuPy's state is touched only when TF32 is changed, so a CPU run (enabled=None) leaves CUDA alone."""
    saved = _TF32Saved()
    _open_tf32_modes.append(saved)
    try:
        if enabled is not None:
            set_tf32(enabled)
        yield
    finally:
        _open_tf32_modes.remove(saved)
        if saved.env is None:
            os.environ.pop("CUPY_TF32", None)
        else:
            os.environ["CUPY_TF32"] = saved.env
        linalg = _cupy_linalg() if saved.compute_type is not None else None
        if linalg is not None:
            try:
                linalg.set_compute_type(np.float32, saved.compute_type)
            except Exception:
                pass


def tf32_note(device: str) -> str:
    """" (TF32 on)" or " (TF32 off)" for a CUDA run (what its float32 matrix products do now), "" on the CPU,
    where there is no TF32: what a run's banner prints after its device."""
    if device != "cuda":
        return ""
    return " (TF32 on)" if tf32_enabled() else " (TF32 off)"
