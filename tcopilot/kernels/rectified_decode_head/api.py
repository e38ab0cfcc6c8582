"""Public ``rectified_decode_head``: validation and implementation dispatch."""

from __future__ import annotations

import torch

from ..._validation import FLOAT32_TINY, FLOAT_DTYPES, check_finite, check_float32_range, check_tensor, resolve_impl
from ..rectified_next_token.api import _validate as _validate_sampler


def _triton_fn():
    try:
        from .triton_impl import rectified_decode_head_triton
    except ImportError:
        return None
    return rectified_decode_head_triton


def rectified_decode_head(
    pilot_hidden: torch.Tensor,
    lm_head: torch.Tensor,
    copilot_hidden: torch.Tensor,
    error_out_weight: torch.Tensor,
    error_out_bias: torch.Tensor | None = None,
    *,
    lm_head_bias: torch.Tensor | None = None,
    lam: float | torch.Tensor = 1.0,
    fusion: str = "probs",
    temperature: float | torch.Tensor = 0.0,
    top_k: int | torch.Tensor = 0,
    top_p: float | torch.Tensor = 1.0,
    generator: torch.Generator | None = None,
    seed: int | torch.Tensor | None = None,
    softcap: float | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Next token [B] int64 from the final hidden states of the Pilot and the Copilot (both LM-head products).

    Equals ``rectified_next_token(z, f, ...)`` (see it for fusion, greedy, sampling and tie rules) with
    ``z = pilot_hidden @ lm_head^T + lm_head_bias`` (then ``softcap * tanh(z / softcap)`` when ``softcap`` is
    set, Gemma-2 style) and ``f = copilot_hidden @ error_out_weight^T + error_out_bias``, both computed in fp32
    from the inputs cast to fp32 (the oracle: ``rectified_decode_head_reference``); either bias may be None.

    Implementations:
        ``"torch"``: the products tile by tile over V (fp32 copies of one tile of the weights at a time);
            greedy keeps a running argmax (``fusion="probs"``: a first pass for the log-sum-exp of ``z``), so
            no ``[B, V]`` tensor; sampling materialises ``z`` and ``f`` and draws exactly as
            ``rectified_next_token(impl="torch")`` (same generator use). Meant for the CPU.
        ``"triton"``: one kernel over (vocabulary blocks x row blocks) writes ``z`` and ``f`` to a ``[B, V]``
            fp32 scratch, reading each weight once in its own dtype (``tl.dot``, fp32 accumulation; a bias is
            one ``[V]`` vector more, read only when given), and with ``fusion="probs"`` each vocabulary block's
            softmax partials of ``z`` (max, sum-exp, argmax), then ``rectified_next_token(impl="triton")``'s
            kernels pick the token from it, greedy or sampled, with that op's tokens and generator use (they fold
            those partials instead of re-reading ``z`` for its softmax statistics). At decode the scratch
            (``8 * B * V`` bytes, 1 MB per row at V=128k) is small next to the weights (2 x 525 MB for a
            128k x 2048 bf16 head and Copilot head), and it lets hundreds of programs share the vocabulary even
            at B=1 (see ``triton_impl.py``).
        ``"auto"``: Triton on CUDA tensors, PyTorch otherwise.
    Greedy results equal the reference's up to fp32 rounding ties (different summation orders).
    :func:`tcopilot.generate` picks its tokens with this op (``num_beams=1``, Copilot in use, plain
    ``nn.Linear`` LM head, with or without a bias; see its ``impl`` argument).

    Args:
        pilot_hidden: [B, d]; lm_head: [V, d] (the Pilot's ``lm_head.weight``).
        copilot_hidden: [B, c] (the Copilot's ``g``); error_out_weight: [V, c]; error_out_bias: [V] or None.
        lm_head_bias: [V] or None, keyword only: the Pilot's ``lm_head.bias`` (Phi, GPT-J, CodeGen), added to
            ``z`` before the soft-cap. All tensors on one device, each in any float dtype (they may differ).
        lam, fusion, temperature, top_k, top_p, generator, seed: as ``rectified_next_token`` (per-row tensors and
            Philox seeds included).
        softcap: None / 0 (off) or a finite number > 0.
        impl: ``"auto"``, ``"torch"`` or ``"triton"`` (above; CPU tensors only under ``TRITON_INTERPRET=1``).

    Returns:
        [B] int64 token ids in ``[0, V)``.

    Raises:
        ValueError: naming the argument, for shapes, dtypes, devices (each bias: [V], float, on ``pilot_hidden``'s
            device), ``softcap``, the sampler's options, an unknown ``impl`` or ``impl="triton"`` on CPU tensors
            without ``TRITON_INTERPRET=1``.
        NotImplementedError: ``impl="triton"`` when the Triton implementation cannot be imported.
    """
    check_tensor("pilot_hidden", pilot_hidden, ndim=2, dtypes=FLOAT_DTYPES)
    device = pilot_hidden.device
    bsz, d = pilot_hidden.shape
    check_tensor("lm_head", lm_head, ndim=2, dtypes=FLOAT_DTYPES, device=device, shape=(None, d))
    vocab = lm_head.shape[0]
    check_tensor("copilot_hidden", copilot_hidden, ndim=2, dtypes=FLOAT_DTYPES, device=device, shape=(bsz, None))
    c = copilot_hidden.shape[1]
    check_tensor("error_out_weight", error_out_weight, ndim=2, dtypes=FLOAT_DTYPES, device=device,
                 shape=(vocab, c))
    if error_out_bias is not None:
        check_tensor("error_out_bias", error_out_bias, ndim=1, dtypes=FLOAT_DTYPES, device=device, shape=(vocab,))
    if lm_head_bias is not None:
        check_tensor("lm_head_bias", lm_head_bias, ndim=1, dtypes=FLOAT_DTYPES, device=device, shape=(vocab,))
    if softcap is not None:
        softcap = check_float32_range("softcap", check_finite("softcap", softcap))
        if softcap < 0 or 0 < softcap < FLOAT32_TINY:  # z / softcap is computed in fp32
            raise ValueError(
                f"softcap: expected None, 0 (off) or a number >= {FLOAT32_TINY:.4g}, got {softcap!r}"
            )
    # the sampler's checks, on a [B, V]-shaped stand-in that is never materialised
    stand_in = torch.empty(1, device=device).expand(bsz, vocab)
    lam, temperature, top_k, top_p = _validate_sampler(stand_in, stand_in, lam, fusion, temperature, top_k, top_p,
                                                       generator, seed)
    wants_triton = impl == "triton" or (impl == "auto" and device.type == "cuda")
    triton_fn = _triton_fn() if wants_triton else None
    chosen = resolve_impl(impl, device, "rectified_decode_head", triton_available=triton_fn is not None)
    if chosen == "torch":
        from .torch_impl import rectified_decode_head_torch as fn
    else:
        fn = triton_fn
    return fn(pilot_hidden, lm_head, copilot_hidden, error_out_weight, error_out_bias, lm_head_bias=lm_head_bias,
              lam=lam, fusion=fusion, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator,
              seed=seed, softcap=softcap or None)
