"""Step 14 - Fine-tuning for classification: a new head on the last token, and the LM loss mixed in.

What it teaches: a pretrained GPT becomes a classifier with one new matrix. The final hidden state of
the last real token (under causal attention the only position that has read the whole text) goes
through W (k labels x C channels): P(y | x) = softmax(h_L W^T), trained with the cross-entropy L_FT.
GPT-1 adds the language-model loss on the same text, L = L_FT + lambda * L_PT, so the trunk keeps
predicting text while it learns labels; its gradient then reaches the trunk from both heads.
Batches are padded on the right with <|endoftext|>: which position counts is shown below. The data
is bundled: 唐诗三百首 labelled by the shape of each poem (5- or 7-character quatrain or regulated
verse, or other), split 70/15/15 by a fixed seed (scripts/make_finetune_data.py).

Run:   python examples/14_classification_finetuning.py      (a few minutes on a laptop CPU)
Fast:  NPGPT_EXAMPLES_FAST=1 python examples/14_classification_finetuning.py   (a tiny run)
Output: examples/out/14_classification_finetuning/ (folder set by NPGPT_EXAMPLES_OUT):
        loss.png, accuracy.png, confusion.png, metrics.jsonl, summary.json, checkpoints/
Then:  npgpt classify --checkpoint examples/out/14_classification_finetuning --text "床前明月光，疑是地上霜。" --probs
Notebook: the `# %%` lines mark cells; VS Code, PyCharm and Jupyter (with jupytext) open this file as a notebook.

Glossary: B=batch, T=time, C=channels, k=labels, V=vocab.
"""

# %%
import os
from pathlib import Path

import numpy as np

import npgpt
from npgpt.finetune import FinetuneConfig, finetune, load_classifier
from npgpt.finetune.config import bundled_file
from npgpt.finetune.tables import PAD_ID, pad_right, read_labelled
from npgpt.layers import classifier_head_backward, classifier_head_forward, last_token_index, mixed_loss_backward, mixed_loss_forward
from npgpt.tokenizer import decode, encode

FAST = os.environ.get("NPGPT_EXAMPLES_FAST") == "1"
HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()  # a notebook has no __file__
OUT = Path(os.environ.get("NPGPT_EXAMPLES_OUT") or HERE / "out")

# %% [markdown]
# ## 1. Which position the head reads
# The rightmost token that is not padding: under causal attention it is the only position that has
# read the whole text.

# %%
texts = ["床前明月光，疑是地上霜。", "春眠不觉晓，", "红豆生南国"]
idx = pad_right([encode(t) for t in texts], PAD_ID)  # (B, T), padded on the right with <|endoftext|>
last = last_token_index(idx, PAD_ID)  # (B,)
for t, row, i in zip(texts, idx, last):
    print(f"{t!r}: {int((row != PAD_ID).sum())} tokens, padded to {len(row)}; the head reads position {int(i)}, "
          f"which has seen {decode(row[: i + 1])!r}")

# %% [markdown]
# ## 2. The two new pieces, checked against finite differences
# float64, a random upstream gradient. The padding positions of the `-100` targets are left out of L_PT.

# %%
rng = np.random.default_rng(0)
x, W = rng.standard_normal((3, idx.shape[1], 8)), rng.standard_normal((5, 8))  # (B, T, C), (k, C)
results = npgpt.gradcheck(lambda x, W: classifier_head_forward(x, idx, W, PAD_ID), classifier_head_backward, [x, W],
                          layer="classifier_head")
labels, targets = np.array([0, 3, 1]), rng.integers(0, 9, size=(3, 4))  # (B,), (B, T) next tokens, V=9
targets[2, 1:] = -100  # padding has no next token: left out of L_PT
results += npgpt.gradcheck(
    lambda cls_logits, lm_logits: mixed_loss_forward(cls_logits, labels, lm_logits, targets, lm_weight=0.5),
    mixed_loss_backward, [rng.standard_normal((3, 5)), rng.standard_normal((3, 4, 9))], layer="mixed_loss")  # fmt: skip
print("\n" + npgpt.format_results(results))

# %% [markdown]
# ## 3. Fine-tune
# No pretrained checkpoint ships with npgpt, so this trains a new small model from scratch (pass
# `init_from="runs/..."` to start from one of yours; then `trainable="last-block"` is the default, as in
# the book's chapter 6). All parameters train here; lambda = 0.5 as in GPT-1.

# %%
config = FinetuneConfig(
    task="classify",
    data="tang-forms",  # the bundled set: train, val and test files
    emb_dim=32 if FAST else 64,
    n_heads=2 if FAST else 4,
    n_layers=1 if FAST else 2,
    drop_rate=0.0,
    context_length=32 if FAST else 160,  # the 8 x 7 poems are 138-158 tokens; longer ones are cut
    max_examples=16 if FAST else None,
    epochs=1 if FAST else 8,
    batch_size=8,
    lr=3e-3,
    lm_weight=0.5,
    out_dir=str(OUT / "14_classification_finetuning"),
    overwrite=True,
    keep_last=1,
    progress=not FAST,
)
result = finetune(config)
print(f"\ntest accuracy {result.test_accuracy:.1%} against a majority-class baseline of {result.majority_baseline:.1%}")

# %% [markdown]
# ## 4. Use it on poems of the test set
# The saved directory is a transformers `GPT2ForSequenceClassification` too.

# %%
clf = load_classifier(result.checkpoint)
test = read_labelled(bundled_file("tang-forms-test.csv"))[:4]
probs = clf.predict_proba(pad_right([encode(r.text)[: clf.model.config.context_length] for r in test], PAD_ID))
for r, row in zip(test, probs):
    print(f"{r.text.splitlines()[0][:16]:<16}  true: {r.label:<17} predicted: {clf.labels[int(row.argmax())]} ({row.max():.0%})")
