"""Public ``log_attention``: validation and implementation dispatch."""

from __future__ import annotations

import math

import torch

from ..._validation import FLOAT_DTYPES, check_finite, check_float32_range, check_tensor, resolve_impl

POS_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _triton_fn():
    """The Triton implementation, or None when it (or Triton itself) cannot be imported."""
    try:
        from .triton_impl import log_attention_triton
    except ImportError:
        return None
    return log_attention_triton


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _validate(q, k, v, q_pos, k_pos, scale) -> float:
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES)
    device = q.device
    b, hq, lq, d = q.shape
    check_tensor("k", k, ndim=4, dtypes=FLOAT_DTYPES, device=device)
    check_tensor("v", v, ndim=4, dtypes=FLOAT_DTYPES, device=device)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise ValueError(
                f"{name}: expected the same dtype as q ({_dtype_name(q.dtype)}), got {_dtype_name(t.dtype)}"
            )
    hk, lk = k.shape[1], k.shape[2]
    check_tensor("k", k, shape=(b, None, None, d))
    if hq % hk != 0:
        raise ValueError(
            f"k: expected a number of kv heads that divides q's {hq} heads, got {hk} (shape {list(k.shape)})"
        )
    check_tensor("v", v, shape=(b, hk, lk, None))
    check_tensor("q_pos", q_pos, ndim=2, dtypes=POS_DTYPES, device=device, shape=(b, lq))
    check_tensor("k_pos", k_pos, ndim=2, dtypes=POS_DTYPES, device=device, shape=(b, lk))
    if scale is None:
        return 1.0 / math.sqrt(d)
    scale = check_finite("scale", scale)
    if scale <= 0:
        raise ValueError(f"scale: expected a finite number > 0, got {scale!r}")
    if q.dtype != torch.float64:  # the scores are scaled in fp32 (fp64 inputs compute in fp64)
        check_float32_range("scale", scale)
    return scale


def log_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    scale: float | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Attention in which visibility is decided by integer positions (the Copilot's attention).

    ``out[b, h, i] = sum_j softmax_j(q[b, h, i] . k[b, h', j] * scale) v[b, h', j]`` over the keys with
    ``0 <= k_pos[b, j] <= q_pos[b, i]``, where ``h' = h // (Hq // Hk)`` (grouped-query attention).
    One op serves causal self-attention (``q_pos = k_pos = arange(L)``), attention over the
    concatenated Mistake Log (``k_pos = cat(arange(L), arange(L))`` for the X~ block then the pooled-h
    block, ``q_pos = arange(L)``), padding (negative positions) and decoding (``Lq = 1`` against a cache).

    Args:
        q: [B, Hq, Lq, D] queries (fp16, bf16, fp32 or fp64).
        k: [B, Hk, Lk, D] keys, same dtype and device as ``q``; ``Hq`` must be a multiple of ``Hk``.
        v: [B, Hk, Lk, Dv] values, same dtype and device; ``Dv`` may differ from ``D``.
        q_pos: [B, Lq] integer positions of the queries (int64/int32/int16/int8/uint8, same device).
        k_pos: [B, Lk] integer positions of the keys (same dtypes); a negative position marks padding.
        scale: score scale, a finite number > 0; default ``1 / sqrt(D)``.
        impl: ``"auto"`` (Triton on CUDA tensors when the kernel is available, except fp64; PyTorch
            otherwise), ``"torch"`` (PyTorch: one SDPA call with the positions' mask on CPU tensors when the
            scores fit a budget and ``Dv == D``, else a blocked loop; see its module) or ``"triton"`` (never
            falls back silently; CPU tensors only under ``TRITON_INTERPRET=1``).

    Returns:
        [B, Hq, Lq, Dv] in ``q``'s dtype. A query that sees no key (e.g. a padded query with a negative
        position) returns zeros and receives zero gradients, never NaN.

    Numerics: scores, softmax and accumulation in fp32 (fp64 for fp64 inputs); for fp16/bf16 inputs the
    Triton kernel and PyTorch's CPU flash kernel (the torch path's one-call case) round the probabilities to
    the input dtype before their product with ``v``, as flash attention does. The output is rounded to
    ``q``'s dtype once, and gradients are returned in the inputs' dtypes.

    Raises:
        ValueError: naming the argument, for wrong ranks, shapes, dtypes, devices, empty tensors,
            ``Hq % Hk != 0``, non-integer positions, a scale that is not finite and positive, an unknown
            ``impl``, or ``impl="triton"`` on CPU tensors without ``TRITON_INTERPRET=1``.
        NotImplementedError: ``impl="triton"`` while no Triton kernel is available.

    Example:
        >>> q = torch.randn(1, 4, 6, 16); kv = torch.randn(1, 2, 12, 16)
        >>> pos = torch.arange(6)[None]
        >>> out = log_attention(q, kv, kv, q_pos=pos, k_pos=torch.cat([pos, pos], 1))
        >>> out.shape
        torch.Size([1, 4, 6, 16])
    """
    scale = _validate(q, k, v, q_pos, k_pos, scale)
    # Only look for the kernel when it could be chosen, so CPU calls never import Triton.
    # fp64 has no tensor-core path: "auto" keeps it on the PyTorch path (explicit "triton" still raises).
    on_gpu = q.device.type == "cuda" and q.dtype != torch.float64
    wants_triton = impl == "triton" or (impl == "auto" and on_gpu)
    triton_fn = _triton_fn() if wants_triton else None
    if impl == "auto" and not wants_triton:
        chosen = "torch"
    else:
        chosen = resolve_impl(impl, q.device, "log_attention", triton_available=triton_fn is not None)
    if chosen == "triton":
        return triton_fn(q, k, v, q_pos, k_pos, scale)
    from .torch_impl import log_attention_torch

    return log_attention_torch(q, k, v, q_pos, k_pos, scale)
