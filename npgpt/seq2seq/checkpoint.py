"""Checkpoints of the encoder-decoder model, in npgpt's checkpoint layout (npgpt/checkpoint.py):

    run/checkpoints/step-XXXXXXXX/
      model.safetensors      the parameters under the names of seq2seq/model.py (no pickle)
      config.json            {"npgpt_seq2seq": {format_version, config, dtype, vocab: {gpt2_ids: [...]}}}
      optimizer.safetensors  AdamW moments m.<name>, v.<name>
      trainer_state.json     step, data position, split, history, settings
      manifest.json          sha256 and size of each file above, written last

The run loop (npgpt/loop/) writes and checks them with checkpoint.py's helpers, as for every task:
every file atomically, the manifest last, a checkpoint counts only when its manifest verifies and its
weights are finite, --resume takes the newest good one, and cleanup never removes the last good one.
save_model below writes the model's two files.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .. import checkpoint as ckpt
from ..atomic import atomic_write_json
from ..backend import get_xp
from .config import Seq2SeqConfig
from .model import Seq2Seq, param_shapes
from .vocab import Vocab

FORMAT_VERSION = 1
CONFIG_KEY = "npgpt_seq2seq"


def save_model(ckpt_dir, model: Seq2Seq, vocab: Vocab) -> None:
    """model.safetensors and config.json (with the vocabulary's GPT-2 ids) into ckpt_dir."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    ckpt.save_tensors(ckpt_dir / ckpt.MODEL_FILE, model.params)
    meta = {"format_version": FORMAT_VERSION, "model": "encoder-decoder Transformer (npgpt.seq2seq)",
            "config": model.config.to_dict(), "dtype": np.dtype(model.dtype).name,
            "vocab": {"kind": "gpt2-bpe-restricted", "specials": ["<pad>", "<bos>", "<eos>"],
                      "gpt2_ids": vocab.to_list()}}  # fmt: skip
    atomic_write_json(ckpt_dir / ckpt.CONFIG_FILE, {CONFIG_KEY: meta})


def resolve_checkpoint(path) -> Path:
    """A checkpoint directory, or a run directory (its newest good checkpoint)."""
    path = Path(path)
    if (path / ckpt.CHECKPOINT_DIR).is_dir():
        found = ckpt.latest_checkpoint(path)
        if found is None:
            raise ValueError(f"--checkpoint {path} has no complete checkpoint in {path / ckpt.CHECKPOINT_DIR}")
        return found
    if not (path / ckpt.CONFIG_FILE).is_file() or not (path / ckpt.MODEL_FILE).is_file():
        raise ValueError(f"--checkpoint {path} is neither a seq2seq checkpoint (model.safetensors + config.json) nor a run "
                         "directory with checkpoints/; pass the --out-dir of `npgpt seq2seq train`")  # fmt: skip
    return path


def read_meta(d: Path) -> tuple[Seq2SeqConfig, Vocab, dict]:
    """(config, vocabulary, the whole entry) of config.json in the checkpoint d; a ValueError naming the file."""
    path = d / ckpt.CONFIG_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))[CONFIG_KEY]
    except (OSError, ValueError, KeyError, TypeError):
        raise ValueError(f"{path} is not a seq2seq config (a GPT checkpoint? use `npgpt generate`)") from None
    try:
        config = Seq2SeqConfig.from_dict(meta["config"])
        vocab = Vocab(meta["vocab"]["gpt2_ids"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: {e}") from None
    if len(vocab) != config.tgt_vocab_size:
        raise ValueError(f"{d}: the vocabulary has {len(vocab)} ids but the model {config.tgt_vocab_size}")
    return config, vocab, meta


def weights_problem(d) -> str | None:
    """Why the weights of the checkpoint d do not fit its config.json, read from the headers alone; or None."""
    from ..safetensors_io import FLOAT_DTYPES, read_header

    d = Path(d)
    try:
        config, _, _ = read_meta(d)
        tensors, _, _ = read_header(d / ckpt.MODEL_FILE)
    except ValueError as e:
        return str(e)
    expected = param_shapes(config)
    for name, (dtype, shape, *_) in tensors.items():
        if dtype not in FLOAT_DTYPES:
            return f"{d / ckpt.MODEL_FILE} holds {name} as {dtype}, not floating point; the file was altered"
        if name not in expected:
            return f"{d / ckpt.MODEL_FILE} holds {name}, which its config.json has no place for"
        if shape != expected[name]:
            return f"{d / ckpt.MODEL_FILE} holds {name} of shape {shape}, but its config.json makes it {expected[name]}"
    missing = [name for name in expected if name not in tensors]
    return f"{d / ckpt.MODEL_FILE} has no {missing[0]}, which its config.json asks for" if missing else None


def load_model(path, device: str | None = None, dtype=None) -> tuple[Seq2Seq, Vocab, Path]:
    """(model, vocab, checkpoint dir) from a checkpoint or run directory; the manifest is verified first."""
    from ..safetensors_io import load_safetensors

    d = resolve_checkpoint(path)
    ckpt.refuse_if_damaged(d)
    config, vocab, meta = read_meta(d)
    problem = weights_problem(d)
    if problem is not None:
        raise ValueError(f"refusing a damaged checkpoint: {problem}")
    dtype = np.dtype(dtype or meta.get("dtype", "float32"))
    xp = get_xp(device)
    params = {k: xp.asarray(v.astype(dtype, copy=False)) for k, v in load_safetensors(d / ckpt.MODEL_FILE).items()}
    return Seq2Seq(config, params=params), vocab, d
