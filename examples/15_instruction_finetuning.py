"""Step 15 - Instruction tuning: a prompt template, and a loss on the response only.

What it teaches: an instruction-following model is the same GPT trained on examples that look like
    <template with the instruction and input> <response> <|endoftext|>
(the Alpaca format of chapter 7 of "Build a Large Language Model (From Scratch)"). The targets are the
next tokens, as in pretraining, but every target inside the prompt and every padding position is set
to -100 (ignore_index): the cross-entropy leaves them out, so the loss is one mean over every response
token of the batch, each example's end token included (a token-weighted mean: an example counts by
its number of response tokens), and those positions send back an exact zero gradient. Batches are
padded to their own longest example. The end token teaches the model to stop. The data is bundled: two instructions on
lines of 唐诗三百首 (continue a line; say whether a half-line is a line's first or second half), split by
poem with a fixed seed (scripts/make_finetune_data.py).

Run:   python examples/15_instruction_finetuning.py      (a few minutes on a laptop CPU)
Fast:  NPGPT_EXAMPLES_FAST=1 python examples/15_instruction_finetuning.py   (a tiny run)
Output: examples/out/15_instruction_finetuning/ (folder set by NPGPT_EXAMPLES_OUT):
        loss.png, metrics.jsonl, summary.json, checkpoints/
Then:  npgpt generate --checkpoint examples/out/15_instruction_finetuning \\
           --instruction "Is this the first or the second half of a line?" --input "处处闻啼鸟。"
Notebook: the `# %%` lines mark cells; VS Code, PyCharm and Jupyter (with jupytext) open this file as a notebook.

Glossary: B=batch, T=time, V=vocab.
"""

# %%
import os
from collections import defaultdict
from pathlib import Path

from npgpt import load_pretrained
from npgpt.finetune import FinetuneConfig, finetune
from npgpt.finetune.config import bundled_file
from npgpt.finetune.instruct import respond, stored_template
from npgpt.finetune.instructions import ALPACA, IGNORE_INDEX, InstructionSet, read_instructions
from npgpt.tokenizer import decode

FAST = os.environ.get("NPGPT_EXAMPLES_FAST") == "1"
HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()  # a notebook has no __file__
OUT = Path(os.environ.get("NPGPT_EXAMPLES_OUT") or HERE / "out")

# %% [markdown]
# ## 1. One example, token by token
# What the model reads, and which targets count.

# %%
train_records = read_instructions(bundled_file("tang-instruct-train.json"))
example = InstructionSet.build(train_records[:1], ALPACA, context_length=256)
x, y = example.example(0)  # inputs (n,), targets (n,) = the next tokens, -100 where masked
print(decode(example.ids[0]).replace("<|endoftext|>", "<|endoftext|>\n"))
masked = int((y == IGNORE_INDEX).sum())
print(f"{len(x)} positions: {masked} targets inside the prompt are -100, {len(x) - masked} count: "
      f"{decode([t for t in y if t != IGNORE_INDEX])!r}\n")

# %% [markdown]
# ## 2. Tune
# A new small model from scratch (`init_from="runs/..."` starts from a pretrained one instead).

# %%
config = FinetuneConfig(
    task="instruct",
    data="tang-instruct",  # the bundled set: train, val and test files
    emb_dim=32 if FAST else 64,
    n_heads=2 if FAST else 4,
    n_layers=1 if FAST else 2,
    drop_rate=0.0,
    max_examples=4 if FAST else None,
    max_new_tokens=4 if FAST else 24,  # longest response when the run scores its test records
    epochs=1 if FAST else 6,
    batch_size=8,
    lr=3e-3,
    samples=2,
    out_dir=str(OUT / "15_instruction_finetuning"),
    overwrite=True,
    keep_last=1,
    progress=not FAST,
)
result = finetune(config)

# %% [markdown]
# ## 3. Score each instruction of the test set separately
# With the template stored in the checkpoint: exact answers, and answers in the right form (a half-line
# ending in a full stop; "first" or "second").

# %%
model = load_pretrained(result.checkpoint)
template = stored_template(result.checkpoint)
test = read_instructions(bundled_file("tang-instruct-test.json"))[: 6 if FAST else None]
exact, form, count = defaultdict(int), defaultdict(int), defaultdict(int)
for r in test:
    got = respond(model, template, r.instruction, r.input, max_new_tokens=8 if FAST else 24).strip()
    count[r.instruction] += 1
    exact[r.instruction] += got == r.output
    form[r.instruction] += got in ("first", "second") if r.instruction.startswith("Is this") else got.endswith("。")
for inst in count:
    print(f"{inst!r}: exact {exact[inst]}/{count[inst]}, in the right form {form[inst]}/{count[inst]}")
which = [r for r in test if r.instruction.startswith("Is this")]
trained = [r.output for r in train_records if r.instruction.startswith("Is this")]
if which:  # the majority-class baseline: always give the training set's most frequent answer
    top = max(sorted(set(trained)), key=trained.count)
    print(f"(always answering {top!r}, the most frequent answer in training, gets "
          f"{sum(r.output == top for r in which)}/{len(which)} of these test questions)")
