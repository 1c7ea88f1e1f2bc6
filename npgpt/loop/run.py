"""The one run loop of every training task: pretraining, classification, instruction tuning, translation.

    task = Pretraining(cfg)          # the task reads and checks everything; nothing is written yet
    result = run_task(task, LoopSettings(...), resume_dir, state)

What the loop does, the same for every task:
- the steps, numbered from 1, each a record in metrics.jsonl ({"kind": "step", "step": n, "loss", "lr",
  "grad_norm", "ms", ...}) and a tick of the progress bar; a step whose update was skipped (a non-finite loss
  or gradient, a float16 overflow) also gets a "skip" record, and max_bad_steps of them in a row stop the run;
- evaluations at the settings' cadence and always after the last step (the task's evaluate() gives the
  record and the printed line; the loop gives it the mean loss of the steps since the previous one);
- checkpoints every checkpoint_interval steps and at the end (folder.py's rules), each holding the model
  (the task writes it), AdamW's moments, and trainer_state.json: the loop's counters, the batch source's
  position (task.batches.state()) and the task's own state (task.state());
- divergence: weights that are not finite, or give a non-finite loss, are never saved (TrainingAborted,
  the last good checkpoint kept);
- SIGINT / SIGTERM: the step in flight finishes, a checkpoint is written, the run ends as interrupted
  (exit code 130); a second signal stops at once, but never inside a save (stop.py); a signal during the
  task's finish() (its final evaluation) stops that at once, and the run ends as interrupted with the
  training's summary (_task_finish);
- --resume: the weights (the task loads them), the optimizer, the batch position, the counters and the
  task's state come back from the checkpoint, so the run goes on exactly as if it had never stopped: the
  dropout masks of step n are drawn from (seed, n), the data order from (seed, epoch), and the learning
  rate is a function of the step;
- the end: the task's finish() (final evaluation, plots, the printed summary) returns its result, which
  becomes summary.json only when it is complete: this process took steps and the numbers the task names
  in `summary_numbers` are finite (a run that stopped at once never replaces an earlier run's summary).

What a task supplies (any object with these names; see train.py, finetune/classify.py, finetune/instruct.py
and seq2seq/train.py):
    world                         distributed.py's world (SingleProcess() in one process)
    optimizer                     the AdamW its steps update
    batches                       its batch source: state() -> a small JSON-able dict, restore(state)
    summary_numbers               names of the result's fields that must be finite for summary.json
    banner(step) -> str           the line printed first
    train_step(number) -> StepResult        one optimizer step; number counts from 1
    evaluate(at: At) -> (record, line)      an evaluation: its metrics record and its printed line
    weights_problem() -> str | None         why the weights must not be saved, or None
    write_model(directory)                  the model's files of a checkpoint
    state() -> dict, restore(state)         the task's own part of trainer_state.json
    finish(report: Report) -> result        the end of the run (a dataclass; see the summary rule above)
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from .. import checkpoint as ckpt
from ..backend import get_array_module, tf32_mode
from ..model import make_rng
from .errors import TrainingAborted, TrainingInterrupted
from .folder import RunFolder
from .stop import StopRequest


@dataclass
class LoopSettings:
    """What the loop needs to know of a run; each task fills it in from its own config."""

    command: str  # "npgpt train": named in the resume hint after an interrupt
    out_dir: str
    total_steps: int
    lr: float  # the peak learning rate, named when the run diverges
    eval_interval: int  # evaluate after the steps s with (s - eval_offset) % eval_interval == 0, and after the last
    eval_offset: int = 0
    eval_at_start: bool = False  # also evaluate the starting weights (step 0) of a run that starts afresh
    checkpoint_interval: int | None = None  # steps; the end of the run is always saved
    keep_last: int = 3
    max_bad_steps: int = 5  # consecutive skipped steps (non-finite loss or gradient) before the run stops
    more_steps: str = "--max-steps"  # the flag that lengthens a finished run
    progress: bool = True
    tf32: bool | None = None  # TF32 matrix products for a CUDA run (None: leave the setting alone)
    files: dict = field(default_factory=dict)  # name -> text: written into out_dir when a run starts afresh
    outputs: tuple = ()  # the files finish() writes (plots, tables): an earlier run's go when a new run replaces it
    final_evaluation: str = ""  # what finish() evaluates ("exact match and BLEU on every held-out pair"), if anything
    final_hint: str = ""  # the command that computes it for a run whose final evaluation a signal cut short


@dataclass
class StepResult:
    """One optimizer step as a task reports it."""

    loss: float
    grad_norm: float | None
    lr: float
    applied: bool  # the optimizer stepped (else the update was skipped: nothing changed)
    overflow: bool = False  # float16 gradients overflowed: skipped and the loss scale lowered, not a divergence
    tokens: int | None = None  # tokens the step trained on: "tokens" (seen so far) and "tokens_per_s" are logged
    record: dict = field(default_factory=dict)  # more fields for the step's record (epoch, the two losses, ...)
    postfix: dict = field(default_factory=dict)  # more fields for the progress bar
    loss_scale: float | None = None  # fp16: the scale after an overflow


@dataclass
class At:
    """Where an evaluation happens: after `step` steps and `tokens` tokens; train_loss is the mean loss of
    the steps since the previous evaluation (dropout on; None before the first step)."""

    step: int
    tokens: int
    train_loss: float | None


@dataclass
class Report:
    """What the loop hands the task's finish()."""

    steps: int  # the run's steps so far (a resumed run counts the earlier ones)
    first_step: int  # the step this process started at
    tokens_seen: int
    seconds: float
    ms_per_step: float  # median of this process's steps, the first left out (one-off allocations); nan: none
    train_loss: float | None  # the mean loss of the steps since the last evaluation, else that evaluation's
    skipped_steps: int
    interrupted: bool
    checkpoint: Path | None
    out_dir: Path
    metrics_path: Path


def run_task(task, settings: LoopSettings, resume_dir: Path | None = None, state: dict | None = None):
    """Restore the checkpoint `resume_dir` (its trainer_state.json `state`) into the task, run it, return its
    result. A run that has nothing left to do is refused before anything is written."""
    return Loop(task, settings, resume_dir, state).run()


class Loop:
    """The loop of one run; see the module docstring."""

    def __init__(self, task, settings: LoopSettings, resume_dir: Path | None = None, state: dict | None = None):
        self.task, self.settings, self.world = task, settings, task.world
        self.folder = RunFolder(settings.out_dir, settings.keep_last, self.world, resume_dir, files=settings.files,
                                outputs=settings.outputs)  # fmt: skip
        self.step = self.tokens_seen = self.skipped = self.bad_in_a_row = 0
        self.since_eval: list[float] = []  # the losses of the applied steps since the last evaluation
        self.train_loss: float | None = None  # their mean at the last evaluation
        self.last_finite: tuple[int, float] | None = None  # (step, loss) of the last step with a finite loss
        self.stop: StopRequest | None = None
        self.bar = None
        if state is not None:
            self._restore(resume_dir, state)
            if self.step >= settings.total_steps:
                raise ValueError(f"the run in {settings.out_dir} is already at step {self.step} of {settings.total_steps}, "
                                 f"so there is nothing to train; give a larger {settings.more_steps} to continue it")  # fmt: skip

    def _restore(self, resume_dir: Path, state: dict) -> None:
        """The optimizer, the batch position, the loop's counters and the task's state of a checkpoint."""
        check_same_optimizer(self.task.optimizer, state["optimizer"])
        m, v = ckpt.load_optimizer_tensors(resume_dir)
        try:
            self.task.optimizer.load_state_dict({**state["optimizer"], "m": m, "v": v})
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{resume_dir / ckpt.OPTIMIZER_FILE} does not fit this run's parameters ({e}); resume "
                             "with the settings the run was started with") from None  # fmt: skip
        self.task.batches.restore(state["data"])
        self.step, self.tokens_seen = state["step"], state.get("tokens_seen", 0)
        self.skipped = state.get("skipped_steps", 0)
        self.since_eval = [float(x) for x in state.get("since_eval", [])]
        self.train_loss = state.get("train_loss")
        self.task.restore(state)

    def training_state(self) -> dict:
        """trainer_state.json (the optimizer's part is added by the save)."""
        return {"format_version": ckpt.FORMAT_VERSION, "step": self.step, "tokens_seen": self.tokens_seen,
                "skipped_steps": self.skipped, "data": self.task.batches.state(), "since_eval": self.since_eval,
                "train_loss": self.train_loss, **self.task.state()}  # fmt: skip

    # --- talking ------------------------------------------------------------------------------------------
    def log(self, record: dict) -> None:
        self.folder.log(record)

    def say(self, text: str) -> None:
        if self.world.is_root:
            (self.bar.write if self.bar is not None else print)(text)

    # --- the run ------------------------------------------------------------------------------------------
    def run(self):
        from tqdm.auto import tqdm

        s, first_step = self.settings, self.step
        with self._tf32():
            self.folder.open(resume_step=self.step if self.folder.resume_dir is not None else None)
            try:
                return self._run(s, first_step, tqdm)
            finally:
                self.folder.release()

    def _run(self, s: LoopSettings, first_step: int, tqdm):
        """The run in its open folder: the steps, the last save, the end."""
        if self.folder.pending:
            self.say(f"{self.folder.out_dir} holds an earlier run: it stays as it is until this run's first checkpoint "
                     f"is complete (until then this run's metrics are in {self.folder.metrics_path})")  # fmt: skip
        self.say(self.task.banner(self.step))
        step_times: list[float] = []
        t_start = time.perf_counter()
        self.bar = tqdm(total=s.total_steps, initial=self.step, disable=not (s.progress and self.world.is_root),
                        unit="step", dynamic_ncols=True)  # fmt: skip
        # Overflow in a diverging run is detected and reported (skipped steps, weights_problem), not warned about.
        with StopRequest() as self.stop, np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            try:
                if s.eval_at_start and self.step == 0:
                    self._evaluate()
                interrupted = self._steps(step_times)
                if self.step > first_step or self.folder.last_ckpt is None:
                    self.save()
                # a signal during the last save: the final evaluation is not started (every rank agrees)
                skip_final = not interrupted and self.world.allreduce_max(1.0 if self.stop.signal is not None else 0.0) > 0
            except KeyboardInterrupt:  # a second signal
                raise TrainingInterrupted(self._stopped_at_once()) from None
            finally:
                self.stop = None
                self.bar.close()
                self.bar = None
                self.folder.close()
        return self._finish(time.perf_counter() - t_start, step_times, interrupted, first_step, skip_final)

    def _tf32(self):
        """The one place a run sets TensorFloat-32 (CUDA runs only; settings.tf32 None: left alone), inside
        npgpt.backend.tf32_mode, which puts the process's TF32 state back when the run ends."""
        return tf32_mode(self.settings.tf32)

    def _steps(self, step_times: list) -> bool:
        """Steps until total_steps, with evaluations and checkpoints; True when a signal stopped them."""
        s = self.settings
        while self.step < s.total_steps:
            t0 = time.perf_counter()
            r = self.task.train_step(self.step + 1)
            self.step += 1
            dt = time.perf_counter() - t0
            step_times.append(dt)
            self._account(r, dt)
            cadence = self.step >= s.eval_offset and (self.step - s.eval_offset) % s.eval_interval == 0
            if cadence or self.step == s.total_steps:
                self._evaluate()
            if self.world.allreduce_max(1.0 if self.stop.signal is not None else 0.0) > 0:  # every rank stops together
                return True
            if s.checkpoint_interval and self.step % s.checkpoint_interval == 0 and self.step < s.total_steps:
                self.save()
        return False

    def _account(self, r: StepResult, dt: float) -> None:
        """The step's records, the progress bar, and the count of skipped steps (too many stop the run)."""
        n = self.step
        if r.overflow:  # float16 overflow: the update was skipped and the loss scale lowered
            self.skipped += 1
            self.log({"kind": "skip", "step": n, "loss": r.loss, "grad_norm": r.grad_norm, "reason": "fp16 overflow",
                      "loss_scale": r.loss_scale})  # fmt: skip
            self.say(f"step {n}: float16 gradients overflowed; update skipped, loss scale now {r.loss_scale:g}")
        elif r.applied:
            self.bad_in_a_row = 0
            self.since_eval.append(r.loss)
            self.last_finite = (n, r.loss)
        else:
            self.skipped += 1
            self.bad_in_a_row += 1
            self.log({"kind": "skip", "step": n, "loss": r.loss, "grad_norm": r.grad_norm})
            self.say(f"step {n}: loss {r.loss} / gradient norm {r.grad_norm} not finite; update skipped")
        record = {"kind": "step", "step": n}
        if r.tokens is not None:
            self.tokens_seen += r.tokens
            record["tokens"] = self.tokens_seen
        record.update({**r.record, "loss": r.loss, "lr": r.lr, "grad_norm": r.grad_norm, "ms": dt * 1e3})
        postfix = {"loss": f"{r.loss:.3f}", "lr": f"{r.lr:.2e}", **r.postfix}
        if r.tokens is not None:
            record["tokens_per_s"] = r.tokens / dt
            postfix["tok_s"] = f"{r.tokens / dt:,.0f}"
        self.log(record)
        self.bar.update(1)
        self.bar.set_postfix(**postfix)
        if self.bad_in_a_row >= self.settings.max_bad_steps:
            last = self.folder.last_ckpt
            raise TrainingAborted(f"{self.bad_in_a_row} consecutive steps had a non-finite loss or gradient (last at step "
                                  f"{n}); training stopped. Lower --lr, set --grad-clip, or check the data"
                                  + (f"; the last good checkpoint is {last}" if last else ""))  # fmt: skip

    def _evaluate(self) -> None:
        """The task's evaluation, given the mean loss of the steps since the previous one (when none of them had
        a finite loss: the previous evaluation's)."""
        if self.since_eval:
            self.train_loss = float(np.mean(self.since_eval))
        self.since_eval = []
        at = At(self.step, self.tokens_seen, self.train_loss)
        record, line = self.task.evaluate(at)
        self.log(record)
        self.say(line)

    # --- checkpoints ----------------------------------------------------------------------------------------
    def save(self) -> None:
        """A checkpoint of the current state. Weights that are not finite, or give a non-finite loss, are never
        saved: the run has diverged and stops, keeping its last good checkpoint. A second signal during the
        save lets it finish first."""
        problem = self.task.weights_problem()
        if problem is not None:
            self.log({"kind": "error", "step": self.step, "message": f"{problem}: checkpoint not written"})
            raise self._diverged(problem)
        with self.stop.saving_section() if self.stop is not None else contextlib.nullcontext():
            self.folder.save(self.step, self.task.optimizer, self.training_state(), self.task.write_model)

    def _diverged(self, problem: str) -> TrainingAborted:
        """The error that stops a diverged run: what happened, the last finite loss, what to do."""
        last = (f"the last finite training loss was {self.last_finite[1]:.3f} at step {self.last_finite[0]}"
                if self.last_finite else "no step of this run had a finite loss")  # fmt: skip
        skipped = f", {self.skipped} non-finite steps skipped" if self.skipped else ""
        ckpt_dir, lr = self.folder.last_ckpt, self.settings.lr
        keep = (f"the last good checkpoint {ckpt_dir} is kept; lower --lr (now {lr:g}) and --resume" if ckpt_dir
                else f"no checkpoint was kept; lower --lr (now {lr:g}) and start again")  # fmt: skip
        return TrainingAborted(f"step {self.step}: training diverged: {problem}, so no checkpoint was written "
                               f"({last}{skipped}); {keep}")  # fmt: skip

    def _stopped_at_once(self) -> str:
        ckpt_dir = self.folder.last_ckpt
        if ckpt_dir is not None and ckpt_dir.name == f"step-{self.step:08d}":
            return f"a second signal stopped training after the checkpoint of step {self.step} was written: {ckpt_dir}"
        where = f"the newest checkpoint is {ckpt_dir}" if ckpt_dir else "this run wrote no checkpoint"
        return f"a second signal stopped training at step {self.step} without saving it; {where}"

    # --- the end --------------------------------------------------------------------------------------------
    def _task_finish(self, report: Report, skip_final: bool = False):
        """(the task's finish(report), whether a signal cut it short). A signal while it runs (SIGINT or
        SIGTERM; the final evaluation can take minutes) stops it at once, and finish() is asked again as for an
        interrupted run, which evaluates nothing: the run still ends with its plots, a summary that says
        "interrupted" (the final evaluation's numbers null) and a line. Later signals are only noted.
        skip_final: a signal came during the last save, so the evaluation is not even started."""
        if report.interrupted or skip_final:  # finish() of an interrupted run evaluates nothing, and is quick
            with StopRequest():
                return self.task.finish(replace(report, interrupted=True)), skip_final
        with StopRequest(at_once=True):
            try:
                return self.task.finish(report), False
            except KeyboardInterrupt:
                pass
        with StopRequest():
            return self.task.finish(replace(report, interrupted=True)), True

    def _finish(self, seconds: float, step_times: list, interrupted: bool, first_step: int, skip_final: bool = False):
        """The task's finish(), then summary.json when the result is complete, and the resume hint."""
        times = step_times[1:] or step_times  # the first step includes one-off allocations
        train_loss = float(np.mean(self.since_eval)) if self.since_eval else self.train_loss
        report = Report(steps=self.step, first_step=first_step, tokens_seen=self.tokens_seen, seconds=seconds,
                        ms_per_step=1e3 * float(np.median(times)) if times else float("nan"), train_loss=train_loss,
                        skipped_steps=self.skipped, interrupted=interrupted, checkpoint=self.folder.last_ckpt,
                        out_dir=self.folder.out_dir, metrics_path=self.folder.metrics_path)  # fmt: skip
        result, cut_short = self._task_finish(report, skip_final)
        numbers = [getattr(result, name) for name in self.task.summary_numbers]
        complete = self.step > first_step and all(v is not None and math.isfinite(v) for v in numbers)
        if self.world.is_root:
            if complete:
                self.folder.write_summary(asdict(result))
            else:
                print("summary.json not written: this run has no finite training loss or timing to report")
            if cut_short:
                s = self.settings
                what = f"the final evaluation ({s.final_evaluation})" if s.final_evaluation else "the end of the run"
                print(f"{s.command}: interrupted: a signal stopped {what}; the training is complete and saved in "
                      f"{self.folder.last_ckpt}" + ("; summary.json holds its numbers" if complete else "")
                      + (f"; {s.final_hint} computes what was cut short" if s.final_hint else ""), file=sys.stderr)  # fmt: skip
            elif interrupted:
                print(f"Interrupted by a signal; saved {self.folder.last_ckpt}. Resume with:\n"
                      f"  {self.settings.command} --out-dir {self.folder.out_dir} --resume  (plus the same data and model options)")  # fmt: skip
        return result


def weights_not_finite(arrays) -> str | None:
    """A task's weights_problem() for weights that are not all finite (checked where they live: no copy to
    the host), or None."""
    if all(bool(get_array_module(v).isfinite(v).all()) for v in arrays):
        return None
    return "the weights are no longer finite"


def step_rng(parts, xp):
    """The dropout generator of a step, a pure function of `parts` ((seed, step[, micro-batch, rank])), so a
    resumed run draws the same masks."""
    return make_rng(int(np.random.SeedSequence(list(parts)).generate_state(1)[0]), xp)


def check_same_optimizer(optimizer, saved: dict) -> None:
    """Refuse a resume whose AdamW settings (--weight-decay, --beta1, --beta2) differ from the run's: loading
    the saved state would silently put the run's values back over the ones given, and the checkpoints would
    then record settings the run did not use."""
    given = {"--weight-decay": optimizer.weight_decay, "--beta1": optimizer.betas[0], "--beta2": optimizer.betas[1]}
    betas = saved.get("betas") or list(optimizer.betas)
    theirs = {"--weight-decay": saved.get("weight_decay", optimizer.weight_decay), "--beta1": betas[0], "--beta2": betas[1]}
    differ = [flag for flag in given if float(given[flag]) != float(theirs[flag])]
    if differ:
        mine = " ".join(f"{flag} {given[flag]:g}" for flag in differ)
        keep = " ".join(f"{flag} {theirs[flag]:g}" for flag in differ)
        raise ValueError(f"{mine} cannot be honoured by --resume: the run being resumed has {keep} (its AdamW state "
                         f"continues with its own settings); resume with {keep} (or start a new run in another --out-dir)")  # fmt: skip
