"""What a run measures and keeps: peak memory, the metrics log (metrics.jsonl) and the loss plot (loss.png).

    log = MetricsLog("runs/npgpt/metrics.jsonl", resume_at=None)    # resume_at=step: keep the records up to it
    log.write({"kind": "step", "step": 1, "loss": 10.9})
    plot_losses({"train": [(step, tokens, loss)], "val": [...]}, "runs/npgpt/loss.png")
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import numpy as np

from .atomic import atomic_write_bytes


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MB.

    On Linux this is VmHWM from /proc/self/status, the high-water mark of this program's own memory
    (ru_maxrss would also count the parent's memory at fork time). Elsewhere ru_maxrss (KB on Linux,
    bytes on macOS)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def read_metrics(path) -> list[dict]:
    """The records of a metrics.jsonl ([] when there is none); a line cut short by a crash is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            pass  # a line cut short by a crash
    return records


def keep_metrics_until(path, step: int) -> None:
    """Rewrite metrics.jsonl without the records of steps after `step` (they are about to be redone)."""
    records = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in records).encode())


class MetricsLog:
    """One JSON record per line, flushed at once. resume_at: a step to resume after (later records are
    dropped, the file is appended to); None starts the file afresh. enabled=False writes nothing (the
    ranks other than 0 under MPI)."""

    def __init__(self, path, resume_at: int | None = None, enabled: bool = True):
        self.path, self.file = Path(path), None
        if enabled:
            if resume_at is not None:
                keep_metrics_until(self.path, resume_at)
            self.file = open(self.path, "a" if resume_at is not None else "w", encoding="utf-8")

    def write(self, record: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def plot_losses(history: dict, path, step_losses=None) -> Path:
    """Train and val loss against steps (bottom axis) and tokens seen (top axis), as a PNG.

    history: {"train": [(step, tokens, loss)], "val": [...]} at each evaluation; step_losses: the loss
    of every step, drawn faintly behind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if step_losses:
        s, loss = zip(*step_losses)
        ax.plot(s, loss, "-", color="tab:blue", alpha=0.25, linewidth=0.8, label="train loss (each step)")
    for name, style in (("train", "-o"), ("val", "--s")):
        pts = history.get(name) or []
        if pts:
            s, _, loss = zip(*pts)
            label = "train loss (mean since last eval)" if name == "train" else "val loss"
            ax.plot(s, loss, style, markersize=3, label=label, color="tab:blue" if name == "train" else "tab:orange")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss")
    ax.grid(alpha=0.3)
    ax.legend()
    pts = (history.get("train") or []) + (history.get("val") or [])
    if pts:
        steps = np.array([p[0] for p in pts], dtype=float)
        toks = np.array([p[1] for p in pts], dtype=float)
        if steps.max() > 0:
            per_step = toks.max() / steps.max()
            top = ax.secondary_xaxis("top", functions=(lambda s: s * per_step, lambda t: t / per_step))
            top.set_xlabel("tokens seen")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
