"""One run per output folder: a lock that lives as long as the process holding it.

    lock = FolderLock("runs/x")
    lock.acquire()          # FolderBusy (a ValueError) naming the holder: pid, host, command
    ...
    lock.release()
    holder("runs/x")        # who holds it now (a line), or None; creates nothing

The lock is `fcntl.flock` on out_dir/.npgpt-lock. The kernel releases it when its process ends, however
it ends (kill -9 included), so a dead run never leaves a stale lock behind, and nothing needs cleaning
up. The file itself stays (removing a lock file while another process waits on it would let two
processes hold "the" lock); while held it names its holder, so that the run refused can say who.
Where flock is not available (another OS, a network filesystem that refuses it) runs are not locked,
and the first lock taken says so once.
"""

from __future__ import annotations

import errno
import json
import os
import shlex
import socket
import sys
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX
    fcntl = None

LOCK_FILE = ".npgpt-lock"


class FolderBusy(ValueError):
    """Another live run holds the folder (a ValueError: the command line prints it as one line, exit 2)."""


def _command_line() -> str:
    """This process's command as the user typed it: `npgpt train ...` for the console script and for
    python -m npgpt."""
    argv = list(sys.argv)
    first = Path(argv[0]).name if argv else ""
    if first in ("npgpt", "__main__.py") or argv[:1] == ["-m"]:
        argv = ["npgpt", *argv[1:]]
    return shlex.join(argv)


def _describe(text: str) -> str:
    try:
        h = json.loads(text)
        return f"pid {h['pid']} on {h['host']}, started {h['started']}: {h['command']}"
    except (ValueError, KeyError, TypeError):
        return "a process that has not yet said who it is"


def busy_message(out_dir: Path, who: str) -> str:
    return (f"{out_dir} is in use by another run ({who}); two runs in one folder would mix their checkpoints "
            "and metrics. Wait for it to end (or stop it), or choose another --out-dir")  # fmt: skip


def _try_lock(fd: int, shared: bool = False) -> bool:
    """Take the lock on fd without waiting: True, or False when another process holds it. A shared lock
    (holder's look) conflicts only with a run's exclusive one, so the ranks of one MPI job can look at once."""
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise


def holder(out_dir) -> str | None:
    """Who holds out_dir's lock (pid, host, command), or None when no live process does. Creates nothing:
    a folder that was never locked has no lock file, and then nobody holds it."""
    path = Path(out_dir) / LOCK_FILE
    if fcntl is None or not path.is_file():
        return None
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        if _try_lock(fd, shared=True):
            return None  # free (closing the descriptor below lets it go again)
        return _describe(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
    except OSError:  # no flock here: not locked
        return None
    finally:
        os.close(fd)


class FolderLock:
    """The lock of one run's folder (see the module docstring); acquire() once the folder exists."""

    warned = False  # "runs are not locked here" is said once per process

    def __init__(self, out_dir):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> None:
        if fcntl is None or self.fd is not None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        try:
            locked = _try_lock(fd)
        except OSError as e:  # ENOLCK, EOPNOTSUPP: a filesystem without flock
            os.close(fd)
            if not FolderLock.warned:
                FolderLock.warned = True
                print(f"npgpt: warning: {self.out_dir} cannot be locked ({e.strerror}), so nothing stops a second "
                      "run from starting in it", file=sys.stderr)  # fmt: skip
            return
        if not locked:
            who = _describe(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
            os.close(fd)
            raise FolderBusy(busy_message(self.out_dir, who))
        me = {"pid": os.getpid(), "host": socket.gethostname(), "command": _command_line(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        self.fd = fd

    def release(self) -> None:
        """Let the folder go (the kernel does the same when the process ends)."""
        if self.fd is not None:
            try:
                os.ftruncate(self.fd, 0)
            except OSError:
                pass
            os.close(self.fd)
            self.fd = None
