"""Step 1 - Layer normalisation.

What it teaches: LayerNorm rescales every row (every token's vector of C channels) to mean 0 and
variance 1, then applies a learned scale (weight) and shift (bias). We normalise a small batch, print
the statistics before and after, and check the hand-written backward with `npgpt.gradcheck`.

Run:   python examples/01_layernorm.py      (under a second; NPGPT_EXAMPLES_FAST=1 changes nothing here)
Notebook: the `# %%` lines mark cells; VS Code, PyCharm and Jupyter (with jupytext) open this file as a notebook.

Glossary: B=batch (rows here), C=channels (features per row).
"""

# %%
import numpy as np

import npgpt
from npgpt.layers import layernorm_backward, layernorm_forward, linear_forward

np.set_printoptions(precision=4, suppress=True)
rng = np.random.default_rng(123)

# %% [markdown]
# ## 1. Some activations
# A batch of two examples with five features each, sent through a linear layer and a ReLU, so the
# activations have some arbitrary mean and variance per row.

# %%
batch = rng.standard_normal((2, 5))  # (B, C_in) = (2, 5)
w = rng.standard_normal((5, 6)) * 0.5  # (C_in, C) = (5, 6)
h, _ = linear_forward(batch, w)  # (2, 5) -> (2, 6)
h = np.maximum(h, 0.0)  # ReLU

print("Activations h, shape", h.shape)
print(h)
print("mean per row:    ", h.mean(axis=-1))
print("variance per row:", h.var(axis=-1))

# %% [markdown]
# ## 2. Normalise
# LayerNorm with weight = 1 and bias = 0 is pure normalisation.

# %%
C = h.shape[-1]
out, cache = layernorm_forward(h, np.ones(C), np.zeros(C), eps=1e-5)  # (2, 6) -> (2, 6)

print("\nAfter layernorm_forward (weight=1, bias=0)")
print(out)
mean, var = out.mean(axis=-1), out.var(axis=-1)  # var is the biased variance, as LayerNorm uses
print("mean per row:    ", mean)
print("variance per row:", var)
assert np.allclose(mean, 0.0, atol=1e-6) and np.allclose(var, 1.0, atol=1e-4)
print("-> every row has mean 0 and variance 1 (up to eps=1e-5 in the denominator)")

# %% [markdown]
# The cache keeps exactly what the backward needs: `xhat` (the normalised input) and `rstd` = 1/std.

# %%
print("\ncache.xhat shape:", cache.xhat.shape, " cache.rstd shape:", cache.rstd.shape)

# %% [markdown]
# ## 3. Scale and shift
# With a learned scale and shift the rows are no longer forced to mean 0 / variance 1: the model can
# undo the normalisation where that helps.

# %%
weight = np.array([1.0, 2.0, 0.5, 1.0, 3.0, 1.0])
bias = np.array([0.0, 1.0, 0.0, -1.0, 0.0, 0.5])
scaled, _ = layernorm_forward(h, weight, bias)
print("\nWith weight", weight, "and bias", bias)
print(scaled)

# %% [markdown]
# ## 4. Check the backward
# Is `layernorm_backward` right? `gradcheck` compares it with central finite differences in float64:
# it moves one input coordinate at a time by +-eps, re-runs the forward, and compares the slope with
# the backward's gradient there. A tensor of up to 64 entries is checked at every coordinate. Of a
# larger one, 64 coordinates chosen so that every index of every axis is moved at least once (every
# batch row, every time step, every channel), plus the one with the largest gradient if they missed
# it. The table's `checked` column says how many and `covers` says which: `x` below has
# 3 * 4 * 8 = 96 coordinates, of which 64 are checked (`axes`); `weight` and `bias` are checked whole
# (`all`).

# %%
x = rng.standard_normal((3, 4, 8))  # (B, T, C): gradcheck works on any leading shape
weight = 1.0 + 0.1 * rng.standard_normal(8)  # (C,)
bias = 0.1 * rng.standard_normal(8)  # (C,)
results = npgpt.gradcheck(layernorm_forward, layernorm_backward, [x, weight, bias])
print("\nGradient check of layernorm_backward (float64 finite differences):")
print(npgpt.format_results(results))
assert all(r.passed for r in results), "layernorm_backward disagrees with finite differences"
print("layernorm gradcheck: all passed")
