"""Public ``rectified_next_token``: validation and implementation dispatch."""

from __future__ import annotations

import numbers

import torch

from ..._validation import FLOAT_DTYPES, check_choice, check_finite, check_tensor, resolve_impl

FUSIONS = ("probs", "logits")


def _triton_fn():
    """The Triton implementation, or None while it (or Triton itself) cannot be imported."""
    try:
        from .triton_impl import rectified_next_token_triton
    except ImportError:
        return None
    return rectified_next_token_triton


def _validate_lam(lam, batch: int, device: torch.device) -> float | torch.Tensor:
    if not isinstance(lam, torch.Tensor):
        return check_finite("lam", lam)
    if lam.dim() not in (0, 1) or (lam.dim() == 1 and lam.shape[0] != batch):
        raise ValueError(
            f"lam: expected a float or a tensor of shape [{batch}] (one per row), got shape {list(lam.shape)}"
        )
    check_tensor("lam", lam, dtypes=FLOAT_DTYPES, device=device)
    # One host sync; a NaN lambda would otherwise silently produce arbitrary tokens.
    if not bool(torch.isfinite(lam).all()):
        raise ValueError(f"lam: expected finite values, got {lam.tolist()}")
    return lam


def _validate(pilot_logits, copilot_out, lam, fusion, temperature, top_k, top_p, generator):
    check_tensor("pilot_logits", pilot_logits, ndim=2, dtypes=FLOAT_DTYPES)
    device = pilot_logits.device
    check_tensor(
        "copilot_out",
        copilot_out,
        ndim=2,
        dtypes=FLOAT_DTYPES,
        device=device,
        shape=tuple(pilot_logits.shape),
    )
    lam = _validate_lam(lam, pilot_logits.shape[0], device)
    check_choice("fusion", fusion, FUSIONS)
    temperature = check_finite("temperature", temperature)
    if temperature < 0:
        raise ValueError(f"temperature: expected a finite number >= 0 (0 = greedy), got {temperature!r}")
    if not isinstance(top_k, numbers.Integral) or isinstance(top_k, bool) or top_k < 0:
        raise ValueError(f"top_k: expected an int >= 0 (0 = off), got {top_k!r}")
    top_p = check_finite("top_p", top_p)
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p: expected a number in (0, 1] (1 = off), got {top_p!r}")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise ValueError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
        if generator.device.type != device.type:
            raise ValueError(
                f"generator: expected a generator on {device.type} (like pilot_logits), "
                f"got one on {generator.device}"
            )
    return lam, temperature, int(top_k), top_p


def rectified_next_token(
    pilot_logits: torch.Tensor,
    copilot_out: torch.Tensor,
    *,
    lam: float | torch.Tensor = 1.0,
    fusion: str = "probs",
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Pick the next token from the Pilot's logits rectified by the Copilot's predicted error.

    With ``z = pilot_logits``, ``f = copilot_out`` and ``p^ = softmax(z)`` per row:

    - ``fusion="probs"`` (paper Eq. 8): ``p~ = p^ + lam * f``.
      Greedy (``temperature == 0``): ``argmax p~`` (unclamped; ties go to the lowest id).
      Sampling (``temperature > 0``): ``q = clamp(p~, min=0)``; temperature ``T`` gives ``q^(1/T)``,
      computed in log space as ``log q / T`` (zeros stay ``-inf``; the row maximum of ``log q`` is
      subtracted first, which leaves the distribution unchanged and avoids overflow at tiny ``T``);
      then top-k, then top-p, renormalise, sample. A row whose clamped ``p~`` is all zero falls back
      to ``argmax p^`` (computed as ``argmax z``), never NaN or an invalid id.
    - ``fusion="logits"``: ``z~ = z + lam * f``. Greedy: ``argmax z~``. Sampling from
      ``softmax(z~ / T)`` (row maximum subtracted first) with the same top-k and top-p.

    Filters, applied in this order to the tempered log-weights ``w``:

    - top-k (``0 < top_k < V``): keep the tokens with ``w >= `` the k-th largest ``w``; tokens tied with
      the k-th are all kept. ``top_k == 0`` or ``top_k >= V`` means off.
    - top-p (``top_p < 1``): with ``p = softmax(w)`` sorted descending, keep the smallest prefix whose
      mass reaches ``top_p`` (so at least the most likely token), plus any token tied with the prefix's
      last member. ``top_p == 1`` means off.

    Sampling procedure (reproducible from the generator state, tests rely on it): with ``q_final`` the
    renormalised filtered distribution ``[B, V]``, draw ``u = torch.rand([B, V], generator=generator,
    device=pilot_logits.device)`` (fp32), clamp it to ``>= torch.finfo(float32).tiny`` and return
    ``argmax(log(q_final) - log(-log(u)))`` (Gumbel-max, i.e. an exponential race): a token is picked
    with probability ``q_final`` and excluded tokens (``q_final == 0``) never are. Greedy calls draw no
    random numbers. ``rectified_probs_reference`` returns ``q_final``.

    Args:
        pilot_logits: [B, V] Pilot logits ``z`` (any float dtype; ``-inf`` marks banned tokens).
        copilot_out: [B, V] Copilot output ``f``, same shape and device (any float dtype).
        lam: finite float, or a float tensor on the same device: ``[B]`` per-row lambdas, or 0-d.
        fusion: ``"probs"`` or ``"logits"``.
        temperature: finite, ``>= 0``; 0 is greedy.
        top_k: int ``>= 0``.
        top_p: in ``(0, 1]``.
        generator: ``torch.Generator`` on the inputs' device type, or None (the default generator).
        impl: ``"auto"`` (Triton on CUDA tensors, PyTorch otherwise), ``"torch"`` or ``"triton"``
            (``triton_impl.py``: no vocabulary sort, same tokens as ``"torch"`` for the same generator
            state up to fp32 rounding ties).

    Returns:
        [B] int64 token ids in ``[0, V)``.

    Numerics: all arithmetic in fp32 whatever the input dtypes. Inputs are expected finite apart from
    ``-inf`` logits; a row of ``pilot_logits`` that is entirely ``-inf`` has no defined distribution.

    Raises:
        ValueError: naming the argument, for shapes (``[B, V]``, equal, ``B >= 1``), dtypes, devices,
            ``lam`` not finite, ``temperature < 0``, ``top_k < 0``, ``top_p`` outside ``(0, 1]``,
            an unknown ``fusion`` or ``impl``, a ``generator`` that is not a ``torch.Generator`` on the
            inputs' device type, or ``impl="triton"`` on CPU tensors without ``TRITON_INTERPRET=1``.
        NotImplementedError: ``impl="triton"`` when the Triton implementation cannot be imported.

    Example:
        >>> z = torch.tensor([[2.0, 1.0, 0.0]]); f = torch.tensor([[-0.5, 0.5, 0.0]])
        >>> rectified_next_token(z, f, lam=1.0).tolist()
        [1]
    """
    lam, temperature, top_k, top_p = _validate(
        pilot_logits, copilot_out, lam, fusion, temperature, top_k, top_p, generator
    )
    wants_triton = impl == "triton" or (impl == "auto" and pilot_logits.device.type == "cuda")
    triton_fn = _triton_fn() if wants_triton else None
    chosen = resolve_impl(
        impl, pilot_logits.device, "rectified_next_token", triton_available=triton_fn is not None
    )
    fn = triton_fn
    if chosen == "torch":
        from .torch_impl import rectified_next_token_torch

        fn = rectified_next_token_torch
    return fn(
        pilot_logits,
        copilot_out,
        lam=lam,
        fusion=fusion,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        generator=generator,
    )
