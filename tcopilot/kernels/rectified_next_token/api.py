"""Public ``rectified_next_token``: validation and implementation dispatch."""

from __future__ import annotations

import torch

from ..._validation import (
    FLOAT32_TINY,
    FLOAT_DTYPES,
    check_choice,
    check_finite,
    check_float32_range,
    check_int,
    check_tensor,
    resolve_impl,
)

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
        return check_float32_range("lam", check_finite("lam", lam))
    if lam.dim() not in (0, 1) or (lam.dim() == 1 and lam.shape[0] != batch):
        raise ValueError(
            f"lam: expected a float or a tensor of shape [{batch}] (one per row), got shape {list(lam.shape)}"
        )
    check_tensor("lam", lam, dtypes=FLOAT_DTYPES, device=device)
    return lam  # its values: check_row_values, in the one host sync of all per-row tensors


def check_row_option(name: str, value, batch: int, device: torch.device, integer: bool) -> None:
    """Shape, device and dtype of a per-row option given as a tensor: [B] (one per row) or 0-d."""
    if value.dim() not in (0, 1) or (value.dim() == 1 and value.shape[0] != batch):
        raise ValueError(
            f"{name}: expected a number or a tensor of shape [{batch}] (one per row), got shape {list(value.shape)}"
        )
    if value.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (like pilot_logits), got {value.device}")
    if integer and (value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool):
        raise ValueError(f"{name}: expected an integer tensor, got {value.dtype}")
    if not integer and not value.dtype.is_floating_point:
        raise ValueError(f"{name}: expected a floating-point tensor, got {value.dtype}")


def check_row_values(lam, temperature, top_k, top_p) -> None:
    """The values of the per-row tensors among the options, in one host sync (none without tensors)."""
    # Float options are checked as the fp32 the kernels read (a float64 1e-50 temperature is 0 there).
    checks = []
    if isinstance(lam, torch.Tensor):
        checks.append(("lam", "finite values (in float32 range)", lam, ~torch.isfinite(lam.float())))
    if isinstance(temperature, torch.Tensor):
        t = temperature.float()
        bad = ~(torch.isfinite(t) & ((t == 0) | (t >= FLOAT32_TINY))) | ((temperature > 0) & (t == 0))
        checks.append(("temperature", f"0 (greedy) or finite values >= {FLOAT32_TINY:.4g}", temperature, bad))
    if isinstance(top_k, torch.Tensor):
        checks.append(("top_k", "values >= 0 (0 = off)", top_k, top_k < 0))
    if isinstance(top_p, torch.Tensor):
        p = top_p.float()
        checks.append(("top_p", "values in (0, 1] (1 = off)", top_p, ~((p > 0) & (p <= 1))))
    if not checks:
        return
    flags = torch.stack([bad.reshape(-1).any() for *_, bad in checks]).tolist()
    for (name, want, value, _), is_bad in zip(checks, flags):
        if is_bad:
            raise ValueError(f"{name}: expected {want}, got {value.tolist()}")


def check_seed(seed, generator, batch: int, device: torch.device) -> None:
    """``seed``: None, an int within int64, a 0-d integer tensor (the same as an int, read on the device) or a
    [B] integer tensor on ``device``; never with a ``generator``."""
    if seed is None:
        return
    if generator is not None:
        raise ValueError("seed: expected None when a generator is given (seed selects the Philox uniforms)")
    if isinstance(seed, torch.Tensor):
        if seed.dim() > 1 or (seed.dim() == 1 and seed.shape[0] != batch):
            raise ValueError(
                f"seed: expected an int, a 0-d integer tensor or an integer tensor of shape [{batch}] (one seed "
                f"per row), got shape {list(seed.shape)}"
            )
        check_row_option("seed", seed, batch, device, integer=True)
    else:
        check_int("seed", seed, what=f"an int in [-2**63, 2**63) or a [{batch}] integer tensor")


def _validate(pilot_logits, copilot_out, lam, fusion, temperature, top_k, top_p, generator, seed):
    check_tensor("pilot_logits", pilot_logits, ndim=2, dtypes=FLOAT_DTYPES)
    device = pilot_logits.device
    batch = pilot_logits.shape[0]
    check_tensor(
        "copilot_out",
        copilot_out,
        ndim=2,
        dtypes=FLOAT_DTYPES,
        device=device,
        shape=tuple(pilot_logits.shape),
    )
    lam = _validate_lam(lam, batch, device)
    check_choice("fusion", fusion, FUSIONS)
    if isinstance(temperature, torch.Tensor):
        check_row_option("temperature", temperature, batch, device, integer=False)
    else:
        temperature = check_float32_range("temperature", check_finite("temperature", temperature))
        if temperature < 0 or 0 < temperature < FLOAT32_TINY:
            # A positive temperature below fp32's smallest normal would divide by 0 or a denormal in the fp32
            # arithmetic; sampling that cold is greedy sampling anyway.
            raise ValueError(
                f"temperature: expected 0 (greedy) or a finite number >= {FLOAT32_TINY:.4g}, got {temperature!r}"
            )
    if isinstance(top_k, torch.Tensor):
        check_row_option("top_k", top_k, batch, device, integer=True)
    else:
        top_k = check_int("top_k", top_k, low=0, what="an int >= 0 (0 = off)")
    if isinstance(top_p, torch.Tensor):
        check_row_option("top_p", top_p, batch, device, integer=False)
    else:
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
    check_seed(seed, generator, batch, device)
    # One host sync for the values of every per-row tensor: a NaN lambda, say, would otherwise silently give
    # arbitrary tokens.
    check_row_values(lam, temperature, top_k, top_p)
    return lam, temperature, top_k, top_p


def rectified_next_token(
    pilot_logits: torch.Tensor,
    copilot_out: torch.Tensor,
    *,
    lam: float | torch.Tensor = 1.0,
    fusion: str = "probs",
    temperature: float | torch.Tensor = 0.0,
    top_k: int | torch.Tensor = 0,
    top_p: float | torch.Tensor = 1.0,
    generator: torch.Generator | None = None,
    seed: int | torch.Tensor | None = None,
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

    Sampling procedure (reproducible from the generator state or the seed, tests rely on it): with
    ``q_final`` the renormalised filtered distribution ``[B, V]``, draw ``u = torch.rand([B, V],
    generator=generator, device=pilot_logits.device)`` (fp32), clamp it to ``>= torch.finfo(float32).tiny``
    and return ``argmax(log(q_final) - log(-log(u)))`` (Gumbel-max, i.e. an exponential race): a token is
    picked with probability ``q_final`` and excluded tokens (``q_final == 0``) never are. A greedy call (a
    ``temperature`` number 0) draws no random numbers; a ``temperature`` tensor draws them for the whole
    batch. ``rectified_probs_reference`` returns ``q_final``.

    With ``seed``, ``u`` is counter-based instead (``philox.philox_uniforms``): Philox-4x32-10 keyed by the
    seed, one number per (row, token id). Nothing of size V is drawn or read on the Triton path (the kernel
    makes the numbers), the PyTorch path computes the same numbers, and with a ``[B]`` tensor of per-row
    seeds a row's token depends on its own seed and inputs only, not on the rest of the batch. The same seed
    draws the same numbers at every call: a decoding loop passes a new one at each step (e.g. ``base + step``).

    Args:
        pilot_logits: [B, V] Pilot logits ``z`` (any float dtype; ``-inf`` marks banned tokens).
        copilot_out: [B, V] Copilot output ``f``, same shape and device (any float dtype).
        lam: finite float, or a float tensor on the same device: ``[B]`` per-row lambdas, or 0-d.
        fusion: ``"probs"`` or ``"logits"``.
        temperature: finite, ``>= 0``; 0 is greedy. Or a ``[B]`` float tensor (0 = greedy for that row).
        top_k: int ``>= 0`` (0 or ``>= V`` = off). Or a ``[B]`` integer tensor.
        top_p: in ``(0, 1]`` (1 = off). Or a ``[B]`` float tensor.
        generator: ``torch.Generator`` on the inputs' device type, or None (the default generator).
        seed: None (``u`` from ``generator``), an int (Philox key for the batch; counter = (token id,
            row)), a 0-d integer tensor (the same as that int, but read on the device: a CUDA graph replays
            it with whatever value it holds), or a ``[B]`` integer tensor of per-row keys (counter = (token
            id, 0)); only with ``generator=None``.
        impl: ``"auto"`` (Triton on CUDA tensors, PyTorch otherwise), ``"torch"`` or ``"triton"``
            (``triton_impl.py``: no vocabulary sort, same tokens as ``"torch"`` for the same generator
            state or seed up to fp32 rounding ties).

    Per-row tensors cost one host sync to check their values, and the PyTorch path then sorts the
    vocabulary of every row for a per-row ``top_k`` / ``top_p``. (The Triton launcher itself,
    ``triton_impl.rectified_next_token_triton(validate=False)``, skips the sync for CUDA-graph capture.)

    Returns:
        [B] int64 token ids in ``[0, V)``.

    Numerics: all arithmetic in fp32 whatever the input dtypes. Inputs are expected finite apart from
    ``-inf`` logits; a row of ``pilot_logits`` that is entirely ``-inf`` has no defined distribution.

    Raises:
        ValueError: naming the argument, for shapes (``[B, V]``, equal, ``B >= 1``), dtypes, devices,
            ``lam`` not finite, ``temperature < 0``, ``top_k < 0``, ``top_p`` outside ``(0, 1]`` (numbers
            or any entry of a per-row tensor), per-row tensors of the wrong shape, dtype or device, an
            unknown ``fusion`` or ``impl``, a ``generator`` that is not a ``torch.Generator`` on the
            inputs' device type, a ``seed`` outside int64 or together with a ``generator``, or ``impl="triton"`` on CPU
            tensors without ``TRITON_INTERPRET=1``.
        NotImplementedError: ``impl="triton"`` when the Triton implementation cannot be imported.

    Example:
        >>> z = torch.tensor([[2.0, 1.0, 0.0]]); f = torch.tensor([[-0.5, 0.5, 0.0]])
        >>> rectified_next_token(z, f, lam=1.0).tolist()
        [1]
    """
    lam, temperature, top_k, top_p = _validate(
        pilot_logits, copilot_out, lam, fusion, temperature, top_k, top_p, generator, seed
    )
    wants_triton = impl == "triton" or (impl == "auto" and pilot_logits.device.type == "cuda")
    triton_fn = _triton_fn() if wants_triton else None
    chosen = resolve_impl(
        impl, pilot_logits.device, "rectified_next_token", triton_available=triton_fn is not None
    )
    opts = dict(lam=lam, fusion=fusion, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator,
                seed=seed)
    if chosen == "torch":
        from .torch_impl import rectified_next_token_torch

        return rectified_next_token_torch(pilot_logits, copilot_out, **opts)
    return triton_fn(pilot_logits, copilot_out, validate=False, **opts)  # values checked above
