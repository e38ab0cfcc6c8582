"""Naive oracle for ``rectified_decode_head``: materialise both products, then the rectified choice."""

from __future__ import annotations

import torch

from ..rectified_next_token.reference import rectified_next_token_reference


def decode_head_logits_reference(pilot_hidden, lm_head, copilot_hidden, error_out_weight, error_out_bias,
                                 softcap=None, *, lm_head_bias=None):
    """``(z, f)``, both [B, V] fp32: ``z = h @ W^T + c`` (soft-capped), ``f = g @ A^T + b``, from fp32 inputs
    (``c = lm_head_bias``, ``b = error_out_bias``, each optional)."""
    z = pilot_hidden.float() @ lm_head.float().t()
    if lm_head_bias is not None:
        z = z + lm_head_bias.float()
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    f = copilot_hidden.float() @ error_out_weight.float().t()
    if error_out_bias is not None:
        f = f + error_out_bias.float()
    return z, f


def rectified_decode_head_reference(
    pilot_hidden, lm_head, copilot_hidden, error_out_weight, error_out_bias=None, *, lm_head_bias=None, lam=1.0,
    fusion="probs", temperature=0.0, top_k=0, top_p=1.0, generator=None, softcap=None, seed=None,
) -> torch.Tensor:
    """[B] int64: ``rectified_next_token_reference`` of the materialised ``z`` and ``f``."""
    z, f = decode_head_logits_reference(pilot_hidden, lm_head, copilot_hidden, error_out_weight, error_out_bias,
                                        softcap, lm_head_bias=lm_head_bias)
    return rectified_next_token_reference(z, f, lam=lam, fusion=fusion, temperature=temperature, top_k=top_k,
                                          top_p=top_p, generator=generator, seed=seed)
