"""The Python API of `npgpt train`: pretrain (or fine-tune) a GPT on text files or token shards.

    from npgpt.train import TrainConfig, train
    result = train(TrainConfig(data=["the-verdict"], preset="nano", epochs=10))
    result = train(TrainConfig(data=["data/mycorpus"], preset="gpt2", max_steps=1000))   # npgpt prepare's shards

The pretraining task of the one run loop (npgpt/loop/): `Pretraining` reads and checks everything, then
the loop runs it (progress, evaluations, checkpoints, signals, --resume, summary.json; see
npgpt/loop/run.py). What this task adds:

One optimizer step (update.py): for each of `grad_accum` micro-batches, forward with dropout and
backward (the loss scaled by 1/grad_accum so the gradients sum to the mean), then clip the global
gradient norm, then AdamW with the learning rate of the warmup + cosine schedule. A step whose loss or
gradient norm is not finite is skipped without touching the weights or the optimizer state; weights
that are not finite, or give a non-finite loss, are never saved: the run has diverged and stops
(TrainingAborted) with its last good checkpoint kept.

Setting up checks everything before touching the run's folder: the settings (TrainConfig.validate),
the data, the checkpoint to resume and what it can honour, and the memory the run needs (memory.py).

A run directory holds metrics.jsonl (one JSON record per step and per evaluation; an evaluation's
train_loss is the mean of the steps since the last one, dropout on, and with --eval-train-batches N its
train_eval_loss is the train loss evaluated like val_loss, dropout off, on N random batches), loss.png
(those losses against steps and tokens seen), summary.json, and checkpoints/step-XXXXXXXX/ directories in the
Hugging Face layout (see checkpoint.py), the newest `keep_last` of them. The command line is in
npgpt/cli/train.py.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import checkpoint as ckpt
from .backend import resolve_device, tf32_note
from . import validate as V
from .config import PRESETS, GPTConfig
from .data import Batches, TokenWindows, load_token_ids, read_text, resolve_data_path, split_ids, split_text_ids
from .shard_sampler import ShardWindows, WindowSampler
from .shards import DATA_FORMATS, ShardSet, data_kind, find_shards
from .distributed import broadcast_params_, get_world, limit_threads_per_rank, use_local_gpu
from .engine import make_engine
from .generate import generate
from .loop import (At, LoopSettings, Report, SaveFailed, StepResult, TrainingAborted, TrainingInterrupted, find_resume,
                   run_task, step_rng, weights_not_finite)  # fmt: skip
from .memory import RECOMPUTE_MODES, available_memory, check_fits, estimate_training, plan_report
from .metrics import peak_rss_mb, plot_losses, read_metrics
from .model import GPT
from .optim import DECAY_FILTERS, AdamW
from .precision import LossScaler, check_precision, compute_dtype
from .schedule import LRSchedule
from .sampling import check_sampling_args
from .tokenizer import EOT_ID, decode, encode, tokenizer_hash
from .update import Updater


DECAY_CHOICES = tuple(DECAY_FILTERS)  # --weight-decay-on
MAX_EPOCHS = 1e9  # more than any run takes (--epochs 1e308 made an infinite step count: OverflowError)
__all__ = ["Pretraining", "SaveFailed", "TrainConfig", "TrainResult", "TrainingAborted", "TrainingInterrupted", "train"]


@dataclass
class TrainConfig:
    # data
    data: list = field(default_factory=lambda: ["the-verdict"])  # text files, bundled corpora by name, or token shards
    data_format: str = "auto"  # "nanogpt": --data names nanoGPT's raw uint16 train.bin / val.bin (see shards.py)
    train_ratio: float = 0.9
    split_by: str = "tokens"  # "characters": cut the text at train_ratio of its characters, then tokenise each part (the book's way)
    stride: int | None = None  # default: context_length (non-overlapping windows)
    encoding_errors: str = "strict"  # or "replace"
    cache_dir: str | None = None  # token cache (default ~/.cache/npgpt/tokens or $NPGPT_CACHE_DIR)
    # model
    preset: str | None = None  # None: "nano" for a new model (a resumed or --init-from model keeps its own)
    context_length: int | None = None
    emb_dim: int | None = None
    n_heads: int | None = None
    n_layers: int | None = None
    drop_rate: float | None = None
    qkv_bias: bool | None = None
    tie_weights: bool | None = None
    init_from: str | None = None  # a Hugging Face GPT-2 directory or an npgpt checkpoint to start from
    init: str | None = None  # a new model's initialisation (model.init_params): "gpt2" (None) or "pytorch"
    # optimisation
    batch_size: int = 4  # the global batch (split among the ranks under MPI)
    grad_accum: int = 1
    epochs: float | None = 20  # used when max_steps is None
    max_steps: int | None = None
    lr: float = 1e-3
    min_lr: float | None = None  # default 0.1 * lr
    warmup_steps: int = 0
    schedule: str = "cosine"
    weight_decay: float = 0.1
    weight_decay_on: str = "matrices"  # "matrices": ndim >= 2 tensors only; "all": every parameter (the book's AdamW)
    beta1: float = 0.9
    beta2: float = 0.95  # as in most LLM recipes; PyTorch's default 0.999 learns small models much slower
    grad_clip: float | None = 1.0  # None or 0: no clipping
    max_bad_steps: int = 5  # consecutive non-finite steps before giving up
    # evaluation, samples, checkpoints
    out_dir: str = "runs/npgpt"
    eval_interval: int = 50  # steps; the last step is always evaluated
    eval_offset: int = 0  # evaluate after the steps s with (s - eval_offset) % eval_interval == 0; 1: steps 1, 1+k, ...
    eval_batches: int | None = None  # None: the whole validation split
    eval_train_batches: int | None = None  # N: also the train loss without dropout on N random train batches
    sample_prompt: str | None = None  # default: the first line of the training text
    sample_tokens: int = 40
    sample_temperature: float = 0.0
    sample_top_k: int | None = None
    checkpoint_interval: int | None = None  # steps; the end of the run is always saved
    keep_last: int = 3
    resume: bool = False
    overwrite: bool = False  # start afresh in an out_dir that has checkpoints (they are deleted)
    # machine
    engine: str = "fast"  # "fast" (npgpt/engine/: preallocated, fused) or "reference" (model.forward/backward)
    tf32: bool = True  # TensorFloat-32 matrix products on GPUs that have them (no effect on the CPU)
    precision: str = "fp32"  # "bf16" / "fp16": 16-bit activations and products, float32 weights (precision.py)
    recompute: str = "none"  # "attention" / "mlp" / "block": keep less in the forward, recompute it (npgpt/engine/)
    dry_run: bool = False  # print the memory estimate and FLOPs (dry_run_report) and allocate nothing
    loss_scale: float = 2.0**16  # fp16's initial loss scale (dynamic: halved on overflow, doubled after 2000 clean steps)
    seed: int = 0
    device: str | None = None
    dtype: str = "float32"
    progress: bool = True
    recipe: str | None = None  # the recipe (recipes.py) the settings came from, named in messages about them
    from_recipe: tuple = ()  # the settings whose values are the recipe's (not given beside it)

    def flag(self, name: str, text: str | None = None) -> str:
        """The flag of setting `name` as a message names it ("--preset gpt2"), saying when the value is the
        recipe's rather than one the user typed."""
        text = text or f"--{name.replace('_', '-')} {getattr(self, name)}"
        return f"{text} (from --recipe {self.recipe})" if name in self.from_recipe else text

    def model_config(self) -> GPTConfig:
        overrides = {
            k: getattr(self, k)
            for k in ("context_length", "emb_dim", "n_heads", "n_layers", "drop_rate", "qkv_bias", "tie_weights")
            if getattr(self, k) is not None
        }
        return GPTConfig.from_preset(self.preset or "nano", **overrides)

    def validate(self) -> None:
        """Every setting by itself and against the others, reading nothing from disk but the paths'
        existence: a run that cannot work is refused here, before any file is touched. Messages name
        the command line's flags."""
        self._check_data()
        self._check_model()
        self._check_optimisation()
        self._check_output()
        self._check_machine()

    def _check_data(self) -> None:
        if not self.data:
            raise ValueError("no training data given (--data FILE ...)")
        if self.data_format not in DATA_FORMATS:
            raise ValueError(f"--data-format must be one of {', '.join(DATA_FORMATS)}, got {self.data_format!r}")
        for spec in self.data:
            V.not_empty("--data", spec, "a UTF-8 text file, a bundled corpus (the-verdict, tang300) or token shards")
        V.real("--train-ratio", self.train_ratio, 0, 1, lo_open=True, hint="it is the share of the text used for training")
        if self.split_by not in ("tokens", "characters"):
            raise ValueError(f"--split-by must be tokens or characters, got {self.split_by!r}")
        if self.stride is not None:
            V.integer("--stride", self.stride, 1)
        if self.encoding_errors not in ("strict", "replace"):
            raise ValueError(f"--encoding-errors must be strict or replace, got {self.encoding_errors!r}")
        if self.split_by == "tokens":  # (the characters split tokenises each run anew: no cache)
            if self.cache_dir is not None:
                V.cache_dir("--cache-dir", self.cache_dir)
            elif os.environ.get("NPGPT_CACHE_DIR"):
                V.cache_dir("NPGPT_CACHE_DIR", os.environ["NPGPT_CACHE_DIR"])

    def _check_model(self) -> None:
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"--preset {self.preset!r} is not a preset; choose one of {', '.join(PRESETS)}")
        for flag, value, lo in (("--context-length", self.context_length, 1), ("--emb-dim", self.emb_dim, 1),
                                ("--n-heads", self.n_heads, 1), ("--n-layers", self.n_layers, 0)):  # fmt: skip
            if value is not None:
                V.integer(flag, value, lo)
        if self.drop_rate is not None:
            V.real("--drop-rate", self.drop_rate, 0, 1, hi_open=True, hint="0 turns dropout off")
        if self.init is not None:
            from .model import INITS

            if self.init not in INITS:
                raise ValueError(f"--init must be one of {', '.join(INITS)}, got {self.init!r}")
            if self.init_from is not None:
                raise ValueError(f"--init {self.init} cannot be combined with --init-from: the checkpoint gives the "
                                 "starting weights; leave --init out")  # fmt: skip
        if self.init_from is not None:
            from .pretrained import check_source

            check_source(self.init_from, "--init-from")
            fixed = [f"--{k.replace('_', '-')}" for k in ("preset", "emb_dim", "n_heads", "n_layers", "qkv_bias", "tie_weights")
                     if getattr(self, k) is not None]  # fmt: skip
            if fixed:
                raise ValueError(f"{', '.join(fixed)} cannot be combined with --init-from: the checkpoint fixes the "
                                 "model's shape; leave them out")  # fmt: skip
        elif not self.resume:
            c = GPTConfig.from_preset(self.preset or "nano")
            C, NH = self.emb_dim or c.emb_dim, self.n_heads or c.n_heads
            if C % NH:
                raise ValueError(f"--emb-dim {C} is not divisible by --n-heads {NH}; choose --n-heads from "
                                 f"{[h for h in range(1, min(C, 64) + 1) if C % h == 0]} or a multiple of {NH} for --emb-dim")  # fmt: skip

    def _check_optimisation(self) -> None:
        integer, real = V.integer, V.real
        integer("--batch-size", self.batch_size, 1)
        integer("--grad-accum", self.grad_accum, 1)
        if self.max_steps is not None:
            integer("--max-steps", self.max_steps, 1)
        elif self.epochs is None:
            raise ValueError("give a positive --epochs or --max-steps")
        if self.epochs is not None:  # checked even when --max-steps overrides it: a typo is still a typo
            real("--epochs", self.epochs, 0, MAX_EPOCHS, lo_open=True, hint="or give --max-steps")
        real("--lr", self.lr, 0, lo_open=True)
        if self.min_lr is not None:
            real("--min-lr", self.min_lr, 0, self.lr, hint=f"it is the final learning rate, at most --lr {self.lr:g}")
        integer("--warmup-steps", self.warmup_steps, 0)
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"--schedule must be cosine or constant, got {self.schedule!r}")
        real("--weight-decay", self.weight_decay, 0)
        if self.weight_decay_on not in DECAY_CHOICES:
            raise ValueError(f"--weight-decay-on must be one of {', '.join(DECAY_CHOICES)}, got {self.weight_decay_on!r}")
        real("--beta1", self.beta1, 0, 1, hi_open=True)
        real("--beta2", self.beta2, 0, 1, hi_open=True)
        if self.grad_clip is not None:
            real("--grad-clip", self.grad_clip, 0, lo_open=True, hint="0 turns clipping off")
        integer("--max-bad-steps", self.max_bad_steps, 1)

    def _check_output(self) -> None:
        integer = V.integer
        V.out_dir("--out-dir", self.out_dir)
        integer("--eval-interval", self.eval_interval, 1)
        integer("--eval-offset", self.eval_offset, 0, hint="1 evaluates right after the first step")
        if self.eval_train_batches is not None:
            integer("--eval-train-batches", self.eval_train_batches, 1, hint="leave it out to log only the running mean")
        if self.eval_batches is not None:
            integer("--eval-batches", self.eval_batches, 1, hint="leave it out to evaluate the whole validation split")
        if self.sample_prompt is not None and not self.sample_prompt:
            raise ValueError("--sample-prompt is empty; give some text, or leave it out to start the samples with the "
                             "data's first line")  # fmt: skip
        integer("--sample-tokens", self.sample_tokens, 0)
        check_sampling_args(self.sample_temperature, self.sample_top_k, None, prefix="--sample-")
        if self.checkpoint_interval is not None:
            integer("--checkpoint-interval", self.checkpoint_interval, 1, hint="leave it out to save only at the end")
        integer("--keep-last", self.keep_last, 1)
        if self.resume and self.overwrite:
            raise ValueError("--resume continues the run in --out-dir and --overwrite replaces it; give one of them")

    def _check_machine(self) -> None:
        if self.engine not in ("fast", "reference"):
            raise ValueError(f"--engine must be fast or reference, got {self.engine!r}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"--dtype must be float32 or float64, got {self.dtype!r}")
        check_precision(self.precision)
        if self.precision != "fp32":
            if self.engine != "fast":
                raise ValueError(f"--precision {self.precision} runs in the fast engine; drop --engine {self.engine}")
            compute_dtype(self.precision, np.dtype(self.dtype))  # float32 master weights, ml_dtypes for bf16
        if not (1.0 <= self.loss_scale <= 2.0**24):
            raise ValueError(f"--loss-scale must lie in [1, 2**24], got {self.loss_scale}")
        if self.recompute not in RECOMPUTE_MODES:
            raise ValueError(f"--recompute must be one of {', '.join(RECOMPUTE_MODES)}, got {self.recompute!r}")
        if self.recompute != "none" and self.engine != "fast":
            raise ValueError(f"--recompute {self.recompute} runs in the fast engine; drop --engine {self.engine}")
        V.integer("--seed", self.seed, 0)


@dataclass
class TrainResult:
    steps: int
    tokens_seen: int
    train_loss: float | None
    val_loss: float | None
    seconds: float
    ms_per_step: float
    tokens_per_second: float
    peak_memory_mb: float
    out_dir: str
    checkpoint: str | None
    plot: str | None
    sample: str
    interrupted: bool = False
    skipped_steps: int = 0
    train_eval_loss: float | None = None  # --eval-train-batches: the last train loss evaluated without dropout


def sample_text(model: GPT, prompt_ids: list[int], n_tokens: int, temperature: float, top_k, seed: int) -> str:
    out = generate(model, np.asarray([prompt_ids]), n_tokens, temperature=temperature, top_k=top_k, seed=seed)
    return decode(out[0])


# --- the data: text files or token shards ------------------------------------------------------------
# Text files are read whole, tokenised (and cached), and cut at --train-ratio (data.py); every rank holds
# all of it and keeps its rows of each global batch (RankRows). Token shards (a folder npgpt prepare wrote,
# llm.c's .bin files, nanoGPT's train.bin / val.bin; shards.py) are read by memory map a batch at a time,
# each rank reading only its rows (shard_sampler.WindowSampler), so memory does not grow with the corpus;
# files named *val* are the validation split. docs/data.md says it for users.

SHARD_EVAL_BATCHES = 20  # an evaluation on token shards without --eval-batches: the first 20 batches (llm.c's default)


def find_shard_data(cfg: TrainConfig) -> ShardSet | None:
    """The token shards --data names, with their headers (and a prepared folder's manifest) checked and
    nothing else read; None when --data names text files. Refuses, naming the fix, the text-only settings
    shards cannot honour and shards without a validation split when validation is wanted: --train-ratio
    below 1 (for text it cuts off the validation split; with shards, 1 says to train without one)."""
    if data_kind(cfg.data, cfg.data_format) == "text":
        return None
    if cfg.split_by != "tokens":
        raise ValueError(f"{cfg.flag('split_by')} cuts text files; token shards come split by their files (those named "
                         "*val* are the validation data): leave --split-by out (beside a --recipe: --split-by tokens)")  # fmt: skip
    if cfg.encoding_errors != "strict":
        raise ValueError(f"{cfg.flag('encoding_errors')} decodes text files; token shards are tokens already: leave "
                         "--encoding-errors out")  # fmt: skip
    if cfg.cache_dir is not None:
        raise ValueError(f"{cfg.flag('cache_dir')} keeps the tokens of text files; token shards are tokens already: leave "
                         "--cache-dir out")  # fmt: skip
    if cfg.train_ratio not in (TrainConfig.train_ratio, 1.0):
        raise ValueError(f"{cfg.flag('train_ratio', f'--train-ratio {cfg.train_ratio:g}')} cuts text files; token shards "
                         "come split by their files (those named *val* are the validation data): leave --train-ratio "
                         "out, or give --train-ratio 1 to train without a validation loss")  # fmt: skip
    try:
        shards = find_shards(cfg.data, cfg.data_format)
    except ValueError as e:  # shards.py names the file; the command line's flag goes first
        raise ValueError(str(e) if str(e).startswith("--data") else f"--data {e}") from None
    if not shards.val and cfg.train_ratio < 1:
        what = {"npgpt prepare": "has no validation shard (it was prepared with --val-tokens 0, or from too few documents "
                                 "for --val-share); prepare it again with --val-tokens N or --split-on-blank-lines",
                "nanoGPT": "names no val.bin; add nanoGPT's val.bin to --data"}.get(shards.kind,  # fmt: skip
               "names no validation shard (a .bin file with 'val' in its name, like fineweb_val_000000.bin); add one to --data")
        raise ValueError(f"--data {shards.where} {what}, or pass --train-ratio 1 to train without a validation loss")
    return shards


class RankRows:
    """Text batches as a run takes them: this rank's rows [r B/W, (r+1) B/W) of each global batch of a
    data.Batches (whose position, saved in checkpoints, is global), under the loop's names next(),
    state(), restore(state). WindowSampler(rank=r, world_size=W) gives token shards' batches the same way."""

    def __init__(self, batches: Batches, rank: int = 0, world_size: int = 1):
        self.batches, self.rank, self.share = batches, rank, batches.batch_size // world_size

    def next(self):
        x, y = self.batches.next()  # (B, T) each: the global batch
        lo, hi = self.rank * self.share, (self.rank + 1) * self.share
        return x[lo:hi], y[lo:hi]  # (B/W, T) each

    def state(self) -> dict:
        return self.batches.state_dict()

    def restore(self, state: dict) -> None:
        if state.get("kind") == "shard windows":
            raise ValueError("the checkpoint resumed was trained on token shards, and --data names text files; resume "
                             "with the --data the run started with")  # fmt: skip
        self.batches.load_state_dict(state)


def shard_data_report(cfg: TrainConfig, shards: ShardSet, seq_len: int) -> str:
    """What --dry-run says of token shards: what was found, what a batch reads, an epoch in steps (as
    Pretraining._set_up_data counts them)."""
    train = ShardWindows(shards.train, seq_len, cfg.stride, name="train")
    epoch = max(1, len(train) // cfg.batch_size // cfg.grad_accum)
    steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * epoch))
    batch_kib = cfg.batch_size * (seq_len + 1) * 2 / 1024
    if cfg.train_ratio >= 1:
        val = "no validation (--train-ratio 1)"
    else:
        n_val = len(ShardWindows(shards.val, seq_len, cfg.stride, name="validation"))
        n_eval = min(n_val, (cfg.eval_batches or SHARD_EVAL_BATCHES) * cfg.batch_size)
        val = f"each evaluation on {n_eval:,} of the {n_val:,} validation windows"
    return (f"data: {shards.describe()}\n"
            f"  read by memory map, one batch at a time ({cfg.batch_size} x {seq_len + 1} tokens, {batch_kib:,.1f} KiB): "
            f"the corpus is not held in memory\n"
            f"  {len(train):,} train windows: an epoch is {epoch:,} steps of {cfg.batch_size} x {cfg.grad_accum} x {seq_len} "
            f"tokens; this run: {steps:,} steps; {val}")  # fmt: skip


def shard_data_summary(shards: ShardSet, validating: bool) -> str:
    """Token shards as the banner names them."""
    val = f"{shards.tokens('val'):,} val tokens" if validating else "no validation (--train-ratio 1)"
    return (f"{shards.where} ({shards.kind}, {len(shards.train) + len(shards.val)} shards, read by memory map): "
            f"{shards.tokens('train'):,} train tokens, {val}")  # fmt: skip


def shard_first_tokens(shards: ShardSet, n: int = 64) -> np.ndarray:
    """The first n tokens of the training shards without their <|endoftext|> separators: the text the
    default sample prompt starts from."""
    first = next(s for s in shards.train if s.n_tokens)  # (ShardWindows made sure one has tokens)
    head = first.read([0], min(n, first.n_tokens))[0]
    return head[head != EOT_ID]


# --- setting up ------------------------------------------------------------------------------------


def build_model(cfg: TrainConfig, config: GPTConfig, resume_dir: Path | None) -> GPT:
    """The model a run starts from: the checkpoint resumed, the --init-from one, or a fresh one; with
    `config` (find_start's), which carries --drop-rate for the first two."""
    if resume_dir is not None or cfg.init_from:
        from .pretrained import load_pretrained

        model = load_pretrained(resume_dir or cfg.init_from, device=cfg.device, dtype=np.dtype(cfg.dtype))
        model.config = config
        return model
    return GPT(config, seed=cfg.seed, device=cfg.device, dtype=np.dtype(cfg.dtype), init=cfg.init or "gpt2")


def run_seq_len(cfg: TrainConfig, context_length: int) -> int:
    """The run's tokens per row: --context-length, at most the model's context_length (a ValueError
    naming both), else the model's."""
    seq_len = cfg.context_length or context_length
    if seq_len > context_length:
        raise ValueError(f"{cfg.flag('context_length')} exceeds the model's context_length {context_length}; "
                         f"use at most {context_length}")  # fmt: skip
    return seq_len


def check_memory(cfg: TrainConfig, config: GPTConfig, rows: int) -> None:
    """Refuse, with the numbers, a run whose estimated memory (memory.py) exceeds what is available,
    before anything is allocated."""
    device = resolve_device(cfg.device)
    seq_len = min(cfg.context_length or config.context_length, config.context_length)
    est = estimate_training(config, rows, seq_len, cfg.dtype, cfg.precision, cfg.engine, cfg.grad_accum,
                            gpu=device == "cuda", recompute=cfg.recompute)  # fmt: skip
    available = available_memory(device)
    fixed_model = cfg.resume or cfg.init_from
    if available is not None and est.weights + est.gradients + est.optimizer > available:
        fix = ("the model alone (weights, gradients, AdamW moments) does not fit: " +
               ("use a machine with more memory" if fixed_model else "make it smaller (--preset, --emb-dim, --n-layers)"))
    else:
        fix = ("make the batch smaller (--batch-size, --context-length; --grad-accum keeps the batch in smaller pieces)"
               + (", keep less with --recompute attention|mlp|block" if cfg.engine == "fast" and cfg.recompute != "block" else "")
               + ("" if fixed_model else " or the model (--n-layers, --emb-dim)")
               + "; --dry-run shows the largest batch that fits")  # fmt: skip
    check_fits(est, device, fix=fix, available=available)


def dry_run_report(cfg: TrainConfig) -> str:
    """What `npgpt train --dry-run` prints (memory.plan_report for this run's model, batch and settings),
    after the same checks as a run (settings, the checkpoint to resume); nothing is allocated, nothing is
    written, and no data is read but token shards' headers (with the windows, batches and steps they make)."""
    cfg.validate()
    shards = find_shard_data(cfg)
    if shards is None:
        for spec in cfg.data:  # there, and files (nothing is read)
            resolve_data_path(spec)
    config, _, _ = find_start(cfg, Path(cfg.out_dir), warn=False)
    seq_len = run_seq_len(cfg, config.context_length)
    name = cfg.init_from or (f"resumed from {cfg.out_dir}" if cfg.resume else cfg.preset or "nano")
    report = plan_report(config, cfg.batch_size, seq_len, cfg.dtype, cfg.precision, cfg.engine, cfg.grad_accum,
                         cfg.recompute, resolve_device(cfg.device), name=name)  # fmt: skip
    return report if shards is None else report + "\n" + shard_data_report(cfg, shards, seq_len)


MODEL_FLAGS = ("emb_dim", "n_heads", "n_layers", "qkv_bias", "tie_weights")


def check_resume_flags(cfg: TrainConfig, saved: GPTConfig, state: dict, resume_dir: Path) -> None:
    """Refuse, by name, flags that a resumed run cannot honour: a model shape other than the checkpoint's
    (--preset, --emb-dim, ...), another --seed (the data order is the run's), another --init-from, --init or
    --weight-decay-on."""
    wanted = {}
    if cfg.preset is not None:
        preset = GPTConfig.from_preset(cfg.preset)
        wanted.update({k: (getattr(preset, k), cfg.flag("preset")) for k in MODEL_FLAGS})
    for k in MODEL_FLAGS:
        v = getattr(cfg, k)
        if v is not None:
            flag = f"--{'' if v or not isinstance(v, bool) else 'no-'}{k.replace('_', '-')}"
            wanted[k] = (v, cfg.flag(k, flag if isinstance(v, bool) else f"{flag} {v}"))
    differ = [(flag, k, v) for k, (v, flag) in wanted.items() if getattr(saved, k) != v]
    if differ:
        flags = sorted({flag for flag, _, _ in differ})
        saved_txt = ", ".join(f"{k}={getattr(saved, k)}" for _, k, _ in differ)
        leave = f"--recipe {cfg.recipe}" if all("--recipe" in f for f in flags) else " and ".join(flags)
        raise ValueError(f"{' and '.join(flags)} cannot be honoured by --resume: the checkpoint {resume_dir} has "
                         f"{saved_txt}, and a resumed run keeps its model; leave {leave} out "
                         "(or start a new run in another --out-dir)")  # fmt: skip
    run_cfg = state.get("train_config") or {}
    if "seed" in state and state["seed"] != cfg.seed:
        raise ValueError(f"{cfg.flag('seed')} differs from the seed {state['seed']} of the run being resumed, whose data "
                         f"order and dropout follow its seed; resume with --seed {state['seed']}")  # fmt: skip
    theirs = {"init": run_cfg.get("init") or "gpt2", "weight_decay_on": run_cfg.get("weight_decay_on") or "matrices"}
    mine = {"init": cfg.init or theirs["init"], "weight_decay_on": cfg.weight_decay_on}  # --init only when given
    for key in [k for k in theirs if mine[k] != theirs[k]]:
        flag = f"--{key.replace('_', '-')}"
        raise ValueError(f"{cfg.flag(key, f'{flag} {mine[key]}')} cannot be honoured by --resume: the run being resumed "
                         f"has {flag} {theirs[key]}; resume with {flag} {theirs[key]} (or start a new run in another --out-dir)")  # fmt: skip
    if cfg.init_from is not None and run_cfg.get("init_from") != cfg.init_from:
        raise ValueError(f"--init-from {cfg.init_from} cannot be honoured by --resume: the run continues from its own "
                         f"checkpoint {resume_dir}; leave --init-from out")  # fmt: skip


def checkpoint_contents_problem(directory: Path, state: dict) -> str | None:
    """What makes a checkpoint of pretraining unusable by any --resume, whatever the flags (find_resume
    then falls back to the one before): weights that do not fit its config, a training state of the wrong
    shape. None when it is usable."""
    from .pretrained import weights_problem

    problem = weights_problem(directory)
    if problem is not None:
        return problem
    where = directory / ckpt.STATE_FILE
    if "seed" in state and not (isinstance(state["seed"], int) and not isinstance(state["seed"], bool) and state["seed"] >= 0):
        return f"{where} holds seed = {state['seed']!r}, not a whole number >= 0"
    for key in ("train_config", "schedule", "loss_scaler"):
        if state.get(key) is not None and not isinstance(state[key], dict):
            return f"{where} holds a {key} that is not a JSON object"
    scale = (state.get("loss_scaler") or {}).get("scale", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < float("inf"):
        return f"{where} holds a loss scale of {scale!r}, not a finite number > 0"
    return None


def find_start(cfg: TrainConfig, out_dir: Path, warn: bool = True) -> tuple[GPTConfig, Path | None, dict | None]:
    """(the model's config, the checkpoint to resume or None, its training state or None), reading only
    small files: nothing is loaded, allocated, or changed in out_dir."""
    resume_dir, state = find_resume(out_dir, cfg.resume, cfg.overwrite, warn=warn, check=checkpoint_contents_problem)
    if resume_dir is None:
        if not cfg.init_from:
            return cfg.model_config(), None, None
        from .pretrained import source_config

        config = source_config(cfg.init_from)
        if config is None:
            raise ValueError(f"--init-from {cfg.init_from} has no config.json beside its weights; put the model's config.json there")
        return (config.replace(drop_rate=cfg.drop_rate) if cfg.drop_rate is not None else config), None, None
    from .pretrained import read_config

    if cfg.max_steps is not None and cfg.max_steps <= state["step"]:
        raise ValueError(f"--max-steps {cfg.max_steps} is not beyond step {state['step']} of the checkpoint "
                         f"{resume_dir}, so there is nothing to resume; give a larger --max-steps")  # fmt: skip
    if state.get("tokenizer") != tokenizer_hash():
        raise ValueError(f"{resume_dir} was trained with another tokenizer; it cannot be resumed with this one")
    saved = read_config(resume_dir / ckpt.CONFIG_FILE)
    check_resume_flags(cfg, saved, state, resume_dir)
    return (saved.replace(drop_rate=cfg.drop_rate) if cfg.drop_rate is not None else saved), resume_dir, state


def default_prompt_ids(cfg: TrainConfig, train_ids, context_length: int) -> list[int]:
    """The prompt of the samples: --sample-prompt, or the first 8 tokens of the text's first non-empty line."""
    text = cfg.sample_prompt
    if text is None:
        first_line = next((ln for ln in decode(train_ids[:64]).splitlines() if ln.strip()), "")
        text = decode(encode(first_line)[:8]) or "\n"
    return encode(text)[-(context_length - 1) :] or [0]


class Pretraining:
    """The pretraining task of the run loop (npgpt/loop/run.py names what a task supplies): a GPT learns
    the next token of windows of text. Under MPI every rank builds one, all ranks compute, and only rank 0
    writes (see distributed.py).

    Setting up reads and checks everything (the settings, the data, the checkpoint to resume, the memory
    the run needs) and allocates the model, the engine and the optimizer; the run's folder is touched only
    by the loop, once all of that holds, so a refused run changes nothing there."""

    summary_numbers = ("train_loss", "seconds", "ms_per_step", "tokens_per_second")  # finite, or no summary.json

    def __init__(self, cfg: TrainConfig):
        cfg.validate()
        self.cfg = cfg
        self.world = world = get_world()
        use_local_gpu(world, cfg.device)  # under MPI: this rank's GPU, before anything is allocated
        if world.size > 1:
            limit_threads_per_rank(world)
        if cfg.batch_size % world.size:
            raise ValueError(f"--batch-size {cfg.batch_size} is the global batch and must be divisible by the "
                             f"{world.size} ranks; use a multiple of {world.size}")  # fmt: skip
        self.out_dir = Path(cfg.out_dir)
        self._load_data()
        config, self.resume_dir, self.resume_state = find_start(cfg, self.out_dir, warn=world.is_root)
        self._set_up_data(config.context_length)
        check_memory(cfg, config, self.rank_batch)
        self.model = build_model(cfg, config, self.resume_dir)
        world.barrier()
        if world.backend != "none" and self.model.device == "cuda":
            world.setup_nccl()  # gradients stay on the GPUs: NCCL all-reduce, MPI only for the rendezvous
        broadcast_params_(world, self.model.params)  # every rank starts from rank 0's weights
        self._set_up_training()
        first = self.train_ids[:64] if self.shards is None else shard_first_tokens(self.shards)
        self.prompt_ids = default_prompt_ids(cfg, first, self.model.config.context_length)
        self.history = {"train": [], "val": [], "train_eval": []}  # (step, tokens, loss) at each evaluation
        self.last_val = self.last_train_eval = None
        self.sample = ""

    def loop_settings(self) -> LoopSettings:
        c = self.cfg
        return LoopSettings(command="npgpt train", out_dir=c.out_dir, total_steps=self.total_steps, lr=c.lr,
                            eval_interval=c.eval_interval, eval_offset=c.eval_offset,
                            checkpoint_interval=c.checkpoint_interval, keep_last=c.keep_last,
                            max_bad_steps=c.max_bad_steps, more_steps="--max-steps (or --epochs)", progress=c.progress,
                            tf32=c.tf32 if self.model.device == "cuda" else None, outputs=("loss.png",))  # fmt: skip

    # --- setting up ---------------------------------------------------------------------------------
    def _load_data(self) -> None:
        """Text files: every rank reads and tokenises them all and keeps its own rows of every global batch
        (RankRows). Token shards: only their headers are read here; each rank reads its rows of each batch
        by memory map as it trains (_set_up_data)."""
        cfg = self.cfg
        self.shards = find_shard_data(cfg)
        if self.shards is not None:
            return
        paths = [resolve_data_path(p) for p in cfg.data]
        if cfg.split_by == "characters":  # the book's way: cut the text, then tokenise each part
            texts = [read_text(p, cfg.encoding_errors) for p in paths]
            self.train_ids, self.val_ids = split_text_ids(texts, cfg.train_ratio)
            return
        ids = load_token_ids(paths, cache_dir=cfg.cache_dir, errors=cfg.encoding_errors)
        self.train_ids, self.val_ids = split_ids(ids, cfg.train_ratio)

    def _set_up_data(self, context_length: int) -> None:
        """Windows and batches for a model of this context length (the data must hold enough of them)."""
        cfg, world = self.cfg, self.world
        self.seq_len = run_seq_len(cfg, context_length)
        if self.shards is not None:  # one epoch: floor(windows / B) batches, the stream running on across epochs
            self.train_windows = ShardWindows(self.shards.train, self.seq_len, cfg.stride, name="train")
            self.val_windows = (ShardWindows(self.shards.val, self.seq_len, cfg.stride, name="validation")
                                if self.shards.val and cfg.train_ratio < 1 else None)  # fmt: skip
            sampler = WindowSampler(self.train_windows, cfg.batch_size, seed=cfg.seed, rank=world.rank, world_size=world.size)
            self.batches, batches_per_epoch = sampler, sampler.batches_per_epoch  # each rank reads only its rows
        else:  # one epoch: a permutation of the windows, the last partial batch dropped
            self.train_windows = TokenWindows(self.train_ids, self.seq_len, cfg.stride, name="train")
            self.val_windows = TokenWindows(self.val_ids, self.seq_len, cfg.stride, name="val") if len(self.val_ids) else None
            batches = Batches(self.train_windows, cfg.batch_size, shuffle=True, seed=cfg.seed)
            self.batches, batches_per_epoch = RankRows(batches, world.rank, world.size), batches.batches_per_epoch
        self.batch_size, self.grad_accum = cfg.batch_size, cfg.grad_accum  # the global batch, micro-batches per step
        self.rank_batch = self.batch_size // world.size  # this rank's rows of each batch
        self.tokens_per_step = self.batch_size * self.grad_accum * self.seq_len
        steps_per_epoch = max(1, batches_per_epoch // self.grad_accum)
        self.total_steps = cfg.max_steps or max(1, int(math.ceil(cfg.epochs * steps_per_epoch)))
        self.schedule = LRSchedule(cfg.lr, self.total_steps, cfg.warmup_steps, cfg.min_lr, cfg.schedule)

    def _set_up_training(self) -> None:
        """The engine, the optimizer and the update."""
        cfg, model, world = self.cfg, self.model, self.world
        self.engine = make_engine(cfg.engine, model, self.rank_batch, self.seq_len, precision=cfg.precision,
                                  recompute=cfg.recompute)  # fmt: skip
        self.optimizer = AdamW(model.params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay,
                               decay_filter=DECAY_FILTERS[cfg.weight_decay_on])  # fmt: skip
        self.scaler = LossScaler(scale=cfg.loss_scale) if cfg.precision == "fp16" else None
        self.updater = Updater(self.engine, self.optimizer, world=world, scaler=self.scaler, grad_clip=cfg.grad_clip)

    # --- what the loop asks of a task ---------------------------------------------------------------
    def banner(self, step: int) -> str:
        cfg, model, world = self.cfg, self.model, self.world
        c = model.config
        ranks = f" on {world.size} ranks" if world.size > 1 else ""
        compute = "" if cfg.precision == "fp32" else f" weights, {cfg.precision} compute"
        data = (f"{len(self.train_ids):,} train / {len(self.val_ids):,} val tokens" if self.shards is None
                else shard_data_summary(self.shards, self.val_windows is not None))  # fmt: skip
        return (f"npgpt train: {model.num_params():,} parameters ({c.n_layers} layers, C={c.emb_dim}, NH={c.n_heads}) on "
                f"{model.device}{tf32_note(model.device)}{ranks}, {model.dtype}{compute}; {data}; "
                f"{self.total_steps} steps of {self.batch_size}x{self.grad_accum}x{self.seq_len} tokens"
                + (f"; resuming at step {step}" if step else ""))  # fmt: skip

    def train_step(self, number: int) -> StepResult:
        """Optimizer step `number` (from 1) over grad_accum micro-batches, this rank's rows of each."""
        done = number - 1  # the steps before this one: the schedule's and the dropout seed's step
        lr = self.schedule(done)
        micro_batches = []
        for micro in range(self.grad_accum):
            x, y = self.batches.next()  # (B/W, T) each: this rank's rows of the next global batch
            micro_batches.append((x, y, self.micro_batch_rng(done, micro)))
        r = self.updater(micro_batches, lr=lr)
        return StepResult(r.loss, r.grad_norm, lr, r.applied, overflow=r.overflow, tokens=self.tokens_per_step,
                          loss_scale=self.scaler.scale if self.scaler is not None else None)  # fmt: skip

    def micro_batch_rng(self, done: int, micro: int):
        """The dropout generator of micro-batch `micro` of the step after `done` steps: a pure function of
        (seed, step, micro-batch[, rank]), so a resumed run draws the same masks."""
        parts = [self.cfg.seed, done, micro] + ([self.world.rank] if self.world.size > 1 else [])
        return step_rng(parts, self.model.xp)

    def evaluate(self, at: At) -> tuple[dict, str]:
        """Validation loss, the train loss without dropout (--eval-train-batches) and a sample."""
        self.last_val = self.val_loss()
        self.last_train_eval = self.evaluate_train(at.step)
        if self.world.is_root:
            c = self.cfg
            self.sample = sample_text(self.model, self.prompt_ids, c.sample_tokens, c.sample_temperature, c.sample_top_k, c.seed)
        for name, value in (("train", at.train_loss), ("val", self.last_val), ("train_eval", self.last_train_eval)):
            if value is not None:
                self.history[name].append((at.step, at.tokens, value))
        record = {"kind": "eval", "step": at.step, "tokens": at.tokens, "train_loss": at.train_loss,
                  "val_loss": self.last_val, "sample": self.sample}  # fmt: skip
        evaluated = ""
        if self.last_train_eval is not None:  # a measurement of its own, logged and plotted under its own name
            record["train_eval_loss"] = self.last_train_eval
            evaluated = f"  train (eval) {self.last_train_eval:.3f}"
        fmt = lambda v: f"{v:.3f}" if v is not None else "n/a"  # noqa: E731
        line = (f"step {at.step:>6}  tokens {at.tokens:>9,}  train {fmt(at.train_loss)}{evaluated}  val {fmt(self.last_val)}"
                f"  | {self.sample!r}")  # fmt: skip
        return record, line

    def weights_problem(self) -> str | None:
        """Why the current weights must not be saved (not finite, or a non-finite loss), or None."""
        problem = weights_not_finite(self.model.params.values())
        if problem is not None:
            return problem
        loss = self.probe_loss()
        if not math.isfinite(loss):
            return f"the weights give a non-finite loss ({loss}) on a validation batch"
        return None

    def write_model(self, directory) -> None:
        ckpt.save_model(directory, self.model)

    def state(self) -> dict:
        return {"seed": self.cfg.seed, "schedule": asdict(self.schedule), "tokenizer": tokenizer_hash(),
                "train_config": asdict(self.cfg), "world_size": self.world.size, "history": self.history,
                "loss_scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "rng": "dropout masks are seeded per step from (seed, step, micro-batch[, rank])"}  # fmt: skip

    def restore(self, state: dict) -> None:
        """The history and the loss scale of the checkpoint resumed (the loop restores the rest)."""
        self.history = {**self.history, **state.get("history", {})}
        if self.scaler is not None and state.get("loss_scaler"):
            self.scaler.load_state_dict(state["loss_scaler"])

    def finish(self, report: Report) -> TrainResult:
        """The loss plot and the printed summary."""
        plot = None
        if self.world.is_root and (self.history["train"] or self.history["val"]):
            step_losses = [(r["step"], r["loss"]) for r in read_metrics(report.metrics_path) if r.get("kind") == "step"]
            plot = plot_losses(self.history, self.out_dir / "loss.png", step_losses)
        result = TrainResult(
            steps=report.steps, tokens_seen=report.tokens_seen, train_loss=report.train_loss, val_loss=self.last_val,
            seconds=report.seconds, ms_per_step=report.ms_per_step,
            tokens_per_second=self.tokens_per_step / (report.ms_per_step / 1e3), peak_memory_mb=peak_rss_mb(),
            out_dir=str(self.out_dir), checkpoint=str(report.checkpoint) if report.checkpoint else None,
            plot=str(plot) if plot else None, sample=self.sample, interrupted=report.interrupted,
            skipped_steps=report.skipped_steps, train_eval_loss=self.last_train_eval,
        )  # fmt: skip
        if self.world.is_root:
            print_summary(result)
        return result

    # --- evaluation ---------------------------------------------------------------------------------
    def val_loss(self) -> float | None:
        """Validation loss; under MPI each rank evaluates every size-th window and the sums are combined.
        All of a text's validation split, or the first --eval-batches batches of it; of token shards'
        (gigabytes, maybe), the first --eval-batches or SHARD_EVAL_BATCHES batches."""
        if self.val_windows is None:
            return None
        world, windows = self.world, self.val_windows
        n_batches = self.cfg.eval_batches or (SHARD_EVAL_BATCHES if self.shards is not None else None)
        end = len(windows) if n_batches is None else min(len(windows), n_batches * self.batch_size)
        mine = np.arange(world.rank, end, world.size)  # (the first n_batches global batches, this rank's share)
        return self._mean_loss(windows, mine)

    def _mean_loss(self, windows, mine) -> float:
        """Mean loss (dropout off, no update) over this rank's windows `mine`, averaged over all ranks."""
        total = count = 0.0
        for i in range(0, len(mine), self.rank_batch):
            x, y = windows.batch(mine[i : i + self.rank_batch])
            total += self.engine.loss(x, y) * y.size
            count += y.size
        total, count = self.world.allreduce_sum([total, count])
        return float(total / max(count, 1))

    def eval_train_windows(self, step: int) -> np.ndarray:
        """The train windows of the evaluation after `step` steps with --eval-train-batches: the first N
        batches of a fresh permutation of the train split, drawn from (seed, step) as a shuffled loader
        would give them (the training order is not touched, and a resumed run draws the same ones). From
        token shards: N batches of distinct windows drawn from (seed, step) without a permutation of them all,
        whose size would grow with the corpus."""
        n = min(self.cfg.eval_train_batches * self.batch_size, len(self.train_windows))
        rng = np.random.default_rng([self.cfg.seed, step, 1])
        if self.shards is not None:
            return rng.choice(len(self.train_windows), n, replace=False)  # (NumPy draws few of many without permuting all)
        return rng.permutation(len(self.train_windows))[:n]

    def evaluate_train(self, step: int) -> float | None:
        """The train loss measured as the validation loss is (dropout off, no update) on the windows of
        eval_train_windows: what the book calls the train loss, not the running mean of the steps."""
        if not self.cfg.eval_train_batches:
            return None
        world, windows = self.world, self.train_windows
        mine = self.eval_train_windows(step)[world.rank :: world.size]
        return self._mean_loss(windows, mine)

    def probe_loss(self) -> float:
        """The loss of the current weights on the first batch of the validation split (the training split
        when there is none), without dropout: a check that the weights still compute something finite."""
        windows = self.val_windows if self.val_windows is not None else self.train_windows
        x, y = windows.batch(np.arange(min(self.rank_batch, len(windows))))
        return float(self.engine.loss(x, y))


def train(cfg: TrainConfig) -> TrainResult:
    """Run training as configured; returns a summary (also printed and written to summary.json)."""
    task = Pretraining(cfg)
    return run_task(task, task.loop_settings(), task.resume_dir, task.resume_state)


def print_summary(r: TrainResult) -> None:
    fmt = lambda v: "n/a" if v is None or not math.isfinite(v) else f"{v:.3f}"  # noqa: E731
    print(
        f"\nDone: {r.steps} steps, {r.tokens_seen:,} tokens in {r.seconds:.1f}s "
        f"({r.ms_per_step:.0f} ms/step, {r.tokens_per_second:,.0f} tokens/s, peak memory {r.peak_memory_mb:,.0f} MB)\n"
        f"train loss {fmt(r.train_loss)}"
        + (f" (mean of the steps since the last evaluation; evaluated without dropout: {fmt(r.train_eval_loss)})"
           if r.train_eval_loss is not None else "")
        + f", val loss {fmt(r.val_loss)}"
        + (f", {r.skipped_steps} non-finite steps skipped" if r.skipped_steps else "")
        + f"\ncheckpoint: {r.checkpoint}\nloss plot:  {r.plot}\nsample:     {r.sample!r}"
    )
