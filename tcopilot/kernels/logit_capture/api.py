"""Public entry point :func:`logit_capture`: validation, implementation dispatch, documentation."""

from __future__ import annotations

import math

import torch

from tcopilot._validation import (
    FLOAT_DTYPES,
    IMPLS,
    check_choice,
    check_finite,
    check_labels,
    check_tensor,
    resolve_impl,
)

from .capture import Capture
from .torch_impl import logit_capture_torch

REDUCTIONS = ("mean", "sum", "none")
LABEL_DTYPES = (torch.int32, torch.int64)


def _load_triton(impl: str):
    """The Triton implementation, or ``None`` when this build has none.

    Imported lazily so that ``import tcopilot`` works without Triton. A missing ``triton`` package is an
    error only when the caller asked for ``impl="triton"`` explicitly; ``"auto"`` then uses PyTorch.
    """
    try:
        from .triton_impl import logit_capture_triton
    except ModuleNotFoundError as err:
        if err.name == f"{__package__}.triton_impl":
            return None
        if err.name == "triton" and impl != "triton":
            return None
        if err.name == "triton":
            raise ImportError("impl: 'triton' needs the 'triton' package, which is not installed") from err
        raise
    return logit_capture_triton


def _check_num_items(num_items_in_batch, reduction: str):
    if num_items_in_batch is None:
        return None
    if isinstance(num_items_in_batch, torch.Tensor):
        if num_items_in_batch.numel() != 1:
            raise ValueError(
                "num_items_in_batch: expected a number or a one-element tensor, "
                f"got a tensor of shape {tuple(num_items_in_batch.shape)}"
            )
        value = num_items_in_batch.item()
    else:
        value = num_items_in_batch
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not is_number or not math.isfinite(value) or value <= 0:
        raise ValueError(f"num_items_in_batch: expected a finite number > 0, got {value!r}")
    if reduction != "mean":
        # Silently ignoring it would hand back a loss off by the token count.
        raise ValueError(
            f"num_items_in_batch: only used with reduction='mean', got reduction={reduction!r} "
            "(pass num_items_in_batch=None)"
        )
    return num_items_in_batch


def logit_capture(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    values: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    topk: int = 0,
    softcap: float | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    token_weights: torch.Tensor | None = None,
    num_items_in_batch=None,
    impl: str = "auto",
) -> Capture:
    r"""The Pilot's LM-head loss and the Mistake Log statistics, without a ``[N x V]`` tensor.

    For every row ``i`` the logits are ``z_i = weight @ hidden_i`` (fp32 accumulation), soft-capped to
    ``softcap * tanh(z_i / softcap)`` when ``softcap`` is given; ``p_i = softmax(z_i)``. One pass over the
    vocabulary yields the loss and, per row, ``lse_i``, ``p_i[y_i]``, ``sum_v p_iv^2``, ``p_i @ values`` and
    optionally the top-k logits (DESIGN.md 4.1). With the Copilot's
    ``values = [error_in.weight.T | error_out.weight | error_out.bias[:, None]]`` these give the Copilot's
    input embedding and loss exactly (see :func:`tcopilot.copilot_error_loss`).

    Args:
        hidden: ``[N, d]`` final hidden states, fp16/bf16/fp32/fp64 (any strides). ``N >= 1``.
        weight: ``[V, d]`` LM-head weight, same dtype and device as ``hidden``.
        labels: ``[N]`` int32/int64 target ids in ``[0, V)``, or ``ignore_index`` for rows that do not count.
        values: optional ``[V, k]`` float tensor (any float dtype); ``p_values = p @ values``.
        ignore_index: label value of rows that are not counted (0 loss, 0 gradient, ``p_target = 0``).
        reduction: ``"mean"`` (sum over counted rows / ``num_items_in_batch`` or the number of counted rows;
            0.0 when none is counted), ``"sum"`` or ``"none"`` (``[N]``, 0 on ignored rows).
        topk: ``K >= 0``; with ``K > 0`` also return the K largest (capped) logits per row and their ids,
            in descending order, equal logits by ascending id (the compressed log of DESIGN.md 4.4).
        softcap: ``None`` or a finite ``> 0`` cap (Gemma-2 final-logit soft-capping). All statistics then
            describe the softmax of the capped logits.
        label_smoothing: ``eps`` in ``[0, 1)``; the row loss becomes
            ``(1 - eps) * ce_i + eps * (lse_i - mean_v z_iv)``. Changes the loss only, not the statistics.
        z_loss: ``>= 0``; adds ``z_loss * lse_i**2`` to each counted row's loss.
        token_weights: optional ``[N]`` float per-row loss weights (applied after smoothing and z-loss).
            They receive no gradient.
        num_items_in_batch: optional number (or one-element tensor) ``> 0``: the denominator of
            ``reduction="mean"`` for gradient accumulation over micro-batches. Only valid with "mean".
        impl: ``"auto"`` (Triton on CUDA when available, else PyTorch), ``"torch"`` (chunked PyTorch, never
            holds ``[N x V]``) or ``"triton"`` (no silent fallback).

    Returns:
        :class:`Capture` ``(loss, lse, p_target, p_sq_sum, p_values, topk_ids, topk_logits)``. Statistics
        are fp32 (fp64 for fp64 inputs): ``lse [N]``, ``p_target [N]``, ``p_sq_sum [N]``,
        ``p_values [N, k]`` or ``None``, ``topk_ids [N, K]`` int64 or ``None``, ``topk_logits [N, K]`` or
        ``None``. ``loss`` is a scalar, or ``[N]`` with ``reduction="none"``.

    Gradients:
        ``loss`` -> ``hidden`` and ``weight`` (``dz = (p - target) * dloss``, ``d weight`` accumulated in
        fp32); ``p_values`` -> ``values`` only (``P^T @ d p_values``): the Mistake Log is detached from the
        Pilot. ``lse``, ``p_target``, ``p_sq_sum`` and the top-k outputs carry no gradient. Gradients come
        back in each input's dtype.

    Raises:
        ValueError: naming the argument, with the expected and the received value, for a bad shape, dtype,
            device, label, option or an empty batch.
        NotImplementedError: ``impl="triton"`` in a build without the Triton kernels.

    Example:
        >>> h = torch.randn(8, 16, requires_grad=True)
        >>> w = torch.randn(100, 16, requires_grad=True)
        >>> y = torch.randint(0, 100, (8,))
        >>> cap = logit_capture(h, w, y, topk=4)
        >>> cap.loss.backward()
        >>> cap.lse.shape, cap.topk_ids.shape
        (torch.Size([8]), torch.Size([8, 4]))
    """
    check_choice("impl", impl, IMPLS)
    check_tensor("hidden", hidden, ndim=2, dtypes=FLOAT_DTYPES)
    n, d = hidden.shape
    device = hidden.device
    check_tensor("weight", weight, ndim=2, dtypes=FLOAT_DTYPES, device=device, shape=(None, d))
    if weight.dtype != hidden.dtype:
        raise ValueError(
            f"weight: expected dtype {str(hidden.dtype).replace('torch.', '')} (the dtype of hidden), "
            f"got {str(weight.dtype).replace('torch.', '')}"
        )
    vocab = weight.shape[0]
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index: expected an int, got {ignore_index!r}")
    check_tensor("labels", labels, ndim=1, dtypes=LABEL_DTYPES, device=device, shape=(n,))
    check_labels("labels", labels, vocab, ignore_index)
    if values is not None:
        check_tensor("values", values, ndim=2, dtypes=FLOAT_DTYPES, device=device, shape=(vocab, None))
    check_choice("reduction", reduction, REDUCTIONS)
    if isinstance(topk, bool) or not isinstance(topk, int) or not 0 <= topk <= vocab:
        raise ValueError(f"topk: expected an int in [0, {vocab}] (the vocabulary size), got {topk!r}")
    if softcap is not None:
        check_finite("softcap", softcap)
        if softcap <= 0:
            raise ValueError(f"softcap: expected None or a number > 0, got {softcap!r}")
    check_finite("label_smoothing", label_smoothing)
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing: expected a number in [0, 1), got {label_smoothing!r}")
    check_finite("z_loss", z_loss)
    if z_loss < 0:
        raise ValueError(f"z_loss: expected a number >= 0, got {z_loss!r}")
    if token_weights is not None:
        check_tensor("token_weights", token_weights, ndim=1, dtypes=FLOAT_DTYPES, device=device, shape=(n,))
    num_items_in_batch = _check_num_items(num_items_in_batch, reduction)

    fn = None
    if impl == "triton" or (impl == "auto" and device.type == "cuda"):
        fn = _load_triton(impl)
    resolved = resolve_impl(impl, device, "logit_capture", triton_available=fn is not None)
    kwargs = dict(
        ignore_index=ignore_index,
        reduction=reduction,
        topk=topk,
        softcap=None if softcap is None else float(softcap),
        label_smoothing=float(label_smoothing),
        z_loss=float(z_loss),
        token_weights=token_weights,
        num_items_in_batch=num_items_in_batch,
    )
    if resolved == "triton":
        return fn(hidden, weight, labels, values, **kwargs)
    return logit_capture_torch(hidden, weight, labels, values, **kwargs)
