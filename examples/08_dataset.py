"""Step 8 - From a text file to training examples.

What it teaches: training data for a GPT is just text. We tokenise Edith Wharton's short story
"The Verdict" (bundled with npgpt) with GPT-2's BPE, then cut the token ids into sliding windows:
the inputs are T consecutive tokens and the targets are the same window shifted by one, so every
position is asked to predict the token that follows it. Finally we split the tokens into a training
and a validation part, as the training loop in step 10 does.

Run:   python examples/08_dataset.py      (a second; NPGPT_EXAMPLES_FAST=1 changes nothing here)
Notebook: the `# %%` lines mark cells; VS Code, PyCharm and Jupyter (with jupytext) open this file as a notebook.

Glossary: B=batch (windows per batch), T=context length (tokens per window).
"""

# %%
import numpy as np

from npgpt.data import TokenWindows, bundled_path, read_text, split_ids
from npgpt.tokenizer import decode, encode

# %% [markdown]
# ## 1. Read and tokenise

# %%
path = bundled_path("the-verdict")
text = read_text(path)
ids = np.array(encode(text))  # (n_tokens,)
print(f"{path.name}: {len(text):,} characters -> {len(ids):,} tokens")
print(f"first 60 characters: {text[:60]!r}")
print("first 10 tokens:", [(int(i), decode([i])) for i in ids[:10]])

# %% [markdown]
# ## 2. Sliding windows
# With a tiny context (T=4) and stride 1: window i starts at token i.

# %%
windows = TokenWindows(ids, context_length=4, stride=1)
x, y = windows.batch([0])  # (1, T), (1, T)
print(f"\nT=4, stride=1: {len(windows):,} windows")
print("inputs  x:", x[0].tolist())
print("targets y:", y[0].tolist(), " (x shifted left by one)")

# %% [markdown]
# One window holds T training examples: each prefix of `x` must predict the next token.

# %%
print("\nthe 4 predictions inside window 0:")
for t in range(4):
    context, target = x[0, : t + 1], y[0, t]
    print(f"  {decode(context)!r:>30} ---> {decode([target])!r}")

# %% [markdown]
# ## 3. A batch
# Several windows stacked. With stride = T the windows do not overlap.

# %%
windows = TokenWindows(ids, context_length=4, stride=4)
x, y = windows.batch([0, 1, 2])  # (B, T) = (3, 4)
print("\nT=4, stride=4, a batch of B=3 windows:")
print("inputs:")
print(x)
print("targets:")
print(y)
assert np.array_equal(x[:, 1:], y[:, :-1]) and x[1, 0] == y[0, -1]

# %% [markdown]
# ## 4. Train / validation split
# The first 90% of the tokens train, the last 10% only measure. The lecture's setting for the 124M
# model: T=256, stride=256, batch size 2.

# %%
train_ids, val_ids = split_ids(ids, train_ratio=0.9)
T, B = 256, 2
train = TokenWindows(train_ids, context_length=T, stride=T, name="train")
val = TokenWindows(val_ids, context_length=T, stride=T, name="val")
print(f"\nsplit 90/10: {len(train_ids):,} training tokens, {len(val_ids):,} validation tokens")
print(f"with T={T}: {len(train)} training windows ({len(train) // B} batches of {B}), {len(val)} validation window(s)")
print(f"tokens the model trains on per epoch: {len(train) * T:,}")
x, y = train.batch([0, 1])
print(f"one training batch: inputs {x.shape}, targets {y.shape}, dtype {x.dtype}")
