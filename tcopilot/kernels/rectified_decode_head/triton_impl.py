"""Triton ``rectified_decode_head`` (semantics: ``api``; oracle: ``reference.py``).

Greedy decoding (``temperature == 0``) is one launch, one program per block of ``BLOCK_B`` rows, walking
the vocabulary in tiles of ``BLOCK_V`` tokens; each tile's products ``z = h @ W^T`` and ``f = g @ A^T + b``
are ``tl.dot`` tiles accumulated in fp32 over the hidden sizes, so nothing of size V is written:

* pass 1 (``fusion="probs"`` only; the Pilot's head only): online max / sum-exp of ``z`` per row;
* pass 2 (both heads): ``exp(z - lse) + lam * f`` (or ``z + lam * f``) and a running argmax per row (ties:
  lowest id).

So the Copilot costs one extra read of ``error_out`` (and ``fusion="probs"`` a second read of ``lm_head``).
fp32 inputs use ``input_precision="ieee"`` (no TF32), so the products equal the reference's up to the
summation order. Sampling (``temperature > 0``) is not fused yet: ``z`` and ``f`` are materialised tile by
tile as in the PyTorch path and handed to ``rectified_next_token(impl="triton")``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..rectified_next_token.api import rectified_next_token
from .torch_impl import rectified_decode_head_torch


@triton.jit
def _tile_dot(x_ptr, w_ptr, rows, cols, n_rows, n_cols, K, stride_x, stride_w,
              BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    """fp32 [BLOCK_B, BLOCK_V] tile of ``x[rows] @ w[cols]^T`` (masked rows/cols read as 0)."""
    acc = tl.zeros((BLOCK_B, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[:, None] * stride_x + ks[None, :],
                    mask=(rows[:, None] < n_rows) & (ks[None, :] < K), other=0.0)
        w = tl.load(w_ptr + cols[:, None] * stride_w + ks[None, :],
                    mask=(cols[:, None] < n_cols) & (ks[None, :] < K), other=0.0)
        if IEEE:
            acc += tl.dot(x, tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w))
    return acc


@triton.jit
def _decode_head_greedy_kernel(
    h_ptr, w_ptr, g_ptr, a_ptr, b_ptr, lam_ptr, out_ptr,
    B, V, D, C, stride_h, stride_w, stride_g, stride_a, softcap,
    HAS_BIAS: tl.constexpr, PROBS: tl.constexpr, SOFTCAP: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    lam = tl.load(lam_ptr + rows, mask=row_ok, other=0.0)
    m = tl.full((BLOCK_B,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_B,), tl.float32)
    lse = tl.zeros((BLOCK_B,), tl.float32)
    if PROBS:
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            z = _tile_dot(h_ptr, w_ptr, rows, cols, B, V, D, stride_h, stride_w, BLOCK_B, BLOCK_V, BLOCK_K, IEEE)
            if SOFTCAP:
                t = z / softcap
                z = softcap * (2.0 / (1.0 + tl.exp(-2.0 * t)) - 1.0)  # softcap * tanh(z / softcap)
            z = tl.where(cols[None, :] < V, z, float("-inf"))
            m_new = tl.maximum(m, tl.max(z, axis=1))
            alpha = tl.where(m_new == float("-inf"), 0.0, tl.exp(m - m_new))
            s = s * alpha + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
            m = m_new
        lse = m + tl.log(s)
    best = tl.full((BLOCK_B,), float("-inf"), tl.float32)
    best_id = tl.zeros((BLOCK_B,), tl.int64)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        z = _tile_dot(h_ptr, w_ptr, rows, cols, B, V, D, stride_h, stride_w, BLOCK_B, BLOCK_V, BLOCK_K, IEEE)
        if SOFTCAP:
            t = z / softcap
            z = softcap * (2.0 / (1.0 + tl.exp(-2.0 * t)) - 1.0)
        f = _tile_dot(g_ptr, a_ptr, rows, cols, B, V, C, stride_g, stride_a, BLOCK_B, BLOCK_V, BLOCK_K, IEEE)
        if HAS_BIAS:
            f += tl.load(b_ptr + cols, mask=cols < V, other=0.0).to(tl.float32)[None, :]
        if PROBS:
            fused = tl.exp(z - lse[:, None]) + lam[:, None] * f
        else:
            fused = z + lam[:, None] * f
        fused = tl.where(cols[None, :] < V, fused, float("-inf"))
        val = tl.max(fused, axis=1)
        idx = tl.argmax(fused, axis=1, tie_break_left=True).to(tl.int64) + v0
        better = (val > best) | (v0 == 0)
        best = tl.where(better, val, best)
        best_id = tl.where(better, idx, best_id)
    tl.store(out_ptr + rows, best_id, mask=row_ok)


def _config(device: torch.device) -> tuple[int, int, int, int]:
    # (BLOCK_B, BLOCK_V, BLOCK_K, num_warps). Not tuned on a GPU yet.
    return (16, 128, 64, 4) if device.type == "cuda" else (16, 64, 32, 4)


def rectified_decode_head_triton(pilot_hidden, lm_head, copilot_hidden, error_out_weight, error_out_bias, *, lam,
                                 fusion, temperature, top_k, top_p, generator, softcap):
    """[B] int64 on validated inputs; ``lam`` is a float or a [B] fp32 tensor."""
    if temperature > 0:
        z = torch.empty(pilot_hidden.shape[0], lm_head.shape[0], dtype=torch.float32, device=pilot_hidden.device)
        f = torch.empty_like(z)
        # reuse the tiled products of the PyTorch path, then the Triton sampler
        from .torch_impl import BLOCK_V, _f_tile, _z_tile

        h, g = pilot_hidden.float(), copilot_hidden.float()
        for lo in range(0, z.shape[1], BLOCK_V):
            hi = min(lo + BLOCK_V, z.shape[1])
            z[:, lo:hi] = _z_tile(h, lm_head, lo, hi, softcap)
            f[:, lo:hi] = _f_tile(g, error_out_weight, error_out_bias, lo, hi)
        return rectified_next_token(z, f, lam=lam, fusion=fusion, temperature=temperature, top_k=top_k,
                                    top_p=top_p, generator=generator, impl="triton")
    bsz, d = pilot_hidden.shape
    vocab, c = lm_head.shape[0], copilot_hidden.shape[1]
    h, w = pilot_hidden.contiguous(), lm_head.contiguous()
    g, a = copilot_hidden.contiguous(), error_out_weight.contiguous()
    b = error_out_bias.contiguous() if error_out_bias is not None else h
    if isinstance(lam, torch.Tensor):
        lam_t = lam.to(device=h.device, dtype=torch.float32).reshape(-1).expand(bsz).contiguous()
    else:
        lam_t = torch.full((bsz,), float(lam), dtype=torch.float32, device=h.device)
    out = torch.empty(bsz, dtype=torch.int64, device=h.device)
    block_b, block_v, block_k, warps = _config(h.device)
    ieee = h.dtype == torch.float32 or w.dtype == torch.float32
    # tl.dot wants equal operand dtypes, at most fp32; Triton's CPU interpreter computes bf16 dots wrongly
    # (numpy has no bf16), so CPU tensors go through fp32 there
    interp_bf16 = h.device.type != "cuda" and torch.bfloat16 in (h.dtype, w.dtype, g.dtype, a.dtype)
    if h.dtype != w.dtype or g.dtype != a.dtype or torch.float64 in (h.dtype, g.dtype) or interp_bf16:
        h, w, g, a = h.float(), w.float(), g.float(), a.float()
        ieee = True
    _decode_head_greedy_kernel[(triton.cdiv(bsz, block_b),)](
        h, w, g, a, b, lam_t, out, bsz, vocab, d, c, h.stride(0), w.stride(0), g.stride(0), a.stride(0),
        float(softcap or 1.0), HAS_BIAS=error_out_bias is not None, PROBS=fusion == "probs",
        SOFTCAP=bool(softcap), IEEE=ieee, BLOCK_B=block_b, BLOCK_V=block_v, BLOCK_K=block_k, num_warps=warps,
    )
    return out


__all__ = ["rectified_decode_head_triton", "rectified_decode_head_torch"]
