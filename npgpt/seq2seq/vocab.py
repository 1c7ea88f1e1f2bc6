"""A small vocabulary: GPT-2's BPE restricted to the tokens a corpus uses, renumbered compactly.

    id 0 <pad>, 1 <bos>, 2 <eos>, then 3, 4, ... for the GPT-2 tokens the corpus contains, in GPT-2 id order

Why this one: it reuses the tokenizer npgpt already ships (no tokenizer to train, nothing to
download), it turns text into ids and back exactly (byte-level BPE loses nothing), and the bundled
English + Malay corpus uses about 3,100 of GPT-2's 50,257 tokens, so the embedding table and the output
layer (whose cost is V x C per position, the largest single layer of this small model) are 16 times
smaller. The price: a text containing a token the corpus never had cannot be encoded; that is an
error naming the piece (a model could not have learnt anything about it anyway). The mapping (the
list of GPT-2 ids) is saved in every checkpoint's config.json.
"""

from __future__ import annotations

import hashlib

import numpy as np

from ..tokenizer import N_VOCAB, decode, get_tokenizer

SPECIALS = ("<pad>", "<bos>", "<eos>")
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


class UnknownTokenError(ValueError):
    """A text has a BPE token outside the restricted vocabulary."""


class Vocab:
    def __init__(self, gpt2_ids):
        ids = [int(i) for i in gpt2_ids]
        if ids != sorted(set(ids)) or (ids and (ids[0] < 0 or ids[-1] >= N_VOCAB)):
            raise ValueError(f"a vocabulary is a sorted list of distinct GPT-2 ids in [0, {N_VOCAB})")
        self.gpt2_ids = np.asarray(ids, dtype=np.int64)  # compact id 3 + i  <->  GPT-2 id gpt2_ids[i]
        self.lookup = np.full(N_VOCAB, -1, dtype=np.int64)  # GPT-2 id -> compact id, -1 when absent
        self.lookup[self.gpt2_ids] = np.arange(len(ids)) + len(SPECIALS)

    @classmethod
    def from_texts(cls, texts) -> "Vocab":
        """Every GPT-2 token the texts use."""
        enc = get_tokenizer()
        seen = set()
        for text in texts:
            seen.update(enc.encode_ordinary(text))
        return cls(sorted(seen))

    def __len__(self) -> int:
        return len(SPECIALS) + len(self.gpt2_ids)

    def __eq__(self, other) -> bool:
        return isinstance(other, Vocab) and np.array_equal(self.gpt2_ids, other.gpt2_ids)

    def fingerprint(self) -> str:
        return hashlib.sha256(self.gpt2_ids.tobytes()).hexdigest()[:16]

    def encode(self, text: str) -> list[int]:
        """Text -> compact ids (no special tokens). UnknownTokenError when a token is outside the vocabulary."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts, where=None) -> list[list[int]]:
        """Many texts at once. `where(i)` names text i in an error message."""
        enc = get_tokenizer()
        out = []
        for i, text in enumerate(texts):
            ids = enc.encode_ordinary(text)
            mapped = self.lookup[np.asarray(ids, dtype=np.int64)] if ids else np.zeros(0, np.int64)
            if (mapped < 0).any():
                bad = _unknown_pieces(ids, mapped < 0)
                place = where(i) if where is not None else repr(texts[i][:60])
                raise UnknownTokenError(
                    f"{place}: {', '.join(repr(b) for b in bad[:5])} {'is' if len(bad) == 1 else 'are'} not in the "
                    f"model's vocabulary (the {len(self.gpt2_ids):,} GPT-2 tokens of its training data); "
                    "rephrase without it, or train on data that contains it"
                )
            out.append(mapped.tolist())
        return out

    def decode(self, ids) -> str:
        """Compact ids -> text; special tokens are left out, and decoding stops at the first <eos>."""
        gpt2 = []
        for i in ids:
            i = int(i)
            if i == EOS_ID:
                break
            if i >= len(SPECIALS):
                gpt2.append(int(self.gpt2_ids[i - len(SPECIALS)]))
        return decode(gpt2)

    def to_list(self) -> list[int]:
        return self.gpt2_ids.tolist()


def _unknown_pieces(ids, unknown) -> list[str]:
    """The text of each run of unknown tokens (a character split over several byte tokens stays whole)."""
    pieces, run = [], []
    for g, bad in zip(list(ids) + [None], list(unknown) + [False]):
        if bad:
            run.append(int(g))
        elif run:
            piece = decode(run)
            if piece not in pieces:
                pieces.append(piece)
            run = []
    return pieces
