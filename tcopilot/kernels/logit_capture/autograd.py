"""The glue every implementation of the capture shares: autograd, the loss reduction and its gradient.

An implementation is a launcher pair without autograd:

- ``fwd(hidden, weight, bias, labels, values, token_weights, denom, ignore_index, reduction, topk, softcap,
  label_smoothing, z_loss, option)`` returns ``(loss, lse, p_target, p_sq_sum, p_values, topk_ids,
  topk_logits, denom)`` with ``None`` for absent outputs; ``denom`` is the "mean" denominator actually used.
- ``bwd(hidden, weight, bias, labels, lse, token_weights, denom, g_loss, g_p_values, values_meta, *,
  need_hidden, need_weight, need_bias, ignore_index, reduction, softcap, label_smoothing, z_loss,
  <option>=...)`` returns ``(d_hidden, d_weight, d_bias, d_values)`` with ``None`` where not needed.

``bias`` (``[V]`` or ``None``) follows ``weight`` everywhere: the logits are ``hidden @ weight.T + bias``, and
``d bias`` is the column sum of the ``dz`` the loss gradient forms anyway (no extra pass over the vocabulary).

``option`` is the implementation's own knob (``chunk_size`` for PyTorch, ``tuning`` for Triton). The
eager ``torch.autograd.Function`` of each implementation gets its ``forward`` / ``backward`` from
:func:`capture_methods`; the ``torch.library`` custom op of :mod:`.api` reuses :func:`save_capture` and
:func:`capture_grads`, so all three paths save the same tensors and route the same gradients.
"""

from __future__ import annotations

import contextlib

import torch
from torch.autograd.function import once_differentiable

# hidden, weight, bias, labels, values, token_weights, denom, ignore_index, reduction, topk, softcap,
# label_smoothing, z_loss, option: only hidden, weight, bias and values can receive a gradient.
_N_INPUTS = 14


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of the statistics: fp64 for fp64 inputs (gradchecks), else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def no_autocast(device: torch.device):
    """A context in which autocast is off for ``device``'s type (a no-op when it is off already).

    The capture's math is fp32 (fp64) by design, in its own chunked GEMMs: inside a user's
    ``torch.autocast`` region those GEMMs would otherwise be recast to fp16/bf16. :mod:`.api` casts the
    inputs like a matmul would *before* the op; forward and backward then run with autocast off.
    """
    try:
        enabled = torch.is_autocast_enabled(device.type)
    except (TypeError, RuntimeError):  # torch < 2.4 (no device argument) or a device type without autocast
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, enabled=False) if enabled else contextlib.nullcontext()


def without_autocast(launcher):
    """``launcher`` (forward or backward, ``hidden`` first) run inside :func:`no_autocast`."""

    def run(hidden, *args, **kwargs):
        with no_autocast(hidden.device):
            return launcher(hidden, *args, **kwargs)

    return run


def mean_denom(num_items_in_batch, reduction: str, hidden: torch.Tensor) -> torch.Tensor | None:
    """``num_items_in_batch`` as the 0-d "mean" denominator in the accumulation dtype, or ``None`` (the
    launcher then counts the rows)."""
    if num_items_in_batch is None or reduction != "mean":
        return None
    dtype = acc_dtype(hidden.dtype)
    if not isinstance(num_items_in_batch, torch.Tensor) and not torch.compiler.is_compiling():
        # A number is filled in on the device: as_tensor would build it on the host and copy it over, a copy that
        # waits for the device. The same value as as_tensor's: a Python double (int -> double, as as_tensor
        # converts it), then cast to dtype (rounding, inf past float32's range, as as_tensor stores it).
        return torch.full((), float(num_items_in_batch), dtype=torch.float64, device=hidden.device).to(dtype)
    # dtype= in as_tensor itself: a Python float would otherwise become a float32 tensor first (fp64 inputs then
    # divide by a rounded count, e.g. 16777217.0 -> 16777216)
    return torch.as_tensor(num_items_in_batch, dtype=dtype, device=hidden.device).reshape(())


def reduce_rows(row, counted, token_weights, denom, reduction):
    """``(loss, denom)`` from the per-row losses ``row`` (accumulation dtype).

    Token weights multiply the counted rows; ``denom`` ``None`` means the number of counted rows.
    """
    if token_weights is not None:
        row = row * token_weights.detach().to(row.dtype)
    # where, not a multiply: neither an ignored row's value (the PyTorch path computes one for label 0) nor a
    # NaN/inf weight there may reach the loss.
    row = torch.where(counted, row, torch.zeros_like(row))
    if denom is None:
        denom = counted.sum().clamp(min=1).to(row.dtype)  # all rows ignored: 0 / 1 = 0, never NaN
    else:
        denom = denom.to(row.dtype)
    if reduction == "none":
        loss = row
    elif reduction == "sum":
        loss = row.sum()
    else:
        loss = row.sum() / denom
    return loss, denom


def row_grads(g_loss, counted, token_weights, denom, reduction, dtype):
    """``d loss / d row_loss`` per row, ``[N]`` contiguous in ``dtype``: the upstream gradient times the
    reduction's scale and the token weight, 0 on ignored rows (the adjoint of :func:`reduce_rows`)."""
    n = counted.shape[0]
    g = g_loss.to(dtype)
    if reduction == "none":
        coef = g
    elif reduction == "sum":
        coef = g.expand(n)
    else:
        coef = (g / denom).expand(n)
    if token_weights is not None:
        coef = coef * token_weights.detach().to(dtype)
    # where, not a multiply: a NaN upstream gradient on an ignored row must not leak.
    return torch.where(counted, coef, torch.zeros_like(coef)).contiguous()


def save_capture(ctx, saved, values, non_differentiable, cfg) -> None:
    """What the backward needs: ``saved = (hidden, weight, bias, labels, lse, token_weights, denom)`` (never
    anything of size ``N x V``; ``weight`` itself, not a copy, for FSDP), ``values`` only as shape and dtype
    (``d values = P^T dU`` does not read it), and ``cfg``: the backward launcher's keyword options."""
    ctx.save_for_backward(*saved)
    ctx.cfg = cfg
    ctx.values_meta = (values.shape, values.dtype) if values is not None else None
    ctx.set_materialize_grads(False)
    # Only loss (-> hidden, weight, bias) and p_values (-> values) carry gradients.
    ctx.mark_non_differentiable(*[t for t in non_differentiable if t is not None])


def capture_grads(ctx, g_loss, g_p_values, bwd):
    """The gradients of the ``_N_INPUTS`` inputs from those of ``loss`` and ``p_values``, through ``bwd``.

    A gradient nobody asked for is not computed: the loss gradient only when ``hidden``, ``weight`` or
    ``bias`` needs one (a ``bias`` without ``requires_grad`` costs nothing), the log gradient only when
    ``values`` does (the Mistake Log is detached from the Pilot).
    """
    hidden, weight, bias, labels, lse, token_weights, denom = ctx.saved_tensors
    need_h, need_w, need_b, _, need_v = ctx.needs_input_grad[:5]
    need_b = need_b and bias is not None
    if g_loss is None:
        need_h = need_w = need_b = False
    if not need_v or ctx.values_meta is None:
        g_p_values = None
    need_loss = need_h or need_w or need_b
    if not (need_loss or g_p_values is not None):
        return (None,) * _N_INPUTS
    dh, dw, db, dv = bwd(
        hidden,
        weight,
        bias,
        labels,
        lse,
        token_weights,
        denom,
        g_loss if need_loss else None,
        g_p_values,
        ctx.values_meta,
        need_hidden=need_h,
        need_weight=need_w,
        need_bias=need_b,
        **ctx.cfg,
    )
    dv = dv if g_p_values is not None else None
    grads = (dh if need_h else None, dw if need_w else None, db if need_b else None, None, dv)
    return grads + (None,) * (_N_INPUTS - len(grads))


def capture_methods(fwd, bwd, option: str):
    """``(forward, backward)`` static methods of a ``torch.autograd.Function`` around a launcher pair.

    ``forward(hidden, weight, bias, labels, values, token_weights, denom, ignore_index, reduction, topk,
    softcap, label_smoothing, z_loss, <option>)`` returns ``(loss, lse, p_target, p_sq_sum, p_values, topk_ids,
    topk_logits)``; ``option`` names the backward launcher's keyword for the last argument. Each
    implementation declares its own class with these methods, so its autograd node keeps its own name.
    Both methods run with autocast off.
    """
    fwd, bwd = without_autocast(fwd), without_autocast(bwd)

    def forward(ctx, hidden, weight, bias, labels, values, token_weights, denom, *args):
        ignore_index, reduction, _, softcap, ls, zl, opt = args
        *out, denom = fwd(hidden, weight, bias, labels, values, token_weights, denom, *args)
        loss, lse, p_target, p_sq_sum, p_values, topk_ids, topk_logits = out
        cfg = dict(ignore_index=ignore_index, reduction=reduction, softcap=softcap, label_smoothing=float(ls))
        cfg.update(z_loss=float(zl), **{option: opt})
        saved = (hidden, weight, bias, labels, lse, token_weights, denom)
        save_capture(ctx, saved, values, (lse, p_target, p_sq_sum, topk_ids, topk_logits), cfg)
        return loss, lse, p_target, p_sq_sum, p_values, topk_ids, topk_logits

    @once_differentiable
    def backward(ctx, g_loss, _g_lse, _g_pt, _g_psq, g_p_values, _g_ids, _g_tl):
        return capture_grads(ctx, g_loss, g_p_values, bwd)

    return staticmethod(forward), staticmethod(backward)
