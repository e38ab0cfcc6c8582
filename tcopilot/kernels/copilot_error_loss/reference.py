"""Naive oracle for :func:`tcopilot.copilot_error_loss`: materialises the error ``ell`` and the output ``f``.

Readable first, ``[N x V]`` tensors and all; the tests compare the Gram-form implementations against it.
"""

from __future__ import annotations

import torch


def copilot_error_loss_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    pilot_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Token RMSE ``sqrt(mean over counted rows of ||f_i - ell_i||^2)`` (0.0 when no row is counted).

    ``f = hidden @ weight.T + bias`` ([N, V]); ``ell = onehot(labels) - softmax(pilot_logits)``, detached
    from the Pilot. fp32 math (fp64 when ``hidden`` is fp64).
    """
    cd = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    f = hidden.to(cd) @ weight.to(cd).T
    if bias is not None:
        f = f + bias.to(cd)
    labels = labels.long()
    counted = labels != ignore_index
    y = torch.where(counted, labels, torch.zeros_like(labels))
    p = torch.softmax(pilot_logits.detach().to(cd), dim=1)
    ell = torch.nn.functional.one_hot(y, p.shape[1]).to(cd) - p
    row = ((f - ell) ** 2).sum(dim=1)
    n = counted.sum()
    if int(n) == 0:
        # Keeps the graph (zero gradients) rather than returning a constant.
        return (row * 0).sum()
    mse = row[counted].sum() / n
    return torch.sqrt(mse)
