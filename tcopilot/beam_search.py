"""Beam search for the Pilot rectified by the Copilot (the paper decodes with 4 beams).

The algorithm is Hugging Face's vectorised beam search (``GenerationMixin._beam_search``, transformers 5.x)
step for step, with the Pilot's log-softmax replaced by the rectified log-scores of :func:`beam_log_probs`,
so that with ``lam=0`` the tokens equal ``pilot.generate(num_beams=k, do_sample=False, ...)``:

1. Every prompt row is repeated ``k`` times (``[B*k, L]``) and prefilled; beam 0 starts at score 0, the
   others at ``-1e9`` (so the first step draws its candidates from one beam).
2. A step scores every ``(beam, token)`` with ``beam score + log p~(token)`` and keeps the best
   ``K = max(2, 1 + #eos) * k`` candidates per row (``torch.topk``; at most all ``k * V`` of them).
3. A candidate "hits" when its token is an EOS id or when it is the last allowed token
   (``max_new_tokens``). Hits among the top ``k`` of the ``K`` become finished hypotheses with score
   ``sum log p~ / new_tokens ** length_penalty``; a row keeps its ``k`` best finished hypotheses. The ``k``
   best non-hitting candidates are the next live beams.
4. The Pilot's KV cache, the Copilot's caches and the Copilot's fed-back hidden state ``g`` are reordered
   with the beams (``_PairDecoder.reorder``) before the chosen tokens are fed.
5. A row stops accepting hypotheses ("done") with ``early_stopping=True`` once it holds ``k`` finished
   hypotheses; with ``False`` once it holds ``k`` and the best live score divided by
   ``current_new_tokens ** length_penalty`` is no better than the worst kept one (HF's heuristic); with
   ``"never"`` the same test uses ``max_new_tokens`` as the length when ``length_penalty > 0``. Decoding
   stops when every row is done or after ``max_new_tokens`` tokens.
6. The result is each row's best finished hypothesis after the prompt, padded with ``pad_token_id`` to the
   longest one: ``[B, L + T]``. (HF pads with ``pad_token_id or eos_token_id[0]``, so ``pad_token_id=0``
   differs only in the padding.)

Scores (:func:`beam_log_probs`), per beam and step:

- ``fusion="probs"``: ``log(q / sum q)`` with ``q = clamp(softmax(z) + lam * f, min=0)``; tokens with
  ``q = 0`` score ``-inf`` (never chosen while a finite candidate remains). A beam whose ``q`` is all zero
  falls back to ``log_softmax(z)`` (the Pilot alone) for that step, like the greedy/sampling fallback of
  :func:`tcopilot.rectified_next_token`.
- ``fusion="logits"``: ``log_softmax(z + lam * f)``.
- ``lam=0`` or no Copilot: ``log_softmax(z)`` (the Copilot is not run).

A row that ends without any finished hypothesis of finite score (possible only when ``-inf`` scores fill its
candidates, ``fusion="probs"``) returns its best live beam instead.
"""

from __future__ import annotations

import torch

from tcopilot.pilot import pilot_states

_NEG = -1.0e9  # HF's "excluded" offset; kept identical so that lam=0 reproduces its choices exactly


def beam_log_probs(z: torch.Tensor, f: torch.Tensor | None, lam: float, fusion: str) -> torch.Tensor:
    """Rectified next-token log-scores ``[R, V]`` fp32 (see the module docstring)."""
    z = z.float()
    if f is None or lam == 0.0:
        return torch.log_softmax(z, dim=-1)
    f = f.float()
    if fusion == "logits":
        return torch.log_softmax(z + lam * f, dim=-1)
    q = (torch.softmax(z, dim=-1) + lam * f).clamp_(min=0.0)
    total = q.sum(dim=-1, keepdim=True)
    alive = total > 0
    logq = torch.log(q / torch.where(alive, total, torch.ones_like(total)))
    return torch.where(alive, logq, torch.log_softmax(z, dim=-1))


def _gather(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``t [B, N, ...]`` rows picked by ``index [B, M]`` along dim 1."""
    while index.dim() < t.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(t, index, dim=1)


@torch.no_grad()
def beam_search(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    num_beams: int,
    max_new_tokens: int,
    lam: float,
    fusion: str,
    eos_token_ids: list[int],
    pad_token_id: int,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
) -> torch.Tensor:
    """Beam search with both caches; returns ``[B, L + T]`` (validated options: see ``tcopilot.generate``)."""
    from tcopilot.generate import _PairDecoder, _uses_copilot

    bsz, length = input_ids.shape
    k, steps = num_beams, max_new_tokens
    device = input_ids.device
    use_copilot = _uses_copilot(model, lam)
    # HF's candidate count: among the top (1 + #eos) * k, at least k do not hit EOS (a beam has at most #eos EOS
    # tokens). It is clamped to the k * V candidates that exist at the first step (an EOS list as long as the
    # vocabulary, or with repeated ids, asks for more; topk would fail): all of them are then kept, which
    # includes every non-hitting one, so the choice is the one an unbounded count would make. Where the count
    # fits (every case HF runs), nothing changes.
    n_keep = max(2, 1 + len(eos_token_ids)) * k
    eos = torch.tensor(eos_token_ids, dtype=torch.long, device=device)
    offsets = (torch.arange(bsz, device=device) * k)[:, None]

    run_seq = torch.full((bsz, k, steps), pad_token_id, dtype=torch.long, device=device)
    run_scores = torch.zeros((bsz, k), dtype=torch.float32, device=device)
    run_scores[:, 1:] = _NEG
    fin_seq = run_seq.clone()
    fin_scores = torch.full((bsz, k), _NEG, dtype=torch.float32, device=device)
    fin_valid = torch.zeros((bsz, k), dtype=torch.bool, device=device)
    fin_len = torch.zeros((bsz, k), dtype=torch.long, device=device)
    unsatisfied = torch.ones((bsz, 1), dtype=torch.bool, device=device)
    es_true = early_stopping is True

    with pilot_states(model.pilot) as states:
        dec = _PairDecoder(model, states, use_copilot)
        dec.prefill(input_ids.repeat_interleave(k, dim=0), attention_mask.repeat_interleave(k, dim=0), max_new_tokens)
        for t in range(steps):
            logp = beam_log_probs(dec.z, dec.copilot_out(), lam, fusion)
            vocab = logp.shape[-1]
            cand = (logp.view(bsz, k, vocab) + run_scores[:, :, None]).view(bsz, k * vocab)
            if t == 0:
                n_keep = min(n_keep, k * vocab)
                top_k_mask = torch.arange(n_keep, device=device) < k
            top_scores, top_idx = torch.topk(cand, n_keep, dim=-1)
            src, tok = top_idx // vocab, top_idx % vocab
            top_seq = _gather(run_seq, src)
            top_seq[:, :, t] = tok
            if t == steps - 1:
                hits = torch.ones_like(tok, dtype=torch.bool)
            elif eos.numel():
                hits = torch.isin(tok, eos)
            else:
                hits = torch.zeros_like(tok, dtype=torch.bool)

            # live beams: the k best candidates that did not hit
            run_key = top_scores + hits.to(torch.float32) * _NEG
            sel = torch.topk(run_key, k, dim=-1).indices
            run_seq, run_scores = _gather(top_seq, sel), _gather(run_key, sel)
            run_src, run_tok = _gather(src, sel), _gather(tok, sel)

            # finished hypotheses: hits among the top k, unless the row is already done
            just = hits & top_k_mask[None, :]
            fscore = top_scores / ((t + 1) ** length_penalty)
            fscore = fscore + (fin_valid.all(-1, keepdim=True) & es_true).to(torch.float32) * _NEG
            fscore = fscore + (~unsatisfied).to(torch.float32) * _NEG
            fscore = fscore + (~just).to(torch.float32) * _NEG
            merged = torch.cat([fin_scores, fscore], dim=1)
            keep = torch.topk(merged, k, dim=-1).indices
            fin_seq = _gather(torch.cat([fin_seq, top_seq], dim=1), keep)
            fin_scores = _gather(merged, keep)
            fin_valid = _gather(torch.cat([fin_valid, just], dim=1), keep)
            fin_len = _gather(torch.cat([fin_len, torch.full_like(tok, t + 1)], dim=1), keep)

            # can a live beam still improve on the kept hypotheses? (HF's heuristic)
            hyp_len = steps if (early_stopping == "never" and length_penalty > 0.0) else t + 1
            best_live = run_scores[:, :1] / (hyp_len ** length_penalty)
            worst = torch.where(fin_valid, fin_scores.min(dim=-1, keepdim=True).values, _NEG)
            unsatisfied = unsatisfied & (best_live > worst).any(dim=-1, keepdim=True)
            done = ~unsatisfied[:, 0] | (fin_valid.all(-1) & es_true)
            if t == steps - 1 or bool(done.all()):
                break
            dec.reorder((run_src + offsets).reshape(-1))
            dec.advance(run_tok.reshape(-1))

    best_seq, best_len = fin_seq[:, 0], fin_len[:, 0]
    usable = fin_valid[:, 0] & torch.isfinite(fin_scores[:, 0])
    if not bool(usable.all()):  # only -inf hypotheses: take the best live beam (module docstring)
        best_seq = torch.where(usable[:, None], best_seq, run_seq[:, 0])
        best_len = torch.where(usable, best_len, torch.full_like(best_len, t + 1))
    new = int(best_len.max())
    return torch.cat([input_ids, best_seq[:, :new]], dim=1)


__all__ = ["beam_search", "beam_log_probs"]
