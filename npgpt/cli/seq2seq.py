"""`npgpt seq2seq train | translate | eval`: the encoder-decoder Transformer from the command line.

    npgpt seq2seq train --out-dir runs/en-ms                      # the bundled English -> Malay pairs
    npgpt seq2seq translate --checkpoint runs/en-ms --text "Monday, March 3, 2025" [--beam 4]
    npgpt seq2seq eval --checkpoint runs/en-ms [--data test.tsv]   # exact match and corpus BLEU
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="seq2seq_command", metavar="ACTION")
    p.set_defaults(seq2seq_parser=p)
    add_train_arguments(sub.add_parser("train", help="train on sentence pairs (default: the bundled English -> Malay pairs)",
                                       description="Train an encoder-decoder Transformer on source<TAB>target pairs."))  # fmt: skip
    add_translate_arguments(sub.add_parser("translate", help="translate text with a trained checkpoint",
                                           description="Translate text with a trained checkpoint."))  # fmt: skip
    add_eval_arguments(sub.add_parser("eval", help="exact match and corpus BLEU on pairs",
                                      description="Score a checkpoint on source<TAB>target pairs: exact match and "
                                                  "corpus BLEU (sacreBLEU)."))  # fmt: skip


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    from ..seq2seq.train import Seq2SeqTrainConfig

    d = Seq2SeqTrainConfig()
    g = p.add_argument_group("data")
    g.add_argument("--data", metavar="TSV", help="source<TAB>target pairs, UTF-8 (default: the bundled en-ms corpus)")
    g.add_argument("--val-data", metavar="TSV", help="held-out pairs (default: a seeded share of --data)")
    g.add_argument("--held-out", type=float, default=d.held_out, help=f"share of --data held out (default {d.held_out})")
    g.add_argument("--split-seed", type=int, default=d.split_seed, help="seed of the train/held-out split")
    g = p.add_argument_group("model")
    g.add_argument("--d-model", type=int, default=d.d_model)
    g.add_argument("--n-heads", type=int, default=d.n_heads)
    g.add_argument("--n-encoder-layers", type=int, default=d.n_encoder_layers)
    g.add_argument("--n-decoder-layers", type=int, default=d.n_decoder_layers)
    g.add_argument("--d-ff", type=int, default=d.d_ff, help="feed-forward hidden width")
    g.add_argument("--dropout", type=float, default=d.dropout)
    g.add_argument("--norm", choices=["post", "pre"], default=d.norm, help="post: Add & Norm (the paper); pre: norm first")
    g.add_argument("--activation", choices=["relu", "gelu"], default=d.activation)
    g.add_argument("--pos-encoding", choices=["sinusoidal", "learned"], default=d.pos_encoding)
    g.add_argument("--tie-embeddings", choices=["all", "decoder", "none"], default=d.tie_embeddings,
                   help="all: one table for source, target and output; decoder: target and output; none")
    g.add_argument("--max-len", type=int, default=d.max_len, help="longest source / target in tokens (longer pairs are an error)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="pairs per step")
    g.add_argument("--max-steps", type=int, default=d.max_steps)
    g.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    g.add_argument("--min-lr", type=float, help="final learning rate of the cosine (default lr/10)")
    g.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--beta1", type=float, default=d.beta1)
    g.add_argument("--beta2", type=float, default=d.beta2)
    g.add_argument("--grad-clip", type=float, default=d.grad_clip, help="global gradient-norm limit (0: off)")
    g.add_argument("--max-bad-steps", type=int, default=d.max_bad_steps)
    g = p.add_argument_group("evaluation and output")
    g.add_argument("--out-dir", default=d.out_dir)
    g.add_argument("--eval-interval", type=int, default=d.eval_interval)
    g.add_argument("--eval-pairs", type=int, default=d.eval_pairs,
                   help="held-out pairs scored at each evaluation (the final evaluation scores all)")
    g.add_argument("--final-beam", type=int, default=d.final_beam, help="beam of the final evaluation (1: greedy)")
    g.add_argument("--checkpoint-interval", type=int, help="steps between checkpoints (the end is always saved)")
    g.add_argument("--keep-last", type=int, default=d.keep_last)
    g.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out-dir")
    g.add_argument("--overwrite", action="store_true", help="start afresh in an --out-dir that holds an earlier run")
    g = p.add_argument_group("machine")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--device", choices=["cpu", "cuda", "auto"], help="default: $NPGPT_DEVICE or auto")
    g.add_argument("--dtype", choices=["float32", "float64"], default=d.dtype)
    g.add_argument("--engine", choices=["fast", "reference"], default=d.engine,
                   help="fast: buffers planned once, fast ops (npgpt/fast/); reference: the readable layers (default fast)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def add_decoding_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="a run directory (its newest good checkpoint) or a checkpoint")
    p.add_argument("--beam", type=int, default=1, help="beam width (default 1: greedy)")
    p.add_argument("--length-penalty", type=float, default=0.6,
                   help="alpha of the GNMT length penalty ((5 + n) / 6) ** alpha in beam search (default 0.6)")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], help="default: $NPGPT_DEVICE or auto")


def add_translate_arguments(p: argparse.ArgumentParser) -> None:
    add_decoding_arguments(p)
    p.add_argument("--text", action="append", metavar="TEXT", help="text to translate (repeat for more; default: lines of stdin)")


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    add_decoding_arguments(p)
    p.add_argument("--data", metavar="TSV", help="source<TAB>target pairs (default: the run's heldout.tsv)")
    p.add_argument("--show", type=int, default=5, help="how many mistranslations to print (default 5)")


def run(args) -> int:
    action = getattr(args, "seq2seq_command", None)
    if action is None:
        args.seq2seq_parser.print_help()
        return 2
    return {"train": run_train, "translate": run_translate, "eval": run_eval}[action](args)


def run_train(args) -> int:
    from ..seq2seq.train import TrainingAborted, config_from_args, train

    try:
        result = train(config_from_args(args))
    except TrainingAborted as e:
        print(f"npgpt seq2seq train: stopped: {e}", file=sys.stderr)
        return 1
    return 130 if result.interrupted else 0


def _load(args):
    from .. import validate as V
    from ..seq2seq.checkpoint import load_model
    from ..seq2seq.decode import check_decoding

    check_decoding(args.beam, args.length_penalty)
    if getattr(args, "show", None) is not None:
        V.integer("--show", args.show, 0)
    V.in_path("--checkpoint", args.checkpoint, "the --out-dir of `npgpt seq2seq train` or one of its checkpoints")
    return load_model(args.checkpoint, device=args.device)


def run_translate(args) -> int:
    from ..seq2seq.evaluate import translate

    texts = [t.strip() for t in args.text] if args.text else [line.strip() for line in sys.stdin if line.strip()]
    if not texts:
        raise ValueError("nothing to translate: give --text TEXT (or lines on stdin)")
    model, vocab, _ = _load(args)
    for out in translate(model, vocab, texts, beam=args.beam, alpha=args.length_penalty):
        print(out)
    return 0


def run_eval(args) -> int:
    from ..seq2seq.data import read_pairs
    from ..seq2seq.evaluate import score, translate

    data = args.data
    if data is None:
        data = Path(args.checkpoint) / "heldout.tsv"
        if not data.is_file():
            raise ValueError(f"no --data given and {data} does not exist; pass --data pairs.tsv")
    elif not data.strip():
        raise ValueError("--data is empty; give a TSV of source<TAB>target pairs (or leave it out for the run's heldout.tsv)")
    elif not Path(data).is_file():
        raise ValueError(f"--data {data} does not exist (or is not a file)")
    pairs = read_pairs(data)
    model, vocab, ckpt_dir = _load(args)
    hyps = translate(model, vocab, [s for s, _ in pairs], beam=args.beam, alpha=args.length_penalty)
    s = score(hyps, [t for _, t in pairs])
    misses = [(src, h, t) for (src, t), h in zip(pairs, hyps) if h != t]
    for src, h, t in misses[: max(args.show, 0)]:
        print(f"  {src!r} -> {h!r}  (reference {t!r})")
    decoding = "greedy" if args.beam == 1 else f"beam {args.beam}, length penalty {args.length_penalty}"
    print(f"{ckpt_dir} on {data} ({s.n:,} pairs, {decoding}):\n"
          f"exact match {s.exact_match:.2%} ({s.n - len(misses):,}/{s.n:,})\n"
          f"BLEU {s.bleu:.2f}  ({s.bleu_signature})")  # fmt: skip
    return 0
