"""npgpt against PyTorch autograd and Hugging Face transformers, tensor by tensor.

Random GPT2LMHeadModels (dropout off) are saved with save_pretrained, loaded with npgpt.load_pretrained,
and both models see the same batches. Relative error is npgpt's tensor-wide measure,
max|a - b| / max(|a| + |b|). Skipped when torch or transformers is not installed (the test extra
installs both; the npgpt package itself never imports them).
"""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import npgpt  # noqa: E402
from npgpt.gradcheck import relative_error  # noqa: E402

torch.set_num_threads(2)

CONFIGS = {
    "4 heads, 2 layers": dict(vocab_size=101, n_positions=32, n_embd=32, n_head=4, n_layer=2),
    "3 heads, 3 layers": dict(vocab_size=77, n_positions=16, n_embd=48, n_head=3, n_layer=3),
    "1 head": dict(vocab_size=50, n_positions=24, n_embd=24, n_head=1, n_layer=1),
    "8 heads, untied": dict(vocab_size=130, n_positions=20, n_embd=64, n_head=8, n_layer=2, tie_word_embeddings=False),
}


def hf_model(cfg: dict, seed: int):
    """A random GPT-2 with non-trivial LayerNorm weights and biases (HF initialises those to 1 and 0)."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(**cfg, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(config, attn_implementation="eager") if _takes_attn_kw() else transformers.GPT2LMHeadModel(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _takes_attn_kw():
    import inspect

    return "attn_implementation" in inspect.signature(transformers.GPT2LMHeadModel.__init__).parameters


def npgpt_name(hf_name: str) -> str:
    return hf_name.removeprefix("transformer.")


@pytest.fixture(params=list(CONFIGS), ids=list(CONFIGS))
def pair(request, tmp_path):
    cfg = CONFIGS[request.param]
    hf = hf_model(cfg, seed=len(request.param))
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    return cfg, hf, tmp_path / "hf"


def batch(cfg, seed, B=3):
    rng = np.random.default_rng(seed)
    T = cfg["n_positions"] - 3
    return rng.integers(0, cfg["vocab_size"], size=(B, T)), rng.integers(0, cfg["vocab_size"], size=(B, T))


def torch_loss(hf, idx, targets):
    logits = hf(torch.as_tensor(idx)).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.as_tensor(targets).reshape(-1))
    return logits, loss


def test_logits_and_loss_float32(pair):
    cfg, hf, path = pair
    model = npgpt.load_pretrained(path, device="cpu")
    idx, tgt = batch(cfg, 0)
    with torch.no_grad():
        t_logits, t_loss = torch_loss(hf, idx, tgt)
    logits, loss, _ = model.forward(idx, tgt)
    assert relative_error(logits, t_logits.numpy()) < 1e-6  # measured: about 1.5e-7
    assert abs(float(loss) - t_loss.item()) / t_loss.item() < 1e-5


@pytest.mark.parametrize("dtype, tol", [(np.float32, 1e-5), (np.float64, 1e-12)])  # measured: 3e-7 and 5e-16
def test_every_parameter_gradient(pair, dtype, tol):
    cfg, hf, path = pair
    if dtype == np.float64:
        hf = hf.double()
    model = npgpt.load_pretrained(path, device="cpu", dtype=dtype)
    idx, tgt = batch(cfg, 1)
    hf.zero_grad()
    _, t_loss = torch_loss(hf, idx, tgt)
    t_loss.backward()
    _, loss, cache = model.forward(idx, tgt)
    grads = model.backward(cache)
    checked = set()
    for name, p in hf.named_parameters():
        key = npgpt_name(name)
        err = relative_error(grads[key], p.grad.numpy())
        assert err < tol, f"{key}: relative error {err:.2e}"
        checked.add(key)
    assert checked == set(model.params)  # every npgpt parameter has a torch twin (tied head counted once)


def test_adamw_steps_follow_torch(pair):
    cfg, hf, path = pair
    model = npgpt.load_pretrained(path, device="cpu")
    lr, betas, eps, wd = 3e-3, (0.9, 0.95), 1e-8, 0.1
    opt = npgpt.AdamW(model.params, lr=lr, betas=betas, eps=eps, weight_decay=wd)
    params = dict(hf.named_parameters())
    groups = [
        {"params": [p for p in params.values() if p.dim() >= 2], "weight_decay": wd},
        {"params": [p for p in params.values() if p.dim() < 2], "weight_decay": 0.0},
    ]
    t_opt = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)
    ours, theirs = [], []
    for step in range(10):
        idx, tgt = batch(cfg, 100)  # one batch, so the loss must fall
        t_opt.zero_grad()
        _, t_loss = torch_loss(hf, idx, tgt)
        t_loss.backward()
        t_opt.step()
        theirs.append(t_loss.item())
        _, loss, cache = model.forward(idx, tgt)
        opt.step(model.backward(cache))
        ours.append(float(loss))
    assert theirs[-1] < theirs[0]  # training moved
    for a, b in zip(ours, theirs):
        assert abs(a - b) / abs(b) < 1e-5, (ours, theirs)


def test_npgpt_checkpoint_loads_into_transformers_without_warnings(tmp_path):
    for cfg in (npgpt.GPTConfig(vocab_size=101, context_length=16, emb_dim=32, n_heads=4, n_layers=2, qkv_bias=False),
                npgpt.GPTConfig(vocab_size=90, context_length=16, emb_dim=24, n_heads=2, n_layers=1, tie_weights=False)):  # fmt: skip
        model = npgpt.GPT(cfg, seed=5)
        out = tmp_path / f"out{cfg.vocab_size}"
        model.save_pretrained(out)
        hf, info = transformers.GPT2LMHeadModel.from_pretrained(out, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
        idx = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(2, 9))
        with torch.no_grad():
            t_logits = hf.eval()(torch.as_tensor(idx)).logits.numpy()
        assert relative_error(model.forward(idx)[0], t_logits) < 1e-5


def test_trained_checkpoint_gives_the_same_logits_in_transformers(tmp_path):
    from npgpt.checkpoint import latest_checkpoint
    from npgpt.train import TrainConfig, train

    train(TrainConfig(preset="nano", emb_dim=32, n_heads=2, n_layers=1, context_length=32, max_steps=3,
                      out_dir=str(tmp_path / "run"), progress=False, sample_tokens=2))  # fmt: skip
    ck = latest_checkpoint(tmp_path / "run")
    hf, info = transformers.GPT2LMHeadModel.from_pretrained(ck, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    model = npgpt.load_pretrained(ck)
    idx = np.random.default_rng(1).integers(0, 50257, size=(1, 20))
    with torch.no_grad():
        t_logits = hf.eval()(torch.as_tensor(idx)).logits.numpy()
    assert relative_error(model.forward(idx)[0], t_logits) < 1e-5
    assert json.loads((ck / "config.json").read_text())["model_type"] == "gpt2"
