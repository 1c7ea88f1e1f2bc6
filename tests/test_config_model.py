import math

import numpy as np
import pytest

from npgpt import GPT, GPTConfig
from npgpt.generate import forward_kv, new_kv_cache
from npgpt.model import param_shapes

GPT_CONFIG_124M = {"vocab_size": 50257, "context_length": 1024, "emb_dim": 768, "n_heads": 12,
                   "n_layers": 12, "drop_rate": 0.1, "qkv_bias": False}  # fmt: skip


def count(config):
    return sum(math.prod(s) for s in param_shapes(config).values())


def test_lecture_dict_works_and_counts_match_the_lecture():
    cfg = GPTConfig(**GPT_CONFIG_124M)
    assert cfg.tie_weights and cfg.ln_eps == 1e-5
    assert count(cfg.replace(tie_weights=False)) == 163_009_536  # the lecture's "total parameters"
    assert count(cfg) == 163_009_536 - 50257 * 768  # 124,412,160 with the head tied to wte


def test_gpt2_presets_match_the_released_models():
    # Hugging Face parameter counts of gpt2, gpt2-medium, gpt2-large, gpt2-xl (tied head, q|k|v bias)
    expected = {"gpt2": 124_439_808, "gpt2-medium": 354_823_168, "gpt2-large": 774_030_080, "gpt2-xl": 1_557_611_200}
    for name, n in expected.items():
        assert count(GPTConfig.from_preset(name)) == n, name


def test_hugging_face_names_and_layouts():
    shapes = param_shapes(GPTConfig.from_preset("gpt2"))
    assert shapes["wte.weight"] == (50257, 768) and shapes["wpe.weight"] == (1024, 768)
    assert shapes["h.0.attn.c_attn.weight"] == (768, 2304)  # (C, 3C): Conv1D layout, no transpose
    assert shapes["h.11.mlp.c_fc.weight"] == (768, 3072) and shapes["h.11.mlp.c_proj.weight"] == (3072, 768)
    assert list(shapes)[-2:] == ["ln_f.weight", "ln_f.bias"]
    assert "lm_head.weight" not in shapes


@pytest.mark.parametrize("bad, message", [
    (dict(emb_dim=100, n_heads=12), "not divisible by n_heads"),
    (dict(n_heads=0), "n_heads must be at least 1"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(drop_rate=1.0), r"drop_rate must be in \[0, 1\)"),
    (dict(context_length=12.5), "must be an int"),
    (dict(qkv_bias="yes"), "True or False"),
    (dict(ln_eps=0), "ln_eps"),
    (dict(n_layers=-1), "n_layers"),
])  # fmt: skip
def test_invalid_configs_name_the_fix(bad, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(**{**GPT_CONFIG_124M, **bad})


def test_unknown_preset_and_keys():
    with pytest.raises(ValueError, match="choose one of"):
        GPTConfig.from_preset("gpt3")
    with pytest.raises(ValueError, match="unknown GPTConfig keys"):
        GPTConfig.from_dict({**GPT_CONFIG_124M, "n_embd": 768})


def small(**kw):
    return GPTConfig(**{**dict(vocab_size=101, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.1), **kw})


def test_initialisation_follows_gpt2():
    cfg = GPTConfig(vocab_size=2000, context_length=256, emb_dim=256, n_heads=4, n_layers=8, qkv_bias=True)
    p = GPT(cfg, seed=0).params
    assert abs(p["wte.weight"].std() - 0.02) < 0.001
    assert abs(p["h.3.mlp.c_fc.weight"].std() - 0.02) < 0.001
    resid = 0.02 / math.sqrt(2 * 8)
    for k in ("h.3.attn.c_proj.weight", "h.3.mlp.c_proj.weight"):
        assert abs(p[k].std() - resid) < 0.05 * resid
    assert np.all(p["h.0.attn.c_attn.bias"] == 0) and np.all(p["ln_f.bias"] == 0)
    assert np.all(p["h.0.ln_1.weight"] == 1) and np.all(p["ln_f.weight"] == 1)
    assert all(v.dtype == np.float32 for v in p.values())


def test_same_seed_same_weights_different_seed_different():
    a, b, c = GPT(small(), seed=1), GPT(small(), seed=1), GPT(small(), seed=2)
    assert all(np.array_equal(a.params[k], b.params[k]) for k in a.params)
    assert not np.array_equal(a.params["wte.weight"], c.params["wte.weight"])


def test_forward_shapes_and_tied_head(rng):
    m = GPT(small(), seed=0)
    idx = rng.integers(0, 101, size=(2, 7))
    logits, loss, cache = m.forward(idx)
    assert logits.shape == (2, 7, 101) and loss is None
    # logits are the final LayerNorm output times wte^T
    x = cache.head.x
    np.testing.assert_allclose(logits, x @ m.params["wte.weight"].T, rtol=1e-5, atol=1e-6)
    _, loss, _ = m.forward(idx, rng.integers(0, 101, size=(2, 7)))
    assert loss.shape == () and abs(float(loss) - math.log(101)) < 0.5  # near uniform at init


def test_backward_returns_every_key_with_its_shape(rng):
    for cfg in (small(), small(tie_weights=False, qkv_bias=True)):
        m = GPT(cfg, seed=0)
        _, _, cache = m.forward(rng.integers(0, 101, (2, 5)), rng.integers(0, 101, (2, 5)), training=True)
        grads = m.backward(cache)
        assert list(grads) == list(m.params)
        assert all(grads[k].shape == m.params[k].shape and grads[k].dtype == np.float32 for k in grads)


def test_dropout_is_seeded_and_only_in_training(rng):
    m = GPT(small(drop_rate=0.3), seed=0)
    idx, tgt = rng.integers(0, 101, (2, 8)), rng.integers(0, 101, (2, 8))
    l1 = float(m.forward(idx, tgt, training=True, rng=np.random.default_rng(5))[1])
    l2 = float(m.forward(idx, tgt, training=True, rng=np.random.default_rng(5))[1])
    l3 = float(m.forward(idx, tgt, training=True, rng=np.random.default_rng(6))[1])
    e1 = float(m.forward(idx, tgt, training=False)[1])
    e2 = float(m.forward(idx, tgt, training=False, rng=np.random.default_rng(7))[1])
    assert l1 == l2 and l1 != l3 and e1 == e2 and e1 != l1


def test_too_long_or_malformed_input_is_a_clear_error():
    m = GPT(small(), seed=0)
    with pytest.raises(ValueError, match="context_length is 16"):
        m.forward(np.zeros((1, 17), dtype=np.int64))
    with pytest.raises(ValueError, match=r"idx\[None\]"):
        m.forward(np.zeros(5, dtype=np.int64))
    with pytest.raises(ValueError, match="integer"):
        m.forward(np.zeros((1, 5)))
    with pytest.raises(ValueError, match="ids must lie in"):
        m.forward(np.full((1, 5), 101))


def test_params_of_the_wrong_shape_are_named():
    cfg = small()
    params = GPT(cfg).params
    params["h.1.ln_2.bias"] = np.zeros(31, dtype=np.float32)
    del params["wpe.weight"]
    with pytest.raises(ValueError, match=r"missing wpe.weight.*h.1.ln_2.bias has shape \(31,\), expected \(32,\)"):
        GPT(cfg, params=params)


def test_num_params():
    m = GPT(small(), seed=0)
    assert m.num_params() == count(small())
    assert m.num_params(exclude_embeddings=True) == count(small()) - 101 * 32 - 16 * 32


def test_backward_without_targets_needs_dlogits(rng):
    m = GPT(small(), seed=0)
    _, _, cache = m.forward(rng.integers(0, 101, (1, 4)))
    with pytest.raises(ValueError, match="dlogits"):
        m.backward(cache)
    grads = m.backward(cache, dlogits=rng.standard_normal((1, 4, 101)).astype(np.float32))
    assert grads["wte.weight"].shape == (101, 32)


# --- generation ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_kv_cache_greedy_equals_full_recompute(dtype, rng):
    m = GPT(small(drop_rate=0.0, context_length=12), seed=3, dtype=dtype)
    # scale weights up so the argmax is decisive and the text varies
    for k, v in m.params.items():
        if v.ndim == 2:
            v *= 8
    prompt = rng.integers(0, 101, size=(2, 5))
    # 20 new tokens: well past the context of 12, so the sliding window is exercised too
    fast = m.generate(prompt, 20, temperature=0.0, use_kv_cache=True)
    slow = m.generate(prompt, 20, temperature=0.0, use_kv_cache=False)
    assert fast.shape == (2, 25)
    assert np.array_equal(fast, slow)
    assert len(set(fast[0, 5:].tolist())) > 2  # not a degenerate constant sequence


def test_kv_forward_logits_equal_full_forward(rng):
    m = GPT(small(drop_rate=0.0), seed=0, dtype=np.float64)
    idx = rng.integers(0, 101, size=(2, 9))
    full = m.forward(idx)[0]
    kv = new_kv_cache(m, 2)
    step = [forward_kv(m, idx[:, :4], kv, 0, last_only=False)]
    step += [forward_kv(m, idx[:, t : t + 1], kv, t, last_only=False) for t in range(4, 9)]
    np.testing.assert_allclose(np.concatenate(step, axis=1), full, rtol=1e-12, atol=1e-12)


def test_sampling_is_seeded_and_respects_top_k(rng):
    m = GPT(small(drop_rate=0.0), seed=0)
    prompt = rng.integers(0, 101, size=(1, 3))
    a = m.generate(prompt, 10, temperature=1.0, seed=4)
    b = m.generate(prompt, 10, temperature=1.0, seed=4)
    c = m.generate(prompt, 10, temperature=1.0, seed=5)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    g = m.generate(prompt, 6, temperature=0.0)
    k1 = m.generate(prompt, 6, temperature=1.5, top_k=1, seed=9)
    assert np.array_equal(g, k1)  # top-k 1 is greedy


def test_generation_stops_at_eos():
    m = GPT(small(drop_rate=0.0), seed=0)
    prompt = np.array([[1, 2, 3]])
    greedy = m.generate(prompt, 8, temperature=0.0)
    eos = int(greedy[0, 4])  # the second generated token
    first = 3 + greedy[0, 3:].tolist().index(eos)  # where greedy decoding first produces it
    out = m.generate(prompt, 8, temperature=0.0, eos_id=eos)
    assert np.array_equal(out[0], greedy[0, : first + 1])  # same tokens, ending at the first eos
