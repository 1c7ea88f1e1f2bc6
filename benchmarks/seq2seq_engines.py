"""The encoder-decoder's two engines on `npgpt seq2seq train`'s default configuration: step time and memory.

    python benchmarks/seq2seq_engines.py                 # 40 interleaved steps of each, then peak memory
    OPENBLAS_NUM_THREADS=1 python benchmarks/seq2seq_engines.py --steps 60

One training step is what the trainer runs: the engine's forward and backward on a batch of the bundled
English -> Malay pairs (64 pairs, dropout on), clipping and AdamW through update.py's Updater. Each engine
trains its own copy of the same initial model on the same batches; their steps alternate (reference,
fast, reference, ...) so that both see the same load on a shared machine. Reported per engine: median
wall-clock and CPU time (user + system of this process: all its threads, BLAS's included) per step, and
the fast/reference ratios. Memory: each engine again in a fresh subprocess (so neither inherits the
other's allocations), its peak resident set size after `--memory-steps` steps, and the peak of NumPy's
allocations during one step (tracemalloc), which for the fast engine includes its planned buffers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


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


def cpu_seconds() -> float:
    return time.process_time()  # user + system of every thread of this process, finer than os.times()


def one_step(updater, batches, model, step: int):
    from npgpt.model import make_rng

    src, tgt_in, targets = batches.next()
    t0, c0 = time.perf_counter(), cpu_seconds()
    result = updater([((src, tgt_in), targets, make_rng(step, model.xp))], lr=1e-3)
    return time.perf_counter() - t0, cpu_seconds() - c0, result.loss


def timing(steps: int, warmup: int) -> dict:
    runs = {name: setup(name) for name in ("reference", "fast")}
    times = {name: ([], []) for name in runs}
    losses = {name: [] for name in runs}
    for step in range(warmup + steps):
        for name, (updater, batches, model) in runs.items():  # alternate: the same load for both
            wall, cpu, loss = one_step(updater, batches, model, step)
            losses[name].append(loss)
            if step >= warmup:
                times[name][0].append(wall)
                times[name][1].append(cpu)
    out = {name: {"wall_ms": 1e3 * statistics.median(w), "cpu_ms": 1e3 * statistics.median(c)} for name, (w, c) in times.items()}
    out["max_loss_difference"] = max(abs(a - b) for a, b in zip(losses["fast"], losses["reference"]))
    out["fast_planned_mb"] = runs["fast"][0].engine.nbytes() / 2**20
    return out


def memory_worker(name: str, steps: int) -> dict:
    import tracemalloc

    from npgpt.metrics import peak_rss_mb

    tracemalloc.start()
    updater, batches, model = setup(name)
    base = tracemalloc.get_traced_memory()[0]  # the model, optimizer state, data and (fast) the planned buffers
    tracemalloc.reset_peak()
    for step in range(steps):
        one_step(updater, batches, model, step)
    peak = tracemalloc.get_traced_memory()[1]
    return {"peak_rss_mb": peak_rss_mb(), "traced_peak_mb": peak / 2**20, "traced_at_start_mb": base / 2**20}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=40, help="timed steps of each engine (default 40)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--memory-steps", type=int, default=10)
    p.add_argument("--no-memory", dest="memory", action="store_false")
    p.add_argument("--memory-worker", choices=["fast", "reference"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_worker:
        print(json.dumps(memory_worker(args.memory_worker, args.memory_steps)))
        return
    from npgpt.parallel import num_threads

    print(f"npgpt seq2seq train's defaults, batches of 64 bundled pairs, dropout on; {num_threads()} npgpt threads, "
          f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', '(unset)')}; {args.steps} interleaved steps each")  # fmt: skip
    t = timing(args.steps, args.warmup)
    for name in ("reference", "fast"):
        print(f"  {name:9s}  {t[name]['wall_ms']:7.1f} ms wall  {t[name]['cpu_ms']:7.1f} ms CPU  per step (median)")
    print(f"  fast / reference: {t['fast']['wall_ms'] / t['reference']['wall_ms']:.2f} wall, "
          f"{t['fast']['cpu_ms'] / t['reference']['cpu_ms']:.2f} CPU; losses differ by at most {t['max_loss_difference']:.1e}")
    print(f"  the fast engine's planned buffers: {t['fast_planned_mb']:.1f} MiB")
    if args.memory:
        for name in ("reference", "fast"):
            cmd = [sys.executable, __file__, "--memory-worker", name, "--memory-steps", str(args.memory_steps)]
            m = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
            print(f"  {name:9s}  peak RSS {m['peak_rss_mb']:7.1f} MiB; NumPy allocations: {m['traced_at_start_mb']:.1f} MiB "
                  f"before the steps, peak {m['traced_peak_mb']:.1f} MiB during {args.memory_steps} steps")  # fmt: skip


if __name__ == "__main__":
    main()
