"""Fine-tuning a GPT: classification with the LM-loss mix, and instruction tuning with masked targets.

    from npgpt.finetune import FinetuneConfig, finetune
    result = finetune(FinetuneConfig(task="classify", data="tang-forms", epochs=5))
    clf = load_classifier("runs/finetune")                   # its newest checkpoint
    print(clf.labels[clf.predict_proba(idx).argmax(1)[0]])

Modules: tables.py and instructions.py (data), classifier.py (the model with a classification head
and its Hugging Face files), steps.py (one step's forward and backward), trainer.py (what the two
tasks share: the starting model, the epochs of batches, the update), classify.py and instruct.py (the
two tasks, each run by the one run loop of npgpt/loop/), plots.py. The two commands' argparse code
lives in npgpt/cli/finetune.py and npgpt/cli/classify.py.
"""

from __future__ import annotations

from .classifier import Classifier, load_classifier
from .config import FinetuneConfig


def finetune(cfg: FinetuneConfig):
    """Run a fine-tuning job; returns the task's result (also written to <out_dir>/summary.json)."""
    if cfg.task == "instruct":
        from .instruct import run_instruct

        return run_instruct(cfg)
    from .classify import run_classify

    return run_classify(cfg)


__all__ = ["Classifier", "FinetuneConfig", "finetune", "load_classifier"]
