"""Training the encoder-decoder Transformer on sentence pairs (`npgpt seq2seq train`).

    from npgpt.seq2seq.train import Seq2SeqTrainConfig, train
    result = train(Seq2SeqTrainConfig(out_dir="runs/en-ms"))

The data: the bundled English -> Malay CLDR pairs (or --data pairs.tsv), split by a seed into training
pairs and held-out pairs (or --val-data for a held-out file). The vocabulary: GPT-2 BPE restricted to
the tokens of the data (vocab.py). One optimizer step: forward with dropout on a batch of pairs of
similar length, backward (the fast engine of seq2seq/engine.py by default, or the readable model with
--engine reference), global-norm clipping, AdamW at the warmup + cosine learning rate, all through
update.py's Updater as in GPT training. A step whose loss or gradient norm is not finite is skipped
without touching the weights. `Translation` is this task of the one run loop (npgpt/loop/), which gives
it the progress bar, checkpoints, signals (SIGINT / SIGTERM: save, exit 130), exact --resume and the
summary rule of every other task.

At each evaluation: held-out loss (teacher forcing), greedy exact match on a fixed sample of held-out
pairs, and one sample translation. At the end: exact match and corpus BLEU (sacreBLEU) on the whole
held-out split. The run directory holds metrics.jsonl, loss.png, heldout.tsv (the pairs the model
never trained on), summary.json and checkpoints/step-XXXXXXXX/ (seq2seq/checkpoint.py).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from ..atomic import atomic_write_bytes
from ..backend import tf32_note
from ..distributed import SingleProcess
from ..loop import (At, LoopSettings, PositionedBatches, Report, StepResult, TrainingAborted, find_resume, run_task, step_rng,
                    weights_not_finite)  # fmt: skip
from ..metrics import read_metrics
from ..optim import AdamW
from ..schedule import LRSchedule
from ..update import Updater
from .checkpoint import load_model, read_meta, save_model, weights_problem
from .config import Seq2SeqConfig
from .data import PairBatches, collate, encode_pairs, read_pairs, resolve_pairs_path, split_pairs
from .decode import sources_per_batch
from .engine import make_engine
from .evaluate import score, translate_ids
from .model import Seq2Seq
from .vocab import Vocab

__all__ = ["Seq2SeqTrainConfig", "Seq2SeqTrainResult", "TrainingAborted", "Translation", "train"]


@dataclass
class Seq2SeqTrainConfig:
    # data
    data: str | None = None  # a TSV of source<TAB>target lines; None: the bundled English -> Malay pairs
    val_data: str | None = None  # held-out pairs from a file (then all of `data` trains)
    held_out: float = 0.1  # share of `data` held out when there is no val_data
    split_seed: int = 0  # the seed of that split
    # model (Seq2SeqConfig)
    d_model: int = 128
    n_heads: int = 4
    n_encoder_layers: int = 2
    n_decoder_layers: int = 2
    d_ff: int = 256
    dropout: float = 0.1
    norm: str = "post"
    activation: str = "relu"
    pos_encoding: str = "sinusoidal"
    tie_embeddings: str = "all"
    max_len: int = 48
    # optimisation
    batch_size: int = 64  # pairs per step
    max_steps: int = 2500
    lr: float = 2e-3
    min_lr: float | None = None  # default lr / 10
    warmup_steps: int = 200
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.98  # the paper's
    grad_clip: float | None = 1.0
    max_bad_steps: int = 5
    # evaluation and output
    out_dir: str = "runs/seq2seq"
    eval_interval: int = 250
    eval_pairs: int = 500  # held-out pairs scored at each evaluation (the final one scores them all)
    final_beam: int = 1  # beam of the final evaluation (1 = greedy)
    checkpoint_interval: int | None = None  # steps; the end of the run is always saved
    keep_last: int = 2
    resume: bool = False
    overwrite: bool = False
    # machine
    seed: int = 0
    device: str | None = None
    dtype: str = "float32"
    engine: str = "fast"  # "fast" (seq2seq/engine.py) or "reference" (Seq2Seq.forward / backward)
    progress: bool = True

    def model_config(self, vocab_size: int) -> Seq2SeqConfig:
        return Seq2SeqConfig(
            src_vocab_size=vocab_size, tgt_vocab_size=vocab_size, d_model=self.d_model, n_heads=self.n_heads,
            n_encoder_layers=self.n_encoder_layers, n_decoder_layers=self.n_decoder_layers, d_ff=self.d_ff,
            dropout=self.dropout, norm=self.norm, activation=self.activation, pos_encoding=self.pos_encoding,
            tie_embeddings=self.tie_embeddings, max_len=self.max_len,
        )  # fmt: skip

    def validate(self) -> None:
        """Every setting, by the command line's flag names, before anything is read or written."""
        from .. import validate as V
        from .config import ACTIVATIONS, NORMS, POSITIONS, TIES

        for name in ("data", "val_data"):
            value = getattr(self, name)
            if value is not None:
                V.not_empty(f"--{name.replace('_', '-')}", value, "a TSV of source<TAB>target pairs")
            if value is not None and value != "en-ms" and not Path(value).expanduser().is_file():
                raise ValueError(f"--{name.replace('_', '-')} {value} does not exist (or is not a file); give a UTF-8 TSV "
                                 "of source<TAB>target lines, or leave --data out for the bundled en-ms corpus")  # fmt: skip
        V.real("--held-out", self.held_out, 0, 1, hi_open=True)
        V.integer("--split-seed", self.split_seed, 0)
        for name in ("d_model", "n_heads", "n_encoder_layers", "n_decoder_layers", "d_ff", "max_len"):
            V.integer(f"--{name.replace('_', '-')}", getattr(self, name), 1)
        if self.d_model % self.n_heads:
            raise ValueError(f"--d-model {self.d_model} is not divisible by --n-heads {self.n_heads}; choose --n-heads "
                             f"from {[h for h in range(1, min(self.d_model, 64) + 1) if self.d_model % h == 0]}")  # fmt: skip
        if self.pos_encoding == "sinusoidal" and self.d_model % 2:
            raise ValueError(f"sinusoidal positions need an even --d-model, got {self.d_model}; or use --pos-encoding learned")
        V.real("--dropout", self.dropout, 0, 1, hi_open=True, hint="0 turns dropout off")
        for name, allowed in (("norm", NORMS), ("activation", ACTIVATIONS), ("pos_encoding", POSITIONS), ("tie_embeddings", TIES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        for name in ("batch_size", "max_steps", "eval_interval", "keep_last", "final_beam", "max_bad_steps"):
            V.integer(f"--{name.replace('_', '-')}", getattr(self, name), 1)
        V.real("--lr", self.lr, 0, lo_open=True)
        if self.min_lr is not None:
            V.real("--min-lr", self.min_lr, 0, self.lr, hint=f"it is the final learning rate, at most --lr {self.lr:g}")
        V.integer("--warmup-steps", self.warmup_steps, 0)
        V.real("--weight-decay", self.weight_decay, 0)
        V.real("--beta1", self.beta1, 0, 1, hi_open=True)
        V.real("--beta2", self.beta2, 0, 1, hi_open=True)
        if self.grad_clip is not None:
            V.real("--grad-clip", self.grad_clip, 0, lo_open=True, hint="0 turns clipping off")
        V.out_dir("--out-dir", self.out_dir)
        V.integer("--eval-pairs", self.eval_pairs, 0)
        if self.checkpoint_interval is not None:
            V.integer("--checkpoint-interval", self.checkpoint_interval, 1, hint="leave it out to save only at the end")
        if self.resume and self.overwrite:
            raise ValueError("--resume continues the run in --out-dir and --overwrite replaces it; give one of them")
        V.integer("--seed", self.seed, 0)
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"--dtype must be float32 or float64, got {self.dtype!r}")
        if self.engine not in ("fast", "reference"):
            raise ValueError(f"--engine must be fast or reference, got {self.engine!r}")


@dataclass
class Seq2SeqTrainResult:
    steps: int
    seconds: float
    cpu_seconds: float  # user + system time of this process
    train_loss: float | None
    val_loss: float | None
    exact_match: float | None  # on the whole held-out split
    bleu: float | None
    n_held_out: int
    out_dir: str
    checkpoint: str | None
    plot: str | None
    sample: str
    interrupted: bool = False
    skipped_steps: int = 0


def cpu_seconds() -> float:
    import os

    t = os.times()
    return t.user + t.system


def data_fingerprint(pairs) -> str:
    h = hashlib.sha256()
    for s, t in pairs:
        h.update(s.encode() + b"\t" + t.encode() + b"\n")
    return h.hexdigest()[:16]


# What a resumed run keeps from the run it continues: the model's shape, the data order and the dropout masks.
KEPT_ON_RESUME = ("d_model", "n_heads", "n_encoder_layers", "n_decoder_layers", "d_ff", "norm", "activation",
                  "pos_encoding", "tie_embeddings", "max_len", "seed", "batch_size")  # fmt: skip


def contents_problem(directory: Path, state: dict) -> str | None:
    """What makes a translation checkpoint unusable by any --resume, whatever the flags (find_resume then falls
    back to the one before): weights that do not fit its config, a training state of the wrong shape."""
    problem = weights_problem(directory)
    if problem is None and not isinstance(state.get("data_fingerprint"), str):
        problem = f"{directory / 'trainer_state.json'} has no data fingerprint"
    if problem is None and not isinstance(state.get("train_config", {}), dict):
        problem = f"{directory / 'trainer_state.json'} holds a train_config that is not a JSON object"
    return problem


class Translation:
    """The translation task of the run loop (npgpt/loop/run.py names what a task supplies): an
    encoder-decoder learns to translate sentence pairs. Setting up reads, splits and encodes the data and
    checks the checkpoint to resume before anything is written."""

    summary_numbers = ("train_loss", "seconds", "cpu_seconds")  # finite, or no summary.json

    def __init__(self, cfg: Seq2SeqTrainConfig):
        cfg.validate()
        self.cfg, self.world = cfg, SingleProcess()
        self.t0, self.cpu0 = time.perf_counter(), cpu_seconds()
        self.out_dir = Path(cfg.out_dir)
        self.resume_dir, self.resume_state = find_resume(self.out_dir, cfg.resume, cfg.overwrite, check=contents_problem)
        self._read_data()
        self._build_model(self.resume_state)
        limit = self.model.config.max_len
        self.train_src, self.train_tgt = encode_pairs(self.train_pairs, self.vocab, limit, "training data")
        self.held_src, self.held_tgt = encode_pairs(self.held_pairs, self.vocab, limit, "held-out data")
        if self.held_src:  # the final evaluation's beam must fit, before anything is written
            sources_per_batch(self.model, cfg.final_beam, max(map(len, self.held_src)), 1, flag="--final-beam")
        self.batches = PositionedBatches(PairBatches(self.train_src, self.train_tgt, cfg.batch_size, seed=cfg.seed))
        sample_rows = np.random.default_rng(cfg.seed).permutation(len(self.held_pairs))[: cfg.eval_pairs]
        self.eval_rows = np.sort(sample_rows)
        self.schedule = LRSchedule(cfg.lr, cfg.max_steps, cfg.warmup_steps, cfg.min_lr)
        # the engine's buffers fit the longest training pair; "fast" lays the weights out in one buffer first
        longest = (max(map(len, self.train_src)), max(map(len, self.train_tgt)) + 1)  # targets gain <bos> / <eos>
        self.engine = make_engine(cfg.engine, self.model, cfg.batch_size, *longest)
        self.optimizer = AdamW(self.model.params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
        self.updater = Updater(self.engine, self.optimizer, grad_clip=cfg.grad_clip)
        self.history = {"train": [], "val": [], "exact": []}  # (step, value) at each evaluation
        self.last_val = self.last_exact = None
        self.sample = ""

    def _read_data(self) -> None:
        """Read and split the pairs (every problem is reported before anything is written)."""
        cfg = self.cfg
        pairs = read_pairs(resolve_pairs_path(cfg.data))
        if cfg.val_data is not None:
            self.train_pairs, self.held_pairs = pairs, read_pairs(resolve_pairs_path(cfg.val_data))
        else:
            self.train_pairs, self.held_pairs = split_pairs(pairs, cfg.held_out, cfg.split_seed)
        self.fingerprint = data_fingerprint(self.train_pairs) + data_fingerprint(self.held_pairs)

    def _build_model(self, state: dict | None) -> None:
        """The model and vocabulary of the checkpoint resumed (same data, more steps), or new ones."""
        cfg = self.cfg
        if state is None:
            self.vocab = Vocab.from_texts([t for p in self.train_pairs + self.held_pairs for t in p])
            self.model = Seq2Seq(cfg.model_config(len(self.vocab)), seed=cfg.seed, device=cfg.device, dtype=np.dtype(cfg.dtype))
            return
        if state.get("data_fingerprint") != self.fingerprint:
            raise ValueError(f"{self.resume_dir} was trained on other data or another split; resume with the same "
                             "--data, --val-data, --held-out and --split-seed")  # fmt: skip
        if cfg.max_steps <= state["step"]:
            raise ValueError(f"--max-steps {cfg.max_steps} is not beyond step {state['step']} of {self.resume_dir}; "
                             "give a larger --max-steps")  # fmt: skip
        self._check_resume_flags(state)
        self.model, self.vocab, _ = load_model(self.resume_dir, device=cfg.device, dtype=cfg.dtype)
        if self.model.config.dropout != cfg.dropout:  # --dropout may change, as --drop-rate for npgpt train
            self.model.config = self.model.config.replace(dropout=cfg.dropout)

    def _check_resume_flags(self, state: dict) -> None:
        """Refuse, by name, flags that the run resumed cannot honour: another model shape (its config.json), another
        --seed (the data order and the dropout masks follow it) or --batch-size. --lr, --dropout, the schedule
        and the intervals may change."""
        cfg, saved = self.cfg, dict(state.get("train_config") or {})
        saved.update({k: v for k, v in read_meta(self.resume_dir)[0].to_dict().items() if k in KEPT_ON_RESUME})
        for key in KEPT_ON_RESUME:
            if key in saved and saved[key] != getattr(cfg, key):
                flag = f"--{key.replace('_', '-')}"
                raise ValueError(f"{flag} {getattr(cfg, key)} cannot be honoured by --resume: the run being resumed "
                                 f"({self.resume_dir}) has {flag} {saved[key]}, and a resumed run keeps its model, data "
                                 f"order and seed; resume with {flag} {saved[key]} (or start a new run in another --out-dir)")  # fmt: skip

    def loop_settings(self) -> LoopSettings:
        c = self.cfg
        heldout = "".join(f"{s}\t{t}\n" for s, t in self.held_pairs)  # the pairs the model never trains on
        return LoopSettings(command="npgpt seq2seq train", out_dir=c.out_dir, total_steps=c.max_steps, lr=c.lr,
                            eval_interval=c.eval_interval, checkpoint_interval=c.checkpoint_interval,
                            keep_last=c.keep_last, max_bad_steps=c.max_bad_steps, progress=c.progress,
                            files={"heldout.tsv": heldout}, outputs=("loss.png", "heldout_errors.tsv"),
                            final_evaluation="exact match and BLEU on every held-out pair",
                            final_hint=f"npgpt seq2seq eval --checkpoint {c.out_dir}" + ("" if c.final_beam == 1 else f" --beam {c.final_beam}"))  # fmt: skip

    # --- what the loop asks of a task ---------------------------------------------------------------
    def banner(self, step: int) -> str:
        cfg, model = self.cfg, self.model
        mc = model.config
        return (f"npgpt seq2seq train: {model.num_params():,} parameters (d_model {mc.d_model}, {mc.n_heads} heads, "
                f"{mc.n_encoder_layers}+{mc.n_decoder_layers} layers, d_ff {mc.d_ff}, {mc.norm}-norm, {mc.activation}, "
                f"{mc.pos_encoding} positions) on {model.device}{tf32_note(model.device)}, {model.dtype}, {cfg.engine} engine; "
                f"vocabulary {len(self.vocab):,}; "
                f"{len(self.train_pairs):,} training / {len(self.held_pairs):,} held-out pairs; {cfg.max_steps} steps "
                f"of {cfg.batch_size} pairs" + (f"; resuming at step {step}" if step else ""))  # fmt: skip

    def train_step(self, number: int) -> StepResult:
        """Optimizer step `number` (from 1): its dropout masks are drawn from (seed, number - 1)."""
        lr = self.schedule(number - 1)
        src, tgt_in, targets = self.batches.next()
        r = self.updater([((src, tgt_in), targets, step_rng([self.cfg.seed, number - 1], self.model.xp))], lr=lr)
        return StepResult(r.loss, r.grad_norm, lr, r.applied)

    def evaluate(self, at: At) -> tuple[dict, str]:
        """Held-out loss (teacher forcing), greedy exact match on eval_rows and one sample translation."""
        self.last_val = self.held_out_loss(self.eval_rows)
        sample = ""
        if len(self.eval_rows):
            self.last_exact, _, hyps = self.score_held_out(self.eval_rows)
            src, ref = self.held_pairs[self.eval_rows[0]]
            sample = f"{src!r} -> {hyps[0]!r}" + ("" if hyps[0] == ref else f" (reference {ref!r})")
        self.sample = sample
        for key, value in (("train", at.train_loss), ("val", self.last_val), ("exact", self.last_exact)):
            if value is not None:
                self.history[key].append((at.step, value))
        record = {"kind": "eval", "step": at.step, "train_loss": at.train_loss, "val_loss": self.last_val,
                  "exact_match": self.last_exact, "sample": sample}  # fmt: skip
        fmt = lambda v, f: "n/a" if v is None else format(v, f)  # noqa: E731
        return record, (f"step {at.step:>5}  train {fmt(at.train_loss, '.3f')}  held-out {fmt(self.last_val, '.3f')}  "
                        f"exact {fmt(self.last_exact, '.1%')}  | {sample}")  # fmt: skip

    def weights_problem(self) -> str | None:
        return weights_not_finite(self.model.params.values())

    def write_model(self, directory) -> None:
        save_model(directory, self.model, self.vocab)

    def state(self) -> dict:
        return {"data_fingerprint": self.fingerprint, "history": self.history, "train_config": asdict(self.cfg),
                "n_train": len(self.train_pairs), "n_held_out": len(self.held_pairs),
                "rng": "dropout masks are seeded per step from (seed, step)"}  # fmt: skip

    def restore(self, state: dict) -> None:
        self.history = {**self.history, **state.get("history", {})}

    def finish(self, report: Report) -> Seq2SeqTrainResult:
        """Exact match and BLEU on every held-out pair (not after an interrupt), the plot, the summary."""
        exact = bleu = None
        if not report.interrupted and self.held_pairs:
            exact, bleu = self.final_evaluation()
        plot = plot_history(self.history, self.out_dir / "loss.png", read_metrics(report.metrics_path)) if self.history["train"] else None
        result = Seq2SeqTrainResult(
            steps=report.steps, seconds=time.perf_counter() - self.t0, cpu_seconds=cpu_seconds() - self.cpu0,
            train_loss=report.train_loss, val_loss=self.last_val, exact_match=exact, bleu=bleu,
            n_held_out=len(self.held_pairs), out_dir=str(self.out_dir),
            checkpoint=str(report.checkpoint) if report.checkpoint else None, plot=str(plot) if plot else None,
            sample=self.sample, interrupted=report.interrupted, skipped_steps=report.skipped_steps,
        )  # fmt: skip
        print(f"\nDone: {result.steps} steps in {result.seconds:.1f}s wall, {result.cpu_seconds:.1f}s CPU (user+sys)\n"
              f"checkpoint: {result.checkpoint}\nloss plot:  {result.plot}")  # fmt: skip
        return result

    # --- evaluation ---------------------------------------------------------------------------------
    def final_evaluation(self) -> tuple[float, float]:
        """(exact match, BLEU) on the whole held-out split with --final-beam; the misses go to heldout_errors.tsv."""
        t0, beam = time.perf_counter(), self.cfg.final_beam
        exact, bleu, hyps = self.score_held_out(np.arange(len(self.held_pairs)), beam=beam)
        misses = [(s, h, t) for (s, t), h in zip(self.held_pairs, hyps) if h != t]
        atomic_write_bytes(self.out_dir / "heldout_errors.tsv", "".join(f"{s}\t{h}\t{t}\n" for s, h, t in misses).encode())
        print(f"held-out: exact match {exact:.2%} ({len(self.held_pairs) - len(misses):,}/{len(self.held_pairs):,}), "
              f"BLEU {bleu:.2f} ({'greedy' if beam == 1 else f'beam {beam}'}, {time.perf_counter() - t0:.1f}s)")  # fmt: skip
        return exact, bleu

    def held_out_loss(self, rows) -> float | None:
        if len(rows) == 0:
            return None
        total = count = 0.0
        for i in range(0, len(rows), 256):
            r = rows[i : i + 256]
            src, tgt_in, targets = collate([self.held_src[j] for j in r], [self.held_tgt[j] for j in r])
            _, loss, _ = self.model.forward(src, tgt_in, targets)
            n = int((targets != self.model.config.pad_id).sum())
            total += float(loss) * n
            count += n
        return total / count

    def score_held_out(self, rows, beam=1):
        """(exact match, BLEU, hypotheses) of the held-out pairs `rows`."""
        hyps = [self.vocab.decode(o) for o in translate_ids(self.model, [self.held_src[j] for j in rows], beam=beam)]
        s = score(hyps, [self.held_pairs[j][1] for j in rows])
        return s.exact_match, s.bleu, hyps


def train(cfg: Seq2SeqTrainConfig) -> Seq2SeqTrainResult:
    task = Translation(cfg)
    return run_task(task, task.loop_settings(), task.resume_dir, task.resume_state)


def plot_history(history: dict, path, records=()) -> Path:
    """Training and held-out loss against steps, and held-out exact match on a second axis, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [(r["step"], r["loss"]) for r in records if r.get("kind") == "step"]
    if steps:
        s, loss = zip(*steps)
        ax.plot(s, loss, "-", color="tab:blue", alpha=0.25, linewidth=0.8, label="train loss (each step)")
    for key, style, color, label in (("train", "-o", "tab:blue", "train loss (mean since last eval)"),
                                     ("val", "--s", "tab:orange", "held-out loss")):  # fmt: skip
        if history.get(key):
            s, v = zip(*history[key])
            ax.plot(s, v, style, markersize=3, color=color, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss")
    ax.grid(alpha=0.3)
    lines, labels = ax.get_legend_handles_labels()
    if history.get("exact"):
        ax2 = ax.twinx()
        s, v = zip(*history["exact"])
        ax2.plot(s, [100 * x for x in v], "-^", markersize=3, color="tab:green", label="held-out exact match")
        ax2.set_ylabel("exact match (%)")
        ax2.set_ylim(0, 100)
        l2, lab2 = ax2.get_legend_handles_labels()
        lines, labels = lines + l2, labels + lab2
    ax.legend(lines, labels, loc="center right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def config_from_args(args) -> Seq2SeqTrainConfig:
    names = {f.name for f in fields(Seq2SeqTrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in names}
    if values.get("grad_clip") == 0:
        values["grad_clip"] = None
    return Seq2SeqTrainConfig(**values)
