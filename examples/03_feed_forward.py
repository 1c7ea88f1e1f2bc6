"""Step 3 - The feed-forward network (GPT-2's "MLP").

What it teaches: inside every Transformer block, each token's vector goes through the same small
network on its own: expand C -> 4C channels, apply GELU, project 4C -> C. The shape going in equals
the shape coming out, which is what lets blocks be stacked. We follow the shapes step by step, then
check that npgpt's `ffn_forward` computes exactly the same thing and count its parameters.

Run:   python examples/03_feed_forward.py      (a second; NPGPT_EXAMPLES_FAST=1 changes nothing here)
Notebook: the `# %%` lines mark cells; VS Code, PyCharm and Jupyter (with jupytext) open this file as a notebook.

Glossary: B=batch, T=time (tokens per sequence), C=channels (emb_dim), H=hidden width (4C).
"""

# %%
import numpy as np

from npgpt.layers import ffn_backward, ffn_forward, gelu_forward, linear_forward

rng = np.random.default_rng(0)
B, T, C = 2, 3, 768  # the lecture's 124M model has emb_dim C = 768
H = 4 * C  # GPT-2 widens by 4

# %% [markdown]
# ## The parameters
# In GPT-2's (C_in, C_out) layout, initialised like GPT-2: weights N(0, 0.02), biases 0.

# %%
w_fc = (0.02 * rng.standard_normal((C, H))).astype(np.float32)  # (C, H)
b_fc = np.zeros(H, dtype=np.float32)  # (H,)
w_proj = (0.02 * rng.standard_normal((H, C))).astype(np.float32)  # (H, C)
b_proj = np.zeros(C, dtype=np.float32)  # (C,)

x = rng.random((B, T, C), dtype=np.float32)  # (B, T, C) = (2, 3, 768)

# %% [markdown]
# ## Step by step
# With the three layers the FFN is made of.

# %%
h, _ = linear_forward(x, w_fc, b_fc)  # (B, T, C) -> (B, T, H)
a, _ = gelu_forward(h)  # (B, T, H), elementwise
out_by_hand, _ = linear_forward(a, w_proj, b_proj)  # (B, T, H) -> (B, T, C)
print("input x:            ", x.shape)
print("after expand (c_fc):", h.shape, f"  {C} -> {H} channels")
print("after GELU:         ", a.shape)
print("after project:      ", out_by_hand.shape, f"  {H} -> {C} channels: back to the input's shape")

# %% [markdown]
# ## The same in one call

# %%
out, cache = ffn_forward(x, w_fc, b_fc, w_proj, b_proj)  # (B, T, C) -> (B, T, C)
assert out.shape == x.shape
assert np.array_equal(out, out_by_hand)
print("\nffn_forward output:", out.shape, "- identical to the three steps above")

# %% [markdown]
# Its backward returns one gradient per forward argument, in the same order and shapes.

# %%
dx, dw_fc, db_fc, dw_proj, db_proj = ffn_backward(np.ones_like(out), cache)
print("ffn_backward shapes: dx", dx.shape, "dw_fc", dw_fc.shape, "db_fc", db_fc.shape,
      "dw_proj", dw_proj.shape, "db_proj", db_proj.shape)  # fmt: skip

# %% [markdown]
# ## Parameter count
# Two weight matrices and two bias vectors.

# %%
n_params = w_fc.size + b_fc.size + w_proj.size + b_proj.size
print(f"\nFFN parameters: {C}*{H} + {H} + {H}*{C} + {C} = {n_params:,}")
print(f"(about {n_params / 7_085_568:.0%} of one 124M-config Transformer block's 7,085,568)")
