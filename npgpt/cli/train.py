"""`npgpt train`: its arguments, mapped onto npgpt.train.TrainConfig, and the call of npgpt.train.train.

    npgpt train --data my_book.txt --preset micro --epochs 20 --batch-size 8
    npgpt train --data data/mycorpus --preset gpt2 --max-steps 5000      # token shards (npgpt prepare, llm.c)
"""

from __future__ import annotations

import argparse
from dataclasses import fields

from ..config import PRESETS
from ..recipes import RECIPES, recipe_values
from ..train import DECAY_CHOICES, TrainConfig, dry_run_report, train


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    p.add_argument("--recipe", choices=sorted(RECIPES),
                   help="a named set of settings; flags given beside it override it. book-ch5: chapter 5 of "
                        "'Build a Large Language Model (From Scratch)' (GPT-2 124M shape, PyTorch's init, AdamW "
                        "4e-4 decaying every parameter, the book's split, batches and evaluation; see npgpt/recipes.py)")
    for add_group in (_data_arguments, _model_arguments, _optimisation_arguments, _output_arguments, _machine_arguments):
        add_group(p, d)
    _record_given_flags(p)


def _data_arguments(p: argparse.ArgumentParser, d: TrainConfig) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", nargs="+", action="extend", metavar="FILE",
                   help="UTF-8 text files, or bundled corpora by name: the-verdict (default), tang300; or token shards, "
                        "read by memory map: a folder npgpt prepare wrote, llm.c's .bin shards (files, quoted globs or "
                        "their folder; files named *val* are the validation split), nanoGPT's train.bin / val.bin "
                        "with --data-format nanogpt (see docs/data.md); a repeated --data adds its files to the others")
    g.add_argument("--data-format", choices=["auto", "nanogpt"], default=d.data_format,
                   help="auto (default): text files, or token shards with llm.c's header; nanogpt: --data names "
                        "nanoGPT's raw uint16 train.bin / val.bin, or their folder")
    g.add_argument("--train-ratio", type=float, default=d.train_ratio, help="share of the text for training (default 0.9): of its tokens, or of its characters with --split-by characters; token shards come split by their files, and 1 trains on them without validation")
    g.add_argument("--split-by", choices=["tokens", "characters"], default=d.split_by,
                   help="cut train/val at --train-ratio of the tokens (default) or of the characters, each part then tokenised "
                        "(the book's way; not cached)")
    g.add_argument("--stride", type=int, default=None, help="step between windows (default: the context length)")
    g.add_argument("--encoding-errors", choices=["strict", "replace"], default=d.encoding_errors,
                   help="invalid UTF-8: stop with an error (strict) or replace the bytes with U+FFFD")
    g.add_argument("--cache-dir", default=None, help="where tokenised data is cached (default ~/.cache/npgpt/tokens)")


def _model_arguments(p: argparse.ArgumentParser, d: TrainConfig) -> None:
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
    g.add_argument("--init", choices=["gpt2", "pytorch"],
                   help="a new model's initial weights: gpt2 (default: N(0, 0.02), residual projections "
                        "N(0, 0.02/sqrt(2 n_layers)), biases 0) or pytorch (PyTorch's layer defaults, as the book's "
                        "GPTModel: embeddings N(0, 1), linear weights and biases U(+-1/sqrt(fan_in))); LayerNorm 1 and 0")


def _optimisation_arguments(p: argparse.ArgumentParser, d: TrainConfig) -> None:
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=d.batch_size)
    g.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per optimizer step")
    g.add_argument("--epochs", type=float, default=d.epochs,
                   help="passes over the training windows (default 20; fractions allowed); on token shards an epoch is "
                        "floor(windows / batch size) batches")
    g.add_argument("--max-steps", type=int, help="optimizer steps (overrides --epochs)")
    g.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    g.add_argument("--min-lr", type=float, help="final learning rate of the cosine (default lr/10)")
    g.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    g.add_argument("--schedule", choices=["cosine", "constant"], default=d.schedule)
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--weight-decay-on", choices=list(DECAY_CHOICES), default=d.weight_decay_on,
                   help="matrices: weight decay on matrices and embeddings only (default); all: on every parameter, "
                        "biases and LayerNorm too (torch.optim.AdamW(model.parameters()), the book's way)")
    g.add_argument("--beta1", type=float, default=d.beta1)
    g.add_argument("--beta2", type=float, default=d.beta2)
    g.add_argument("--grad-clip", type=float, default=d.grad_clip, help="global gradient-norm limit (0: off)")
    g.add_argument("--max-bad-steps", type=int, default=d.max_bad_steps,
                   help="consecutive non-finite steps before training stops")


def _output_arguments(p: argparse.ArgumentParser, d: TrainConfig) -> None:
    g = p.add_argument_group("evaluation and output")
    g.add_argument("--out-dir", default=d.out_dir)
    g.add_argument("--eval-interval", type=int, default=d.eval_interval)
    g.add_argument("--eval-offset", type=int, default=d.eval_offset,
                   help="evaluate after the steps s with (s - offset) divisible by --eval-interval (default 0; "
                        "1: right after the first step and every interval after it, as the book does)")
    g.add_argument("--eval-batches", type=int,
                   help="validation batches per evaluation (default: all of a text's; the first 20 of token shards')")
    g.add_argument("--eval-train-batches", type=int, metavar="N",
                   help="also evaluate the train loss without dropout on N random train batches at each evaluation, "
                        "logged and plotted as train_eval_loss beside the running mean of the steps (default: off)")
    g.add_argument("--sample-prompt", help="prompt for the sample at each evaluation (default: the text's first line)")
    g.add_argument("--sample-tokens", type=int, default=d.sample_tokens)
    g.add_argument("--sample-temperature", type=float, default=d.sample_temperature)
    g.add_argument("--sample-top-k", type=int)
    g.add_argument("--checkpoint-interval", type=int, help="steps between checkpoints (the end is always saved)")
    g.add_argument("--keep-last", type=int, default=d.keep_last, help="checkpoints kept (default 3)")
    g.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out-dir")
    g.add_argument("--overwrite", action="store_true", help="start afresh in an --out-dir that holds an earlier run")


def _machine_arguments(p: argparse.ArgumentParser, d: TrainConfig) -> None:
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
    g.add_argument("--recompute", choices=["none", "attention", "mlp", "block"], default=d.recompute,
                   help="keep less in the forward and recompute it in the backward (fast engine): attention's "
                        "probabilities, GELU's output, or a whole block from its input. Same results, less memory")
    g.add_argument("--dry-run", action="store_true",
                   help="print the memory this run needs (weights, gradients, AdamW, activations), the largest "
                        "batch that fits, and the FLOPs of a step; allocate nothing")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


class _RecordsGiven:
    """Mixed into each argparse action: notes the destinations the command line actually sets, so that
    flags given beside --recipe override it (even when they repeat a default)."""

    def __call__(self, parser, namespace, values, option_string=None):
        given = set(getattr(namespace, "given_flags", None) or ())
        namespace.given_flags = given | {self.dest}
        super().__call__(parser, namespace, values, option_string)


def _record_given_flags(p: argparse.ArgumentParser) -> None:
    for action in p._actions:
        if action.dest not in ("help", "recipe") and not isinstance(action, _RecordsGiven):
            action.__class__ = type(f"Given{type(action).__name__}", (_RecordsGiven, type(action)), {})


def config_from_args(args) -> TrainConfig:
    names = {f.name for f in fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in names and not (k == "data" and v is None)}
    if getattr(args, "recipe", None):  # the recipe, then the flags given on the command line
        given = getattr(args, "given_flags", None) or set()
        values = {**values, **recipe_values(args.recipe, {k: v for k, v in values.items() if k in given})}
    if values.get("grad_clip") == 0:
        values["grad_clip"] = None
    return TrainConfig(**values)


def run(args) -> int:
    cfg = config_from_args(args)
    if cfg.dry_run:
        print(dry_run_report(cfg))
        return 0
    result = train(cfg)
    return 130 if result.interrupted else 0
