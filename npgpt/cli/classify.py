"""`npgpt classify`: predict labels with a fine-tuned classifier.

    npgpt classify --checkpoint runs/cls --text "床前明月光，疑是地上霜。"        # the predicted label
    npgpt classify --checkpoint runs/cls --text "..." --probs                  # every label's probability
    npgpt classify --checkpoint runs/cls --data test.csv                       # accuracy and confusion matrix
"""

from __future__ import annotations

import argparse

import numpy as np


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="a fine-tuning run (its newest checkpoint), a checkpoint, or a GPT2ForSequenceClassification directory")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", help="one text to classify")
    what.add_argument("--data", metavar="FILE", help="a labelled .csv/.tsv/.jsonl/.json file to score")
    p.add_argument("--probs", action="store_true", help="with --text: print every label's probability")
    p.add_argument("--text-column", default="text")
    p.add_argument("--label-column", default="label")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], help="default: $NPGPT_DEVICE or auto")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")


def check_args(args) -> None:
    """Every argument, before the checkpoint or the data is read."""
    from .. import validate as V
    from ..finetune.tables import FORMATS
    from ..pretrained import check_source

    V.integer("--batch-size", args.batch_size, 1)
    if args.text is not None and not args.text.strip():
        raise ValueError("--text is empty; give the text to classify")
    if args.data is not None:
        if args.probs:
            raise ValueError("--probs prints one text's probabilities and goes with --text; with --data the accuracy "
                             "and the confusion matrix are printed: drop --probs")  # fmt: skip
        if args.text_column == args.label_column:
            raise ValueError(f"--text-column and --label-column are both {args.text_column!r}; name the column of the "
                             "texts and the column of the labels")  # fmt: skip
        path = V.in_path("--data", args.data, what="a labelled .csv/.tsv/.jsonl/.json file")
        if path.is_dir():
            raise ValueError(f"--data {args.data} is a folder; give a labelled .csv/.tsv/.jsonl/.json file")
        if path.suffix.lower() not in FORMATS:
            raise ValueError(f"--data {args.data}: unknown table format {path.suffix!r}; use .csv, .tsv, .jsonl or .json")
    check_source(args.checkpoint, "--checkpoint")


def run(args) -> int:
    from ..finetune.classifier import load_classifier
    from ..finetune.plots import confusion_matrix, format_confusion
    from ..finetune.tables import PAD_ID, ClassificationSet, LabelMap, Row, read_labelled

    check_args(args)
    rows = [Row(args.text, "", "--text")] if args.text is not None else read_labelled(
        args.data, args.text_column, args.label_column)  # fmt: skip
    clf = load_classifier(args.checkpoint, device=args.device, dtype=np.dtype(args.dtype))
    if clf.pad_token_id != PAD_ID:
        raise ValueError(f"{args.checkpoint} pads with token {clf.pad_token_id}; npgpt classify pads with {PAD_ID} "
                         "(<|endoftext|>), so its predictions would read the wrong position")  # fmt: skip
    labels = LabelMap(clf.labels)
    data = ClassificationSet.build(rows, labels if args.data else None, clf.model.config.context_length)
    probs = np.concatenate([clf.predict_proba(idx) for idx, _ in data.batches(args.batch_size)])
    if args.text is not None:
        if args.probs:
            for i in np.argsort(-probs[0]):
                print(f"{probs[0, i]:.4f}  {clf.labels[i]}")
        else:
            print(clf.labels[int(probs[0].argmax())])
        return 0
    pred = probs.argmax(axis=1)
    acc = float((pred == data.labels).mean())
    print(f"accuracy {acc:.1%} ({int((pred == data.labels).sum())} of {len(data)} texts in {args.data})")
    print(format_confusion(confusion_matrix(data.labels, pred, len(clf.labels)), clf.labels))
    return 0
