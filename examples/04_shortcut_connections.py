"""Step 4 - Shortcut (residual) connections.

What it teaches: in a deep stack, the gradient reaching the first layers is a long product of
per-layer factors; when those factors are small it shrinks towards zero ("vanishing gradients") and
the early layers barely learn. A shortcut computes x + layer(x) instead of layer(x): its backward
*adds* the incoming gradient to the layer's own contribution, so the gradient has a path that skips
every layer untouched. We build the same deep stack of linear + GELU layers twice, from npgpt's
layers, run one forward and backward, and print the gradient norm of every layer's weight.

Run:   python examples/04_shortcut_connections.py      (a second; NPGPT_EXAMPLES_FAST=1 changes nothing here)
Output: examples/out/04_shortcut_connections.png (folder set by NPGPT_EXAMPLES_OUT)
Notebook: the `# %%` lines mark cells; VS Code, PyCharm and Jupyter (with jupytext) open this file as a notebook.

Glossary: B=batch, C=channels (width of the stack).
"""

# %%
import os
from pathlib import Path

import matplotlib.pyplot as plt  # no window opens: the plot is saved as a PNG (and shown inline in a notebook)
import numpy as np

from npgpt.layers import gelu_backward, gelu_forward, linear_backward, linear_forward

HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()  # a notebook has no __file__
OUT = Path(os.environ.get("NPGPT_EXAMPLES_OUT") or HERE / "out")
OUT.mkdir(parents=True, exist_ok=True)

# %% [markdown]
# ## The stack
# Six linear + GELU layers; with shortcuts, each layer whose input and output have the same shape
# computes x + layer(x).

# %%
B, C = 8, 3  # a batch of 8 inputs with 3 features
LAYER_SIZES = [C, C, C, C, C, C, 1]  # 6 layers: five C -> C, then C -> 1


def init_layers(seed=0):
    """Weights uniform in +-1/sqrt(fan_in) (PyTorch's default for nn.Linear); one (w, b) per layer."""
    rng = np.random.default_rng(seed)
    layers = []
    for c_in, c_out in zip(LAYER_SIZES[:-1], LAYER_SIZES[1:]):
        bound = 1.0 / np.sqrt(c_in)
        w = rng.uniform(-bound, bound, size=(c_in, c_out))  # (C_in, C_out)
        b = rng.uniform(-bound, bound, size=c_out)  # (C_out,)
        layers.append((w, b))
    return layers


def forward(x, layers, use_shortcut):
    """Run the stack; return the output and every layer's caches for the backward."""
    caches = []
    for w, b in layers:
        h, c_lin = linear_forward(x, w, b)  # (B, C_in) -> (B, C_out)
        y, c_gelu = gelu_forward(h)
        shortcut = use_shortcut and y.shape == x.shape  # a shortcut needs equal shapes (not the last layer)
        x = x + y if shortcut else y
        caches.append((c_lin, c_gelu, shortcut))
    return x, caches


def backward(dout, caches):
    """Walk the layers in reverse; return each layer's weight gradient, first layer first."""
    dws = []
    for c_lin, c_gelu, shortcut in reversed(caches):
        dh = gelu_backward(dout, c_gelu)
        dx, dw, _db = linear_backward(dh, c_lin)
        # The shortcut rule: x went both into the layer and around it, so its gradient is the sum
        # of the layer's dx and the upstream gradient passed through unchanged.
        dout = dout + dx if shortcut else dx
        dws.append(dw)
    return dws[::-1]


def gradient_norms(use_shortcut, x, target):
    layers = init_layers(seed=0)  # the same weights for both stacks
    y, caches = forward(x, layers, use_shortcut)  # (B, C) -> (B, 1)
    loss = np.mean((y - target) ** 2)  # mean squared error
    dy = 2.0 * (y - target) / y.size  # dloss/dy
    return loss, [np.linalg.norm(dw) for dw in backward(dy, caches)]


# %% [markdown]
# ## One forward and backward, without and with shortcuts
# The same weights and the same batch for both stacks; we print the gradient norm of every layer's weight.

# %%
rng = np.random.default_rng(1)
x = rng.standard_normal((B, C))  # (B, C)
target = np.zeros((B, 1))  # (B, 1)

results = {}
for use_shortcut in (False, True):
    loss, norms = gradient_norms(use_shortcut, x, target)
    results[use_shortcut] = norms
    print(f"{'with' if use_shortcut else 'without'} shortcuts: loss {loss:.4f}")
    for i, n in enumerate(norms):
        print(f"  layer {i} ({LAYER_SIZES[i]} -> {LAYER_SIZES[i + 1]}): |dW| = {n:.2e}")

plain, resid = results[False], results[True]
print(f"\nfirst layer / last layer gradient norm: without shortcuts {plain[0] / plain[-1]:.1e}, "
      f"with shortcuts {resid[0] / resid[-1]:.1e}")  # fmt: skip
print("Without shortcuts the gradient shrinks on its way back to the first layers;")
print("with them the early layers get gradients of the same order as the last layer's.")
assert plain[0] < plain[-1] / 10 and resid[0] > plain[0] * 10

# %% [markdown]
# ## The plot
# A bar chart on a log scale makes the difference visible at a glance. The key bar is layer 0's
# without shortcuts, the smallest; the legend goes below the axes so that it hides no bar.

# %%
idx = np.arange(len(plain))
fig, ax = plt.subplots(figsize=(6, 4))
ax.bar(idx - 0.2, plain, width=0.4, label="without shortcuts")
ax.bar(idx + 0.2, resid, width=0.4, label="with shortcuts")
ax.set_yscale("log")
ax.set_ylim(bottom=min(plain + resid) / 5)  # room below the smallest bar, so it does not look empty
ax.set_xticks(idx)
ax.set_xlabel("layer (0 = first)")
ax.set_ylabel("gradient norm |dW|")
ax.set_title("Weight gradient of each layer, 6-layer stack")
ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2, frameon=False)
fig.tight_layout()
path = OUT / "04_shortcut_connections.png"
fig.savefig(path, dpi=100)
print(f"\nsaved plot: {path}")
