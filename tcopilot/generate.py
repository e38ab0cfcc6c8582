"""Rectified decoding (paper, Algorithm 2) with KV caches for the Pilot and the Copilot.

Per step: the Pilot decodes one token with its cache, hooks give the new position's ``X~`` and pooled
state, the Copilot decodes one position with its own caches (self-attention over its stream, attention
over the growing log), ``f = error_out(g)`` rectifies the Pilot's distribution and
:func:`tcopilot.rectified_next_token` picks the token. The Copilot's next input is its own output fed
back: ``error_in(f) = g @ M + m`` with the c x c matrix ``M`` computed once per call.

Prompt positions are treated as uncounted (their errors are not known to the model at inference), so
the Copilot reads "no error" (the bias of ``error_in``) there, exactly as in training where the loss
covers response tokens only.
"""

from __future__ import annotations

import torch

from tcopilot._validation import check_choice, check_finite
from tcopilot.kernels.rectified_next_token import rectified_next_token
from tcopilot.pilot import pilot_states, positions_from_mask, run_base


def _pilot_logits(model, hidden_last: torch.Tensor) -> torch.Tensor:
    w = model.pilot.get_output_embeddings()
    z = w(hidden_last).float()
    cap = model.softcap
    if cap:
        z = cap * torch.tanh(z / cap)
    return z


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    lam: float = 1.0,
    fusion: str = "probs",
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Generate with the Pilot rectified by the Copilot; returns ``[B, L + new]`` token ids.

    Args:
        model: a :class:`tcopilot.TransformerCopilot` (its ``copilot`` may be None: Pilot alone).
        input_ids / attention_mask: ``[B, L]`` prompts, left-padded when lengths differ.
        max_new_tokens: how many tokens to add at most (all rows stop early once every row hit EOS).
        lam: the Copilot's weight lambda; ``lam=0`` gives exactly the Pilot's own tokens (the Copilot
            is then not run at all).
        fusion: ``"probs"`` (paper Eq. 8, ``softmax(z) + lam*f``) or ``"logits"`` (``z + lam*f``).
        temperature / top_k / top_p / generator: sampling; ``temperature=0`` is greedy.
        eos_token_id / pad_token_id: rows that emitted EOS are padded with ``pad_token_id`` afterwards
            (default: the EOS id, else 0).
    """
    if input_ids.dim() != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids: expected a non-empty [batch, length] tensor, got {tuple(input_ids.shape)}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens: expected an int >= 0, got {max_new_tokens!r}")
    check_finite("lam", lam)
    check_choice("fusion", fusion, ("probs", "logits"))
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask: expected shape {tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}")
    if pad_token_id is None:
        pad_token_id = eos_token_id if eos_token_id is not None else 0

    pilot, copilot = model.pilot, model.copilot
    use_copilot = copilot is not None and lam != 0.0
    base = pilot.base_model
    device = input_ids.device
    bsz = input_ids.shape[0]
    mask = attention_mask.clone()
    pos = positions_from_mask(mask)
    out_ids = input_ids
    finished = torch.zeros(bsz, dtype=torch.bool, device=device)
    if max_new_tokens == 0:
        return out_ids

    with pilot_states(pilot) as states:
        hidden, cache = run_base(base, input_ids, mask, pos.clamp(min=0), use_cache=True)
        z = _pilot_logits(model, hidden[:, -1])
        if use_copilot:
            ccache = copilot.new_cache()
            m_mat, m_vec = copilot.feedback_matrices()
            wdtype = copilot.error_in.weight.dtype
            stream = copilot.error_in.bias.to(wdtype).expand(bsz, input_ids.shape[1], -1)
            log = torch.cat([states.x_tilde, states.pooled.to(states.x_tilde.dtype)], dim=1)
            g = copilot(stream, log, pos, torch.cat([pos, pos], 1), cache=ccache)[:, -1]
        cur_pos = pos[:, -1].clamp(min=-1)
        for step in range(max_new_tokens):
            f = copilot.error_out(g).float() if use_copilot else torch.zeros_like(z)
            nxt = rectified_next_token(
                z, f, lam=lam if use_copilot else 0.0, fusion=fusion, temperature=temperature,
                top_k=top_k, top_p=top_p, generator=generator, impl=impl,
            )
            nxt = torch.where(finished, torch.full_like(nxt, pad_token_id), nxt)
            out_ids = torch.cat([out_ids, nxt[:, None]], dim=1)
            if eos_token_id is not None:
                finished = finished | (nxt == eos_token_id)
            if step == max_new_tokens - 1 or bool(finished.all()):
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            cur_pos = cur_pos + 1
            new_pos = cur_pos[:, None]
            states.reset()
            hidden, cache = run_base(base, nxt[:, None], mask, new_pos.clamp(min=0), cache=cache, use_cache=True)
            z = _pilot_logits(model, hidden[:, -1])
            if use_copilot:
                fed = (g.float() @ m_mat + m_vec).to(wdtype)[:, None]  # error_in(f_prev), no V-sized product
                log = torch.cat([states.x_tilde, states.pooled.to(states.x_tilde.dtype)], dim=1)
                g = copilot(fed, log, new_pos, torch.cat([new_pos, new_pos], 1), cache=ccache)[:, -1]
    return out_ids


__all__ = ["generate"]
