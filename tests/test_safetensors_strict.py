"""Malformed safetensors files are refused with a clear reason, before anything large is allocated."""

import json
import struct
import tracemalloc

import numpy as np
import pytest
from safetensors.numpy import save

from npgpt.safetensors_io import SafetensorsError, load_safetensors, read_header


def build(header: dict, data: bytes, header_len: int | None = None, raw_header: bytes | None = None) -> bytes:
    h = raw_header if raw_header is not None else json.dumps(header).encode()
    n = len(h) if header_len is None else header_len
    return struct.pack("<Q", n) + h + data


def two_tensors():
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.arange(4, dtype=np.float32)
    header = {
        "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
        "b": {"dtype": "F32", "shape": [4], "data_offsets": [24, 40]},
    }
    return header, a.tobytes() + b.tobytes()


def write(tmp_path, blob: bytes):
    p = tmp_path / "w.safetensors"
    p.write_bytes(blob)
    return p


def test_a_valid_file_reads_back_exactly(tmp_path):
    tensors = {"x": np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32), "i": np.arange(5, dtype=np.int64),
               "h": np.ones(3, dtype=np.float16)}  # fmt: skip
    p = write(tmp_path, save(tensors, metadata={"format": "pt"}))
    out = load_safetensors(p)
    assert set(out) == set(tensors)
    for k in tensors:
        assert out[k].dtype == tensors[k].dtype and np.array_equal(out[k], tensors[k])
    assert read_header(p)[1] == {"format": "pt"}


def test_bf16_becomes_float32(tmp_path):
    x = np.array([1.0, -2.5, 3.140625], dtype=np.float32)
    bits = (x.view(np.uint32) >> 16).astype(np.uint16)
    header = {"x": {"dtype": "BF16", "shape": [3], "data_offsets": [0, 6]}}
    out = load_safetensors(write(tmp_path, build(header, bits.tobytes())))
    assert out["x"].dtype == np.float32 and np.array_equal(out["x"], x)


CASES = {
    "empty file": (lambda: b"", "too short"),
    "header length beyond the file": (lambda: build(*two_tensors(), header_len=10**6), "the header claims 1000000 bytes"),
    "absurd header length": (lambda: build({}, b"", header_len=2**60), "header claims"),
    "non-UTF-8 header": (lambda: build({}, b"", raw_header=b'{"a\xff": 1}'), "not valid UTF-8"),
    "non-JSON header": (lambda: build({}, b"", raw_header=b"{not json}"), "not valid JSON"),
    "header not an object": (lambda: build({}, b"", raw_header=b"[1, 2]"), "JSON object"),
    "overlapping offsets": (lambda: build({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                                           "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, bytes(24)), "overlaps"),
    "gap between tensors": (lambda: build({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                           "b": {"dtype": "F32", "shape": [2], "data_offsets": [12, 20]}}, bytes(20)), "gap of 4 bytes"),
    "offsets disagree with shape and dtype": (lambda: build({"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]}}, bytes(20)),
                                              "needs 24 bytes"),
    "unknown dtype": (lambda: build({"a": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}, bytes(16)), "unknown dtype 'F128'"),
    "duplicate names": (lambda: build({}, bytes(8), raw_header=b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
                                                                 b'"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}'),
                        "duplicate tensor name 'a'"),
    "truncated data": (lambda: build(two_tensors()[0], two_tensors()[1][:-8]), "truncated"),
    "trailing bytes": (lambda: build(two_tensors()[0], two_tensors()[1] + b"\x00" * 7), "7 trailing bytes"),
    "negative shape": (lambda: build({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, bytes(4)), "invalid shape"),
    "backwards offsets": (lambda: build({"a": {"dtype": "F32", "shape": [0], "data_offsets": [4, 0]}}, bytes(4)), "backwards"),
    "extra field": (lambda: build({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "x": 1}}, bytes(4)), "exactly"),
    "non-string metadata": (lambda: build({"__metadata__": {"k": 1}}, b""), "__metadata__"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_files_are_refused(tmp_path, case):
    make, message = CASES[case]
    p = write(tmp_path, make())
    with pytest.raises(SafetensorsError, match=message):
        load_safetensors(p)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weights_name_the_tensor(tmp_path, bad):
    w = np.ones((3, 3), dtype=np.float32)
    w[1, 2] = bad
    p = write(tmp_path, save({"ok": np.ones(2, dtype=np.float32), "h.3.mlp.c_fc.weight": w}))
    with pytest.raises(SafetensorsError, match=r"'h.3.mlp.c_fc.weight' holds 1 NaN or Inf"):
        load_safetensors(p)
    assert np.isnan(load_safetensors(p, check_finite=False)["h.3.mlp.c_fc.weight"][1, 2]) == np.isnan(bad)


def test_a_huge_claimed_tensor_is_refused_without_allocating_it(tmp_path):
    n = 10**12  # 4 TB of float32, if anyone believed it
    header = {"a": {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]}}
    p = write(tmp_path, build(header, bytes(64)))
    tracemalloc.start()
    try:
        with pytest.raises(SafetensorsError, match="truncated"):
            load_safetensors(p)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000


def test_the_loader_refuses_a_malformed_checkpoint_in_one_line(tmp_path, capsys):
    from npgpt.cli import main

    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 8, "n_head": 2, "n_layer": 1,
                                               "vocab_size": 50257, "n_positions": 8}))  # fmt: skip
    (d / "model.safetensors").write_bytes(b"\x00" * 4)
    assert main(["generate", "--checkpoint", str(d)]) == 2
    err = capsys.readouterr().err
    assert "too short to be a safetensors file" in err and "Traceback" not in err
