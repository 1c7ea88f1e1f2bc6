"""GPT-2's transformer block in the fast engine: layers/block.py's wiring, written once on the fast ops.

Glossary: B=batch, T=time, C=channels, N=B*T rows; b, t: this batch's; n = b*t; l: the layer.

    x1  = x  + dropout(c_proj(attention(c_attn(ln_1(x)))))      the attention branch (a path: attention.py)
    out = x1 + dropout(c_proj(gelu(c_fc(ln_2(x1)))))            the MLP branch

Blocks runs one block forward (into the engine's Activations, buffers.py) and backward (through the
Workspace), for every attention path and every recompute setting alike: the path is a part it is
given (choose_attention), and what recompute changes is the Recompute part's: which buffers the
layers share, and what the backward refills before it reads them. The gradients of frozen layers are
not computed (parts.Gradients has no buffer for them).
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import fast


@dataclass(frozen=True)
class Recompute:
    """What the forward does not keep and the backward recomputes (same losses and gradients, less memory,
    more work; memory.py estimates each): "none"; "attention", the (B, NH, T, T) probabilities
    (RecomputedAttention); "mlp", GELU's output, from its kept input; "block", everything but each block's
    input, the block's forward rerun in the backward into buffers all layers share (buffers.py)."""

    mode: str = "none"

    @property
    def attention(self) -> bool:
        """Attention keeps nothing T x T (RecomputedAttention), also under "block"."""
        return self.mode in ("attention", "block")

    @property
    def gelu_input_only(self) -> bool:
        """GELU's output is rebuilt from its input, so the input must be kept as it is (not as gelu')."""
        return self.mode == "mlp"

    def refill(self, blocks: Blocks, l: int, b: int, t: int) -> None:  # noqa: E741
        """Before block l's backward: what its forward did not keep, computed again."""
        a, n = blocks.acts, b * t
        if self.mode == "block":  # the same forward, the same dropout masks, into the shared buffers
            blocks.forward(l, a.resid[l][:n], b, t, replay=True)
        elif self.mode == "mlp":  # GELU's output from its input (bias included)
            blocks.ops.gelu_forward(a.act[l][:n], a.fc[l][:n], None)


class Blocks:
    """The blocks of one engine: its buffers, the weights its GEMMs read (the model's, or their 16-bit
    copy), the parts (gradients, LayerNorms, dropout, the attention path, recompute) and ops.
    gelu_keeps_grad: GELU's forward computes gelu'(fc) and keeps it in place of fc, so its backward is
    one multiply (fast.gelu_forward_keep_grad; not with the CUDA kernel, 16-bit activations, or
    recompute="mlp", whose backward needs fc itself)."""

    def __init__(self, model, acts, work, weights, parts, ops, threads: int, gelu_keeps_grad: bool):
        self.model, self.acts, self.work, self.weights, self.ops = model, acts, work, weights, ops
        self.gradients, self.norms, self.drop, self.attention, self.recompute = parts
        self.threads, self.gelu_keeps_grad = threads, gelu_keeps_grad

    def forward(self, l, x, b, t, want_grad: bool = True, replay: bool = False):  # noqa: E741
        """Block l of x (n, C): out (n, C), which is acts.resid[l + 1]. want_grad: a backward will follow.
        replay (recompute="block", in the backward): the same forward again with the same dropout masks,
        up to GELU's output (the MLP's c_proj output is not needed by the backward)."""
        a, w, weights, n, pre = self.acts, self.work, self.weights, b * t, f"h.{l}."
        h, y, branch = a.ln1[l][:n], a.atty[l][:n], w.nc[:n]
        qkv = self.attention.qkv_out(l, n)  # (n, 3C)
        self.norms.forward(pre + "ln_1", h, a.ln1_mean[l][:n], a.ln1_rstd[l][:n], x)
        fast.linear_forward(qkv, h, weights[pre + "attn.c_attn.weight"], weights.get(pre + "attn.c_attn.bias"))  # (n, 3C)
        self.attention.forward(l, y, qkv, b, t, self.drop, replay)  # (n, 3C) -> (n, C)
        fast.linear_forward(branch, y, weights[pre + "attn.c_proj.weight"], weights[pre + "attn.c_proj.bias"])
        self.drop.forward(branch, f"res1_{l}", replay)
        x1 = a.resid_mid[l][:n]
        self.model.xp.add(x, branch, out=x1)  # shortcut around attention
        h2, fc, act = a.ln2[l][:n], a.fc[l][:n], a.act[l][:n]
        self.norms.forward(pre + "ln_2", h2, a.ln2_mean[l][:n], a.ln2_rstd[l][:n], x1)
        fast.linear_forward(fc, h2, weights[pre + "mlp.c_fc.weight"])  # (n, 4C); the bias is added by GELU
        if self.gelu_keeps_grad and want_grad:  # fc becomes gelu'(fc + bias), what the backward multiplies by
            fast.gelu_forward_keep_grad(act, fc, weights[pre + "mlp.c_fc.bias"], scratch=w.gelu, threads=self.threads)
        else:
            self.ops.gelu_forward(act, fc, weights[pre + "mlp.c_fc.bias"])
        if replay:
            return None
        fast.linear_forward(branch, act, weights[pre + "mlp.c_proj.weight"], weights[pre + "mlp.c_proj.bias"])  # (n, C)
        self.drop.forward(branch, f"res2_{l}")
        out = a.resid[l + 1][:n]
        self.model.xp.add(x1, branch, out=out)  # shortcut around the MLP
        return out

    def backward(self, l, dx, b, t, accumulate: bool) -> None:  # noqa: E741
        """dx (n, C) holds d(out) on entry and d(x) on exit; the block's gradients written (or added into)."""
        a, w, n, pre = self.acts, self.work, b * t, f"h.{l}."
        self.recompute.refill(self, l, b, t)
        scratch = w.n4c[:n, : self.model.config.emb_dim]  # LayerNorm's backward scratch, free by then
        # out = x1 + dropout(mlp(ln_2(x1)))
        dm = self.drop.backward(w.nc[:n], dx, f"res2_{l}")
        dact, dh2, dln = w.n4c[:n], w.nc2[:n], w.nc[:n]
        self._linear_backward(dact, dm, a.act[l][:n], pre + "mlp.c_proj", accumulate)
        if self.gelu_keeps_grad:
            fast.gelu_backward_saved_(dact, a.fc[l][:n], threads=self.threads)  # dfc = dact * gelu'
        else:
            self.ops.gelu_backward_(dact, a.fc[l][:n])  # dact becomes dfc, in place
        self._linear_backward(dh2, dact, a.ln2[l][:n], pre + "mlp.c_fc", accumulate)
        self.norms.backward(pre + "ln_2", dln, dh2, a.resid_mid[l][:n], a.ln2_mean[l][:n], a.ln2_rstd[l][:n], scratch)
        dx += dln  # dx1 = dout + branch
        # x1 = x + dropout(c_proj(attention(c_attn(ln_1(x)))))
        da = self.drop.backward(w.nc[:n], dx, f"res1_{l}")
        dy, dqkv, dh, dln = w.nc2[:n], w.n3c[:n], w.nc[:n], w.nc2[:n]
        self._linear_backward(dy, da, a.atty[l][:n], pre + "attn.c_proj", accumulate)
        self.attention.backward(l, dqkv, dy, b, t, self.drop)  # (n, C) -> (n, 3C)
        self._linear_backward(dh, dqkv, a.ln1[l][:n], pre + "attn.c_attn", accumulate)
        self.norms.backward(pre + "ln_1", dln, dh, a.resid[l][:n], a.ln1_mean[l][:n], a.ln1_rstd[l][:n], scratch)
        dx += dln

    def _linear_backward(self, dx, dout, x, name: str, accumulate: bool) -> None:
        """Linear layer `name` (e.g. 'h.0.mlp.c_fc'): dx, and its weight's and bias's gradients (skipped
        when frozen or absent)."""
        views = self.gradients.views
        self.gradients.linear_backward(dx, dout, x, self.weights[name + ".weight"], views.get(name + ".weight"),
                                       views.get(name + ".bias"), accumulate)  # fmt: skip
