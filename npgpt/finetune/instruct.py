"""Instruction tuning: the masked language-model loss on Alpaca-style records, then sample responses
(InstructTask, a task of the one run loop, npgpt/loop/: checkpoints, signals and --resume as every task).

Per epoch the run reports the training loss (the mean of the epoch's step losses, with dropout) and
the validation loss (after the epoch, no dropout); both are means over response tokens only when the
prompt is masked. Epoch 0 is the model before tuning. At the end it scores the test records (or the
validation ones): the masked loss, and the share whose greedy response equals the expected output
exactly, and prints a few responses.

The prompt template is stored in the checkpoint's config.json under "npgpt" -> "instruct", where
`npgpt generate --instruction` finds it (instruction_prompt below).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import checkpoint as ckpt
from ..backend import tf32_note
from ..distributed import SingleProcess
from ..loop import Report, run_task
from ..metrics import read_metrics
from ..tokenizer import EOT_ID, decode, encode
from .config import FinetuneConfig, trainable_names
from .instructions import ALPACA, InstructionSet, read_instructions, render_prompt
from .plots import plot_curves
from .steps import InstructStep, instruct_step
from .trainer import Tuner, build_trunk, find_start, fingerprint, resumed_length


@dataclass
class InstructResult:
    train_examples: int
    val_examples: int
    test_examples: int
    skipped_examples: int  # longer than the context
    trainable_params: int
    frozen_params: int
    history: dict
    test_loss: float | None
    exact_match: float | None  # share of scored records whose greedy response equals the output
    scored_on: str  # "test" or "val"
    samples: list
    seconds: float
    steps: int
    ms_per_step: float
    checkpoint: str
    plots: dict = field(default_factory=dict)
    out_dir: str = ""
    interrupted: bool = False  # a signal stopped the run (then nothing is scored)


def write_instruct_model(directory, model, template: dict, extra: dict) -> None:
    """The model in the Hugging Face GPT-2 layout, its config.json carrying the prompt template."""
    ckpt.save_model(directory, model)
    path = Path(directory) / ckpt.CONFIG_FILE
    config = json.loads(path.read_text(encoding="utf-8"))
    config["npgpt"]["task"] = "instruct"
    config["npgpt"]["instruct"] = {**template, **extra}
    ckpt.atomic_write_json(path, config)


def stored_template(checkpoint) -> dict:
    """The prompt template saved with an instruction-tuned checkpoint (a run, checkpoint or model directory)."""
    from ..pretrained import _resolve

    _, cfg_path = _resolve(checkpoint)
    config = json.loads(Path(cfg_path).read_text(encoding="utf-8")) if cfg_path is not None else {}
    template = (config.get("npgpt") or {}).get("instruct")
    if not isinstance(template, dict) or "prompt_input" not in template or "prompt_no_input" not in template:
        raise ValueError(f"{checkpoint} was not instruction-tuned (its config.json stores no prompt template); "
                         "drop --instruction and use --prompt, or tune it with: npgpt finetune --task instruct")  # fmt: skip
    return template


def instruction_prompt(checkpoint, instruction: str, input_text: str = "") -> str:
    """The prompt `npgpt generate --instruction` feeds the model: the checkpoint's own template, filled in."""
    if not instruction.strip():
        raise ValueError("--instruction is empty; give the task in words")
    return render_prompt(stored_template(checkpoint), instruction, input_text)


def respond(model, template: dict, instruction: str, input_text: str = "", max_new_tokens: int = 40) -> str:
    """Greedy response to one instruction, up to the end token."""
    prompt = encode(render_prompt(template, instruction, input_text), allow_endoftext=False)
    prompt = prompt[-(model.config.context_length - 1):]
    out = model.generate(np.asarray([prompt]), max_new_tokens, temperature=0.0, eos_id=EOT_ID)[0, len(prompt):]
    out = out[: list(out).index(EOT_ID)] if EOT_ID in out else out
    return decode(out)


def evaluate(step: InstructStep, data: InstructionSet, batch_size: int) -> float:
    total = count = 0
    for batch in data.batches(batch_size):
        s, n = step.evaluate(batch)
        total, count = total + s, count + n
    return total / max(count, 1)


def read_sets(cfg: FinetuneConfig):
    """(train, val, test or None) lists of Records, read and checked; val is a seeded share when not given."""
    train_path, val_path, test_path = cfg.files()
    n = cfg.max_examples  # quick trials: the first n records of each file
    records = read_instructions(train_path)[:n]
    if val_path is not None:
        val_records = read_instructions(val_path)[:n]
    else:  # a seeded share of the records
        order = np.random.default_rng(cfg.seed).permutation(len(records))
        n_val = max(1, int(round(cfg.val_share * len(records)))) if len(records) > 1 else 0
        val_idx = set(order[:n_val].tolist())
        val_records = [r for i, r in enumerate(records) if i in val_idx]
        records = [r for i, r in enumerate(records) if i not in val_idx]
    test_records = read_instructions(test_path)[:n] if test_path is not None else None
    return (records, train_path), (val_records, val_path or train_path), (test_records, test_path)


def run_instruct(cfg: FinetuneConfig) -> InstructResult:
    task = InstructTask(cfg.resolved())
    return run_task(task, task.loop_settings(), task.resume_dir, task.resume_state)


class InstructTask:
    """Instruction tuning as a task of the run loop (npgpt/loop/run.py names what a task supplies).
    Setting up reads and checks every record and builds (or, with --resume, loads) the model before
    anything is written."""

    summary_numbers = ("seconds", "ms_per_step")  # finite, or no summary.json

    def __init__(self, cfg: FinetuneConfig):
        self.cfg, self.world = cfg, SingleProcess()
        self.resume_dir, self.resume_state = find_start(cfg)
        (records, train_src), (val_records, val_src), (test_records, test_src) = read_sets(cfg)
        every = records + val_records + (test_records or [])  # the default context fits the longest of any split
        longest = max(len(InstructionSet.build([r], ALPACA, 10**9).ids[0]) - 1 for r in every)
        if self.resume_dir is None:
            self.model, T = build_trunk(cfg, longest)
        else:
            from ..pretrained import load_pretrained

            T = resumed_length(cfg, self.resume_dir, self.resume_state)
            self.model = load_pretrained(self.resume_dir, device=cfg.device, dtype=np.dtype(cfg.dtype))

        def build(recs, src):
            return InstructionSet.build(recs, ALPACA, T, cfg.mask_prompt, source=str(src)) if recs else None

        self.train, self.val, self.test = build(records, train_src), build(val_records, val_src), build(test_records, test_src)
        model = self.model
        self.trainable = trainable_names("instruct", cfg.trainable, model.params, model.config.n_layers,
                                         model.config.tie_weights, 0.0)  # fmt: skip
        self.step = instruct_step(cfg.engine, model, self.trainable, cfg.batch_size, T)
        self.tuner = Tuner(cfg, self.step, model.params, self.trainable, self.train, T,
                           fingerprint(self.train.ids, self.train.n_prompt))  # fmt: skip
        if self.resume_state is not None:
            self.tuner.check_resume(self.resume_state, self.resume_dir)
        self.optimizer, self.batches = self.tuner.optimizer, self.tuner.batches
        self.extra = {"mask_prompt": cfg.mask_prompt, "max_length": T}
        parts = [(name, d) for name, d in (("train", self.train), ("val", self.val), ("test", self.test)) if d is not None]
        self.skipped = sum(d.skipped for _, d in parts)
        self.left_out = ", ".join(f"{d.skipped} of {len(d) + d.skipped} {name}" for name, d in parts)  # for the banner
        self.history = {"train_loss": [], "val_loss": []}  # (epoch, loss)

    def loop_settings(self):
        scored = "test" if self.test is not None else "validation"
        return self.tuner.loop_settings(outputs=("loss.png",), final_evaluation=f"the {scored} records' loss and exact match")

    # --- what the loop asks of a task ---------------------------------------------------------------
    def banner(self, step: int) -> str:
        cfg, model, train, val, test = self.cfg, self.model, self.train, self.val, self.test
        n_train = sum(int(model.params[k].size) for k in self.trainable)
        T = self.tuner.max_length
        return (f"npgpt finetune --task instruct: {len(train)} train / {len(val) if val else 0} val / "
                f"{len(test) if test else 0} test records ({train.response_tokens():,} trained-on target tokens"
                f"{', prompt masked' if cfg.mask_prompt else ', prompt included'})"
                f"{f'; left out, longer than {T} tokens: {self.left_out} records' if self.skipped else ''}; {n_train:,} of "
                f"{model.num_params():,} parameters train ({cfg.trainable}), {self.tuner.total_steps} steps on "
                f"{model.device}{tf32_note(model.device)} ({cfg.engine} engine)" + (f"; resuming at step {step}" if step else ""))  # fmt: skip

    def train_step(self, number: int):
        return self.tuner.train_step(number)

    def evaluate(self, at) -> tuple[dict, str]:
        """After an epoch: its mean training loss (dropout on) and the validation loss (no dropout); epoch 0
        is the model before tuning."""
        epoch = at.step // self.tuner.steps_per_epoch
        record = {"kind": "epoch", "step": at.step, "epoch": epoch}
        if epoch > 0:
            record["train_loss"] = at.train_loss if at.train_loss is not None else float("nan")
            self.history["train_loss"].append((epoch, record["train_loss"]))
        if self.val is not None:
            record["val_loss"] = evaluate(self.step, self.val, self.cfg.batch_size)
            self.history["val_loss"].append((epoch, record["val_loss"]))
        line = (f"epoch {epoch:>3}" + (f"  train loss {record['train_loss']:.3f}" if epoch else "  (before tuning)")
                + (f"  |  val loss {record['val_loss']:.3f}" if self.val is not None else ""))  # fmt: skip
        return record, line

    def weights_problem(self) -> str | None:
        return self.tuner.weights_problem()

    def write_model(self, directory) -> None:
        write_instruct_model(directory, self.model, ALPACA, self.extra)

    def state(self) -> dict:
        return self.tuner.state(self.history)

    def restore(self, state: dict) -> None:
        self.history = {**self.history, **state.get("history", {})}

    def finish(self, report: Report) -> InstructResult:
        return finish(self, report)


def finish(task: InstructTask, report: Report) -> InstructResult:
    """The plot, the scores on the test (or validation) records and a few responses (not after an
    interrupt), the printed summary."""
    cfg, model, train, val, test, history = task.cfg, task.model, task.train, task.val, task.test, task.history
    out, per_epoch = Path(cfg.out_dir), task.tuner.steps_per_epoch
    step_points = [(r["step"] / per_epoch, r["loss"]) for r in read_metrics(report.metrics_path)
                   if r.get("kind") == "step" and math.isfinite(r["loss"])]  # fmt: skip
    plots = {"loss": str(plot_curves({"train": history["train_loss"], "val": history["val_loss"]}, out / "loss.png",
                                     "loss on response tokens" if cfg.mask_prompt else "loss", step_points=step_points,
                                     names={"train": "train (mean over the epoch)", "val": "validation"}))}  # fmt: skip
    scored, name = (test, "test") if test is not None else (val, "val")
    test_loss = exact = None
    samples = []
    if scored is not None and not report.interrupted:
        test_loss, exact, samples = score(task, scored)
    result = InstructResult(
        train_examples=len(train), val_examples=len(val) if val else 0, test_examples=len(test) if test else 0,
        skipped_examples=task.skipped, trainable_params=sum(int(model.params[n].size) for n in task.trainable),
        frozen_params=sum(int(v.size) for n, v in model.params.items() if n not in task.trainable), history=history,
        test_loss=test_loss, exact_match=exact, scored_on=name, samples=samples, seconds=report.seconds,
        steps=report.steps, ms_per_step=report.ms_per_step, checkpoint=str(report.checkpoint), plots=plots,
        out_dir=str(out), interrupted=report.interrupted,
    )  # fmt: skip
    print(f"\nDone: {result.steps} steps in {result.seconds:.1f}s ({result.ms_per_step:.0f} ms/step)")
    if exact is not None:
        print(f"{name} loss {test_loss:.3f}; greedy response equals the expected output for {exact:.1%} of {len(scored)} records")
    for s in samples:
        print(f"--- {s['instruction']} | {s['input']!r}\n    expected {s['expected']!r}\n    response {s['response']!r}")
    print(f"checkpoint: {report.checkpoint}\n  try: npgpt generate --checkpoint {out} --instruction \"...\" --input \"...\"")
    print("plots:      " + ", ".join(plots.values()))
    return result


def score(task: InstructTask, scored: InstructionSet) -> tuple[float, float, list]:
    """(masked loss, share of greedy responses equal to the expected output, the first --samples of them)."""
    cfg = task.cfg
    loss = evaluate(task.step, scored, cfg.batch_size)
    hits, samples = 0, []
    for i, r in enumerate(scored.records):
        got = respond(task.model, ALPACA, r.instruction, r.input, cfg.max_new_tokens)
        hits += got.strip() == r.output.strip()
        if i < cfg.samples:
            samples.append({"instruction": r.instruction, "input": r.input, "expected": r.output, "response": got})
    return loss, hits / len(scored), samples
