"""Pure-PyTorch production path for ``rectified_next_token`` (semantics: ``api.rectified_next_token``).

Follows the reference's arithmetic step for step, so that for the same generator state both pick the
same token, but without host syncs and without sorting the vocabulary where ``topk`` suffices:
top-k alone uses ``topk``; top-p sorts only the ``top_k`` survivors when top-k is on, else the row.
"""

from __future__ import annotations

import torch


def _lam_column(lam: float | torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    if isinstance(lam, torch.Tensor):
        return lam.to(device=device, dtype=torch.float32).reshape(-1).expand(batch)[:, None]
    return torch.full((batch, 1), float(lam), dtype=torch.float32, device=device)


def rectified_next_token_torch(
    pilot_logits: torch.Tensor,
    copilot_out: torch.Tensor,
    *,
    lam: float | torch.Tensor,
    fusion: str,
    temperature: float,
    top_k: int,
    top_p: float,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Next token [B] int64 on validated inputs."""
    z = pilot_logits.float()
    f = copilot_out.float()
    batch, vocab = z.shape
    lam = _lam_column(lam, batch, z.device)

    if fusion == "probs":
        fused = torch.softmax(z, dim=-1) + lam * f
        if temperature == 0:
            return torch.argmax(fused, dim=-1)
        w = torch.log(fused.clamp_(min=0.0))
    else:
        fused = z + lam * f
        if temperature == 0:
            return torch.argmax(fused, dim=-1)
        w = fused

    row_max = w.amax(dim=-1, keepdim=True)
    dead = torch.isneginf(row_max)
    w = w.sub_(row_max.masked_fill(dead, 0.0)).div_(temperature)
    if fusion == "probs":
        # A row with no positive p~ left becomes one-hot at argmax z; written as a masked fill plus a
        # one-element scatter per row so that no host sync is needed to find such rows.
        target = torch.argmax(z, dim=-1, keepdim=True)
        w = w.masked_fill_(dead, float("-inf"))
        w.scatter_(1, target, torch.where(dead, 0.0, w.gather(1, target)))

    top_k_on = 0 < top_k < vocab
    if top_k_on:
        kth = torch.topk(w, top_k, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
        w = w.masked_fill_(w < kth, float("-inf"))

    if top_p < 1.0:
        probs = torch.softmax(w, dim=-1)
        # With top-k on, every probability outside the k largest is 0 or tied with the k-th, so the
        # sorted prefix that decides the threshold lies within the k largest.
        if top_k_on:
            sorted_probs = torch.topk(probs, top_k, dim=-1, sorted=True).values
        else:
            sorted_probs = torch.sort(probs, dim=-1, descending=True).values
        mass = torch.cumsum(sorted_probs, dim=-1)
        n_keep = (mass[:, :-1] < top_p).sum(dim=-1, keepdim=True) + 1
        smallest_kept = sorted_probs.gather(1, n_keep - 1)
        w = w.masked_fill_(probs < smallest_kept, float("-inf"))

    probs = torch.softmax(w, dim=-1)
    u = torch.rand(probs.shape, generator=generator, device=probs.device, dtype=torch.float32)
    # torch.rand can return exactly 0; clamping keeps every kept token's race time finite.
    u = u.clamp_(min=torch.finfo(torch.float32).tiny)
    return torch.argmax(torch.log(probs) - torch.log(-torch.log(u)), dim=-1)
