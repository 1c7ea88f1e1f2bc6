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
import math
import os
import re
import shutil
import signal
import sys
from pathlib import Path

import numpy as np

from .atomic import atomic_path, atomic_write_json, fsync_dir, make_temp_dir
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
        stats = (_stats(ckpt_dir), tuple(required))
    except OSError as e:
        return f"{ckpt_dir} cannot be read ({e.strerror})"
    if _manifest_verified.get(ckpt_dir) == stats:  # (hashing 124M twice is slow: checked, then loaded)
        return None
    problem = _manifest_problem(ckpt_dir, mpath, required)
    if problem is None:
        _manifest_verified[ckpt_dir] = stats
    return problem


def refuse_if_damaged(directory: Path) -> None:
    """ValueError when `directory` has a manifest (a checkpoint npgpt wrote) that its files do not match:
    what every loader (GPT, classifier, seq2seq) checks before it reads the weights."""
    if (Path(directory) / MANIFEST_FILE).is_file():
        problem = verify_manifest(directory)
        if problem is not None:
            raise ValueError(f"refusing a damaged checkpoint: {problem}")


_manifest_verified: dict = {}  # checkpoint path -> (file stats, required) it was verified with


def _manifest_problem(ckpt_dir: Path, mpath: Path, required) -> str | None:
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
            problem = _tensors_problem(d) or first_nonfinite(d / MODEL_FILE)
        except ValueError as e:  # a malformed file whose sha256 was recorded as such
            problem = str(e)
    if problem is None:
        _verified[d] = stats
    return problem


def _whole(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def training_state_problem(state, step: int | None = None) -> str | None:
    """Why a trainer_state.json cannot be what the loop wrote (a manifest only proves that the files are
    what was written, and a state edited by hand, with a new manifest, could say anything), or None.
    step: the step of its folder, which the state must name."""
    if not isinstance(state, dict):
        return "is not a JSON object"
    if not _whole(state.get("step")):
        return f"holds step {state.get('step')!r}, not a whole number >= 0"
    if step is not None and state["step"] != step:
        return f"holds step {state['step']}, not the step {step} of its folder"
    for key in ("tokens_seen", "skipped_steps"):
        if key in state and not _whole(state[key]):
            return f"holds {key} = {state[key]!r}, not a whole number >= 0"
    if not isinstance(state.get("data"), dict) or not isinstance(state.get("optimizer"), dict):
        return "lacks its data position or optimizer state"
    for key, v in state["data"].items():
        if key in ("epoch", "cursor", "seed", "batch_size") and not _whole(v):
            return f"holds the data position's {key} = {v!r}, not a whole number >= 0"
    opt = state["optimizer"]
    if not _whole(opt.get("t")) or opt["t"] > state["step"]:
        return f"holds the optimizer's step count t = {opt.get('t')!r}, not a whole number from 0 to the step {state['step']}"
    for key in ("lr", "eps", "weight_decay"):
        if key in opt and not (_finite(opt[key]) and opt[key] >= 0):
            return f"holds the optimizer's {key} = {opt[key]!r}, not a finite number >= 0"
    if "betas" in opt and not (isinstance(opt["betas"], list) and len(opt["betas"]) == 2 and all(_finite(b) for b in opt["betas"])):
        return f"holds the optimizer's betas = {opt['betas']!r}, not two numbers"
    if "decay" in opt and not (isinstance(opt["decay"], dict) and all(isinstance(v, bool) for v in opt["decay"].values())):
        return "holds an optimizer decay entry that is not a map of parameter names to true / false"
    if "since_eval" in state and not (isinstance(state["since_eval"], list) and all(_finite(v) for v in state["since_eval"])):
        return "holds since_eval that is not a list of finite losses"
    if state.get("train_loss") is not None and not _finite(state["train_loss"]):
        return f"holds train_loss = {state['train_loss']!r}, not a finite number"
    history = state.get("history", {})
    points = history.values() if isinstance(history, dict) else None
    if points is None or not all(isinstance(p, list) and all(_point(x) for x in p) for p in points):
        return "holds a history that is not lists of (step or epoch, value) points"
    return None


def _point(x) -> bool:
    """A point of a run's history: [step or epoch, value] or [step, tokens, value] (the value may be NaN)."""
    numbers = isinstance(x, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in x)
    return numbers and len(x) in (2, 3) and _whole(x[0])


def _state_problem(d: Path) -> str | None:
    try:
        state = json.loads((d / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return f"{d / STATE_FILE} cannot be read as JSON ({e})"
    problem = training_state_problem(state, int(d.name[5:]))
    return f"{d / STATE_FILE} {problem}" if problem else None


def _tensors_problem(d: Path) -> str | None:
    """What the headers of the two tensor files say against each other: every weight and moment is floating
    point (a file cast to integers, with a manifest written for it, is damaged, not good), and AdamW's
    moments come in m./v. pairs shaped like the weights they belong to."""
    from .safetensors_io import FLOAT_DTYPES, read_header

    weights, _, _ = read_header(d / MODEL_FILE)
    moments, _, _ = read_header(d / OPTIMIZER_FILE)
    for path, tensors in ((d / MODEL_FILE, weights), (d / OPTIMIZER_FILE, moments)):
        for name, (dtype, *_) in tensors.items():
            if dtype not in FLOAT_DTYPES:
                return f"{path} holds {name} as {dtype}, not floating point; the file was altered"
    shapes = {name.removeprefix("transformer."): shape for name, (_, shape, *_) in weights.items()}
    names = {"m": set(), "v": set()}
    for name, (_, shape, *_) in moments.items():
        which, _, param = name.partition(".")
        if which not in names or param not in shapes:
            return f"{d / OPTIMIZER_FILE} holds {name}, which is no moment of a weight in {MODEL_FILE}"
        if shape != shapes[param]:
            return f"{d / OPTIMIZER_FILE} holds {name} of shape {shape}, but the weight {param} has shape {shapes[param]}"
        names[which].add(param)
    if names["m"] != names["v"]:
        odd = sorted(names["m"] ^ names["v"])[0]
        return f"{d / OPTIMIZER_FILE} holds only one of the two moments of {odd}"
    decay = json.loads((d / STATE_FILE).read_text(encoding="utf-8"))["optimizer"].get("decay")
    if decay is not None and set(decay) != names["m"]:
        return f"{d / STATE_FILE}: the optimizer's decay entry names other parameters than {OPTIMIZER_FILE} holds"
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


def aside_name(dst: Path) -> Path:
    """Where replace_dir keeps the folder it replaces until the new one has its name."""
    return dst.parent / f".tmp-replaced-{dst.name}"


def replace_dir(src: Path, dst: Path) -> None:
    """Rename the folder src onto dst. An existing dst (a damaged checkpoint of the same step, or one of the
    run an --overwrite replaces) is first renamed aside (aside_name), then src takes its name, then the old
    one is deleted: at every moment one complete folder holds dst's contents, under dst or under the aside
    name, which the next start renames back if dst is missing (clean_stray_temporaries)."""
    aside = None
    if dst.exists():
        aside = aside_name(dst)
        shutil.rmtree(aside, ignore_errors=True)  # (a stale one: the next start restores or removes them)
        os.replace(dst, aside)
        _verified.pop(dst, None)
        crash_point("aside")
    os.replace(src, dst)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def clean_stray_temporaries(out_dir) -> None:
    """Remove what a crashed save left behind: .tmp-* directories and .*.tmp files; a folder that
    replace_dir had put aside comes back when nothing took its name."""
    root = Path(out_dir) / CHECKPOINT_DIR
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".tmp-replaced-step-") and not (root / p.name.removeprefix(".tmp-replaced-")).exists():
                os.replace(p, root / p.name.removeprefix(".tmp-replaced-"))
            elif p.name.startswith(".tmp-"):
                shutil.rmtree(p, ignore_errors=True)
            elif p.is_dir():
                for f in p.glob(".*.tmp"):
                    f.unlink(missing_ok=True)


def save_training_checkpoint(out_dir, model, optimizer, state: dict, keep_last: int, protect=(), write_model=None,
                             before_rename=None) -> Path:  # fmt: skip
    """Write a complete checkpoint into a temporary directory, verify it, rename it into place, then
    remove old checkpoints (remove_old_checkpoints; the new one and `protect` are never removed).
    write_model(directory): writes model.safetensors and config.json (default: save_model of `model`;
    fine-tuning passes its own, e.g. a classifier's files). before_rename(tmp, final): called once the
    temporary directory is complete, before it takes its name (the run folder's --overwrite commit)."""
    root = Path(out_dir) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    step = state["step"]
    final = root / f"step-{step:08d}"
    tmp = make_temp_dir(root, f".tmp-step-{step:08d}-")
    try:
        save_model(tmp, model) if write_model is None else write_model(tmp)
        _maybe_crash_for_tests()
        state = {**state, "optimizer": save_optimizer(tmp, optimizer)}
        atomic_write_json(tmp / STATE_FILE, state)
        write_manifest(tmp, step)
        if before_rename is not None:
            before_rename(tmp, final)
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


# Fault injection for the crash-safety tests of an --overwrite commit (loop/folder.py) and of replace_dir:
# kill this process with SIGKILL at the named point.
CRASH_AT_ENV = "NPGPT_TEST_CRASH_AT"


def crash_point(name: str) -> None:
    if os.environ.get(CRASH_AT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


_saves_in_this_process = 0


def _maybe_crash_for_tests() -> None:
    global _saves_in_this_process
    _saves_in_this_process += 1
    if os.environ.get(CRASH_IN_SAVE_ENV) == str(_saves_in_this_process):
        os.kill(os.getpid(), signal.SIGKILL)
