"""A GPT with a classification head, its forward and backward, and its files in the Hugging Face layout.

Glossary: B=batch, T=time, C=channels, V=vocab, k=labels.
    x           = trunk(idx)                                   (B, T) -> (B, T, C), GPT.forward up to ln_f
    logits      = classifier_head(x, idx, score.weight)        (B, T, C) -> (B, k), last real token
    lm_logits   = x @ head_weight            (only when lm_weight > 0)   (B, T, V)
    loss        = L_FT(logits, labels) + lm_weight * L_PT(lm_logits, next tokens)
The backward sends both heads' gradients into the trunk at x (GPT.backward's dlogits and dhidden).
The language-model targets are each text's next tokens; each text's last token and the padding get
-100, so L_PT is the mean over real next-token predictions.

Saved directories load in transformers.GPT2ForSequenceClassification.from_pretrained: weights
"transformer.<GPT-2 name>" and "score.weight" (k, C) in model.safetensors, and a config.json with
id2label / label2id, pad_token_id and architectures ["GPT2ForSequenceClassification"]. An untied
model also stores its lm_head.weight (trained by the LM term), which transformers reports as an
unused key and ignores.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .. import layers as L
from ..backend import DEFAULT_DTYPE, get_array_module, get_xp, to_numpy
from ..checkpoint import CONFIG_FILE, FORMAT_VERSION, MODEL_FILE, atomic_write_json, refuse_if_damaged, save_tensors
from ..model import GPT, GPTCache
from .tables import PAD_ID

IGNORE_INDEX = -100
SCORE = "score.weight"


class ClassifierCache(NamedTuple):
    trunk: GPTCache
    head: L.ClassifierHeadCache
    loss: L.MixedLossCache | None  # None when forward had no labels


def lm_targets_for(idx, pad_id: int):
    """(B, T) next-token targets of each text: idx[b, t + 1] up to the row's last real token, -100 after."""
    xp = get_array_module(idx)
    last = L.last_token_index(idx, pad_id)  # (B,)
    t = xp.arange(idx.shape[1])  # (T,)
    nxt = xp.concatenate([idx[:, 1:], xp.full((idx.shape[0], 1), pad_id, dtype=idx.dtype)], axis=1)  # (B, T)
    valid = (t[None, :] < last[:, None]) & (idx != pad_id) & (nxt != pad_id)  # (B, T)
    return xp.where(valid, nxt, IGNORE_INDEX)


@dataclass
class Classifier:
    """A GPT trunk (`model`, with its LM head) and a classification head `score` (k, C).

    clf = Classifier.new(GPT(config), labels=["neg", "pos"], seed=0)
    logits, loss, cache = clf.forward(idx, labels, lm_weight=0.5, training=True)
    grads = clf.backward(cache, trainable=["score.weight", "ln_f.weight", ...])
    """

    model: GPT
    score: object  # (k, C)
    labels: tuple  # id -> label string
    pad_token_id: int = PAD_ID

    @classmethod
    def new(cls, model: GPT, labels, seed: int = 0, pad_token_id: int = PAD_ID) -> Classifier:
        """A fresh head ~ N(0, 0.02) (GPT-2's initialisation) on the trunk's device and dtype."""
        k, C = len(labels), model.config.emb_dim
        w = np.random.default_rng([seed, 16]).standard_normal((k, C), dtype=np.float32) * np.float32(0.02)
        return cls(model, model.xp.asarray(w.astype(model.dtype)), tuple(labels), pad_token_id)

    @property
    def params(self) -> dict:
        """Every parameter: the trunk's (GPT-2 names) and score.weight. The arrays themselves, not copies."""
        return {**self.model.params, SCORE: self.score}

    def forward(self, idx, labels=None, lm_weight: float = 0.0, training: bool = False, rng=None):
        """idx: (B, T) right-padded ids; labels: (B,) ids or None -> (logits (B, k), loss 0-d or None, cache)."""
        lm_weight = L.mixed_loss.check_lm_weight(lm_weight)
        idx = self.model.check_idx(idx)
        use_lm = labels is not None and lm_weight > 0
        lm_logits, _, trunk = self.model.forward(idx, None, training=training, rng=rng, lm_head=use_lm)
        logits, c_head = L.classifier_head_forward(trunk.hidden, idx, self.score, self.pad_token_id)  # (B, k)
        if labels is None:
            return logits, None, ClassifierCache(trunk, c_head, None)
        labels = self.model.xp.asarray(labels)
        lm_targets = lm_targets_for(idx, self.pad_token_id) if use_lm else None
        loss, c_loss = L.mixed_loss_forward(logits, labels, lm_logits, lm_targets, lm_weight)
        return logits, loss, ClassifierCache(trunk, c_head, c_loss)

    def backward(self, cache: ClassifierCache, trainable=None, dloss=1.0) -> dict:
        """Gradients of the parameters in `trainable` (default: all), keyed like self.params. The trunk's
        backward is skipped when only the head trains, and GPT.backward skips what is frozen below it."""
        if cache.loss is None:
            raise ValueError("backward needs a loss: call forward with labels")
        need = set(self.params) if trainable is None else set(trainable)
        trunk_need = need - {SCORE}
        if trunk_need:
            dcls, dlm = L.mixed_loss_backward(dloss, cache.loss)  # (B, k), (B, T, V) or None
        else:  # only the head trains: the LM term's gradient would reach nothing trainable
            dcls, dlm = L.softmax_cross_entropy_backward(dloss, cache.loss.ft), None
        dx, dscore = L.classifier_head_backward(dcls, cache.head, weight_grad=SCORE in need)  # (B, T, C), (k, C)
        grads = {}
        if trunk_need:
            grads = self.model.backward(cache.trunk, dloss=None, dlogits=dlm, dhidden=dx, trainable=trunk_need)
        if SCORE in need:
            grads[SCORE] = dscore
        return {k: grads[k] for k in self.params if k in need}

    def predict_proba(self, idx) -> np.ndarray:
        """(B, T) ids -> (B, k) class probabilities as NumPy float64 (no dropout)."""
        logits = to_numpy(self.forward(idx)[0]).astype(np.float64)
        z = np.exp(logits - logits.max(axis=1, keepdims=True))
        return z / z.sum(axis=1, keepdims=True)

    # --- files -----------------------------------------------------------------------------------

    def hf_config(self, extra: dict | None = None) -> dict:
        cfg = self.model.config
        hf = cfg.to_hf_config()
        hf["architectures"] = ["GPT2ForSequenceClassification"]
        hf["id2label"] = {str(i): name for i, name in enumerate(self.labels)}
        hf["label2id"] = {name: i for i, name in enumerate(self.labels)}
        hf["pad_token_id"] = int(self.pad_token_id)
        hf["problem_type"] = "single_label_classification"
        hf["npgpt"] = {"format_version": FORMAT_VERSION, "config": cfg.to_dict(), "dtype": np.dtype(self.model.dtype).name,
                       "task": "classify", **(extra or {})}  # fmt: skip
        return hf

    def save(self, directory, extra: dict | None = None) -> None:
        """model.safetensors + config.json, atomically, in GPT2ForSequenceClassification's layout."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        model, cfg = self.model, self.model.config
        tensors = {(k if k == "lm_head.weight" else f"transformer.{k}"): v for k, v in model.params.items()}
        if not cfg.qkv_bias:  # transformers' GPT-2 always has a q|k|v bias: store zeros, the same function
            for i in range(cfg.n_layers):
                tensors[f"transformer.h.{i}.attn.c_attn.bias"] = model.xp.zeros(3 * cfg.emb_dim, dtype=model.dtype)
        tensors[SCORE] = self.score
        save_tensors(directory / MODEL_FILE, tensors)
        atomic_write_json(directory / CONFIG_FILE, self.hf_config(extra))


def load_classifier(path, device: str | None = None, dtype=DEFAULT_DTYPE) -> Classifier:
    """A Classifier from a directory saved by npgpt or by transformers' GPT2ForSequenceClassification,
    or from a fine-tuning run directory (its newest good checkpoint)."""
    from ..pretrained import _resolve, normalize_state_dict, read_config
    from ..safetensors_io import load_safetensors

    files, cfg_path = _resolve(path)
    refuse_if_damaged(files[0].parent)
    if cfg_path is None:
        raise ValueError(f"no config.json next to {path}; a classifier directory needs one (with id2label)")
    hf = json.loads(Path(cfg_path).read_text(encoding="utf-8"))
    tensors = {}
    for f in files:
        tensors.update(load_safetensors(f))
    if SCORE not in tensors:
        raise ValueError(f"{path} is not a classifier (it has no score.weight); fine-tune one with: "
                         "npgpt finetune --task classify")  # fmt: skip
    config = read_config(cfg_path)
    score = tensors.pop(SCORE)
    if score.dtype.kind != "f":
        raise ValueError(f"{path}: score.weight holds {score.dtype.name} values, not floating point; the file was altered")
    k = score.shape[0]
    id2label = hf.get("id2label") or {str(i): f"LABEL_{i}" for i in range(k)}  # transformers omits its default names
    try:
        labels = tuple(str(id2label[str(i)]) for i in range(k))
    except (KeyError, TypeError):
        raise ValueError(f"{cfg_path}: id2label must name every id 0..{k - 1} of score.weight ({k} rows)") from None
    if not config.tie_weights and not any(key.endswith("lm_head.weight") for key in tensors):
        config = config.replace(tie_weights=True)  # a head-less untied file (transformers'): the LM head is not used
    params = normalize_state_dict(tensors, config, source=str(path))
    xp = get_xp(device)
    dtype = np.dtype(dtype)
    model = GPT(config, params={key: xp.asarray(v.astype(dtype, copy=False)) for key, v in params.items()})
    if score.shape[1] != config.emb_dim:
        raise ValueError(f"{path}: score.weight has shape {score.shape}, expected ({k}, {config.emb_dim})")
    pad = hf.get("pad_token_id")
    return Classifier(model, xp.asarray(score.astype(dtype, copy=False)), labels, PAD_ID if pad is None else int(pad))
