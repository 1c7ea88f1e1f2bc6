"""Fast inverted dropout: in place on a preallocated buffer, the keep-mask returned to the caller.

Glossary: any shape.

Readable twin: npgpt.layers.dropout (dropout_forward / dropout_backward). Same mask: it is drawn by the
same function (layers.dropout.dropout_mask) with the same shape, so given one generator in the same
state both paths drop the same elements. Differences: outputs first (`out` may be `x` itself, in place);
the caller keeps the mask (no cache). The 1/(1 - p) scale is applied in the array's dtype.
CUDA: CuPy elementwise ops; no kernel of ours.

Attention's dropout under the fused softmax kernels (kernels/attention_softmax.cu) is drawn by a
counter-based generator instead, so that its backward draws the mask again rather than reading it:
philox4x32_10 below is that generator's NumPy twin, bit for bit, and attention_dropout_keep the mask
the kernels draw for a (..., t, t) stack of attention matrices. AttentionDropoutRandom hands those
masks to the readable model (which draws from any generator's `random`), so the two paths can be
compared with the same mask, as one NumPy generator does for every other mask.
"""

from __future__ import annotations

import numpy as np

from ..backend import get_array_module, to_numpy
from ..layers.dropout import dropout_mask


def dropout_forward(out, x, p: float, rng):
    """out = x * keep / (1 - p), keep drawn with probability 1 - p from `rng`; returns keep (x's shape).
    out may be x. Call only with p > 0 (p == 0 is the identity: draw nothing)."""
    xp = get_array_module(x)
    keep = dropout_mask(x.shape, p, rng, xp)
    xp.multiply(x, keep, out=out)
    out *= out.dtype.type(1.0 / (1.0 - p))
    return keep


def dropout_backward(dx, dout, keep, p: float) -> None:
    """dx = dout * keep / (1 - p); dx may be dout.

    Differentiates  `out = x * keep / (1 - p)`:  the mask is a constant, so dropped elements get no gradient."""
    get_array_module(dout).multiply(dout, keep, out=dx)
    dx *= dout.dtype.type(1.0 / (1.0 - p))


# --- Philox-4x32-10: the counter-based generator of the attention kernels' dropout (kernels/philox.cuh) ---

PHILOX_M = (0xD2511F53, 0xCD9E8D57)  # the round multipliers (Salmon et al. 2011; Random123's PHILOX_M4x32_0/1)
PHILOX_W = (0x9E3779B9, 0xBB67AE85)  # the key schedule's Weyl constants (PHILOX_W32_0/1)
_U32 = np.uint64(0xFFFFFFFF)


def philox4x32_10(counter, key) -> tuple:
    """Philox-4x32-10: counter, four uint32 arrays (or ints), and key, two, broadcast together -> four
    uint32 arrays of random bits. Ten rounds of
        (hi0, lo0) = M0 * c0,  (hi1, lo1) = M1 * c2  (64-bit products);  c = (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0)
    with the key bumped by the Weyl constants before each round but the first. The same function as
    kernels/philox.cuh's npgpt_philox4x32_10; tests check it against Random123's known-answer vectors."""
    c = [np.asarray(x).astype(np.uint64) & _U32 for x in counter]
    k = [np.asarray(x).astype(np.uint64) & _U32 for x in key]
    for r in range(10):
        if r:
            k = [(k[0] + np.uint64(PHILOX_W[0])) & _U32, (k[1] + np.uint64(PHILOX_W[1])) & _U32]
        p0, p1 = np.uint64(PHILOX_M[0]) * c[0], np.uint64(PHILOX_M[1]) * c[2]  # < 2^64: no overflow
        c = [(p1 >> np.uint64(32)) ^ c[1] ^ k[0], p1 & _U32, (p0 >> np.uint64(32)) ^ c[3] ^ k[1], p0 & _U32]
    return tuple(x.astype(np.uint32) for x in c)


def uniform24(bits):
    """float32 uniforms in [0, 1) from uint32 random bits: the top 24 bits times 2^-24 (exact)."""
    return (np.asarray(bits) >> np.uint32(8)).astype(np.float32) * np.float32(2.0**-24)


def seed_key(seed) -> tuple[int, int]:
    """The Philox key (low 32 bits, high 32 bits) of a seed drawn as a float64 uniform u in [0, 1) (a
    (1,) array, on any device): floor(u * 2^53), as kernels/philox.cuh's npgpt_seed_key."""
    s = int(float(to_numpy(seed).reshape(-1)[0]) * 2.0**53)
    return s & 0xFFFFFFFF, s >> 32


def attention_dropout_uniforms(seed, layer: int, shape) -> np.ndarray:
    """The uniforms of layer `layer`'s attention dropout for matrices of `shape` (..., t, t) (the leading
    axes flattened into bh = b * NH + h): element (bh, i, j) is word j & 3 of Philox with counter
    (j >> 2, i, bh, layer) and key seed_key(seed). float32 NumPy array of `shape`."""
    *lead, rows, cols = shape
    n_bh = int(np.prod(lead, dtype=np.int64))
    g = np.arange(-(-cols // 4), dtype=np.uint64)[None, None, :]  # column groups of four
    i = np.arange(rows, dtype=np.uint64)[None, :, None]
    bh = np.arange(n_bh, dtype=np.uint64)[:, None, None]
    words = philox4x32_10((g, i, bh, np.uint64(layer)), seed_key(seed))
    u = uniform24(np.stack(np.broadcast_arrays(*words), axis=-1))  # (n_bh, rows, groups, 4): word j & 3 of group j >> 2
    return u.reshape(n_bh, rows, -1)[:, :, :cols].reshape(shape)


def attention_dropout_keep(seed, layer: int, shape, p: float, xp=np):
    """The keep-mask (u >= p, u in float32) of layer `layer`'s attention dropout for matrices of `shape`,
    as the fused kernels draw it, on module xp."""
    return xp.asarray(attention_dropout_uniforms(seed, layer, shape) >= np.float32(p))


class AttentionDropoutRandom:
    """A dropout generator for the readable model whose attention masks are the fused attention kernels'
    (attention_dropout_keep), every other draw passing through to `rng`.

    The readable model draws one (b, NH, t, t) mask per layer, in layer order, and (b, t, C) ones for the
    embeddings and residual branches. The fast step under the fused kernels draws one float64 seed from
    its generator at the first attention it drops in (FusedSoftmaxAttention) and keys every layer's mask
    by it. This object does the same at the first 4-D draw, from the same generator state, so given
    two generators in one state (HostRandom(5) twice) both paths drop the same elements and draw the
    same other masks:

        _, loss, cache = model.forward(x, y, training=True, rng=AttentionDropoutRandom(HostRandom(5)))
        engine(x, y, training=True, rng=HostRandom(5))      # kernels=["attention_softmax"]

    One object per forward (its layer count starts at 0)."""

    def __init__(self, rng):
        self.rng, self.seed, self.layer = rng, None, 0

    def random(self, size=None, dtype=np.float32):
        shape = () if size is None else (size,) if np.isscalar(size) else tuple(size)
        if len(shape) != 4:
            return self.rng.random(size, dtype=dtype)
        if self.seed is None:
            self.seed = self.rng.random((1,), dtype=np.float64)
        u = attention_dropout_uniforms(self.seed, self.layer, shape)
        self.layer += 1
        return get_array_module(self.seed).asarray(u.astype(dtype))
