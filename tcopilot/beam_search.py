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


class _BeamState:
    """The search's tensors (live beams, finished hypotheses, the "unsatisfied" rows) and one scoring step.

    Eager (``static=False``) the step index is a Python int and the state is rebound, exactly HF's arithmetic.
    ``static`` (CUDA-graph decoding): the step index is a device counter, the per-step divisors come from tables
    indexed on the device, every update is written in place into fixed buffers, and once a step finds every row
    done the state is frozen (later steps, run before the host notices, leave it as it was). :meth:`reset` starts
    a new search in the same buffers (:class:`tcopilot.GraphDecoder`'s later calls replay the step captured at its
    first).
    """

    def __init__(self, dec, bsz, k, steps, eos_ids, pad_token_id, lam, fusion, length_penalty, early_stopping,
                 static):  # fmt: skip
        device = dec.h.device
        self.dec, self.bsz, self.k, self.steps, self.static = dec, bsz, k, steps, static
        self.lam, self.fusion, self.length_penalty, self.early_stopping = lam, fusion, length_penalty, early_stopping
        self.pad = pad_token_id
        # HF's candidate count: among the top (1 + #eos) * k, at least k do not hit EOS (a beam has at most #eos EOS
        # tokens). It is clamped to the k * V candidates that exist at the first step (an EOS list as long as the
        # vocabulary, or with repeated ids, asks for more; topk would fail): all of them are then kept, which
        # includes every non-hitting one, so the choice is the one an unbounded count would make. Where the count
        # fits (every case HF runs), nothing changes.
        self.n_keep = max(2, 1 + len(eos_ids)) * k
        self.top_k_mask = None  # the first score() makes it, once: a captured step reads that tensor at every call
        self.eos = torch.tensor(eos_ids, dtype=torch.long, device=device)
        self.offsets = (torch.arange(bsz, device=device) * k)[:, None]
        self.run_seq = torch.empty((bsz, k, steps), dtype=torch.long, device=device)
        self.run_scores = torch.empty((bsz, k), dtype=torch.float32, device=device)
        self.fin_seq = torch.empty_like(self.run_seq)
        self.fin_scores = torch.empty((bsz, k), dtype=torch.float32, device=device)
        self.fin_valid = torch.empty((bsz, k), dtype=torch.bool, device=device)
        self.fin_len = torch.empty((bsz, k), dtype=torch.long, device=device)
        self.unsatisfied = torch.empty((bsz, 1), dtype=torch.bool, device=device)
        self.run_src = torch.empty((bsz, k), dtype=torch.long, device=device)
        self.run_tok = torch.empty((bsz, k), dtype=torch.long, device=device)
        self.generator = None  # (the interface graph_decode's capture helpers read: step(), done, generator)
        if static:
            self.t = torch.empty(1, dtype=torch.long, device=device)
            self.done = torch.empty(steps, dtype=torch.bool, device=device)  # step t: every row done
            # float32 divisors of Python's float64 powers: what `tensor / python_float` divides by
            self.fin_div = torch.tensor([(t + 1) ** length_penalty for t in range(steps)], dtype=torch.float32,
                                        device=device)  # fmt: skip
            self.live_div = torch.tensor([self._hyp_len(t) ** length_penalty for t in range(steps)],
                                         dtype=torch.float32, device=device)  # fmt: skip
        self.reset()

    def reset(self) -> None:
        """Start a new search (same shapes: the decoder refilled with new prompts) by rewriting every buffer in place,
        so that a step captured in a CUDA graph reads the new search at its next replay."""
        self.run_seq.fill_(self.pad)
        self.run_scores.zero_()
        self.run_scores[:, 1:] = _NEG
        self.fin_seq.fill_(self.pad)
        self.fin_scores.fill_(_NEG)
        self.fin_valid.zero_()
        self.fin_len.zero_()
        self.unsatisfied.fill_(True)
        self.run_src.zero_()
        self.run_tok.zero_()
        self.rows_done = None  # eager: which rows are done after the last step
        if self.static:
            self.t.zero_()
            self.done.zero_()

    def _hyp_len(self, t: int) -> int:
        return self.steps if (self.early_stopping == "never" and self.length_penalty > 0.0) else t + 1

    def _set(self, **values) -> None:
        for name, value in values.items():
            if self.static:  # in place; unchanged once every row is done (a step the host has not stopped yet)
                buf = getattr(self, name)
                buf.copy_(torch.where(self.frozen, buf, value))
            else:
                setattr(self, name, value)

    def score(self, t: int | None = None) -> None:
        """Step ``t`` (static: the device counter): score the candidates, update the beams and hypotheses."""
        static, k, bsz, steps = self.static, self.k, self.bsz, self.steps
        if static:
            self.frozen = self.done.any()
        logp = beam_log_probs(self.dec.z, self.dec.copilot_out(), self.lam, self.fusion)
        vocab = logp.shape[-1]
        cand = (logp.view(bsz, k, vocab) + self.run_scores[:, :, None]).view(bsz, k * vocab)
        if self.top_k_mask is None:
            self.n_keep = min(self.n_keep, k * vocab)
            self.top_k_mask = torch.arange(self.n_keep, device=cand.device) < k
        top_scores, top_idx = torch.topk(cand, self.n_keep, dim=-1)
        src, tok = top_idx // vocab, top_idx % vocab
        top_seq = _gather(self.run_seq, src)
        is_eos = (tok[..., None] == self.eos).any(-1) if self.eos.numel() else torch.zeros_like(tok, dtype=torch.bool)
        if static:
            top_seq.scatter_(2, self.t.expand(bsz, self.n_keep, 1), tok[..., None])
            hits = is_eos | (self.t == steps - 1)
        else:
            top_seq[:, :, t] = tok
            hits = torch.ones_like(tok, dtype=torch.bool) if t == steps - 1 else is_eos

        # live beams: the k best candidates that did not hit
        run_key = top_scores + hits.to(torch.float32) * _NEG
        sel = torch.topk(run_key, k, dim=-1).indices
        self._set(run_seq=_gather(top_seq, sel), run_scores=_gather(run_key, sel), run_src=_gather(src, sel),
                  run_tok=_gather(tok, sel))  # fmt: skip

        # finished hypotheses: hits among the top k, unless the row is already done
        just = hits & self.top_k_mask[None, :]
        if static:
            fscore = top_scores / self.fin_div.index_select(0, self.t)
            new_len = (self.t + 1).expand_as(tok)
        else:
            fscore = top_scores / ((t + 1) ** self.length_penalty)
            new_len = torch.full_like(tok, t + 1)
        es_true = self.early_stopping is True
        fscore = fscore + (self.fin_valid.all(-1, keepdim=True) & es_true).to(torch.float32) * _NEG
        fscore = fscore + (~self.unsatisfied).to(torch.float32) * _NEG
        fscore = fscore + (~just).to(torch.float32) * _NEG
        merged = torch.cat([self.fin_scores, fscore], dim=1)
        keep = torch.topk(merged, k, dim=-1).indices
        self._set(fin_seq=_gather(torch.cat([self.fin_seq, top_seq], dim=1), keep), fin_scores=_gather(merged, keep),
                  fin_valid=_gather(torch.cat([self.fin_valid, just], dim=1), keep),
                  fin_len=_gather(torch.cat([self.fin_len, new_len], dim=1), keep))  # fmt: skip

        # can a live beam still improve on the kept hypotheses? (HF's heuristic)
        if static:
            best_live = self.run_scores[:, :1] / self.live_div.index_select(0, self.t)
        else:
            best_live = self.run_scores[:, :1] / (self._hyp_len(t) ** self.length_penalty)
        worst = torch.where(self.fin_valid, self.fin_scores.min(dim=-1, keepdim=True).values, _NEG)
        self._set(unsatisfied=self.unsatisfied & (best_live > worst).any(dim=-1, keepdim=True))
        done = ~self.unsatisfied[:, 0] | (self.fin_valid.all(-1) & es_true)
        if static:
            self.done.index_copy_(0, self.t, done.all().reshape(1))
            self.t += 1
        else:
            self.rows_done = done

    def advance(self) -> None:
        """Reorder both models' state with the live beams and feed their last tokens."""
        self.dec.reorder((self.run_src + self.offsets).reshape(-1))
        self.dec.advance(self.run_tok.reshape(-1))

    def step(self) -> None:
        """``static``: one decoding step after the first (the body a CUDA graph captures)."""
        self.advance()
        self.score()

    def result(self, input_ids: torch.Tensor, last_t: int) -> torch.Tensor:
        """``input_ids`` followed by each row's best hypothesis, cut to the longest (``last_t``: the last step run).
        ``input_ids`` may hold fewer rows than the search (a GraphDecoder's batch completed with copies of its first
        row): the result and its length are those of its rows only."""
        rows = input_ids.shape[0]
        best_seq, best_len = self.fin_seq[:rows, 0], self.fin_len[:rows, 0]
        usable = self.fin_valid[:rows, 0] & torch.isfinite(self.fin_scores[:rows, 0])
        if not bool(usable.all()):  # only -inf hypotheses: take the best live beam (module docstring)
            best_seq = torch.where(usable[:, None], best_seq, self.run_seq[:rows, 0])
            best_len = torch.where(usable, best_len, torch.full_like(best_len, last_t + 1))
        new = int(best_len.max())
        return torch.cat([input_ids, best_seq[:, :new]], dim=1)


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
    static: bool = False,
    capture: bool | None = None,
    warmup: int = 2,
    check_every: int = 8,
) -> torch.Tensor:
    """Beam search with both caches; returns ``[B, L + T]`` (validated options: see ``tcopilot.generate``).

    ``static`` (``generate(num_beams=k, cuda_graph=True)``): static caches and a device-side step, captured in a
    CUDA graph after ``warmup`` eager steps when ``capture`` (default: on CUDA tensors), else run eagerly; the host
    looks at the "every row done" flags every ``check_every`` steps. Same tokens as the eager search.
    """
    from tcopilot.generate import _PairDecoder, _uses_copilot

    bsz, length = input_ids.shape
    k, steps = num_beams, max_new_tokens
    use_copilot = _uses_copilot(model, lam)
    with pilot_states(model.pilot) as states:
        dec = _PairDecoder(model, states, use_copilot, static=static)
        dec.prefill(input_ids.repeat_interleave(k, dim=0), attention_mask.repeat_interleave(k, dim=0), max_new_tokens)
        search = _BeamState(dec, bsz, k, steps, eos_token_ids, pad_token_id, lam, fusion, length_penalty,
                            early_stopping, static)  # fmt: skip
        if not static:
            for t in range(steps):
                search.score(t)
                if t == steps - 1 or bool(search.rows_done.all()):
                    break
                search.advance()
            return search.result(input_ids, t)
        from tcopilot.graph_decode import _after_first_token, _check_capturable

        capture = input_ids.is_cuda if capture is None else capture
        if capture:
            _check_capturable(model, dec, None)
        search.score(0)
        done_at, _ = _after_first_token(search, steps, input_ids.device, capture=capture, warmup=warmup,
                                        check_every=check_every)  # the steps that count (<= steps)
        return search.result(input_ids, done_at - 1)


__all__ = ["beam_search", "beam_log_probs"]
