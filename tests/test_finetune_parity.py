"""The classifier and the masked LM loss against transformers and PyTorch autograd, tensor by tensor.

Random GPT2ForSequenceClassification models (dropout off, pad_token_id set) are saved with
save_pretrained, loaded with npgpt.finetune.load_classifier, and both see the same right-padded batches.
Relative error is npgpt's tensor-wide max|a - b| / max(|a| + |b|). Skipped without torch/transformers.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import npgpt  # noqa: E402
from npgpt.finetune import load_classifier  # noqa: E402
from npgpt.finetune.classifier import SCORE  # noqa: E402
from npgpt.gradcheck import relative_error  # noqa: E402

torch.set_num_threads(2)
PAD = 0  # any id works; 0 makes sure the rule does not depend on the pad being the last id

CONFIGS = {
    "4 heads, 2 layers, 3 labels": dict(vocab_size=61, n_positions=16, n_embd=32, n_head=4, n_layer=2, num_labels=3),
    "2 heads, 3 layers, 2 labels, untied": dict(vocab_size=45, n_positions=12, n_embd=24, n_head=2, n_layer=3,
                                                num_labels=2, tie_word_embeddings=False),
}  # fmt: skip


def hf_config(**kw):
    """Dropout off, eager attention, no out-of-vocabulary bos/eos ids (the default 50256 is not in these vocabularies)."""
    return transformers.GPT2Config(**kw, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager",
                                   bos_token_id=None, eos_token_id=None)  # fmt: skip


def hf_classifier(cfg: dict, seed: int, dtype):
    torch.manual_seed(seed)
    model = transformers.GPT2ForSequenceClassification(hf_config(**cfg, pad_token_id=PAD))
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.add_(0.1 * torch.randn_like(p) if p.dim() == 1 else 0.05 * torch.randn_like(p))
    return model.to(dtype).eval()


def padded_batch(cfg, seed, B=5):
    """Right-padded rows of different lengths (one full row, one of a single token); no real token is PAD."""
    rng = np.random.default_rng(seed)
    T = cfg["n_positions"]
    idx = rng.integers(1, cfg["vocab_size"], size=(B, T))
    for b, n in enumerate([T, 1] + list(rng.integers(2, T, size=B - 2))):
        idx[b, n:] = PAD
    return idx, rng.integers(0, cfg["num_labels"], size=B)


@pytest.fixture(params=list(CONFIGS), ids=list(CONFIGS))
def cfg(request):
    return CONFIGS[request.param]


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-10), (np.float32, 1e-5)], ids=["float64", "float32"])
def test_logits_loss_and_every_gradient(cfg, dtype, tol, tmp_path):
    hf = hf_classifier(cfg, seed=cfg["n_layer"], dtype=torch.float64 if dtype == np.float64 else torch.float32)
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    clf = load_classifier(tmp_path / "hf", device="cpu", dtype=dtype)
    assert clf.pad_token_id == PAD and len(clf.labels) == cfg["num_labels"]
    idx, labels = padded_batch(cfg, seed=7)
    out = hf(torch.as_tensor(idx), attention_mask=torch.as_tensor(idx != PAD), labels=torch.as_tensor(labels))
    out.loss.backward()
    logits, loss, cache = clf.forward(idx, labels, lm_weight=0.0)
    grads = clf.backward(cache)
    assert relative_error(logits, out.logits.detach().numpy()) < tol
    assert abs(float(loss) - out.loss.item()) / out.loss.item() < tol
    hf_grads = {n.removeprefix("transformer."): p.grad.numpy() for n, p in hf.named_parameters()}
    assert set(hf_grads) == set(grads) - {"lm_head.weight"}
    for name, g in hf_grads.items():
        assert relative_error(grads[name], g) < tol, name  # measured: float64 ~1e-15, float32 ~5e-7


def test_npgpt_classifier_loads_in_transformers(tmp_path):
    cfg = CONFIGS["4 heads, 2 layers, 3 labels"]
    config = npgpt.GPTConfig(vocab_size=cfg["vocab_size"], context_length=16, emb_dim=32, n_heads=4, n_layers=2,
                             qkv_bias=False, tie_weights=False)  # fmt: skip
    clf = npgpt.finetune.Classifier.new(npgpt.GPT(config, seed=3), ["cat", "dog", "eel"], seed=3, pad_token_id=PAD)
    clf.save(tmp_path / "clf")
    hf, info = transformers.GPT2ForSequenceClassification.from_pretrained(tmp_path / "clf", output_loading_info=True)
    assert not info["missing_keys"] and info["unexpected_keys"] <= {"lm_head.weight"}
    assert hf.config.id2label == {0: "cat", 1: "dog", 2: "eel"} and hf.config.pad_token_id == PAD
    np.testing.assert_array_equal(hf.score.weight.detach().numpy(), clf.score)
    idx, _ = padded_batch(cfg, seed=2)
    with torch.no_grad():
        t_logits = hf.eval()(torch.as_tensor(idx)).logits.numpy()
    assert relative_error(clf.forward(idx)[0], t_logits) < 1e-6
    again = load_classifier(tmp_path / "clf")
    assert again.labels == clf.labels and np.array_equal(again.score, clf.score)
    assert all(np.array_equal(again.model.params[k], v) for k, v in clf.model.params.items())
    assert SCORE not in again.model.params


def test_masked_lm_loss_and_gradients_match_torch_ignore_index(tmp_path):
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(hf_config(vocab_size=53, n_positions=12, n_embd=16, n_head=2, n_layer=2)).double().eval()
    hf.save_pretrained(tmp_path / "lm", safe_serialization=True)
    model = npgpt.load_pretrained(tmp_path / "lm", device="cpu", dtype=np.float64)
    rng = np.random.default_rng(4)
    idx = rng.integers(0, 53, size=(3, 12))
    targets = rng.integers(0, 53, size=(3, 12))
    targets[0, :7] = -100  # a masked prompt
    targets[1, 9:] = -100  # padding
    targets[2, ::2] = -100
    logits = hf(torch.as_tensor(idx)).logits
    t_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 53), torch.as_tensor(targets).reshape(-1), ignore_index=-100)
    t_loss.backward()
    _, loss, cache = model.forward(idx, targets)
    grads = model.backward(cache)
    assert abs(float(loss) - t_loss.item()) < 1e-12
    for n, p in hf.named_parameters():
        name = n.removeprefix("transformer.")
        if name == "lm_head.weight":
            continue  # tied: its gradient is inside wte.weight's
        assert relative_error(grads[name], p.grad.numpy()) < 1e-10, name
