"""What a fine-tuning run is given: a dataclass (the Python API) that the command line fills in.

    from npgpt.finetune import FinetuneConfig, finetune
    result = finetune(FinetuneConfig(task="classify", data="tang-forms", epochs=5))
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .. import validate as V
from ..config import PRESETS, GPTConfig
from ..layers.mixed_loss import check_lm_weight

TASKS = ("classify", "instruct")
TRAINABLE = ("head", "last-block", "all")
ENGINES = ("fast", "reference")
# Data sets shipped in npgpt/assets, made by scripts/make_finetune_data.py from tang300.txt.
BUNDLED = {
    "tang-forms": {"task": "classify", "train": "tang-forms-train.csv", "val": "tang-forms-val.csv",
                   "test": "tang-forms-test.csv"},
    "tang-instruct": {"task": "instruct", "train": "tang-instruct-train.json", "val": "tang-instruct-val.json",
                      "test": "tang-instruct-test.json"},
}  # fmt: skip
DEFAULT_DATA = {"classify": "tang-forms", "instruct": "tang-instruct"}
DEFAULT_EPOCHS = {"classify": 5, "instruct": 5}


def bundled_file(name: str) -> Path:
    return Path(str(resources.files("npgpt.assets").joinpath(name)))


@dataclass
class FinetuneConfig:
    task: str = "classify"
    # data: a file, or a bundled set by name (which also gives the validation and test files)
    data: str | None = None  # default: tang-forms (classify) or tang-instruct (instruct)
    val_data: str | None = None  # default: a stratified val_share of data (classify) / of the records (instruct)
    test_data: str | None = None
    text_column: str = "text"
    label_column: str = "label"
    val_share: float = 0.15
    max_examples: int | None = None  # use the first N examples of each file only (quick trials)
    # model
    init_from: str | None = None  # a Hugging Face GPT-2 directory or an npgpt run/checkpoint; else a new model
    preset: str = "nano"
    emb_dim: int | None = None  # a new model's shape, overriding the preset's
    n_heads: int | None = None
    n_layers: int | None = None
    context_length: int | None = None  # tokens per example (a new model's context); default: see context_for
    drop_rate: float | None = None
    lm_weight: float | None = None  # classify: lambda of L_FT + lambda * L_PT (default: see default_lm_weight)
    trainable: str | None = None  # head | last-block | all (default: last-block with --init-from, else all)
    mask_prompt: bool = True  # instruct: the prompt's tokens are left out of the loss
    # optimisation
    epochs: int | None = None  # default: 5
    batch_size: int = 8
    lr: float | None = None  # peak; default 5e-4 for a new model, 5e-5 with --init-from (the book's)
    min_lr: float | None = None  # end of the cosine (default lr / 10)
    warmup_steps: int = 0
    weight_decay: float = 0.1
    grad_clip: float | None = 1.0
    seed: int = 0
    # output
    out_dir: str = "runs/finetune"
    keep_last: int = 2
    resume: bool = False  # continue the run in out_dir from its newest good checkpoint
    overwrite: bool = False  # start afresh in an out_dir that has checkpoints (they go once the new run has one)
    samples: int = 3  # instruct: responses generated for test (or val) instructions at the end
    max_new_tokens: int = 24  # instruct: longest response generated when scoring
    # machine
    engine: str = "fast"  # fast: the preallocated fast step (npgpt/engine/); reference: the readable layers
    device: str | None = None
    dtype: str = "float32"
    progress: bool = True

    def validate(self) -> None:
        """Every setting by itself and against the others, reading nothing from disk but the paths'
        existence (validate.py's rules, as `npgpt train`): a bad value is one ValueError naming the
        flag, before any file is touched. What needs the data (columns, labels, lengths) is checked
        when it is read, still before anything is written."""
        integer, real = V.integer, V.real
        if self.task not in TASKS:
            raise ValueError(f"--task must be one of {', '.join(TASKS)}, got {self.task!r}")
        # data
        self._check_data("--data", self.data, bundled=True)
        self._check_data("--val-data", self.val_data)
        self._check_data("--test-data", self.test_data)
        if self.data in BUNDLED and BUNDLED[self.data]["task"] != self.task:
            raise ValueError(f"the bundled set {self.data!r} is for --task {BUNDLED[self.data]['task']}")
        if self.task == "classify" and self.text_column == self.label_column:
            raise ValueError(f"--text-column and --label-column are both {self.text_column!r}: the classifier would learn "
                             "to read its own labels; name the column of the texts and the column of the labels")  # fmt: skip
        real("--val-share", self.val_share, 0, 1, lo_open=True, hi_open=True, hint="it is the share of --data held out")
        if self.max_examples is not None:
            integer("--max-examples", self.max_examples, 2, hint="leave it out to use every example")
        # the model
        if self.preset not in PRESETS:
            raise ValueError(f"--preset {self.preset!r} is not a preset; choose one of {', '.join(PRESETS)}")
        for flag, value, lo in (("--context-length", self.context_length, 2), ("--emb-dim", self.emb_dim, 1),
                                ("--n-heads", self.n_heads, 1), ("--n-layers", self.n_layers, 0)):  # fmt: skip
            if value is not None:
                integer(flag, value, lo)
        if self.drop_rate is not None:
            real("--drop-rate", self.drop_rate, 0, 1, hi_open=True, hint="0 turns dropout off")
        if self.init_from is not None:
            from ..pretrained import check_source

            check_source(self.init_from, "--init-from")
            shaped = [f"--{k.replace('_', '-')}" for k in ("emb_dim", "n_heads", "n_layers") if getattr(self, k) is not None]
            if shaped:
                raise ValueError(f"{', '.join(shaped)} cannot be combined with --init-from: the checkpoint fixes the "
                                 "model's shape; leave them out")  # fmt: skip
        else:
            c = GPTConfig.from_preset(self.preset)
            C, NH = self.emb_dim or c.emb_dim, self.n_heads or c.n_heads
            if C % NH:
                raise ValueError(f"--emb-dim {C} is not divisible by --n-heads {NH}; choose --n-heads from "
                                 f"{[h for h in range(1, min(C, 64) + 1) if C % h == 0]} or a multiple of {NH} for --emb-dim")  # fmt: skip
        if self.lm_weight is not None:
            if self.task != "classify":
                raise ValueError("--lm-weight mixes the LM loss into a classifier's loss; drop it for --task instruct")
            check_lm_weight(self.lm_weight)
        if self.trainable is not None and self.trainable not in TRAINABLE:
            raise ValueError(f"--trainable must be one of {', '.join(TRAINABLE)}, got {self.trainable!r}")
        # optimisation
        if self.epochs is not None:
            integer("--epochs", self.epochs, 1)
        integer("--batch-size", self.batch_size, 1)
        if self.lr is not None:
            real("--lr", self.lr, 0, lo_open=True)
        if self.min_lr is not None:
            real("min_lr", self.min_lr, 0, self.lr, hint="it is the final learning rate, at most the peak lr")
        integer("--warmup-steps", self.warmup_steps, 0)
        real("--weight-decay", self.weight_decay, 0)
        if self.grad_clip is not None:
            real("--grad-clip", self.grad_clip, 0, lo_open=True, hint="0 turns clipping off")
        integer("--seed", self.seed, 0)
        # output and machine
        V.out_dir("--out-dir", self.out_dir)
        integer("--keep-last", self.keep_last, 1)
        if self.resume and self.overwrite:
            raise ValueError("--resume continues the run in --out-dir and --overwrite replaces it; give one of them")
        integer("--samples", self.samples, 0)
        integer("max_new_tokens", self.max_new_tokens, 1)
        if self.engine not in ENGINES:
            raise ValueError(f"--engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"--dtype must be float32 or float64, got {self.dtype!r}")

    def _check_data(self, flag: str, value, bundled: bool = False) -> None:
        """A data file of this task's format that exists (or, for --data, a bundled set's name)."""
        if value is None or (bundled and value in BUNDLED and not Path(value).exists()):
            return
        path = V.in_path(flag, value, what="a data file" + (f" or a bundled set ({', '.join(BUNDLED)})" if bundled else ""))
        if path.is_dir():
            raise ValueError(f"{flag} {value} is a folder; give a data file")
        formats = (".csv", ".tsv", ".jsonl", ".json") if self.task == "classify" else (".json", ".jsonl")
        if path.suffix.lower() not in formats:
            raise ValueError(f"{flag} {value}: --task {self.task} reads {', '.join(formats)} files, not {path.suffix or 'a file without an extension'!r}")

    def resolved(self) -> FinetuneConfig:
        """A checked copy with the defaults filled in: data, epochs, lr, lm_weight, trainable."""
        self.validate()
        return dataclasses.replace(
            self,
            data=self.data or DEFAULT_DATA[self.task],
            epochs=self.epochs or DEFAULT_EPOCHS[self.task],
            lr=self.lr or (5e-5 if self.init_from else 5e-4),
            lm_weight=(self.default_lm_weight if self.lm_weight is None else float(self.lm_weight)) if self.task == "classify" else 0.0,
            trainable=self.trainable or ("last-block" if self.init_from else "all"),
        )

    def files(self) -> tuple[Path | str, Path | str | None, Path | str | None]:
        """(train, val, test) paths; a bundled name supplies whichever of val and test was not given."""
        name = self.data or DEFAULT_DATA[self.task]
        if name in BUNDLED and not Path(name).exists():
            b = BUNDLED[name]
            return bundled_file(b["train"]), self.val_data or bundled_file(b["val"]), self.test_data or bundled_file(b["test"])
        return name, self.val_data, self.test_data

    @property
    def default_lm_weight(self) -> float:
        """0.5 (GPT-1's) when fine-tuning a pretrained model, whose language the LM term keeps; 0 for a new
        model, which has nothing to forget and would pay for the (B, T, V) logits at every step."""
        return 0.5 if self.init_from else 0.0

    def context_for(self, longest: int, model_context: int | None = None) -> int:
        """Tokens per example: --context-length, else the longest example of any split (train, val, test), at
        most the model's context (for a new model: at most the preset's context or 256, whichever is larger)."""
        if self.context_length is not None:
            return self.context_length
        if model_context is None:
            model_context = max(PRESETS[self.preset].get("context_length", 1024), 256)
        return max(2, min(longest, model_context))

    def new_model_config(self, context_length: int) -> GPTConfig:
        overrides = {k: getattr(self, k) for k in ("emb_dim", "n_heads", "n_layers", "drop_rate") if getattr(self, k) is not None}
        return GPTConfig.from_preset(self.preset, context_length=context_length, **overrides)


def trainable_names(task: str, choice: str, params: dict, n_layers: int, tie_weights: bool, lm_weight: float) -> list[str]:
    """The parameter names that train, in the order of `params`.

    classify: head = score.weight; last-block = the head, ln_f and the last block; all = everything
    (but an untied LM head when lm_weight is 0: no gradient reaches it).
    instruct: head = the LM head (lm_head.weight, or the tied wte.weight); last-block and all as above.
    """
    lm_head = "wte.weight" if tie_weights else "lm_head.weight"
    head = ["score.weight"] if task == "classify" else [lm_head]
    if choice == "head":
        chosen = set(head)
    elif choice == "last-block":
        last = f"h.{n_layers - 1}." if n_layers else None
        chosen = set(head) | {"ln_f.weight", "ln_f.bias"} | {k for k in params if last and k.startswith(last)}
    else:
        chosen = set(params)
        if task == "classify" and lm_weight == 0 and not tie_weights:
            chosen.discard("lm_head.weight")
    return [k for k in params if k in chosen]
