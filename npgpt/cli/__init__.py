"""The `npgpt` command line: train, prepare, generate, finetune, classify, gradcheck, bench, info, seq2seq (the
console script `npgpt`, and `python -m npgpt`).

Each subcommand's arguments and work live in its own module of this package (npgpt/cli/train.py, ...);
this file only wires them together. The Python API they call (npgpt.train, npgpt.generate, npgpt.bench,
...) never imports argparse.

What the user sees when something is wrong is decided here, the same for every command: bad input is
one line on stderr naming the flag, its value and the fix, exit code 2 (argparse's own errors too);
training that stops itself (divergence) exits 1; an interrupt exits 130 with one line; the environment
failing (a full disk, a read-only folder, too little memory) is one line and exit 2. Never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import signal
import sys

from .pipe import output_reader_may_leave

# A value that starts with "-" but is a number (-1e-3, -inf, -nan): argparse would read it as a flag.
_NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*([eE][-+]?\d+)?|\.\d+([eE][-+]?\d+)?|inf(inity)?|nan)$", re.IGNORECASE)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with its errors as one line ("npgpt train: error: argument --lr: ... (see --help)")
    instead of the usage text followed by the error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def join_negative_values(argv: list[str]) -> list[str]:
    """`--lr -1e-3` -> `--lr=-1e-3`, so a negative number is read as the flag's value (and then refused
    by range, naming the flag) rather than as an unknown flag."""
    out: list[str] = []
    for arg in argv:
        prev = out[-1] if out else ""
        if _NEGATIVE_NUMBER.match(arg) and prev.startswith("--") and "=" not in prev and prev != "--":
            out[-1] = f"{prev}={arg}"
        else:
            out.append(arg)
    return out


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__
    from . import seq2seq as seq2seq_cli
    from . import bench, classify, finetune, generate, gradcheck, info, prepare, train

    parser = ArgumentParser(
        prog="npgpt",
        description="GPT-2 in plain NumPy and CuPy, with every backward pass written by hand.",
    )
    parser.add_argument("--version", action="version", version=f"npgpt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module, help_text in [
        ("train", train, "pretrain or fine-tune a GPT on text files (default: the bundled short story)"),
        ("prepare", prepare, "tokenize text files and JSON lines into token shards (llm.c's format), in parallel"),
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


@contextlib.contextmanager
def terminate_as_interrupt():
    """SIGTERM (kill, a job scheduler's stop) is treated as Ctrl-C: outside a run's steps it ends the command
    with one line and exit code 130 instead of killing it without a word; inside them the run loop's own
    handler finishes the step and saves (npgpt/loop/stop.py)."""

    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def one_line(text) -> str:
    return "; ".join(part.strip() for part in str(text).splitlines() if part.strip())


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parser.parse_args(join_negative_values(argv))
    except SystemExit as e:  # --help, --version, or a parse error already printed as one line
        return e.code if isinstance(e.code, int) else 0
    if getattr(args, "run", None) is None:
        parser.print_help()
        return 2
    from ..atomic import explain_os_error
    from ..loop import SaveFailed, TrainingAborted, TrainingInterrupted

    name = f"npgpt {args.command}"
    try:
        with terminate_as_interrupt(), output_reader_may_leave(name):
            return int(args.run(args) or 0)
    except ValueError as e:  # bad input: one line that names the problem and the fix
        print(f"{name}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except SaveFailed as e:  # a checkpoint could not be written; the previous one is intact
        print(f"{name}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except TrainingAborted as e:  # training stopped itself (divergence: non-finite loss or weights)
        print(f"{name}: stopped: {one_line(e)}", file=sys.stderr)
        return 1
    except TrainingInterrupted as e:  # a second Ctrl-C / SIGTERM: stopped at once
        print(f"\n{name}: interrupted: {one_line(e)}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM outside a run's steps (the loop handles those itself)
        print(f"\n{name}: interrupted", file=sys.stderr)
        return 130
    except MemoryError as e:  # an allocation the estimate did not foresee
        print(f"{name}: error: out of memory{': ' + str(e) if str(e) else ''}; make the model or the batch smaller",
              file=sys.stderr)  # fmt: skip
        return 2
    except OSError as e:  # the environment: a full disk, a read-only folder, a vanished file
        print(f"{name}: error: {one_line(explain_os_error(e))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
