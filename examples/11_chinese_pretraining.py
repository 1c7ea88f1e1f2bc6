"""Step 11 - Homework: pretraining on Chinese poetry (唐诗三百首).

What it teaches: nothing in the pipeline is specific to English. GPT-2's byte-level BPE turns any
UTF-8 text into ids without unknown tokens; a Chinese character (three bytes in UTF-8) becomes one
to three byte-level tokens, usually two. So the same model and loop train on 300 Tang poems (bundled as `tang300`). This
time we use npgpt's ready-made trainer, `npgpt.train.train(TrainConfig(...))`, which runs the loop of
step 10 and adds evaluation, a loss plot (loss.png) and a checkpoint. At the end we load the
checkpoint and let the model continue 床前明月光.

Run:   python examples/11_chinese_pretraining.py      (one to two minutes; writes a 75 MB checkpoint)
Fast:  NPGPT_EXAMPLES_FAST=1 python examples/11_chinese_pretraining.py   (a tiny model, a few steps)
Output: examples/out/11_chinese_pretraining/ (folder set by NPGPT_EXAMPLES_OUT):
        loss.png, metrics.jsonl, summary.json, checkpoints/
Then:  npgpt generate --checkpoint examples/out/11_chinese_pretraining --prompt 床前明月光 \\
           --temperature 0.8 --top-k 20
Notebook: the `# %%` lines mark cells; VS Code, PyCharm and Jupyter (with jupytext) open this file as a notebook.

A minute or two on a CPU gives poem-shaped text (lines, commas, full stops) with plausible characters,
not poetry. For more, train longer and bigger, e.g.
    npgpt train --data tang300 --preset micro --epochs 20 --beta2 0.95 --sample-prompt 床前明月光
"""

# %%
import os
from pathlib import Path

import numpy as np

from npgpt import load_pretrained
from npgpt.data import bundled_path, read_text
from npgpt.tokenizer import decode, encode, get_tokenizer
from npgpt.train import TrainConfig, train

FAST = os.environ.get("NPGPT_EXAMPLES_FAST") == "1"
HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()  # a notebook has no __file__
OUT = Path(os.environ.get("NPGPT_EXAMPLES_OUT") or HERE / "out")
PROMPT = "床前明月光"

# %% [markdown]
# ## 1. What the tokenizer makes of Chinese

# %%
text = read_text(bundled_path("tang300"))
ids = encode(text)
print(f"tang300.txt: {len(text):,} characters -> {len(ids):,} tokens, only {len(set(ids))} distinct token ids")
print(f"{PROMPT} in UTF-8: {[ch.encode() for ch in PROMPT]}")
pieces = [get_tokenizer().decode_single_token_bytes(i) for i in encode(PROMPT)]
print(f"{PROMPT} -> {len(pieces)} tokens, as bytes: {pieces}\n")

# %% [markdown]
# ## 2. Train
# The settings are chosen for a couple of minutes on a laptop CPU:
# - a small model (2 layers, C=64), with an untied output head, which learns faster here;
# - no dropout: in a two-minute run the model underfits, so there is nothing to regularise;
# - AdamW with beta2 = 0.95 (as GPT-3 and most LLM recipes): a second moment that adapts faster
#   makes much quicker progress on this data than the default 0.999.

# %%
config = TrainConfig(
    data=["tang300"],  # a bundled corpus by name, or paths of your own UTF-8 files
    preset="nano",
    context_length=16 if FAST else 64,
    emb_dim=16 if FAST else 64,
    n_heads=2 if FAST else 4,
    n_layers=1 if FAST else 2,
    drop_rate=0.0,
    tie_weights=False,
    batch_size=2 if FAST else 8,
    max_steps=3 if FAST else 300,
    lr=3e-3,
    warmup_steps=0 if FAST else 10,
    beta2=0.95,
    eval_interval=3 if FAST else 50,
    eval_batches=1 if FAST else 4,  # validation batches per evaluation
    sample_prompt=PROMPT,
    sample_tokens=10 if FAST else 40,
    out_dir=str(OUT / "11_chinese_pretraining"),
    overwrite=True,  # re-running the example replaces the previous run
    keep_last=1,  # keep only the final checkpoint
    progress=not FAST,
)
result = train(config)

# %% [markdown]
# ## 3. Sample from the checkpoint
# Load the checkpoint the trainer wrote and sample a few continuations. Temperature < 1 sharpens the
# distribution, top-k keeps only the k most likely tokens: the usual cure for a small model's noise.

# %%
model = load_pretrained(result.checkpoint)
prompt_ids = np.array([encode(PROMPT)])  # (B, T) = (1, 5)
print(f"\nSamples from {result.checkpoint} (temperature 0.8, top-k 20):")
for seed in range(1 if FAST else 3):
    out = model.generate(prompt_ids, 10 if FAST else 48, temperature=0.8, top_k=20, seed=seed)  # (1, T + new)
    print(f"--- sample {seed + 1} ---")
    print(decode(out[0]))
print(f"\ntrain loss {result.train_loss:.3f}, val loss {result.val_loss:.3f}; loss plot: {result.plot}")
