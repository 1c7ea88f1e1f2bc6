"""`npgpt prepare` measured: its tokens/s against tiktoken's own ceiling, its peak memory on >= 1 GB, and the
time a training step waits for a batch of shards; then `npgpt train --data` on those shards.

    python benchmarks/prepare_bench.py                       # 1 GB corpus, K = the cores, 3 rounds
    python benchmarks/prepare_bench.py --gb 2 --workers 2 --json prepare_bench.json
    python benchmarks/prepare_bench.py --rounds 0 --json train_shards_bench.json   # only the corpus, prepare, training
    python benchmarks/prepare_bench.py --data-wait data/mycorpus --batch-size 16 --context-length 1024
    python benchmarks/prepare_bench.py --train-wait data/mycorpus --device cuda --batch-size 16 --context-length 1024

1. The corpus: documents of 3-40 consecutive paragraphs (or poems) drawn with a fixed seed from the shared
   texts (../shared/data: tinyshakespeare, the-verdict, quantangshi's Tang poems), written as JSON lines,
   a quarter of the files gzip-compressed, into a temporary folder (never committed; removed at the end
   unless --keep). --gb counts the text's UTF-8 bytes.
2. Throughput, side by side in one run on the same text: the first --ceiling-mb of documents, held in
   memory and tokenized by tiktoken's `encode_ordinary_batch(texts, num_threads=K)` (the ceiling: the
   same BPE, no reading, no writing), alternating with `npgpt prepare --workers K` on a JSON-lines file of
   exactly those documents (process start, reading, JSON, tokenizing, writing shards). --rounds rounds,
   each round's ratio printed, medians reported. Tokens are the documents' own (prepare's
   <|endoftext|> separators are not counted). prepare's fixed start-up (the interpreter, the package and
   the K tokenizer processes: `prepare` on a one-line file) is measured too.
3. Peak memory: `npgpt prepare --workers K` on the whole corpus as a child process, the resident memory of
   its process tree (the main process and the tokenizer processes, VmRSS summed) sampled every 0.1 s.
4. Data wait (`data_wait`): the time of WindowSampler.next() for a (B, T) batch drawn from the shards just
   written (or any prepared folder), the part of a training step spent waiting for data.
5. The same inside a real training loop (`train_data_wait`): `npgpt train --data SHARDS` run in this
   process (the run loop, the fast engine), the time of each batch the run takes from its sampler
   measured around the call, against the step's own time from metrics.jsonl: the 124M model (gpt2
   preset) at B=2, T=256, and a one-layer model at B=16, T=1024 (the wait depends on B and T, not on
   the model). --rounds 0 skips part 2 (and the start-up).
6. Resident memory of `npgpt train --data SHARDS` (`train_rss`): a one-layer model as a child process for
   --rss-steps steps of 64 windows of 32 tokens, its VmRSS sampled every 0.1 s beside the step it is at.

The machine's load (1-minute load average before and after each part) is printed beside the figures: on a
shared VM the figures move by tens of percent with it.
"""

from __future__ import annotations

import argparse
import gzip
import json
import lzma
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


# --- the corpus --------------------------------------------------------------------------------------------------
def paragraphs() -> list[list[str]]:
    """The shared texts as lists of paragraphs (Shakespeare's speeches, the story's paragraphs, poems)."""
    if not SHARED.is_dir():
        sys.exit(f"prepare_bench: {SHARED} is not there; the corpus is made from the shared texts")
    texts = [(SHARED / "tinyshakespeare.txt").read_text(encoding="utf-8"), (SHARED / "the-verdict.txt").read_text(encoding="utf-8"),
             lzma.decompress((SHARED / "quantangshi.txt.xz").read_bytes()).decode("utf-8")]  # fmt: skip
    return [[p.strip() + "\n" for p in t.split("\n\n") if p.strip()] for t in texts]


def make_corpus(folder: Path, target_bytes: int, file_bytes: int = 64 << 20, seed: int = 0) -> dict:
    """JSON-lines files of documents until the text holds target_bytes (UTF-8); every 4th file gzipped."""
    rng = random.Random(seed)
    sources = paragraphs()
    folder.mkdir(parents=True, exist_ok=True)
    written, docs, files, t0 = 0, 0, [], time.perf_counter()
    while written < target_bytes:
        index = len(files)
        path = folder / f"part-{index:04d}.jsonl{'.gz' if index % 4 == 3 else ''}"
        opener = (lambda p: gzip.open(p, "wt", encoding="utf-8", compresslevel=1)) if path.suffix == ".gz" else (lambda p: open(p, "w", encoding="utf-8"))
        in_file = 0
        with opener(path) as f:
            while in_file < file_bytes and written < target_bytes:
                src = sources[rng.choices(range(3), weights=(5, 1, 4))[0]]
                start = rng.randrange(len(src))
                text = "\n".join(src[start : start + rng.randint(3, 40)])
                f.write(json.dumps({"text": text, "id": docs}, ensure_ascii=False) + "\n")
                n = len(text.encode("utf-8"))
                in_file, written, docs = in_file + n, written + n, docs + 1
        files.append(path)
    return {"files": len(files), "documents": docs, "text_bytes": written, "disk_bytes": sum(p.stat().st_size for p in files),
            "seconds": time.perf_counter() - t0}  # fmt: skip


def first_documents(folder: Path, n_bytes: int) -> list[str]:
    texts, size = [], 0
    for path in sorted(folder.glob("part-*")):
        with (gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")) as f:
            for line in f:
                texts.append(json.loads(line)["text"])
                size += len(texts[-1].encode())
                if size >= n_bytes:
                    return texts
    return texts


# --- measuring ------------------------------------------------------------------------------------------------------
def load() -> float:
    return os.getloadavg()[0]


def tree_rss_kb(pid: int) -> int:
    """Resident memory of a process and all its descendants (VmRSS, kB)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
            todo += [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
        except (OSError, ValueError):
            pass
    return total


def run_prepare(data: list[str], out: Path, workers: int, extra=()) -> dict:
    """`python -m npgpt prepare` as a child; its wall time and the peak resident memory of its tree."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "npgpt", "prepare", "--data", *data, "--out", str(out), "--workers", str(workers), "--no-progress", *extra]
    peak, done = [0], threading.Event()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], tree_rss_kb(proc.pid))
            done.wait(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = proc.communicate()
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    if proc.returncode:
        raise SystemExit(f"prepare_bench: npgpt prepare failed ({proc.returncode}): {stderr.strip()[-2000:]}")
    totals = json.loads((out / "manifest.json").read_text())["totals"]
    tokens = totals["train_tokens"] + totals["val_tokens"] - totals["train_documents"] - totals["val_documents"]
    return {"seconds": seconds, "peak_rss_mb": peak[0] / 1024, "tokens": tokens, "summary": stdout.strip()}


def ceiling(texts: list[str], workers: int) -> dict:
    from npgpt.tokenizer import get_tokenizer

    enc = get_tokenizer()
    t0 = time.perf_counter()
    ids = enc.encode_ordinary_batch(texts, num_threads=max(workers, 1))
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "tokens": sum(map(len, ids))}


def data_wait(folder, batch_size: int = 16, context_length: int = 1024, steps: int = 200, seed: int = 0) -> dict:
    """The time WindowSampler.next() takes for one (B, T) batch from a prepared folder (or llm.c shards):
    what a training step waits for its data when batches are read in the step. Median and 99th
    percentile over `steps` batches, after 5 untimed ones; the pages are cold the first time a region is
    read and warm (the page cache) after, as in training."""
    from npgpt.shard_sampler import ShardWindows, WindowSampler
    from npgpt.shards import find_shards

    windows = ShardWindows(find_shards([str(folder)]).train, context_length)
    sampler = WindowSampler(windows, batch_size, seed=seed)
    for _ in range(5):
        sampler.next()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        sampler.next()
        times.append(time.perf_counter() - t0)
    times.sort()
    return {"B": batch_size, "T": context_length, "steps": steps, "median_ms": 1e3 * statistics.median(times),
            "p99_ms": 1e3 * times[int(0.99 * (len(times) - 1))], "max_ms": 1e3 * times[-1], "windows": len(windows)}  # fmt: skip


def throughput_rounds(base: Path, corpus: Path, K: int, ceiling_mb: float, n_rounds: int, figures: dict) -> None:
    """Part 2: prepare's start-up, then `rounds` side-by-side rounds of prepare and the ceiling."""
    (base / "one.txt").write_text("one short document\n")
    startup = statistics.median(run_prepare([str(base / "one.txt")], base / "one-shards", K)["seconds"] for _ in range(3))
    figures["startup_s"] = startup
    print(f"start-up: npgpt prepare --workers {K} on one line takes {startup:.2f} s (median of 3)")

    texts = first_documents(corpus, int(ceiling_mb * 1e6))
    mb = sum(len(t.encode()) for t in texts) / 1e6
    subset = base / "subset.jsonl"
    subset.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    rounds = []
    for r in range(n_rounds):
        load0 = load()
        ours = run_prepare([str(subset)], base / "subset-shards", K)
        ceil = ceiling(texts, K)
        assert ours["tokens"] == ceil["tokens"], (ours["tokens"], ceil["tokens"])  # the same tokens
        row = {"prepare_tok_s": ours["tokens"] / ours["seconds"], "ceiling_tok_s": ceil["tokens"] / ceil["seconds"],
               "prepare_s": ours["seconds"], "ceiling_s": ceil["seconds"], "load": (load0 + load()) / 2}  # fmt: skip
        row["ratio"] = row["prepare_tok_s"] / row["ceiling_tok_s"]
        rounds.append(row)
        print(f"round {r + 1}: {mb:.1f} MB, {ceil['tokens']:,} tokens: prepare {ours['seconds']:.1f} s "
              f"({row['prepare_tok_s']:,.0f} tok/s), encode_ordinary_batch {ceil['seconds']:.1f} s "
              f"({row['ceiling_tok_s']:,.0f} tok/s): {row['ratio']:.2f}x; load {row['load']:.2f}")  # fmt: skip
    figures["throughput"] = {"text_mb": mb, "tokens": ceil["tokens"], "rounds": rounds,
                             **{k: statistics.median(r[k] for r in rounds) for k in ("prepare_tok_s", "ceiling_tok_s", "ratio")}}  # fmt: skip
    shutil.rmtree(base / "subset-shards", ignore_errors=True)


def train_data_wait(folder, batch_size: int, context_length: int, steps: int, preset: str = "gpt2", device=None,
                    **model) -> dict:  # fmt: skip
    """The data wait inside a real training loop: `npgpt train --data folder` in this process (one evaluation,
    of one batch, at the end; no samples), with each call of the sampler's next(), the run's only access to
    its data, timed. Medians over the steps after the first (which allocates), against the steps' own times."""
    from npgpt.loop import run_task
    from npgpt.train import Pretraining, TrainConfig

    out = Path(tempfile.mkdtemp(prefix="npgpt-train-wait-"))
    try:
        cfg = TrainConfig(data=[str(folder)], preset=preset, context_length=context_length, batch_size=batch_size,
                          max_steps=steps, eval_interval=steps, eval_batches=1, sample_tokens=0, progress=False,
                          device=device, out_dir=str(out), **model)  # fmt: skip
        task = Pretraining(cfg)
        sampler_next, waits = task.batches.next, []

        def timed_next():
            t0 = time.perf_counter()
            batch = sampler_next()
            waits.append(time.perf_counter() - t0)
            return batch

        task.batches.next = timed_next
        load0 = load()
        run_task(task, task.loop_settings())
        step_ms = [json.loads(line)["ms"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"kind": "step"' in line]
    finally:
        shutil.rmtree(out, ignore_errors=True)
    wait_ms, step_ms = [1e3 * w for w in waits[1:]], step_ms[1:]
    return {"preset": preset, **model, "B": batch_size, "T": context_length, "steps": steps, "device": task.model.device,
            "parameters": task.model.num_params(), "wait_median_ms": statistics.median(wait_ms), "wait_max_ms": max(wait_ms),
            "step_median_ms": statistics.median(step_ms), "wait_share": statistics.median(wait_ms) / statistics.median(step_ms),
            "load": (load0 + load()) / 2}  # fmt: skip


def train_rss(folder, steps: int, batch_size: int = 64, context_length: int = 32) -> dict:
    """`npgpt train --data folder` with a one-layer model as a child process: its resident memory (VmRSS)
    sampled every 0.1 s with the step it had reached (metrics.jsonl's step records)."""
    out = Path(tempfile.mkdtemp(prefix="npgpt-train-rss-"))
    cmd = [sys.executable, "-m", "npgpt", "train", "--data", str(folder), "--emb-dim", "16", "--n-heads", "2", "--n-layers",
           "1", "--context-length", str(context_length), "--batch-size", str(batch_size), "--max-steps", str(steps),
           "--eval-interval", str(steps), "--eval-batches", "1", "--sample-tokens", "0", "--no-progress", "--out-dir", str(out)]  # fmt: skip
    samples, t0 = [], time.perf_counter()
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "NPGPT_DEVICE": "cpu"})
        while proc.poll() is None:
            try:
                step = (out / "metrics.jsonl").read_text().count('"kind": "step"')
            except OSError:
                step = 0
            samples.append((round(time.perf_counter() - t0, 2), step, tree_rss_kb(proc.pid) / 1024))
            time.sleep(0.1)
        stdout, stderr = proc.communicate()
        if proc.returncode:
            raise SystemExit(f"prepare_bench: npgpt train failed ({proc.returncode}): {stderr.strip()[-2000:]}")
    finally:
        shutil.rmtree(out, ignore_errors=True)
    # while the steps run: from the first step's record (the model, engine and buffers made) to the last one's
    # (then come the evaluation, the checkpoint, the plot and the exit)
    during = [(s, mb) for _, s, mb in samples if 1 <= s < steps]
    at = {}
    for fraction in (0.0, 0.25, 0.5, 0.75, 1.0):
        target = min(max(1, int(fraction * steps)), steps - 1)
        at[str(target)] = next((mb for s, mb in during if s >= target), during[-1][1])
    mbs = [mb for _, mb in during]
    return {"steps": steps, "B": batch_size, "T": context_length, "windows_read": steps * batch_size,
            "rss_mb_at_step": at, "rss_min_mb": min(mbs), "rss_max_mb": max(mbs), "samples": len(samples),
            "seconds": samples[-1][0] if samples else 0.0, "summary": stdout.strip().splitlines()[-6:]}  # fmt: skip


def training_figures(folder, train_steps: int, rss_steps: int, device=None) -> dict:
    """Parts 5 and 6 on a prepared folder, printed as they come."""
    figures = {"wait_in_loop": []}
    for preset, B, T, model in (("gpt2", 2, 256, {}), ("nano", 16, 1024, {"emb_dim": 16, "n_heads": 2, "n_layers": 1})):
        w = train_data_wait(folder, B, T, train_steps, preset=preset, device=device, **model)
        figures["wait_in_loop"].append(w)
        print(f"data wait in the training loop, {preset}{' (1 layer, C=16)' if model else ''} ({w['parameters']:,} "
              f"parameters) on {w['device']}, B={B}, T={T}: median {w['wait_median_ms']:.3f} ms (max {w['wait_max_ms']:.3f}) "
              f"per step of {w['step_median_ms']:,.0f} ms: {100 * w['wait_share']:.4f}% of the step; load {w['load']:.2f}")  # fmt: skip
    if rss_steps:
        r = train_rss(folder, rss_steps)
        figures["rss"] = r
        print(f"npgpt train --data on {folder}: {r['steps']} steps of {r['B']} x {r['T']} tokens ({r['windows_read']:,} "
              f"windows read) in {r['seconds']:.0f} s; resident memory by step: "
              + ", ".join(f"{k}: {v:.0f} MB" for k, v in r["rss_mb_at_step"].items())
              + f"; from the first step to the last {r['rss_min_mb']:.0f}-{r['rss_max_mb']:.0f} MB")  # fmt: skip
    return figures


def main(argv=None) -> int:
    sys.path.insert(0, str(REPO))
    from npgpt.bench import cpu_name

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gb", type=float, default=1.0, help="text in the generated corpus (GB of UTF-8; default 1)")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="K: tokenizer processes and tiktoken threads")
    p.add_argument("--ceiling-mb", type=float, default=32, help="text of the side-by-side throughput rounds (MB)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--keep", metavar="DIR", help="make the corpus and shards in DIR and keep them")
    p.add_argument("--json", metavar="PATH", help="write the figures to PATH")
    p.add_argument("--data-wait", metavar="DIR", help="only measure the data wait on a prepared folder")
    p.add_argument("--train-wait", metavar="DIR", help="only measure the data wait inside a training loop of the 124M "
                                                        "model (gpt2 preset) on a prepared folder, at --batch-size, --context-length")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--context-length", type=int, default=1024)
    p.add_argument("--device", help="--train-wait's device (default: npgpt's, $NPGPT_DEVICE or auto)")
    p.add_argument("--train-steps", type=int, default=6, help="steps of each training loop timed (default 6)")
    p.add_argument("--rss-steps", type=int, default=400, help="steps of the run whose memory is sampled (0: none)")
    p.add_argument("--no-train", action="store_true", help="leave out parts 5 and 6 (training on the shards)")
    args = p.parse_args(argv)
    if args.data_wait:
        print(json.dumps(data_wait(args.data_wait, args.batch_size, args.context_length)))
        return 0
    if args.train_wait:
        print(json.dumps(train_data_wait(args.train_wait, args.batch_size, args.context_length, args.train_steps,
                                         device=args.device)))  # fmt: skip
        return 0
    K = args.workers
    base = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="npgpt-prepare-bench-"))
    figures = {"machine": f"{cpu_name()}, {os.cpu_count()} cores", "workers": K, "load_at_start": load()}
    print(f"{figures['machine']}; K = {K}; load average {load():.2f}; working in {base}")
    try:
        corpus = base / "corpus"
        figures["corpus"] = make_corpus(corpus, int(args.gb * 1e9))
        c = figures["corpus"]
        print(f"corpus: {c['documents']:,} documents in {c['files']} files, {c['text_bytes'] / 1e9:.2f} GB of text "
              f"({c['disk_bytes'] / 1e9:.2f} GB on disk), made in {c['seconds']:.0f} s")  # fmt: skip

        if args.rounds:
            throughput_rounds(base, corpus, K, args.ceiling_mb, args.rounds, figures)

        load0 = load()
        whole = run_prepare([str(corpus)], base / "shards", K)
        whole.update(load=(load0 + load()) / 2, tok_s=whole["tokens"] / whole["seconds"],
                     mb_s=c["text_bytes"] / 1e6 / whole["seconds"])  # fmt: skip
        figures["whole"] = whole
        print(f"whole corpus: {whole['seconds']:.0f} s, {whole['tok_s']:,.0f} tok/s, {whole['mb_s']:.2f} MB/s of text; "
              f"peak resident memory of prepare's processes {whole['peak_rss_mb']:.0f} MB; load {whole['load']:.2f}")  # fmt: skip
        print("  " + whole["summary"].replace("\n", "\n  "))
        figures["data_wait"] = [data_wait(base / "shards", B, T) for B, T in ((16, 1024), (2, 256))]
        for w in figures["data_wait"]:
            print(f"data wait at B={w['B']}, T={w['T']}: median {w['median_ms']:.3f} ms, p99 {w['p99_ms']:.3f} ms, "
                  f"max {w['max_ms']:.3f} ms per batch ({w['windows']:,} windows)")  # fmt: skip
        if not args.no_train:
            figures["training"] = training_figures(base / "shards", args.train_steps, args.rss_steps)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    figures["load_at_end"] = load()
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
