"""Naive oracle for ``rectified_next_token``: the final sampling distribution, materialised step by step.

The semantics are documented in ``api.rectified_next_token``; this file is their executable form and
sorts the whole vocabulary wherever that is the plainest way to say what is kept. Per-row
``temperature`` / ``top_k`` / ``top_p`` tensors are served the plainest way too: row by row, each row with
its own numbers, exactly as a batch of one.
"""

from __future__ import annotations

import torch

from .philox import philox_uniforms


def _lam_column(lam, batch: int, device: torch.device) -> torch.Tensor:
    if isinstance(lam, torch.Tensor):
        return lam.to(device=device, dtype=torch.float32).reshape(-1).expand(batch)[:, None]
    return torch.full((batch, 1), float(lam), dtype=torch.float32, device=device)


def _one_hot(ids: torch.Tensor, vocab: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(ids, vocab).to(torch.float32)


def _row_values(value, batch: int) -> list:
    """A per-row option as ``batch`` Python numbers (a number repeats; a [B] or 0-d tensor is read out)."""
    if isinstance(value, torch.Tensor):
        return value.reshape(-1).expand(batch).tolist()
    return [value] * batch


def rectified_probs_reference(
    pilot_logits: torch.Tensor,
    copilot_out: torch.Tensor,
    *,
    lam: float | torch.Tensor = 1.0,
    fusion: str = "probs",
    temperature: float | torch.Tensor = 0.0,
    top_k: int | torch.Tensor = 0,
    top_p: float | torch.Tensor = 1.0,
) -> torch.Tensor:
    """The distribution ``rectified_next_token`` samples from, [B, V] fp32 (rows sum to 1).

    ``temperature == 0`` gives a one-hot row at the greedy token; so does a ``fusion="probs"`` row whose
    clamped ``p~`` is all zero (at ``argmax z``). ``temperature``, ``top_k`` and ``top_p`` may be [B] tensors:
    each row is then computed alone with its own values.
    """
    if any(isinstance(x, torch.Tensor) for x in (temperature, top_k, top_p)):
        batch = pilot_logits.shape[0]
        lam_col = _lam_column(lam, batch, pilot_logits.device)
        rows = [
            _rectified_probs_row(pilot_logits[b : b + 1], copilot_out[b : b + 1], lam_col[b : b + 1], fusion,
                                 float(t), int(k), float(p))  # fmt: skip
            for b, (t, k, p) in enumerate(zip(*(_row_values(x, batch) for x in (temperature, top_k, top_p))))
        ]
        return torch.cat(rows) if rows else torch.empty(pilot_logits.shape, device=pilot_logits.device)
    return _rectified_probs_row(pilot_logits, copilot_out, lam, fusion, temperature, top_k, top_p)


def _rectified_probs_row(pilot_logits, copilot_out, lam, fusion, temperature, top_k, top_p) -> torch.Tensor:
    """``rectified_probs_reference`` with numbers for the filters (rows of one setting)."""
    z = pilot_logits.float()
    f = copilot_out.float()
    batch, vocab = z.shape
    lam = _lam_column(lam, batch, z.device)

    # Step 1: fuse; `weights` is the unnormalised log-weight of each token before temperature.
    if fusion == "probs":
        p_tilde = torch.softmax(z, dim=-1) + lam * f
        if temperature == 0:
            return _one_hot(torch.argmax(p_tilde, dim=-1), vocab)
        weights = torch.log(torch.clamp(p_tilde, min=0.0))
    else:
        z_tilde = z + lam * f
        if temperature == 0:
            return _one_hot(torch.argmax(z_tilde, dim=-1), vocab)
        weights = z_tilde

    # Step 2: temperature. Subtracting the row maximum first changes nothing mathematically and keeps
    # a tiny temperature from turning finite weights into +inf.
    row_max = weights.max(dim=-1, keepdim=True).values
    dead = torch.isneginf(row_max)  # every clamped p~ was 0: fall back to the Pilot's argmax
    row_max = torch.where(dead, torch.zeros_like(row_max), row_max)
    weights = (weights - row_max) / temperature
    fallback = torch.full_like(weights, float("-inf"))
    fallback.scatter_(1, torch.argmax(z, dim=-1, keepdim=True), 0.0)
    weights = torch.where(dead, fallback, weights)

    # Step 3: top-k, keeping every token at least as large as the k-th largest (ties all stay).
    if 0 < top_k < vocab:
        kth = torch.sort(weights, dim=-1, descending=True).values[:, top_k - 1 : top_k]
        weights = weights.masked_fill(weights < kth, float("-inf"))

    # Step 4: top-p on the renormalised distribution: the smallest prefix of the sorted probabilities
    # whose mass reaches top_p (the first token always), then every token tied with its last member.
    if top_p < 1.0:
        probs = torch.softmax(weights, dim=-1)
        sorted_probs = torch.sort(probs, dim=-1, descending=True).values
        mass = torch.cumsum(sorted_probs, dim=-1)
        mass_before = torch.cat([torch.zeros_like(mass[:, :1]), mass[:, :-1]], dim=1)
        n_keep = (mass_before < top_p).sum(dim=-1, keepdim=True)
        smallest_kept = sorted_probs.gather(1, n_keep - 1)
        weights = weights.masked_fill(probs < smallest_kept, float("-inf"))

    # Step 5: renormalise.
    return torch.softmax(weights, dim=-1)


def rectified_next_token_reference(
    pilot_logits: torch.Tensor,
    copilot_out: torch.Tensor,
    *,
    lam: float | torch.Tensor = 1.0,
    fusion: str = "probs",
    temperature: float | torch.Tensor = 0.0,
    top_k: int | torch.Tensor = 0,
    top_p: float | torch.Tensor = 1.0,
    generator: torch.Generator | None = None,
    seed: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Next token [B] int64, drawn from ``rectified_probs_reference`` by the documented Gumbel-max race.

    A ``temperature`` number 0 draws no random numbers; a ``temperature`` tensor draws them for the whole
    batch (its greedy rows ignore them). The uniforms are ``torch.rand([B, V], generator)``, or with
    ``seed`` the counter-based ``philox.philox_uniforms`` (what the Triton kernels draw in-kernel).
    """
    probs = rectified_probs_reference(
        pilot_logits, copilot_out, lam=lam, fusion=fusion, temperature=temperature, top_k=top_k, top_p=top_p
    )
    if not isinstance(temperature, torch.Tensor) and temperature == 0:
        return torch.argmax(probs, dim=-1)
    if seed is not None:
        u = philox_uniforms(seed, probs.shape[0], probs.shape[1], probs.device)
    else:
        u = torch.rand(probs.shape, generator=generator, device=probs.device, dtype=torch.float32)
    u = torch.clamp(u, min=torch.finfo(torch.float32).tiny)
    # A greedy row (temperature 0) is one-hot: the race can only pick its token.
    return torch.argmax(torch.log(probs) - torch.log(-torch.log(u)), dim=-1)
