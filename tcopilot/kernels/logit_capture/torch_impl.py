"""Pure-PyTorch production path of :func:`tcopilot.logit_capture` (DESIGN.md 4.1, 4.3).

Rows are processed in chunks of ``T`` tokens so that no ``[N x V]`` tensor ever exists: per chunk one GEMM
gives the logits ``[T x V]`` (``addmm`` with the bias, if any, so that it costs no extra pass), which are
turned in place into probabilities, reduced to the per-row statistics and multiplied by ``values``. The backward
recomputes each chunk from ``(hidden, weight, bias, lse)`` and serves the loss gradient (``d hidden``,
``d weight``, ``d bias``) and the log gradient (``d values``) from the same recomputed ``p``.

Math runs in fp32 (fp64 when the inputs are fp64), whatever the storage dtype; fp16/bf16 ``weight`` and
``values`` are upcast once per call (a ``[V, d]`` / ``[V, k]`` copy), and the backward holds one fp32
``[V, d]`` accumulator for ``d weight``. Peak extra memory is therefore about one ``[T x V]`` chunk (two with
``softcap``) plus those ``[V, *]`` copies, independent of N. Inputs are assumed validated by :mod:`.api`.
"""

from __future__ import annotations

import torch

from .autograd import acc_dtype, capture_methods, mean_denom, reduce_rows, row_grads
from .capture import Capture

# Elements of one chunk's logits: 2**22 fp32 values = 16 MiB, small next to any real model yet large enough
# for the GEMMs to run near peak on a CPU.
CHUNK_ELEMENTS = 1 << 22


def default_chunk_size(vocab_size: int) -> int:
    """Rows per chunk such that ``rows * vocab_size <= 2**22`` (at least one row)."""
    return max(1, CHUNK_ELEMENTS // max(1, vocab_size))


def _topk_lowest_id(z: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of each row of ``z`` in descending order, equal values ordered by ascending id.

    ``torch.topk`` does not promise which of several equal values it returns, nor their order (on the CPU it
    was seen returning ids 502, 501, 500 for three equal values, and skipping lower equal ids). The values
    it returns are unique, though, so they fix the k-th value ``thr``; every entry above ``thr`` is taken,
    and the remaining slots go to the lowest ids equal to ``thr``. A stable sort of the k winners by value
    then puts equal values in id order.
    """
    vocab = z.shape[1]
    thr = torch.topk(z, k, dim=1, sorted=True).values[:, k - 1 : k]
    above = z > thr
    tie = z == thr
    slots = k - above.sum(dim=1, keepdim=True, dtype=torch.int32)
    take = above | (tie & (tie.cumsum(dim=1, dtype=torch.int32) <= slots))
    # Exactly k entries per row are taken. Keying them by (vocab - id) and taking the top-k of the keys
    # lists them in ascending id without a data-dependent shape (no nonzero, no host sync).
    key = take * torch.arange(vocab, 0, -1, device=z.device, dtype=torch.int32)
    ids = vocab - torch.topk(key, k, dim=1, sorted=True).values.long()
    logits = z.gather(1, ids)
    order = torch.sort(logits, dim=1, descending=True, stable=True).indices
    return ids.gather(1, order), logits.gather(1, order)


def _chunk_logits(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, cd: torch.dtype) -> torch.Tensor:
    """Uncapped logits ``h @ w.T (+ b)`` of one chunk in the compute dtype (``w`` and ``b`` already in it).

    The bias goes into the GEMM (``addmm``: BLAS starts from the broadcast bias and accumulates the product
    onto it in the compute dtype) rather than a separate ``[T, V]`` add afterwards.
    """
    h = h.to(cd)
    return h @ w.T if b is None else torch.addmm(b, h, w.T)


def capture_fwd_torch(
    hidden,
    weight,
    bias,
    labels,
    values,
    token_weights,
    denom,
    ignore_index,
    reduction,
    topk,
    softcap,
    label_smoothing,
    z_loss,
    chunk_size=None,
):
    """The chunked forward without autograd (see :class:`LogitCaptureTorchFunction` for the arguments).

    Returns ``(loss, lse, p_target, p_sq_sum, p_values, topk_ids, topk_logits, denom)`` with ``None`` for
    absent outputs; ``denom`` is the "mean" denominator actually used (a 0-d tensor in the compute dtype).
    """
    n, d = hidden.shape
    vocab = weight.shape[0]
    cd = acc_dtype(hidden.dtype)
    dev = hidden.device
    eps = float(label_smoothing)
    chunk = int(chunk_size) if chunk_size else default_chunk_size(vocab)

    w = weight.to(cd)
    b = bias.to(cd) if bias is not None else None
    lab = labels.long()
    counted = lab != ignore_index
    y = torch.where(counted, lab, torch.zeros_like(lab))
    vals = values.to(cd) if values is not None else None

    # Poisoned, so a row the chunk loop failed to write shows up as NaN (or id -1) in the tests.
    def buf(*shape, dtype=cd, fill=float("nan")):
        return torch.full(shape, fill, dtype=dtype, device=dev)

    lse, z_y, p_target, p_sq_sum = buf(n), buf(n), buf(n), buf(n)
    z_mean = buf(n) if eps > 0 else None
    p_values = buf(n, vals.shape[1]) if vals is not None else None
    topk_ids = buf(n, topk, dtype=torch.int64, fill=-1) if topk > 0 else None
    topk_logits = buf(n, topk) if topk > 0 else None

    for r0 in range(0, n, chunk):
        r1 = min(n, r0 + chunk)
        z = _chunk_logits(hidden[r0:r1], w, b, cd)
        if softcap is not None:
            z.div_(softcap).tanh_().mul_(softcap)
        yc = y[r0:r1, None]
        z_y[r0:r1] = z.gather(1, yc).squeeze(1)
        if z_mean is not None:
            z_mean[r0:r1] = z.mean(dim=1)
        if topk > 0:
            topk_ids[r0:r1], topk_logits[r0:r1] = _topk_lowest_id(z, topk)
        # z becomes p in place, so a chunk costs one [T, V] buffer.
        m = z.amax(dim=1, keepdim=True)
        p = z.sub_(m).exp_()
        s = p.sum(dim=1, keepdim=True)
        p.div_(s)
        lse[r0:r1] = (m + s.log()).squeeze(1)
        p_target[r0:r1] = p.gather(1, yc).squeeze(1)
        # A batched row-dot avoids the [T, V] temporary of (p * p).sum(1).
        p_sq_sum[r0:r1] = torch.bmm(p.unsqueeze(1), p.unsqueeze(2)).view(-1)
        if vals is not None:
            torch.mm(p, vals, out=p_values[r0:r1])
        del z, p

    p_target = torch.where(counted, p_target, torch.zeros_like(p_target))
    row = lse - z_y
    if eps > 0:
        row = (1.0 - eps) * row + eps * (lse - z_mean)
    if z_loss:
        row = row + z_loss * lse * lse
    loss, denom = reduce_rows(row, counted, token_weights, denom, reduction)
    return loss, lse, p_target, p_sq_sum, p_values, topk_ids, topk_logits, denom


def capture_bwd_torch(
    hidden,
    weight,
    bias,
    labels,
    lse,
    token_weights,
    denom,
    g_loss,
    g_values,
    values_meta,
    *,
    need_hidden,
    need_weight,
    need_bias=False,
    ignore_index,
    reduction,
    softcap,
    label_smoothing,
    z_loss,
    chunk_size=None,
):
    """The chunked backward without autograd: ``(d_hidden, d_weight, d_bias, d_values)``, ``None`` where not
    needed. ``d_bias`` is the column sum of each chunk's ``dz`` in the compute dtype (``d weight`` sums the same
    ``dz`` against ``hidden``).

    ``denom`` is the denominator returned by :func:`capture_fwd_torch`; ``g_loss`` / ``g_values`` the
    upstream gradients of ``loss`` / ``p_values`` or ``None``; ``values_meta`` ``(shape, dtype)`` of
    ``values`` or ``None``.
    """
    cd = acc_dtype(hidden.dtype)
    eps = float(label_smoothing)
    z_loss = float(z_loss)
    vocab = weight.shape[0]
    chunk = int(chunk_size) if chunk_size else default_chunk_size(vocab)
    need_bias = need_bias and bias is not None
    do_loss = g_loss is not None and (need_hidden or need_weight or need_bias)
    do_vals = g_values is not None and values_meta is not None
    if not (do_loss or do_vals):
        return None, None, None, None

    n = hidden.shape[0]
    lab = labels.long()
    counted = lab != ignore_index
    y = torch.where(counted, lab, torch.zeros_like(lab))
    w = weight.to(cd)
    b = bias.to(cd) if bias is not None else None

    d_hidden = d_weight = d_bias = d_values = None
    if do_loss:
        coef = row_grads(g_loss, counted, token_weights, denom, reduction, cd)
        # d row / d z_v = (1 + 2 z_loss lse) p_v - (1 - eps) [v = y] - eps / V
        scale_p = (coef * (1.0 + 2.0 * z_loss * lse))[:, None] if z_loss else coef[:, None]
        hot = (-(1.0 - eps) * coef)[:, None]
        uniform = (eps / vocab) * coef[:, None] if eps > 0 else None
        if need_hidden:
            d_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)
        if need_weight:
            d_weight = torch.zeros(weight.shape, dtype=cd, device=weight.device)
        if need_bias:
            d_bias = torch.zeros(bias.shape, dtype=cd, device=bias.device)
    if do_vals:
        gv = g_values.to(cd)
        d_values = torch.zeros(tuple(values_meta[0]), dtype=cd, device=weight.device)

    for r0 in range(0, n, chunk):
        r1 = min(n, r0 + chunk)
        h = hidden[r0:r1].to(cd)
        z = _chunk_logits(h, w, b, cd)
        if softcap is not None:
            t = z.div_(softcap).tanh_()
            p = torch.mul(t, softcap).sub_(lse[r0:r1, None]).exp_()
            cap_grad = t.mul_(t).neg_().add_(1.0)  # d(s tanh(z/s))/dz = 1 - tanh^2
        else:
            p = z.sub_(lse[r0:r1, None]).exp_()
            cap_grad = None
        if do_vals:
            d_values.addmm_(p.T, gv[r0:r1])
        if do_loss:
            dz = p.mul_(scale_p[r0:r1])
            if uniform is not None:
                dz.sub_(uniform[r0:r1])
            dz.scatter_add_(1, y[r0:r1, None], hot[r0:r1])
            if cap_grad is not None:
                dz.mul_(cap_grad)
            if need_hidden:
                d_hidden[r0:r1] = dz @ w
            if need_weight:
                d_weight.addmm_(dz.T, h)
            if need_bias:
                d_bias.add_(dz.sum(dim=0))
        del z, p, cap_grad

    if d_weight is not None:
        d_weight = d_weight.to(weight.dtype)
    if d_bias is not None:
        d_bias = d_bias.to(bias.dtype)
    if d_values is not None:
        d_values = d_values.to(values_meta[1])
    return d_hidden, d_weight, d_bias, d_values


class LogitCaptureTorchFunction(torch.autograd.Function):
    """Chunked forward and backward of the capture; see the module docstring.

    ``forward(hidden, weight, bias, labels, values, token_weights, denom, ignore_index, reduction, topk,
    softcap, label_smoothing, z_loss, chunk_size)`` returns ``(loss, lse, p_target, p_sq_sum, p_values,
    topk_ids, topk_logits)`` with ``None`` for absent outputs. ``denom`` is the "mean" denominator as a 0-d
    tensor, or ``None`` for the number of counted rows. Saved for backward: hidden, weight, bias, labels, lse,
    token weights and the denominator; never anything of size ``N x V``. Forward and backward run with autocast off
    (:mod:`.autograd`, shared with the Triton path).
    """

    forward, backward = capture_methods(capture_fwd_torch, capture_bwd_torch, "chunk_size")


def logit_capture_torch(
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
    chunk_size: int | None = None,
) -> Capture:
    """Chunked pure-PyTorch capture; same arguments as :func:`tcopilot.logit_capture` plus ``chunk_size``
    (rows per chunk; default :func:`default_chunk_size`)."""
    denom = mean_denom(num_items_in_batch, reduction, hidden)
    opts = (ignore_index, reduction, int(topk), softcap, float(label_smoothing), float(z_loss), chunk_size)
    return Capture(*LogitCaptureTorchFunction.apply(hidden, weight, bias, labels, values, token_weights, denom, *opts))
