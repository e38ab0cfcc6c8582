"""The result type of :func:`tcopilot.logit_capture`, shared by every implementation.

It lives in its own module so that ``api``, ``reference``, ``torch_impl`` and ``triton_impl`` can all import
it without importing each other.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Capture(NamedTuple):
    """The Pilot loss and the per-token Mistake Log statistics of one pass over the vocabulary.

    Fields (N rows, K = ``topk``, k = ``values.shape[1]``; fp32, or fp64 when the inputs are fp64):

    - ``loss``: the Pilot loss, a scalar for ``reduction`` "mean"/"sum", ``[N]`` for "none".
    - ``lse``: ``[N]`` log-sum-exp of the (capped) logits, every row.
    - ``p_target``: ``[N]`` probability of the label, 0.0 on ignored rows.
    - ``p_sq_sum``: ``[N]`` ``sum_v p_v^2``, every row.
    - ``p_values``: ``[N, k]`` ``p @ values``, every row; ``None`` without ``values``.
    - ``topk_ids``: ``[N, K]`` int64 ids of the K largest (capped) logits, descending, ties lowest id first;
      ``None`` when ``topk=0``.
    - ``topk_logits``: ``[N, K]`` those logits; ``None`` when ``topk=0``.

    Only ``loss`` (into hidden and weight) and ``p_values`` (into values) carry gradients.
    """

    loss: torch.Tensor
    lse: torch.Tensor
    p_target: torch.Tensor
    p_sq_sum: torch.Tensor
    p_values: torch.Tensor | None = None
    topk_ids: torch.Tensor | None = None
    topk_logits: torch.Tensor | None = None
