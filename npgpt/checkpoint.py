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

import errno
import hashlib
import itertools
import json
import os
import re
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import numpy as np

from .atomic import atomic_path, atomic_write_json, fsync_dir
from .backend import to_numpy

FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"


def save_tensors(path, tensors: dict, metadata: dict | None = None) -> None:
    """Arrays (NumPy or CuPy) -> a safetensors file, atomically, written straight from the arrays
    (never the whole file in memory). A failed write (a full disk) is an OSError, as for any file."""
    from safetensors import SafetensorError
    from safetensors.numpy import save_file

    host = {k: np.ascontiguousarray(to_numpy(v)) for k, v in tensors.items()}
    meta = {"format": "pt", **{k: str(v) for k, v in (metadata or {}).items()}}
    with atomic_path(path) as tmp:
        try:
            save_file(host, tmp, metadata=meta)
        except SafetensorError as e:  # the Rust writer's I/O errors: "... (os error 28)"
            code = re.search(r"os error (\d+)", str(e))
            err = int(code.group(1)) if code else errno.EIO
            raise OSError(err, os.strerror(err) if code else str(e), str(path)) from None


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


MODEL_FILES = (MODEL_FILE, CONFIG_FILE)  # what any saved model needs
TRAINING_FILES = (MODEL_FILE, CONFIG_FILE, OPTIMIZER_FILE, STATE_FILE)  # what a resumable checkpoint needs


def verify_manifest(ckpt_dir, required=MODEL_FILES) -> str | None:
    """None when the manifest exists, lists every file in `required`, and every file it lists matches
    its size and sha256; else a one-line reason. A manifest that leaves out a required file verifies
    nothing about it, so it counts as damaged."""
    ckpt_dir = Path(ckpt_dir)
    mpath = ckpt_dir / MANIFEST_FILE
    if not mpath.is_file():
        return f"{ckpt_dir} has no {MANIFEST_FILE} (the save did not finish)"
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
        if not isinstance(files, dict) or not all(isinstance(v, dict) for v in files.values()):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        return f"{mpath} is not a valid manifest"
    unlisted = [name for name in required if name not in files]
    if unlisted:
        return f"{mpath} does not list {', '.join(unlisted)}"
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


# --- the checkpoints of a training run ----------------------------------------------------------------
#
#   run/checkpoints/step-00000004/   one complete checkpoint per saved step (the layout above)
#   run/checkpoints/.tmp-step-.../   a save in progress (removed at the next start if a crash left it)
#
# A checkpoint is "good" when its manifest lists every file a resume needs, every file matches it, and
# its weights are finite. Only good checkpoints count: for --resume, for loading a run, and for
# --keep-last. Nothing that is not good is ever chosen, and cleanup never removes the newest good ones.

CHECKPOINT_DIR = "checkpoints"
# Fault injection for the crash-safety tests: kill this process with SIGKILL in the middle of its N-th
# checkpoint save (after the weights are written, before the manifest and the rename).
CRASH_IN_SAVE_ENV = "NPGPT_TEST_CRASH_IN_SAVE"

_verified: dict = {}  # checkpoint path -> the file stats it was verified with (hashing 124M twice is slow)


def checkpoint_dirs(out_dir) -> list[Path]:
    """step-XXXXXXXX directories of a run, oldest first (good or not)."""
    root = Path(out_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit()]
    return sorted(dirs, key=lambda p: int(p.name[5:]))


def _stats(d: Path) -> tuple:
    return tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(d.iterdir()) if p.is_file())


def checkpoint_problem(d) -> str | None:
    """None when `d` is a good training checkpoint (see above), else a one-line reason. The result is
    remembered for as long as none of its files changes."""
    from .safetensors_io import first_nonfinite

    d = Path(d)
    try:
        stats = _stats(d)
    except OSError as e:
        return f"{d} cannot be read ({e.strerror})"
    if _verified.get(d) == stats:
        return None
    problem = verify_manifest(d, required=TRAINING_FILES) or _state_problem(d)
    if problem is None:
        try:
            problem = first_nonfinite(d / MODEL_FILE)
        except ValueError as e:  # a malformed file whose sha256 was recorded as such
            problem = str(e)
    if problem is None:
        _verified[d] = stats
    return problem


def _state_problem(d: Path) -> str | None:
    """The training state must name the step of its folder (a manifest only proves that the files are
    what was written, and a state edited by hand, with a new manifest, could say anything)."""
    try:
        state = json.loads((d / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return f"{d / STATE_FILE} cannot be read as JSON ({e})"
    step = state.get("step") if isinstance(state, dict) else None
    if isinstance(step, bool) or not isinstance(step, int) or step < 0 or step != int(d.name[5:]):
        return f"{d / STATE_FILE} holds step {step!r}, not the step {int(d.name[5:])} of its folder"
    if not isinstance(state.get("data"), dict) or not isinstance(state.get("optimizer"), dict):
        return f"{d / STATE_FILE} lacks its data position or optimizer state"
    return None


def warn_line(text: str) -> None:
    """A warning as one plain line on stderr (no Python warning machinery, no source line)."""
    print(f"npgpt: warning: {text}", file=sys.stderr)


def good_checkpoints(out_dir, warn=None) -> list[Path]:
    """The good checkpoints of a run, oldest first; `warn(text)` is told about each one skipped."""
    good = []
    for d in checkpoint_dirs(out_dir):
        problem = checkpoint_problem(d)
        if problem is None:
            good.append(d)
        elif warn is not None:
            warn(f"skipping checkpoint {d}: {problem}")
    return good


def latest_checkpoint(out_dir, warn=True) -> Path | None:
    """The newest good checkpoint; damaged newer ones are skipped, with a warning."""
    for d in reversed(checkpoint_dirs(out_dir)):
        problem = checkpoint_problem(d)
        if problem is None:
            return d
        if warn:
            warn_line(f"skipping checkpoint {d}: {problem}; trying the previous one")
    return None


def remove_old_checkpoints(out_dir, keep_last: int, protect=()) -> list[Path]:
    """Delete good checkpoints beyond the newest `keep_last` good ones, and damaged ones older than
    every kept one (no fallback would ever reach them). Damaged checkpoints newer than the oldest kept
    good one stay for inspection (a run that reaches their step replaces them). `protect`: paths never
    removed (the checkpoint a run resumed from, the one it just wrote). Returns what was removed."""
    protect = {Path(p) for p in protect}
    good = good_checkpoints(out_dir)
    kept = set(good[-keep_last:]) | protect
    oldest_kept = min((int(p.name[5:]) for p in kept), default=None)
    removed = [d for d in checkpoint_dirs(out_dir)
               if d not in kept and (d in good or (oldest_kept is not None and int(d.name[5:]) < oldest_kept))]  # fmt: skip
    remove_checkpoints(removed)
    return removed


_removals = itertools.count()


def remove_checkpoints(dirs) -> None:
    """Delete checkpoint folders, each first renamed to a .tmp-* name in one atomic step, so a crash in
    the middle never leaves a half-deleted step-* folder (the next start removes the .tmp-* rest)."""
    for d in dirs:
        d = Path(d)
        trash = d.parent / f".tmp-removed-{d.name}-{os.getpid()}-{next(_removals)}"
        try:
            os.replace(d, trash)
        except FileNotFoundError:
            continue
        _verified.pop(d, None)
        shutil.rmtree(trash, ignore_errors=True)


def replace_dir(src: Path, dst: Path) -> None:
    """Rename the folder src onto dst. An existing dst (a damaged checkpoint of the same step) is first
    renamed out of the way, so at every moment dst is either the old folder, absent, or the new one."""
    if dst.exists():
        remove_checkpoints([dst])
    os.replace(src, dst)


def clean_stray_temporaries(out_dir) -> None:
    """Remove what a crashed save left behind: .tmp-* directories and .*.tmp files."""
    root = Path(out_dir) / CHECKPOINT_DIR
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".tmp-"):
                shutil.rmtree(p, ignore_errors=True)
            elif p.is_dir():
                for f in p.glob(".*.tmp"):
                    f.unlink(missing_ok=True)


def save_training_checkpoint(out_dir, model, optimizer, state: dict, keep_last: int, protect=(), write_model=None) -> Path:
    """Write a complete checkpoint into a temporary directory, verify it, rename it into place, then
    remove old checkpoints (remove_old_checkpoints; the new one and `protect` are never removed).
    write_model(directory): writes model.safetensors and config.json (default: save_model of `model`;
    fine-tuning passes its own, e.g. a classifier's files)."""
    root = Path(out_dir) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    step = state["step"]
    final = root / f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".tmp-step-{step:08d}-"))
    try:
        save_model(tmp, model) if write_model is None else write_model(tmp)
        _maybe_crash_for_tests()
        state = {**state, "optimizer": save_optimizer(tmp, optimizer)}
        atomic_write_json(tmp / STATE_FILE, state)
        write_manifest(tmp, step)
        replace_dir(tmp, final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    problem = checkpoint_problem(final)
    if problem is not None:  # read back wrong (a failing disk): keep everything older
        raise OSError(f"the checkpoint just written does not verify: {problem}")
    remove_old_checkpoints(out_dir, keep_last, protect=(final, *protect))
    return final


_saves_in_this_process = 0


def _maybe_crash_for_tests() -> None:
    global _saves_in_this_process
    _saves_in_this_process += 1
    if os.environ.get(CRASH_IN_SAVE_ENV) == str(_saves_in_this_process):
        os.kill(os.getpid(), signal.SIGKILL)
