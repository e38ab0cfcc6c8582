"""Naive oracle for ``log_attention``: materialises the full score matrix and the boolean mask.

Written for clarity, not memory: the tests compare every other implementation against it.
"""

from __future__ import annotations

import math

import torch


def log_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Position-masked attention, the readable way.

    Args:
        q: [B, Hq, Lq, D] queries.
        k: [B, Hk, Lk, D] keys, Hq a multiple of Hk (query head h reads kv head h // (Hq // Hk)).
        v: [B, Hk, Lk, Dv] values.
        q_pos: [B, Lq] integer position of every query.
        k_pos: [B, Lk] integer position of every key; negative = padding, never visible.
        scale: score scale, default 1 / sqrt(D).

    Returns:
        [B, Hq, Lq, Dv] in q's dtype. Key j is visible to query i iff 0 <= k_pos[b, j] <= q_pos[b, i];
        a query with no visible key gets zeros (and zero gradients).
    """
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    group = q.shape[1] // k.shape[1]
    kf = k.to(acc).repeat_interleave(group, dim=1)
    vf = v.to(acc).repeat_interleave(group, dim=1)

    visible = (k_pos[:, None, :] >= 0) & (k_pos[:, None, :] <= q_pos[:, :, None])  # [B, Lq, Lk]
    visible = visible[:, None]  # broadcast over heads
    any_visible = visible.any(dim=-1, keepdim=True)

    scores = torch.matmul(q.to(acc), kf.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~visible, float("-inf"))
    # A row of all -inf would give NaN from softmax; give it finite scores, then zero it below.
    scores = scores.masked_fill(~any_visible, 0.0)
    probs = torch.softmax(scores, dim=-1)
    probs = torch.where(any_visible, probs, torch.zeros_like(probs))
    return torch.matmul(probs, vf).to(q.dtype)
