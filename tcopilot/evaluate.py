"""Exact-match evaluation of a Pilot, alone or rectified by its Copilot, and decode throughput."""

from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from tcopilot.data.prompts import encode_prompts
from tcopilot.data.scoring import is_correct
from tcopilot.generate import generate


@torch.no_grad()
def evaluate_accuracy(
    model,
    tokenizer,
    examples: list[dict],
    *,
    lam: float = 0.0,
    fusion: str = "probs",
    style: str = "short",
    batch_size: int = 64,
    max_new_tokens: int = 48,
    progress: bool = False,
    desc: str = "eval",
) -> dict:
    """Greedy-decode every example and score it by exact numeric match with ``example["answer"]``.

    Returns ``accuracy``, ``correct`` (per example booleans, for paired tests), ``predictions`` (text),
    ``new_tokens`` and ``tokens_per_s`` (generated tokens per second of decode wall time, batch included).
    """
    model.eval()
    preds, correct = [], []
    n_tokens, seconds = 0, 0.0
    starts = range(0, len(examples), batch_size)
    for s in tqdm(starts, disable=not progress, desc=desc, leave=False):
        chunk = examples[s : s + batch_size]
        ids, mask = encode_prompts(tokenizer, chunk, style=style, padding_side="left")
        dev = next(model.pilot.parameters()).device
        t0 = time.perf_counter()
        out = generate(model, ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=max_new_tokens,
                       lam=lam, fusion=fusion, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
        seconds += time.perf_counter() - t0
        new = out[:, ids.shape[1]:].cpu()
        for row, ex in zip(new, chunk):
            toks = row.tolist()
            if tokenizer.eos_token_id in toks:
                toks = toks[: toks.index(tokenizer.eos_token_id)]
            n_tokens += len(toks) + 1
            text = tokenizer.decode(toks)
            preds.append(text)
            correct.append(bool(is_correct(text, ex["answer"])))
    acc = sum(correct) / max(1, len(correct))
    return {"accuracy": acc, "correct": correct, "predictions": preds, "new_tokens": n_tokens,
            "tokens_per_s": n_tokens / seconds if seconds > 0 else float("nan")}


__all__ = ["evaluate_accuracy"]
