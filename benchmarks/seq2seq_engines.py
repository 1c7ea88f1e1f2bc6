"""The encoder-decoder's two engines on `npgpt seq2seq train`'s default configuration: step time and memory.

    python benchmarks/seq2seq_engines.py                  # 8 rounds of 12 steps of each engine, then memory
    OPENBLAS_NUM_THREADS=1 python benchmarks/seq2seq_engines.py --rounds 12

One training step is what the trainer runs: the engine's forward and backward on a batch of the bundled
English -> Malay pairs (64 pairs, dropout on), clipping and AdamW through update.py's Updater. Each engine
trains its own copy of the same initial model on the same 12 batches (drawn once: batch lengths vary, and
so does a step's cost), in rounds: a round runs the 12 steps of each engine in turn (reference, fast,
fast with one thread), so that all see the same load on a shared machine. Reported per engine: CPU time
(user + system of this process, all its threads, BLAS's included) and wall-clock time per step, the
minimum over the rounds (the least disturbed by other jobs) and the median, and the ratios to the
reference. Memory: each engine again in a fresh subprocess (so neither inherits the other's
allocations), its peak resident set size after `--memory-steps` steps, and NumPy's allocations
(tracemalloc) before the steps (the fast engine's planned buffers included) and at their peak.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ENGINES = {"reference": ("reference", None), "fast": ("fast", None), "fast, 1 thread": ("fast", "1")}


def setup(engine_name: str, seed: int = 0):
    """(updater, batches, model) for the default configuration and the bundled corpus."""
    import numpy as np

    from npgpt.optim import AdamW
    from npgpt.seq2seq.data import PairBatches, encode_pairs, read_pairs, resolve_pairs_path, split_pairs
    from npgpt.seq2seq.engine import make_engine
    from npgpt.seq2seq.model import Seq2Seq
    from npgpt.seq2seq.train import Seq2SeqTrainConfig
    from npgpt.seq2seq.vocab import Vocab
    from npgpt.update import Updater

    cfg = Seq2SeqTrainConfig()
    train, held = split_pairs(read_pairs(resolve_pairs_path(None)), cfg.held_out, cfg.split_seed)
    vocab = Vocab.from_texts([t for p in train + held for t in p])
    src, tgt = encode_pairs(train, vocab, cfg.max_len)
    model = Seq2Seq(cfg.model_config(len(vocab)), seed=seed, dtype=np.float32)
    engine = make_engine(engine_name, model, cfg.batch_size, max(map(len, src)), max(map(len, tgt)) + 1)
    optimizer = AdamW(model.params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    return Updater(engine, optimizer, grad_clip=cfg.grad_clip), PairBatches(src, tgt, cfg.batch_size, seed=seed), model


def setup_with_threads(name: str, threads: str | None):
    """setup(name) with NPGPT_THREADS set to `threads` while the engine is built (it reads it once)."""
    old = os.environ.get("NPGPT_THREADS")
    if threads is not None:
        os.environ["NPGPT_THREADS"] = threads
    try:
        return setup(name)
    finally:
        if old is None:
            os.environ.pop("NPGPT_THREADS", None)
        else:
            os.environ["NPGPT_THREADS"] = old


def one_step(updater, batch, model, step: int):
    """One update on batch = (src, tgt_in, targets); returns (wall s, CPU s, loss)."""
    from npgpt.model import make_rng

    src, tgt_in, targets = batch
    t0, c0 = time.perf_counter(), time.process_time()
    result = updater([((src, tgt_in), targets, make_rng(step, model.xp))], lr=1e-3)
    return time.perf_counter() - t0, time.process_time() - c0, result.loss


def timing(rounds: int, steps_per_round: int = 12) -> dict:
    runs = {label: setup_with_threads(*spec) for label, spec in ENGINES.items()}
    source = runs["reference"][1]
    batches = [source.next() for _ in range(steps_per_round)]
    per_step = {label: ([], []) for label in runs}
    losses = {label: [] for label in runs}
    for r in range(rounds + 1):  # round 0 warms up
        for label, (updater, _, model) in runs.items():
            wall = cpu = 0.0
            for i, batch in enumerate(batches):
                w, c, loss = one_step(updater, batch, model, i)
                wall, cpu = wall + w, cpu + c
                losses[label].append(loss)
            if r > 0:
                per_step[label][0].append(wall / steps_per_round)
                per_step[label][1].append(cpu / steps_per_round)
    out = {label: {"cpu_min": 1e3 * min(c), "cpu_median": 1e3 * statistics.median(c), "wall_min": 1e3 * min(w),
                   "wall_median": 1e3 * statistics.median(w)} for label, (w, c) in per_step.items()}  # fmt: skip
    diffs = [abs(a - b) for a, b in zip(losses["fast"], losses["reference"])]
    out["first_loss_difference"], out["max_loss_difference"] = diffs[0], max(diffs)
    out["fast_planned_mb"] = runs["fast"][0].engine.nbytes() / 2**20
    return out


def memory_worker(name: str, steps: int) -> dict:
    import tracemalloc

    from npgpt.metrics import peak_rss_mb

    tracemalloc.start()
    updater, batches, model = setup(name)
    before = tracemalloc.get_traced_memory()[0]  # model, optimizer state, data and (fast) the planned buffers
    tracemalloc.reset_peak()
    for step in range(steps):
        one_step(updater, batches.next(), model, step)
    peak = tracemalloc.get_traced_memory()[1]
    return {"peak_rss_mb": peak_rss_mb(), "traced_peak_mb": peak / 2**20, "traced_before_mb": before / 2**20}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=8, help="timed rounds of 12 steps of each engine (default 8)")
    p.add_argument("--memory-steps", type=int, default=10)
    p.add_argument("--no-memory", dest="memory", action="store_false")
    p.add_argument("--memory-worker", choices=["fast", "reference"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_worker:
        print(json.dumps(memory_worker(args.memory_worker, args.memory_steps)))
        return
    from npgpt.parallel import num_threads

    print(f"npgpt seq2seq train's defaults, batches of 64 bundled pairs, dropout on; {num_threads()} npgpt threads, "
          f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', '(unset)')}; {args.rounds} rounds of 12 steps")  # fmt: skip
    t = timing(args.rounds)
    ref = t["reference"]
    print("  ms per step       CPU min  CPU median  wall min  wall median   CPU / reference (min, median)")
    for label in ENGINES:
        r = t[label]
        print(f"  {label:15s} {r['cpu_min']:9.1f} {r['cpu_median']:11.1f} {r['wall_min']:9.1f} {r['wall_median']:12.1f}"
              f"   {r['cpu_min'] / ref['cpu_min']:.2f}, {r['cpu_median'] / ref['cpu_median']:.2f}")  # fmt: skip
    print(f"  losses of the fast and the reference engine (float32): {t['first_loss_difference']:.1e} apart at the first "
          f"step, at most {t['max_loss_difference']:.1e} over all {12 * (args.rounds + 1)} steps (each trains its own copy, "
          "so rounding differences grow as the weights drift apart)")  # fmt: skip
    print(f"  the fast engine's planned buffers: {t['fast_planned_mb']:.1f} MiB")
    if args.memory:
        for name in ("reference", "fast"):
            cmd = [sys.executable, __file__, "--memory-worker", name, "--memory-steps", str(args.memory_steps)]
            m = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
            print(f"  {name:9s}  peak RSS {m['peak_rss_mb']:6.1f} MiB; NumPy allocations {m['traced_before_mb']:.1f} MiB "
                  f"before the steps, {m['traced_peak_mb']:.1f} MiB at their peak ({args.memory_steps} steps)")  # fmt: skip


if __name__ == "__main__":
    main()
