"""The bundled English -> Malay corpus, the restricted vocabulary, reading TSV pairs, the seeded split
and the batches."""

import hashlib
import importlib.util
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from npgpt.seq2seq.data import (
    PairBatches,
    bundled_pairs_path,
    collate,
    encode_pairs,
    parse_pairs,
    read_pairs,
    split_pairs,
)
from npgpt.seq2seq.vocab import BOS_ID, EOS_ID, PAD_ID, UnknownTokenError, Vocab

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus():
    return read_pairs(bundled_pairs_path())


@pytest.fixture(scope="module")
def vocab(corpus):
    return Vocab.from_texts([t for p in corpus for t in p])


# --- the bundled corpus -------------------------------------------------------------------------------


def test_corpus_is_tens_of_thousands_of_distinct_pairs_of_every_kind(corpus):
    assert len(corpus) == 41_272
    assert len({s for s, _ in corpus}) == len(corpus)  # one Malay answer per English phrase
    pairs = dict(corpus)
    assert pairs["Monday, March 3, 2036"] == "Isnin, 3 Mac 2036"  # dates, full format
    assert pairs["Germany"] == "Jerman"  # countries
    assert pairs["German (Switzerland)"] == "Jerman (Switzerland)"  # languages with regions
    assert pairs["in 3 hours"] == "dalam 3 jam"  # durations
    kinds = {
        "full dates": r"^(Mon|Tues|Wednes|Thurs|Fri|Satur|Sun)day, \w+ \d+, \d{4}$",
        "short dates": r"^\d+/\d+/\d\d$",
        "times": r"^\d+:\d\d (AM|PM)$",
        "times of day": r"^\d+:\d\d (in the|at) \w+$",
        "units": r"^[\d,.]+ (kilometers|kilograms|liters|degrees Celsius|gigabytes)$",
        "currency names": r"^[\d,.]+ (US dollars|euros|Malaysian ringgits|Japanese yen)$",
        "country lists": r"^[A-Z][\w .&'()-]+, [A-Z][\w .&'()-]+, (and|or) [A-Z]",
    }
    for kind, pattern in kinds.items():
        n = sum(1 for s, _ in corpus if re.search(pattern, s))
        assert n >= 50, f"only {n} {kind}"
    assert not any(ch in s + t for s, t in corpus for ch in "\u202f\u00a0\u2009")  # plain spaces only


def test_corpus_file_matches_its_notice():
    data = bundled_pairs_path().read_bytes()
    notice = (REPO / "npgpt" / "assets" / "NOTICE.md").read_text(encoding="utf-8")
    assert hashlib.sha256(data).hexdigest() in notice
    assert "Unicode License v3" in notice and "UNICODE LICENSE V3" in notice


def test_corpus_script_rebuilds_the_file_byte_for_byte():
    babel = pytest.importorskip("babel")
    spec = importlib.util.spec_from_file_location("make_en_ms_corpus", REPO / "scripts" / "make_en_ms_corpus.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    if babel.__version__ != script.BABEL_VERSION:
        pytest.skip(f"Babel {babel.__version__} installed; the file was made with {script.BABEL_VERSION}")
    assert script.render(script.build()) == bundled_pairs_path().read_bytes()


def test_the_package_never_imports_babel():
    for path in (REPO / "npgpt").rglob("*.py"):
        assert not re.search(r"^\s*(import|from)\s+babel", path.read_text(encoding="utf-8"), re.M), path


# --- vocabulary -----------------------------------------------------------------------------------------


def test_vocab_is_gpt2_bpe_restricted_to_the_corpus_and_round_trips(corpus, vocab):
    assert 3000 < len(vocab) < 3300  # of GPT-2's 50,257
    assert vocab.gpt2_ids[0] >= 0 and list(vocab.gpt2_ids) == sorted(set(vocab.gpt2_ids))
    texts = [t for p in corpus[::7] for t in p]
    ids = vocab.encode_batch(texts)
    assert all(min(i) >= 3 for i in ids)  # 0, 1, 2 are <pad>, <bos>, <eos>
    assert [vocab.decode(i) for i in ids] == texts
    assert vocab.decode(ids[0] + [EOS_ID] + ids[1]) == texts[0]  # decoding stops at <eos>
    assert Vocab(vocab.to_list()) == vocab


def test_unknown_token_is_a_clear_error(vocab):
    with pytest.raises(UnknownTokenError, match=r"text 'Monday 你好'.* not in the model's vocabulary"):
        vocab.encode_batch(["Monday 你好"], where=lambda i: "text 'Monday 你好'")


# --- reading pairs --------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, message", [
    ("a\tb\nno tab here\n", "line 2 has no tab"),
    ("a\tb\tc\n", "line 1 has 2 tabs"),
    ("a\tb\n\t target\n", "line 2 has an empty source"),
    ("a\t  \n", "line 1 has an empty target"),
    ("\n\n", "holds no pairs"),
])  # fmt: skip
def test_bad_tsv_lines_are_named(text, message):
    with pytest.raises(ValueError, match=message):
        parse_pairs(text, "pairs.tsv")


def test_pairs_are_stripped_and_blank_lines_skipped(tmp_path):
    f = tmp_path / "p.tsv"
    f.write_bytes("\ufeffone \t satu\r\n\r\ntwo\tdua\n".encode("utf-8"))
    assert read_pairs(f) == [("one", "satu"), ("two", "dua")]
    f.write_bytes(b"caf\xe9\tkopi\n")
    with pytest.raises(ValueError, match="not valid UTF-8"):
        read_pairs(f)


def test_split_is_seeded_disjoint_and_complete(corpus):
    a_train, a_held = split_pairs(corpus, 0.1, seed=0)
    b_train, b_held = split_pairs(corpus, 0.1, seed=0)
    c_train, c_held = split_pairs(corpus, 0.1, seed=1)
    assert a_held == b_held and a_train == b_train
    assert a_held != c_held
    assert len(a_held) == round(0.1 * len(corpus)) and len(a_train) + len(a_held) == len(corpus)
    assert not {s for s, _ in a_train} & {s for s, _ in a_held}


def test_too_long_pairs_are_refused_not_cut(vocab):
    pairs = [("Monday, March 3, 2036", "Isnin, 3 Mac 2036")]
    srcs, tgts = encode_pairs(pairs, vocab, max_len=16)
    assert vocab.decode(srcs[0]) == pairs[0][0]
    with pytest.raises(ValueError, match=r"pair 1: the source has \d+ tokens, more than the 3 that max_len=3 allows"):
        encode_pairs(pairs, vocab, max_len=3)


def test_collate_pads_on_the_right_with_bos_and_eos():
    src, tgt_in, targets = collate([[5, 6, 7], [8]], [[9], [10, 11]])
    np.testing.assert_array_equal(src, [[5, 6, 7], [8, PAD_ID, PAD_ID]])
    np.testing.assert_array_equal(tgt_in, [[BOS_ID, 9, PAD_ID], [BOS_ID, 10, 11]])
    np.testing.assert_array_equal(targets, [[9, EOS_ID, PAD_ID], [10, 11, EOS_ID]])


def test_batches_group_lengths_and_resume_exactly():
    rng = np.random.default_rng(0)
    srcs = [list(rng.integers(3, 50, size=rng.integers(1, 12))) for _ in range(400)]
    tgts = [list(rng.integers(3, 50, size=rng.integers(1, 12))) for _ in range(400)]
    a = PairBatches(srcs, tgts, batch_size=16, seed=3)
    seen = [a.next() for _ in range(40)]  # more than one epoch (25 batches each)
    padding = np.mean([(s == PAD_ID).mean() for s, _, _ in seen])
    random_batches = [collate([srcs[i] for i in rows], [tgts[i] for i in rows]) for rows in rng.permutation(400).reshape(25, 16)]
    random_padding = np.mean([(s == PAD_ID).mean() for s, _, _ in random_batches])
    assert padding < 0.2 * random_padding  # batches of similar source length: little padding
    b = PairBatches(srcs, tgts, batch_size=16, seed=3)
    for _ in range(30):
        b.next()
    c = PairBatches(srcs, tgts, batch_size=16, seed=3)
    c.load_state_dict(b.state_dict())
    for want in seen[30:]:
        for x, y in zip(c.next(), want):
            np.testing.assert_array_equal(x, y)
    with pytest.raises(ValueError, match="same data"):
        PairBatches(srcs[:-1], tgts[:-1], batch_size=16).load_state_dict(b.state_dict())


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
