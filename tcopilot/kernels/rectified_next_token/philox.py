"""The sampler's counter-based uniforms in plain PyTorch, bit for bit those the Triton kernels draw.

``rectified_next_token(seed=...)`` draws ``u[b, i]`` from Philox-4x32-10 (Salmon et al., SC 2011) with
key = the seed (its low and high 32 bits) and counter = ``(i, b, 0, 0)`` for one seed shared by the batch,
or ``(i, 0, 0, 0)`` with a seed per row, so a row's numbers depend on its seed and token ids only, never
on its batch. The first output word becomes a float in ``[0, 1)`` as Triton's ``uint_to_uniform_float``
does: read as int32, negatives folded (``~x``), times ``4.6566127342e-10`` in fp32. Triton's kernels call
``tl.philox`` / ``tl.uint_to_uniform_float``; this file lets the PyTorch path and the oracle reproduce
them on any device, so ``impl="torch"`` and ``impl="triton"`` return the same tokens for the same seed.

Arithmetic: uint32 words are held in int64 tensors. The 32x32-bit products are split on the 16-bit
halves of one factor, so no intermediate reaches 2**63 (int64 has no unsigned overflow to rely on).
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57  # Philox-4x32 multipliers
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85  # Weyl key increments
_ROUNDS = 10
# Triton's scale (max int32 * scale < 1), as a Python number: a tensor would be a host-to-device copy at every
# draw, which blocks and which CUDA-graph capture refuses. (fp32 tensor * Python float multiplies by the
# float rounded to fp32, what Triton's constant is.)
_TO_UNIT = 4.6566127342e-10


def _mul_hi_lo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of ``a * b`` (``a`` a uint32 constant, ``b`` uint32 values in int64)."""
    b_hi, b_lo = b >> 16, b & 0xFFFF
    p_hi, p_lo = a * b_hi, a * b_lo  # each < 2**48
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & _MASK32
    return hi, lo


def philox_uniforms(seed: int | torch.Tensor, batch: int, vocab: int, device: torch.device | str) -> torch.Tensor:
    """``u`` [batch, vocab] fp32 in [0, 1), as the Triton sampler draws it for ``seed``.

    ``seed``: an int or a 0-d integer tensor (one key for the batch, counter word 1 = the row) or a [batch]
    integer tensor (a key per row, counter word 1 = 0). Seeds are read as int64; only their 64 bits matter.
    """
    ids = torch.arange(vocab, dtype=torch.int64, device=device)[None, :]
    if isinstance(seed, torch.Tensor) and seed.dim() == 0:  # one key, read on the device (no host value)
        key = seed.to(device=device, dtype=torch.int64).reshape(1, 1).expand(batch, 1)
        c1 = torch.arange(batch, dtype=torch.int64, device=device)[:, None]
    elif isinstance(seed, torch.Tensor):
        key = seed.to(device=device, dtype=torch.int64).reshape(-1, 1)
        c1 = torch.zeros((batch, 1), dtype=torch.int64, device=device)
    else:
        key = torch.full((batch, 1), int(seed), dtype=torch.int64, device=device)
        c1 = torch.arange(batch, dtype=torch.int64, device=device)[:, None]
    k0, k1 = key & _MASK32, (key >> 32) & _MASK32
    c0, c1 = ids.expand(batch, vocab), c1.expand(batch, vocab)
    c2 = c3 = torch.zeros_like(c0)
    for _ in range(_ROUNDS):
        hi_b, lo_b = _mul_hi_lo(_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _MASK32, (k1 + _KEY_B) & _MASK32
    x = torch.where(c0 >= 2**31, c0 - 2**32, c0)  # the word as int32
    x = torch.where(x < 0, -x - 1, x)  # ~x
    return x.to(torch.float32) * _TO_UNIT


__all__ = ["philox_uniforms"]
