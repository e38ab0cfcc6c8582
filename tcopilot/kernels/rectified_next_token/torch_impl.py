"""Pure-PyTorch production path for ``rectified_next_token`` (semantics: ``api.rectified_next_token``).

Follows the reference's arithmetic step for step, so that for the same generator state both pick the
same token, but without host syncs and without sorting the vocabulary where ``topk`` suffices:
top-k alone uses ``topk``; top-p sorts only the ``top_k`` survivors when top-k is on, else the row.
"""

from __future__ import annotations

import torch

from .philox import philox_uniforms


def _column(value, batch: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A per-row option as a [B, 1] column (a number, or a [B] or 0-d tensor, already validated)."""
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=dtype).reshape(-1).expand(batch)[:, None]
    return torch.full((batch, 1), value, dtype=dtype, device=device)


def rectified_next_token_torch(
    pilot_logits: torch.Tensor,
    copilot_out: torch.Tensor,
    *,
    lam: float | torch.Tensor,
    fusion: str,
    temperature: float | torch.Tensor,
    top_k: int | torch.Tensor,
    top_p: float | torch.Tensor,
    generator: torch.Generator | None,
    seed: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Next token [B] int64 on validated inputs.

    ``temperature``, ``top_k``, ``top_p`` may be [B] tensors (0 = greedy / off / 1 = off per row): the
    arithmetic is then the same per row, with a full sort of the vocabulary where a per-row ``top_k`` or
    ``top_p`` needs the sorted order (a ``topk`` of the largest k would need the largest k on the host).
    ``seed`` replaces ``torch.rand`` by the Triton kernels' Philox uniforms (``philox.py``).
    """
    z = pilot_logits.float()
    f = copilot_out.float()
    batch, vocab = z.shape
    device = z.device
    lam = _column(lam, batch, device, torch.float32)
    per_row_t = isinstance(temperature, torch.Tensor)

    if fusion == "probs":
        fused = torch.softmax(z, dim=-1) + lam * f
    else:
        fused = z + lam * f
    if not per_row_t and temperature == 0:
        return torch.argmax(fused, dim=-1)
    greedy = torch.argmax(fused, dim=-1) if per_row_t else None
    w = torch.log(fused.clamp_(min=0.0)) if fusion == "probs" else fused

    row_max = w.amax(dim=-1, keepdim=True)
    dead = torch.isneginf(row_max)
    if per_row_t:
        sampled = _column(temperature, batch, device, torch.float32)
        t_col = torch.where(sampled > 0, sampled, 1.0)  # greedy rows: any finite weights do, their token is set below
    else:
        t_col = temperature
    w = w.sub_(row_max.masked_fill(dead, 0.0)).div_(t_col)
    if fusion == "probs":
        # A row with no positive p~ left becomes one-hot at argmax z; written as a masked fill plus a
        # one-element scatter per row so that no host sync is needed to find such rows.
        target = torch.argmax(z, dim=-1, keepdim=True)
        w = w.masked_fill_(dead, float("-inf"))
        w.scatter_(1, target, torch.where(dead, 0.0, w.gather(1, target)))

    sorted_w = None
    if isinstance(top_k, torch.Tensor):
        k_col = _column(top_k, batch, device, torch.int64)
        sorted_w = torch.sort(w, dim=-1, descending=True).values
        kth = sorted_w.gather(1, (k_col - 1).clamp(0, vocab - 1))
        w = w.masked_fill_((k_col > 0) & (k_col < vocab) & (w < kth), float("-inf"))
        top_k_on = False  # the top-p prefix below sorts the whole row
    else:
        top_k_on = 0 < top_k < vocab
        if top_k_on:
            kth = torch.topk(w, top_k, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
            w = w.masked_fill_(w < kth, float("-inf"))

    per_row_p = isinstance(top_p, torch.Tensor)
    if per_row_p or top_p < 1.0:
        p_col = _column(top_p, batch, device, torch.float32) if per_row_p else top_p
        probs = torch.softmax(w, dim=-1)
        # With top-k on, every probability outside the k largest is 0 or tied with the k-th, so the
        # sorted prefix that decides the threshold lies within the k largest.
        if top_k_on:
            sorted_probs = torch.topk(probs, top_k, dim=-1, sorted=True).values
        else:
            sorted_probs = torch.sort(probs, dim=-1, descending=True).values
        mass = torch.cumsum(sorted_probs, dim=-1)
        n_keep = (mass[:, :-1] < p_col).sum(dim=-1, keepdim=True) + 1
        smallest_kept = sorted_probs.gather(1, n_keep - 1)
        drop = probs < smallest_kept
        if per_row_p:
            drop &= p_col < 1.0
        w = w.masked_fill_(drop, float("-inf"))

    probs = torch.softmax(w, dim=-1)
    if seed is not None:
        u = philox_uniforms(seed, batch, vocab, device)
    else:
        u = torch.rand(probs.shape, generator=generator, device=device, dtype=torch.float32)
    # torch.rand can return exactly 0; clamping keeps every kept token's race time finite.
    u = u.clamp_(min=torch.finfo(torch.float32).tiny)
    token = torch.argmax(torch.log(probs) - torch.log(-torch.log(u)), dim=-1)
    if per_row_t:
        token = torch.where(sampled[:, 0] > 0, token, greedy)
    return token
