"""Step 2 - GELU versus ReLU.

What it teaches: GPT-2's feed-forward network uses GELU, a smooth cousin of ReLU. ReLU cuts every
negative input to 0 and has a kink at 0; GELU bends smoothly, lets small negative values through
(slightly negative outputs) and has a gradient everywhere. We plot both functions and their
derivatives; GELU's derivative comes from npgpt's hand-written `gelu_backward`, not from a formula here.

Run:   python examples/02_gelu_vs_relu.py      (a second or two)
Fast:  NPGPT_EXAMPLES_FAST=1 python examples/02_gelu_vs_relu.py   (fewer points on the curves)
Output: examples/out/02_gelu_vs_relu.png (folder set by NPGPT_EXAMPLES_OUT)
Notebook: the `# %%` lines mark cells; VS Code, PyCharm and Jupyter (with jupytext) open this file as a notebook.
"""

# %%
import math
import os
from pathlib import Path

import matplotlib.pyplot as plt  # no window opens: the plot is saved as a PNG (and shown inline in a notebook)
import numpy as np

from npgpt.layers import gelu_backward, gelu_forward

FAST = os.environ.get("NPGPT_EXAMPLES_FAST") == "1"
HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()  # a notebook has no __file__
OUT = Path(os.environ.get("NPGPT_EXAMPLES_OUT") or HERE / "out")
OUT.mkdir(parents=True, exist_ok=True)

# %% [markdown]
# ## Both functions and their derivatives

# %%
x = np.linspace(-3.0, 3.0, 61 if FAST else 601)  # any shape works: both functions are elementwise

gelu, gelu_cache = gelu_forward(x)
relu = np.maximum(x, 0.0)

# %% [markdown]
# Derivatives. A backward maps an upstream gradient `dout` to `dx = dout * f'(x)`; with `dout = 1`
# everywhere it returns `f'(x)` itself. That is how we read GELU's derivative out of npgpt.

# %%
d_gelu = gelu_backward(np.ones_like(x), gelu_cache)
d_relu = (x > 0).astype(x.dtype)  # 0 left of the kink, 1 right of it (undefined at 0; we use 0)

# %% [markdown]
# ## A few values side by side

# %%
print("{:>6} {:>8} {:>8} {:>8} {:>8}   (' = derivative)".format("x", "ReLU", "GELU", "ReLU'", "GELU'"))
for v in (-3.0, -1.0, -0.5, 0.0, 0.5, 1.0, 3.0):
    i = int(np.argmin(np.abs(x - v)))
    print(f"{x[i]:6.2f} {relu[i]:8.4f} {gelu[i]:8.4f} {d_relu[i]:8.4f} {d_gelu[i]:8.4f}")

i_min = int(np.argmin(gelu))
print(f"\nGELU's minimum: {gelu[i_min]:.4f} at x = {x[i_min]:.2f} (ReLU never goes below 0)")
print(f"GELU's derivative at 0: {d_gelu[np.argmin(np.abs(x))]:.3f} (ReLU's jumps from 0 to 1 there)")

# %% [markdown]
# ## Two checks
# npgpt uses GPT-2's tanh approximation. How far is it from the exact GELU, `x * Phi(x)`?

# %%
exact = np.array([0.5 * v * (1.0 + math.erf(v / math.sqrt(2.0))) for v in x])
print(f"max |tanh approximation - exact GELU| on [-3, 3]: {np.abs(gelu - exact).max():.1e}")

# %% [markdown]
# Sanity check of the derivative read out of `gelu_backward`: the slope of the forward by central
# differences.

# %%
h = 1e-5
slope = (gelu_forward(x + h)[0] - gelu_forward(x - h)[0]) / (2 * h)
print(f"max |gelu_backward - numerical slope|: {np.abs(d_gelu - slope).max():.1e}")
assert np.abs(d_gelu - slope).max() < 1e-6

# %% [markdown]
# ## The plot
# Functions on the left, derivatives on the right, with a grey line at x = 0, where ReLU has its
# kink and the two differ most; the legends sit in the empty upper left, clear of x = 0.

# %%
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
ax1.plot(x, relu, label="ReLU")
ax1.plot(x, gelu, label="GELU (gelu_forward)")
ax1.set_title("activation")
ax2.plot(x, d_relu, label="ReLU'")
ax2.plot(x, d_gelu, label="GELU' (gelu_backward)")
ax2.set_title("derivative")
for ax in (ax1, ax2):
    ax.axvline(0.0, color="0.6", linewidth=0.8)
    ax.set_xlabel("x")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize="small")  # the curves leave the upper left empty, left of x = 0
fig.suptitle("GELU versus ReLU")
fig.tight_layout()
path = OUT / "02_gelu_vs_relu.png"
fig.savefig(path, dpi=100)
print(f"\nsaved plot: {path}")
