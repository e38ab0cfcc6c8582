"""Exact-match evaluation of a Pilot, alone or rectified by its Copilot, and decode throughput."""

from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from tcopilot._validation import check_bool, check_int
from tcopilot.data.prompts import encode_prompts
from tcopilot.data.scoring import is_correct
from tcopilot.generate import generate
from tcopilot.graph_decode import GraphDecoder


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
    cuda_graph: bool = False,
    num_beams: int = 1,
    length_penalty: float = 1.0,
) -> dict:
    """Decode every example (greedily, or with a beam search) and score it by exact numeric match with
    ``example["answer"]``.

    ``num_beams`` / ``length_penalty``: :func:`tcopilot.generate`'s (``num_beams=1``: greedy decoding; > 1: beam
    search, what the paper evaluates with, 4 beams; ``length_penalty`` counts with beams only).
    ``cuda_graph``: decode every batch with one :class:`tcopilot.GraphDecoder` (CUDA only; sized for the
    longest prompt, captured at the first batch and replayed for all, beams too: the same tokens as without it).

    Returns ``accuracy``, ``correct`` (per example booleans, for paired tests), ``predictions`` (text),
    ``new_tokens`` and ``tokens_per_s`` (generated tokens per second of decode wall time, batch included;
    with ``cuda_graph`` the capture too; with beams, the tokens of the returned hypotheses).
    """
    cuda_graph = check_bool("cuda_graph", cuda_graph)
    num_beams = check_int("num_beams", num_beams, low=1, what="an int >= 1")  # checked even without examples
    model.eval()
    preds, correct = [], []
    n_tokens, seconds = 0, 0.0
    chunks = [examples[s : s + batch_size] for s in range(0, len(examples), batch_size)]
    encoded = [encode_prompts(tokenizer, chunk, style=style, padding_side="left") for chunk in chunks]
    dev = next(model.pilot.parameters()).device
    options = dict(max_new_tokens=max_new_tokens, lam=lam, fusion=fusion, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id, num_beams=num_beams, length_penalty=length_penalty)  # fmt: skip
    decoder = None
    if cuda_graph and encoded:
        decoder = GraphDecoder(model, batch_size=max(ids.shape[0] for ids, _ in encoded),
                               prompt_length=max(ids.shape[1] for ids, _ in encoded), **options)  # fmt: skip
    for chunk, (ids, mask) in tqdm(list(zip(chunks, encoded)), disable=not progress, desc=desc, leave=False):
        t0 = time.perf_counter()
        if decoder is not None:
            out = decoder.generate(ids.to(dev), attention_mask=mask.to(dev))
        else:
            out = generate(model, ids.to(dev), attention_mask=mask.to(dev), **options)
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
