"""The two initialisations: GPT-2's (N(0, 0.02), scaled residual projections) and PyTorch's layer defaults
(the book's GPTModel): each parameter's mean and spread against the closed form of its distribution."""

import math

import numpy as np
import pytest

from npgpt import GPT, GPTConfig
from npgpt.model import init_params, param_shapes

CFG = GPTConfig.from_preset("nano", emb_dim=96, n_heads=4, n_layers=3, vocab_size=4000, context_length=64,
                            qkv_bias=True, tie_weights=False)  # fmt: skip


def expected_pytorch(name, shape, C):
    """(kind, parameter) the book's model gets for the HF-named tensor `name` from PyTorch's defaults."""
    if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
        return "const", 1.0
    if name.endswith(("ln_1.bias", "ln_2.bias", "ln_f.bias")):
        return "const", 0.0
    if name in ("wte.weight", "wpe.weight"):
        return "normal", 1.0
    fan_in = {"lm_head.weight": C}.get(name, 4 * C if ".mlp.c_proj." in name else C)
    return "uniform", 1.0 / math.sqrt(fan_in)


def test_pytorch_init_matches_each_layers_default_distribution():
    params = init_params(CFG, seed=3, init="pytorch", dtype=np.float64)
    C = CFG.emb_dim
    for name, p in params.items():
        kind, a = expected_pytorch(name, p.shape, C)
        n = p.size
        if kind == "const":
            assert np.all(p == a), name
            continue
        std = a if kind == "normal" else a / math.sqrt(3.0)  # U(-b, b) has variance b^2 / 3
        # the sample mean's standard error is std / sqrt(n); the sample std's is about std / sqrt(2 n)
        assert abs(p.mean()) < 5 * std / math.sqrt(n), name
        assert abs(p.std() - std) < 6 * std / math.sqrt(2 * n) + 1e-12, (name, p.std(), std)
        if kind == "uniform":
            assert np.abs(p).max() <= a and np.abs(p).max() > 0.9 * a, name


def test_pytorch_init_bounds_are_pytorchs_own():
    """The bound 1/sqrt(fan_in) is what torch.nn.Linear really draws from (weights and biases)."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    C = CFG.emb_dim
    for fan_in, fan_out in [(C, 3 * C), (C, 4 * C), (4 * C, C)]:
        lin = torch.nn.Linear(fan_in, fan_out)
        ours = init_params(CFG, seed=0, init="pytorch")
        key = {3 * C: "h.0.attn.c_attn", 4 * C: "h.0.mlp.c_fc", C: "h.0.mlp.c_proj"}[fan_out]
        w, b = lin.weight.detach().numpy(), lin.bias.detach().numpy()
        bound = 1.0 / math.sqrt(fan_in)
        assert np.abs(w).max() <= bound and np.abs(b).max() <= bound
        assert abs(w.std() - ours[key + ".weight"].std()) < 0.05 * bound
        assert abs(np.abs(ours[key + ".bias"]).max() - np.abs(b).max()) < 0.2 * bound
    emb = torch.nn.Embedding(CFG.vocab_size, C)
    assert abs(emb.weight.detach().numpy().std() - 1.0) < 0.01


def test_gpt2_init_is_unchanged_by_default():
    a = GPT(CFG, seed=5).params
    b = init_params(CFG, seed=5, init="gpt2")
    assert all(np.array_equal(a[k], b[k]) for k in a)
    resid = 0.02 / math.sqrt(2 * CFG.n_layers)
    assert abs(a["h.1.mlp.c_proj.weight"].std() - resid) < 0.05 * resid
    assert abs(a["h.1.mlp.c_fc.weight"].std() - 0.02) < 0.05 * 0.02
    assert np.all(a["h.1.mlp.c_fc.bias"] == 0)


def test_pytorch_init_through_the_model_and_bad_names():
    m = GPT(CFG, seed=1, init="pytorch")
    assert set(m.params) == set(param_shapes(CFG))
    assert abs(m.params["wte.weight"].std() - 1.0) < 0.01
    with pytest.raises(ValueError, match="unknown init 'xavier'; choose one of gpt2, pytorch"):
        GPT(CFG, init="xavier")
