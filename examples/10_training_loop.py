"""Step 10 - The training loop, written out.

What it teaches: pretraining is one short loop repeated many times:
    forward  -> logits for a batch of windows               (dropout on)
    loss     -> cross-entropy against the shifted targets   (step 9)
    backward -> a gradient for every parameter              (every layer's hand-written backward)
    clip     -> scale all gradients down if their global norm exceeds 1
    step     -> AdamW moves every parameter a little
Every few steps we measure the loss on the training text and on held-out validation text (dropout
off), and after every epoch we let the model continue a prompt. The train and val curves go into a
PNG: train keeps falling; val stops improving once the small model starts memorising the story.

Run:   python examples/10_training_loop.py      (about a minute on a laptop CPU)
Fast:  NPGPT_EXAMPLES_FAST=1 python examples/10_training_loop.py   (a tiny model, a few steps)
Output: examples/out/10_training_loop.png (folder set by NPGPT_EXAMPLES_OUT)
Notebook: the `# %%` lines mark cells; VS Code, PyCharm and Jupyter (with jupytext) open this file as a notebook.

Glossary: B=batch, T=time (context length), V=vocab.
"""

# %%
import os
import time
from pathlib import Path

import matplotlib.pyplot as plt  # no window opens: the plot is saved as a PNG (and shown inline in a notebook)
import numpy as np

from npgpt import GPT, AdamW, GPTConfig, clip_grad_norm
from npgpt.data import TokenWindows, bundled_path, read_text, split_ids
from npgpt.layers import softmax_cross_entropy_backward, softmax_cross_entropy_forward
from npgpt.tokenizer import decode, encode

FAST = os.environ.get("NPGPT_EXAMPLES_FAST") == "1"
HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()  # a notebook has no __file__
OUT = Path(os.environ.get("NPGPT_EXAMPLES_OUT") or HERE / "out")
OUT.mkdir(parents=True, exist_ok=True)

# %% [markdown]
# ## Settings
# A small GPT: GPT-2's vocabulary and architecture, far fewer and narrower layers. Like the lecture's
# GPTModel it has its own output head (tie_weights=False), which also learns faster at this size.

# %%
if FAST:
    MODEL = dict(context_length=16, emb_dim=16, n_heads=2, n_layers=1, drop_rate=0.1, qkv_bias=False, tie_weights=False)
    BATCH_SIZE, EPOCHS, EVAL_EVERY, MAX_STEPS = 2, 1, 2, 4
else:
    MODEL = dict(context_length=64, emb_dim=64, n_heads=4, n_layers=2, drop_rate=0.1, qkv_bias=False, tie_weights=False)
    BATCH_SIZE, EPOCHS, EVAL_EVERY, MAX_STEPS = 4, 12, 18, None
LR, WEIGHT_DECAY, GRAD_CLIP = 2e-3, 0.1, 1.0
BETAS = (0.9, 0.95)  # beta2 = 0.95 as in most LLM recipes; PyTorch's default 0.999 learns much slower here
EVAL_BATCHES = 2  # batches per loss estimate (the validation text fits in about two)
PROMPT = "Every effort moves you"

# %% [markdown]
# ## Data (step 8)

# %%
ids = np.array(encode(read_text(bundled_path("the-verdict"))))
train_ids, val_ids = split_ids(ids, train_ratio=0.9)
T = MODEL["context_length"]
train_data = TokenWindows(train_ids, T, stride=T, name="train")  # non-overlapping windows
val_data = TokenWindows(val_ids, T, stride=T, name="val")

# %% [markdown]
# ## Model, optimizer and two helpers

# %%
model = GPT(GPTConfig(**MODEL), seed=123)
optimizer = AdamW(model.params, lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY)  # updates model.params in place
print(f"model: {model.num_params():,} parameters; data: {len(train_data)} training windows and "
      f"{len(val_data)} validation windows of T={T} tokens")  # fmt: skip


def estimate_loss(windows, n_batches):
    """Mean cross-entropy over the first n_batches batches of windows, dropout off."""
    losses = []
    for i, (x, y) in enumerate(windows.ordered_batches(BATCH_SIZE)):
        if i == n_batches:
            break
        _, loss, _ = model.forward(x, y, training=False)  # (B, T) -> loss
        losses.append(float(loss))
    return float(np.mean(losses))


def sample(prompt, n_tokens=25, temperature=0.0, top_k=None, seed=None):
    """Continuation of the prompt (the loop of step 7, inside model.generate); greedy by default."""
    idx = np.array([encode(prompt)])  # (1, T)
    out = model.generate(idx, n_tokens, temperature=temperature, top_k=top_k, seed=seed)  # (1, T + n)
    return decode(out[0]).replace("\n", " ")


# %% [markdown]
# ## The loop
# forward, loss, backward, clip, step; an evaluation every few steps and a sample after every epoch.

# %%
rng = np.random.default_rng(0)  # shuffles the windows each epoch
history = []  # (step, tokens seen, train loss, val loss)
step, tokens_seen = 0, 0
t_start = time.perf_counter()
for epoch in range(EPOCHS):
    order = rng.permutation(len(train_data))
    for i in range(0, len(order) - BATCH_SIZE + 1, BATCH_SIZE):
        x, y = train_data.batch(order[i : i + BATCH_SIZE])  # (B, T) inputs and targets

        # forward: the model's logits, with dropout (training=True)
        logits, _, cache = model.forward(x, training=True)  # (B, T) -> (B, T, V)
        # loss: cross-entropy of the logits against the targets
        loss, loss_cache = softmax_cross_entropy_forward(logits, y)  # -> 0-d
        # backward: the loss's gradient w.r.t. the logits, then through the model, layer by layer
        dlogits = softmax_cross_entropy_backward(1.0, loss_cache)  # (B, T, V)
        grads = model.backward(cache, dloss=None, dlogits=dlogits)  # same keys as model.params
        # clip: keep one unlucky batch from taking a huge step
        grad_norm = clip_grad_norm(grads, GRAD_CLIP)
        # step: AdamW updates every parameter in place
        optimizer.step(grads)

        step += 1
        tokens_seen += x.size
        if step % EVAL_EVERY == 0 or step == 1:
            train_loss = estimate_loss(train_data, EVAL_BATCHES)
            val_loss = estimate_loss(val_data, EVAL_BATCHES)
            history.append((step, tokens_seen, train_loss, val_loss))
            print(f"epoch {epoch + 1} step {step:4d}  tokens {tokens_seen:7,}  batch loss {float(loss):.3f}  "
                  f"grad norm {grad_norm:6.2f}  train {train_loss:.3f}  val {val_loss:.3f}")  # fmt: skip
        if MAX_STEPS is not None and step >= MAX_STEPS:
            break
    print(f"  after epoch {epoch + 1}: {sample(PROMPT)!r}")

# %%
seconds = time.perf_counter() - t_start
print(f"\n{step} steps, {tokens_seen:,} tokens in {seconds:.0f} s ({tokens_seen / seconds:,.0f} tokens/s)")
first, last = history[0], history[-1]
print(f"train loss {first[2]:.3f} -> {last[2]:.3f}, val loss {first[3]:.3f} -> {last[3]:.3f}")
# Greedy decoding of a small model loops on frequent tokens; sampling (temperature, top-k) varies more.
print(f"sampled (temperature 1, top-k 40): {sample(PROMPT, temperature=1.0, top_k=40, seed=1)!r}")

# %% [markdown]
# ## The plot

# %%
steps, tokens, train_losses, val_losses = zip(*history)
fig, ax = plt.subplots(figsize=(6.5, 4))
ax.plot(steps, train_losses, "-o", markersize=3, label="training loss")
ax.plot(steps, val_losses, "--s", markersize=3, label="validation loss")
ax.set_xlabel("step")
ax.set_ylabel("cross-entropy loss")
per_step = BATCH_SIZE * T  # tokens per step
ax.secondary_xaxis("top", functions=(lambda s: s * per_step, lambda n: n / per_step)).set_xlabel("tokens seen")
ax.set_title(f"{model.num_params():,}-parameter GPT on The Verdict")
ax.grid(alpha=0.3)
ax.legend()
fig.tight_layout()
path = OUT / "10_training_loop.png"
fig.savefig(path, dpi=100)
print(f"saved plot: {path}")
