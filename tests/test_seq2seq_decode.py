"""Decoding: the KV-cache step against the full forward, greedy against a decoder that recomputes
everything, beam search against exhaustive search, batching against one sentence at a time."""

import itertools

import numpy as np
import pytest

from npgpt.seq2seq import Seq2Seq
from npgpt.seq2seq.check import padded_batch, random_params, tiny_config
from npgpt.seq2seq.decode import beam_search, greedy_decode, length_penalty
from npgpt.seq2seq.vocab import BOS_ID, EOS_ID, PAD_ID

CONFIGS = {
    "post-norm sinusoidal tied": {},
    "pre-norm learned untied gelu": {"norm": "pre", "pos_encoding": "learned", "tie_embeddings": "none", "activation": "gelu"},
}


def random_model(seed=0, **overrides):
    cfg = tiny_config(**overrides)
    return Seq2Seq(cfg, params=random_params(cfg, np.random.default_rng(seed)))


def log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_kv_cache_steps_give_the_forward_logits(name):
    model = random_model(**CONFIGS[name])
    rng = np.random.default_rng(1)
    src, _, _ = padded_batch(model.config, rng, B=3, S=6, T=2)
    tgt_in = np.concatenate([np.full((3, 1), BOS_ID), rng.integers(3, 13, size=(3, 6))], axis=1)  # (3, 7)
    logits, _, _ = model.forward(src, tgt_in)
    state = model.start_decoding(src, 7)
    for pos in range(7):
        step = model.decode_step(state, tgt_in[:, pos], pos)
        np.testing.assert_allclose(step, logits[:, pos], rtol=1e-12, atol=1e-12)


def naive_greedy(model, src_row, max_steps):
    """Greedy decoding that re-runs the whole model on the prefix at every step (no caches)."""
    out = [BOS_ID]
    for _ in range(max_steps):
        logp = log_softmax(model.forward(src_row[None], np.asarray([out]))[0][0, -1])
        logp[[PAD_ID, BOS_ID]] = -np.inf
        nxt = int(np.argmax(logp))
        if nxt == EOS_ID:
            break
        out.append(nxt)
    return out[1:]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_with_caches_equals_recomputing_and_beam_one(name):
    model = random_model(seed=2, **CONFIGS[name])
    src, _, _ = padded_batch(model.config, np.random.default_rng(2), B=4, S=6, T=2)
    got = greedy_decode(model, src, max_steps=8)
    for b in range(4):
        row = src[b][src[b] != PAD_ID]
        assert got[b] == naive_greedy(model, row, 8)  # padding and batching change nothing
    assert beam_search(model, src, beam=1, max_steps=8) == got


def exhaustive_best(model, src_row, max_steps, alpha):
    """The best sequence by (sum of log-probabilities) / lp(length) over every possible output."""
    V = model.config.tgt_vocab_size
    allowed = [v for v in range(V) if v not in (PAD_ID, BOS_ID)]
    words = [v for v in allowed if v != EOS_ID]
    best = (-np.inf, None)
    for n in range(max_steps + 1):
        for body in itertools.product(words, repeat=n):
            ended = n < max_steps  # shorter than the limit: it must end with <eos>
            seq = list(body) + ([EOS_ID] if ended else [])
            if not seq:
                continue
            tgt_in = np.asarray([[BOS_ID] + seq[:-1]])
            logp = log_softmax(model.forward(src_row[None], tgt_in)[0][0])
            logp[:, [PAD_ID, BOS_ID]] = -np.inf
            total = float(sum(logp[t, v] for t, v in enumerate(seq)))
            s = total / length_penalty(len(seq), alpha)
            if s > best[0]:
                best = (s, list(body))
    return best


@pytest.mark.parametrize("alpha", [0.0, 0.6, 2.0])
def test_wide_beam_finds_the_exhaustive_optimum(alpha):
    """V = 6 (three words + <eos>), at most 3 steps: 40 beams hold every hypothesis, so the search is exact."""
    model = random_model(seed=3, src_vocab_size=6, tgt_vocab_size=6)
    src = np.asarray([[3, 4, 5, 3], [5, 5, 0, 0]])
    out, scores = beam_search(model, src, beam=40, alpha=alpha, max_steps=3, return_scores=True)
    for b in range(2):
        best_score, best_seq = exhaustive_best(model, src[b][src[b] != PAD_ID], 3, alpha)
        assert out[b] == best_seq
        assert scores[b] == pytest.approx(best_score, rel=1e-10)


def reference_beam(model, src_row, K, alpha, max_steps):
    """Beam search written plainly: one source, the full forward on every prefix, no caches, and no
    early stop: every step up to max_steps is taken, every finished hypothesis kept."""
    alive, finished = [(0.0, [])], []
    for pos in range(max_steps):
        cands = []
        for score, seq in alive:
            logp = log_softmax(model.forward(src_row[None], np.asarray([[BOS_ID] + seq]))[0][0, -1])
            logp[[PAD_ID, BOS_ID]] = -np.inf
            cands += [(score + logp[v], seq, v) for v in range(len(logp))]
        cands.sort(key=lambda c: -c[0])
        alive = []
        for rank, (score, seq, v) in enumerate(cands[: 2 * K]):
            if v == EOS_ID:
                if rank < K:
                    finished.append((score / length_penalty(pos + 1, alpha), seq))
            elif len(alive) < K:
                alive.append((score, seq + [v]))
    finished += [(score / length_penalty(max_steps, alpha), seq) for score, seq in alive]
    return max(finished, key=lambda h: h[0])


@pytest.mark.parametrize("K, alpha", [(2, 0.0), (3, 0.6), (4, 1.5)])
def test_beam_search_equals_the_plain_reference(K, alpha):
    """Batched, cached and stopped early (when no live hypothesis can win any more): the same answers
    and scores as the plain version. Random weights spread the probabilities, so hypotheses of every
    length finish and the early stop is exercised."""
    model = random_model(seed=6)
    src, _, _ = padded_batch(model.config, np.random.default_rng(6), B=5, S=6, T=2)
    out, scores = beam_search(model, src, beam=K, alpha=alpha, max_steps=6, return_scores=True)
    for b in range(5):
        score, seq = reference_beam(model, src[b][src[b] != PAD_ID], K, alpha, 6)
        assert out[b] == seq
        assert scores[b] == pytest.approx(score, rel=1e-10)


class TableModel:
    """A stand-in for Seq2Seq whose next-token probabilities are a small table of the prefix (ids:
    3 = "a", 4 = "b"): "a a a <eos>" is by far the likeliest output, but on the way two unlikely
    hypotheses end early, so K = 2 hypotheses have finished before the best one has."""

    xp = np

    class config:
        max_len = 8

    def table(self, prefix):
        if not prefix:
            p = {3: 0.90, EOS_ID: 0.07, 4: 0.03}
        elif prefix[0] == 4:
            p = {EOS_ID: 0.99, 3: 0.005, 4: 0.005}
        elif len(prefix) < 3:
            p = {3: 0.97, EOS_ID: 0.02, 4: 0.01}
        else:
            p = {EOS_ID: 0.99, 3: 0.005, 4: 0.005}
        logits = np.full(5, -1e9)
        for v, q in p.items():
            logits[v] = np.log(q)
        return logits

    def start_decoding(self, src, max_steps):
        return {"prefix": [[] for _ in range(len(src))]}

    def reorder_state(self, state, rows):
        return {"prefix": [list(state["prefix"][int(r)]) for r in rows]}

    def decode_step(self, state, tokens, pos):
        if pos > 0:
            for prefix, t in zip(state["prefix"], tokens):
                prefix.append(int(t))
        return np.stack([self.table(prefix) for prefix in state["prefix"]])


def test_beam_search_does_not_stop_while_a_live_hypothesis_can_still_win():
    model = TableModel()
    out, scores = beam_search(model, np.zeros((1, 1), dtype=np.int64), beam=2, alpha=0.0, max_steps=6, return_scores=True)
    assert out == [[3, 3, 3]]
    assert scores[0] == pytest.approx(np.log(0.90) + 2 * np.log(0.97) + np.log(0.99), rel=1e-9)  # a, a, a, <eos>
    assert greedy_decode(model, np.zeros((1, 1), dtype=np.int64), max_steps=6) == [[3, 3, 3]]


def test_beam_search_is_batched_and_encodes_once(monkeypatch):
    model = random_model(seed=4)
    src, _, _ = padded_batch(model.config, np.random.default_rng(4), B=5, S=6, T=2)
    calls = []
    real = model.encode
    monkeypatch.setattr(model, "encode", lambda *a, **k: calls.append(1) or real(*a, **k))
    together = beam_search(model, src, beam=3, max_steps=6)
    assert len(calls) == 1  # the encoder ran once for all 5 sources and their 3 beams each
    for b in range(5):
        row = src[b : b + 1, : int((src[b] != PAD_ID).sum())]
        assert beam_search(model, row, beam=3, max_steps=6) == [together[b]]


def test_decoding_arguments_are_checked():
    model = random_model()
    src = np.asarray([[3, 4]])
    with pytest.raises(ValueError, match="beam must be at least 1"):
        beam_search(model, src, beam=0)
    with pytest.raises(ValueError, match="max_len"):
        greedy_decode(model, src, max_steps=99)
