"""The PNGs a fine-tuning run writes: loss and accuracy per epoch, and the test set's confusion matrix."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

# CJK fonts first where a machine has them, so Chinese labels render; DejaVu Sans (matplotlib's own) last.
FONTS = ["Noto Sans CJK SC", "Noto Sans CJK JP", "WenQuanYi Zen Hei", "SimHei", "Microsoft YaHei", "PingFang SC", "DejaVu Sans"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams["font.sans-serif"] = FONTS + [f for f in plt.rcParams["font.sans-serif"] if f not in FONTS]
    return plt


def _save(fig, path) -> Path:
    path = Path(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # missing glyphs or fonts: the figure is still written
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def plot_curves(history: dict, path, ylabel: str, keys=("train", "val"), step_points=None, names=None) -> Path:
    """history[key] = [(epoch, value)], drawn per epoch (legend: names[key], default the key);
    step_points = [(fractional epoch, value)] of every step, drawn faintly behind."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    if step_points:
        e, v = zip(*step_points)
        ax.plot(e, v, "-", color="tab:blue", alpha=0.25, linewidth=0.8, label="train (each step, dropout on)")
    for key, style, color in zip(keys, ("-o", "--s", ":^"), ("tab:blue", "tab:orange", "tab:green")):
        pts = history.get(key) or []
        if pts:
            e, v = zip(*pts)
            ax.plot(e, v, style, markersize=4, color=color, label=(names or {}).get(key, key))
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_confusion(matrix: np.ndarray, labels, path, title: str) -> Path:
    """matrix[true, predicted] as a heat map with the counts written in each cell."""
    plt = _pyplot()
    k = len(labels)
    fig, ax = plt.subplots(figsize=(1.2 * k + 3, 1.0 * k + 2.5))
    im = ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(k), labels=labels, rotation=30, ha="right")
    ax.set_yticks(range(k), labels=labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    top = matrix.max() if matrix.size else 0
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center",
                    color="white" if matrix[i, j] > top / 2 else "black")  # fmt: skip
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return _save(fig, path)


def confusion_matrix(true: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    """(k, k) counts: row = true label, column = predicted label."""
    m = np.zeros((k, k), dtype=np.int64)
    np.add.at(m, (true, pred), 1)
    return m


def format_confusion(matrix: np.ndarray, labels) -> str:
    """The matrix as a text table: one row per true label, one column per predicted label id."""
    names = [str(x) for x in labels]
    width = max(len(n) for n in names)
    cell = max(4, len(str(int(matrix.max()))) + 1 if matrix.size else 4)
    lines = ["confusion matrix (rows: true label, columns: predicted label id)",
             " " * (width + 4) + "".join(f"{i:>{cell}}" for i in range(len(names)))]  # fmt: skip
    for i, n in enumerate(names):
        lines.append(f"{n:<{width}} {i:>3}" + "".join(f"{int(v):>{cell}}" for v in matrix[i]))
    return "\n".join(lines)
