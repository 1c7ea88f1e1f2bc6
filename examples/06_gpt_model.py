"""Step 6 - The whole GPT model.

What it teaches: a GPT is token embedding + position embedding, a stack of Transformer blocks, a final
LayerNorm and an output head that turns each position's vector into one score (logit) per vocabulary
entry. We count the parameters of the lecture's 124M configuration, with and without weight tying
(the head reusing the token-embedding table), work out the memory they need, and run a batch of two
prompts through the model to see the logits' shape.

Run:   python examples/06_gpt_model.py      (a few seconds: it builds the 124M model once, ~500 MB of RAM)
Fast:  NPGPT_EXAMPLES_FAST=1 python examples/06_gpt_model.py   (counts the 124M parameters, runs a tiny model)
Notebook: the `# %%` lines mark cells; VS Code, PyCharm and Jupyter (with jupytext) open this file as a notebook.

Glossary: B=batch, T=time, C=channels (emb_dim), V=vocab, L=n_layers.
"""

# %%
import os

import numpy as np

from npgpt import GPT, GPTConfig
from npgpt.model import param_shapes
from npgpt.tokenizer import encode

FAST = os.environ.get("NPGPT_EXAMPLES_FAST") == "1"

GPT_CONFIG_124M = {
    "vocab_size": 50257,  # GPT-2's BPE vocabulary
    "context_length": 1024,  # longest input the position table covers
    "emb_dim": 768,  # C
    "n_heads": 12,  # NH
    "n_layers": 12,  # L
    "drop_rate": 0.1,
    "qkv_bias": False,
}
cfg = GPTConfig(**GPT_CONFIG_124M)  # npgpt ties the head to the token embedding unless tie_weights=False


def count(shapes, prefix=""):
    """Parameters in every tensor whose name starts with prefix."""
    return sum(int(np.prod(s)) for name, s in shapes.items() if name.startswith(prefix))


# %% [markdown]
# ## 1. Count the parameters
# From their shapes alone: nothing is allocated. `param_shapes` lists every tensor (Hugging Face GPT-2
# names) that `GPT(config)` would create.

# %%
untied = param_shapes(cfg.replace(tie_weights=False))  # separate output head "lm_head.weight" (V, C)
tied = param_shapes(cfg)  # logits = x @ wte.T: no extra tensor
print("Parameters of the 124M configuration, by part:")
parts = [("token embedding wte", "wte."), ("position embedding wpe", "wpe."),
         (f"{cfg.n_layers} Transformer blocks", "h."), ("final LayerNorm ln_f", "ln_f."),
         ("output head lm_head (untied only)", "lm_head.")]  # fmt: skip
for label, prefix in parts:
    print(f"  {label:36s} {count(untied, prefix):>13,}")
print(f"  {'one block':36s} {count(untied, 'h.0.'):>13,}")

n_untied, n_tied = count(untied), count(tied)
print(f"\nTotal number of parameters (untied output head): {n_untied:,}")
print(f"Number of parameters with weight tying:          {n_tied:,}")
print(f"  difference = the output head = V * C = {cfg.vocab_size} * {cfg.emb_dim} = {n_untied - n_tied:,}")

# %% [markdown]
# ## 2. Memory
# float32 takes 4 bytes per parameter (gradients and AdamW's two moments need 3x more).

# %%
for label, n in (("untied", n_untied), ("tied", n_tied)):
    print(f"Memory of the {label} parameters in float32: {n * 4 / 1024**2:,.2f} MB")

# %% [markdown]
# ## 3. A batch through the model
# Two prompts, tokenised with GPT-2's BPE. Both happen to be four tokens long.

# %%
prompts = ["Every effort moves you", "Every day holds a"]
batch = np.array([encode(p) for p in prompts])  # (B, T) = (2, 4)
print("\nTokenised batch:")
print(batch)

# %%
if FAST:
    # Tests: a tiny model with the same vocabulary gives logits of the same shape in a blink.
    model = GPT(GPTConfig(**{**GPT_CONFIG_124M, "emb_dim": 32, "n_heads": 4, "n_layers": 2, "context_length": 32}))
    print(f"(fast mode: a tiny model with {model.num_params():,} parameters stands in for the 124M one)")
else:
    model = GPT(cfg, seed=123)  # allocates and initialises ~124M float32 numbers
    assert model.num_params() == n_tied, "the built model should match the count from the shapes"
    print(f"Built GPT(cfg): {model.num_params():,} parameters, {model.nbytes() / 1024**2:,.2f} MB")

logits, _, _ = model.forward(batch)  # (B, T) -> (B, T, V); no targets, so no loss
print("\nOutput shape:", logits.shape, " (batch, tokens, vocabulary)")
print("one score per vocabulary entry at every position; the first prompt's last position starts with:")
print(logits[0, -1, :6])
