"""`npgpt generate`: continue a prompt with a trained checkpoint, streaming the text as it is produced.

    npgpt generate --checkpoint runs/npgpt --prompt "Every effort moves you" --max-new-tokens 50
    npgpt generate --checkpoint path/to/gpt2 --temperature 0.8 --top-k 40 --seed 1
    npgpt generate --checkpoint runs/chat --instruction "Continue this line of the poem." --input "床前明月光，"

--checkpoint takes a run directory (its newest complete checkpoint), a checkpoint directory, or a
Hugging Face GPT-2 directory (config.json + model.safetensors).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from ..tokenizer import EOT_ID, StreamDecoder, encode


DEFAULT_PROMPT = "Every effort moves you"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default="runs/npgpt", metavar="DIR",
                   help="run directory, checkpoint directory or Hugging Face GPT-2 directory (default runs/npgpt)")
    p.add_argument("--prompt", help=f"text to continue (default {DEFAULT_PROMPT!r})")
    p.add_argument("--instruction", help="instruction-tuned checkpoints: the task; the prompt is the checkpoint's "
                   "own template filled in, and only the response is printed")
    p.add_argument("--input", default="", help="with --instruction: the input the task works on (optional)")
    p.add_argument("--max-new-tokens", type=int, default=50)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default); try 0.8")
    p.add_argument("--top-k", type=int, help="sample only from the k most likely tokens")
    p.add_argument("--top-p", type=float, help="sample only from the smallest set of tokens with probability >= p")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--stop-at-eot", action=argparse.BooleanOptionalAction, default=True,
                   help="stop when the model produces <|endoftext|> (default on)")
    p.add_argument("--no-kv-cache", dest="kv_cache", action="store_false", help="recompute the whole window every token")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], help="default: $NPGPT_DEVICE or auto")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")


def check_args(args) -> None:
    """Every argument, before the checkpoint is loaded."""
    from .. import validate as V
    from ..pretrained import check_source
    from ..sampling import check_sampling_args

    check_sampling_args(args.temperature, args.top_k, args.top_p, prefix="--")
    V.integer("--max-new-tokens", args.max_new_tokens, 0)
    V.integer("--num-samples", args.num_samples, 1)
    V.integer("--seed", args.seed, 0)
    if args.input and args.instruction is None:
        raise ValueError("--input goes with --instruction (an instruction-tuned checkpoint); use --prompt otherwise")
    if args.instruction is not None and not args.instruction.strip():
        raise ValueError("--instruction is empty; give the task in words")
    if args.instruction is not None and args.prompt is not None:
        raise ValueError("--prompt and --instruction both say what to continue: --instruction fills in the checkpoint's "
                         "prompt template; give one of them")  # fmt: skip
    if sys.stdout is None:  # started with its standard output closed (>&-)
        raise ValueError("standard output is closed, so the text has nowhere to go; redirect it to a file "
                         "(> out.txt) instead of closing it")  # fmt: skip
    check_source(args.checkpoint, "--checkpoint")


def run(args) -> int:
    from ..generate import generate_stream
    from ..pretrained import load_pretrained

    check_args(args)
    if args.prompt is None:
        args.prompt = DEFAULT_PROMPT
    shown = args.prompt
    if args.instruction is not None:  # the template stored with the checkpoint; the response ends at <|endoftext|>
        from ..finetune.instruct import instruction_prompt

        args.prompt, shown, args.stop_at_eot = instruction_prompt(args.checkpoint, args.instruction, args.input), "", True
    model = load_pretrained(args.checkpoint, device=args.device, dtype=np.dtype(args.dtype))
    prompt_ids = encode(args.prompt) or [EOT_ID]  # an empty prompt starts from <|endoftext|>
    rng = np.random.default_rng(args.seed)
    out = sys.stdout
    try:
        for n in range(args.num_samples):
            if args.num_samples > 1:
                out.write(f"\n--- sample {n + 1} ---\n")
            out.write(shown)
            out.flush()
            decoder = StreamDecoder()
            t0, count = time.perf_counter(), 0
            for tok in generate_stream(
                model, np.asarray([prompt_ids]), args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, rng=rng, eos_id=EOT_ID if args.stop_at_eot else None, use_kv_cache=args.kv_cache,
            ):  # fmt: skip
                count += 1
                if args.stop_at_eot and int(tok[0]) == EOT_ID:
                    break
                out.write(decoder.push(int(tok[0])))
                out.flush()
                if getattr(out, "reader_left", False):  # `npgpt generate | head`: nobody reads the rest
                    return 0
            out.write(decoder.flush() + "\n")
            dt = time.perf_counter() - t0
            print(f"[{count} tokens in {dt:.2f}s, {count / max(dt, 1e-9):.1f} tokens/s]", file=sys.stderr)
    except KeyboardInterrupt:  # Ctrl-C: end the line written so far, one line on stderr, exit 130
        out.write("\n")
        out.flush()
        print("npgpt generate: interrupted", file=sys.stderr)
        return 130
    return 0
