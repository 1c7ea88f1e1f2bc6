"""Translating many texts at once, and scoring translations: exact match and corpus BLEU (sacreBLEU)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .data import pad_rows
from .decode import beam_search, greedy_decode, sources_per_batch


def translate_ids(model, src_ids: list, beam: int = 1, alpha: float = 0.6, batch_size: int = 256) -> list[list[int]]:
    """Encoded sources -> output ids, in the input order. Sources are decoded in batches of similar length,
    as many at once as the memory available holds (beam search: decode.sources_per_batch)."""
    order = np.argsort([len(s) for s in src_ids], kind="stable")
    out: list = [None] * len(src_ids)
    longest = max((len(s) for s in src_ids), default=1)
    batch_size = sources_per_batch(model, beam, longest, batch_size)
    for i in range(0, len(order), batch_size):
        rows = order[i : i + batch_size]
        src = pad_rows([src_ids[r] for r in rows])
        ids = greedy_decode(model, src) if beam == 1 else beam_search(model, src, beam=beam, alpha=alpha)
        for r, o in zip(rows, ids):
            out[r] = o
    return out


def translate(model, vocab, texts: list[str], beam: int = 1, alpha: float = 0.6, batch_size: int = 256) -> list[str]:
    """Texts -> translations. A text with a token outside the vocabulary, or longer than the model's
    max_len, is a ValueError naming it."""
    limit = model.config.max_len
    src_ids = vocab.encode_batch(texts, where=lambda i: f"text {texts[i][:60]!r}")
    for t, s in zip(texts, src_ids):
        if not s:
            raise ValueError("an empty text cannot be translated; give some words")
        if len(s) > limit:
            raise ValueError(f"text {t[:60]!r} has {len(s)} tokens but the model takes at most {limit} "
                             "(its max_len); shorten it or split it into parts")  # fmt: skip
    return [vocab.decode(o) for o in translate_ids(model, src_ids, beam, alpha, batch_size)]


@dataclass
class Scores:
    exact_match: float  # share of translations equal to the reference, character for character
    bleu: float  # corpus BLEU, 0..100 (sacreBLEU, its default 13a tokenisation)
    n: int
    bleu_signature: str


def score(hypotheses: list[str], references: list[str]) -> Scores:
    import sacrebleu

    if len(hypotheses) != len(references) or not references:
        raise ValueError(f"need one hypothesis per reference, got {len(hypotheses)} and {len(references)}")
    exact = float(np.mean([h == r for h, r in zip(hypotheses, references)]))
    metric = sacrebleu.metrics.BLEU()
    bleu = metric.corpus_score(hypotheses, [references])
    return Scores(exact, float(bleu.score), len(references), str(metric.get_signature()))
