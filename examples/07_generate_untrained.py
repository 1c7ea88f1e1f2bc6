"""Step 7 - Generating text, one token at a time (with an untrained model).

What it teaches: a GPT only ever predicts the *next* token. To write text we run it on the prompt,
turn the logits at the last position into probabilities (softmax), pick a token, append it, and run
again. Printing the most likely candidates at every step shows what an untrained model knows: nothing
yet. Its probabilities are spread almost evenly over all 50,257 tokens, so the text is gibberish.

Run:   python examples/07_generate_untrained.py      (under 10 s: the lecture's 124M model, 6 new tokens)
Fast:  NPGPT_EXAMPLES_FAST=1 python examples/07_generate_untrained.py   (a tiny model, 3 new tokens)
Notebook: the `# %%` lines mark cells; VS Code, PyCharm and Jupyter (with jupytext) open this file as a notebook.

Glossary: B=batch, T=time (tokens so far), V=vocab.
"""

# %%
import os

import numpy as np

from npgpt import GPT, GPTConfig
from npgpt.sampling import next_token_probs, sample_next
from npgpt.tokenizer import decode, encode

FAST = os.environ.get("NPGPT_EXAMPLES_FAST") == "1"

GPT_CONFIG_124M = {"vocab_size": 50257, "context_length": 1024, "emb_dim": 768, "n_heads": 12,
                   "n_layers": 12, "drop_rate": 0.1, "qkv_bias": False}  # fmt: skip
if FAST:
    GPT_CONFIG_124M.update(emb_dim=32, n_heads=4, n_layers=2, context_length=32)  # same vocabulary, tiny body
MAX_NEW_TOKENS = 3 if FAST else 6
TOP = 5  # candidates printed per step

model = GPT(GPTConfig(**GPT_CONFIG_124M), seed=123)  # random weights: nothing has been learned
context_length = model.config.context_length

# %% [markdown]
# ## The loop: predict, pick, append

# %%
prompt = "Every effort moves you"
idx = np.array([encode(prompt)])  # (B, T) = (1, 4)
print(f"prompt: {prompt!r} -> ids {idx[0].tolist()}\n")

rng = np.random.default_rng(0)  # unused by greedy decoding, but sample_next wants one
for step in range(MAX_NEW_TOKENS):
    idx_cond = idx[:, -context_length:]  # the model sees at most context_length tokens
    logits, _, _ = model.forward(idx_cond)  # (B, T) -> (B, T, V), dropout off (training=False)
    last = logits[:, -1, :]  # (B, V): only the last position predicts the next token
    probs = next_token_probs(last, temperature=1.0)  # (B, V): plain softmax, each row sums to 1

    top = np.argsort(-probs[0])[:TOP]  # the most likely ids, best first
    candidates = ", ".join(f"{decode([t])!r} {probs[0, t]:.6f}" for t in top)
    print(f"step {step}: top-{TOP} next tokens: {candidates}")

    next_id = sample_next(last, rng, temperature=0.0)  # (B,): temperature 0 = greedy = argmax
    idx = np.concatenate([idx, next_id[:, None]], axis=1)  # (B, T) -> (B, T + 1)
    print(f"        picked {decode(next_id)!r} (id {int(next_id[0])}); text so far: {decode(idx[0])!r}")

# %% [markdown]
# ## What an untrained model knows

# %%
V = model.config.vocab_size
best = probs[0, top[0]]
print(f"\nA uniform guess gives every token 1/{V} = {1 / V:.6f}; the untrained model's favourite gets {best:.6f}.")
print("The distribution is nearly flat, so whichever token wins is an accident of the random weights.")

# %% [markdown]
# ## The same with `model.generate`
# The library's `generate()` does the same loop (with a KV cache, so each step costs one position);
# greedy decoding is deterministic, so it must pick the very same tokens.

# %%
same = model.generate(np.array([encode(prompt)]), MAX_NEW_TOKENS, temperature=0.0)  # (B, T + new)
assert np.array_equal(same, idx)
print("model.generate(..., temperature=0) gives the same tokens: True")
print(f"\noutput text: {decode(idx[0])!r}")
