"""Standard output (and error) whose reader may leave: `npgpt train ... | head`, or a `less` the user quits.

Python ignores SIGPIPE, so once the reader of a pipe has gone every later print raises BrokenPipeError. Left
alone, that error would end a training run at its next log line, before its summary (and, mid-run, before
its next checkpoint). Instead, the first broken write points the file descriptor at /dev/null and the run
goes on to its end exactly as it would have; the command says once, on stderr, that its output was cut.
A command whose output is its product (`npgpt generate`) checks `reader_left` and stops early instead.
"""

from __future__ import annotations

import contextlib
import os
import sys


class ReaderMayLeave:
    """A stand-in for sys.stdout that turns a broken pipe into silence (everything else is the stream's)."""

    def __init__(self, stream):
        self._stream = stream
        self.reader_left = False

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._leave()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._leave()

    def _leave(self) -> None:
        """Point the stream's descriptor at /dev/null, so that what it still buffers (and the interpreter's
        last flush at exit) writes there instead of raising again."""
        self.reader_left = True
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, self._stream.fileno())
        finally:
            os.close(devnull)

    def __getattr__(self, name):
        return getattr(self._stream, name)


@contextlib.contextmanager
def output_reader_may_leave(name: str):
    """Within: sys.stdout and sys.stderr (tqdm's progress: `2>&1 | head`) survive their reader leaving.
    After: both are restored, and `name` (the command) says on stderr that its output was cut, when it was
    and stderr still has a reader."""
    streams = sys.stdout, sys.stderr
    guarded = [None if s is None else ReaderMayLeave(s) for s in streams]  # None: started closed (>&-), stays so
    sys.stdout, sys.stderr = guarded
    try:
        yield guarded
    finally:
        if sys.stderr is not None and any(g is not None and g.reader_left for g in guarded):
            print(f"{name}: its output's reader left (a pipe's end was closed); nothing more was printed",
                  file=sys.stderr)
        sys.stdout, sys.stderr = streams
