"""Pure-PyTorch ``rectified_decode_head``: the vocabulary products tile by tile (semantics: ``api``).

Greedy decoding (a ``temperature`` number 0) never holds a ``[B, V]`` tensor: ``fusion="logits"`` keeps a
running argmax of ``z + lam * f`` over tiles of ``block_v`` tokens (one pass over V); ``fusion="probs"`` first runs an
online max / sum-exp of ``z`` (pass 1, the Pilot's head only), then a running argmax of
``exp(z - lse) + lam * f`` (pass 2, both heads; ``z`` is recomputed rather than stored). Ties go to the
lowest id. Sampling materialises ``z`` and ``f`` ([B, V] fp32, written tile by tile) and calls
``rectified_next_token(impl="torch")``, so it draws exactly the reference's random numbers.
"""

from __future__ import annotations

import torch

from ..rectified_next_token.torch_impl import rectified_next_token_torch

BLOCK_V = 8192


def _z_tile(h, w, c, lo, hi, softcap):
    z = h @ w[lo:hi].float().t()
    if c is not None:  # the Pilot's LM-head bias, before the soft-cap
        z = z + c[lo:hi].float()
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    return z


def _f_tile(g, a, b, lo, hi):
    f = g @ a[lo:hi].float().t()
    return f if b is None else f + b[lo:hi].float()


def rectified_decode_head_torch(pilot_hidden, lm_head, copilot_hidden, error_out_weight, error_out_bias, *, lam,
                                fusion, temperature, top_k, top_p, generator, softcap, lm_head_bias=None,
                                seed=None, block_v: int = BLOCK_V):
    """[B] int64 on validated inputs; ``lam`` is a float or a [B] fp32 tensor."""
    h, g = pilot_hidden.float(), copilot_hidden.float()
    bsz, vocab = h.shape[0], lm_head.shape[0]
    device = h.device
    lam_col = lam.float().reshape(-1, 1) if isinstance(lam, torch.Tensor) else lam
    if isinstance(temperature, torch.Tensor) or temperature > 0:
        z = torch.empty(bsz, vocab, dtype=torch.float32, device=device)
        f = torch.empty_like(z)
        for lo in range(0, vocab, block_v):
            hi = min(lo + block_v, vocab)
            z[:, lo:hi] = _z_tile(h, lm_head, lm_head_bias, lo, hi, softcap)
            f[:, lo:hi] = _f_tile(g, error_out_weight, error_out_bias, lo, hi)
        return rectified_next_token_torch(z, f, lam=lam, fusion=fusion, temperature=temperature, top_k=top_k,
                                          top_p=top_p, generator=generator, seed=seed)
    if fusion == "probs":  # pass 1: log-sum-exp of z
        m = torch.full((bsz, 1), float("-inf"), device=device)
        s = torch.zeros((bsz, 1), device=device)
        for lo in range(0, vocab, block_v):
            z = _z_tile(h, lm_head, lm_head_bias, lo, hi := min(lo + block_v, vocab), softcap)
            m_new = torch.maximum(m, z.amax(dim=-1, keepdim=True))
            s = s * torch.exp(m - m_new).nan_to_num_(0.0) + torch.exp(z - m_new).sum(dim=-1, keepdim=True)
            m = m_new
        lse = m + torch.log(s)
    best = torch.full((bsz,), float("-inf"), device=device)
    best_id = torch.zeros((bsz,), dtype=torch.long, device=device)
    for lo in range(0, vocab, block_v):
        hi = min(lo + block_v, vocab)
        z = _z_tile(h, lm_head, lm_head_bias, lo, hi, softcap)
        f = _f_tile(g, error_out_weight, error_out_bias, lo, hi)
        fused = (torch.exp(z - lse) if fusion == "probs" else z) + lam_col * f
        val, idx = fused.max(dim=-1)
        better = val > best
        if lo == 0:
            better = torch.ones_like(better)  # a row of NaN/-inf still gets a valid id
        best = torch.where(better, val, best)
        best_id = torch.where(better, idx + lo, best_id)
    return best_id
