"""npgpt.seq2seq against torch.nn.Transformer and PyTorch autograd: logits, loss and every parameter's
gradient on padded batches, post-norm and norm_first=True, ReLU and GELU, dropout 0.

torch.nn.Transformer has no embeddings or output layer, so the torch side builds them from the same
tensors: embed(ids) * sqrt(C) + positions, and logits = decoder output @ output weight. The weight
mapping, npgpt name (layout) -> torch name (layout), with <side> = encoder / decoder:

    <side>.layers.i.self_attn.q_proj.weight (C, C)  -> <side>.layers.i.self_attn.in_proj_weight[0:C]    (C, C), transposed
    <side>.layers.i.self_attn.k_proj.weight (C, C)  -> <side>.layers.i.self_attn.in_proj_weight[C:2C]   transposed
    <side>.layers.i.self_attn.v_proj.weight (C, C)  -> <side>.layers.i.self_attn.in_proj_weight[2C:3C]  transposed
    <side>.layers.i.self_attn.q_proj.bias / v_proj.bias -> in_proj_bias[0:C] / in_proj_bias[2C:3C]
    (no key bias in npgpt)                           -> in_proj_bias[C:2C] = 0; its torch gradient is 0 (asserted)
    <side>.layers.i.self_attn.out_proj.weight (C, C) -> <side>.layers.i.self_attn.out_proj.weight, transposed; .bias as is
    decoder.layers.i.cross_attn.*                    -> decoder.layers.i.multihead_attn.*, as self_attn
    <side>.layers.i.linear1.weight (C, F)            -> <side>.layers.i.linear1.weight (F, C), transposed; .bias as is
    <side>.layers.i.linear2.weight (F, C)            -> <side>.layers.i.linear2.weight (C, F), transposed; .bias as is
    <side>.layers.i.norm{1,2,3}.weight / .bias       -> the same names
    encoder.norm.*, decoder.norm.*                   -> the same names (nn.Transformer's final LayerNorms)
    embed.weight / encoder.embed.weight / decoder.embed.weight (V, C), output.weight (C, V),
    encoder.pos.weight / decoder.pos.weight (max_len, C)  -> plain tensors on the torch side
GELU: npgpt's is GPT-2's tanh approximation, so torch gets activation=gelu(approximate="tanh").
Relative error is npgpt's tensor-wide measure max|a - b| / max(|a| + |b|).
"""

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from npgpt.gradcheck import relative_error  # noqa: E402
from npgpt.seq2seq import Seq2Seq, Seq2SeqConfig  # noqa: E402
from npgpt.seq2seq.check import padded_batch, random_params  # noqa: E402

torch.set_num_threads(2)
F = torch.nn.functional

# (norm, activation, positions, tied): the four norm x activation pairs, with the embedding options spread over them
CASES = [
    ("post", "relu", "sinusoidal", "all"),
    ("post", "gelu", "learned", "decoder"),
    ("pre", "relu", "learned", "none"),
    ("pre", "gelu", "sinusoidal", "all"),
]
TOL = {np.float64: 1e-10, np.float32: 1e-5}  # measured: at most 6e-15 and 2e-6 (logits 7e-16 and 5e-7)
# nn.Transformer warns that its nested-tensor inference path is off (GELU as a function, norm_first): irrelevant here
pytestmark = pytest.mark.filterwarnings("ignore:enable_nested_tensor is True")


def make_config(norm, activation, pos, tie):
    return Seq2SeqConfig(src_vocab_size=23 if tie != "all" else 29, tgt_vocab_size=29, d_model=16, n_heads=4,
                         n_encoder_layers=2, n_decoder_layers=2, d_ff=24, dropout=0.0, norm=norm, activation=activation,
                         pos_encoding=pos, tie_embeddings=tie, max_len=10)  # fmt: skip


def torch_transformer(cfg, params, dtype):
    """nn.Transformer with npgpt's weights copied in by the mapping of the module docstring."""
    act = F.relu if cfg.activation == "relu" else (lambda x: F.gelu(x, approximate="tanh"))
    model = torch.nn.Transformer(d_model=cfg.d_model, nhead=cfg.n_heads, num_encoder_layers=cfg.n_encoder_layers,
                                 num_decoder_layers=cfg.n_decoder_layers, dim_feedforward=cfg.d_ff, dropout=0.0,
                                 activation=act, batch_first=True, norm_first=cfg.norm_first,
                                 layer_norm_eps=cfg.ln_eps)  # fmt: skip
    model = model.to(torch.float64 if dtype == np.float64 else torch.float32)
    C = cfg.d_model
    state = {}
    for name, p in model.named_parameters():
        ours = name.replace("multihead_attn", "cross_attn")
        if name.endswith("in_proj_weight"):
            base = ours[: -len("in_proj_weight")]
            value = np.concatenate([params[base + f"{x}_proj.weight"].T for x in "qkv"], axis=0)  # (3C, C)
        elif name.endswith("in_proj_bias"):
            base = ours[: -len("in_proj_bias")]
            value = np.concatenate([params[base + "q_proj.bias"], np.zeros(C), params[base + "v_proj.bias"]])
        elif p.dim() == 2:
            value = params[ours].T  # nn.Linear keeps (C_out, C_in)
        else:
            value = params[ours]
        state[name] = torch.tensor(np.ascontiguousarray(value), dtype=p.dtype)
    model.load_state_dict(state)
    model.train()  # dropout is 0; train mode keeps PyTorch off its inference fast path
    return model


def torch_forward(cfg, params, model, src, tgt_in, targets, dtype):
    """(logits, loss, {npgpt name: torch leaf}) with embeddings, positions and output built by hand."""
    tdtype = torch.float64 if dtype == np.float64 else torch.float32
    leaves = {k: torch.tensor(v, dtype=tdtype, requires_grad=True) for k, v in params.items()
              if k.endswith(("embed.weight", "pos.weight")) or k == "output.weight"}  # fmt: skip
    C = cfg.d_model

    def positions(T, side):
        if cfg.pos_encoding == "learned":
            return leaves[f"{side}.pos.weight"][:T]
        pos = torch.arange(T, dtype=torch.float64)[:, None]
        freq = torch.exp(-math.log(10000.0) * torch.arange(0, C, 2, dtype=torch.float64) / C)
        pe = torch.zeros(T, C, dtype=torch.float64)
        pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * freq), torch.cos(pos * freq)
        return pe.to(tdtype)

    def table(side):
        return leaves["embed.weight"] if cfg.tie_embeddings == "all" else leaves[f"{side}.embed.weight"]

    s, ti, tg = (torch.as_tensor(a) for a in (src, tgt_in, targets))
    src_x = table("encoder")[s] * math.sqrt(C) + positions(s.shape[1], "encoder")
    tgt_x = table("decoder")[ti] * math.sqrt(C) + positions(ti.shape[1], "decoder")
    T = ti.shape[1]
    out = model(src_x, tgt_x, tgt_mask=torch.triu(torch.ones(T, T, dtype=torch.bool), 1),
                src_key_padding_mask=s == cfg.pad_id, tgt_key_padding_mask=ti == cfg.pad_id,
                memory_key_padding_mask=s == cfg.pad_id)  # fmt: skip
    head = leaves["output.weight"] if cfg.tie_embeddings == "none" else table("decoder").T
    logits = out @ head
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tg.reshape(-1), ignore_index=cfg.pad_id)
    return logits, loss, leaves


def torch_grad_of(name, model, leaves, C):
    """The torch gradient of npgpt parameter `name`, in npgpt's layout."""
    if name in leaves:
        return leaves[name].grad.numpy()
    tname = name.replace("cross_attn", "multihead_attn")
    for i, x in enumerate("qkv"):
        if tname.endswith(f"{x}_proj.weight") and "out_proj" not in tname:
            g = dict(model.named_parameters())[tname.replace(f"{x}_proj.weight", "in_proj_weight")].grad
            return g[i * C : (i + 1) * C].numpy().T
        if tname.endswith(f"{x}_proj.bias"):
            g = dict(model.named_parameters())[tname.replace(f"{x}_proj.bias", "in_proj_bias")].grad
            return g[i * C : (i + 1) * C].numpy()
    g = dict(model.named_parameters())[tname].grad.numpy()
    return g.T if g.ndim == 2 else g


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("case", CASES, ids=["-".join(c) for c in CASES])
def test_logits_loss_and_every_gradient_match_torch(case, dtype):
    cfg = make_config(*case)
    rng = np.random.default_rng(len("".join(case)))
    params64 = random_params(cfg, rng)
    src, tgt_in, targets = padded_batch(cfg, rng, B=4, S=7, T=6)
    assert (src == cfg.pad_id).any() and (tgt_in == cfg.pad_id).any()  # the batch really is padded
    params = {k: v.astype(dtype) for k, v in params64.items()}

    model = Seq2Seq(cfg, params=params)
    logits, loss, cache = model.forward(src, tgt_in, targets)
    grads = model.backward(cache)

    tmodel = torch_transformer(cfg, params64, dtype)
    t_logits, t_loss, leaves = torch_forward(cfg, params, tmodel, src, tgt_in, targets, dtype)
    t_loss.backward()

    tol = TOL[dtype]
    assert relative_error(logits, t_logits.detach().numpy()) < tol
    assert abs(float(loss) - t_loss.item()) / t_loss.item() < tol
    for name in model.params:
        err = relative_error(grads[name], torch_grad_of(name, tmodel, leaves, cfg.d_model))
        assert err < tol, f"{name}: relative error {err:.2e}"
    # every torch parameter was compared, except the key biases npgpt does not have: theirs get no gradient
    key_bias_scale = max(float(p.grad.abs().max()) for p in tmodel.parameters())
    for name, p in tmodel.named_parameters():
        if name.endswith("in_proj_bias"):
            C = cfg.d_model
            assert float(p.grad[C : 2 * C].abs().max()) <= tol * key_bias_scale, name
