"""Loading and saving Hugging Face GPT-2 checkpoints, without torch or any download."""

import json
import math

import numpy as np
import pytest
from safetensors.numpy import save_file

import npgpt
from npgpt import GPT, GPTConfig
from npgpt.backend import to_numpy
from npgpt.model import param_shapes

# The config.json files of the four released GPT-2 checkpoints (the fields that matter).
HF_CONFIGS = {
    "gpt2": dict(n_embd=768, n_head=12, n_layer=12),
    "gpt2-medium": dict(n_embd=1024, n_head=16, n_layer=24),
    "gpt2-large": dict(n_embd=1280, n_head=20, n_layer=36),
    "gpt2-xl": dict(n_embd=1600, n_head=25, n_layer=48),
}
HF_COMMON = dict(model_type="gpt2", activation_function="gelu_new", vocab_size=50257, n_positions=1024, n_ctx=1024,
                 layer_norm_epsilon=1e-5, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1, architectures=["GPT2LMHeadModel"])  # fmt: skip
HF_COUNTS = {"gpt2": 124_439_808, "gpt2-medium": 354_823_168, "gpt2-large": 774_030_080, "gpt2-xl": 1_557_611_200}


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_hf_config_maps_onto_the_preset(name):
    cfg = GPTConfig.from_hf_config({**HF_COMMON, **HF_CONFIGS[name]})
    assert cfg == GPTConfig.from_preset(name)
    assert sum(math.prod(s) for s in param_shapes(cfg).values()) == HF_COUNTS[name]


@pytest.mark.parametrize("bad, message", [
    (dict(activation_function="relu"), "gelu_new"),
    (dict(model_type="llama"), "GPT-2"),
    (dict(n_inner=1000), "n_inner"),
    (dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
])  # fmt: skip
def test_unsupported_hf_configs_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig.from_hf_config({**HF_COMMON, **HF_CONFIGS["gpt2"], **bad})


TINY_HF = dict(HF_COMMON, vocab_size=99, n_positions=16, n_ctx=16, n_embd=16, n_head=2, n_layer=2)


def write_hf_dir(path, params, config=TINY_HF, prefix="transformer.", buffers=True, lm_head=True, drop=()):
    """A directory shaped like a real Hugging Face GPT-2 download."""
    path.mkdir(parents=True, exist_ok=True)
    tensors = {prefix + k: np.ascontiguousarray(v) for k, v in params.items() if k not in drop}
    if buffers:
        T = config["n_positions"]
        for i in range(config["n_layer"]):
            tensors[f"{prefix}h.{i}.attn.bias"] = np.tril(np.ones((1, 1, T, T), dtype=np.float32))
            tensors[f"{prefix}h.{i}.attn.masked_bias"] = np.array(-1e4, dtype=np.float32)
    if lm_head:
        tensors["lm_head.weight"] = np.ascontiguousarray(params["wte.weight"])
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config))
    return path


def random_tiny(seed=0):
    cfg = GPTConfig.from_hf_config(TINY_HF)
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in param_shapes(cfg).items()}


@pytest.mark.parametrize("prefix, buffers, lm_head", [("transformer.", True, True), ("", False, False), ("", True, False)])
def test_loads_hf_layouts(tmp_path, prefix, buffers, lm_head):
    params = random_tiny()
    model = npgpt.load_pretrained(write_hf_dir(tmp_path / "m", params, prefix=prefix, buffers=buffers, lm_head=lm_head))
    assert model.config.qkv_bias and model.config.tie_weights and model.config.emb_dim == 16
    assert list(model.params) == list(params)
    for k in params:
        assert np.array_equal(model.params[k], params[k])


def test_load_on_every_backend_and_dtype(tmp_path, xp):
    params = random_tiny()
    d = write_hf_dir(tmp_path / "m", params)
    device = "cpu" if xp is np else "cuda"
    m = npgpt.load_pretrained(d, device=device, dtype=np.float64)
    assert m.device == device and m.dtype == np.float64
    np.testing.assert_array_equal(to_numpy(m.params["h.1.mlp.c_fc.weight"]), params["h.1.mlp.c_fc.weight"])


def test_mis_shaped_tensor_names_both_shapes(tmp_path):
    params = random_tiny()
    params["h.1.attn.c_proj.weight"] = np.zeros((16, 17), dtype=np.float32)
    with pytest.raises(ValueError, match=r"h.1.attn.c_proj.weight has shape \(16, 17\), expected \(16, 16\)"):
        npgpt.load_pretrained(write_hf_dir(tmp_path / "m", params))


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    params = random_tiny()
    params["h.0.attn.rotary"] = np.zeros(3, dtype=np.float32)
    d = write_hf_dir(tmp_path / "m", params, drop=("ln_f.bias",))
    with pytest.raises(ValueError, match=r"missing tensor ln_f.bias \(expected shape \(16,\)\).*unexpected tensor h.0.attn.rotary"):
        npgpt.load_pretrained(d)


def test_untied_head_that_differs_from_wte_needs_untied_config(tmp_path):
    params = random_tiny()
    d = write_hf_dir(tmp_path / "m", params, lm_head=False)
    from safetensors.numpy import load_file

    tensors = load_file(str(d / "model.safetensors"))
    tensors["lm_head.weight"] = params["wte.weight"] + 1
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(ValueError, match="lm_head.weight differs from wte.weight"):
        npgpt.load_pretrained(d)
    (d / "config.json").write_text(json.dumps({**TINY_HF, "tie_word_embeddings": False}))
    m = npgpt.load_pretrained(d)
    assert not m.config.tie_weights and np.array_equal(m.params["lm_head.weight"], params["wte.weight"] + 1)


def test_pickle_only_directory_is_refused(tmp_path):
    d = tmp_path / "old"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(TINY_HF))
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(ValueError, match="never loads pickle"):
        npgpt.load_pretrained(d)


def test_bare_safetensors_file_with_config(tmp_path):
    params = random_tiny()
    save_file(params, str(tmp_path / "w.safetensors"))
    with pytest.raises(ValueError, match="pass config="):
        npgpt.load_pretrained(tmp_path / "w.safetensors")
    m = npgpt.load_pretrained(tmp_path / "w.safetensors", config=TINY_HF)
    assert np.array_equal(m.params["wpe.weight"], params["wpe.weight"])


def test_sharded_checkpoint(tmp_path):
    params = random_tiny()
    d = tmp_path / "sharded"
    d.mkdir()
    keys = list(params)
    shards = {"model-00001-of-00002.safetensors": keys[:10], "model-00002-of-00002.safetensors": keys[10:]}
    for name, ks in shards.items():
        save_file({k: params[k] for k in ks}, str(d / name))
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: n for n, ks in shards.items() for k in ks}}))
    (d / "config.json").write_text(json.dumps(TINY_HF))
    m = npgpt.load_pretrained(d)
    assert all(np.array_equal(m.params[k], params[k]) for k in params)


@pytest.mark.parametrize("qkv_bias, tie", [(True, True), (False, True), (True, False)])
def test_save_pretrained_round_trip(tmp_path, qkv_bias, tie):
    cfg = GPTConfig(vocab_size=99, context_length=16, emb_dim=16, n_heads=2, n_layers=2, qkv_bias=qkv_bias, tie_weights=tie)
    m = GPT(cfg, seed=3)
    m.save_pretrained(tmp_path / "out")
    back = npgpt.load_pretrained(tmp_path / "out")
    assert back.config == cfg
    assert all(np.array_equal(back.params[k], m.params[k]) for k in m.params)
    # the same directory read as a plain Hugging Face checkpoint (without npgpt's own config block)
    hf = json.loads((tmp_path / "out" / "config.json").read_text())
    assert hf["n_embd"] == 16 and hf["activation_function"] == "gelu_new" and hf["tie_word_embeddings"] == tie
    del hf["npgpt"]
    (tmp_path / "out" / "config.json").write_text(json.dumps(hf))
    as_hf = npgpt.load_pretrained(tmp_path / "out")
    assert as_hf.config.qkv_bias  # Hugging Face GPT-2 always has the q|k|v bias; it is zero here if qkv_bias was off
    idx = np.random.default_rng(0).integers(0, 99, size=(2, 7))
    np.testing.assert_array_equal(as_hf.forward(idx)[0], m.forward(idx)[0])
