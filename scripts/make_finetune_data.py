"""Make the bundled fine-tuning sets from 唐诗三百首 (npgpt/assets/tang300.txt), reproducibly.

    python scripts/make_finetune_data.py            # rewrites npgpt/assets/tang-{forms,instruct}-*.{csv,json}
    python scripts/make_finetune_data.py --check    # exit 1 if the shipped files differ from what this makes

tang-forms (classification): each poem's lines, labelled by their shape: "5-char quatrain" (4 lines of
5 characters), "7-char quatrain", "5-char regulated" (8 lines of 5), "7-char regulated" (8 of 7), or
"other" (old-style poems, ballads, long regulated verse: any other shape). A "line" here is a run of
characters between punctuation marks, so the labels are the shapes of 绝句 and 律诗 without their
tonal rules. Columns: text, label, title, poet.

tang-instruct (instruction tuning), one Alpaca-style record per poem that has a two-part line (a line
"床前明月光，疑是地上霜。" drawn at random), alternating between two instructions:
  "Continue this line of the poem."                   input: the line's first half, output: its second half
  "Is this the first or the second half of a line?"   input: one of the halves, output: "first" or "second"
Records are short (about 80 tokens with the template), which keeps a CPU run to minutes.

Splits: the poems (352: 14 repeats of 12 texts are dropped) are split once, stratified by label (70% train, 15% validation, 15% test, rounded per
label) with numpy's default_rng(SEED), and both sets follow that split, so no test poem is trained on.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import re
import sys
from pathlib import Path

import numpy as np

SEED = 20240516
ASSETS = Path(__file__).resolve().parents[1] / "npgpt" / "assets"
PUNCT = re.compile(r"[，。？！；：、]")
SHAPES = {(4, 5): "5-char quatrain", (4, 7): "7-char quatrain", (8, 5): "5-char regulated", (8, 7): "7-char regulated"}
SHARES = {"val": 0.15, "test": 0.15}
CONTINUE = "Continue this line of the poem."
WHICH = "Is this the first or the second half of a line?"


def read_poems(path: Path) -> list[dict]:
    """The poems in file order; a poem whose lines repeat an earlier one's (the compilation has a few, under
    two titles) is kept once, so no text can land in two splits."""
    poems, seen = [], set()
    for block in path.read_text(encoding="utf-8").strip().split("\n\n"):
        title, poet, *lines = block.strip().split("\n")
        if tuple(lines) not in seen:
            seen.add(tuple(lines))
            poems.append({"title": title, "poet": poet, "lines": lines})
    return poems


def form_of(lines: list[str]) -> str:
    parts = [p for p in PUNCT.split("".join(lines)) if p]
    sizes = {len(p) for p in parts}
    return SHAPES.get((len(parts), sizes.pop()), "other") if len(sizes) == 1 else "other"


def split(poems: list[dict]) -> dict:
    """split name -> poem indices (sorted), stratified by form."""
    rng = np.random.default_rng(SEED)
    out = {"train": [], "val": [], "test": []}
    for label in sorted({p["form"] for p in poems}):
        members = rng.permutation([i for i, p in enumerate(poems) if p["form"] == label]).tolist()
        n_test, n_val = (int(round(SHARES[s] * len(members))) for s in ("test", "val"))
        out["test"] += members[:n_test]
        out["val"] += members[n_test : n_test + n_val]
        out["train"] += members[n_test + n_val :]
    return {k: sorted(v) for k, v in out.items()}


def forms_csv(poems: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["text", "label", "title", "poet"])
    for p in poems:
        w.writerow(["\n".join(p["lines"]), p["form"], p["title"], p["poet"]])
    return buf.getvalue()


def instruct_records(poems: list[dict], rng: np.random.Generator) -> list[dict]:
    records = []
    for p in poems:
        couplets = [ln for ln in p["lines"] if len(PUNCT.findall(ln)) == 2 and PUNCT.match(ln[-1])]
        if not couplets:
            continue
        line = couplets[int(rng.integers(len(couplets)))]
        cut = PUNCT.search(line).end()  # after the first half's punctuation mark
        if len(records) % 2:
            second = bool(rng.integers(2))
            records.append({"instruction": WHICH, "input": line[cut:] if second else line[:cut],
                            "output": "second" if second else "first"})
        else:
            records.append({"instruction": CONTINUE, "input": line[:cut], "output": line[cut:]})
    return records


def make() -> dict[str, str]:
    """file name -> content, for every bundled fine-tuning file."""
    poems = read_poems(ASSETS / "tang300.txt")
    for p in poems:
        p["form"] = form_of(p["lines"])
    parts = split(poems)
    rng = np.random.default_rng(SEED + 1)
    files = {}
    for name, idx in parts.items():
        chosen = [poems[i] for i in idx]
        files[f"tang-forms-{name}.csv"] = forms_csv(chosen)
        files[f"tang-instruct-{name}.json"] = json.dumps(instruct_records(chosen, rng), ensure_ascii=False, indent=1) + "\n"
    return files


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="compare with the shipped files instead of writing them")
    args = ap.parse_args(argv)
    files = make()
    if args.check:
        stale = [n for n, text in files.items() if not (ASSETS / n).is_file() or (ASSETS / n).read_text(encoding="utf-8") != text]
        print("up to date" if not stale else f"differ from this script's output: {', '.join(stale)}")
        return 1 if stale else 0
    for name, text in files.items():
        (ASSETS / name).write_text(text, encoding="utf-8")
        print(f"wrote {ASSETS / name} ({len(text.encode()):,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
