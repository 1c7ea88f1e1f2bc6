"""Decoding: greedy and beam search, batched, with the encoder run once per source and a KV cache.

Both start from <bos> and stop at <eos> (or after max_steps tokens). The encoder output and every
decoder layer's cross-attention keys and values are computed once (Seq2Seq.start_decoding); each step
feeds one token per row and appends that position's self-attention key and value to the cache
(Seq2Seq.decode_step), so a step costs O(t) instead of re-running the whole prefix. <pad> and <bos>
are never produced (their scores are set to -inf).

Beam search keeps the `beam` best unfinished hypotheses of every source. Each step it extends them by
every token, ranks the candidates by their summed log-probabilities, moves a candidate ending in <eos>
to the source's finished list when it ranks among the best `beam`, and keeps the best `beam` others.
A finished hypothesis is scored by its sum divided by GNMT's length penalty
    lp(n) = ((5 + n) / 6) ** alpha        n = tokens generated, <eos> included (Wu et al. 2016)
(alpha = 0 ranks by the plain sum, which favours short outputs; larger alpha favours longer ones), and
the source keeps its `beam` best finished ones. A source is done when no live hypothesis can still
beat the worst of those: log-probabilities are <= 0, so a live sum s can only fall, and its best
possible score is s / lp(max_steps). At max_steps the live hypotheses are scored as they are. The
answer is the best finished hypothesis. Stopping this way gives the same answer as running every
source to max_steps; with beam = 1 the search is exactly greedy decoding.
"""

from __future__ import annotations

import numpy as np

from ..backend import to_numpy
from .vocab import BOS_ID, EOS_ID, PAD_ID


MAX_LENGTH_PENALTY = 10.0  # alpha; GNMT uses 0.6 to 1, and ((5 + n) / 6) ** alpha must stay a float


def length_penalty(n, alpha: float) -> float:
    return ((5.0 + n) / 6.0) ** alpha


def check_decoding(beam, alpha) -> None:
    """The beam width and length penalty by the command line's names (--beam, --length-penalty)."""
    from .. import validate as V

    V.integer("--beam", beam, 1)
    V.real("--length-penalty", alpha, 0, MAX_LENGTH_PENALTY, hint="GNMT's is 0.6 to 1")


def beam_bytes(model, n_sources: int, beam: int, src_len: int) -> int:
    """About the memory beam search takes for n_sources sources of src_len tokens at once, beam hypotheses
    each (R = n_sources * beam rows): every decoder layer's self-attention cache (2, R, max_len, C) and
    cross-attention keys and values (2, R, src_len, C), twice over while reorder_state copies them, and each
    step's float64 scores, candidates and their ranking, (R, V) a few times over."""
    cfg = model.config
    rows = n_sources * beam
    item = np.dtype(model.dtype).itemsize
    caches = cfg.n_decoder_layers * 2 * rows * (cfg.max_len + src_len) * cfg.d_model * item * 2
    scores = rows * cfg.tgt_vocab_size * 8 * 6
    return int(caches + scores)


def sources_per_batch(model, beam: int, src_len: int, wanted: int, flag: str = "--beam") -> int:
    """How many sources beam search may take at once (at most `wanted`) in the memory available; a
    ValueError naming `flag` when even one does not fit (nothing has been allocated yet)."""
    from ..memory import available_memory, fmt_bytes

    if beam == 1:
        return wanted
    available = available_memory(model.device)
    one = beam_bytes(model, 1, beam, src_len)
    if available is None:
        return wanted
    if one > available:
        fits = max((k for k in (2 ** i for i in range(40)) if beam_bytes(model, 1, k, src_len) <= available), default=1)
        where = "the GPU" if model.device == "cuda" else "this machine"
        raise ValueError(f"{flag} {beam} needs about {fmt_bytes(one)} to decode one text of {src_len} tokens "
                         f"({beam:,} hypotheses of up to {model.config.max_len} tokens), but {where} has "
                         f"{fmt_bytes(available)} available; use a smaller {flag} (about {fits} fits)")  # fmt: skip
    return max(1, min(wanted, available // one))


def _log_softmax(logits):
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    z = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    z[:, [PAD_ID, BOS_ID]] = -np.inf  # never produced
    return z


def _steps(model, max_steps):
    limit = model.config.max_len
    max_steps = limit if max_steps is None else int(max_steps)
    if not 1 <= max_steps <= limit:
        raise ValueError(f"max_steps must be in [1, {limit}] (the model's max_len), got {max_steps}")
    return max_steps


def greedy_decode(model, src, max_steps: int | None = None) -> list[list[int]]:
    """src: (B, S) ids (right-padded) -> B lists of output ids, <eos> not included."""
    src = np.asarray(src)
    max_steps = _steps(model, max_steps)
    B = src.shape[0]
    state = model.start_decoding(src, max_steps)
    tokens = np.full(B, BOS_ID, dtype=np.int64)
    done = np.zeros(B, dtype=bool)
    out = [[] for _ in range(B)]
    for pos in range(max_steps):
        logp = _log_softmax(to_numpy(model.decode_step(state, tokens, pos)))  # (B, V)
        tokens = logp.argmax(axis=-1)  # (B,)
        for b in np.flatnonzero(~done):
            if tokens[b] != EOS_ID:
                out[b].append(int(tokens[b]))
        done |= tokens == EOS_ID
        if done.all():
            break
    return out


def beam_search(model, src, beam: int = 4, alpha: float = 0.6, max_steps: int | None = None,
                return_scores: bool = False):  # fmt: skip
    """src: (B, S) ids -> B lists of output ids (<eos> not included); with return_scores, also each
    answer's score (sum of log-probabilities / lp(length))."""
    check_decoding(beam, alpha)
    src = np.asarray(src)
    max_steps = _steps(model, max_steps)
    B, K = src.shape[0], beam
    state = model.start_decoding(src, max_steps)  # the encoder runs once per source ...
    state = model.reorder_state(state, model.xp.asarray(np.repeat(np.arange(B), K)))  # ... and its output is shared by K rows
    tokens = np.full(B * K, BOS_ID, dtype=np.int64)
    scores = np.full((B, K), -np.inf)
    scores[:, 0] = 0.0  # one live hypothesis to start with, so the first step does not pick K copies
    seqs = np.zeros((B, K, 0), dtype=np.int64)
    finished = [[] for _ in range(B)]  # (normalised score, ids)
    done = np.zeros(B, dtype=bool)
    for pos in range(max_steps):
        logp = _log_softmax(to_numpy(model.decode_step(state, tokens, pos)))  # (B*K, V)
        V = logp.shape[1]
        cand = (scores[:, :, None] + logp.reshape(B, K, V)).reshape(B, K * V)  # (B, K*V)
        n_top = min(2 * K, K * V)
        top = np.argpartition(-cand, n_top - 1, axis=1)[:, :n_top]
        top = np.take_along_axis(top, np.argsort(-np.take_along_axis(cand, top, axis=1), axis=1, kind="stable"), axis=1)
        new_scores = np.full((B, K), -np.inf)
        origin = np.zeros((B, K), dtype=np.int64)
        new_tokens = np.full((B, K), EOS_ID, dtype=np.int64)
        for b in np.flatnonzero(~done):
            alive = 0
            for rank, c in enumerate(top[b]):
                s = cand[b, c]
                if s == -np.inf:
                    break
                k, v = divmod(int(c), V)
                if v == EOS_ID:
                    if rank < K:  # only an <eos> among the best K counts as a finished hypothesis
                        finished[b].append((s / length_penalty(pos + 1, alpha), seqs[b, k].tolist()))
                    continue
                new_scores[b, alive], origin[b, alive], new_tokens[b, alive] = s, k, v  # best first
                alive += 1
                if alive == K:
                    break
            finished[b] = sorted(finished[b], key=lambda h: -h[0])[:K]  # the K best finished
            best_possible = new_scores[b, 0] / length_penalty(max_steps, alpha)  # of any live hypothesis
            if alive == 0 or (len(finished[b]) == K and best_possible <= finished[b][-1][0]):
                done[b] = True
        if done.all():
            break
        rows = np.arange(B)[:, None]
        seqs = np.concatenate([seqs[rows, origin], new_tokens[:, :, None]], axis=2)  # (B, K, pos + 1)
        scores = np.where(done[:, None], -np.inf, new_scores)
        state = model.reorder_state(state, model.xp.asarray((rows * K + origin).reshape(-1)))  # follow the survivors
        tokens = new_tokens.reshape(-1)
    else:  # max_steps reached: the unfinished hypotheses compete too
        for b in np.flatnonzero(~done):
            for k in range(K):
                if scores[b, k] > -np.inf:
                    finished[b].append((scores[b, k] / length_penalty(max_steps, alpha), seqs[b, k].tolist()))
    best = [max(f, key=lambda h: h[0]) if f else (-np.inf, []) for f in finished]
    out = [ids for _, ids in best]
    return (out, [s for s, _ in best]) if return_scores else out
