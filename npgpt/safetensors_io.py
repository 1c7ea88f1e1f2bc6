"""A strict reader for safetensors files: every claim in the header is checked before it is trusted.

The format: 8 bytes little-endian header length N, N bytes of UTF-8 JSON mapping tensor names to
{"dtype", "shape", "data_offsets": [begin, end]} (plus an optional "__metadata__" of strings), then
the data, which the tensors must tile exactly. A weights file can never run code here (there is no
pickle in the format, and none in npgpt), and a malformed or hostile file is refused with a one-line
reason before anything large is allocated: sizes are checked against the real file size first.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

MAX_HEADER_BYTES = 100 * 1024 * 1024  # as the reference implementation

DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}  # fmt: skip
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


class SafetensorsError(ValueError):
    """A malformed safetensors file (a ValueError, so the CLI reports it in one line)."""


def _reject_duplicates(pairs):
    seen = {}
    for k, v in pairs:
        if k in seen:
            raise SafetensorsError(f"duplicate tensor name {k!r} in the header")
        seen[k] = v
    return seen


def read_header(path) -> tuple[dict, dict, int]:
    """(tensors {name: (dtype, shape, begin, end)}, metadata, data_start), fully validated."""
    path = Path(path)
    size = os.path.getsize(path)
    where = str(path)
    if size < 8:
        raise SafetensorsError(f"{where}: {size} bytes, too short to be a safetensors file (it needs an 8-byte header length)")
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > size - 8:
            raise SafetensorsError(f"{where}: the header claims {n} bytes but the file has only {size - 8} after the length; the file is truncated or not safetensors")
        if n > MAX_HEADER_BYTES:
            raise SafetensorsError(f"{where}: header of {n} bytes exceeds the {MAX_HEADER_BYTES}-byte limit")
        if n < 2:
            raise SafetensorsError(f"{where}: header of {n} bytes cannot hold a JSON object")
        raw = f.read(n)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SafetensorsError(f"{where}: the header is not valid UTF-8 (byte {e.start})") from None
    try:
        header = json.loads(text, object_pairs_hook=_reject_duplicates)
    except SafetensorsError as e:
        raise SafetensorsError(f"{where}: {e}") from None
    except ValueError as e:
        raise SafetensorsError(f"{where}: the header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{where}: the header must be a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise SafetensorsError(f"{where}: __metadata__ must map strings to strings")
    data_start = 8 + n
    data_len = size - data_start
    tensors = {}
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise SafetensorsError(f"{where}: tensor {name!r} must have exactly dtype, shape and data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in DTYPES:
            raise SafetensorsError(f"{where}: tensor {name!r} has unknown dtype {dtype!r}; known: {', '.join(DTYPES)}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise SafetensorsError(f"{where}: tensor {name!r} has an invalid shape {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):  # fmt: skip
            raise SafetensorsError(f"{where}: tensor {name!r} has invalid data_offsets {offsets!r}")
        begin, end = offsets
        if not 0 <= begin <= end:
            raise SafetensorsError(f"{where}: tensor {name!r} has data_offsets {offsets} that run backwards")
        nbytes = int(np.prod(shape, dtype=object)) * DTYPES[dtype].itemsize
        if end - begin != nbytes:
            raise SafetensorsError(
                f"{where}: tensor {name!r} of shape {shape} and dtype {dtype} needs {nbytes} bytes, but its "
                f"data_offsets {offsets} span {end - begin}"
            )
        tensors[name] = (dtype, tuple(shape), begin, end)
    # The tensors must tile the data region: no overlap, no gap, nothing after the last one.
    pos = 0
    for name, (_, _, begin, end) in sorted(tensors.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if begin < pos:
            raise SafetensorsError(f"{where}: tensor {name!r} overlaps the previous tensor (starts at {begin}, previous ends at {pos})")
        if begin > pos:
            raise SafetensorsError(f"{where}: a gap of {begin - pos} bytes before tensor {name!r}")
        pos = end
    if pos > data_len:
        raise SafetensorsError(f"{where}: the tensors need {pos} data bytes but the file has {data_len}; the file is truncated")
    if pos < data_len:
        raise SafetensorsError(f"{where}: {data_len - pos} trailing bytes after the last tensor")
    return tensors, metadata, data_start


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32 (the upper half of a float32)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def load_safetensors(path, check_finite: bool = True, names=None) -> dict[str, np.ndarray]:
    """Every tensor (or those in `names`) as a NumPy array. BF16 becomes float32.

    check_finite: a NaN or Inf in a floating-point tensor is an error naming the tensor.
    """
    tensors, _, data_start = read_header(path)
    out = {}
    with open(path, "rb") as f:
        for name, (dtype, shape, begin, end) in tensors.items():
            if names is not None and name not in names:
                continue
            arr = np.empty(end - begin, dtype=np.uint8)
            f.seek(data_start + begin)
            if f.readinto(memoryview(arr)) != end - begin:
                raise SafetensorsError(f"{path}: tensor {name!r} could not be read in full (the file changed while reading?)")
            a = arr.view(DTYPES[dtype]).reshape(shape)
            if dtype == "BF16":
                a = bf16_to_f32(a)
            if not a.dtype.isnative:
                a = a.astype(a.dtype.newbyteorder("="))
            if check_finite and dtype in FLOAT_DTYPES and not np.isfinite(a).all():
                bad = int((~np.isfinite(a)).sum())
                raise SafetensorsError(f"{path}: tensor {name!r} holds {bad} NaN or Inf values; the weights are corrupt")
            out[name] = a
    return out


def first_nonfinite(path) -> str | None:
    """None when every floating-point tensor of the file is finite, else a one-line reason. Reads one
    tensor at a time, so memory stays at the largest tensor, not the whole file."""
    tensors, _, _ = read_header(path)
    for name in tensors:
        try:
            load_safetensors(path, names={name})
        except SafetensorsError as e:
            return str(e)
    return None


def safetensors_metadata(path) -> dict:
    return read_header(path)[1]
