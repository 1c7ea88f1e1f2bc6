"""`npgpt finetune`: its arguments, mapped onto npgpt.finetune.FinetuneConfig, and the call of
npgpt.finetune.finetune (a classifier or an instruction follower from a pretrained or new GPT).

    npgpt finetune --task classify --data train.csv --test-data test.csv --init-from runs/npgpt --out-dir runs/cls
    npgpt finetune --task classify                 # the bundled tang-forms set, a new nano model
    npgpt finetune --task instruct --data instructions.json --out-dir runs/chat
    npgpt finetune --task instruct --data instructions.json --out-dir runs/chat --epochs 8 --resume   # 3 more epochs
"""

from __future__ import annotations

import argparse
from dataclasses import fields

from ..config import PRESETS
from ..finetune.config import BUNDLED, ENGINES, TRAINABLE, FinetuneConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = FinetuneConfig()
    p.add_argument("--task", choices=["classify", "instruct"], required=True)
    g = p.add_argument_group("data")
    g.add_argument("--data", metavar="FILE", help="classify: .csv/.tsv/.jsonl/.json table; instruct: .json list or .jsonl "
                   f"of instruction/input/output records; or a bundled set: {', '.join(BUNDLED)} (the default)")
    g.add_argument("--val-data", metavar="FILE", help="validation file (default: a stratified --val-share of --data)")
    g.add_argument("--test-data", metavar="FILE", help="test file, scored once at the end (confusion matrix)")
    g.add_argument("--text-column", default=d.text_column)
    g.add_argument("--label-column", default=d.label_column)
    g.add_argument("--val-share", type=float, default=d.val_share, help="share held out when there is no --val-data")
    g.add_argument("--max-examples", type=int, help="use only the first N examples of each file (quick trials)")
    g = p.add_argument_group("model")
    g.add_argument("--init-from", metavar="DIR", help="a Hugging Face GPT-2 directory or an npgpt run or checkpoint "
                   "(default: a new model of --preset)")
    g.add_argument("--preset", default=d.preset, choices=sorted(PRESETS), help="size of a new model (default nano)")
    g.add_argument("--emb-dim", type=int, help="a new model's width (default: the preset's)")
    g.add_argument("--n-heads", type=int)
    g.add_argument("--n-layers", type=int)
    g.add_argument("--context-length", type=int, help="longest example in tokens (a new model's context); default: "
                   "the longest training example, at most the model's context (a new model: at most 256, or the "
                   "preset's context if larger). Longer texts are cut (classify) or left out (instruct)")
    g.add_argument("--drop-rate", type=float)
    g.add_argument("--lm-weight", type=float, help="classify: lambda in L_FT + lambda * L_PT, in [0, 1] (default: "
                   "0.5, GPT-1's, with --init-from; 0 for a new model)")
    g.add_argument("--trainable", choices=TRAINABLE, help="what trains: the head, the last block (+ final LayerNorm "
                   "+ head), or all (default: last-block with --init-from, else all)")
    g.add_argument("--no-mask-prompt", dest="mask_prompt", action="store_false",
                   help="instruct: keep the prompt's tokens in the loss")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, help="passes over the training data (default 5)")
    g.add_argument("--batch-size", type=int, default=d.batch_size)
    g.add_argument("--lr", type=float, help="peak learning rate, cosine to lr/10 (default: 5e-4 for a new model, "
                   "5e-5 with --init-from)")
    g.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--grad-clip", type=float, default=d.grad_clip, help="global gradient-norm limit (0: off)")
    g.add_argument("--seed", type=int, default=d.seed)
    g = p.add_argument_group("output and machine")
    g.add_argument("--out-dir", default=d.out_dir)
    g.add_argument("--keep-last", type=int, default=d.keep_last, help="checkpoints kept (default 2)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out-dir from its newest good checkpoint "
                   "(with the settings it was started with; --epochs may grow)")
    g.add_argument("--overwrite", action="store_true", help="start afresh in an --out-dir that holds an earlier run "
                   "(its checkpoints are replaced once this run has one)")
    g.add_argument("--samples", type=int, default=d.samples, help="instruct: responses printed at the end")
    g.add_argument("--engine", choices=ENGINES, default=d.engine,
                   help="fast: preallocated buffers, frozen layers skipped (default); reference: the readable layers")
    g.add_argument("--device", choices=["cpu", "cuda", "auto"], help="default: $NPGPT_DEVICE or auto")
    g.add_argument("--dtype", choices=["float32", "float64"], default=d.dtype)
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def run(args) -> int:
    from ..finetune import finetune

    names = {f.name for f in fields(FinetuneConfig)}
    values = {k: v for k, v in vars(args).items() if k in names}
    if values.get("grad_clip") == 0:
        values["grad_clip"] = None
    result = finetune(FinetuneConfig(**values))
    return 130 if result.interrupted else 0
