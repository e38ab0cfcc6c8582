"""Naive oracle for :func:`tcopilot.logit_capture`: materialises the ``[N, V]`` logits, plain autograd.

Readable first; the tests compare every other implementation against it. It does no input validation
(the public API does that) and is not meant for large shapes.
"""

from __future__ import annotations

import torch

from .capture import Capture


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp64 inputs stay fp64 so that gradchecks and tight comparisons are possible; all else runs in fp32.
    return torch.float64 if dtype == torch.float64 else torch.float32


def logit_capture_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    values: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    topk: int = 0,
    softcap: float | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    token_weights: torch.Tensor | None = None,
    num_items_in_batch=None,
) -> Capture:
    """Same arguments and result as :func:`tcopilot.logit_capture` (without ``impl``)."""
    cd = _compute_dtype(hidden.dtype)
    z = hidden.to(cd) @ weight.to(cd).T
    if bias is not None:
        # Added to the product in the compute dtype, before the cap: z = h W^T + b, as in nn.Linear.
        z = z + bias.to(cd)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    lse = torch.logsumexp(z, dim=1)
    logp = z - lse[:, None]

    labels = labels.long()
    counted = labels != ignore_index
    y = torch.where(counted, labels, torch.zeros_like(labels))

    ce = -logp.gather(1, y[:, None]).squeeze(1)
    smooth = -logp.mean(dim=1)
    row = (1.0 - label_smoothing) * ce + label_smoothing * smooth + z_loss * lse * lse
    if token_weights is not None:
        row = row * token_weights.detach().to(cd)
    row = torch.where(counted, row, torch.zeros_like(row))

    if reduction == "none":
        loss = row
    elif reduction == "sum":
        loss = row.sum()
    else:
        if num_items_in_batch is not None:
            denom = torch.as_tensor(num_items_in_batch, dtype=cd, device=row.device)
        else:
            denom = counted.sum().clamp(min=1).to(cd)
        loss = row.sum() / denom

    # The Mistake Log is detached from the Pilot: statistics and p @ values give hidden/weight no gradient.
    p = logp.detach().exp()
    p_target = torch.where(counted, p.gather(1, y[:, None]).squeeze(1), torch.zeros_like(lse.detach()))
    p_sq_sum = (p * p).sum(dim=1)
    p_values = p @ values.to(cd) if values is not None else None

    topk_ids = topk_logits = None
    if topk > 0:
        # A stable descending sort keeps equal logits in id order: ties resolve to the lowest id first.
        srt = torch.sort(z.detach(), dim=1, descending=True, stable=True)
        topk_ids = srt.indices[:, :topk].contiguous()
        topk_logits = srt.values[:, :topk].contiguous()

    return Capture(loss, lse.detach(), p_target, p_sq_sum, p_values, topk_ids, topk_logits)
