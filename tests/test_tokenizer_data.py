import numpy as np
import pytest

from npgpt import data, tokenizer
from npgpt.data import Batches, TokenWindows, load_token_ids, read_text, split_ids


def test_lecture_example_encodes_to_known_ids():
    assert tokenizer.encode("Every effort moves you") == [6109, 3626, 6100, 345]


def test_endoftext_and_vocab():
    enc = tokenizer.get_tokenizer()
    assert enc.n_vocab == 50257 and enc.eot_token == 50256
    assert tokenizer.encode("a<|endoftext|>b") == [64, 50256, 65]
    assert 50256 not in tokenizer.encode("a<|endoftext|>b", allow_endoftext=False)


def test_chinese_round_trips():
    text = "床前明月光，疑是地上霜。\n举头望明月，低头思故乡。"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text


def test_stream_decoder_never_splits_a_character():
    text = "春眠不觉晓，处处闻啼鸟。"
    dec = tokenizer.StreamDecoder()
    pieces = [dec.push(i) for i in tokenizer.encode(text)] + [dec.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_damaged_ranks_file_is_refused(monkeypatch):
    monkeypatch.setattr(tokenizer, "ranks_bytes", lambda: b"garbage")
    tokenizer.get_tokenizer.cache_clear()
    try:
        with pytest.raises(ValueError, match="sha256"):
            tokenizer.get_tokenizer()
    finally:
        monkeypatch.undo()
        tokenizer.get_tokenizer.cache_clear()


def test_the_verdict_is_bundled_and_has_5145_tokens():
    ids = load_token_ids(data.bundled_path("the-verdict"))
    assert len(ids) == 5145 and ids.dtype == np.uint16


def test_invalid_utf8_names_file_and_offset(tmp_path):
    f = tmp_path / "bad.txt"
    f.write_bytes(b"hello \xff world")
    with pytest.raises(ValueError, match=r"bad.txt: invalid UTF-8 at byte offset 6.*--encoding-errors replace"):
        read_text(f)
    assert read_text(f, errors="replace") == "hello \ufffd world"


def test_bom_is_dropped(tmp_path):
    f = tmp_path / "bom.txt"
    f.write_bytes("\ufeffhi".encode("utf-8"))
    assert read_text(f) == "hi"


def test_token_cache_is_used_the_second_time(tmp_path, monkeypatch):
    f = tmp_path / "a.txt"
    f.write_text("Every effort moves you", encoding="utf-8")
    first = load_token_ids(f, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1

    def no_encoding(*a, **k):
        raise AssertionError("tokenised again instead of using the cache")

    monkeypatch.setattr(data, "encode", no_encoding)
    assert np.array_equal(load_token_ids(f, cache_dir=tmp_path / "cache"), first)
    f.write_text("Every effort moves you!", encoding="utf-8")  # new content, new key
    with pytest.raises(AssertionError, match="tokenised again"):
        load_token_ids(f, cache_dir=tmp_path / "cache")


def test_several_files_are_joined_with_endoftext(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("Hello", encoding="utf-8")
    b.write_text("world", encoding="utf-8")
    ids = load_token_ids([a, b], use_cache=False)
    assert ids.tolist() == tokenizer.encode("Hello") + [50256] + tokenizer.encode("world")


def test_missing_data_file_is_a_clear_error():
    with pytest.raises(ValueError, match="does not exist.*the-verdict"):
        data.resolve_data_path("no/such/file.txt")


def test_windows_match_the_books_sliding_window_loop():
    ids = np.arange(100, dtype=np.uint16)
    T, stride = 8, 5
    w = TokenWindows(ids, T, stride)
    expected = [(ids[i : i + T], ids[i + 1 : i + T + 1]) for i in range(0, len(ids) - T, stride)]
    assert len(w) == len(expected)
    x, y = w.batch(np.arange(len(w)))
    assert x.dtype == np.int64 and x.shape == (len(expected), T)
    for i, (ex, ey) in enumerate(expected):
        assert np.array_equal(x[i], ex) and np.array_equal(y[i], ey)


def test_split_by_ratio():
    train, val = split_ids(np.arange(1000), 0.9)
    assert len(train) == 900 and len(val) == 100 and val[0] == 900


def test_too_small_split_says_which_and_what_to_lower():
    with pytest.raises(ValueError, match=r"the val split has 50 tokens, fewer than context_length \+ 1 = 257.*context-length"):
        TokenWindows(np.arange(50), 256, name="val")


def test_batches_cover_each_window_once_per_epoch_and_resume_exactly():
    w = TokenWindows(np.arange(200), 4, 4)  # 49 windows
    b = Batches(w, batch_size=5, seed=3)
    assert b.batches_per_epoch == 9  # drop_last
    seen = np.concatenate([b.next()[0][:, 0] for _ in range(9)])
    assert len(set(seen.tolist())) == 45  # distinct windows, no repeats within the epoch
    # resume: a copy restored from state continues with exactly the same batches
    state = b.state_dict()
    twin = Batches(w, batch_size=5, seed=0)
    twin.load_state_dict(state)
    for _ in range(12):  # crosses into the next epochs
        assert np.array_equal(b.next()[0], twin.next()[0])


def test_epochs_are_shuffled_differently_but_reproducibly():
    w = TokenWindows(np.arange(200), 4, 4)
    first = [Batches(w, 7, seed=1).next()[0].tolist() for _ in range(2)]
    assert first[0] == first[1]
    b = Batches(w, 7, seed=1)
    e0 = [b.next()[0][:, 0].tolist() for _ in range(b.batches_per_epoch)]
    e1 = [b.next()[0][:, 0].tolist() for _ in range(b.batches_per_epoch)]
    assert e0 != e1


def test_batch_larger_than_split_is_a_clear_error():
    with pytest.raises(ValueError, match="lower --batch-size"):
        Batches(TokenWindows(np.arange(20), 4), batch_size=10)
