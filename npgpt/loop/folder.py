"""The run's folder: what a run writes there, and when.

    out_dir/
      metrics.jsonl                 one JSON record per step, skipped step, evaluation and error
      checkpoints/step-XXXXXXXX/    checkpoint.py's layout; the newest `keep_last` good ones are kept
      summary.json                  written at the end, and only when it is complete (run.py)
      ...                           the task's own files (loss.png, heldout.tsv, ...)

The rules, the same for every task:
- Nothing in out_dir is created, changed or removed before `RunFolder.open()`, which the loop calls only
  once the task has read and checked everything (settings, data, the checkpoint to resume, memory).
- A folder that holds checkpoints is refused unless the run continues it (--resume) or replaces it
  (--overwrite): find_resume. --resume takes the newest good checkpoint (checkpoint.latest_checkpoint
  skips damaged ones with a warning) and checks the numbers of its trainer_state.json.
- With --overwrite the earlier run's checkpoints are removed only once the new run has written one.
- The checkpoint a run resumed from is never cleaned up before the run has a checkpoint of its own.
- A save that fails (a full disk) is SaveFailed naming the newest checkpoint, which is intact.
Only rank 0 writes under MPI; the other ranks wait at the barriers.

Where later rules go: a lock on out_dir belongs in open() and close(); "nothing of the earlier run is
touched until the new run's first checkpoint is complete" in open() (metrics.jsonl) and save() (the
replaced checkpoints); falling back past a checkpoint whose contents do not fit in find_resume.
"""

from __future__ import annotations

import json
from pathlib import Path

from .. import checkpoint as ckpt
from ..atomic import atomic_write_bytes, atomic_write_json, explain_os_error
from ..checkpoint import (CHECKPOINT_DIR, checkpoint_dirs, clean_stray_temporaries, latest_checkpoint, remove_checkpoints,
                          save_training_checkpoint)  # fmt: skip
from ..metrics import MetricsLog
from .errors import SaveFailed


def find_resume(out_dir, resume: bool, overwrite: bool, warn: bool = True) -> tuple[Path | None, dict | None]:
    """(the checkpoint to resume, its training state), or (None, None) for a run that starts afresh.
    Reads only small files; refuses (ValueError) a folder that holds an earlier run unless --resume or
    --overwrite says what to do with it, and --resume without a good checkpoint."""
    out_dir = Path(out_dir)
    if not resume and not overwrite and checkpoint_dirs(out_dir):
        raise ValueError(f"{out_dir} already holds checkpoints of an earlier run; pass --resume to continue it, "
                         "--overwrite to start again there (its checkpoints are replaced), or choose another --out-dir")  # fmt: skip
    if not resume:
        return None, None
    resume_dir = latest_checkpoint(out_dir, warn=warn)
    if resume_dir is None:
        raise ValueError(f"--resume: no complete checkpoint in {out_dir / CHECKPOINT_DIR}; start without --resume")
    state = json.loads((resume_dir / ckpt.STATE_FILE).read_text(encoding="utf-8"))
    check_training_state(state, resume_dir)
    return resume_dir, state


def check_training_state(state, resume_dir: Path) -> None:
    """The numbers a resume relies on, read from trainer_state.json (the manifest only says that the file
    is what was written, not that what was written makes sense)."""

    def bad(what):
        return ValueError(f"{resume_dir / ckpt.STATE_FILE} {what}; the file was edited or written by another program. "
                          "Remove that checkpoint folder to resume from the one before it")  # fmt: skip

    if not isinstance(state, dict):
        raise bad("is not a JSON object")
    for key in ("step", "tokens_seen", "skipped_steps"):
        v = state.get(key, 0)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise bad(f"holds {key} = {v!r}, not a whole number >= 0")
    for key in ("data", "optimizer"):
        if not isinstance(state.get(key), dict):
            raise bad(f"has no valid {key!r} entry")


class RunFolder:
    """The files of one run in out_dir (see the module docstring). `world`: distributed.py's world (only
    its rank 0 writes); resume_dir: the checkpoint the run continues, or None."""

    def __init__(self, out_dir, keep_last: int, world, resume_dir: Path | None = None):
        self.out_dir, self.keep_last, self.world = Path(out_dir), keep_last, world
        self.resume_dir = resume_dir
        self.last_ckpt: Path | None = resume_dir  # the newest good checkpoint of this run
        self.replaced: list[Path] = []  # --overwrite: the earlier run's checkpoints, removed at the first save
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self.metrics: MetricsLog | None = None

    def open(self, resume_step: int | None) -> None:
        """The run is valid: create the folder, remove what a crashed save left, open metrics.jsonl (kept up
        to resume_step, else started afresh)."""
        self.replaced = checkpoint_dirs(self.out_dir) if resume_step is None else []
        if self.world.is_root:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            clean_stray_temporaries(self.out_dir)
        self.world.barrier()
        self.metrics = MetricsLog(self.metrics_path, resume_at=resume_step, enabled=self.world.is_root)

    def log(self, record: dict) -> None:
        self.metrics.write(record)

    def save(self, step: int, optimizer, state: dict, write_model) -> None:
        """A checkpoint of `step` (rank 0 writes, every rank waits): write_model(directory) writes the model's
        files, the loop gives the optimizer and the training state. Old checkpoints are then cleaned up by
        checkpoint.py's rules; the earlier run's (--overwrite) go once this one exists."""
        if self.world.is_root:
            # until this run has a checkpoint of its own, the one it resumed from is never cleaned up
            protect = [self.resume_dir] if self.resume_dir is not None and self.last_ckpt == self.resume_dir else []
            try:
                self.last_ckpt = save_training_checkpoint(self.out_dir, None, optimizer, state, self.keep_last,
                                                          protect=protect, write_model=write_model)  # fmt: skip
            except OSError as e:
                kept = f"the newest checkpoint is still {self.last_ckpt}" if self.last_ckpt else "no checkpoint was written"
                raise SaveFailed(f"the checkpoint of step {step} could not be written: {explain_os_error(e)}; {kept}") from None
            if self.replaced:
                remove_checkpoints([d for d in self.replaced if d != self.last_ckpt])
                self.replaced = []
        self.world.barrier()

    def write_text(self, name: str, text: str) -> Path:
        """A file of the run (rank 0), atomically."""
        path = self.out_dir / name
        if self.world.is_root:
            atomic_write_bytes(path, text.encode("utf-8"))
        return path

    def write_summary(self, summary: dict) -> None:
        if self.world.is_root:
            atomic_write_json(self.out_dir / "summary.json", summary)

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
