"""Atomic file writes: a crash, a full disk or a kill -9 leaves either the old file or the new one, never half.

    with atomic_path("out/metrics.jsonl") as tmp:   # write tmp; it is flushed and renamed onto the path
        ...
    atomic_write_json("out/summary.json", {...})

Used by checkpoints (checkpoint.py), the token cache (data.py) and the run's metrics and summary.

Permissions are those of an ordinary file: a new file gets 0666 and a new folder 0777, less the umask
(tempfile's own 0600 / 0700 would hide a shared run's checkpoints from the other accounts), and a file
that is replaced keeps the mode it had.
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


def current_umask() -> int:
    """The process's umask, read without changing it where Linux shows it (/proc/self/status), else by
    setting and restoring it at once."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def ordinary_mode(path: Path, folder: bool = False) -> int:
    """The mode `path` would have if it were created (or rewritten) the ordinary way: an existing file
    keeps its own, a new one gets 0666 (a folder 0777) less the umask."""
    try:
        return os.stat(path).st_mode & 0o7777
    except OSError:
        return (0o777 if folder else 0o666) & ~current_umask()


def make_temp_dir(parent: Path, prefix: str) -> Path:
    """A new folder in `parent` with a unique name starting with `prefix`, its mode that of an ordinary new
    folder (tempfile.mkdtemp's is 0700)."""
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
    try:
        os.chmod(tmp, 0o777 & ~current_umask())
    except OSError:  # a filesystem without modes
        pass
    return tmp


@contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path` to write; on success it is flushed to disk and renamed onto
    `path`, so a crash leaves either the old file or the new one, never half; on failure it is removed."""
    path = Path(path)
    mode = ordinary_mode(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        try:
            os.chmod(tmp, mode)  # mkstemp's 0600 (or a writer's own) would survive the rename
        except OSError:  # a filesystem without modes (FAT, some network mounts)
            pass
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


def cwd_gone() -> bool:
    """Whether the current folder has been deleted (then every relative path fails with "No such file")."""
    try:
        os.getcwd()
        return False
    except FileNotFoundError:
        return True


def explain_os_error(e: OSError) -> str:
    """One line for an error of the environment (disk, permissions), with what to do about it."""
    where = f" ({e.filename})" if getattr(e, "filename", None) else ""
    text = (e.strerror or str(e)) + where
    if e.errno == errno.ENOENT and cwd_gone():
        return f"{text}: the current folder no longer exists (it was deleted); cd into a folder that exists"
    if e.errno == errno.ENOENT and not where:
        return f"{text}: a file or folder it needed was removed while it ran (the current folder is {os.getcwd()})"
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return f"{text}; free some space (or choose another --out-dir) and run again"
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"{text}; choose a folder you can write to"
    return text
