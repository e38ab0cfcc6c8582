"""Public entry point :func:`logit_capture`: validation, autocast casting, implementation dispatch, documentation.

Also registers the ``torch.library`` custom ops ``tcopilot::logit_capture_fwd`` / ``tcopilot::logit_capture_bwd``
through which :func:`logit_capture` enters a ``torch.compile`` graph as one opaque node.
"""

from __future__ import annotations

import math
import sys

import torch

from tcopilot._validation import (
    FLOAT_DTYPES,
    IMPLS,
    check_bool,
    check_choice,
    check_finite,
    check_float32_range,
    check_int,
    check_label_extrema,
    check_tensor,
    int64_as_scalar,
    is_finite_number,
    label_extrema,
    resolve_impl,
    scalar_as_int64,
)
from tcopilot._validation import check_labels as check_label_values  # the name check_labels is an option here

from .autograd import acc_dtype, capture_grads, mean_denom, save_capture, without_autocast
from .capture import Capture
from .torch_impl import capture_bwd_torch, capture_fwd_torch, logit_capture_torch

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


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``device``'s type when an autocast region is active for it, else ``None``.

    ``torch.is_autocast_enabled(device_type)`` / ``torch.get_autocast_dtype(device_type)`` (torch >= 2.4);
    a device type without autocast (``meta``) counts as "off".
    """
    try:
        if not torch.is_autocast_enabled(device.type):
            return None
        return torch.get_autocast_dtype(device.type)
    except RuntimeError:
        return None


def _autocast_cast(t: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor | None:
    """What autocast does to a matmul operand: fp16/bf16/fp32 tensors go to ``dtype`` (a differentiable
    cast, so the gradient comes back in the tensor's own dtype); fp64 and non-float tensors are left alone."""
    if t is None or dtype is None or not t.is_floating_point() or t.dtype in (torch.float64, dtype):
        return t
    return t.to(dtype)


def _check_not_sharded(name: str, t: torch.Tensor | None) -> None:
    """A ``DTensor`` (FSDP2 / tensor-parallel shard) reports its global shape but holds a shard: the fused op
    needs the full, gathered tensor. Only checked when the DTensor module is loaded at all (then a tensor can
    be one), so ``import tcopilot`` does not import ``torch.distributed``."""
    if t is None:
        return
    for mod_name in ("torch.distributed.tensor", "torch.distributed._tensor"):
        mod = sys.modules.get(mod_name)
        dtensor = getattr(mod, "DTensor", None) if mod is not None else None
        if dtensor is not None and isinstance(t, dtensor):
            raise ValueError(
                f"{name}: expected a plain (full, gathered) tensor, got a DTensor with placements "
                f"{getattr(t, 'placements', '?')}; call logit_capture inside the FSDP-wrapped module's forward "
                f"(where the parameters are unsharded) or pass {name}.full_tensor()"
            )


def _check_num_items(num_items_in_batch, reduction: str, device: torch.device, value=None):
    """``num_items_in_batch`` checked; ``value``: a tensor's value already read by the caller (else ``.item()``).
    A host tensor for device inputs comes back as its number: the loss then fills it in on the device, where the
    tensor would be copied over (a copy from pageable memory, which waits for the device)."""
    if num_items_in_batch is None:
        return None
    if isinstance(num_items_in_batch, torch.Tensor):
        if num_items_in_batch.numel() != 1:
            raise ValueError(
                "num_items_in_batch: expected a number or a one-element tensor, "
                f"got a tensor of shape {tuple(num_items_in_batch.shape)}"
            )
        if torch.compiler.is_compiling():
            # .item() would break the graph: the value is checked inside the op at run time.
            value = 1
        elif value is None:
            value = num_items_in_batch.item()
    else:
        value = num_items_in_batch
    if torch.compiler.is_compiling() and isinstance(value, (torch.SymInt, torch.SymFloat, int, float)):
        # torch.compile traces a Python number that changes between calls as a symbol, and math.isfinite
        # cannot be traced: the op checks the value when it runs (as for a tensor).
        value = 1
    if not is_finite_number(value) or value <= 0:  # numpy scalars too
        raise ValueError(f"num_items_in_batch: expected a finite number > 0, got {value!r}")
    if reduction != "mean":
        # Silently ignoring it would hand back a loss off by the token count.
        raise ValueError(
            f"num_items_in_batch: only used with reduction='mean', got reduction={reduction!r} "
            "(pass num_items_in_batch=None)"
        )
    if (isinstance(num_items_in_batch, torch.Tensor) and num_items_in_batch.device.type == "cpu"
            and device.type != "cpu" and not torch.compiler.is_compiling()):
        return value
    return num_items_in_batch


def logit_capture(
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
    impl: str = "auto",
    check_labels: bool = True,
) -> Capture:
    r"""The Pilot's LM-head loss and the Mistake Log statistics, without a ``[N x V]`` tensor.

    For every row ``i`` the logits are ``z_i = weight @ hidden_i + bias`` (fp32 accumulation; no ``bias``
    term without one), soft-capped to ``softcap * tanh(z_i / softcap)`` when ``softcap`` is given;
    ``p_i = softmax(z_i)``. One pass over the vocabulary yields the loss and, per row, ``lse_i``, ``p_i[y_i]``,
    ``sum_v p_iv^2``, ``p_i @ values`` and optionally the top-k logits (DESIGN.md 4.1). With the Copilot's
    ``values = [error_in.weight.T | error_out.weight | error_out.bias[:, None]]`` these give the Copilot's
    input embedding and loss exactly (see :func:`tcopilot.copilot_error_loss`).

    Args:
        hidden: ``[N, d]`` final hidden states, fp16/bf16/fp32/fp64 (any strides). ``N >= 1``.
        weight: ``[V, d]`` LM-head weight, same device as ``hidden`` and the same dtype (inside an autocast
            region: both are cast, see "Autocast"). The full, gathered weight (see "FSDP").
        labels: ``[N]`` int32/int64 target ids in ``[0, V)``, or ``ignore_index`` for rows that do not count.
        values: optional ``[V, k]`` float tensor (any float dtype); ``p_values = p @ values``.
        bias: optional ``[V]`` LM-head bias (Phi, GPT-J, CodeGen), keyword only; same device and dtype as
            ``weight`` (inside an autocast region cast like it). Added to each chunk of logits inside its GEMM
            (before ``softcap``), so it costs no copy of ``weight``; it gets a gradient when it requires one.
        ignore_index: an int, the label of rows that are not counted (0 loss, 0 gradient, ``p_target = 0``).
        reduction: ``"mean"`` (sum over counted rows / ``num_items_in_batch`` or the number of counted rows;
            0.0 when none is counted), ``"sum"`` or ``"none"`` (``[N]``, 0 on ignored rows).
        topk: an int ``K`` in ``[0, V]``; with ``K > 0`` also return the K largest (capped) logits per row and
            their ids, in descending order, equal logits by ascending id (the compressed log of DESIGN.md 4.4).
            Found in the same pass over V: the torch path with ``torch.topk`` per chunk of logits, the Triton
            kernel with a running per-row set in registers for ``K <= 128`` (``torch.topk`` per chunk above
            that).
        softcap: ``None`` or a finite ``> 0`` cap (Gemma-2 final-logit soft-capping). All statistics then
            describe the softmax of the capped logits.
        label_smoothing: ``eps`` in ``[0, 1)``; the row loss becomes
            ``(1 - eps) * ce_i + eps * (lse_i - mean_v z_iv)``. Changes the loss only, not the statistics.
        z_loss: ``>= 0``; adds ``z_loss * lse_i**2`` to each counted row's loss.
        token_weights: optional ``[N]`` per-row loss weights (any float dtype, same device; applied after
            smoothing and z-loss). They receive no gradient.
        num_items_in_batch: optional number (or one-element tensor) ``> 0``: the denominator of
            ``reduction="mean"`` for gradient accumulation over micro-batches. Only valid with "mean". A tensor's
            value is checked on the host: read together with the labels' range check (one host read for both),
            or alone with ``check_labels=False`` (:class:`~tcopilot.TransformerCopilot` reads it in its own check
            and passes the number).
        impl: ``"auto"`` (Triton on CUDA when available, else PyTorch), ``"torch"`` (chunked PyTorch, never
            holds ``[N x V]``) or ``"triton"`` (no silent fallback; CPU tensors only under
            ``TRITON_INTERPRET=1``).
        check_labels: a bool, keyword only (default True). ``False`` skips the range check of ``labels``, and with
            it the host read (on an accelerator, a synchronisation) that the check costs; the caller guarantees
            that every label is in ``[0, V)`` or ``ignore_index`` (``TransformerCopilot.forward`` checks them
            beforehand together with the input ids). Out-of-range labels then give undefined results. The
            labels' shape, dtype and device are checked either way.

    Returns:
        :class:`Capture` ``(loss, lse, p_target, p_sq_sum, p_values, topk_ids, topk_logits)``. Statistics
        are fp32 (fp64 for fp64 inputs): ``lse [N]``, ``p_target [N]``, ``p_sq_sum [N]``,
        ``p_values [N, k]`` or ``None``, ``topk_ids [N, K]`` int64 or ``None``, ``topk_logits [N, K]`` or
        ``None``. ``loss`` is a scalar, or ``[N]`` with ``reduction="none"``.

    Autocast:
        Inside ``torch.autocast(device_type, dtype=...)`` for the inputs' device type, the op behaves like the
        matmul it replaces: ``hidden``, ``weight`` and ``values`` (the matmul operands) and ``bias`` (as
        ``F.linear`` casts it) are cast to the autocast dtype when they are fp16/bf16/fp32 (fp64 is left alone,
        as autocast does), so an fp32 ``weight`` parameter meets a bf16 ``hidden`` coming out of an autocast
        model. The casts are ordinary differentiable ``.to`` calls: gradients come back in each input's
        original dtype (an fp32 parameter gets an fp32 gradient). The capture itself then runs with autocast
        off, with its own fp32 accumulation: statistics and loss stay fp32. Outside an autocast region a
        ``hidden`` / ``weight`` / ``bias`` dtype mismatch is a ``ValueError``.

    torch.compile:
        The op is opaque to ``torch.compile``: while Dynamo traces, the call becomes the custom op
        ``torch.ops.tcopilot.logit_capture_fwd`` (``torch.library``; fake/meta implementation for shapes,
        autograd formula calling ``torch.ops.tcopilot.logit_capture_bwd``), which runs the same PyTorch or
        Triton launchers as eager mode. No graph break (``fullgraph=True`` works); the checks that read tensor
        values (labels in range unless ``check_labels=False``, a tensor ``num_items_in_batch`` > 0) then run when
        the op executes, still raising ``ValueError``. Eager calls skip the dispatcher and use the autograd
        functions directly.

    FSDP:
        The fused op needs the full (gathered) LM-head ``weight`` of shape ``[V, d]``: call it inside the
        FSDP-wrapped module's forward, where FSDP has unsharded the parameters, or on
        ``weight.full_tensor()``. A ``DTensor`` (FSDP2 / tensor-parallel shard) is rejected with a
        ``ValueError``. The op goes through autograd like ``F.linear``: it never reads ``.data`` or otherwise
        bypasses autograd, and saves ``weight`` itself (not a copy) for the backward, so FSDP's
        free-after-forward / re-gather-for-backward of the unsharded parameter and views into flat parameters
        (FSDP1 ``use_orig_params``) work.

    Gradients:
        ``loss`` -> ``hidden``, ``weight`` and ``bias`` (``dz = (p - target) * dloss``; ``d weight`` and
        ``d bias = sum_i dz_i`` accumulated in fp32, from the same ``dz`` chunks: no ``[N x V]`` tensor, and
        nothing at all for a ``bias`` without ``requires_grad``); ``p_values`` -> ``values`` only
        (``P^T @ d p_values``): the Mistake Log is detached from the Pilot. ``lse``, ``p_target``,
        ``p_sq_sum`` and the top-k outputs carry no gradient. Gradients come back in each input's dtype.

    Raises:
        ValueError: naming the argument, with the expected and the received value, for a bad shape, dtype,
            device, label, option or an empty batch, a ``DTensor`` input, ``num_items_in_batch`` with a
            ``reduction`` other than ``"mean"``, or ``impl="triton"`` on CPU tensors without
            ``TRITON_INTERPRET=1``.
        ImportError: ``impl="triton"`` without the ``triton`` package.
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
    vocab = weight.shape[0]
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=FLOAT_DTYPES, device=device, shape=(vocab,))
    if values is not None:
        check_tensor("values", values, ndim=2, dtypes=FLOAT_DTYPES, device=device, shape=(vocab, None))
    compiling = torch.compiler.is_compiling()
    if not compiling:
        for name, t in (("hidden", hidden), ("weight", weight), ("bias", bias), ("values", values)):
            _check_not_sharded(name, t)
    # Inside torch.autocast the LM head is a matmul: its operands go to the autocast dtype (the statistics stay
    # fp32, the gradients come back in each input's dtype through the cast). Outside it, dtypes must agree.
    amp_dtype = _autocast_dtype(device)
    if amp_dtype is not None:
        hidden = _autocast_cast(hidden, amp_dtype)
        weight = _autocast_cast(weight, amp_dtype)
        bias = _autocast_cast(bias, amp_dtype)
        values = _autocast_cast(values, amp_dtype)
    if weight.dtype != hidden.dtype:
        raise ValueError(
            f"weight: expected dtype {str(hidden.dtype).replace('torch.', '')} (the dtype of hidden), "
            f"got {str(weight.dtype).replace('torch.', '')}"
        )
    if bias is not None and bias.dtype != weight.dtype:
        # As F.linear: the bias joins the product in the GEMM, in the weight's dtype.
        raise ValueError(
            f"bias: expected dtype {str(weight.dtype).replace('torch.', '')} (the dtype of weight), "
            f"got {str(bias.dtype).replace('torch.', '')}"
        )
    ignore_index = check_int("ignore_index", ignore_index, what="an int (in int64 range)")
    check_tensor("labels", labels, ndim=1, dtypes=LABEL_DTYPES, device=device, shape=(n,))
    check_labels = check_bool("check_labels", check_labels)
    num_items_value = None
    if check_labels and not compiling:
        # Data-dependent (reads the labels back): under torch.compile the op checks them when it runs. A tensor
        # num_items_in_batch on the same device is read in the same host read (checked below, in its turn).
        packed = None
        if isinstance(num_items_in_batch, torch.Tensor) and num_items_in_batch.device == device:
            packed = scalar_as_int64(num_items_in_batch)
        if packed is None:
            check_label_values("labels", labels, vocab, ignore_index)
        else:
            lo, hi, bits = torch.cat([label_extrema(labels, ignore_index), packed]).tolist()
            check_label_extrema("labels", lo, hi, vocab, ignore_index)
            num_items_value = int64_as_scalar(bits, num_items_in_batch.dtype)
    check_choice("reduction", reduction, REDUCTIONS)
    topk = check_int("topk", topk, low=0, high=vocab, what=f"an int in [0, {vocab}] (the vocabulary size)")
    if softcap is not None:
        check_finite("softcap", softcap)
        if softcap <= 0:
            raise ValueError(f"softcap: expected None or a number > 0, got {softcap!r}")
        if hidden.dtype != torch.float64:  # z / softcap in fp32 (fp64 inputs accumulate in fp64)
            check_float32_range("softcap", float(softcap))
    check_finite("label_smoothing", label_smoothing)
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing: expected a number in [0, 1), got {label_smoothing!r}")
    check_finite("z_loss", z_loss)
    if z_loss < 0:
        raise ValueError(f"z_loss: expected a number >= 0, got {z_loss!r}")
    if token_weights is not None:
        check_tensor("token_weights", token_weights, ndim=1, dtypes=FLOAT_DTYPES, device=device, shape=(n,))
    num_items_in_batch = _check_num_items(num_items_in_batch, reduction, device, num_items_value)

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
    if compiling:
        return _capture_op(hidden, weight, bias, labels, values, resolved, check_labels=check_labels, **kwargs)
    if resolved == "triton":
        return fn(hidden, weight, labels, values, bias=bias, **kwargs)
    return logit_capture_torch(hidden, weight, labels, values, bias=bias, **kwargs)


# ---------------------------------------------------------------------------------------------------------
# torch.compile: the capture as two opaque torch.library custom ops (forward, backward) with autograd
# ---------------------------------------------------------------------------------------------------------
#
# Eager calls use the autograd.Functions of torch_impl / triton_impl directly (no dispatcher round trip, unused
# outputs get no gradient work). While Dynamo traces, logit_capture emits ``tcopilot::logit_capture_fwd``
# instead: one node in the graph whose meta function (register_fake) gives the output shapes, and whose
# autograd formula calls ``tcopilot::logit_capture_bwd``. Both run the same launchers as the eager path, so
# compiled and eager results agree. A custom op cannot return None, so absent outputs travel as empty
# tensors and are turned back into None by _capture_op. The schemas are spelled out (not inferred from
# annotations) so that they read the same on every supported PyTorch.

_FWD_SCHEMA = (
    "(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, Tensor? values, Tensor? token_weights, "
    "Tensor? denom, int ignore_index, str reduction, int topk, float? softcap, float label_smoothing, "
    "float z_loss, str impl, bool check_labels) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
)
_BWD_SCHEMA = (
    "(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, Tensor lse, Tensor? token_weights, "
    "Tensor denom, Tensor? g_loss, Tensor? g_p_values, int values_cols, ScalarType? values_dtype, "
    "bool need_hidden, bool need_weight, bool need_bias, int ignore_index, str reduction, float? softcap, "
    "float label_smoothing, float z_loss, str impl) -> (Tensor, Tensor, Tensor, Tensor)"
)


def _launchers(impl: str):
    """The forward / backward launchers of ``impl``, run with autocast off (as in the eager Functions)."""
    if impl == "triton":
        from .triton_impl import capture_bwd_triton, capture_fwd_triton

        return without_autocast(capture_fwd_triton), without_autocast(capture_bwd_triton)
    return without_autocast(capture_fwd_torch), without_autocast(capture_bwd_torch)


@torch.library.custom_op("tcopilot::logit_capture_fwd", mutates_args=(), schema=_FWD_SCHEMA)
def _capture_fwd_op(
    hidden, weight, bias, labels, values, token_weights, denom, ignore_index, reduction, topk, softcap, ls, zl, impl,
    check_labels,
):
    """``(loss, lse, p_target, p_sq_sum, p_values | [N, 0], topk_ids [N, K], topk_logits [N, K], denom)``."""
    # The checks that read tensor values, deferred from tracing to run time.
    if check_labels:
        check_label_values("labels", labels, weight.shape[0], ignore_index)
    if denom is not None:
        value = float(denom)
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"num_items_in_batch: expected a finite number > 0, got {value!r}")
    fwd, _ = _launchers(impl)
    loss, lse, p_t, p_sq, p_v, ids, top, den = fwd(
        hidden, weight, bias, labels, values, token_weights, denom, ignore_index, reduction, topk, softcap, ls, zl
    )
    n = hidden.shape[0]
    if p_v is None:
        p_v = lse.new_empty((n, 0))
    if ids is None:
        ids = torch.empty((n, 0), dtype=torch.int64, device=hidden.device)
        top = lse.new_empty((n, 0))
    # clone: an output of a custom op must not alias an input (den may be the denom passed in).
    return loss, lse, p_t, p_sq, p_v, ids, top, den.clone()


@_capture_fwd_op.register_fake
def _(hidden, weight, bias, labels, values, token_weights, denom, ignore_index, reduction, topk, softcap, ls, zl, impl,
      check_labels):
    n = hidden.shape[0]
    acc = acc_dtype(hidden.dtype)
    vec = hidden.new_empty((n,), dtype=acc)
    loss = vec.new_empty((n,) if reduction == "none" else ())
    k = values.shape[1] if values is not None else 0
    return (
        loss,
        vec,
        torch.empty_like(vec),
        torch.empty_like(vec),
        vec.new_empty((n, k)),
        hidden.new_empty((n, topk), dtype=torch.int64),
        vec.new_empty((n, topk)),
        vec.new_empty(()),
    )


@torch.library.custom_op("tcopilot::logit_capture_bwd", mutates_args=(), schema=_BWD_SCHEMA)
def _capture_bwd_op(
    hidden,
    weight,
    bias,
    labels,
    lse,
    token_weights,
    denom,
    g_loss,
    g_p_values,
    values_cols,
    values_dtype,
    need_hidden,
    need_weight,
    need_bias,
    ignore_index,
    reduction,
    softcap,
    ls,
    zl,
    impl,
):
    """``(d_hidden, d_weight, d_bias, d_values)``; an empty ``[0]`` tensor for a gradient not asked for."""
    _, bwd = _launchers(impl)
    values_meta = ((weight.shape[0], values_cols), values_dtype) if g_p_values is not None else None
    dh, dw, db, dv = bwd(
        hidden,
        weight,
        bias,
        labels,
        lse,
        token_weights,
        denom,
        g_loss,
        g_p_values,
        values_meta,
        need_hidden=need_hidden,
        need_weight=need_weight,
        need_bias=need_bias,
        ignore_index=ignore_index,
        reduction=reduction,
        softcap=softcap,
        label_smoothing=ls,
        z_loss=zl,
    )
    dh = dh if dh is not None else hidden.new_empty((0,))
    dw = dw if dw is not None else weight.new_empty((0,))
    db = db if db is not None else weight.new_empty((0,))
    dv = dv if dv is not None else lse.new_empty((0,))
    return dh, dw, db, dv


@_capture_bwd_op.register_fake
def _(hidden, weight, bias, labels, lse, token_weights, denom, g_loss, g_p_values, values_cols, values_dtype, *args):
    need_hidden, need_weight, need_bias = args[:3]
    dh = torch.empty_like(hidden) if need_hidden else hidden.new_empty((0,))
    dw = torch.empty_like(weight) if need_weight else weight.new_empty((0,))
    db = torch.empty_like(bias) if need_bias and bias is not None else weight.new_empty((0,))
    if g_p_values is not None:
        dv = lse.new_empty((weight.shape[0], values_cols), dtype=values_dtype)
    else:
        dv = lse.new_empty((0,))
    return dh, dw, db, dv


def _capture_setup(ctx, inputs, output):
    # the last input, check_labels, matters to the forward only
    hidden, weight, bias, labels, values, token_weights, _, ignore_index, reduction, _, softcap, ls, zl, impl, _ = (
        inputs
    )
    _, lse, p_t, p_sq, _, ids, top, den = output
    # ls / zl are floats by the schema: unlike the eager Functions, no float() (it could specialise a SymFloat).
    cfg = dict(
        ignore_index=ignore_index, reduction=reduction, softcap=softcap, label_smoothing=ls, z_loss=zl, impl=impl
    )
    saved = (hidden, weight, bias, labels, lse, token_weights, den)
    save_capture(ctx, saved, values, (lse, p_t, p_sq, ids, top, den), cfg)


def _capture_backward(ctx, g_loss, _g_lse, _g_pt, _g_psq, g_p_values, _g_ids, _g_top, _g_den):
    # capture_grads covers the 14 inputs the op shares with the eager Functions; check_labels gets no gradient
    return capture_grads(ctx, g_loss, g_p_values, _bwd_through_op) + (None,)


def _bwd_through_op(hidden, weight, bias, labels, lse, token_weights, denom, g_loss, g_p_values, values_meta, **kw):
    """The backward launcher of the compiled graph: the ``logit_capture_bwd`` op, whose absent gradients are
    empty tensors (:func:`capture_grads` drops them)."""
    cols, v_dtype = (values_meta[0][1], values_meta[1]) if values_meta is not None else (0, None)
    return torch.ops.tcopilot.logit_capture_bwd(
        hidden,
        weight,
        bias,
        labels,
        lse,
        token_weights,
        denom,
        g_loss,
        g_p_values,
        cols,
        v_dtype,
        kw["need_hidden"],
        kw["need_weight"],
        kw["need_bias"],
        kw["ignore_index"],
        kw["reduction"],
        kw["softcap"],
        kw["label_smoothing"],
        kw["z_loss"],
        kw["impl"],
    )


_capture_fwd_op.register_autograd(_capture_backward, setup_context=_capture_setup)


def _capture_op(
    hidden, weight, bias, labels, values, impl, *, num_items_in_batch, token_weights, check_labels, **kw
) -> Capture:
    """The compiled-graph form of :func:`logit_capture` (validated arguments; ``impl`` resolved)."""
    denom = mean_denom(num_items_in_batch, kw["reduction"], hidden)
    out = torch.ops.tcopilot.logit_capture_fwd(
        hidden,
        weight,
        bias,
        labels,
        values,
        token_weights,
        denom,
        kw["ignore_index"],
        kw["reduction"],
        kw["topk"],
        kw["softcap"],
        kw["label_smoothing"],
        kw["z_loss"],
        impl,
        check_labels,
    )
    loss, lse, p_t, p_sq, p_v, ids, top, _ = out
    has_top = kw["topk"] > 0
    return Capture(
        loss, lse, p_t, p_sq, p_v if values is not None else None, ids if has_top else None, top if has_top else None
    )
