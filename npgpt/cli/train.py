"""`npgpt train`: its arguments, mapped onto npgpt.train.TrainConfig, and the call of npgpt.train.train.

    npgpt train --data my_book.txt --preset micro --epochs 20 --batch-size 8
"""

from __future__ import annotations

import argparse
from dataclasses import fields

from ..config import PRESETS
from ..train import TrainConfig, train


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    g = p.add_argument_group("data")
    g.add_argument("--data", nargs="+", default=d.data, metavar="FILE",
                   help="UTF-8 text files, or bundled corpora by name: the-verdict (default), tang300")
    g.add_argument("--train-ratio", type=float, default=d.train_ratio, help="share of tokens for training (default 0.9)")
    g.add_argument("--stride", type=int, default=None, help="step between windows (default: the context length)")
    g.add_argument("--encoding-errors", choices=["strict", "replace"], default=d.encoding_errors,
                   help="invalid UTF-8: stop with an error (strict) or replace the bytes with U+FFFD")
    g.add_argument("--cache-dir", default=None, help="where tokenised data is cached (default ~/.cache/npgpt/tokens)")
    g = p.add_argument_group("model")
    g.add_argument("--preset", default=d.preset, choices=sorted(PRESETS),
                   help="model size (default nano; a resumed or --init-from model keeps its own)")
    g.add_argument("--context-length", type=int, help="tokens per window (and the model's context for a new model)")
    g.add_argument("--emb-dim", type=int)
    g.add_argument("--n-heads", type=int)
    g.add_argument("--n-layers", type=int)
    g.add_argument("--drop-rate", type=float)
    g.add_argument("--qkv-bias", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--tie-weights", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--init-from", metavar="DIR", help="start from a Hugging Face GPT-2 directory or an npgpt checkpoint")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=d.batch_size)
    g.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per optimizer step")
    g.add_argument("--epochs", type=float, default=d.epochs)
    g.add_argument("--max-steps", type=int, help="optimizer steps (overrides --epochs)")
    g.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    g.add_argument("--min-lr", type=float, help="final learning rate of the cosine (default lr/10)")
    g.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    g.add_argument("--schedule", choices=["cosine", "constant"], default=d.schedule)
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--beta1", type=float, default=d.beta1)
    g.add_argument("--beta2", type=float, default=d.beta2)
    g.add_argument("--grad-clip", type=float, default=d.grad_clip, help="global gradient-norm limit (0: off)")
    g.add_argument("--max-bad-steps", type=int, default=d.max_bad_steps,
                   help="consecutive non-finite steps before training stops")
    g = p.add_argument_group("evaluation and output")
    g.add_argument("--out-dir", default=d.out_dir)
    g.add_argument("--eval-interval", type=int, default=d.eval_interval)
    g.add_argument("--eval-batches", type=int, help="validation batches per evaluation (default: all)")
    g.add_argument("--sample-prompt", help="prompt for the sample at each evaluation (default: the text's first line)")
    g.add_argument("--sample-tokens", type=int, default=d.sample_tokens)
    g.add_argument("--sample-temperature", type=float, default=d.sample_temperature)
    g.add_argument("--sample-top-k", type=int)
    g.add_argument("--checkpoint-interval", type=int, help="steps between checkpoints (the end is always saved)")
    g.add_argument("--keep-last", type=int, default=d.keep_last, help="checkpoints kept (default 3)")
    g.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out-dir")
    g.add_argument("--overwrite", action="store_true", help="start afresh in an --out-dir that holds an earlier run")
    g = p.add_argument_group("machine")
    g.add_argument("--engine", choices=["fast", "reference"], default=d.engine,
                   help="fast: preallocated fused step (default); reference: the readable layer-by-layer code")
    g.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=d.tf32,
                   help="TensorFloat-32 matrix products on the GPU (default on; no effect on the CPU)")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--device", choices=["cpu", "cuda", "auto"], help="default: $NPGPT_DEVICE or auto")
    g.add_argument("--dtype", choices=["float32", "float64"], default=d.dtype)
    g.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=d.precision,
                   help="bf16/fp16: mixed precision, 16-bit activations and matrix products with float32 weights "
                        "(fast engine; meant for GPUs, slow on the CPU). Default fp32")
    g.add_argument("--loss-scale", type=float, default=d.loss_scale,
                   help="fp16: initial loss scale of dynamic loss scaling (default 65536)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def config_from_args(args) -> TrainConfig:
    names = {f.name for f in fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in names}
    if values.get("grad_clip") == 0:
        values["grad_clip"] = None
    return TrainConfig(**values)


def run(args) -> int:
    result = train(config_from_args(args))
    return 130 if result.interrupted else 0
