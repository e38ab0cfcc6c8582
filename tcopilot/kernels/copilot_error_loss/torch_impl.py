"""Pure-PyTorch path of :func:`tcopilot.copilot_error_loss`: the Gram form of DESIGN.md 4.2.

``||f_i - ell_i||^2`` is expanded so that nothing of size V per row is ever formed:

- ``||f_i||^2 = g_i^T (B^T B) g_i + 2 g_i.(B^T b) + ||b||^2``
- ``f_i.ell_i = (B[y_i].g_i + b[y_i]) - (U_i[c:2c].g_i + U_i[2c])``, ``U = capture.p_values``
- ``||ell_i||^2 = 1 - 2 p_i[y_i] + sum_v p_iv^2``

Cost ``O(N c^2 + V c^2)``. Plain autograd gives the gradients in ``g``, ``B``, ``b`` and ``U``; the latter
then flows into ``values`` through the capture's backward. Inputs are assumed validated by :mod:`.api`.
"""

from __future__ import annotations

import torch


def _safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """``sqrt(max(x, 0))`` with a zero (not NaN, not inf) gradient where ``x <= 0``; NaN and +inf pass through.

    ``x <= 0`` (rounding can push the Gram form of a ~0 error below zero) is the branch that is zeroed, and it
    is False for NaN: a diverged Copilot or Pilot gives a NaN loss, as the reference does, never a perfect 0.
    """
    nonpos = x <= 0
    # The untaken branch is evaluated too; feeding it 1 keeps its gradient finite so where() can zero it.
    root = torch.sqrt(torch.where(nonpos, torch.ones_like(x), x))
    return torch.where(nonpos, torch.zeros_like(root), root)


def copilot_error_loss_torch(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    capture,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Token RMSE from the capture's statistics; 0-d fp32 (fp64 when ``hidden`` and ``weight`` are fp64)."""
    cd = torch.float64 if (hidden.dtype == torch.float64 and weight.dtype == torch.float64) else torch.float32
    c = hidden.shape[1]
    g = hidden.to(cd)
    w = weight.to(cd)
    u = capture.p_values.to(cd)
    labels = labels.long()
    counted = labels != ignore_index
    y = torch.where(counted, labels, torch.zeros_like(labels))

    gram = w.T @ w
    f_sq = ((g @ gram) * g).sum(dim=1)
    f_y = (w[y] * g).sum(dim=1)
    f_p = (u[:, c : 2 * c] * g).sum(dim=1)
    if bias is not None:
        b = bias.to(cd)
        f_sq = f_sq + 2.0 * (g @ (w.T @ b)) + (b * b).sum()
        f_y = f_y + b[y]
        f_p = f_p + u[:, 2 * c]
    ell_sq = 1.0 - 2.0 * capture.p_target.detach().to(cd) + capture.p_sq_sum.detach().to(cd)
    row = f_sq - 2.0 * (f_y - f_p) + ell_sq
    row = torch.where(counted, row, torch.zeros_like(row))
    mse = row.sum() / counted.sum().clamp(min=1).to(cd)
    return _safe_sqrt(mse)
