"""Step 13 - The other half of the paper: an encoder-decoder Transformer that translates English to Malay.

What it teaches: the original Transformer is built from the same hand-written layers as GPT, plus
three new ideas: an encoder that reads the whole source at once (self-attention with no causal mask,
but a padding mask), a decoder whose second attention looks at the encoder's output
(cross-attention), and decoding that feeds the model's own outputs back in, from <bos> to <eos>.
This script walks through one training run step by step:
    1. data      pairs from the bundled CLDR corpus, a seeded split, a small vocabulary, one padded batch
    2. model     the shapes through the encoder and the decoder, and what the padding mask blocks
    3. training  forward, loss, backward, clip, AdamW, with a warmup + cosine learning rate
    4. decoding  greedy and beam search (encoder once, KV cache), exact match and BLEU on held-out pairs
`npgpt seq2seq train` runs the same loop with more steps (about 97% exact match on held-out pairs;
see docs/translation.md); this script stops earlier.

Run:   python examples/13_translation_transformer.py      (two to three minutes on a laptop CPU)
Fast:  NPGPT_EXAMPLES_FAST=1 python examples/13_translation_transformer.py   (a tiny model, a few steps)
Output: examples/out/13_translation_transformer.png (folder set by NPGPT_EXAMPLES_OUT)
Notebook: the `# %%` lines mark cells; VS Code, PyCharm and Jupyter (with jupytext) open this file as a notebook.

Glossary: B=batch, S=source positions, T=target positions, C=channels (d_model), V=vocab.
"""

# %%
import os
import time
from pathlib import Path

import matplotlib.pyplot as plt  # no window opens: the plot is saved as a PNG (and shown inline in a notebook)
import numpy as np

from npgpt import AdamW, LRSchedule, clip_grad_norm
from npgpt.model import make_rng
from npgpt.seq2seq import Seq2Seq, Seq2SeqConfig
from npgpt.seq2seq.data import PairBatches, bundled_pairs_path, collate, encode_pairs, read_pairs, split_pairs
from npgpt.seq2seq.decode import beam_search
from npgpt.seq2seq.evaluate import score, translate, translate_ids
from npgpt.seq2seq.vocab import Vocab

FAST = os.environ.get("NPGPT_EXAMPLES_FAST") == "1"
HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()  # a notebook has no __file__
OUT = Path(os.environ.get("NPGPT_EXAMPLES_OUT") or HERE / "out")
OUT.mkdir(parents=True, exist_ok=True)

# %% [markdown]
# ## Settings
# The fast mode (used by the tests) trains a tiny model on every 20th pair for a few steps.

# %%
if FAST:
    MODEL = dict(d_model=32, n_heads=2, n_encoder_layers=1, n_decoder_layers=1, d_ff=64, dropout=0.1)
    STEPS, BATCH, EVAL_EVERY, EVERY_NTH_PAIR, N_SCORED = 12, 16, 6, 20, 50
else:
    MODEL = dict(d_model=128, n_heads=4, n_encoder_layers=2, n_decoder_layers=2, d_ff=256, dropout=0.1)
    STEPS, BATCH, EVAL_EVERY, EVERY_NTH_PAIR, N_SCORED = 800, 64, 100, 1, 500

# %% [markdown]
# ## 1. Data
# English<TAB>Malay pairs from the bundled CLDR corpus, a seeded split, a vocabulary restricted to the
# GPT-2 tokens the pairs use, and one padded batch to look at.

# %%
pairs = read_pairs(bundled_pairs_path())[::EVERY_NTH_PAIR]  # 41,272 English<TAB>Malay lines from Unicode CLDR
train_pairs, held_pairs = split_pairs(pairs, held_out=0.1, seed=0)  # a seeded permutation; the model never sees held_pairs
vocab = Vocab.from_texts([t for p in pairs for t in p])  # GPT-2 BPE, only the tokens these pairs use
print(f"{len(pairs):,} pairs -> {len(train_pairs):,} for training, {len(held_pairs):,} held out; "
      f"vocabulary: {len(vocab):,} of GPT-2's 50,257 tokens (ids 0, 1, 2 are <pad>, <bos>, <eos>)")  # fmt: skip
src, tgt = train_pairs[0]
print(f"a pair: {src!r} -> {tgt!r}")
print(f"  source ids {vocab.encode(src)}, target ids {vocab.encode(tgt)}")

MAX_LEN = 48
train_src, train_tgt = encode_pairs(train_pairs, vocab, MAX_LEN)
held_src, held_tgt = encode_pairs(held_pairs, vocab, MAX_LEN)
lengths = [len(x) for x in train_src[:100]]
rows = [0, int(np.argmin(lengths)), max((n, i) for i, n in enumerate(lengths) if n <= 9)[1]]  # three lengths
s, tgt_in, targets = collate([train_src[i] for i in rows], [train_tgt[i] for i in rows])  # right-padded with <pad> = 0
print(f"a batch of 3 ({', '.join(repr(train_pairs[i][0]) for i in rows)}): src {s.shape}, tgt_in {tgt_in.shape} (<bos> + target), targets {targets.shape} (target + <eos>)")
print(f"  src =\n{s}\n  tgt_in =\n{tgt_in}\n  targets =\n{targets}")

# %% [markdown]
# ## 2. The model
# The shapes through the encoder (once per source) and the decoder, and what the padding mask blocks.
#
# Why the untrained loss is above ln V: the output layer is tied to the embedding table, so a logit is
# `y . E[v]`, a LayerNorm output `y` (C entries of variance about 1) times a table row `E[v]` (C entries
# of variance 1/C): about N(0, 1). The loss is `logsumexp(z) - z[target]`, and for V independent logits
# of variance s^2, `sum_v exp(z_v)` is about `V * E[exp(z)] = V * exp(s^2 / 2)`, while `z[target]`
# averages 0. So the expected start is about `ln V + s^2 / 2`, half a nat above a uniform guess.

# %%
config = Seq2SeqConfig(src_vocab_size=len(vocab), tgt_vocab_size=len(vocab), max_len=MAX_LEN, **MODEL)
model = Seq2Seq(config, seed=0)
print(f"\nmodel: {model.num_params():,} parameters; {config.n_encoder_layers} encoder and {config.n_decoder_layers} "
      f"decoder layers, C={config.d_model}, {config.norm}-norm ('Add & Norm'), {config.pos_encoding} positions, "
      f"one embedding table shared by source, target and output")  # fmt: skip
memory, src_mask, _ = model.encode(s)  # the encoder, once per source
print(f"encoder: src {s.shape} -> memory {memory.shape}; padding mask (True = ignored as a key):\n{src_mask}")
logits, loss, _ = model.forward(s, tgt_in, targets)
spread = float(logits[targets != config.pad_id].std())  # over the positions that have a target
print(f"decoder: tgt_in {tgt_in.shape} + memory -> logits {logits.shape}; untrained loss {float(loss):.3f}")
print(f"  a uniform guess over V = {len(vocab):,} tokens would score ln V = {np.log(len(vocab)):.3f}, but the tied "
      f"output layer's logits start with std s = {spread:.2f}, and random logits of spread s cost about "
      f"ln V + s^2/2 = {np.log(len(vocab)) + spread**2 / 2:.3f}")  # fmt: skip

# %% [markdown]
# ## 3. Training
# Forward, loss, backward (cross-attention's gradient with respect to the encoder output is summed over
# every decoder layer), clip, AdamW, with a warmup + cosine learning rate.

# %%
batches = PairBatches(train_src, train_tgt, BATCH, seed=0)  # pairs of similar length share a batch
schedule = LRSchedule(max_lr=2e-3, total_steps=STEPS, warmup_steps=min(200, STEPS // 5))
optimizer = AdamW(model.params, lr=2e-3, betas=(0.9, 0.98), weight_decay=0.01)
scored = list(range(min(N_SCORED, len(held_pairs))))
history = []  # (step, train loss, held-out loss, exact match)
t0 = time.perf_counter()
for step in range(1, STEPS + 1):
    s, tgt_in, targets = batches.next()  # (B, S), (B, T), (B, T)
    rng = make_rng(step, model.xp)  # dropout masks
    _, loss, cache = model.forward(s, tgt_in, targets, training=True, rng=rng)  # forward with dropout
    grads = model.backward(cache)  # every layer's backward, last first; cross-attention's dmemory summed
    clip_grad_norm(grads, 1.0)
    optimizer.step(grads, lr=schedule(step - 1))
    if step % EVAL_EVERY == 0 or step == STEPS:
        s, tgt_in, targets = collate([held_src[i] for i in scored], [held_tgt[i] for i in scored])
        held_loss = float(model.forward(s, tgt_in, targets)[1])  # teacher forcing, dropout off
        hyps = [vocab.decode(o) for o in translate_ids(model, [held_src[i] for i in scored])]
        exact = score(hyps, [held_pairs[i][1] for i in scored]).exact_match
        history.append((step, float(loss), held_loss, exact))
        print(f"step {step:4d}  train loss {float(loss):.3f}  held-out loss {held_loss:.3f}  exact match {exact:6.1%}  "
              f"| {held_pairs[0][0]!r} -> {hyps[0]!r}")  # fmt: skip
print(f"{STEPS} steps in {time.perf_counter() - t0:.0f} s")
print(f"train loss {history[0][1]:.3f} -> {history[-1][1]:.3f}, held-out loss {history[0][2]:.3f} -> {history[-1][2]:.3f}")

# %% [markdown]
# ## 4. Decoding
# Greedy and beam search (the encoder runs once, the decoder keeps a KV cache), then exact match and
# BLEU on held-out pairs. In the fast mode (12 steps of a tiny model) both are about 0: expected, the
# model has not learned to translate yet.

# %%
examples = [held_pairs[i][0] for i in range(3)]
for text, greedy, beam in zip(examples, translate(model, vocab, examples), translate(model, vocab, examples, beam=4)):
    print(f"  {text!r}\n     greedy: {greedy!r}\n     beam 4: {beam!r}")
s = collate([held_src[0]], [held_tgt[0]])[0]
ids, scores = beam_search(model, s, beam=4, return_scores=True)
print(f"beam search of {held_pairs[0][0]!r}: {vocab.decode(ids[0])!r}, score {scores[0]:.3f} "
      "(sum of log-probabilities / GNMT length penalty)")  # fmt: skip
hyps = [vocab.decode(o) for o in translate_ids(model, [held_src[i] for i in scored])]
result = score(hyps, [held_pairs[i][1] for i in scored])
print(f"held-out ({result.n} pairs, greedy): exact match {result.exact_match:.1%}, BLEU {result.bleu:.1f}")
if FAST:
    print(f"(fast mode: {STEPS} steps of a {config.n_encoder_layers}+{config.n_decoder_layers}-layer model with "
          f"C={config.d_model} on every {EVERY_NTH_PAIR}th pair cannot translate yet, so an exact match near 0% and "
          "a BLEU near 0 are expected; the full run trains 800 steps)")  # fmt: skip

# %% [markdown]
# ## The curves
# Training and held-out loss, and the held-out exact match, against the step.

# %%
steps, train_l, held_l, exact_l = zip(*history)
fig, ax = plt.subplots(figsize=(6.5, 4))
ax.plot(steps, train_l, "-o", markersize=3, label="training loss (batch)")
ax.plot(steps, held_l, "--s", markersize=3, label="held-out loss")
ax.set_xlabel("step")
ax.set_ylabel("cross-entropy loss")
ax2 = ax.twinx()
ax2.plot(steps, [100 * e for e in exact_l], "-^", color="tab:green", markersize=3, label="exact match")
ax2.set_ylabel("held-out exact match (%)")
ax2.set_ylim(0, 100)
ax.set_title("English -> Malay, encoder-decoder Transformer")
lines = ax.get_legend_handles_labels()
lines2 = ax2.get_legend_handles_labels()
ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="center right")
fig.tight_layout()
path = OUT / "13_translation_transformer.png"
fig.savefig(path, dpi=100)
print(f"saved plot: {path}")
