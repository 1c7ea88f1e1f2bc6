"""Instruction data: Alpaca-style records, the prompt template, masked targets, per-batch padding.

A record is {"instruction": str, "input": str (may be empty or absent), "output": str}. Each example
is the rendered prompt followed by the output and <|endoftext|>:

    Below is an instruction that describes a task. ...          <- prompt (template), masked
    ### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n
    {output}<|endoftext|>                                       <- response, trained on

Inputs are the example's tokens but the last, targets the tokens after each position (as in
pretraining). With mask_prompt, every target that is a prompt token is -100 (ignore_index), so the loss
is the mean over the response and its end token only; padding targets are always -100. Batches are
padded on the right to their longest example with <|endoftext|> (whose targets are -100).
The template is stored with the checkpoint (config.json, "npgpt" -> "instruct"), and
`npgpt generate --instruction` renders prompts with it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..tokenizer import ENDOFTEXT, EOT_ID, encode
from .tables import batch_order, pad_right, read_records

IGNORE_INDEX = -100
ALPACA = {
    "name": "alpaca",
    "prompt_input": (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
    ),
    "prompt_no_input": (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Response:\n"
    ),
    "end": ENDOFTEXT,
}
_FIELD = re.compile(r"\{(instruction|input)\}")


def render_prompt(template: dict, instruction: str, input_text: str = "") -> str:
    """The prompt for one instruction (the no-input form when input_text is empty). Fields are filled in
    one pass, so braces inside the instruction or input stay as they are."""
    form = template["prompt_input"] if input_text.strip() else template["prompt_no_input"]
    values = {"instruction": instruction, "input": input_text}
    return _FIELD.sub(lambda m: values[m.group(1)], form)


@dataclass(frozen=True)
class Record:
    instruction: str
    input: str
    output: str
    where: str


def read_instructions(path) -> list[Record]:
    """Records from a JSON file (a list of objects) or a JSONL file (one object per line)."""
    path = Path(path)
    if path.suffix.lower() not in (".json", ".jsonl"):
        raise ValueError(f"{path}: instruction data must be .json (a list of records) or .jsonl, got {path.suffix!r}")
    try:
        items = read_records(path)
    except ValueError as e:
        raise ValueError(f"{e}; instruction data is a JSON list of "
                         '{"instruction": ..., "input": ..., "output": ...} records') from None  # fmt: skip
    if not items:
        raise ValueError(f"{path} holds no records")
    records = []
    for where, r in items:
        for key in ("instruction", "output"):
            if not isinstance(r.get(key), str) or not r[key].strip():
                raise ValueError(f'{where} has no "{key}" text (its keys: {", ".join(map(str, r)) or "none"}); '
                                 'every record needs "instruction" and "output" strings, "input" may be empty')  # fmt: skip
        input_text = r.get("input", "")
        if input_text is None:
            input_text = ""
        if not isinstance(input_text, str):
            raise ValueError(f'{where}: "input" must be a string (empty when there is none), got {type(input_text).__name__}')
        records.append(Record(r["instruction"], input_text, r["output"], where))
    return records


@dataclass
class InstructionSet:
    """Examples as token ids with the length of their prompt; those longer than the context are left out."""

    ids: list  # [list[int]] prompt + response + <|endoftext|>
    n_prompt: list  # [int] prompt tokens of each
    mask_prompt: bool
    skipped: int  # examples longer than context_length + 1 tokens
    records: list  # the Records kept, aligned with ids

    @classmethod
    def build(cls, records: list[Record], template: dict, context_length: int, mask_prompt: bool = True,
              source: str = "the data") -> InstructionSet:  # fmt: skip
        ids, n_prompt, kept = [], [], []
        shortest = None
        for r in records:
            prompt = encode(render_prompt(template, r.instruction, r.input), allow_endoftext=False)
            example = prompt + encode(r.output, allow_endoftext=False) + [EOT_ID]
            if len(example) - 1 > context_length:  # inputs are all tokens but the last
                shortest = len(example) - 1 if shortest is None else min(shortest, len(example) - 1)
                continue
            ids.append(example)
            n_prompt.append(len(prompt))
            kept.append(r)
        if not ids:
            raise ValueError(f"every example in {source} is longer than the context of {context_length} tokens "
                             f"(the shortest needs {shortest}); raise --context-length (a new model) or shorten "
                             "the examples")  # fmt: skip
        return cls(ids, n_prompt, mask_prompt, len(records) - len(ids), kept)

    def __len__(self) -> int:
        return len(self.ids)

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(inputs (n,), targets (n,)) of example i, n = its length - 1; masked targets are -100."""
        ids = np.asarray(self.ids[i], dtype=np.int64)
        x, y = ids[:-1], ids[1:].copy()
        if self.mask_prompt:
            y[: self.n_prompt[i] - 1] = IGNORE_INDEX  # y[t] = ids[t + 1]: prompt tokens 1..n_prompt-1
        return x, y

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0, epoch: int = 0):
        """Yield (inputs (B, T), targets (B, T)), padded on the right to the longest example of the batch:
        inputs with <|endoftext|>, targets with -100. Batch order as tables.batch_order."""
        for rows in batch_order([len(s) for s in self.ids], batch_size, shuffle, seed, epoch):
            pairs = [self.example(i) for i in rows]
            yield pad_right([x for x, _ in pairs], EOT_ID), pad_right([y for _, y in pairs], IGNORE_INDEX)

    def response_tokens(self) -> int:
        return sum(int((self.example(i)[1] != IGNORE_INDEX).sum()) for i in range(len(self)))
