"""Step 5 - The Transformer block.

What it teaches: a GPT-2 block chains what the previous steps built, each half on a shortcut:
    x1  = x  + dropout(c_proj(attention(c_attn(ln_1(x)))))
    out = x1 + dropout(mlp(ln_2(x1)))
Its output has the input's shape, so twelve of them can be stacked. We push a (2, 4, 768) batch
through a block of the lecture's 124M config, count the block's parameters, and then check the whole
block's backward (`block_backward`, every parameter included) against finite differences in float64.

Run:   python examples/05_transformer_block.py      (a second; NPGPT_EXAMPLES_FAST=1 changes nothing here)
Notebook: the `# %%` lines mark cells; VS Code, PyCharm and Jupyter (with jupytext) open this file as a notebook.

Glossary: B=batch, T=time, C=channels (emb_dim), NH=heads.
"""

# %%
import numpy as np

import npgpt
from npgpt import GPTConfig
from npgpt.layers import block_backward, block_forward
from npgpt.model import param_shapes


def block_shapes(emb_dim, n_heads, qkv_bias):
    """A block's parameter names and shapes, read from npgpt's own model definition (layer h.0)."""
    cfg = GPTConfig(vocab_size=1, context_length=1, emb_dim=emb_dim, n_heads=n_heads, n_layers=1, qkv_bias=qkv_bias)
    return {k.removeprefix("h.0."): s for k, s in param_shapes(cfg).items() if k.startswith("h.0.")}


def random_block_params(shapes, rng, dtype):
    """LayerNorm scales near 1, everything else small random numbers."""
    params = {}
    for name, shape in shapes.items():
        if name in ("ln_1.weight", "ln_2.weight"):
            params[name] = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name.endswith(".bias"):
            params[name] = 0.1 * rng.standard_normal(shape)
        else:
            params[name] = 0.2 * rng.standard_normal(shape)
        params[name] = params[name].astype(dtype)
    return params


rng = np.random.default_rng(123)

# %% [markdown]
# ## 1. Shapes
# With the lecture's 124M dimensions: C = 768 split over NH = 12 heads.

# %%
B, T, C, NH = 2, 4, 768, 12
shapes = block_shapes(C, NH, qkv_bias=False)
params = random_block_params(shapes, rng, np.float32)
x = rng.random((B, T, C), dtype=np.float32)  # (B, T, C)
out, cache = block_forward(x, params, n_head=NH)  # (B, T, C) -> (B, T, C)
print("input shape: ", x.shape)
print("output shape:", out.shape)
assert out.shape == x.shape

print("\nblock parameters:")
for name, shape in shapes.items():
    print(f"  {name:20s} {str(shape):14s} {int(np.prod(shape)):>10,}")
n_block = sum(int(np.prod(s)) for s in shapes.values())
print(f"  {'total':20s} {'':14s} {n_block:>10,}")

# %% [markdown]
# ## 2. The backward
# It returns `dx` and a dict of gradients keyed like the parameters.

# %%
dx, grads = block_backward(np.ones_like(out), cache)
print("\nblock_backward: dx", dx.shape, "and", len(grads), "parameter gradients, e.g. attn.c_attn.weight",
      grads["attn.c_attn.weight"].shape)  # fmt: skip

# %% [markdown]
# ## 3. Gradient check
# In float64 on a small block (with the q|k|v bias, so every parameter is tested). `gradcheck`
# perturbs coordinates of `x` and of every tensor in the params dict: all of them in a tensor of up to
# 64 entries; in a larger one 64 coordinates that move every index of every axis at least once, plus
# the largest gradient's if they missed it. The `checked` column says how many, `covers` which. Dropout
# is off (training=False), so the forward is deterministic (the checker refuses one that is not).

# %%
B, T, C, NH = 2, 5, 8, 2


def block(x, params):
    return block_forward(x, params, n_head=NH)  # (B, T, C) -> (B, T, C)


small_params = random_block_params(block_shapes(C, NH, qkv_bias=True), rng, np.float64)
x = rng.standard_normal((B, T, C))  # (B, T, C), float64
results = npgpt.gradcheck(block, block_backward, [x, small_params], names=["x", "params"], layer="block")
print(f"\nGradient check of block_backward (B={B}, T={T}, C={C}, NH={NH}, float64):")
print(npgpt.format_results(results))
assert all(r.passed for r in results), "block_backward disagrees with finite differences"
print(f"block gradcheck: all {len(results)} tensors passed")
