"""The fine-tuning loop both tasks share: AdamW over the trainable parameters, epochs, logs, checkpoints.

One optimizer step: `step(batch, rng)` (forward + backward, steps.py), clip the global norm of the
trainable gradients, AdamW with the warmup + cosine learning rate. Frozen parameters are not in the
optimizer at all, so they stay bit-identical. A step whose loss or gradient norm is not finite is
skipped (five in a row stop the run). After every epoch the run evaluates, logs, and writes a
checkpoint (model, optimizer, state, manifest: checkpoint.py's rules, the newest `keep_last` good ones
kept).

A run directory holds metrics.jsonl (a record per step and per epoch), the plots, summary.json and
checkpoints/step-XXXXXXXX/.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import numpy as np

from .. import checkpoint as ckpt
from ..backend import get_array_module, resolve_device
from ..config import GPTConfig
from ..memory import check_fits, estimate_training
from ..model import GPT, make_rng
from ..optim import AdamW, clip_grad_norm, grad_norm
from ..schedule import LRSchedule
from ..tokenizer import tokenizer_hash
from .config import FinetuneConfig

MAX_BAD_STEPS = 5


def check_out_dir(cfg: FinetuneConfig) -> Path:
    """The output directory, refused when it holds an earlier run (nothing is written here)."""
    out = Path(cfg.out_dir)
    if ckpt.checkpoint_dirs(out) and not cfg.overwrite:
        raise ValueError(f"{out} already holds checkpoints of an earlier run; pass --overwrite to replace them, "
                         "or choose another --out-dir")  # fmt: skip
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out-dir {out} is a file; choose a directory")
    return out


def build_trunk(cfg: FinetuneConfig, longest: int) -> tuple[GPT, int]:
    """(the pretrained model of --init-from or a new model of --preset, tokens per example); `longest`
    is the longest training example in tokens (see FinetuneConfig.context_for). The run's memory is
    estimated (check_memory) before the model is made or loaded."""
    dtype = np.dtype(cfg.dtype)
    if cfg.init_from is None:
        T = cfg.context_for(longest)
        config = cfg.new_model_config(T)
        check_memory(cfg, config, T)
        return GPT(config, seed=cfg.seed, device=cfg.device, dtype=dtype), T
    from ..pretrained import load_pretrained, source_config

    config = source_config(cfg.init_from)
    if config is not None:
        if cfg.context_length is not None and cfg.context_length > config.context_length:
            raise ValueError(f"--context-length {cfg.context_length} exceeds the context of {cfg.init_from} "
                             f"({config.context_length}); give at most that")  # fmt: skip
        check_memory(cfg, config, cfg.context_for(longest, config.context_length))
    model = load_pretrained(cfg.init_from, device=cfg.device, dtype=dtype)
    if cfg.drop_rate is not None:
        model.config = model.config.replace(drop_rate=cfg.drop_rate)
    if cfg.context_length is not None and cfg.context_length > model.config.context_length:
        raise ValueError(f"--context-length {cfg.context_length} exceeds the context of {cfg.init_from} "
                         f"({model.config.context_length}); give at most that")  # fmt: skip
    return model, cfg.context_for(longest, model.config.context_length)


def check_memory(cfg: FinetuneConfig, config: GPTConfig, seq_len: int) -> None:
    """Refuse, with the numbers, a run whose estimated memory exceeds what is available, before anything
    is allocated. memory.py's estimate for training every parameter: an upper bound when some are frozen
    (their gradients and AdamW moments are never allocated)."""
    device = resolve_device(cfg.device)
    est = estimate_training(config, cfg.batch_size, seq_len, cfg.dtype, "fp32", cfg.engine, gpu=device == "cuda")
    fix = "make the batch smaller (--batch-size, --context-length)" + ("" if cfg.init_from else " or the model (--preset, --emb-dim, --n-layers)")
    check_fits(est, device, fix=fix)


class Run:
    """Optimizer, schedule, logs and checkpoints of one fine-tuning run, and its step loop.

    step: a steps.py object (call it, read .loss and .grads). params: every parameter (the trainable
    ones are updated in place). write_model(directory): writes the model files of a checkpoint.
    """

    def __init__(self, cfg: FinetuneConfig, step, params: dict, trainable: list[str], steps_per_epoch: int, write_model):
        from tqdm.auto import tqdm

        self.cfg, self.step, self.write_model = cfg, step, write_model
        self.trainable = list(trainable)
        self.xp = get_array_module(params[self.trainable[0]])
        self.out = Path(cfg.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        ckpt.clean_stray_temporaries(self.out)
        for old in ckpt.checkpoint_dirs(self.out):  # only with --overwrite (check_out_dir refused otherwise)
            shutil.rmtree(old)
        self.optimizer = AdamW({k: params[k] for k in trainable}, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
        self.total_steps = steps_per_epoch * cfg.epochs
        self.schedule = LRSchedule(cfg.lr, self.total_steps, cfg.warmup_steps, cfg.min_lr)
        self.steps_per_epoch = steps_per_epoch
        self.n_step, self.skipped, self.bad_in_a_row = 0, 0, 0
        self.step_times: list[float] = []
        self.step_losses: list[tuple[float, float]] = []  # (fractional epoch, step_value(step)) of every step
        self.step_value = lambda s: s.loss  # what the loss plot draws per step (classify: L_FT alone)
        self.last_ckpt = None
        self.metrics = open(self.out / "metrics.jsonl", "w", encoding="utf-8")
        self.bar = tqdm(total=self.total_steps, disable=not cfg.progress, unit="step", dynamic_ncols=True)
        self.t_start = time.perf_counter()

    def log(self, record: dict) -> None:
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()

    def say(self, text: str) -> None:
        (self.bar.write if not self.bar.disable else print)(text)

    def train_epoch(self, batches, epoch: int, extra=None) -> list[float]:
        """One pass over `batches`; returns the losses of the steps taken. extra(step) -> dict adds
        task-specific fields to each step's record."""
        losses = []
        for batch in batches:
            t0 = time.perf_counter()
            lr = self.schedule(self.n_step)
            rng = make_rng(int(np.random.SeedSequence([self.cfg.seed, self.n_step]).generate_state(1)[0]), self.xp)
            s = self.step(batch, rng)
            norm = clip_grad_norm(s.grads, self.cfg.grad_clip) if self.cfg.grad_clip else grad_norm(s.grads)
            self.n_step += 1
            record = {"kind": "step", "step": self.n_step, "epoch": epoch, "loss": s.loss, "lr": lr, "grad_norm": norm}
            if math.isfinite(s.loss) and math.isfinite(norm):
                self.optimizer.step(s.grads, lr=lr)
                self.bad_in_a_row = 0
                losses.append(s.loss)
                self.step_losses.append((epoch - 1 + len(losses) / self.steps_per_epoch, self.step_value(s)))
            else:
                self.skip(record)
            dt = time.perf_counter() - t0
            self.step_times.append(dt)
            self.log({**record, **(extra(s) if extra else {}), "ms": 1e3 * dt})
            self.bar.update(1)
            self.bar.set_postfix(epoch=epoch, loss=f"{s.loss:.3f}", lr=f"{lr:.1e}")
        return losses

    def skip(self, record: dict) -> None:
        from ..train import TrainingAborted

        self.skipped += 1
        self.bad_in_a_row += 1
        self.log({**record, "kind": "skip"})
        self.say(f"step {self.n_step}: loss {record['loss']} / gradient norm {record['grad_norm']} not finite; update skipped")
        if self.bad_in_a_row >= MAX_BAD_STEPS:
            raise TrainingAborted(f"{self.bad_in_a_row} consecutive steps had a non-finite loss or gradient; "
                                  "training stopped. Lower --lr or check the data")  # fmt: skip

    def save(self, epoch: int, history: dict) -> Path:
        state = {"format_version": ckpt.FORMAT_VERSION, "step": self.n_step, "epoch": epoch, "task": self.cfg.task,
                 "trainable": self.trainable, "schedule": {"max_lr": self.schedule.max_lr, "total_steps": self.total_steps},
                 "tokenizer": tokenizer_hash(), "finetune_config": vars(self.cfg), "history": history,
                 # where the data stands: saved after a whole epoch, so the next one starts at its first batch
                 # (each epoch's order is a permutation seeded by (seed, epoch))
                 "data": {"epoch": epoch, "cursor": 0, "seed": self.cfg.seed, "batch_size": self.cfg.batch_size,
                          "shuffle": True, "steps_per_epoch": self.steps_per_epoch}}  # fmt: skip
        self.last_ckpt = ckpt.save_training_checkpoint(self.out, None, self.optimizer, state, self.cfg.keep_last,
                                                       write_model=self.write_model)  # fmt: skip
        return self.last_ckpt

    def close(self) -> dict:
        """Close the bar and the log; timing figures of the run."""
        self.bar.close()
        self.metrics.close()
        times = self.step_times[1:] or self.step_times  # the first step includes one-off allocations
        return {"seconds": time.perf_counter() - self.t_start, "steps": self.n_step, "skipped_steps": self.skipped,
                "ms_per_step": 1e3 * float(np.median(times)) if times else float("nan")}  # fmt: skip
