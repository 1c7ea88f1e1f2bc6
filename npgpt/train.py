"""The Python API of `npgpt train`: pretrain (or fine-tune) a GPT on text files.

    from npgpt.train import TrainConfig, train
    result = train(TrainConfig(data=["the-verdict"], preset="nano", epochs=10))

One optimizer step (update.py): for each of `grad_accum` micro-batches, forward with dropout and
backward (the loss scaled by 1/grad_accum so the gradients sum to the mean), then clip the global
gradient norm, then AdamW with the learning rate of the warmup + cosine schedule. A step whose loss or
gradient norm is not finite is skipped without touching the weights or the optimizer state.

A run directory holds metrics.jsonl (one JSON record per step and per evaluation), loss.png (train and
val loss against steps and tokens seen), summary.json, and checkpoints/step-XXXXXXXX/ directories in the
Hugging Face layout (see checkpoint.py), the newest `keep_last` of them. The command line is in
npgpt/cli/train.py.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import checkpoint as ckpt
from .atomic import atomic_write_json
from .backend import set_tf32, to_numpy
from .checkpoint import CHECKPOINT_DIR, checkpoint_dirs, clean_stray_temporaries, latest_checkpoint, save_training_checkpoint
from .config import GPTConfig
from .data import Batches, TokenWindows, load_token_ids, resolve_data_path, split_ids
from .distributed import broadcast_params_, get_world, limit_threads_per_rank, use_local_gpu
from .engine import make_engine
from .generate import generate
from .metrics import MetricsLog, peak_rss_mb, plot_losses, read_metrics
from .model import GPT, make_rng
from .optim import AdamW
from .precision import LossScaler, check_precision, compute_dtype
from .schedule import LRSchedule
from .tokenizer import decode, encode, tokenizer_hash
from .update import Updater


class TrainingAborted(RuntimeError):
    """Training stopped on purpose (repeated non-finite steps, non-finite weights); the message says why."""


@dataclass
class TrainConfig:
    # data
    data: list = field(default_factory=lambda: ["the-verdict"])  # files, or bundled corpora by name
    train_ratio: float = 0.9
    stride: int | None = None  # default: context_length (non-overlapping windows)
    encoding_errors: str = "strict"  # or "replace"
    cache_dir: str | None = None  # token cache (default ~/.cache/npgpt/tokens or $NPGPT_CACHE_DIR)
    # model
    preset: str = "nano"
    context_length: int | None = None
    emb_dim: int | None = None
    n_heads: int | None = None
    n_layers: int | None = None
    drop_rate: float | None = None
    qkv_bias: bool | None = None
    tie_weights: bool | None = None
    init_from: str | None = None  # a Hugging Face GPT-2 directory or an npgpt checkpoint to start from
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
    beta1: float = 0.9
    beta2: float = 0.95  # as in most LLM recipes; PyTorch's default 0.999 learns small models much slower
    grad_clip: float | None = 1.0  # None or 0: no clipping
    max_bad_steps: int = 5  # consecutive non-finite steps before giving up
    # evaluation, samples, checkpoints
    out_dir: str = "runs/npgpt"
    eval_interval: int = 50  # steps; the last step is always evaluated
    eval_batches: int | None = None  # None: the whole validation split
    sample_prompt: str | None = None  # default: the first line of the training text
    sample_tokens: int = 40
    sample_temperature: float = 0.0
    sample_top_k: int | None = None
    checkpoint_interval: int | None = None  # steps; the end of the run is always saved
    keep_last: int = 3
    resume: bool = False
    overwrite: bool = False  # start afresh in an out_dir that has checkpoints (they are deleted)
    # machine
    engine: str = "fast"  # "fast" (engine.py: preallocated, fused) or "reference" (model.forward/backward)
    tf32: bool = True  # TensorFloat-32 matrix products on GPUs that have them (no effect on the CPU)
    precision: str = "fp32"  # "bf16" / "fp16": 16-bit activations and products, float32 weights (precision.py)
    loss_scale: float = 2.0**16  # fp16's initial loss scale (dynamic: halved on overflow, doubled after 2000 clean steps)
    seed: int = 0
    device: str | None = None
    dtype: str = "float32"
    progress: bool = True

    def model_config(self) -> GPTConfig:
        overrides = {
            k: getattr(self, k)
            for k in ("context_length", "emb_dim", "n_heads", "n_layers", "drop_rate", "qkv_bias", "tie_weights")
            if getattr(self, k) is not None
        }
        return GPTConfig.from_preset(self.preset, **overrides)

    def validate(self) -> None:
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("--batch-size and --grad-accum must be at least 1")
        if self.max_steps is None and (self.epochs is None or self.epochs <= 0):
            raise ValueError("give a positive --epochs or --max-steps")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"--max-steps must be at least 1, got {self.max_steps}")
        if self.eval_interval < 1:
            raise ValueError(f"--eval-interval must be at least 1, got {self.eval_interval}")
        if self.keep_last < 1:
            raise ValueError(f"--keep-last must be at least 1, got {self.keep_last}")
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
        if not self.data:
            raise ValueError("no training data given (--data FILE ...)")


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


def params_finite(params: dict) -> bool:
    return all(bool(np.isfinite(to_numpy(v)).all()) for v in params.values())


def sample_text(model: GPT, prompt_ids: list[int], n_tokens: int, temperature: float, top_k, seed: int) -> str:
    out = generate(model, np.asarray([prompt_ids]), n_tokens, temperature=temperature, top_k=top_k, seed=seed)
    return decode(out[0])


# --- the loop -------------------------------------------------------------------------------------


class _StopRequest:
    """SIGINT / SIGTERM set a flag; the loop finishes its step, saves and exits with 130."""

    def __init__(self):
        self.signal = None
        self._old = {}

    def __enter__(self):
        def handler(signum, frame):
            if self.signal is not None:  # a second signal: stop now
                raise KeyboardInterrupt
            self.signal = signum

        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[s] = signal.signal(s, handler)
            except ValueError:  # not the main thread: no signal handling
                pass
        return self

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, old)


def build_model(cfg: TrainConfig) -> GPT:
    dtype = np.dtype(cfg.dtype)
    if cfg.init_from:
        from .pretrained import load_pretrained

        fixed = [f"--{k.replace('_', '-')}" for k in ("emb_dim", "n_heads", "n_layers", "qkv_bias", "tie_weights")
                 if getattr(cfg, k) is not None]  # fmt: skip
        if fixed:
            raise ValueError(f"{', '.join(fixed)} cannot be combined with --init-from: the checkpoint fixes the model's shape")
        model = load_pretrained(cfg.init_from, device=cfg.device, dtype=dtype)
        changes = {k: getattr(cfg, k) for k in ("drop_rate",) if getattr(cfg, k) is not None}
        if changes:
            model.config = model.config.replace(**changes)
        return model
    return GPT(cfg.model_config(), seed=cfg.seed, device=cfg.device, dtype=dtype)


def build_or_resume(cfg: TrainConfig, world, out_dir: Path) -> tuple[GPT, Path | None, dict | None]:
    """(model, the checkpoint resumed or None, its training state or None): a fresh model, or the newest
    complete checkpoint's with --resume. With --overwrite the old checkpoints are removed. Every rank
    ends with rank 0's weights (and, on GPUs under MPI, an NCCL communicator)."""
    if not cfg.resume and not cfg.overwrite and checkpoint_dirs(out_dir):
        raise ValueError(
            f"{out_dir} already holds checkpoints of an earlier run; pass --resume to continue it, "
            "--overwrite to start again there (its checkpoints are replaced), or choose another --out-dir"
        )
    resume_dir = latest_checkpoint(out_dir, warn=world.is_root) if cfg.resume else None
    if cfg.resume and resume_dir is None:
        raise ValueError(f"--resume: no complete checkpoint in {out_dir / CHECKPOINT_DIR}; start without --resume")
    state = None
    if resume_dir is not None:
        from .pretrained import load_pretrained

        state = json.loads((resume_dir / ckpt.STATE_FILE).read_text())
        if cfg.max_steps is not None and cfg.max_steps <= state["step"]:
            raise ValueError(f"--max-steps {cfg.max_steps} is not beyond step {state['step']} of the checkpoint "
                             f"{resume_dir}, so there is nothing to resume; give a larger --max-steps")  # fmt: skip
        model = load_pretrained(resume_dir, device=cfg.device, dtype=np.dtype(cfg.dtype))
        if state.get("tokenizer") != tokenizer_hash():
            raise ValueError(f"{resume_dir} was trained with another tokenizer; it cannot be resumed with this one")
    else:
        model = build_model(cfg)
    world.barrier()
    if state is None and world.is_root:
        for old in checkpoint_dirs(out_dir):  # only reached with --overwrite
            shutil.rmtree(old)
    if world.backend != "none" and model.device == "cuda":
        world.setup_nccl()  # gradients stay on the GPUs: NCCL all-reduce, MPI only for the rendezvous
    broadcast_params_(world, model.params)
    return model, resume_dir, state


def default_prompt_ids(cfg: TrainConfig, train_ids, context_length: int) -> list[int]:
    """The prompt of the samples: --sample-prompt, or the first 8 tokens of the text's first non-empty line."""
    text = cfg.sample_prompt
    if text is None:
        first_line = next((ln for ln in decode(train_ids[:64]).splitlines() if ln.strip()), "")
        text = decode(encode(first_line)[:8]) or "\n"
    return encode(text)[-(context_length - 1) :] or [0]


class Trainer:
    """One training run: set up from a TrainConfig, then `run()`. Under MPI every rank builds one, all
    ranks compute, and only rank 0 writes (see distributed.py)."""

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
        if world.is_root:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            clean_stray_temporaries(self.out_dir)
        world.barrier()
        self._load_data()
        self.model, self.resume_dir, state = build_or_resume(cfg, world, self.out_dir)
        if self.model.device == "cuda":  # CUDA state only for a CUDA model
            set_tf32(cfg.tf32)
        self._set_up_training()
        if state is not None:
            self._restore(state)
        self.prompt_ids = default_prompt_ids(cfg, self.train_ids, self.model.config.context_length)
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self.metrics = MetricsLog(self.metrics_path, resume_at=self.step if state is not None else None, enabled=world.is_root)
        self.last_ckpt: Path | None = self.resume_dir
        self.last_train = self.last_val = None
        self.recent: list[float] = []  # the losses of the steps since the last evaluation
        self.sample = ""
        self.bar = None
        self.bad_in_a_row = 0  # consecutive non-finite steps

    # --- setting up ---------------------------------------------------------------------------------
    def _load_data(self) -> None:
        """Every rank reads the same tokens; each keeps its own rows of every global batch (train_step)."""
        cfg = self.cfg
        paths = [resolve_data_path(p) for p in cfg.data]
        ids = load_token_ids(paths, cache_dir=cfg.cache_dir, errors=cfg.encoding_errors)
        self.train_ids, self.val_ids = split_ids(ids, cfg.train_ratio)

    def _set_up_training(self) -> None:
        """Windows and batches, the schedule, the engine, the optimizer and the update."""
        cfg, model, world = self.cfg, self.model, self.world
        self.seq_len = cfg.context_length or model.config.context_length
        if self.seq_len > model.config.context_length:
            raise ValueError(f"--context-length {self.seq_len} exceeds the model's context_length {model.config.context_length}")
        self.train_windows = TokenWindows(self.train_ids, self.seq_len, cfg.stride, name="train")
        self.val_windows = TokenWindows(self.val_ids, self.seq_len, cfg.stride, name="val") if len(self.val_ids) else None
        self.batches = Batches(self.train_windows, cfg.batch_size, shuffle=True, seed=cfg.seed)
        self.batch_size, self.grad_accum = cfg.batch_size, cfg.grad_accum  # the global batch, micro-batches per step
        self.rank_batch = self.batch_size // world.size  # this rank's rows of each batch
        steps_per_epoch = max(1, self.batches.batches_per_epoch // self.grad_accum)
        self.total_steps = cfg.max_steps or max(1, int(math.ceil(cfg.epochs * steps_per_epoch)))
        self.schedule = LRSchedule(cfg.lr, self.total_steps, cfg.warmup_steps, cfg.min_lr, cfg.schedule)
        self.engine = make_engine(cfg.engine, model, self.rank_batch, self.seq_len, precision=cfg.precision)
        self.optimizer = AdamW(model.params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
        self.scaler = LossScaler(scale=cfg.loss_scale) if cfg.precision == "fp16" else None
        self.updater = Updater(self.engine, self.optimizer, world=world, scaler=self.scaler, grad_clip=cfg.grad_clip)
        self.step, self.tokens_seen, self.skipped = 0, 0, 0
        self.history = {"train": [], "val": []}  # (step, tokens, loss) at each evaluation

    def _restore(self, state: dict) -> None:
        """The optimizer, data position, counters, history and loss scale of the checkpoint resumed."""
        m, v = ckpt.load_optimizer_tensors(self.resume_dir)
        self.optimizer.load_state_dict({**state["optimizer"], "m": m, "v": v})
        self.batches.load_state_dict(state["data"])
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.skipped = state.get("skipped_steps", 0)
        self.history = state.get("history", self.history)
        if self.scaler is not None and state.get("loss_scaler"):
            self.scaler.load_state_dict(state["loss_scaler"])

    # --- pieces of the loop ---------------------------------------------------------------------------------
    def log(self, record: dict) -> None:
        self.metrics.write(record)

    def say(self, text: str) -> None:
        if self.world.is_root:
            (self.bar.write if self.bar is not None else print)(text)

    def training_state(self) -> dict:
        return {
            "format_version": ckpt.FORMAT_VERSION, "step": self.step, "tokens_seen": self.tokens_seen,
            "skipped_steps": self.skipped, "data": self.batches.state_dict(), "seed": self.cfg.seed,
            "schedule": asdict(self.schedule), "tokenizer": tokenizer_hash(), "train_config": asdict(self.cfg),
            "world_size": self.world.size, "history": self.history,
            "loss_scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": "dropout masks are seeded per step from (seed, step, micro-batch[, rank])",
        }  # fmt: skip

    def save(self) -> None:
        """A checkpoint of the current state (rank 0 writes; every rank checks the weights first)."""
        if not params_finite(self.model.params):
            self.log({"kind": "error", "step": self.step, "message": "non-finite weights: checkpoint not written"})
            raise TrainingAborted(f"step {self.step}: the weights are no longer finite, so no checkpoint was written; "
                                  "lower --lr and restart" + (f" from {self.last_ckpt}" if self.last_ckpt else ""))  # fmt: skip
        if self.world.is_root:
            # until this run has a checkpoint of its own, the one it resumed from is never cleaned up
            protect = [self.resume_dir] if self.resume_dir is not None and self.last_ckpt == self.resume_dir else []
            self.last_ckpt = save_training_checkpoint(self.out_dir, self.model, self.optimizer, self.training_state(),
                                                      self.cfg.keep_last, protect=protect)  # fmt: skip
        self.world.barrier()

    def evaluate(self) -> float | None:
        """Validation loss; under MPI each rank evaluates every size-th window and the sums are combined."""
        if self.val_windows is None:
            return None
        world, windows = self.world, self.val_windows
        mine = np.arange(world.rank, len(windows), world.size)
        if self.cfg.eval_batches is not None:
            mine = mine[: self.cfg.eval_batches * self.rank_batch]
        total = count = 0.0
        for i in range(0, len(mine), self.rank_batch):
            x, y = windows.batch(mine[i : i + self.rank_batch])
            total += self.engine.loss(x, y) * y.size
            count += y.size
        total, count = world.allreduce_sum([total, count])
        return float(total / max(count, 1))

    def eval_and_sample(self) -> None:
        self.last_train = float(np.mean(self.recent)) if self.recent else self.last_train
        self.recent = []
        self.last_val = self.evaluate()
        if self.world.is_root:
            c = self.cfg
            self.sample = sample_text(self.model, self.prompt_ids, c.sample_tokens, c.sample_temperature, c.sample_top_k, c.seed)
        if self.last_train is not None:
            self.history["train"].append((self.step, self.tokens_seen, self.last_train))
        if self.last_val is not None:
            self.history["val"].append((self.step, self.tokens_seen, self.last_val))
        self.log({"kind": "eval", "step": self.step, "tokens": self.tokens_seen, "train_loss": self.last_train,
                  "val_loss": self.last_val, "sample": self.sample})  # fmt: skip
        val_txt = f"{self.last_val:.3f}" if self.last_val is not None else "n/a"
        train_txt = f"{self.last_train:.3f}" if self.last_train is not None else "n/a"
        self.say(f"step {self.step:>6}  tokens {self.tokens_seen:>9,}  train {train_txt}  val {val_txt}  | {self.sample!r}")

    def micro_batch_rng(self, micro: int):
        parts = [self.cfg.seed, self.step, micro] + ([self.world.rank] if self.world.size > 1 else [])
        return make_rng(int(np.random.SeedSequence(parts).generate_state(1)[0]), self.model.xp)

    def train_step(self) -> tuple[float, float, float]:
        """One optimizer step over grad_accum micro-batches -> (loss, gradient norm, learning rate)."""
        lr = self.schedule(self.step)
        lo, hi = self.world.rank * self.rank_batch, (self.world.rank + 1) * self.rank_batch
        micro_batches = []
        for micro in range(self.grad_accum):
            x, y = self.batches.next()
            micro_batches.append((x[lo:hi], y[lo:hi], self.micro_batch_rng(micro)))  # this rank's rows
        r = self.updater(micro_batches, lr=lr)
        if r.overflow:  # float16 overflow: the update was skipped and the loss scale lowered
            self.skipped += 1
            self.log({"kind": "skip", "step": self.step, "loss": r.loss, "grad_norm": r.grad_norm,
                      "reason": "fp16 overflow", "loss_scale": self.scaler.scale})  # fmt: skip
            self.say(f"step {self.step}: float16 gradients overflowed; update skipped, loss scale now {self.scaler.scale:g}")
        elif r.applied:
            self.bad_in_a_row = 0
            self.recent.append(r.loss)
        else:
            self.skipped += 1
            self.bad_in_a_row += 1
            self.log({"kind": "skip", "step": self.step, "loss": r.loss, "grad_norm": r.grad_norm})
            self.say(f"step {self.step}: loss {r.loss} / gradient norm {r.grad_norm} not finite; update skipped")
            if self.bad_in_a_row >= self.cfg.max_bad_steps:
                raise TrainingAborted(
                    f"{self.bad_in_a_row} consecutive steps had a non-finite loss or gradient (last at step {self.step}); "
                    "training stopped. Lower --lr, set --grad-clip, or check the data"
                    + (f"; the last good checkpoint is {self.last_ckpt}" if self.last_ckpt else "")
                )
        return r.loss, r.grad_norm, lr

    # --- the loop ------------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        from tqdm.auto import tqdm

        self.say(self._banner())
        first_step, step_times = self.step, []
        t_start = time.perf_counter()
        self.bar = tqdm(total=self.total_steps, initial=self.step, disable=not (self.cfg.progress and self.world.is_root),
                        unit="step", dynamic_ncols=True)  # fmt: skip
        with _StopRequest() as stop:
            try:
                interrupted = self._loop(stop, step_times)
                if self.step > first_step or self.last_ckpt is None:
                    self.save()
            finally:
                self.bar.close()
                self.metrics.close()
        return self._finish(time.perf_counter() - t_start, step_times, interrupted)

    def _banner(self) -> str:
        cfg, model, world = self.cfg, self.model, self.world
        c = model.config
        ranks = f" on {world.size} ranks" if world.size > 1 else ""
        compute = "" if cfg.precision == "fp32" else f" weights, {cfg.precision} compute"
        return (f"npgpt train: {model.num_params():,} parameters ({c.n_layers} layers, C={c.emb_dim}, NH={c.n_heads}) on "
                f"{model.device}{ranks}, {model.dtype}{compute}; {len(self.train_ids):,} train / {len(self.val_ids):,} val "
                f"tokens; {self.total_steps} steps of {self.batch_size}x{self.grad_accum}x{self.seq_len} tokens"
                + (f"; resuming at step {self.step}" if self.step else ""))  # fmt: skip

    def _loop(self, stop, step_times: list) -> bool:
        """Steps until total_steps, with evaluations and checkpoints; True when a signal stopped it."""
        cfg, tokens_per_step = self.cfg, self.batch_size * self.grad_accum * self.seq_len
        while self.step < self.total_steps:
            t0 = time.perf_counter()
            loss, norm, lr = self.train_step()
            self.step += 1
            self.tokens_seen += tokens_per_step
            dt = time.perf_counter() - t0
            step_times.append(dt)
            self.log({"kind": "step", "step": self.step, "tokens": self.tokens_seen, "loss": loss, "lr": lr,
                      "grad_norm": norm, "ms": dt * 1e3, "tokens_per_s": tokens_per_step / dt})  # fmt: skip
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_step / dt:,.0f}")
            if self.step % cfg.eval_interval == 0 or self.step == self.total_steps:
                self.eval_and_sample()
            if self.world.allreduce_max(1.0 if stop.signal is not None else 0.0) > 0:  # every rank stops together
                return True
            if cfg.checkpoint_interval and self.step % cfg.checkpoint_interval == 0 and self.step < self.total_steps:
                self.save()
        return False

    def _finish(self, seconds: float, step_times: list, interrupted: bool) -> TrainResult:
        """The loss plot, summary.json and the printed summary."""
        plot = None
        if self.world.is_root and (self.history["train"] or self.history["val"]):
            step_losses = [(r["step"], r["loss"]) for r in read_metrics(self.metrics_path) if r.get("kind") == "step"]
            plot = plot_losses(self.history, self.out_dir / "loss.png", step_losses)
        times = step_times[1:] or step_times  # the first step includes one-off allocations
        median = float(np.median(times)) if times else float("nan")
        tokens_per_step = self.batch_size * self.grad_accum * self.seq_len
        result = TrainResult(
            steps=self.step, tokens_seen=self.tokens_seen, train_loss=self.last_train, val_loss=self.last_val,
            seconds=seconds, ms_per_step=1e3 * median, tokens_per_second=tokens_per_step / median,
            peak_memory_mb=peak_rss_mb(), out_dir=str(self.out_dir),
            checkpoint=str(self.last_ckpt) if self.last_ckpt else None, plot=str(plot) if plot else None,
            sample=self.sample, interrupted=interrupted, skipped_steps=self.skipped,
        )  # fmt: skip
        if self.world.is_root:
            atomic_write_json(self.out_dir / "summary.json", asdict(result))
            print_summary(result)
            if interrupted:
                print(f"Interrupted by a signal; saved {self.last_ckpt}. Resume with:\n"
                      f"  npgpt train --out-dir {self.out_dir} --resume  (plus the same data and model options)")  # fmt: skip
        return result


def train(cfg: TrainConfig) -> TrainResult:
    """Run training as configured; returns a summary (also printed and written to summary.json)."""
    return Trainer(cfg).run()


def print_summary(r: TrainResult) -> None:
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    print(
        f"\nDone: {r.steps} steps, {r.tokens_seen:,} tokens in {r.seconds:.1f}s "
        f"({r.ms_per_step:.0f} ms/step, {r.tokens_per_second:,.0f} tokens/s, peak memory {r.peak_memory_mb:,.0f} MB)\n"
        f"train loss {fmt(r.train_loss)}, val loss {fmt(r.val_loss)}"
        + (f", {r.skipped_steps} non-finite steps skipped" if r.skipped_steps else "")
        + f"\ncheckpoint: {r.checkpoint}\nloss plot:  {r.plot}\nsample:     {r.sample!r}"
    )
