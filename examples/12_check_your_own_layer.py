"""Step 12 - Write a layer of your own and check its gradient.

What it teaches: every layer in npgpt is a pair of functions,
    out, cache = forward(*inputs)          grads = backward(dout, cache)
and `npgpt.gradcheck` tests any such pair against finite differences. We write a new activation,
Mish (x * tanh(softplus(x)), a smooth relative of GELU and Swish/SiLU), derive its backward by hand,
and check it. Then we make the mistakes everyone makes once - a forgotten chain-rule factor, a
backward that overwrites its input, a gradient of the wrong shape - and see how the check reports
each one. Then we combine Mish with npgpt's linear layer and check the composite, and finally follow
it with dropout, whose random mask the checker refuses until it is the same on every call.

Run:   python examples/12_check_your_own_layer.py      (a second; NPGPT_EXAMPLES_FAST=1 changes nothing here)
Notebook: the `# %%` lines mark cells; VS Code, PyCharm and Jupyter (with jupytext) open this file as a notebook.

Glossary: B=batch, C=channels (any shape works for an elementwise layer).
"""

# %%
import numpy as np

import npgpt
from npgpt.layers import dropout_backward, dropout_forward, linear_backward, linear_forward

# %% [markdown]
# ## 1. The layer
#
#     softplus(x) = log(1 + e^x)          softplus'(x) = sigmoid(x)
#     mish(x)     = x * tanh(softplus(x))
#     mish'(x)    = tanh(sp) + x * (1 - tanh(sp)^2) * sigmoid(x)      (product rule, then chain rule)
#
# with `sp = softplus(x)`.


# %%
def mish_forward(x):
    """x: any shape -> out: same shape. The cache keeps what the backward needs."""
    t = np.tanh(np.logaddexp(0.0, x))  # tanh(softplus(x)); logaddexp(0, x) = log(1 + e^x) without overflow
    return x * t, (x, t)


def mish_backward(dout, cache):
    """dx = dout * mish'(x), elementwise. Returns one gradient: that of the one input x."""
    x, t = cache
    sigmoid = 1.0 / (1.0 + np.exp(-x))
    return dout * (t + x * (1.0 - t * t) * sigmoid)


# %%
rng = np.random.default_rng(0)
x = 2.0 * rng.standard_normal((4, 5))  # (B, C): values on both sides of 0
print("1. Mish with the derivative worked out above:")
results = npgpt.gradcheck(mish_forward, mish_backward, [x])
print(npgpt.format_results(results))
assert all(r.passed for r in results)

# %% [markdown]
# ## 2.-4. Three classic mistakes
# Each is checked in turn below, printed as 2., 3. and 4.


# %%
def mish_backward_no_chain(dout, cache):
    """Wrong: forgets the inner derivative softplus'(x) = sigmoid(x) of the chain rule."""
    x, t = cache
    return dout * (t + x * (1.0 - t * t))


def mish_backward_in_place(dout, cache):
    """Wrong: the right numbers, but written into dout, which belongs to the caller."""
    x, t = cache
    dout *= t + x * (1.0 - t * t) / (1.0 + np.exp(-x))
    return dout


def mish_backward_summed(dout, cache):
    """Wrong: sums over the batch, as one would for a bias; x's gradient must have x's shape."""
    return mish_backward(dout, cache).sum(axis=0)


# %%
mistakes = [
    ("a forgotten chain-rule factor", mish_backward_no_chain),
    ("a backward that modifies dout in place", mish_backward_in_place),
    ("a gradient of the wrong shape", mish_backward_summed),
]
for i, (what, backward) in enumerate(mistakes, start=2):
    print(f"\n{i}. Mish with {what}:")
    results = npgpt.gradcheck(mish_forward, backward, [x])
    print(npgpt.format_results(results))
    assert not any(r.passed for r in results), "gradcheck should have caught this"

# %% [markdown]
# Each table's last line says where it went wrong: the coordinate with the largest disagreement and
# the two values there (analytic = your backward, reference = finite differences), or what broke the
# contract.
#
# ## 5. Your layer inside a network
# A composite forward keeps its parts' caches; its backward runs their backwards in reverse order and
# returns one gradient per differentiable input, in the order of the forward's arguments (gradcheck
# says so when they come back in another order).


# %%
def linear_mish_forward(x, weight, bias):
    h, c_lin = linear_forward(x, weight, bias)  # (B, C_in) -> (B, C_out)
    out, c_mish = mish_forward(h)  # (B, C_out)
    return out, (c_lin, c_mish)


def linear_mish_backward(dout, cache):
    c_lin, c_mish = cache
    dh = mish_backward(dout, c_mish)  # (B, C_out)
    dx, dweight, dbias = linear_backward(dh, c_lin)  # (B, C_out) -> (B, C_in), (C_in, C_out), (C_out,)
    return dx, dweight, dbias


# %%
print("\n5. npgpt's linear layer followed by Mish:")
weight, bias = rng.standard_normal((5, 3)), rng.standard_normal(3)  # (C_in, C_out), (C_out,)
results = npgpt.gradcheck(linear_mish_forward, linear_mish_backward, [x, weight, bias])
print(npgpt.format_results(results))
assert all(r.passed for r in results)

# %% [markdown]
# ## 6. A random forward
# Finite differences compare the loss at nearby inputs, so the forward must give the same output for
# the same inputs. Dropout that draws a new mask on every call does not: every difference would
# measure the new mask, and a correct backward would look wrong. The checker runs the forward twice
# first and refuses such a layer with one line saying how to fix it: draw the mask from a generator
# seeded inside the forward (or pass the mask in as an input).


# %%
def mish_dropout_forward(x, rng):
    out, c_mish = mish_forward(x)
    out, c_drop = dropout_forward(out, 0.5, rng)  # the mask comes from rng, which advances on every call
    return out, (c_mish, c_drop)


def mish_dropout_backward(dout, cache):
    c_mish, c_drop = cache
    return mish_backward(dropout_backward(dout, c_drop), c_mish)


print("\n6. Mish then dropout, the generator passed in (it advances on every call):")
try:
    npgpt.gradcheck(mish_dropout_forward, mish_dropout_backward, [x, np.random.default_rng(1)])
except ValueError as e:
    print(f"refused: {e}")
results = npgpt.gradcheck(lambda x: mish_dropout_forward(x, np.random.default_rng(1)), mish_dropout_backward, [x],
                          layer="mish_dropout")  # fmt: skip
print("with a generator seeded inside the forward (the same mask on every call):")
print(npgpt.format_results(results))
assert all(r.passed for r in results)

# %% [markdown]
# In a test suite, `npgpt.assert_gradients(linear_mish_forward, linear_mish_backward, [x, weight, bias])`
# does the same check in one call and raises `AssertionError` with the table if a gradient is wrong.

# %%
npgpt.assert_gradients(linear_mish_forward, linear_mish_backward, [x, weight, bias])
print("\nAll checks behaved as expected: the right backward passes, each mistake is caught.")
