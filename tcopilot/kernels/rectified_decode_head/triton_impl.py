"""Triton ``rectified_decode_head`` (semantics: ``api``; oracle: ``reference.py``).

Two steps:

1. **Products** (``_decode_head_products_kernel``): a 1-D grid over (vocabulary blocks x row blocks); each
   program computes its ``[BLOCK_B, BLOCK_V]`` tiles of both ``z = h @ W^T + c`` (``c`` the Pilot's optional
   LM-head bias; then soft-capped) and ``f = g @ A^T + b`` with ``tl.dot`` over ``BLOCK_K`` slices of the
   hidden sizes, fp32 accumulation, and writes them to a ``[B, V]`` fp32 scratch each. Each bias is one more
   ``[BLOCK_V]`` load per tile, compiled in only when present (``HAS_Z_BIAS`` / ``HAS_F_BIAS``). With
   ``fusion="probs"`` (``WRITE_STATS``) it also writes, per row and vocabulary block, the block's max of ``z``,
   its ``sum exp(z - max)`` and its argmax: ``[B, V / BLOCK_V]`` each, what the choice would otherwise re-read
   ``z`` for.
2. **Choice**: ``rectified_next_token_triton`` on that scratch and those partials (``row_stats``), for greedy
   decoding and sampling alike, so tokens, tie rules, fallbacks and the use of ``generator`` are those of
   ``rectified_next_token(z, f, impl="triton")``: its split-row kernels (many programs per row) when no top-k /
   top-p is on, its one-program-per-row kernel otherwise.

Why a scratch: at decode the weights dominate the bytes. With V=128256 and d = c = 2048 in bf16 the two
heads are 2 x 525 MB; the scratch is ``2 * B * V * 4`` bytes, 1 MB per row, written once and read once by a
greedy choice: 0.2% of the weights' bytes at B=1, 12% at B=64 (sampling with top-k / top-p re-reads it in its
threshold searches, as ``rectified_next_token`` does with any ``z`` and ``f``). What the scratch buys is
parallelism: the products are split over ~1000 vocabulary blocks (hundreds of programs even at B=1, so
every SM streams weights), and each weight byte is read exactly once per call, whereas a kernel that picks
the token without writing ``z`` and ``f`` must reduce over the whole vocabulary inside one program per row
block (1-4 SMs at decode) or combine per-block partial results in a second pass anyway.

Weights are read in their own dtype and never copied: two 16-bit operands of equal dtype go straight into
``tl.dot`` (tensor cores, fp32 accumulation; the products of 16-bit values are exact in fp32, so only the
summation order differs from the fp32 reference). Anything else (fp32 anywhere, mixed dtypes, fp64, and
bf16 under the CPU interpreter, whose numpy ``dot`` has no bf16) is cast to fp32 in registers, tile by
tile, and multiplied with ``input_precision="ieee"`` (no TF32). Rows of the hidden states and of the weights
may have any strides (``generate`` passes ``hidden[:, -1]`` views).

Programs of the same vocabulary block are adjacent in the launch order (row block fastest), so when B is
larger than ``BLOCK_B`` the re-reads of a weight tile by the other row blocks come from L2, not HBM.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import triton
import triton.language as tl

from .._triton_math import softcap as softcap_tanh
from ..rectified_next_token.triton_impl import rectified_next_token_triton
from ..rectified_next_token.triton_split import softmax_partials_buffers


@triton.jit
def _head_tile(x_ptr, w_ptr, rows, cols, n_rows, n_cols, K, sx0, sx1, sw0, sw1,
               BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, NATIVE: tl.constexpr):
    """fp32 [BLOCK_B, BLOCK_V] tile of ``x[rows] @ w[cols]^T`` (masked rows / cols read as 0)."""
    acc = tl.zeros((BLOCK_B, BLOCK_V), dtype=tl.float32)
    x_rows = x_ptr + rows[:, None] * sx0
    w_rows = w_ptr + cols[:, None] * sw0
    row_ok = rows[:, None] < n_rows
    col_ok = cols[:, None] < n_cols
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks[None, :] < K
        x = tl.load(x_rows + ks[None, :] * sx1, mask=row_ok & k_ok, other=0.0)
        w = tl.load(w_rows + ks[None, :] * sw1, mask=col_ok & k_ok, other=0.0)
        if NATIVE:  # equal 16-bit dtypes: tensor cores, fp32 accumulation
            acc = tl.dot(x, tl.trans(w), acc)
        else:  # cast in registers (the weights stay as they are in memory); no TF32
            acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
    return acc


@triton.jit
def _decode_head_products_kernel(
    h_ptr, w_ptr, zb_ptr, g_ptr, a_ptr, fb_ptr, z_ptr, f_ptr, pm_ptr, ps_ptr, pa_ptr,
    B, V, D, C, s_h0, s_h1, s_w0, s_w1, s_g0, s_g1, s_a0, s_a1, softcap,
    HAS_Z_BIAS: tl.constexpr, HAS_F_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, Z_NATIVE: tl.constexpr,
    F_NATIVE: tl.constexpr, WRITE_STATS: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    n_row_blocks = tl.cdiv(B, BLOCK_B)
    # row block fastest: the programs sharing a weight tile run side by side (L2 reuse when B > BLOCK_B)
    pid_b = pid % n_row_blocks
    pid_v = pid // n_row_blocks
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = pid_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)  # int64: V * stride can pass 2**31
    out = rows[:, None].to(tl.int64) * V + cols[None, :]
    out_ok = (rows[:, None] < B) & (cols[None, :] < V)

    z = _head_tile(h_ptr, w_ptr, rows, cols, B, V, D, s_h0, s_h1, s_w0, s_w1, BLOCK_B, BLOCK_V, BLOCK_K,
                   Z_NATIVE)
    if HAS_Z_BIAS:  # the Pilot's LM-head bias, before the soft-cap (as the head's output is capped)
        z += tl.load(zb_ptr + cols, mask=cols < V, other=0.0).to(tl.float32)[None, :]
    if SOFTCAP:  # softcap * tanh(z / softcap)
        z = softcap_tanh(z, softcap)
    tl.store(z_ptr + out, z, mask=out_ok)
    if WRITE_STATS:  # this block's softmax partials of z, per row: the sampler then skips its pass over z
        zm = tl.where(out_ok, z, float("-inf"))
        m = tl.max(zm, axis=1)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        n_vb = tl.cdiv(V, BLOCK_V)
        part = rows.to(tl.int64) * n_vb + pid_v
        row_ok = rows < B
        tl.store(pm_ptr + part, m, mask=row_ok)
        tl.store(ps_ptr + part, tl.sum(tl.exp(zm - m_safe[:, None]), axis=1), mask=row_ok)
        tl.store(pa_ptr + part, pid_v.to(tl.int64) * BLOCK_V + tl.argmax(zm, axis=1).to(tl.int64), mask=row_ok)

    f = _head_tile(g_ptr, a_ptr, rows, cols, B, V, C, s_g0, s_g1, s_a0, s_a1, BLOCK_B, BLOCK_V, BLOCK_K,
                   F_NATIVE)
    if HAS_F_BIAS:
        f += tl.load(fb_ptr + cols, mask=cols < V, other=0.0).to(tl.float32)[None, :]
    tl.store(f_ptr + out, f, mask=out_ok)


# Tile sizes per device kind and dot kind ("native": equal 16-bit operands; "cast": fp32 in registers). Not
# tuned on a GPU yet; they follow from bytes and parallelism, and were checked by compiling for sm_90 without a
# GPU (Triton's ptxas: shared memory, registers, spills; benchmarks/sm90_compile.py's method):
# * BLOCK_V 128: V=128256 gives 1002 vocabulary blocks, ~7.6 programs per SM of an H100 (132 SMs) at B=1,
#   enough to keep every SM streaming weights. Each program re-reads its rows of h and g (from L2, not HBM):
#   that L2 traffic is (V / BLOCK_V) * B * (d + c) * elt bytes, half the weights' bytes at B=64, so a larger
#   BLOCK_V is the first thing to try when tuning large batches.
# * BLOCK_B: 16 is tl.dot's minimum; it grows with B up to 64 (native) so that up to B=64 every weight tile is
#   read by one program only (M=64 also gets Hopper's wgmma). Beyond, the row blocks of a vocabulary block run
#   side by side (launch order) and share the weight tile through L2; B=128 is then a small GEMM.
# * BLOCK_K 64 and 4 warps (8 at BLOCK_B=64: 255 registers and spills with 4, 144 with 8, bias + soft-cap; 153 with
#   the Pilot's bias too, no spills; the softmax partials of fusion="probs" add 20-35: 164 and 188, no spills).
#   num_stages: as many pipelined K slices (at most 4) as fit in ~96 KiB of shared memory (16-bit weights:
#   3-4 stages of 18-25 KiB), within Hopper's and Ampere's limits.
# * cast (fp32, mixed dtypes: an edge case, no tensor cores): the fp32 copies of the tiles live in registers,
#   so BLOCK_K 32, BLOCK_B at most 32 and 8 warps (fp32 h against a bf16 W spilled 1.3 KiB at B64/K32, 20 B
#   at B32).
_CUDA_CFG = {
    True: dict(block_v=128, block_k=64, max_block_b=64, smem_budget=96 * 1024, max_stages=4),
    False: dict(block_v=128, block_k=32, max_block_b=32, smem_budget=96 * 1024, max_stages=4),
}
# The interpreter runs programs one after another in numpy: small tiles keep the tests' odd sizes (V, d, c
# not multiples of a block, B above one row block) covered at a few programs each.
_INTERP_CFG = dict(block_v=64, block_k=32, max_block_b=16, smem_budget=96 * 1024, max_stages=1)


def _config(device: torch.device, bsz: int, native: bool, elt_bytes: int) -> dict:
    """Launch parameters for ``bsz`` rows, the dot kind and weights of ``elt_bytes`` bytes per element."""
    cfg = _CUDA_CFG[native] if device.type == "cuda" else _INTERP_CFG
    block_b = min(max(16, triton.next_power_of_2(bsz)), cfg["max_block_b"])
    stage = cfg["block_k"] * (cfg["block_v"] + block_b) * elt_bytes
    stages = max(1, min(cfg["max_stages"], cfg["smem_budget"] // stage))
    warps = 4 if native and block_b <= 32 else 8
    return dict(BLOCK_B=block_b, BLOCK_V=cfg["block_v"], BLOCK_K=cfg["block_k"], num_warps=warps,
                num_stages=stages)


def _native(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether ``tl.dot`` takes the tiles as loaded: equal 16-bit dtypes (bf16 not in the CPU interpreter)."""
    if x.dtype != w.dtype or x.dtype not in (torch.float16, torch.bfloat16):
        return False
    return x.dtype == torch.float16 or x.device.type == "cuda"


def decode_head_products_triton(pilot_hidden, lm_head, copilot_hidden, error_out_weight, error_out_bias=None,
                                softcap=None, *, lm_head_bias=None, config: dict | None = None,
                                with_stats: bool = False):
    """``(z, f)``, both [B, V] fp32 (the scratch), from validated inputs in one launch (``config``: tests).

    ``with_stats``: also return ``z``'s softmax partials per vocabulary block, ``(max, sum exp(z - max), argmax)``
    [B, ceil(V / BLOCK_V)] each, as a third item (what ``rectified_next_token_triton(row_stats=)`` takes).
    """
    bsz, d = pilot_hidden.shape
    vocab, c = lm_head.shape[0], copilot_hidden.shape[1]
    device = pilot_hidden.device
    z = torch.empty(bsz, vocab, dtype=torch.float32, device=device)
    f = torch.empty_like(z)
    h, w, g, a = pilot_hidden, lm_head, copilot_hidden, error_out_weight
    z_native, f_native = _native(h, w), _native(g, a)
    elt = max(t.element_size() for t in (h, w, g, a))
    cfg = dict(config) if config is not None else _config(device, bsz, z_native and f_native, elt)
    n_vb = triton.cdiv(vocab, cfg["BLOCK_V"])
    grid = (triton.cdiv(bsz, cfg["BLOCK_B"]) * n_vb,)
    stats = softmax_partials_buffers(bsz, n_vb, device) if with_stats else (z, z, z)  # unread without stats
    # [V] each, negligible next to the weights; z stands in (unread) for an absent bias
    zb = lm_head_bias.contiguous() if lm_head_bias is not None else z
    fb = error_out_bias.contiguous() if error_out_bias is not None else z
    # Triton launches on the current CUDA device: make it the inputs' one
    with torch.cuda.device(device) if device.type == "cuda" else nullcontext():
        _decode_head_products_kernel[grid](
            h, w, zb, g, a, fb, z, f, *stats, bsz, vocab, d, c, *h.stride(), *w.stride(), *g.stride(), *a.stride(),
            float(softcap or 1.0), HAS_Z_BIAS=lm_head_bias is not None, HAS_F_BIAS=error_out_bias is not None,
            SOFTCAP=bool(softcap), Z_NATIVE=z_native, F_NATIVE=f_native, WRITE_STATS=with_stats, **cfg,
        )
    return (z, f, stats) if with_stats else (z, f)


def rectified_decode_head_triton(pilot_hidden, lm_head, copilot_hidden, error_out_weight, error_out_bias, *, lam,
                                 fusion, temperature, top_k, top_p, generator, softcap, lm_head_bias=None,
                                 seed=None):
    """[B] int64 on validated inputs; ``lam`` is a float or a [B] (or 0-d) tensor."""
    probs = fusion == "probs"
    z, f, *stats = decode_head_products_triton(pilot_hidden, lm_head, copilot_hidden, error_out_weight,
                                               error_out_bias, softcap, lm_head_bias=lm_head_bias, with_stats=probs)
    # api.rectified_decode_head has validated every option (lam's values included): no second host sync
    return rectified_next_token_triton(z, f, lam=lam, fusion=fusion, temperature=temperature, top_k=top_k,
                                       top_p=top_p, generator=generator, seed=seed, validate=False,
                                       row_stats=stats[0] if probs else None)


__all__ = ["decode_head_products_triton", "rectified_decode_head_triton"]
