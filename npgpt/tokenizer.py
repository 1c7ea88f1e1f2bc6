"""GPT-2's byte-level BPE, through tiktoken, entirely offline.

The merge ranks ship inside the package (assets/r50k_base.tiktoken, MIT, (c) 2022 OpenAI) and are
verified against the sha256 that tiktoken itself pins for r50k_base before the encoding is built,
so nothing ever touches the network and a corrupted file is caught.
"""

from __future__ import annotations

import base64
import hashlib
from functools import lru_cache
from importlib import resources

ENDOFTEXT = "<|endoftext|>"
EOT_ID = 50256
N_VOCAB = 50257
RANKS_FILE = "r50k_base.tiktoken"
RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
# GPT-2's pre-tokenisation pattern (the form tiktoken uses for r50k_base/gpt2).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


def ranks_bytes() -> bytes:
    return resources.files("npgpt.assets").joinpath(RANKS_FILE).read_bytes()


def parse_ranks(data: bytes) -> dict[bytes, int]:
    """tiktoken's format: one 'base64(token) rank' pair per line."""
    ranks = {}
    for line_no, line in enumerate(data.splitlines(), 1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
        except ValueError as e:
            raise ValueError(f"{RANKS_FILE} line {line_no} is not 'base64 rank': {line[:60]!r}") from e
    return ranks


@lru_cache(maxsize=1)
def get_tokenizer():
    """The GPT-2 tiktoken Encoding: n_vocab 50257, <|endoftext|> = 50256."""
    import tiktoken

    data = ranks_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != RANKS_SHA256:
        raise ValueError(
            f"the bundled {RANKS_FILE} has sha256 {digest}, expected {RANKS_SHA256}; "
            "the installation is damaged: reinstall npgpt"
        )
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=parse_ranks(data),
        special_tokens={ENDOFTEXT: EOT_ID},
        explicit_n_vocab=N_VOCAB,
    )


def tokenizer_hash() -> str:
    """Identifies the tokenizer in checkpoints and token caches."""
    return RANKS_SHA256


def encode(text: str, allow_endoftext: bool = True) -> list[int]:
    """Text -> ids. '<|endoftext|>' in the text becomes id 50256 when allow_endoftext."""
    enc = get_tokenizer()
    return enc.encode(text, allowed_special={ENDOFTEXT} if allow_endoftext else set(), disallowed_special=())


def decode(ids) -> str:
    """Ids -> text (invalid UTF-8 from a partial multi-byte character becomes U+FFFD)."""
    return get_tokenizer().decode([int(i) for i in ids])


class StreamDecoder:
    """Turns ids into text one at a time without breaking multi-byte characters: a Chinese character
    split over two tokens is printed once both have arrived."""

    def __init__(self):
        import codecs

        self._enc = get_tokenizer()
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._utf8.decode(self._enc.decode_single_token_bytes(int(token_id)))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)
