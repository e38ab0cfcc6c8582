"""Public entry point :func:`copilot_error_loss`: validation, implementation dispatch, documentation."""

from __future__ import annotations

import torch

from tcopilot._validation import FLOAT_DTYPES, IMPLS, check_bool, check_choice, check_int, check_tensor, resolve_impl
from tcopilot._validation import check_labels as check_label_values  # the name check_labels is an option here

from .torch_impl import copilot_error_loss_torch

LABEL_DTYPES = (torch.int32, torch.int64)


def copilot_error_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    capture,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    impl: str = "auto",
    check_labels: bool = True,
) -> torch.Tensor:
    r"""The Copilot's token RMSE (paper Eq. 7) without forming anything of size ``[N x V]``.

    With the Copilot output ``f_i = weight @ hidden_i + bias`` and the Pilot's error
    ``ell_i = onehot(y_i) - p_i`` (detached from the Pilot), returns
    ``sqrt(mean over counted rows of ||f_i - ell_i||^2)``, computed in the Gram form of DESIGN.md 4.2 from the
    statistics that :func:`tcopilot.logit_capture` gathered in its pass over the vocabulary. Cost
    ``O(N c^2 + V c^2)``.

    Args:
        hidden: ``[N, c]`` Copilot final hidden states ``g`` (any float dtype). ``N >= 1``.
        weight: ``[V, c]`` ``error_out.weight`` (``B``), float, same device.
        bias: ``[V]`` ``error_out.bias`` (``b``) or ``None``.
        capture: the :class:`tcopilot.Capture` of the same rows, from
            ``logit_capture(..., values=torch.cat([A.T, B, b[:, None]], 1))`` with ``A = error_in.weight``:
            ``capture.p_values`` must be ``[N, 2c+1]`` laid out ``[A^T | B | b]``. With ``bias=None`` a
            ``[N, 2c]`` ``[A^T | B]`` is accepted too (a last column is then ignored). Also uses
            ``capture.p_target`` and ``capture.p_sq_sum`` (``[N]``).
        labels: ``[N]`` int32/int64 ids in ``[0, V)`` or ``ignore_index``: the same labels as the capture.
        ignore_index: an int, the label of rows that do not count.
        impl: ``"auto"`` or ``"torch"`` (the Gram form in PyTorch); ``"triton"`` is not implemented yet.
        check_labels: a bool, keyword only (default True). ``False`` skips the range check of ``labels``, and with
            it the host read (on an accelerator, a synchronisation) that the check costs; the caller guarantees
            that every label is in ``[0, V)`` or ``ignore_index`` (e.g. the labels that ``logit_capture`` already
            checked). Out-of-range labels then give undefined results. The labels' shape, dtype and device are
            checked either way.

    Returns:
        A 0-d fp32 tensor (fp64 when ``hidden`` and ``weight`` are fp64): the RMSE, 0.0 when no row is
        counted. The mean is clamped at 0 before the square root, and where it is 0 the gradient is 0,
        never NaN.

    Gradients:
        By autograd into ``hidden``, ``weight``, ``bias`` and ``capture.p_values``; the last flows through the
        capture's backward into ``values`` (hence into ``error_out`` a second time, and not into
        ``error_in``, whose columns this loss does not read). The statistics ``p_target``/``p_sq_sum`` carry
        no gradient: the Mistake Log is detached from the Pilot.

    Raises:
        ValueError: naming the argument, with the expected and the received value (shapes, dtypes, devices,
            a ``capture`` without ``p_values`` or of the wrong width, labels, ``impl``, ``check_labels``).
        NotImplementedError: ``impl="triton"`` (on any device).

    Example:
        >>> from tcopilot import logit_capture
        >>> N, d, V, c = 8, 16, 100, 4
        >>> h, W = torch.randn(N, d), torch.randn(V, d)
        >>> A, B = torch.randn(c, V), torch.randn(V, c, requires_grad=True)
        >>> b = torch.zeros(V, requires_grad=True)
        >>> y = torch.randint(0, V, (N,))
        >>> cap = logit_capture(h, W, y, torch.cat([A.T, B, b[:, None]], 1))
        >>> g = torch.randn(N, c, requires_grad=True)
        >>> copilot_error_loss(g, B, b, cap, y).backward()
    """
    check_choice("impl", impl, IMPLS)
    check_tensor("hidden", hidden, ndim=2, dtypes=FLOAT_DTYPES)
    n, c = hidden.shape
    device = hidden.device
    check_tensor("weight", weight, ndim=2, dtypes=FLOAT_DTYPES, device=device, shape=(None, c))
    vocab = weight.shape[0]
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=FLOAT_DTYPES, device=device, shape=(vocab,))
    for field in ("p_values", "p_target", "p_sq_sum"):
        if not hasattr(capture, field):
            raise ValueError(
                f"capture: expected the Capture returned by logit_capture, got {type(capture).__name__} "
                f"without a {field!r} field"
            )
    if capture.p_values is None:
        raise ValueError(
            "capture.p_values: expected [N, 2c+1] = p @ [error_in.weight.T | error_out.weight | "
            "error_out.bias[:, None]], got None (call logit_capture with values=...)"
        )
    width = 2 * c + 1
    check_tensor("capture.p_values", capture.p_values, ndim=2, dtypes=FLOAT_DTYPES, device=device)
    got = tuple(capture.p_values.shape)
    ok_widths = (width,) if bias is not None else (2 * c, width)
    if got[0] != n or got[1] not in ok_widths:
        want = f"[{n}, {width}]" if bias is not None else f"[{n}, {2 * c}] or [{n}, {width}]"
        raise ValueError(
            f"capture.p_values: expected shape {want} (layout [A^T | B | b], c={c}), got {list(got)}"
        )
    check_tensor("capture.p_target", capture.p_target, ndim=1, dtypes=FLOAT_DTYPES, device=device, shape=(n,))
    check_tensor("capture.p_sq_sum", capture.p_sq_sum, ndim=1, dtypes=FLOAT_DTYPES, device=device, shape=(n,))
    ignore_index = check_int("ignore_index", ignore_index, what="an int (in int64 range)")
    check_tensor("labels", labels, ndim=1, dtypes=LABEL_DTYPES, device=device, shape=(n,))
    if check_bool("check_labels", check_labels):
        check_label_values("labels", labels, vocab, ignore_index)

    # No Triton kernel for this op yet: the Gram form is a handful of small GEMMs, already cheap.
    resolve_impl(impl, device, "copilot_error_loss", triton_available=False)
    return copilot_error_loss_torch(hidden, weight, bias, capture, labels, ignore_index=ignore_index)
