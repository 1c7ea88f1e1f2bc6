"""Step 9 - The cross-entropy loss, step by step.

What it teaches: training needs one number saying how wrong the model is. For every position we
look up the probability the model gave to the *correct* next token; a perfect model gives it 1, and
log 1 = 0. The loss is the negative mean of the log of those probabilities:
    logits -> probabilities -> target probabilities -> log -> mean -> negative
We compute each stage by hand for two short sequences, check the result against npgpt's
`softmax_cross_entropy_forward`, look at perplexity, and at the gradient the backward sends to the logits.

Run:   python examples/09_cross_entropy.py      (a second; NPGPT_EXAMPLES_FAST=1 changes nothing here)
Notebook: the `# %%` lines mark cells; VS Code, PyCharm and Jupyter (with jupytext) open this file as a notebook.

Glossary: B=batch, T=time, V=vocab, N=B*T positions.
"""

# %%
import numpy as np

from npgpt import GPT, GPTConfig
from npgpt.layers import softmax_cross_entropy_backward, softmax_cross_entropy_forward
from npgpt.tokenizer import decode, encode

np.set_printoptions(precision=4, suppress=False)

# %% [markdown]
# ## 1. Logits
# Inputs and targets: the same token ids, shifted by one (step 8).

# %%
texts = ["every effort moves you", "I really like chocolate"]
ids = np.array([encode(t) for t in texts])  # (B, T+1) = (2, 4)
inputs, targets = ids[:, :-1], ids[:, 1:]  # (B, T) each
for b in range(len(texts)):
    print(f"inputs {decode(inputs[b])!r:24} targets {decode(targets[b])!r}")

model = GPT(GPTConfig.from_preset("nano"), seed=123)  # untrained, so the loss will be high
logits, _, _ = model.forward(inputs)  # (B, T) -> (B, T, V)
B, T, V = logits.shape
print(f"\n1. logits: {logits.shape}  (one score per vocabulary entry, at every position)")

# %% [markdown]
# ## 2. Probabilities
# Softmax turns each position's scores into probabilities (subtract the max first: `exp` never
# overflows).

# %%
z = logits - logits.max(axis=-1, keepdims=True)  # (B, T, V)
probas = np.exp(z) / np.exp(z).sum(axis=-1, keepdims=True)  # (B, T, V), rows sum to 1
print(f"2. probabilities: {probas.shape}, each row sums to {probas[0, 0].sum():.4f}")
predicted = probas.argmax(axis=-1)  # (B, T)
print(f"   the model's top guesses: {[decode(p) for p in predicted]} (untrained: nonsense)")

# %% [markdown]
# ## 3. Target probabilities
# The probability of the correct next token at every position.

# %%
target_probas = np.take_along_axis(probas, targets[..., None], axis=-1)[..., 0]  # (B, T, V) -> (B, T)
print(f"3. target probabilities {target_probas.shape} (uniform guessing would give 1/{V} = {1 / V:.2e}):")
print(target_probas)

# %% [markdown]
# ## 4.-6. Log, mean, negative

# %%
log_probas = np.log(target_probas)  # (B, T)
print(f"4. their logs {log_probas.shape}:")
print(log_probas)
avg_log_proba = log_probas.mean()  # mean over all N = B*T positions
print(f"5. mean: {avg_log_proba:.4f}")
loss_by_hand = -avg_log_proba
print(f"6. negative: {loss_by_hand:.4f}   <- the cross-entropy loss")

# %% [markdown]
# ## The library's loss
# npgpt computes the same number from the logits (through log-softmax, which is more stable than
# taking the log of a tiny probability).

# %%
loss, cache = softmax_cross_entropy_forward(logits, targets)  # (B, T, V), (B, T) -> 0-d
match = bool(np.isclose(loss_by_hand, float(loss), rtol=1e-5))
print(f"\ncross-entropy by hand: {loss_by_hand:.6f}")
print(f"softmax_cross_entropy_forward: {float(loss):.6f}")
print(f"match: {match}")
assert match

# %% [markdown]
# Perplexity = exp(loss): roughly "how many tokens the model hesitates between". Untrained, that is
# of the order of the whole vocabulary; a good model brings it down to a handful.

# %%
print(f"perplexity exp(loss) = {np.exp(float(loss)):,.0f} (vocabulary size {V:,})")

# %% [markdown]
# ## The gradient
# The gradient of the loss with respect to the logits is remarkably simple:
#
#     dlogits = (probabilities - onehot(target)) / N
#
# (docs/backprop.md, section Cross-entropy, derives it).

# %%
onehot = np.zeros_like(probas)
np.put_along_axis(onehot, targets[..., None], 1.0, axis=-1)
dlogits_by_hand = (probas - onehot) / (B * T)  # (B, T, V)
dlogits = softmax_cross_entropy_backward(1.0, cache)  # (B, T, V)
diff = np.abs(dlogits - dlogits_by_hand).max()
print(f"\nsoftmax_cross_entropy_backward vs (probas - onehot) / N: max difference {diff:.1e}")
assert diff < 1e-6
