"""The encoder-decoder layers and model: forward values against independent expectations, every
gradient against float64 finite differences, and padding shown to contribute nothing to any gradient."""

import math

import numpy as np
import pytest

from npgpt import layers as L
from npgpt.gradcheck_suite import seq2seq_layer_checks
from npgpt.seq2seq import Seq2Seq
from npgpt.seq2seq.check import padded_batch, random_params, seq2seq_model_check, seq2seq_model_checks, tiny_config

LAYER_CHECKS = seq2seq_layer_checks()
MODEL_CHECKS = seq2seq_model_checks()


def close(a, b, tol=1e-12):
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


# --- finite differences -------------------------------------------------------------------------------


@pytest.mark.parametrize("check", LAYER_CHECKS, ids=[c.layer for c in LAYER_CHECKS])
def test_layer_gradient(check):
    results = check.run(seed=0)
    assert results, "no tensor was checked"
    for r in results:
        assert r.n_checked > 0
        assert r.max_rel_error < 1e-7, r.describe()  # measured: at most 4e-10


@pytest.mark.parametrize("check", MODEL_CHECKS, ids=[c.layer for c in MODEL_CHECKS])
def test_model_gradient(check):
    results = check.run(seed=0)
    names = {r.input for r in results}
    assert any("encoder.layers.0.self_attn.q_proj.weight" in n for n in names)
    assert any("decoder.layers.1.cross_attn.v_proj.weight" in n for n in names)
    for r in results:
        assert r.max_rel_error < 1e-6, r.describe()  # measured: at most 1e-8


def test_checks_cover_every_new_layer():
    layers = {c.layer.split()[0] for c in LAYER_CHECKS}
    assert layers == {"relu", "feedforward", "sinusoidal", "masked_attention", "multihead_attention",
                      "encoder_block", "decoder_block"}  # fmt: skip
    labels = " ".join(c.layer for c in LAYER_CHECKS)
    for needed in ("padded causal", "Tq3 Tk6", "post-norm relu", "pre-norm relu", "post-norm gelu", "pre-norm gelu", "dropout"):
        assert needed in labels


def test_memory_gradient_must_sum_over_decoder_layers(monkeypatch):
    """A backward that keeps only the last decoder layer's dmemory fails the model check on the encoder."""
    real = L.decoder_block_backward
    calls = []

    def only_last_layer(dout, cache):
        dx, dmem, g = real(dout, cache)
        calls.append(1)
        return dx, (dmem if len(calls) % 2 == 1 else 0.0 * dmem), g  # backward visits layer 1, then layer 0

    monkeypatch.setattr(L, "decoder_block_backward", only_last_layer)
    results = seq2seq_model_check("only the last layer's dmemory", tiny_config(), max_coords=2).run(seed=0)
    encoder = [r for r in results if "encoder." in r.input or r.input.endswith("[embed.weight]")]
    decoder = [r for r in results if "decoder.layers.1" in r.input]
    assert encoder and all(r.passed for r in decoder)
    assert not any(r.passed for r in encoder if "encoder.layers" in r.input)


# --- forward values -------------------------------------------------------------------------------------


def test_relu_values_and_slope():
    x = np.array([[-2.0, -0.5, 0.0, 0.5, 3.0]])
    out, cache = L.relu_forward(x)
    close(out, [[0, 0, 0, 0.5, 3.0]])
    dout = np.array([[1.0, 2.0, 3.0, 4.0, 5.0]])
    close(L.relu_backward(dout, cache), [[0, 0, 0, 4.0, 5.0]])  # slope 0 at 0, as in PyTorch


def test_sinusoidal_table_closed_form_and_rotation():
    C, T = 8, 50
    pe = L.sinusoidal_table(T, C)
    for pos in (0, 1, 7, 49):
        for i in range(C // 2):
            close(pe[pos, 2 * i], math.sin(pos / 10000 ** (2 * i / C)))
            close(pe[pos, 2 * i + 1], math.cos(pos / 10000 ** (2 * i / C)))
    close(np.linalg.norm(pe, axis=1), np.full(T, math.sqrt(C / 2)))
    # shifting by k positions is one fixed rotation of each (sin, cos) pair, whatever the position
    k = 5
    for i in range(C // 2):
        w = 1 / 10000 ** (2 * i / C)
        R = np.array([[math.cos(k * w), math.sin(k * w)], [-math.sin(k * w), math.cos(k * w)]])
        close(pe[k:, 2 * i : 2 * i + 2], pe[:-k, 2 * i : 2 * i + 2] @ R.T, tol=1e-10)
    x = np.random.default_rng(0).standard_normal((2, 4, C))
    out, _ = L.sinusoidal_forward(x, start=3)
    close(out, x + pe[3:7])
    with pytest.raises(ValueError, match="even number of channels"):
        L.sinusoidal_table(4, 7)


def reference_attention(q, k, v, n_head, pad=None, causal=False):
    """Attention written one query at a time, straight from the definition."""
    B, Tq, C = q.shape
    Tk, hs = k.shape[1], C // n_head
    y = np.zeros_like(q)
    for b in range(B):
        for h in range(n_head):
            cols = slice(h * hs, (h + 1) * hs)
            for t in range(Tq):
                allowed = [s for s in range(Tk) if not (pad is not None and pad[b, s]) and not (causal and s > t)]
                scores = np.array([q[b, t, cols] @ k[b, s, cols] / math.sqrt(hs) for s in allowed])
                w = np.exp(scores - scores.max())
                w /= w.sum()
                y[b, t, cols] = sum(wi * v[b, s, cols] for wi, s in zip(w, allowed))
    return y


@pytest.mark.parametrize("Tq, Tk, causal", [(4, 4, True), (3, 6, False), (5, 5, False)])
def test_masked_attention_matches_the_definition(Tq, Tk, causal):
    rng = np.random.default_rng(3)
    q, k, v = rng.standard_normal((3, Tq, 8)), rng.standard_normal((3, Tk, 8)), rng.standard_normal((3, Tk, 8))
    pad = np.arange(Tk)[None, :] >= np.array([Tk, 2, 1])[:, None]
    y, _ = L.masked_attention_forward(q, k, v, 2, key_padding_mask=pad, causal=causal)
    close(y, reference_attention(q, k, v, 2, pad, causal))


def test_padded_keys_get_exactly_zero_gradient_and_change_nothing():
    rng = np.random.default_rng(4)
    q, k, v = rng.standard_normal((2, 3, 8)), rng.standard_normal((2, 5, 8)), rng.standard_normal((2, 5, 8))
    pad = np.array([[False, False, False, True, True], [False, False, True, True, True]])
    y, cache = L.masked_attention_forward(q, k, v, 2, key_padding_mask=pad)
    dq, dk, dv = L.masked_attention_backward(rng.standard_normal(y.shape), cache)
    assert np.all(dk[pad] == 0) and np.all(dv[pad] == 0)  # exactly, not approximately
    assert np.all(dk[~pad] != 0) and np.all(dv[~pad] != 0)
    k2, v2 = k.copy(), v.copy()
    k2[pad], v2[pad] = 1e3, -1e3  # whatever sits at a padded key is never read
    y2, _ = L.masked_attention_forward(q, k2, v2, 2, key_padding_mask=pad)
    close(y2, y, tol=0)


def test_a_query_with_every_key_masked_is_an_error():
    x = np.zeros((2, 3, 4))
    with pytest.raises(ValueError, match="every key masked"):
        L.masked_attention_forward(x, x, x, 1, key_padding_mask=np.array([[False] * 3, [True] * 3]))
    with pytest.raises(ValueError, match="boolean"):
        L.masked_attention_forward(x, x, x, 1, key_padding_mask=np.zeros((2, 3), dtype=int))


def test_a_key_bias_could_not_change_attention():
    """Why k_proj has no bias: adding one shifts each query's row of scores by a constant."""
    rng = np.random.default_rng(5)
    q, k, v = rng.standard_normal((2, 3, 8)), rng.standard_normal((2, 4, 8)), rng.standard_normal((2, 4, 8))
    y, _ = L.masked_attention_forward(q, k, v, 2)
    y_biased, _ = L.masked_attention_forward(q, k + rng.standard_normal(8), v, 2)
    close(y_biased, y, tol=1e-12)


@pytest.mark.parametrize("norm_first", [False, True])
def test_decoder_step_with_kv_cache_equals_the_full_forward(norm_first):
    rng = np.random.default_rng(6)
    p = random_params(tiny_config(norm="pre" if norm_first else "post"), rng)
    bp = {k[len("decoder.layers.0.") :]: v for k, v in p.items() if k.startswith("decoder.layers.0.")}
    x, memory = rng.standard_normal((3, 5, 8)), rng.standard_normal((3, 4, 8))
    src_pad = np.array([[False] * 4, [False, False, True, True], [False, True, True, True]])
    full, _ = L.decoder_block_forward(x, memory, bp, 2, memory_padding_mask=src_pad, norm_first=norm_first)
    self_kv = (np.zeros((3, 5, 8)), np.zeros((3, 5, 8)))
    mem_kv = L.cross_attention_kv(memory, bp)
    for pos in range(5):
        step = L.decoder_block_step(x[:, pos : pos + 1], bp, 2, self_kv, pos, mem_kv, memory_padding_mask=src_pad,
                                    norm_first=norm_first)  # fmt: skip
        close(step[:, 0], full[:, pos])


# --- padding contributes nothing to any gradient --------------------------------------------------------


@pytest.mark.parametrize("overrides", [{}, {"norm": "pre", "pos_encoding": "learned", "tie_embeddings": "none"}],
                         ids=["post-norm tied", "pre-norm learned untied"])  # fmt: skip
def test_padded_batch_gradients_equal_the_sum_over_unpadded_sentences(overrides):
    """Loss and every gradient of a padded batch equal those of its sentences run one by one, unpadded
    (weighted by their share of the target tokens): the padding adds nothing anywhere."""
    cfg = tiny_config(**overrides)
    rng = np.random.default_rng(7)
    model = Seq2Seq(cfg, params=random_params(cfg, rng))
    src, tgt_in, targets = padded_batch(cfg, rng, B=4, S=6, T=5)
    assert (src == cfg.pad_id).sum() > 2 and (tgt_in == cfg.pad_id).sum() > 2
    _, loss, cache = model.forward(src, tgt_in, targets)
    grads = model.backward(cache)
    n_total = int((targets != cfg.pad_id).sum())
    summed, loss_sum = {k: np.zeros_like(v) for k, v in grads.items()}, 0.0
    for b in range(src.shape[0]):
        s = src[b : b + 1, : int((src[b] != cfg.pad_id).sum())]
        n = int((targets[b] != cfg.pad_id).sum())
        _, loss_b, cache_b = model.forward(s, tgt_in[b : b + 1, :n], targets[b : b + 1, :n])
        loss_sum += float(loss_b) * n / n_total
        for k, g in model.backward(cache_b, dloss=n / n_total).items():
            summed[k] += g
    close(float(loss), loss_sum)
    for k in grads:
        close(grads[k], summed[k], tol=1e-11)
