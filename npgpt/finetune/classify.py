"""Classification fine-tuning: read and check everything, then train, evaluate each epoch, test, plot
(ClassifyTask, a task of the one run loop, npgpt/loop/: checkpoints, signals and --resume as every task).

Per epoch the run reports the classification loss L_FT and the accuracy on the training set and on
the validation set, both measured after the epoch without dropout (the training loss of each step,
L_FT + lambda * L_PT with dropout, is in metrics.jsonl). Epoch 0 is the untrained model. The test set
is scored once at the end, with its confusion matrix and the majority-class baseline (always guessing
the training set's most frequent label).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..backend import tf32_note
from ..distributed import SingleProcess
from ..loop import Report, run_task
from ..metrics import read_metrics
from ..tokenizer import encode
from .classifier import Classifier, load_classifier
from .config import FinetuneConfig, trainable_names
from .plots import confusion_matrix, format_confusion, plot_confusion, plot_curves
from .steps import ClassifierStep, classifier_step
from .tables import ClassificationSet, LabelMap, read_labelled, stratified_split
from .trainer import Tuner, build_trunk, find_start, fingerprint, resumed_length


@dataclass
class ClassifyResult:
    labels: list
    train_examples: int
    val_examples: int
    test_examples: int
    trainable_params: int
    frozen_params: int
    history: dict  # epoch -> metrics
    test_accuracy: float | None
    test_loss: float | None
    majority_baseline: float | None  # test accuracy of always predicting the training set's majority label
    confusion: list | None
    seconds: float
    steps: int
    ms_per_step: float
    checkpoint: str
    plots: dict = field(default_factory=dict)
    out_dir: str = ""
    interrupted: bool = False  # a signal stopped the run (then the test set is not scored)


def evaluate(step: ClassifierStep, data: ClassificationSet, batch_size: int) -> tuple[float, float, np.ndarray]:
    """(mean L_FT, accuracy, predicted ids) over a whole set, without dropout."""
    total, preds = 0.0, []
    for batch in data.batches(batch_size):
        loss_sum, logits = step.evaluate(batch)
        total += loss_sum
        preds.append(logits.argmax(axis=1))
    pred = np.concatenate(preds)
    return total / len(data), float((pred == data.labels).mean()), pred


def read_sets(cfg: FinetuneConfig) -> tuple[LabelMap, list, list, list | None]:
    """(label map, train rows, val rows, test rows or None): every file read and every label checked."""
    train_path, val_path, test_path = cfg.files()
    n = cfg.max_examples  # quick trials: the first n rows of each file

    def read(path):
        return read_labelled(path, cfg.text_column, cfg.label_column)[:n]

    rows = read(train_path)
    if val_path is not None:
        val_rows = read(val_path)
    else:
        rows, val_rows = stratified_split(rows, cfg.val_share, cfg.seed)
    labels = LabelMap.from_rows(rows, source=str(train_path))
    test_rows = read(test_path) if test_path is not None else None
    for other in (val_rows, test_rows or []):
        labels.ids(other)  # a label never seen in training is an error naming it
    return labels, rows, val_rows, test_rows


def run_classify(cfg: FinetuneConfig) -> ClassifyResult:
    task = ClassifyTask(cfg.resolved())
    return run_task(task, task.loop_settings(), task.resume_dir, task.resume_state)


class ClassifyTask:
    """Classification fine-tuning as a task of the run loop (npgpt/loop/run.py names what a task supplies).
    Setting up reads and checks every file and label and builds (or, with --resume, loads) the classifier
    before anything is written."""

    summary_numbers = ("seconds", "ms_per_step")  # finite, or no summary.json

    def __init__(self, cfg: FinetuneConfig):
        self.cfg, self.world = cfg, SingleProcess()
        self.resume_dir, self.resume_state = find_start(cfg)
        self.labels, rows, val_rows, test_rows = read_sets(cfg)
        every = rows + val_rows + (test_rows or [])  # the default context fits the longest text of any split
        longest = max(len(encode(r.text, allow_endoftext=False)) for r in every)
        if self.resume_dir is None:
            model, T = build_trunk(cfg, longest)
            self.clf = Classifier.new(model, self.labels.names, seed=cfg.seed)
        else:
            T = resumed_length(cfg, self.resume_dir, self.resume_state)
            self.clf = load_classifier(self.resume_dir, device=cfg.device, dtype=cfg.dtype)
            if self.clf.labels != tuple(self.labels.names):
                raise ValueError(f"the labels here ({', '.join(self.labels.names)}) are not those of the run being resumed "
                                 f"({', '.join(self.clf.labels)}); resume with the same --data")  # fmt: skip
        self.train = ClassificationSet.build(rows, self.labels, T)
        self.val = ClassificationSet.build(val_rows, self.labels, T) if val_rows else None
        self.test = ClassificationSet.build(test_rows, self.labels, T) if test_rows is not None else None
        model, lam = self.clf.model, cfg.lm_weight
        self.trainable = trainable_names("classify", cfg.trainable, self.clf.params, model.config.n_layers,
                                         model.config.tie_weights, lam)  # fmt: skip
        self.step = classifier_step(cfg.engine, self.clf, self.trainable, lam, cfg.batch_size, T)
        self.tuner = Tuner(cfg, self.step, self.clf.params, self.trainable, self.train, T,
                           fingerprint(self.train.ids, self.train.labels))  # fmt: skip
        if self.resume_state is not None:
            self.tuner.check_resume(self.resume_state, self.resume_dir)
        self.optimizer, self.batches = self.tuner.optimizer, self.tuner.batches
        self.extra = {"finetune": {"lm_weight": lam, "trainable": cfg.trainable, "max_length": T}}
        self.history = {k: [] for k in ("train_loss", "train_acc", "val_loss", "val_acc")}  # (epoch, value)

    def loop_settings(self):
        test = self.cfg.files()[2]
        hint = f"npgpt classify --checkpoint {self.cfg.out_dir} --data {test}" if self.test is not None else ""
        return self.tuner.loop_settings(outputs=("loss.png", "accuracy.png", "confusion.png"),
                                        final_evaluation="the test set's accuracy and confusion matrix", final_hint=hint)  # fmt: skip

    # --- what the loop asks of a task ---------------------------------------------------------------
    def banner(self, step: int) -> str:
        cfg, clf, train, val, test = self.cfg, self.clf, self.train, self.val, self.test
        parts = [(name, d) for name, d in (("train", train), ("val", val), ("test", test)) if d is not None]
        cut = ", ".join(f"{d.truncated} of {len(d)} {name}" for name, d in parts)
        n_train = sum(int(clf.params[k].size) for k in self.trainable)
        line = (f"npgpt finetune --task classify: {len(self.labels.names)} labels, {len(train)} train / "
                f"{len(val) if val else 0} val / {len(test) if test else 0} test texts"
                f"{f' (cut to {self.tuner.max_length} tokens: {cut} texts)' if any(d.truncated for _, d in parts) else ''}; {n_train:,} of "
                f"{sum(int(v.size) for v in clf.params.values()):,} parameters train ({cfg.trainable}), lambda "
                f"{cfg.lm_weight}, {self.tuner.total_steps} steps on {clf.model.device}{tf32_note(clf.model.device)} ({cfg.engine} engine)"
                + (f"; resuming at step {step}" if step else ""))  # fmt: skip
        if cfg.lm_weight > 0 and cfg.trainable == "head":
            line += "\nnote: with --trainable head the LM term reaches no trainable parameter: it is reported, not trained on"
        return line

    def train_step(self, number: int):
        return self.tuner.train_step(number, fields=lambda s: {"ft_loss": s.ft_loss, "lm_loss": s.lm_loss})

    def evaluate(self, at) -> tuple[dict, str]:
        """Loss and accuracy on the training and validation sets, without dropout, after an epoch (epoch 0:
        the starting weights)."""
        epoch = at.step // self.tuner.steps_per_epoch
        record = epoch_metrics(self.step, self.train, self.val, self.cfg.batch_size, epoch, self.history)
        record["step"] = at.step
        line = (f"epoch {epoch:>3}  train loss {record['train_loss']:.3f} acc {record['train_acc']:.1%}"
                + (f"  |  val loss {record['val_loss']:.3f} acc {record['val_acc']:.1%}" if self.val else ""))  # fmt: skip
        return record, line

    def weights_problem(self) -> str | None:
        return self.tuner.weights_problem()

    def write_model(self, directory) -> None:
        self.clf.save(directory, self.extra)

    def state(self) -> dict:
        return self.tuner.state(self.history)

    def restore(self, state: dict) -> None:
        self.history = {**self.history, **state.get("history", {})}

    def finish(self, report: Report) -> ClassifyResult:
        return finish(self, report)


def epoch_metrics(step, train, val, batch_size, epoch, history) -> dict:
    record = {"kind": "epoch", "epoch": epoch}
    for name, data in (("train", train), ("val", val)):
        if data is not None:
            loss, acc, _ = evaluate(step, data, batch_size)
            record[f"{name}_loss"], record[f"{name}_acc"] = loss, acc
            history[f"{name}_loss"].append((epoch, loss))
            history[f"{name}_acc"].append((epoch, acc))
    return record


def finish(task: ClassifyTask, report: Report) -> ClassifyResult:
    """The plots, the test set's score and confusion matrix (not after an interrupt), the printed summary."""
    cfg, clf, labels, train, test, history = task.cfg, task.clf, task.labels, task.train, task.test, task.history
    out, k = Path(cfg.out_dir), len(labels.names)
    per_epoch = task.tuner.steps_per_epoch
    step_points = [(r["step"] / per_epoch, r["ft_loss"]) for r in read_metrics(report.metrics_path)
                   if r.get("kind") == "step" and math.isfinite(r["loss"])]  # fmt: skip
    names = {"train": "train (after each epoch)", "val": "validation"}
    plots = {
        "loss": str(plot_curves({"train": history["train_loss"], "val": history["val_loss"]}, out / "loss.png",
                                "classification loss (L_FT)", step_points=step_points, names=names)),
        "accuracy": str(plot_curves({"train": history["train_acc"], "val": history["val_acc"]}, out / "accuracy.png",
                                    "accuracy", names=names)),
    }  # fmt: skip
    test_loss = test_acc = baseline = matrix = None
    if test is not None and not report.interrupted:
        test_loss, test_acc, pred = evaluate(task.step, test, cfg.batch_size)
        majority = int(np.bincount(train.labels, minlength=k).argmax())
        baseline = float((test.labels == majority).mean())
        matrix = confusion_matrix(test.labels, pred, k)
        plots["confusion"] = str(plot_confusion(matrix, labels.names, out / "confusion.png",
                                                f"test set: accuracy {test_acc:.1%} (majority baseline {baseline:.1%})"))  # fmt: skip
    result = ClassifyResult(
        labels=list(labels.names), train_examples=len(train), val_examples=len(task.val) if task.val else 0,
        test_examples=len(test) if test else 0, trainable_params=sum(int(clf.params[n].size) for n in task.trainable),
        frozen_params=sum(int(v.size) for n, v in clf.params.items() if n not in task.trainable), history=history,
        test_accuracy=test_acc, test_loss=test_loss, majority_baseline=baseline,
        confusion=matrix.tolist() if matrix is not None else None, seconds=report.seconds, steps=report.steps,
        ms_per_step=report.ms_per_step, checkpoint=str(report.checkpoint), plots=plots, out_dir=str(out),
        interrupted=report.interrupted,
    )  # fmt: skip
    print(f"\nDone: {result.steps} steps in {result.seconds:.1f}s ({result.ms_per_step:.0f} ms/step)")
    if test_acc is not None:
        print(f"test accuracy {test_acc:.1%} on {len(test)} texts (majority-class baseline {baseline:.1%}), "
              f"test loss {test_loss:.3f}")  # fmt: skip
        print(format_confusion(matrix, labels.names))
    print(f"checkpoint: {report.checkpoint} (loads in transformers.GPT2ForSequenceClassification.from_pretrained)")
    print("plots:      " + ", ".join(plots.values()))
    return result
