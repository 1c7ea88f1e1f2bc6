"""Reproduce chapter 5 of "Build a Large Language Model (From Scratch)" and write docs/book-ch5.md.

    python benchmarks/book_ch5.py                 # npgpt's recipe, then our PyTorch twin, back to back
    python benchmarks/book_ch5.py --no-torch      # npgpt only (the twin's columns are left out)
    python benchmarks/book_ch5.py --together      # both at once, sharing the machine's load alike
    python benchmarks/book_ch5.py --render-only   # rewrite the page from docs/book-ch5.json

In one invocation: `npgpt train --recipe book-ch5` in a fresh process and benchmarks/book_ch5_torch.py
(our own PyTorch twin of the book's model and loop, not the book's code) in another, back to back or
(--together) at the same time, each timed from the outside (wall time of the whole process) and by
itself (the training loop), each reporting its own peak resident memory (VmHWM). On a machine that
other jobs share, --together puts both runs under the same background load (and each under the
other's), which keeps their ratio fair when the load comes and goes. The measured numbers go to docs/book-ch5.json, the page to docs/book-ch5.md and
the curves (the book's published points, npgpt's evaluations, the twin's) to docs/book-ch5.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from npgpt.bench import cpu_name

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
RESULTS, PAGE, PLOT = DOCS / "book-ch5.json", DOCS / "book-ch5.md", DOCS / "book-ch5.png"

# The book's published log of this run (book step: the state after book_step + 1 updates): train, val.
BOOK = {0: (9.781, 9.933), 5: (8.111, 8.339), 10: (6.661, 7.048), 15: (5.961, 6.616), 25: (5.201, 6.348),
        35: (4.069, 6.226), 70: (0.985, 6.242), 75: (0.717, 6.293), 80: (0.541, 6.393), 85: (0.391, 6.452)}  # fmt: skip
TOLERANCE = 0.4  # the target: val within 0.4 of the book's at every published step


def npgpt_command(out_dir: Path) -> list:
    return [sys.executable, "-u", "-m", "npgpt", "train", "--recipe", "book-ch5", "--out-dir", str(out_dir), "--overwrite",
            "--no-progress"]  # fmt: skip


def twin_command(out: Path) -> list:
    return [sys.executable, "-u", str(ROOT / "benchmarks" / "book_ch5_torch.py"), "--json", str(out)]


def npgpt_results(out_dir: Path, wall: float | None) -> dict:
    """What a run directory of `npgpt train --recipe book-ch5` shows; a run still going (no summary.json
    yet) gives its evaluations so far, without timings."""
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [[r["step"] - 1, r.get("train_eval_loss"), r["val_loss"], r["train_loss"]] for r in records if r.get("kind") == "eval"]
    steps = [r for r in records if r.get("kind") == "step"]
    summary_file = out_dir / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    return dict(command="npgpt train --recipe book-ch5", evals=evals,
                sample=summary.get("sample", next((r["sample"] for r in reversed(records) if r.get("kind") == "eval"), "")),
                process_seconds=wall, seconds=summary.get("seconds"), peak_memory_mb=summary.get("peak_memory_mb"),
                steps=summary.get("steps", len(steps)), step_ms=[r["ms"] for r in steps],
                complete=bool(summary) and not summary.get("interrupted") and summary.get("steps") == 90)  # fmt: skip


def twin_results(out: Path, wall: float) -> dict:
    return {**json.loads(out.read_text()), "process_seconds": wall, "command": "python benchmarks/book_ch5_torch.py"}


def run_all(commands: dict, together: bool, logs: Path) -> dict:
    """name -> wall seconds of each command's process, run one after the other or all at once."""
    walls, running = {}, {}
    for name, cmd in commands.items():
        log = open(logs / f"{name}.log", "w")
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        running[name] = (proc, t0, log)
        if not together:
            proc.wait()
            walls[name] = time.perf_counter() - t0
    while len(walls) < len(commands):
        for name, (proc, t0, log) in running.items():
            if name not in walls and proc.poll() is not None:
                walls[name] = time.perf_counter() - t0
        time.sleep(0.5)
    for name, (proc, _, log) in running.items():
        log.close()
        if proc.returncode:
            raise SystemExit(f"{name} failed (exit {proc.returncode}); see {logs / (name + '.log')}")
    return walls


def measure(with_torch: bool, together: bool) -> dict:
    results = dict(date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), cpu=cpu_name(), cores=os.cpu_count(),
                   python=platform.python_version(), mode="together" if together and with_torch else "back to back")  # fmt: skip
    work = ROOT / "runs" / "book-ch5-bench"  # kept: the run, the twin's numbers and both logs
    work.mkdir(parents=True, exist_ok=True)
    commands = {"npgpt": npgpt_command(work / "run")}
    if with_torch:
        commands["torch_twin"] = twin_command(work / "twin.json")
    print("running:", *(" ".join(c) for c in commands.values()), sep="\n  ", flush=True)
    walls = run_all(commands, together, work)
    results["npgpt"] = npgpt_results(work / "run", walls["npgpt"])
    if with_torch:
        results["torch_twin"] = twin_results(work / "twin.json", walls["torch_twin"])
    for name in commands:
        results[f"{name}_log_tail"] = (work / f"{name}.log").read_text().splitlines()[-30:]
    import numpy

    results["numpy"] = numpy.__version__
    return results


def plot(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    steps = sorted(BOOK)
    ax.plot(steps, [BOOK[s][0] for s in steps], "o", color="tab:blue", mfc="none", ms=7, label="book: train (published)")
    ax.plot(steps, [BOOK[s][1] for s in steps], "s", color="tab:orange", mfc="none", ms=7, label="book: val (published)")
    ev = results["npgpt"]["evals"]
    ax.plot([e[0] for e in ev], [e[1] for e in ev], "-", color="tab:blue", label="npgpt: train (evaluated, dropout off)")
    ax.plot([e[0] for e in ev], [e[2] for e in ev], "-", color="tab:orange", label="npgpt: val")
    twin = results.get("torch_twin")
    if twin:
        tv = twin["evals"]
        ax.plot([e[0] for e in tv], [e[1] for e in tv], ":", color="tab:blue", alpha=0.6, label="PyTorch twin: train")
        ax.plot([e[0] for e in tv], [e[2] for e in tv], ":", color="tab:orange", alpha=0.6, label="PyTorch twin: val")
    ax.set_xlabel("book step (optimizer updates - 1)")
    ax.set_ylabel("cross-entropy loss")
    ax.set_title("Chapter 5 on the-verdict: the book's published log and npgpt --recipe book-ch5")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(PLOT, dpi=110)
    plt.close(fig)


def _median(values) -> float | None:
    values = sorted(values or [])
    return values[len(values) // 2] if values else None


def _fmt(v, spec: str = ".0f") -> str:
    return "n/a" if v is None else format(v, spec)


def render(results: dict) -> str:
    n, twin = results["npgpt"], results.get("torch_twin")
    at = {e[0]: e for e in n["evals"]}
    tat = {e[0]: e for e in twin["evals"]} if twin else {}
    rows, dist = [], []
    for s in sorted(BOOK):
        bt, bv = BOOK[s]
        e = at.get(s)
        if e is None:
            rows.append(f"| {s} | {bt:.3f} | {bv:.3f} | not reached | not reached | | |" + (" | |" if twin else ""))
            continue
        dist.append(abs(e[2] - bv))
        ok = "yes" if abs(e[2] - bv) <= TOLERANCE else "**no**"
        row = f"| {s} | {bt:.3f} | {bv:.3f} | {e[1]:.3f} ({e[1] - bt:+.3f}) | {e[2]:.3f} ({e[2] - bv:+.3f}) | {ok} | {e[3]:.3f} |"
        if twin:
            te = tat.get(s)
            row += f" {te[1]:.3f} | {te[2]:.3f} |" if te else " | |"
        rows.append(row)
    head = "| book step | book train | book val | npgpt train (eval) | npgpt val | val within 0.4 | npgpt running mean |"
    sep = "|---:|---:|---:|---:|---:|:---:|---:|"
    if twin:
        head += " twin train | twin val |"
        sep += "---:|---:|"
    final = n["evals"][-1]
    reached = sum(1 for s in BOOK if s in at)
    lines = [
        "# Chapter 5 of \"Build a Large Language Model (From Scratch)\", reproduced",
        "",
        "Written by `python benchmarks/book_ch5.py` (numbers in `docs/book-ch5.json`). npgpt runs",
        "`npgpt train --recipe book-ch5` (every setting in `npgpt/recipes.py`): GPT-2 124M's shape with a",
        "256-token context, PyTorch's default initialisation (`--init pytorch`), dropout 0.1, no q|k|v bias, an",
        "untied head; AdamW lr 4e-4, betas (0.9, 0.999), weight decay 0.1 on every parameter",
        "(`--weight-decay-on all`), constant learning rate, no clipping; the-verdict cut at 90% of its",
        "characters, windows of 256 tokens with stride 256, shuffled batches of 2 (last one dropped), 10",
        "epochs of 9 steps; an evaluation after the first step and every 5 steps after it, the train loss",
        "evaluated with dropout off on 5 random train batches (`--eval-train-batches 5`) and the val loss on",
        "the whole validation split (its one batch).",
        "",
        "The book's step *s* is the state after *s + 1* updates (npgpt's step *s + 1*). Both runs draw from the",
        "same distributions, not the same random numbers (initial weights, shuffling, dropout masks), so the",
        "curves can agree in shape and level, not digit for digit. The \"twin\" is our own PyTorch",
        "re-implementation of the book's model and loop (`benchmarks/book_ch5_torch.py`, written from the",
        "book's description, not its code).",
        "",
        f"Measured {results['date']} on {results['cpu']} ({results['cores']} cores), Python {results['python']},",
        f"NumPy {results['numpy']}" + (f", PyTorch {twin['torch']}" if twin else "") + ".",
        "",
    ]
    if not n.get("complete", True):
        lines += [
            f"**This run did not finish**: it reached step {n['steps']} of 90 ({reached} of the book's 10 published",
            "points) before it had to be stopped; the rows marked \"not reached\" are missing, not failed. " + results.get("note", ""),
            "",
        ]
    lines += [
        "## The losses at each published step",
        "",
        head,
        sep,
        *rows,
        "",
        f"Largest distance of npgpt's val loss from the book's over the {len(dist)} points reached: "
        f"{_fmt(max(dist) if dist else None, '.3f')} (target: at most {TOLERANCE}). Train (eval) is the book's kind of",
        "train loss (dropout off); the running mean (the mean of the steps since the last evaluation, dropout",
        "on) is npgpt's default train figure, shown for comparison only. Parentheses: npgpt minus the book.",
        f"At npgpt's last evaluation (step {final[0] + 1}): train (eval) {final[1]:.3f}, val {final[2]:.3f}.",
        "",
        "![the book's published losses and npgpt's](book-ch5.png)",
        "",
        f"## The sample (50 tokens, greedy, at step {final[0] + 1})",
        "",
        "```text",
        n["sample"],
        "```",
        "",
    ]
    if twin and twin.get("sample"):
        lines += [f"The twin's sample (after step {twin['steps']}):", "", "```text", twin["sample"], "```", ""]
    timed = results.get("npgpt_window_ms") or n.get("step_ms") or []
    lines += [
        "## Time and memory",
        "",
        results.get("timing_note", "The machine is shared: other engineers' jobs ran on the same cores during the "
                    "measurement, so the absolute times are noisy and far above an idle machine's; read the ratio."),
        "Peak memory is each process's resident high-water mark (VmHWM).",
        "",
        "| run | updates timed | median ms per update | loop (s) | process (s) | peak memory (MB) |",
        "|---|---:|---:|---:|---:|---:|",
        f"| npgpt (`{n['command']}`) | {len(timed)} | {_fmt(_median(timed))} | "
        f"{_fmt(n.get('seconds'))} | {_fmt(n.get('process_seconds'))} | {_fmt(n.get('peak_memory_mb'), ',.0f')} |",
    ]
    if twin:
        lines.append(
            f"| PyTorch twin (`{twin['command']}`, {twin['threads']} threads) | {len(twin.get('step_ms') or [])} | "
            f"{_fmt(_median(twin.get('step_ms')))} | {_fmt(twin.get('seconds'))} | {_fmt(twin.get('process_seconds'))} | "
            f"{_fmt(twin.get('peak_memory_mb'), ',.0f')} |"
        )
        ratios = []
        a, b = _median(timed), _median(twin.get("step_ms"))
        if a and b:
            ratios.append(f"time per update {a / b:.2f}x")
        if n.get("process_seconds") and twin.get("process_seconds") and n.get("complete", True):
            ratios.append(f"whole run {n['process_seconds'] / twin['process_seconds']:.2f}x")
        if n.get("peak_memory_mb") and twin.get("peak_memory_mb"):
            ratios.append(f"peak memory {n['peak_memory_mb'] / twin['peak_memory_mb']:.2f}x")
        if ratios:
            lines += ["", "npgpt / twin: " + ", ".join(ratios) + "."]
    lines.append("")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch twin")
    ap.add_argument("--from-run", type=Path, metavar="DIR",
                    help="take npgpt's numbers from this run directory of `npgpt train --recipe book-ch5` (no timing "
                         "of the process; a run still going gives its evaluations so far) and render")
    ap.add_argument("--together", action="store_true", help="run npgpt and the twin at the same time")
    ap.add_argument("--render-only", action="store_true", help=f"rewrite the page and plot from {RESULTS.name}")
    args = ap.parse_args()
    if args.render_only:
        results = json.loads(RESULTS.read_text())
    elif args.from_run:
        import numpy

        results = dict(date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), cpu=cpu_name(), cores=os.cpu_count(),
                       python=platform.python_version(), numpy=numpy.__version__, mode="npgpt only",
                       npgpt=npgpt_results(args.from_run, None))  # fmt: skip
        if RESULTS.is_file():  # a twin measured before, and its notes, stay
            old = json.loads(RESULTS.read_text())
            results.update({k: old[k] for k in ("torch_twin", "timing_note", "npgpt_window_ms") if k in old})
        RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    else:
        results = measure(with_torch=not args.no_torch, together=args.together)
        RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    plot(results)
    PAGE.write_text(render(results))
    print(f"wrote {PAGE}, {PLOT} and {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
