"""The run's folder: what a run writes there, and when.

    out_dir/
      metrics.jsonl                 one JSON record per step, skipped step, evaluation and error
      checkpoints/step-XXXXXXXX/    checkpoint.py's layout; the newest `keep_last` good ones are kept
      summary.json                  written at the end, and only when it is complete (run.py)
      ...                           the task's own files (loss.png, heldout.tsv, ...)
      .npgpt-lock                   the lock of the run that holds the folder (lock.py)
      .pending/                     --overwrite: the new run's files until its first checkpoint

The rules, the same for every task:
- Nothing in out_dir is created, changed or removed before `RunFolder.open()`, which the loop calls only
  once the task has read and checked everything (settings, data, the checkpoint to resume, memory).
- One run per folder: open() takes the folder's lock (lock.py), which the kernel drops when the process
  ends, however it ends; a second run is refused, naming the first (pid, host, command). find_resume
  already refuses a folder whose lock is held, before the task reads its data.
- A folder that holds checkpoints is refused unless the run continues it (--resume) or replaces it
  (--overwrite). --resume takes the newest checkpoint that is good (checkpoint.py: the manifest verifies,
  the training state and the tensor files agree, the weights are finite) and whose contents the task
  accepts (its check: the config against the weights); each one passed over is named in a warning.
- --overwrite (any run that starts afresh where an earlier one left files): nothing of the earlier run is
  removed or rewritten until the new run's first checkpoint is complete. Until then the new run's
  metrics.jsonl and its first files (heldout.tsv) live in .pending/. The first save commits: the new
  checkpoint is renamed into place (an earlier one of the same step is put aside, not deleted), the
  earlier checkpoints are removed, the pending files moved into place, the earlier summary.json and the
  task's outputs (plots, tables) removed. A commit interrupted by a crash is finished, or undone when the
  new checkpoint is not complete, by the next start in the folder (recover), so at every moment the
  folder holds at least one good checkpoint and one run's history, never a splice of two.
- The checkpoint a run resumed from is never cleaned up before the run has a checkpoint of its own.
- A save that fails (a full disk) is SaveFailed naming the newest checkpoint, which is intact.
Only rank 0 writes under MPI; the other ranks wait at the barriers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..atomic import atomic_write_bytes, atomic_write_json, explain_os_error, fsync_dir
from ..checkpoint import (CHECKPOINT_DIR, MANIFEST_FILE, STATE_FILE, checkpoint_dirs, checkpoint_problem,
                          clean_stray_temporaries, crash_point, remove_checkpoints, save_training_checkpoint, sha256_file,
                          warn_line)  # fmt: skip
from ..metrics import MetricsLog
from .errors import SaveFailed
from .lock import FolderBusy, FolderLock, busy_message, holder

PENDING_DIR = ".pending"  # --overwrite: the new run's files until its first checkpoint is complete
COMMIT_FILE = "commit.json"  # in PENDING_DIR: the commit in progress (which checkpoint is the new run's)
RUN_FILES = ("metrics.jsonl", "summary.json")  # the files of every run (besides its checkpoints and the task's)


def find_resume(out_dir, resume: bool, overwrite: bool, warn: bool = True, check=None) -> tuple[Path | None, dict | None]:
    """(the checkpoint to resume, its training state), or (None, None) for a run that starts afresh.
    Reads only small files (and the tensor files' headers); refuses (ValueError) a folder that another
    live run holds, a folder that holds an earlier run unless --resume or --overwrite says what to do with
    it, and --resume without a usable checkpoint. check(directory, state) -> a reason or None: the task's
    own test of a checkpoint's contents; the newest checkpoint that passes it and checkpoint.py's is taken,
    each newer one named in a warning."""
    out_dir = Path(out_dir)
    who = holder(out_dir)
    if who is not None:
        raise FolderBusy(busy_message(out_dir, who))
    if not resume and not overwrite and checkpoint_dirs(out_dir):
        raise ValueError(f"{out_dir} already holds checkpoints of an earlier run; pass --resume to continue it, "
                         "--overwrite to start again there (its checkpoints are replaced), or choose another --out-dir")  # fmt: skip
    if not resume:
        return None, None
    for d in reversed(run_checkpoints(out_dir)):
        state, problem = None, checkpoint_problem(d)
        if problem is None:
            state = json.loads((d / STATE_FILE).read_text(encoding="utf-8"))
            problem = check(d, state) if check is not None else None
        if problem is None:
            return d, state
        if warn:
            warn_line(f"skipping checkpoint {d}: {problem}; trying the previous one")
    raise ValueError(f"--resume: no complete checkpoint in {out_dir / CHECKPOINT_DIR}; start without --resume")


# --- --overwrite: the commit of a new run over an earlier one ----------------------------------------------


def _commit_in_progress(out_dir: Path) -> dict | None:
    """The marker of a commit that a crash interrupted (.pending/commit.json), or None."""
    try:
        commit = json.loads((out_dir / PENDING_DIR / COMMIT_FILE).read_text(encoding="utf-8"))
        return commit if isinstance(commit, dict) and isinstance(commit.get("new"), str) else None
    except (OSError, ValueError):
        return None


def _new_in_place(out_dir: Path, commit: dict | None) -> Path | None:
    """The commit's new checkpoint when it has taken its name (good or not), else None. The earlier run may
    have a checkpoint of the same name (the same step): the new one is told from it by its manifest's
    sha256, kept in the marker."""
    if commit is None:
        return None
    new = out_dir / CHECKPOINT_DIR / commit["new"]
    try:
        return new if sha256_file(new / MANIFEST_FILE) == commit.get("manifest") else None
    except OSError:
        return None


def _placed(out_dir: Path, commit: dict | None) -> bool:
    """Whether the commit's new checkpoint is in place and good."""
    new = _new_in_place(out_dir, commit)
    return new is not None and checkpoint_problem(new) is None


def run_checkpoints(out_dir) -> list[Path]:
    """The checkpoints of the run that owns the folder, oldest first (good or not): checkpoint_dirs, less
    an earlier run's that an interrupted commit had yet to remove (recover() removes them at the next
    start; this is the same view without writing anything)."""
    out_dir = Path(out_dir)
    commit = _commit_in_progress(out_dir)
    if _placed(out_dir, commit):
        return [out_dir / CHECKPOINT_DIR / commit["new"]]
    return checkpoint_dirs(out_dir)


def recover(out_dir) -> None:
    """Finish, or undo, what a crash left of a run that started afresh over an earlier one (.pending/):
    its commit goes on when its new checkpoint is complete (the marker names it), else the new run's
    files go and the earlier run is as it was (a checkpoint of the same step that had been put aside is
    renamed back)."""
    out_dir = Path(out_dir)
    pending = out_dir / PENDING_DIR
    if not pending.is_dir():
        return
    commit = _commit_in_progress(out_dir)
    if _placed(out_dir, commit):
        _roll_forward(out_dir, commit)
        return
    damaged = _new_in_place(out_dir, commit)  # the new checkpoint did not take its name, or took it damaged
    if damaged is not None:
        remove_checkpoints([damaged])
    clean_stray_temporaries(out_dir)  # (which renames an aside folder back when its name is free)
    shutil.rmtree(pending, ignore_errors=True)


def _roll_forward(out_dir: Path, commit: dict) -> None:
    """The commit's steps after its checkpoint is in place, each safe to repeat."""
    pending = out_dir / PENDING_DIR
    remove_checkpoints([d for d in checkpoint_dirs(out_dir) if d.name != commit["new"]])
    crash_point("commit-removed")
    for name in commit.get("pending", []):
        if (pending / name).exists():
            (pending / name).replace(out_dir / name)
    crash_point("commit-moved")
    for name in commit.get("remove", []):
        (out_dir / name).unlink(missing_ok=True)
    fsync_dir(out_dir)
    (pending / COMMIT_FILE).unlink(missing_ok=True)
    shutil.rmtree(pending, ignore_errors=True)
    clean_stray_temporaries(out_dir)


class RunFolder:
    """The files of one run in out_dir (see the module docstring). `world`: distributed.py's world (only
    its rank 0 writes); resume_dir: the checkpoint the run continues, or None; files: name -> text,
    written when the run starts afresh; outputs: the names of the files the task writes at its end
    (plots, tables), which an earlier run's commit removes with its summary.json."""

    def __init__(self, out_dir, keep_last: int, world, resume_dir: Path | None = None, files: dict | None = None,
                 outputs=()):  # fmt: skip
        self.out_dir, self.keep_last, self.world = Path(out_dir), keep_last, world
        self.resume_dir = resume_dir
        self.files, self.outputs = dict(files or {}), tuple(outputs)
        self.last_ckpt: Path | None = resume_dir  # the newest good checkpoint of this run
        self.pending = False  # an earlier run stays until this run's first checkpoint (see the module docstring)
        self.lock = FolderLock(self.out_dir)
        self.metrics: MetricsLog | None = None

    @property
    def metrics_path(self) -> Path:
        return self.out_dir / (f"{PENDING_DIR}/metrics.jsonl" if self.pending else "metrics.jsonl")

    def open(self, resume_step: int | None) -> None:
        """The run is valid: create the folder and take its lock, finish what a crash left (recover, stray
        temporaries), open metrics.jsonl (kept up to resume_step, else started afresh: in .pending/ while an
        earlier run's files are there) and write the run's first files."""
        busy = None
        if self.world.is_root:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            try:
                self.lock.acquire()
            except FolderBusy as e:
                busy = str(e)
        busy = self.world.broadcast_obj(busy)  # every rank stops, not only the one that wrote nothing
        if busy is not None:
            raise FolderBusy(busy)
        if self.world.is_root:
            recover(self.out_dir)
            clean_stray_temporaries(self.out_dir)
            if resume_step is None:
                names = (*RUN_FILES, *self.outputs, *self.files)
                self.pending = bool(checkpoint_dirs(self.out_dir)) or any((self.out_dir / n).exists() for n in names)
                if self.pending:
                    (self.out_dir / PENDING_DIR).mkdir()
                for name, text in self.files.items():
                    atomic_write_bytes(self.metrics_path.parent / name, text.encode("utf-8"))
        self.world.barrier()
        self.metrics = MetricsLog(self.metrics_path, resume_at=resume_step, enabled=self.world.is_root)

    def log(self, record: dict) -> None:
        self.metrics.write(record)

    def save(self, step: int, optimizer, state: dict, write_model) -> None:
        """A checkpoint of `step` (rank 0 writes, every rank waits): write_model(directory) writes the model's
        files, the loop gives the optimizer and the training state. Old checkpoints are then cleaned up by
        checkpoint.py's rules; the first save of a run that replaces an earlier one commits (_mark_commit,
        _roll_forward)."""
        if self.world.is_root:
            # until this run has a checkpoint of its own, the one it resumed from is never cleaned up
            protect = [self.resume_dir] if self.resume_dir is not None and self.last_ckpt == self.resume_dir else []
            try:
                self.last_ckpt = save_training_checkpoint(self.out_dir, None, optimizer, state, self.keep_last,
                                                          protect=protect, write_model=write_model,
                                                          before_rename=self._mark_commit if self.pending else None)  # fmt: skip
            except OSError as e:
                if self.pending:  # the earlier run stays as it was
                    self._undo_commit()
                kept = f"the newest checkpoint is still {self.last_ckpt}" if self.last_ckpt else "no checkpoint was written"
                raise SaveFailed(f"the checkpoint of step {step} could not be written: {explain_os_error(e)}; {kept}") from None
            if self.pending:
                crash_point("commit-placed")
                _roll_forward(self.out_dir, _commit_in_progress(self.out_dir))
                self.pending = False
        self.world.barrier()

    def _mark_commit(self, tmp: Path, final: Path) -> None:
        """Before the first checkpoint of a run that replaces an earlier one takes its name: the marker that
        lets recover() tell, after a crash, the new run's checkpoint from the earlier run's (by the sha256 of its
        manifest: the earlier run may have a checkpoint of the same step)."""
        pending = self.out_dir / PENDING_DIR
        moved = sorted(p.name for p in pending.iterdir() if p.name != COMMIT_FILE and not p.name.startswith("."))
        removed = [n for n in ("summary.json", *self.outputs) if n not in moved]
        marker = {"new": final.name, "manifest": sha256_file(tmp / MANIFEST_FILE), "pending": moved, "remove": removed}
        atomic_write_json(pending / COMMIT_FILE, marker)
        crash_point("commit-marker")

    def _undo_commit(self) -> None:
        """After a failed first save, or a run that ended without one: recover() as after a crash (the
        commit goes on only if its checkpoint is complete; else the earlier run stays as it was)."""
        try:
            recover(self.out_dir)
        except OSError:  # (a folder gone read-only: the next start tries again)
            pass
        self.pending = False

    def write_summary(self, summary: dict) -> None:
        if self.world.is_root:
            atomic_write_json(self.out_dir / "summary.json", summary)

    def close(self) -> None:
        """metrics.jsonl is complete (the summary may follow)."""
        if self.metrics is not None:
            self.metrics.close()

    def release(self) -> None:
        """The run is over: a run that never committed leaves the earlier one as it found it (its pending
        files go), and the folder's lock is let go."""
        if self.world.is_root:
            if self.pending:
                self._undo_commit()
            self.lock.release()
