"""Loading weights: Hugging Face GPT-2 directories, bare .safetensors files, npgpt checkpoints and runs.

    model = npgpt.load_pretrained("path/to/gpt2")          # config.json + model.safetensors
    model = npgpt.load_pretrained("weights.safetensors", config="config.json")
    model = npgpt.load_pretrained("runs/npgpt")            # a training run: its newest complete checkpoint
    model.save_pretrained("out/")                          # the same layout, loadable by transformers

Accepted key spellings: with or without the "transformer." prefix; the non-parameter buffers
"h.<i>.attn.bias" / "h.<i>.attn.masked_bias" are ignored; "lm_head.weight" may be absent or equal to
wte when the weights are tied. Anything else that is missing, unexpected or mis-shaped is an error
naming the tensor and both shapes. Only safetensors is read: pickled PyTorch files are refused.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from .backend import DEFAULT_DTYPE, get_xp
from .checkpoint import refuse_if_damaged
from .config import GPTConfig
from .model import GPT, param_shapes
from .safetensors_io import load_safetensors

BUFFER_KEY = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")


def read_config(spec) -> GPTConfig:
    """GPTConfig from a GPTConfig, a dict (npgpt or Hugging Face keys), or a config.json path (whose
    problems are errors naming the file)."""
    if isinstance(spec, GPTConfig):
        return spec
    if isinstance(spec, (str, Path)):
        path = Path(spec)
        try:
            spec = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read the config {path}: {e}") from None
        try:
            return read_config(spec)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: {e}") from None
    if not isinstance(spec, dict):
        raise ValueError(f"a config must be a GPTConfig, a dict or a config.json path, got {type(spec).__name__}")
    kind = other_kind(spec)
    if kind is not None:
        raise ValueError(kind)
    if "npgpt" in spec and isinstance(spec["npgpt"], dict) and "config" in spec["npgpt"]:
        if not isinstance(spec["npgpt"]["config"], dict):
            raise ValueError("its npgpt config is not a JSON object")
        return GPTConfig.from_dict(spec["npgpt"]["config"])
    if "n_embd" in spec or spec.get("model_type") == "gpt2":
        return GPTConfig.from_hf_config(spec)
    return GPTConfig.from_dict(spec)


def other_kind(config: dict) -> str | None:
    """For a config.json that is not a GPT language model's: what it is and which command reads it."""
    if "npgpt_seq2seq" in config:
        return ("this is a translation model (written by npgpt seq2seq train), not a GPT: npgpt seq2seq translate "
                "and npgpt seq2seq eval read it")  # fmt: skip
    return None


def is_classifier(config: dict) -> bool:
    """config.json of a classifier (npgpt finetune --task classify, or transformers' GPT2ForSequenceClassification)."""
    npgpt = config.get("npgpt") if isinstance(config.get("npgpt"), dict) else {}
    return npgpt.get("task") == "classify" or "GPT2ForSequenceClassification" in (config.get("architectures") or [])


def classifier_problem(path, cfg_path) -> str | None:
    """A classifier's directory given where a GPT language model is read: what it is and what reads it."""
    try:
        config = json.loads(Path(cfg_path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # read_config says what is wrong with it
    if isinstance(config, dict) and is_classifier(config):
        return (f"{path} is a classifier (written by npgpt finetune --task classify), not a GPT language model: "
                f"npgpt classify --checkpoint {path} reads it")  # fmt: skip
    return None


def weights_problem(directory, classifier: bool = False) -> str | None:
    """Why the weights of `directory` (config.json + model.safetensors, npgpt's or Hugging Face's) do not fit
    its config, read from the file headers alone (nothing is loaded); None when they fit. classifier: the
    file also holds a classification head, score.weight (k, C), with k labels in config.json's id2label."""
    from .safetensors_io import FLOAT_DTYPES, read_header

    d = Path(directory)
    try:
        config = read_config(d / "config.json")
        tensors, _, _ = read_header(d / "model.safetensors")
    except ValueError as e:
        return str(e)
    shapes = {}
    for name, (dtype, shape, *_) in tensors.items():
        if dtype not in FLOAT_DTYPES:
            return f"{d / 'model.safetensors'} holds {name} as {dtype}, not floating point; the file was altered"
        key = name.removeprefix("transformer.")
        if not BUFFER_KEY.match(key):
            shapes[key] = shape
    expected = dict(param_shapes(config))
    C, V = config.emb_dim, config.vocab_size
    optional = {"lm_head.weight": (V, C)} if config.tie_weights else {}
    if not config.qkv_bias:
        optional.update({f"h.{i}.attn.c_attn.bias": (3 * C,) for i in range(config.n_layers)})
    if classifier and not config.tie_weights and "lm_head.weight" not in shapes:
        del expected["lm_head.weight"]  # transformers' classifiers keep no LM head (load_classifier ties it)
    if classifier:
        score = shapes.get("score.weight")
        labels = json.loads((d / "config.json").read_text(encoding="utf-8")).get("id2label")
        k = len(labels) if isinstance(labels, dict) else (score[0] if score else 0)
        expected["score.weight"] = (k, C)
    for name, shape in expected.items():
        if name not in shapes:
            return f"{d / 'model.safetensors'} has no {name} (shape {shape}), which its config.json asks for"
        if shapes[name] != shape:
            return f"{d / 'model.safetensors'} holds {name} of shape {shapes[name]}, but its config.json makes it {shape}"
    for name, shape in shapes.items():
        if name not in expected and optional.get(name) != shape:
            return f"{d / 'model.safetensors'} holds {name} of shape {shape}, which its config.json has no place for"
    return None


def _model_files(directory: Path) -> list[Path]:
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise ValueError(f"{index} is not a valid safetensors index: {e}") from None
        return [directory / name for name in sorted(set(weight_map.values()))]
    pickled = [p.name for p in directory.glob("*.bin")] + [p.name for p in directory.glob("*.pt")]
    if pickled:
        raise ValueError(
            f"{directory} has only pickled weights ({', '.join(pickled)}); npgpt never loads pickle. Convert them "
            "to model.safetensors (e.g. with transformers: model.save_pretrained(dir, safe_serialization=True))"
        )
    raise ValueError(f"{directory} has no model.safetensors")


def _resolve(path, warn: bool = True) -> tuple[list[Path], Path | None]:
    """(weight files, config.json or None) for a directory, a run directory or a .safetensors file."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ValueError(f"{path} does not exist; give a directory with config.json and model.safetensors, or a .safetensors file")
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(f"{path} is not a .safetensors file; npgpt reads safetensors only")
        cfg = path.parent / "config.json"
        return [path], cfg if cfg.is_file() else None
    if not (path / "config.json").is_file() and (path / "checkpoints").is_dir():
        from .checkpoint import latest_checkpoint

        latest = latest_checkpoint(path, warn=warn)
        if latest is None:
            raise ValueError(f"the run directory {path} has no complete checkpoint")
        path = latest
    cfg = path / "config.json"
    return _model_files(path), cfg if cfg.is_file() else None


def check_source(path, flag: str) -> Path:
    """For the command line: `path` (given as `flag`) is something load_pretrained can read, or a
    ValueError in the command line's terms. Reads only directory listings."""
    p = Path(path).expanduser()
    what = "a checkpoint folder (config.json + model.safetensors), a training run's --out-dir, or a .safetensors file"
    if not p.exists():
        raise ValueError(f"{flag} {path} does not exist; give {what}")
    if p.is_file():
        if p.suffix != ".safetensors":
            raise ValueError(f"{flag} {path} is not a .safetensors file (npgpt reads safetensors only); give {what}")
        if not (p.parent / "config.json").is_file():
            raise ValueError(f"{flag} {path} has no config.json beside it; put the model's config.json there")
        return p
    if (p / "config.json").is_file():
        return p
    if (p / "checkpoints").is_dir():
        return p  # a run: its newest good checkpoint is found when loading
    has_weights = (p / "model.safetensors").is_file() or (p / "model.safetensors.index.json").is_file()
    if has_weights:
        raise ValueError(f"{flag} {path} has model weights but no config.json; put the model's config.json beside them")
    raise ValueError(f"{flag} {path} holds neither a checkpoint nor a training run; give {what}")


def source_config(path) -> GPTConfig | None:
    """The GPTConfig of what load_pretrained(path) would load, read without loading any weights; None
    when there is no config.json beside them. ValueError for what load_pretrained would refuse, damage
    first (a manifest that does not verify, weights that do not fit the config), so that the message names
    the damage rather than a setting that disagrees with a damaged file."""
    files, cfg_path = _resolve(path, warn=False)
    directory = files[0].parent
    refuse_if_damaged(directory)
    if cfg_path is None:
        return None
    problem = classifier_problem(path, cfg_path)
    if problem is not None:
        raise ValueError(problem)
    config = read_config(cfg_path)
    if files == [directory / "model.safetensors"]:
        problem = weights_problem(directory)
        if problem is not None:
            raise ValueError(f"refusing a damaged checkpoint: {problem}")
    return config


def normalize_state_dict(tensors: dict, config: GPTConfig, source: str = "checkpoint") -> dict:
    """Map a Hugging Face GPT-2 state dict onto npgpt's parameter names, checking every tensor."""
    params = {}
    for key, value in tensors.items():
        k = key.removeprefix("transformer.")
        if BUFFER_KEY.match(k):
            continue  # the causal-mask buffers of older HF checkpoints: not parameters
        if np.dtype(value.dtype).kind != "f":
            raise ValueError(f"{source}: tensor {key} holds {np.dtype(value.dtype).name} values, not floating point; "
                             "these are not GPT-2 weights (or the file was altered)")  # fmt: skip
        params[k] = value
    if "lm_head.weight" in params and config.tie_weights:
        head = params.pop("lm_head.weight")
        wte = params.get("wte.weight")
        if wte is not None and (head.shape != wte.shape or not np.array_equal(head, wte)):
            raise ValueError(
                f"{source}: lm_head.weight differs from wte.weight but the config ties them "
                "(tie_word_embeddings); set tie_word_embeddings=false in config.json"
            )
    if not config.qkv_bias:
        for i in range(config.n_layers):
            b = params.pop(f"h.{i}.attn.c_attn.bias", None)
            if b is not None and np.any(b != 0):
                raise ValueError(f"{source}: h.{i}.attn.c_attn.bias is not zero but the config has qkv_bias=false")
    expected = param_shapes(config)
    problems = [f"missing tensor {k} (expected shape {s})" for k, s in expected.items() if k not in params]
    problems += [f"unexpected tensor {k} with shape {tuple(params[k].shape)}" for k in params if k not in expected]
    problems += [
        f"tensor {k} has shape {tuple(params[k].shape)}, expected {s}"
        for k, s in expected.items()
        if k in params and tuple(params[k].shape) != s
    ]
    if problems:
        raise ValueError(f"{source} does not match its config: " + "; ".join(problems))
    return {k: params[k] for k in expected}


def load_pretrained(path, config=None, device: str | None = None, dtype=DEFAULT_DTYPE) -> GPT:
    """A GPT with the weights at `path` (see the module docstring), on `device`, in `dtype`."""
    files, cfg_path = _resolve(path)
    refuse_if_damaged(files[0].parent)
    if config is None:
        if cfg_path is None:
            raise ValueError(f"no config.json next to {path}; pass config= (a GPTConfig, a dict or a config.json path)")
        problem = classifier_problem(path, cfg_path)
        if problem is not None:
            raise ValueError(problem)
        config = read_config(cfg_path)
    else:
        config = read_config(config)
    tensors = {}
    for f in files:
        for k, v in load_safetensors(f).items():
            if k in tensors:
                raise ValueError(f"tensor {k} appears in more than one weight file")
            tensors[k] = v
    params = normalize_state_dict(tensors, config, source=str(path))
    xp = get_xp(device)
    dtype = np.dtype(dtype)
    params = {k: xp.asarray(v.astype(dtype, copy=False)) for k, v in params.items()}
    return GPT(config, params=params)
