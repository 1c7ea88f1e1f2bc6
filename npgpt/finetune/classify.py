"""Classification fine-tuning: read and check everything, then train, evaluate each epoch, test, plot.

Per epoch the run reports the classification loss L_FT and the accuracy on the training set and on
the validation set, both measured after the epoch without dropout (the training loss of each step,
L_FT + lambda * L_PT with dropout, is in metrics.jsonl). Epoch 0 is the untrained model. The test set
is scored once at the end, with its confusion matrix and the majority-class baseline (always guessing
the training set's most frequent label).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .. import checkpoint as ckpt
from ..backend import tf32_note
from ..tokenizer import encode
from .classifier import Classifier
from .config import FinetuneConfig, trainable_names
from .plots import confusion_matrix, format_confusion, plot_confusion, plot_curves
from .steps import ClassifierStep, classifier_step
from .tables import ClassificationSet, LabelMap, read_labelled, stratified_split
from .trainer import Run, build_trunk, check_out_dir


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
    cfg = cfg.resolved()
    check_out_dir(cfg)
    labels, rows, val_rows, test_rows = read_sets(cfg)
    model, T = build_trunk(cfg, longest=max(len(encode(r.text, allow_endoftext=False)) for r in rows))
    train = ClassificationSet.build(rows, labels, T)
    val = ClassificationSet.build(val_rows, labels, T) if val_rows else None
    test = ClassificationSet.build(test_rows, labels, T) if test_rows is not None else None
    lam = cfg.lm_weight
    clf = Classifier.new(model, labels.names, seed=cfg.seed)
    trainable = trainable_names("classify", cfg.trainable, clf.params, model.config.n_layers,
                                model.config.tie_weights, lam)  # fmt: skip
    step = classifier_step(cfg.engine, clf, trainable, lam, cfg.batch_size, T)
    n_train = sum(int(clf.params[k].size) for k in trainable)
    extra = {"finetune": {"lm_weight": lam, "trainable": cfg.trainable, "max_length": T}}
    steps_per_epoch = -(-len(train) // cfg.batch_size)
    run = Run(cfg, step, clf.params, trainable, steps_per_epoch, lambda d: clf.save(d, extra))
    run.step_value = lambda s: s.ft_loss
    truncated = train.truncated + (val.truncated if val else 0)
    run.say(f"npgpt finetune --task classify: {len(labels.names)} labels, {len(train)} train / {len(val) if val else 0} val"
            f" / {len(test) if test else 0} test texts{f' ({truncated} cut to {T} tokens)' if truncated else ''}; "
            f"{n_train:,} of {sum(int(v.size) for v in clf.params.values()):,} parameters train "
            f"({cfg.trainable}), lambda {lam}, {run.total_steps} steps on {model.device}{tf32_note(model.device)} ({cfg.engine} engine)")  # fmt: skip
    if lam > 0 and cfg.trainable == "head":
        run.say("note: with --trainable head the LM term reaches no trainable parameter: it is reported, not trained on")
    history = {k: [] for k in ("train_loss", "train_acc", "val_loss", "val_acc")}
    try:
        for epoch in range(cfg.epochs + 1):
            if epoch > 0:
                run.train_epoch(train.batches(cfg.batch_size, shuffle=True, seed=cfg.seed, epoch=epoch), epoch,
                                extra=lambda s: {"ft_loss": s.ft_loss, "lm_loss": s.lm_loss})  # fmt: skip
            record = epoch_metrics(step, train, val, cfg.batch_size, epoch, history)
            run.log(record)
            run.say(f"epoch {epoch:>3}  train loss {record['train_loss']:.3f} acc {record['train_acc']:.1%}"
                    + (f"  |  val loss {record['val_loss']:.3f} acc {record['val_acc']:.1%}" if val else ""))  # fmt: skip
            if epoch > 0:
                run.save(epoch, history)
    finally:
        timing = run.close()
    return finish(cfg, clf, step, labels, train, val, test, history, timing, run.last_ckpt, trainable, run.step_losses)


def epoch_metrics(step, train, val, batch_size, epoch, history) -> dict:
    record = {"kind": "epoch", "epoch": epoch}
    for name, data in (("train", train), ("val", val)):
        if data is not None:
            loss, acc, _ = evaluate(step, data, batch_size)
            record[f"{name}_loss"], record[f"{name}_acc"] = loss, acc
            history[f"{name}_loss"].append((epoch, loss))
            history[f"{name}_acc"].append((epoch, acc))
    return record


def finish(cfg, clf, step, labels, train, val, test, history, timing, last_ckpt, trainable, step_losses) -> ClassifyResult:
    out = Path(cfg.out_dir)
    k = len(labels.names)
    names = {"train": "train (after each epoch)", "val": "validation"}
    plots = {
        "loss": str(plot_curves({"train": history["train_loss"], "val": history["val_loss"]}, out / "loss.png",
                                "classification loss (L_FT)", step_points=step_losses, names=names)),
        "accuracy": str(plot_curves({"train": history["train_acc"], "val": history["val_acc"]}, out / "accuracy.png",
                                    "accuracy", names=names)),
    }  # fmt: skip
    test_loss = test_acc = baseline = matrix = None
    if test is not None:
        test_loss, test_acc, pred = evaluate(step, test, cfg.batch_size)
        majority = int(np.bincount(train.labels, minlength=k).argmax())
        baseline = float((test.labels == majority).mean())
        matrix = confusion_matrix(test.labels, pred, k)
        plots["confusion"] = str(plot_confusion(matrix, labels.names, out / "confusion.png",
                                                f"test set: accuracy {test_acc:.1%} (majority baseline {baseline:.1%})"))  # fmt: skip
    result = ClassifyResult(
        labels=list(labels.names), train_examples=len(train), val_examples=len(val) if val else 0,
        test_examples=len(test) if test else 0, trainable_params=sum(int(clf.params[n].size) for n in trainable),
        frozen_params=sum(int(v.size) for n, v in clf.params.items() if n not in trainable), history=history,
        test_accuracy=test_acc, test_loss=test_loss, majority_baseline=baseline,
        confusion=matrix.tolist() if matrix is not None else None, seconds=timing["seconds"], steps=timing["steps"],
        ms_per_step=timing["ms_per_step"], checkpoint=str(last_ckpt), plots=plots, out_dir=str(out),
    )  # fmt: skip
    ckpt.atomic_write_json(out / "summary.json", asdict(result))
    print(f"\nDone: {result.steps} steps in {result.seconds:.1f}s ({result.ms_per_step:.0f} ms/step)")
    if test is not None:
        print(f"test accuracy {test_acc:.1%} on {len(test)} texts (majority-class baseline {baseline:.1%}), "
              f"test loss {test_loss:.3f}")  # fmt: skip
        print(format_confusion(matrix, labels.names))
    print(f"checkpoint: {last_ckpt} (loads in transformers.GPT2ForSequenceClassification.from_pretrained)")
    print("plots:      " + ", ".join(plots.values()))
    return result
