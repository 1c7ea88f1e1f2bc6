"""The `npgpt` command line: train, generate, finetune, classify, gradcheck, bench, info, seq2seq (the
console script `npgpt`, and `python -m npgpt`).

Each subcommand's arguments and work live in its own module of this package (npgpt/cli/train.py, ...);
this file only wires them together. The Python API they call (npgpt.train, npgpt.generate, npgpt.bench,
...) never imports argparse.
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__
    from . import seq2seq as seq2seq_cli
    from . import bench, classify, finetune, generate, gradcheck, info, train

    parser = argparse.ArgumentParser(
        prog="npgpt",
        description="GPT-2 in plain NumPy and CuPy, with every backward pass written by hand.",
    )
    parser.add_argument("--version", action="version", version=f"npgpt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module, help_text in [
        ("train", train, "pretrain or fine-tune a GPT on text files (default: the bundled short story)"),
        ("generate", generate, "continue a prompt with a trained checkpoint"),
        ("finetune", finetune, "fine-tune a GPT: a classifier (--task classify) or on instructions (--task instruct)"),
        ("classify", classify, "predict labels with a fine-tuned classifier"),
        ("gradcheck", gradcheck, "check every layer's backward against finite differences"),
        ("bench", bench, "time a training step and generation"),
        ("info", info, "show the backend, devices, BLAS and versions"),
        ("seq2seq", seq2seq_cli, "the encoder-decoder Transformer: train, translate, eval (English -> Malay bundled)"),
    ]:
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "run", None) is None:
        parser.print_help()
        return 2
    from ..train import TrainingAborted

    try:
        return int(args.run(args) or 0)
    except ValueError as e:  # bad input: one line that names the problem and the fix
        print(f"npgpt {args.command}: error: {e}", file=sys.stderr)
        return 2
    except TrainingAborted as e:  # training stopped itself (non-finite loss or weights)
        print(f"npgpt {args.command}: stopped: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
