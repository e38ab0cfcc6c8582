"""Prompt formats, training examples (ids + masked labels), batching.

Labels follow the Hugging Face convention: aligned with ``input_ids`` (``labels[t] = input_ids[t]`` where
counted, ``-100`` elsewhere); the model shifts them. Prompt and completion are tokenized separately and
concatenated, so the ids a model is trained on after the prompt start exactly where the ids it is given at
generation time (:func:`encode_prompts`) end; tokenizing the joined text instead can merge tokens across the
boundary with BPE tokenizers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch.utils.data import Dataset

__all__ = [
    "IGNORE_INDEX",
    "PROMPT_STYLES",
    "ALPACA_TEMPLATE",
    "ALPACA_TEMPLATE_WITH_INPUT",
    "format_prompt",
    "format_completion",
    "encode_example",
    "collate",
    "encode_prompts",
    "TaskDataset",
]

IGNORE_INDEX = -100
PROMPT_STYLES = ("short", "alpaca")

# The LLM-Adapters templates (finetune.py / evaluate.py), without the stray indentation of the original.
ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_TEMPLATE_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
# Four tokens of scaffolding for the tiny Pilot: every token of context costs attention on two CPU cores.
SHORT_TEMPLATE = "Q: {instruction} A:"
SHORT_TEMPLATE_WITH_INPUT = "Q: {instruction} {input} A:"


def _check_style(style: str) -> None:
    if style not in PROMPT_STYLES:
        raise ValueError(f"style must be one of {PROMPT_STYLES}, got {style!r}")


def format_prompt(example: Mapping, style: str = "short") -> str:
    """The text a model sees before its answer."""
    _check_style(style)
    instruction = example["instruction"].strip()
    inp = (example.get("input") or "").strip()
    if style == "alpaca":
        template = ALPACA_TEMPLATE_WITH_INPUT if inp else ALPACA_TEMPLATE
    else:
        template = SHORT_TEMPLATE_WITH_INPUT if inp else SHORT_TEMPLATE
    return template.format(instruction=instruction, input=inp)


def format_completion(example: Mapping, style: str = "short") -> str:
    """The target text that follows :func:`format_prompt`, with the separator it needs.

    The short prompt ends in ``A:``, so the answer opens with a space (a ``Ġ``-style token in byte-level
    BPE); the Alpaca prompt ends in a newline, so it does not.
    """
    _check_style(style)
    output = example["output"].strip()
    return " " + output if style == "short" else output


def encode_example(
    tokenizer,
    example: Mapping,
    max_length: int | None = None,
    style: str = "short",
    train_on_inputs: bool = False,
) -> dict[str, list[int]]:
    """``{"input_ids", "labels"}`` for ``<bos> prompt completion <eos>``, cut to ``max_length`` on the right.

    Labels are ``-100`` on the prompt (BOS included) unless ``train_on_inputs``; BOS is never a label since
    nothing precedes it. A truncated example loses its EOS, so the model is never taught to stop early.
    """
    if max_length is not None and max_length < 1:
        raise ValueError(f"max_length must be >= 1 or None, got {max_length!r}")
    prompt = tokenizer.encode(format_prompt(example, style), add_bos=True)
    completion = tokenizer.encode(format_completion(example, style), add_eos=True)
    input_ids = prompt + completion
    if train_on_inputs:
        labels = list(input_ids)
        if prompt and prompt[0] == tokenizer.bos_token_id:
            labels[0] = IGNORE_INDEX
    else:
        labels = [IGNORE_INDEX] * len(prompt) + completion
    if max_length is not None:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return {"input_ids": input_ids, "labels": labels}


def _pad(seqs: Sequence[Sequence[int]], value: int, length: int, side: str) -> torch.Tensor:
    out = torch.full((len(seqs), length), value, dtype=torch.long)
    for row, seq in enumerate(seqs):
        seq = torch.as_tensor(seq, dtype=torch.long)
        if side == "right":
            out[row, : len(seq)] = seq
        else:
            out[row, length - len(seq) :] = seq
    return out


def collate(
    batch: Sequence[Mapping],
    pad_token_id: int,
    padding_side: str = "right",
    pad_to_multiple_of: int | None = None,
) -> dict[str, torch.Tensor]:
    """Pad encoded examples into ``input_ids``, ``attention_mask`` and ``labels`` (``-100`` on padding).

    Right padding is the usual choice for training; left padding keeps the last real token of every row
    in the last column, which batched generation needs.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if not batch:
        raise ValueError("batch must hold at least one example, got an empty batch")
    ids = [list(b["input_ids"]) for b in batch]
    length = max(len(x) for x in ids)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    out = {
        "input_ids": _pad(ids, pad_token_id, length, padding_side),
        "attention_mask": _pad([[1] * len(x) for x in ids], 0, length, padding_side),
    }
    if all("labels" in b for b in batch):
        labels = [list(b["labels"]) for b in batch]
        for x, y in zip(ids, labels):
            if len(x) != len(y):
                raise ValueError(
                    f"labels must match input_ids in length, got {len(y)} labels for {len(x)} ids"
                )
        out["labels"] = _pad(labels, IGNORE_INDEX, length, padding_side)
    return out


def encode_prompts(
    tokenizer,
    examples: Sequence[Mapping],
    style: str = "short",
    padding_side: str = "left",
    max_length: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of ``<bos> prompt`` for every example, padded for generation.

    ``max_length`` keeps the last tokens of an over-long prompt (its question and the answer cue).
    """
    seqs = []
    for ex in examples:
        ids = tokenizer.encode(format_prompt(ex, style), add_bos=True)
        if max_length is not None and len(ids) > max_length:
            ids = ids[len(ids) - max_length :]
        seqs.append({"input_ids": ids})
    batch = collate(seqs, tokenizer.pad_token_id, padding_side)
    return batch["input_ids"], batch["attention_mask"]


class TaskDataset(Dataset):
    """Examples encoded once, up front (the tiny task fits in memory many times over)."""

    def __init__(
        self,
        examples: Sequence[Mapping],
        tokenizer,
        max_length: int | None = None,
        style: str = "short",
        train_on_inputs: bool = False,
    ):
        self.examples = list(examples)
        self.tokenizer = tokenizer
        self.style = style
        self.items = [
            encode_example(tokenizer, ex, max_length, style, train_on_inputs) for ex in self.examples
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.items[index]

    def collate(self, batch: Sequence[Mapping], padding_side: str = "right") -> dict[str, torch.Tensor]:
        """Pass as ``DataLoader(collate_fn=dataset.collate)``."""
        return collate(batch, self.tokenizer.pad_token_id, padding_side)

    @property
    def n_counted_tokens(self) -> int:
        return sum(sum(label != IGNORE_INDEX for label in item["labels"]) for item in self.items)
