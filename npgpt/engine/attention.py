"""GPT's causal self-attention in the fast engine: one small object per way of computing it (a "path").

Glossary: B=batch, T=time, C=channels, NH=heads, hs=C//NH; b, t: this batch's; n = b*t rows; l: the layer.

Every path computes layers/attention.py's
    q, k, v = split(qkv);  y = merge(dropout(softmax(q @ k^T / sqrt(hs) + causal mask)) @ v)
and has the same three methods, which is all the block's wiring (engine/block.py) knows of it:

    qkv = path.qkv_out(l, n)                          # (n, 3C): where c_attn writes layer l's q|k|v
    path.forward(l, y, qkv, b, t, drop, replay=False) # y (n, C) = attention(qkv); keeps what its backward reads
    path.backward(l, dqkv, dy, b, t, drop)            # dqkv (n, 3C) from dy (n, C)

`drop` is the forward's Dropout part (parts.py): the rate p and the generator, and the dict where a
path keeps, by key, its dropout mask or whatever regenerates it. replay=True is recompute="block"
rerunning the layer's forward inside the backward, which must drop the same elements; only the paths
that keep nothing T x T see it (recompute always chooses RecomputedAttention, or FlashAttention over
it). A path keeps its state in the engine's buffers (buffers.py), so the engine's nbytes() counts it.

| path                | used                              | keeps for the backward            | ops (npgpt/fast/, cuda/)       |
| InPlaceAttention    | the CPU                           | probabilities; q, k, v inside qkv | attention_in_place_*           |
| HeadsAttention      | a GPU (and cuBLAS's bmm)          | probabilities; q, k, v per head   | attention_forward / _backward  |
| RecomputedAttention | recompute="attention" or "block"  | q, k, v: nothing T x T            | attention_rows_*               |
| FlashAttention      | the CUDA flash kernel (no dropout) | q, k, v, each row's logsumexp    | flash_attention_* (kernels/)   |
| FusedSoftmaxAttention | a GPU with "attention_softmax"  | probabilities; q, k, v per head;  | cuBLAS + attention_softmax_*   |
|                     | (preferred to the flash kernel)   | the dropout seed, not the mask    | (kernels/attention_softmax.cu) |

choose_attention picks one, once, when the engine is built. Another way of computing attention is
another class with these three methods, and a line in choose_attention.
"""

from __future__ import annotations

import copy
import math

import numpy as np

from .. import fast
from ..backend import get_array_module
from ..layers.dropout import dropout_mask


def choose_attention(acts, work, ops, *, in_place: bool, rows: int | None, recompute: bool):
    """The path for these settings: recompute (nothing T x T kept), else the fused softmax kernels when
    ops has them (a GPU's default: cuBLAS products, dropout in the kernels), else in place (the CPU),
    else the heads layout; with the flash kernel in ops, FlashAttention with the recompute, in-place or
    heads path under it for the forwards with dropout, which the kernel cannot do. rows: attention's
    products in causal blocks of that many query rows (the CPU), or None (whole stacks: a GPU)."""
    if recompute:
        path = RecomputedAttention(acts, work, ops.heads_matmul)
    elif ops.softmax_forward is not None:
        return FusedSoftmaxAttention(acts, work, ops)
    elif in_place:
        path = InPlaceAttention(acts, work, ops.heads_matmul, rows)
    else:
        path = HeadsAttention(acts, work, ops.heads_matmul, rows)
    if ops.flash_forward is not None:
        return FlashAttention(acts, work, ops.flash_forward, ops.flash_backward, path)
    return path


def _saved_heads(acts, l: int, b: int, t: int):  # noqa: E741
    """(3, b, NH, t, hs): layer l's saved q (divided by sqrt(hs)), k and v in the heads layout."""
    return acts.qkv_heads[l][:, :b, :, :t]


def _kept_probabilities(acts, work, l: int, b: int, t: int):  # noqa: E741
    """Layer l's (b, NH, t, t) probabilities, and the scratch for the dropped ones (then datt): allocated
    for the engine's (B, T) the first time a path that keeps them runs."""
    if acts.att[l] is None:
        _, B, NH, T, _ = acts.qkv_heads[l].shape
        acts.att[l] = get_array_module(work.causal_bias).empty((B, NH, T, T), dtype=work.causal_bias.dtype)
        if work.att is None:
            work.att = get_array_module(work.causal_bias).empty_like(acts.att[l])
    return acts.att[l][:b, :, :t, :t], work.att[:b, :, :t, :t]


class InPlaceAttention:
    """The CPU's path: c_attn writes qkv straight into the layer's saved buffer (qkv_heads' memory, laid
    out (n, 3C) [q | k | v]); q, k and v are strided views of it, and y and dqkv are written through
    views, so nothing is copied into or out of a heads layout. The products run in causal blocks of
    `rows` query rows, skipping what the mask hides (fast.attention_in_place_*)."""

    def __init__(self, acts, work, matmul, rows: int | None):
        self.acts, self.work, self.matmul, self.rows = acts, work, matmul, rows

    def qkv_out(self, l: int, n: int):  # noqa: E741
        _, _, NH, _, hs = self.acts.qkv_heads[l].shape
        return self.acts.qkv_heads[l].reshape(-1)[: n * 3 * NH * hs].reshape(n, 3 * NH * hs)  # (n, 3C) view

    def forward(self, l, y, qkv, b, t, drop, replay=False):  # noqa: E741
        att, dropped = _kept_probabilities(self.acts, self.work, l, b, t)
        drop.masks[f"att{l}"] = fast.attention_in_place_forward(y, qkv, att, self.work.causal_bias[:t, :t], drop.p, drop.rng,
                                                                dropped=dropped, rows=self.rows, matmul=self.matmul)  # fmt: skip

    def backward(self, l, dqkv, dy, b, t, drop):  # noqa: E741
        att, datt = _kept_probabilities(self.acts, self.work, l, b, t)
        keep = drop.masks[f"att{l}"] if drop.p > 0 else None
        fast.attention_in_place_backward(dqkv, dy, self.qkv_out(l, b * t), att, keep, drop.p, datt=datt, rows=self.rows,
                                         matmul=self.matmul)  # fmt: skip


class HeadsAttention:
    """A GPU's path: q, k, v copied out of qkv into the heads layout (3, b, NH, t, hs), the layer's saved
    buffer, so every product is one batched GEMM over all (batch, head) pairs (with NPGPT_CUDA_KERNELS=bmm
    one cuBLAS strided-batched call, `matmul`); y and dqkv copied back (fast.attention_forward / _backward).
    rows: causal blocks of query rows as on the CPU, or None for whole stacks."""

    def __init__(self, acts, work, matmul, rows: int | None):
        self.acts, self.work, self.matmul, self.rows = acts, work, matmul, rows

    def qkv_out(self, l: int, n: int):  # noqa: E741
        return self.work.n3c[:n]

    def forward(self, l, y, qkv, b, t, drop, replay=False):  # noqa: E741
        att, dropped = _kept_probabilities(self.acts, self.work, l, b, t)
        drop.masks[f"att{l}"] = fast.attention_forward(y, _saved_heads(self.acts, l, b, t), att, qkv, self.work.causal_bias[:t, :t],
                                                       drop.p, drop.rng, dropped=dropped, head_out=self.work.heads[0, :b, :, :t],
                                                       matmul=self.matmul, rows=self.rows)  # fmt: skip

    def backward(self, l, dqkv, dy, b, t, drop):  # noqa: E741
        att, datt = _kept_probabilities(self.acts, self.work, l, b, t)
        keep = drop.masks[f"att{l}"] if drop.p > 0 else None
        fast.attention_backward(dqkv, dy, _saved_heads(self.acts, l, b, t), att, keep, drop.p, dheads=self.work.heads[:, :b, :, :t],
                                datt=datt, matmul=self.matmul, rows=self.rows)  # fmt: skip


class RecomputedAttention:
    """recompute="attention" / "block": nothing T x T is kept. The forward works a block of query rows at a
    time against only the keys those rows see; the backward recomputes each block's probabilities from
    the kept q and k (fast.attention_rows_*), as the flash kernel does on a GPU. The dropout mask is not
    kept either: a copy of the generator as it was before drawing it is, and the mask is drawn again
    from a copy of that copy (a generator that cannot be copied: the mask itself is kept)."""

    def __init__(self, acts, work, matmul):
        self.acts, self.work, self.matmul = acts, work, matmul

    def qkv_out(self, l: int, n: int):  # noqa: E741
        return self.work.n3c[:n]

    def _scratch(self, b: int, t: int):
        """(probability blocks (2, b, NH, rows, t), head_tmp (b, NH, t, hs)); under the flash kernel,
        which needs neither, allocated when a forward with dropout first comes here."""
        w = self.work
        if w.att_rows is None:
            _, B, NH, T, _ = self.acts.qkv_heads[0].shape
            w.att_rows = fast.attention_rows_scratch(get_array_module(w.heads), B, NH, T, w.heads.dtype)
            w.head_tmp = get_array_module(w.heads).empty_like(w.heads[0])
        return w.att_rows[:, :b, :, :, :t], w.head_tmp[:b, :, :t]

    def _mask(self, l, b, t, drop, fresh: bool):  # noqa: E741
        """Layer l's keep-mask (None without dropout): fresh, drawn after keeping the generator's state; or
        drawn again from a copy of that state (the backward, a replay)."""
        if drop.p == 0:
            return None
        shape, xp = (b, self.acts.qkv_heads[l].shape[2], t, t), get_array_module(self.work.heads)
        if fresh:
            try:
                drop.masks[f"att_rng{l}"] = copy.deepcopy(drop.rng)
            except Exception:  # a generator that cannot be copied: the mask itself is kept
                drop.masks[f"att_rng{l}"] = None
            keep = dropout_mask(shape, drop.p, drop.rng, xp)
            if drop.masks[f"att_rng{l}"] is None:
                drop.masks[f"att_keep{l}"] = keep
            return keep
        if drop.masks[f"att_rng{l}"] is None:
            return drop.masks[f"att_keep{l}"]
        return dropout_mask(shape, drop.p, copy.deepcopy(drop.masks[f"att_rng{l}"]), xp)

    def forward(self, l, y, qkv, b, t, drop, replay=False):  # noqa: E741
        heads, head_out = _saved_heads(self.acts, l, b, t), self.work.heads[0, :b, :, :t]
        fast.split_heads_into(heads, qkv)  # (n, 3C) -> (3, b, NH, t, hs), q divided by sqrt(hs)
        keep = self._mask(l, b, t, drop, fresh=not replay)
        scratch, _ = self._scratch(b, t)
        fast.attention_rows_forward(head_out, heads[0], heads[1], heads[2], self.work.causal_bias[:t, :t], keep,
                                    heads.dtype.type(1.0 / (1.0 - drop.p)), scratch=scratch, matmul=self.matmul)  # fmt: skip
        fast.merge_heads_into(y, head_out)  # (b, NH, t, hs) -> (n, C)

    def backward(self, l, dqkv, dy, b, t, drop):  # noqa: E741
        heads, dheads = _saved_heads(self.acts, l, b, t), self.work.heads[:, :b, :, :t]
        hs = heads.shape[-1]
        fast.head_from_rows_into(dheads[0], dy)  # dy in dq's slot, (n, C) -> (b, NH, t, hs)
        keep = self._mask(l, b, t, drop, fresh=False)
        scratch, tmp = self._scratch(b, t)
        fast.attention_rows_backward_(dheads[0], dheads[1], dheads[2], heads[0], heads[1], heads[2], self.work.causal_bias[:t, :t],
                                      keep, heads.dtype.type(1.0 / (1.0 - drop.p)), heads.dtype.type(1.0 / np.sqrt(hs)),
                                      scratch=scratch, tmp=tmp, matmul=self.matmul)  # fmt: skip
        fast.qkv_from_heads_into(dqkv, dheads)  # (3, b, NH, t, hs) -> (n, 3C)


class FlashAttention:
    """The CUDA flash-attention kernel (kernels/attention.cu): O(t) memory, each row's logsumexp kept
    instead of the probabilities, and recomputed from it in the backward. It has no dropout: a forward
    with dropout goes to the path under it (`fallback`). `used[l]`: whether layer l's last forward took
    the kernel."""

    def __init__(self, acts, work, kernel_forward, kernel_backward, fallback):
        self.acts, self.work, self.fallback = acts, work, fallback
        self.kernel_forward, self.kernel_backward = kernel_forward, kernel_backward
        self.used = [False] * len(acts.qkv_heads)

    def qkv_out(self, l: int, n: int):  # noqa: E741
        return self.work.n3c[:n]  # as the fallback's: one of them runs after c_attn wrote here

    def forward(self, l, y, qkv, b, t, drop, replay=False):  # noqa: E741
        self.used[l] = drop.p == 0
        if not self.used[l]:
            self.fallback.forward(l, y, qkv, b, t, drop, replay)
            return
        self.kernel_forward(y, _saved_heads(self.acts, l, b, t), self.acts.lse[l][:b, :, :t], qkv,
                            head_out=self.work.flash_out[:b, :, :t])  # fmt: skip

    def backward(self, l, dqkv, dy, b, t, drop):  # noqa: E741
        if not self.used[l]:
            self.fallback.backward(l, dqkv, dy, b, t, drop)
            return
        self.kernel_backward(dqkv, dy, _saved_heads(self.acts, l, b, t), self.acts.lse[l][:b, :, :t], self.acts.atty[l][: b * t],
                             dheads=self.work.heads[:, :b, :, :t], head_out=self.work.flash_out[:b, :, :t])  # fmt: skip


class FusedSoftmaxAttention:
    """A GPU's attention with the kernels on: every product one cuBLAS strided-batched GEMM over all
    (batch, head) pairs (ops.batched_matmul: TF32 when on, tensor cores at 16 bits), and between the
    products one fused kernel each way (kernels/attention_softmax.cu; ops.softmax_*, or their NumPy
    twins in fast/attention.py), so the only (b, NH, t, t) matrices written are the scores, which
    become the probabilities in place, and with dropout the dropped probabilities, in a scratch:

        forward   s = q k^T;  P = softmax(s / sqrt(hs) + mask), [D = dropout(P)];  y = P v  (D v)
        backward  dv = P^T dy  (D regenerated first);  g = dy v^T;  ds = softmax_backward(g);
                  dk = ds^T q;  dq = ds k

    Keeps for the backward: the probabilities (b, NH, t, t) per layer, q, k, v (q not pre-scaled: the
    kernels scale the scores) in the heads layout, and the forward's dropout seed, one float64
    (drop.masks["att_seed"], drawn from the step's generator at the first layer): the mask is Philox's,
    keyed by (seed, layer, position), and drawn again in the backward instead of being kept."""

    def __init__(self, acts, work, ops):
        self.acts, self.work, self.matmul = acts, work, ops.batched_matmul
        self.softmax_forward, self.softmax_backward, self.dropout = ops.softmax_forward, ops.softmax_backward, ops.softmax_dropout

    def qkv_out(self, l: int, n: int):  # noqa: E741
        return self.work.n3c[:n]

    def _seed(self, drop):
        """The forward's dropout seed (None without dropout): a (1,) float64 uniform, drawn once per forward."""
        if drop.p == 0:
            return None
        if "att_seed" not in drop.masks:
            seed = drop.rng.random((1,), dtype=np.float64)
            drop.masks["att_seed"] = get_array_module(self.work.heads).asarray(seed)
        return drop.masks["att_seed"]

    def forward(self, l, y, qkv, b, t, drop, replay=False):  # noqa: E741
        heads, head_out = _saved_heads(self.acts, l, b, t), self.work.heads[0, :b, :, :t]
        hs = heads.shape[-1]
        fast.heads_from_qkv_into(heads, qkv)  # (n, 3C) -> (3, b, NH, t, hs), q not scaled (the kernels scale the scores)
        q, k, v = heads
        att, dropped = _kept_probabilities(self.acts, self.work, l, b, t)
        self.matmul(att, q, k.swapaxes(-1, -2))  # scores (b, NH, t, hs) @ (b, NH, hs, t) -> (b, NH, t, t)
        self.softmax_forward(att, dropped, 1.0 / math.sqrt(hs), drop.p, self._seed(drop), l)  # in place; dropped if p > 0
        self.matmul(head_out, dropped if drop.p > 0 else att, v)  # (b, NH, t, t) @ (b, NH, t, hs)
        fast.merge_heads_into(y, head_out)  # (b, NH, t, hs) -> (n, C)

    def backward(self, l, dqkv, dy, b, t, drop):  # noqa: E741
        heads, dheads = _saved_heads(self.acts, l, b, t), self.work.heads[:, :b, :, :t]
        hs = heads.shape[-1]
        q, k, v = heads
        att, datt = _kept_probabilities(self.acts, self.work, l, b, t)
        seed = self._seed(drop)
        dyh = dheads[0]
        fast.head_from_rows_into(dyh, dy)  # dy in dq's slot, (n, C) -> (b, NH, t, hs)
        used = att
        if drop.p > 0:  # the probabilities that multiplied v, drawn again into the scratch
            self.dropout(datt, att, drop.p, seed, l)
            used = datt
        self.matmul(dheads[2], used.swapaxes(-1, -2), dyh)  # dv = D^T dy
        self.matmul(datt, dyh, v.swapaxes(-1, -2))  # g = dy v^T, the gradient of D
        self.softmax_backward(datt, att, 1.0 / math.sqrt(hs), drop.p, seed, l)  # datt becomes ds, in place
        self.matmul(dheads[1], datt.swapaxes(-1, -2), q)  # dk = ds^T q
        self.matmul(dheads[0], datt, k)  # dq = ds k (overwrites dy)
        fast.qkv_from_heads_into(dqkv, dheads)  # (3, b, NH, t, hs) -> (n, 3C)
