"""`npgpt prepare`: its arguments, mapped onto npgpt.prepare.PrepareConfig, and the call of npgpt.prepare.prepare.

    npgpt prepare --data 'corpus/*.txt' more.jsonl.gz --out data/mycorpus
"""

from __future__ import annotations

import argparse

from ..prepare import DEFAULT_VAL_SHARE, PrepareConfig, prepare


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = PrepareConfig(data=[], out="")
    p.add_argument("--data", nargs="+", required=True, metavar="PATH",
                   help="UTF-8 text files (each one document, or see --split-on-blank-lines), JSON lines (.jsonl, "
                        ".ndjson: one object per line), any of them .gz/.xz/.bz2; globs (quote them: 'corpus/*.txt', "
                        "'**' for any depth) and folders (searched for .txt, .md, .jsonl, .ndjson files)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="folder for the shards and manifest.json (a stopped run in it is continued)")
    p.add_argument("--text-field", default=d.text_field, help="the field of a JSON line that holds the text (default text)")
    p.add_argument("--split-on-blank-lines", action="store_true",
                   help="in text files, each run of non-blank lines is a document (default: each file is one)")
    p.add_argument("--shard-tokens", type=int, default=d.shard_tokens,
                   help="tokens per shard (default 100,000,000 as llm.c's; 200 MB a shard)")
    val = p.add_mutually_exclusive_group()
    val.add_argument("--val-tokens", type=int, metavar="N",
                     help="validation: the first documents, until it holds at least N tokens (0: none)")
    val.add_argument("--val-share", type=float, metavar="F",
                     help=f"validation: documents spread through the corpus, F of the tokens (default {DEFAULT_VAL_SHARE})")
    p.add_argument("--workers", type=int, metavar="K",
                   help="tokenizer processes (default: the cores; 0 tokenizes in this process). The shards do not depend on it")
    p.add_argument("--errors", choices=["strict", "replace"], default=d.errors,
                   help="bad input: stop with an error naming file and line (strict), or replace invalid UTF-8 with "
                        "U+FFFD and skip JSON lines that cannot be used, counting both in the summary (replace)")
    p.add_argument("--overwrite", action="store_true", help="start afresh in a --out that holds another preparation")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def run(args) -> int:
    cfg = PrepareConfig(data=args.data, out=args.out, text_field=args.text_field,
                        split_on_blank_lines=args.split_on_blank_lines, shard_tokens=args.shard_tokens,
                        val_tokens=args.val_tokens, val_share=args.val_share, workers=args.workers,
                        errors=args.errors, overwrite=args.overwrite, progress=args.progress)  # fmt: skip
    prepare(cfg)
    return 0
