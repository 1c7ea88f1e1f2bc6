"""What both fine-tuning tasks share: the model to start from, the epochs of batches, the update, and
what a resumed run must keep. The run itself is the one run loop's (npgpt/loop/): progress, evaluations,
checkpoints, signals, --resume and summary.json, as for every task.

One optimizer step (Tuner.train_step): `step(batch, rng)` (forward + backward, steps.py or fast_steps.py),
clip the global norm of the trainable gradients, AdamW with the warmup + cosine learning rate. Frozen
parameters are not in the optimizer at all, so they stay bit-identical. A step whose loss or gradient
norm is not finite is skipped (five in a row stop the run). After every epoch the run evaluates, logs,
and writes a checkpoint (model, optimizer, state, manifest: checkpoint.py's rules, the newest `keep_last`
good ones kept); a signal writes one in the middle of an epoch, and --resume goes on from there.

A run directory holds metrics.jsonl (a record per step and per epoch), the plots, summary.json and
checkpoints/step-XXXXXXXX/.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..backend import get_array_module, resolve_device
from ..config import GPTConfig
from ..loop import LoopSettings, StepResult, find_resume, step_rng, weights_not_finite
from ..memory import check_fits, estimate_training
from ..model import GPT
from ..optim import AdamW, clip_grad_norm, grad_norm
from ..schedule import LRSchedule
from ..tokenizer import tokenizer_hash
from .config import FinetuneConfig

MAX_BAD_STEPS = 5
# Settings a resumed run must share with the run it continues: they fix the model, what trains, the data's
# order and the dropout masks. (--epochs may grow; --lr and the rest may change, as for `npgpt train`.)
KEPT_ON_RESUME = ("task", "init_from", "preset", "emb_dim", "n_heads", "n_layers", "drop_rate", "lm_weight",
                  "trainable", "mask_prompt", "batch_size", "seed", "dtype")  # fmt: skip


def contents_problem(directory: Path, state: dict) -> str | None:
    """What makes a fine-tuning checkpoint unusable by any --resume, whatever the flags (find_resume then falls
    back to the one before): weights that do not fit its config, a training state of the wrong shape."""
    from ..pretrained import weights_problem

    problem = weights_problem(directory, classifier=state.get("task") == "classify")
    where = directory / "trainer_state.json"
    if problem is None and not isinstance(state.get("finetune_config"), dict):
        problem = f"{where} has no finetune_config"
    T = state.get("max_length")
    if problem is None and (isinstance(T, bool) or not isinstance(T, int) or T < 2):
        problem = f"{where} holds max_length = {T!r}, not a whole number >= 2"
    if problem is None and not isinstance(state.get("data_fingerprint"), str):
        problem = f"{where} has no data fingerprint"
    return problem


def find_start(cfg: FinetuneConfig) -> tuple[Path | None, dict | None]:
    """(the checkpoint to resume and its training state) or (None, None); refuses an out_dir that holds an
    earlier run without --resume or --overwrite, and settings that a resumed run cannot honour."""
    resume_dir, state = find_resume(cfg.out_dir, cfg.resume, cfg.overwrite, check=contents_problem)
    if state is None:
        return None, None
    saved = state.get("finetune_config")
    if not isinstance(saved, dict) or state.get("task") != cfg.task:
        raise ValueError(f"{resume_dir} is not a checkpoint of `npgpt finetune --task {cfg.task}`; resume it with the "
                         "command that wrote it, or start a new run in another --out-dir")  # fmt: skip
    for key in KEPT_ON_RESUME:
        if saved.get(key) != getattr(cfg, key):
            flag = f"--{key.replace('_', '-')}"
            raise ValueError(f"{flag} is {getattr(cfg, key)} here but {saved.get(key)} in the run being resumed "
                             f"({resume_dir}); a resumed run keeps its model, data order and seed: resume with the "
                             "settings it was started with (or start a new run in another --out-dir)")  # fmt: skip
    if state.get("tokenizer") != tokenizer_hash():
        raise ValueError(f"{resume_dir} was trained with another tokenizer; it cannot be resumed with this one")
    return resume_dir, state


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
    if config is not None:  # (None: no config.json, which load_pretrained refuses by name)
        if cfg.context_length is not None and cfg.context_length > config.context_length:
            raise ValueError(f"--context-length {cfg.context_length} exceeds the context of {cfg.init_from} "
                             f"({config.context_length}); give at most that")  # fmt: skip
        check_memory(cfg, config, cfg.context_for(longest, config.context_length))
    model = load_pretrained(cfg.init_from, device=cfg.device, dtype=dtype)
    if cfg.drop_rate is not None:
        model.config = model.config.replace(drop_rate=cfg.drop_rate)
    return model, cfg.context_for(longest, model.config.context_length)


def resumed_length(cfg: FinetuneConfig, resume_dir: Path, state: dict) -> int:
    """Tokens per example of a resumed run: the run's own (its examples, cut or left out by that length, are
    the ones its data fingerprint checks); an explicit --context-length must agree. The memory the run needs
    is checked before its model is loaded."""
    from ..pretrained import read_config

    config = read_config(resume_dir / "config.json")
    T = state["max_length"]
    if cfg.context_length is not None and cfg.context_length != T:
        raise ValueError(f"--context-length {cfg.context_length} differs from the {T} tokens per example of the run being "
                         f"resumed ({resume_dir}); leave it out (or give {T})")  # fmt: skip
    check_memory(cfg, config, T)
    return T


def check_memory(cfg: FinetuneConfig, config: GPTConfig, seq_len: int) -> None:
    """Refuse, with the numbers, a run whose estimated memory exceeds what is available, before anything
    is allocated. memory.py's estimate for training every parameter: an upper bound when some are frozen
    (their gradients and AdamW moments are never allocated)."""
    device = resolve_device(cfg.device)
    est = estimate_training(config, cfg.batch_size, seq_len, cfg.dtype, "fp32", cfg.engine, gpu=device == "cuda")
    fix = "make the batch smaller (--batch-size, --context-length)" + ("" if cfg.init_from else " or the model (--preset, --emb-dim, --n-layers)")
    check_fits(est, device, fix=fix)


def fingerprint(*parts) -> str:
    """A short hash of token ids and labels: a resumed run must train on the same examples."""
    h = hashlib.sha256()
    for part in parts:
        h.update(json.dumps([list(map(int, p)) if not isinstance(p, (int, np.integer)) else int(p) for p in part]).encode())
    return h.hexdigest()[:16]


class EpochBatches:
    """The training batches of a fine-tuning set, epoch after epoch: epoch e (from 1) takes the set in the
    order `data.batches(..., shuffle=True, seed, epoch=e)` gives (a permutation drawn from (seed, e), the
    last batch possibly smaller). The position (epoch, batches taken in it) is what a checkpoint saves."""

    def __init__(self, data, batch_size: int, seed: int):
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.per_epoch = -(-len(data) // batch_size)
        self.epoch, self.cursor = 1, 0
        self._batches = None  # the current epoch's batches, made as they are taken

    def next(self):
        if self.cursor >= self.per_epoch:
            self.epoch, self.cursor, self._batches = self.epoch + 1, 0, None
        if self._batches is None:
            self._batches = self.data.batches(self.batch_size, shuffle=True, seed=self.seed, epoch=self.epoch)
            for _ in range(self.cursor):  # a restored position: the epoch's batches already taken
                next(self._batches)
        self.cursor += 1
        return next(self._batches)

    def state(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "batch_size": self.batch_size,
                "n_examples": len(self.data)}  # fmt: skip

    def restore(self, state: dict) -> None:
        if state.get("n_examples") != len(self.data) or state.get("batch_size") != self.batch_size:
            raise ValueError(f"the saved data position is for {state.get('n_examples')} examples in batches of "
                             f"{state.get('batch_size')}, but this run has {len(self.data)} in batches of "
                             f"{self.batch_size}; resume with the same data and --batch-size")  # fmt: skip
        self.epoch, self.cursor, self.seed, self._batches = int(state["epoch"]), int(state["cursor"]), state["seed"], None


class Tuner:
    """The optimisation of one fine-tuning run: AdamW over the trainable parameters, the schedule, the
    batches, and what a checkpoint keeps of them. step: a steps.py / fast_steps.py object (call it on a
    batch, read .loss and .grads); params: every parameter (the trainable ones are updated in place)."""

    def __init__(self, cfg: FinetuneConfig, step, params: dict, trainable: list[str], train_set, max_length: int,
                 data_hash: str):  # fmt: skip
        self.cfg, self.step, self.params, self.trainable = cfg, step, params, list(trainable)
        self.xp = get_array_module(params[self.trainable[0]])
        self.optimizer = AdamW({k: params[k] for k in trainable}, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
        self.batches = EpochBatches(train_set, cfg.batch_size, cfg.seed)
        self.steps_per_epoch = self.batches.per_epoch
        self.total_steps = self.steps_per_epoch * cfg.epochs
        self.schedule = LRSchedule(cfg.lr, self.total_steps, cfg.warmup_steps, cfg.min_lr)
        self.max_length, self.data_hash = max_length, data_hash

    def loop_settings(self, outputs=(), final_evaluation: str = "", final_hint: str = "") -> LoopSettings:
        """Evaluate the starting weights, then after every epoch, and save after every epoch. outputs, final_evaluation,
        final_hint: the task's (see LoopSettings)."""
        c, per_epoch = self.cfg, self.steps_per_epoch
        return LoopSettings(command=f"npgpt finetune --task {c.task}", out_dir=c.out_dir, total_steps=self.total_steps,
                            lr=c.lr, eval_interval=per_epoch, eval_at_start=True, checkpoint_interval=per_epoch,
                            keep_last=c.keep_last, max_bad_steps=MAX_BAD_STEPS, more_steps="--epochs",
                            progress=c.progress, outputs=tuple(outputs), final_evaluation=final_evaluation,
                            final_hint=final_hint)  # fmt: skip

    def train_step(self, number: int, fields=None) -> StepResult:
        """Optimizer step `number` (from 1); its dropout masks are drawn from (seed, number - 1). fields(step)
        -> dict adds task-specific numbers to the step's record."""
        batch = self.batches.next()
        epoch = self.batches.epoch
        lr = self.schedule(number - 1)
        rng = step_rng([self.cfg.seed, number - 1], self.xp)
        s = self.step(batch, rng)
        norm = clip_grad_norm(s.grads, self.cfg.grad_clip) if self.cfg.grad_clip else grad_norm(s.grads)
        applied = math.isfinite(s.loss) and math.isfinite(norm)
        if applied:
            self.optimizer.step(s.grads, lr=lr)
        return StepResult(s.loss, norm, lr, applied, record={"epoch": epoch, **(fields(s) if fields else {})},
                          postfix={"epoch": epoch})  # fmt: skip

    def weights_problem(self) -> str | None:
        return weights_not_finite(self.params[k] for k in self.trainable)

    def state(self, history: dict) -> dict:
        return {"task": self.cfg.task, "trainable": self.trainable, "tokenizer": tokenizer_hash(),
                "schedule": {"max_lr": self.schedule.max_lr, "total_steps": self.total_steps},
                "finetune_config": asdict(self.cfg), "history": history, "max_length": self.max_length,
                "data_fingerprint": self.data_hash, "steps_per_epoch": self.steps_per_epoch,
                "rng": "dropout masks are seeded per step from (seed, step); epoch e's order from (seed, e)"}  # fmt: skip

    def check_resume(self, state: dict, resume_dir: Path) -> None:
        """The resumed run trains on the same examples (its data position is checked by EpochBatches)."""
        if state.get("data_fingerprint") != self.data_hash:
            raise ValueError(f"{resume_dir} was trained on other examples; resume with the same --data, --val-share "
                             "and --max-examples")  # fmt: skip
