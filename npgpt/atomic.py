"""Atomic file writes: a crash, a full disk or a kill -9 leaves either the old file or the new one, never half.

    with atomic_path("out/metrics.jsonl") as tmp:   # write tmp; it is flushed and renamed onto the path
        ...
    atomic_write_json("out/summary.json", {...})

Used by checkpoints (checkpoint.py), the token cache (data.py) and the run's metrics and summary.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path


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


def explain_os_error(e: OSError) -> str:
    """One line for an error of the environment (disk, permissions), with what to do about it."""
    where = f" ({e.filename})" if getattr(e, "filename", None) else ""
    text = (e.strerror or str(e)) + where
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return f"{text}; free some space (or choose another --out-dir) and run again"
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"{text}; choose a folder you can write to"
    return text
