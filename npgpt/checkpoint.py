"""Checkpoints: a directory in the Hugging Face GPT-2 layout, plus the training state.

    ckpt/
      model.safetensors      weights, Hugging Face GPT-2 names and layouts (no pickle, ever)
      config.json            a Hugging Face GPT2Config, with npgpt's own config under "npgpt"
      optimizer.safetensors  AdamW moments m.<name> and v.<name>         (training checkpoints only)
      trainer_state.json     step, tokens seen, data position, RNG states, run settings
      manifest.json          sha256 and size of every file above, written last

Every file is written to a temporary name in the same directory, flushed to disk and renamed into
place, and the manifest goes last: a checkpoint without a manifest that verifies is incomplete.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .backend import to_numpy

FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path` to write; on success it is flushed to disk and renamed onto
    `path`, so a crash leaves either the old file or the new one, never half; on failure it is removed."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_json(path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def save_tensors(path, tensors: dict, metadata: dict | None = None) -> None:
    """Arrays (NumPy or CuPy) -> a safetensors file, atomically, written straight from the arrays
    (never the whole file in memory)."""
    from safetensors.numpy import save_file

    host = {k: np.ascontiguousarray(to_numpy(v)) for k, v in tensors.items()}
    meta = {"format": "pt", **{k: str(v) for k, v in (metadata or {}).items()}}
    with atomic_path(path) as tmp:
        save_file(host, tmp, metadata=meta)


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(ckpt_dir, step: int | None = None) -> None:
    ckpt_dir = Path(ckpt_dir)
    files = {}
    for name in (MODEL_FILE, CONFIG_FILE, OPTIMIZER_FILE, STATE_FILE):
        p = ckpt_dir / name
        if p.exists():
            files[name] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    atomic_write_json(ckpt_dir / MANIFEST_FILE, {"format_version": FORMAT_VERSION, "step": step, "files": files})


def verify_manifest(ckpt_dir) -> str | None:
    """None when the manifest exists and every file matches it, else a one-line reason."""
    ckpt_dir = Path(ckpt_dir)
    mpath = ckpt_dir / MANIFEST_FILE
    if not mpath.is_file():
        return f"{ckpt_dir} has no {MANIFEST_FILE} (the save did not finish)"
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
    except (ValueError, KeyError, TypeError):
        return f"{mpath} is not a valid manifest"
    for name, info in files.items():
        p = ckpt_dir / name
        if not p.is_file():
            return f"{p} is missing"
        if p.stat().st_size != info.get("bytes"):
            return f"{p} has {p.stat().st_size} bytes, the manifest says {info.get('bytes')}"
        if sha256_file(p) != info.get("sha256"):
            return f"{p} does not match its sha256 in the manifest"
    return None


def save_model(ckpt_dir, model) -> None:
    """Weights and config.json of `model` into ckpt_dir (created if needed). Tied models store wte only,
    as the Hugging Face gpt2 checkpoints do; a qkv_bias=False model gets zero q|k|v biases in the file so
    that transformers' GPT-2 (which always has them) loads it."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    tensors = dict(model.params)
    cfg = model.config
    if not cfg.qkv_bias:
        xp = model.xp
        for i in range(cfg.n_layers):
            tensors[f"h.{i}.attn.c_attn.bias"] = xp.zeros(3 * cfg.emb_dim, dtype=model.dtype)
    save_tensors(ckpt_dir / MODEL_FILE, tensors)
    hf = cfg.to_hf_config()
    hf["npgpt"] = {"format_version": FORMAT_VERSION, "config": cfg.to_dict(), "dtype": np.dtype(model.dtype).name}
    atomic_write_json(ckpt_dir / CONFIG_FILE, hf)


def save_optimizer(ckpt_dir, optimizer) -> dict:
    """AdamW moments into optimizer.safetensors; returns the JSON-able rest of its state."""
    state = optimizer.state_dict()
    tensors = {f"m.{k}": v for k, v in state["m"].items()}
    tensors.update({f"v.{k}": v for k, v in state["v"].items()})
    save_tensors(Path(ckpt_dir) / OPTIMIZER_FILE, tensors, {"t": state["t"]})
    return {k: v for k, v in state.items() if k not in ("m", "v")}


def load_optimizer_tensors(ckpt_dir) -> tuple[dict, dict]:
    from .safetensors_io import load_safetensors

    tensors = load_safetensors(Path(ckpt_dir) / OPTIMIZER_FILE)
    m = {k[2:]: v for k, v in tensors.items() if k.startswith("m.")}
    v = {k[2:]: v for k, v in tensors.items() if k.startswith("v.")}
    return m, v
