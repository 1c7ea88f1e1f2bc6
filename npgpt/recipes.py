"""Named sets of training settings: `npgpt train --recipe NAME` (flags given beside it win).

    from npgpt.recipes import recipe_config
    cfg = recipe_config("book-ch5", out_dir="runs/book")     # a TrainConfig; keywords override the recipe

book-ch5: chapter 5 of "Build a Large Language Model (From Scratch)" as the book runs it, every choice
that differs from npgpt's defaults written out:
- data: the-verdict cut at 90% of its characters (not tokens), windows of 256 tokens with stride 256,
  batches of 2 shuffled each epoch (the last incomplete one dropped), 10 epochs (9 steps each);
- model: GPT-2 124M's shape with a 256-token context, dropout 0.1, no q|k|v bias, its own output head,
  PyTorch's default initialisation (model.init_params, init="pytorch");
- optimiser: AdamW lr 4e-4, betas (0.9, 0.999), weight decay 0.1 on every parameter, constant learning
  rate, no warmup, no gradient clipping;
- evaluation: every 5 steps counting from the first (the book's "Step 000000" is the state after one
  update, npgpt's step 1), the validation loss on up to 5 batches (the split has 1) and the train loss
  evaluated without dropout on 5 random train batches; a 50-token greedy sample of "Every effort moves you".
"""

from __future__ import annotations

RECIPES: dict[str, dict] = {
    "book-ch5": dict(
        data=["the-verdict"], split_by="characters", train_ratio=0.9, stride=256,
        preset="gpt2", context_length=256, drop_rate=0.1, qkv_bias=False, tie_weights=False, init="pytorch",
        batch_size=2, grad_accum=1, epochs=10, max_steps=None, lr=4e-4, warmup_steps=0, schedule="constant",
        weight_decay=0.1, weight_decay_on="all", beta1=0.9, beta2=0.999, grad_clip=None,
        eval_interval=5, eval_offset=1, eval_batches=5, eval_train_batches=5,
        sample_prompt="Every effort moves you", sample_tokens=50, sample_temperature=0.0, sample_top_k=None,
        out_dir="runs/book-ch5",
    ),
}  # fmt: skip


MODEL_FIELDS = ("preset", "emb_dim", "n_heads", "n_layers", "qkv_bias", "tie_weights", "init")


def recipe_values(name: str, overrides: dict | None = None) -> dict:
    """The TrainConfig fields of the recipe with `overrides` on top, and `recipe` / `from_recipe` (its name,
    and the fields whose values are its own, which messages then attribute to it). With init_from among the
    overrides the recipe's model fields (shape, init) are left out: the checkpoint fixes them."""
    if name not in RECIPES:
        raise ValueError(f"--recipe {name!r} is not a recipe; choose one of {', '.join(RECIPES)}")
    overrides = dict(overrides or {})
    values = {k: (list(v) if isinstance(v, list) else v) for k, v in RECIPES[name].items()
              if not (overrides.get("init_from") and k in MODEL_FIELDS)}  # fmt: skip
    return {**values, **overrides, "recipe": name, "from_recipe": tuple(k for k in values if k not in overrides)}


def recipe_config(name: str, **overrides):
    """A TrainConfig with the recipe's settings, `overrides` (TrainConfig fields) taking precedence."""
    from .train import TrainConfig

    return TrainConfig(**recipe_values(name, overrides))
