"""Checking arguments before anything is touched: numbers in range and paths that can be used, each
refusal a ValueError that names the flag, the value and the fix (the CLI prints it as one line, exit 2).

    integer("--batch-size", 0, lo=1)             # ValueError: --batch-size must be at least 1, got 0
    real("--lr", float("inf"), lo=0, lo_open=True)  # ValueError: --lr must be a finite number > 0, got inf
    out_dir("--out-dir", "runs/x")               # a folder that is (or can be made) writable; not created
    out_file("--json", "bench.json")             # a file that can be written; not created

These only read: a run's files are never created, changed or removed here. They are used by
npgpt.train.TrainConfig.validate, npgpt.finetune.FinetuneConfig.validate, the `npgpt generate | bench |
gradcheck | classify` commands and seq2seq.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from .atomic import cwd_gone


def integer(flag: str, value, lo: int | None = None, hi: int | None = None, hint: str = "") -> int:
    """`value` as an int in [lo, hi] (either bound may be None); bool and float are refused."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{flag} must be a whole number, got {value!r}" + (f"; {hint}" if hint else ""))
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        if hi is None:
            rng = f"at least {lo}"
        elif lo is None:
            rng = f"at most {hi}"
        else:
            rng = f"between {lo} and {hi}"
        raise ValueError(f"{flag} must be {rng}, got {value}" + (f"; {hint}" if hint else ""))
    return value


def real(flag: str, value, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
         hi_open: bool = False, hint: str = "") -> float:  # fmt: skip
    """`value` as a finite float in the interval given (open at a bound with lo_open / hi_open)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{flag} must be a number, got {value!r}" + (f"; {hint}" if hint else ""))
    value = float(value)
    bad = not math.isfinite(value)
    bad |= lo is not None and (value <= lo if lo_open else value < lo)
    bad |= hi is not None and (value >= hi if hi_open else value > hi)
    if bad:
        parts = []
        if lo is not None:
            parts.append(f"{'>' if lo_open else '>='} {lo:g}")
        if hi is not None:
            parts.append(f"{'<' if hi_open else '<='} {hi:g}")
        raise ValueError(f"{flag} must be a finite number{' ' + ' and '.join(parts) if parts else ''}, got {value:g}"
                         + (f"; {hint}" if hint else ""))  # fmt: skip
    return value


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _writable(folder: Path) -> bool:
    """Whether files can be created in the existing folder `folder` (a read-only filesystem is not)."""
    if not os.access(folder, os.W_OK | os.X_OK):
        return False
    try:
        return not (os.statvfs(folder).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return True


def not_empty(flag: str, path, what: str) -> None:
    """An empty path ("") would mean the current folder; refuse it by name."""
    if not str(path).strip():
        raise ValueError(f"{flag} is empty; give {what}")


def a_path(flag: str, path, what: str) -> None:
    """`path` can be used as a path: not empty, and not relative to a current folder that has been deleted
    (every use of it would fail with a bare "No such file or directory")."""
    not_empty(flag, path, what)
    if not Path(path).expanduser().is_absolute() and cwd_gone():
        raise ValueError(f"{flag} {path} is relative to the current folder, which no longer exists (it was deleted); "
                         "cd into a folder that exists, or give an absolute path")  # fmt: skip


def out_dir(flag: str, path) -> Path:
    """A folder for a run's output: it exists as a writable folder, or can be created as one (its
    nearest existing ancestor is a writable folder). Nothing is created."""
    a_path(flag, path, "a folder (e.g. runs/x; it is created if needed)")
    return _folder_to_write(flag, path, "give a folder (it is created if needed)", f"choose another {flag}")


def _folder_to_write(flag: str, path, give_folder: str, choose: str) -> Path:
    """`path` as a folder that is, or can be made, writable (out_dir, cache_dir); each refusal names the
    problem and ends with the caller's fix (`give_folder` for a file given, `choose` otherwise)."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path} is a file, not a folder; {give_folder}")
    base = _nearest_existing(path)
    if not base.is_dir():
        raise ValueError(f"{flag} {path} lies below {base}, which is a file, not a folder; {choose}")
    if not _writable(base):
        what = "the folder" if base == path else f"its parent {base}"
        raise ValueError(f"{flag} {path}: {what} is not writable (read-only filesystem or no permission); {choose}")
    return path


def out_file(flag: str, path) -> Path:
    """A file to write: not a folder, in an existing writable folder. Nothing is created."""
    a_path(flag, path, "a file name")
    path = Path(path).expanduser()
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a folder; give a file name (e.g. {path / 'result.json'})")
    parent = path.parent
    if not parent.exists():
        base = _nearest_existing(parent)
        if not base.is_dir():
            raise ValueError(f"{flag} {path} lies below {base}, which is a file, not a folder; choose another {flag}")
        raise ValueError(f"{flag} {path}: the folder {parent} does not exist; create it or choose another {flag}")
    if not parent.is_dir():
        raise ValueError(f"{flag} {path} lies below {parent}, which is a file, not a folder; choose another {flag}")
    if not _writable(parent) or (path.exists() and not os.access(path, os.W_OK)):
        raise ValueError(f"{flag} {path} cannot be written (read-only filesystem or no permission); choose another {flag}")
    return path


def cache_dir(flag: str, path) -> Path:
    """A folder for a cache: like out_dir (a folder that is, or can be made, writable); `flag` may name an
    environment variable ("NPGPT_CACHE_DIR=...")."""
    a_path(flag, path, "a folder")
    fix = "give a folder you can write to for the token cache"
    return _folder_to_write(flag, path, "give a folder for the token cache", fix)


def in_path(flag: str, path, what: str = "a file or folder") -> Path:
    """An existing path to read."""
    a_path(flag, path, what)
    path = Path(path).expanduser()
    if not path.exists():
        raise ValueError(f"{flag} {path} does not exist; give {what}")
    return path
