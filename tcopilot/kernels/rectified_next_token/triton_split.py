"""Split-row Triton kernels for ``rectified_next_token`` rows without top-k / top-p (greedy or plain temperature).

``triton_impl.py``'s kernel gives each row one program, which walks the whole vocabulary several times: the
right shape when a threshold search needs the full row in one place, but at decode batch 1 it leaves one SM
reading ``z`` and ``f`` while the others idle. Rows with no filter need no search: their token is an argmax
(greedy) or a Gumbel-max race (sampling), and both decompose over vocabulary chunks. Here every program owns one
``CHUNK``-wide tile of one row (grid ``B x ceil(V / CHUNK)``, the same grid whatever ``B`` and the device):

1. **Softmax partials** (``fusion="probs"`` only; ``_softmax_partials_kernel``): per tile the max of ``z``,
   ``sum exp(z - max)`` and ``argmax z``. ``rectified_decode_head``'s products kernel writes the same partials
   for its own vocabulary blocks as it forms ``z``, and then this launch is skipped.
2. **Choice partials** (``_choice_partials_kernel``): each program folds its row's partials into the row's
   ``max z`` / ``sum exp`` / ``argmax z`` (a few KB from L2), reads its tile of ``z``, ``f`` (and ``u``) once and
   writes the tile's fused argmax and, when sampling, its race winner.
3. **Combine** (``_combine_kernel``, one program per row): the row's token from the per-tile results.

So a greedy ``"probs"`` row reads ``z`` twice and ``f`` once (``"logits"``: each once), as the one-program kernel
does, and a sampling row the same plus ``u`` once (the one-program kernel re-reads all three in its race pass);
what changes is that up to ``B x ceil(V / CHUNK)`` programs share the reading.

Online Gumbel-max. The race winner is ``argmax(w - log(-log u))`` over tokens with a finite log-weight ``lw``,
where ``w = max((lw - M) / T, -FLT_MAX)`` and ``M`` is the row's largest ``lw`` (so the winner has ``w <= 0`` and
a tiny ``T`` cannot overflow). A tile does not know ``M``: it races with its own maximum ``M_t`` in its place and
reports ``(M_t, best score, token)``; the combine adds ``(M_t - M) / T`` to each tile's best score (0 for the
tiles holding the maximum) and takes the largest, as an online softmax rescales its partial sums. The result
equals the one-program race up to the rounding of that shift, i.e. it can differ only between candidates whose
scores agree to the last bits. Ties go to the lowest id everywhere (``tl.argmax`` takes the first maximum of a
tile; the combine the lowest id among tiles tied for the best).

The tile grid depends on ``V`` only, so a row's token (with a per-row Philox ``seed``) does not depend on the batch
it is decoded in. Fallbacks are those of the one-program kernel: a sampling ``"probs"`` row whose clamped ``p~``
is all zero returns ``argmax z``; a row with no finite score returns token 0 (its first id).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Columns per program. 1024 gives 126 programs per row at V=128256: enough to spread a batch-1 decode step over
# an H100's 132 SMs. Each program reads one tile (4 KB of bf16 z, the same of f): small work items whose latency
# overlaps across the grid. Not yet timed on a GPU; benchmarks compare this path with the one-program kernel.
_GPU_CHUNK = 1024
_GPU_WARPS = 4
# The interpreter runs programs one by one: 256 columns still give several tiles per row on the tests' shapes.
_INTERP_CHUNK = 256
_MAX_BLOCK_P = 1024  # partials folded per step (1002 partials at V=128256 from the decode head's 128-wide blocks)
_NO_ID = 2**62  # larger than any token id: the neutral element of the lowest-id reductions


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def chunk_size() -> int:
    """Columns per program of the split kernels on this backend."""
    return _INTERP_CHUNK if _interpreting() else _GPU_CHUNK


# --------------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------------


@triton.jit
def fused_tile(z_row, f_row, offs, mask, lam, m_z, s_z, FUSION_PROBS: tl.constexpr):
    """One tile of the fused score (p~ = softmax(z) + lam * f, or z~ = z + lam * f) and of the log-weight
    lw (log(max(p~, 0)), or z~), fp32; both -inf on masked lanes. Shared with ``triton_impl.py``'s kernel."""
    z = tl.load(z_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
    f = tl.load(f_row + offs, mask=mask, other=0.0).to(tl.float32)
    if FUSION_PROBS:
        fused = tl.where(mask, tl.exp(z - m_z) / s_z + lam * f, float("-inf"))
        pos = fused > 0.0
        lw = tl.where(pos, tl.log(tl.where(pos, fused, 1.0)), float("-inf"))
    else:
        fused = z + lam * f
        lw = fused
    return fused, lw


@triton.jit
def philox_uniforms(seed_ptr, row, offs, SEED_PER_ROW: tl.constexpr):
    """In-kernel uniforms in [0, 1) for the token ids ``offs`` (int32) of ``row``: Philox with key = the row's seed
    and counter = (token id, row), or (token id, 0) with per-row seeds. Shared by both kernels, so the same
    (seed, row, id) gives the same u whichever kernel draws it."""
    seed = tl.load(seed_ptr + row)
    zero = tl.zeros_like(offs)
    if SEED_PER_ROW:
        ctr = zero
    else:
        ctr = zero + row.to(tl.int32)
    r0, _r1, _r2, _r3 = tl.philox(seed, offs, ctr, zero, zero)
    return tl.uint_to_uniform_float(r0)


@triton.jit
def row_softmax_stats(pm_row, ps_row, pa_row, P, BLOCK_P: tl.constexpr):
    """A row's ``max z``, ``sum exp(z - max z)`` and ``argmax z`` (lowest id on ties) from its ``P`` partials
    (per block: the block's max, its sum of ``exp(z - block max)`` and its argmax; -inf / 0 for empty blocks).
    Also used by ``triton_impl.py``'s one-program kernel when the decode head supplies the partials."""
    m = tl.full([], float("-inf"), tl.float32)
    for start in range(0, P, BLOCK_P):
        idx = start + tl.arange(0, BLOCK_P)
        m = tl.maximum(m, tl.max(tl.load(pm_row + idx, mask=idx < P, other=float("-inf"))))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    s = tl.full([], 0.0, tl.float32)
    arg = tl.full([], 2**62, tl.int64)
    for start in range(0, P, BLOCK_P):
        idx = start + tl.arange(0, BLOCK_P)
        ok = idx < P
        pm = tl.load(pm_row + idx, mask=ok, other=float("-inf"))
        ps = tl.load(ps_row + idx, mask=ok, other=0.0)
        pa = tl.load(pa_row + idx, mask=ok, other=0)
        s += tl.sum(ps * tl.exp(pm - m_safe))  # an empty block has ps = 0 and exp(-inf) = 0
        arg = tl.minimum(arg, tl.min(tl.where(ok & (pm == m), pa, 2**62)))
    return m, s, arg


@triton.jit
def _softmax_partials_kernel(z_ptr, pm_ptr, ps_ptr, pa_ptr, V, stride_z, S, CHUNK: tl.constexpr):
    pid = tl.program_id(0)
    row = (pid // S).to(tl.int64)
    tile = pid % S
    offs = tile * CHUNK + tl.arange(0, CHUNK)
    z = tl.load(z_ptr + row * stride_z + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
    m = tl.max(z)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    out = row * S + tile
    tl.store(pm_ptr + out, m)
    tl.store(ps_ptr + out, tl.sum(tl.exp(z - m_safe)))
    tl.store(pa_ptr + out, tile * CHUNK + tl.argmax(z, axis=0).to(tl.int64))


@triton.jit
def _choice_partials_kernel(
    z_ptr, f_ptr, u_ptr, seed_ptr, lam_ptr, temp_ptr, pm_ptr, ps_ptr, pa_ptr,
    gb_ptr, ga_ptr, rm_ptr, rb_ptr, ra_ptr,
    V, stride_z, stride_f, stride_u, P, S,
    FUSION_PROBS: tl.constexpr, SAMPLE: tl.constexpr, PHILOX: tl.constexpr, SEED_PER_ROW: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    row = (pid // S).to(tl.int64)
    tile = pid % S
    start = tile * CHUNK
    offs = start + tl.arange(0, CHUNK)
    mask = offs < V
    lam = tl.load(lam_ptr + row).to(tl.float32)
    m_z = tl.full([], 0.0, tl.float32)
    s_z = tl.full([], 1.0, tl.float32)
    if FUSION_PROBS:
        # (no `_` for the unused argmax: the Philox unpacking below rebinds names in a branch, and Triton types
        # a name once per scope)
        m_z, s_z, _arg_z = row_softmax_stats(pm_ptr + row * P, ps_ptr + row * P, pa_ptr + row * P, P, BLOCK_P)

    fused, lw = fused_tile(z_ptr + row * stride_z, f_ptr + row * stride_f, offs, mask, lam, m_z, s_z, FUSION_PROBS)
    out = row * S + tile
    tl.store(gb_ptr + out, tl.max(fused))
    tl.store(ga_ptr + out, start + tl.argmax(fused, axis=0).to(tl.int64))

    if SAMPLE:
        T = tl.load(temp_ptr + row).to(tl.float32)
        m_t = tl.full([], float("-inf"), tl.float32)
        r_best = tl.full([], float("-inf"), tl.float32)
        r_arg = tl.full([], 0, tl.int64) + start
        if T > 0.0:  # a greedy row of a per-row temperature tensor draws nothing here
            m_t = tl.max(lw)
            if PHILOX:
                u = philox_uniforms(seed_ptr, row, offs, SEED_PER_ROW)
            else:
                u = tl.load(u_ptr + row * stride_u + offs, mask=mask, other=0.5)
            u = tl.maximum(u, 1.1754943508222875e-38)
            m_safe = tl.where(m_t == float("-inf"), 0.0, m_t)
            w = tl.maximum((lw - m_safe) / T, -3.4028234663852886e38)
            score = tl.where(lw > float("-inf"), w - tl.log(-tl.log(u)), float("-inf"))
            r_best = tl.max(score)
            r_arg = start + tl.argmax(score, axis=0).to(tl.int64)
        tl.store(rm_ptr + out, m_t)
        tl.store(rb_ptr + out, r_best)
        tl.store(ra_ptr + out, r_arg)


@triton.jit
def _combine_kernel(
    out_ptr, temp_ptr, pm_ptr, ps_ptr, pa_ptr, gb_ptr, ga_ptr, rm_ptr, rb_ptr, ra_ptr, V, P, S,
    FUSION_PROBS: tl.constexpr, SAMPLE: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    base = row * S
    # greedy: the lowest id among the tiles tied for the best fused score (all -inf: tile 0's first id, 0)
    g = tl.full([], float("-inf"), tl.float32)
    for start in range(0, S, BLOCK_S):
        idx = start + tl.arange(0, BLOCK_S)
        g = tl.maximum(g, tl.max(tl.load(gb_ptr + base + idx, mask=idx < S, other=float("-inf"))))
    token = tl.full([], 2**62, tl.int64)
    for start in range(0, S, BLOCK_S):
        idx = start + tl.arange(0, BLOCK_S)
        ok = idx < S
        gb = tl.load(gb_ptr + base + idx, mask=ok, other=float("-inf"))
        ga = tl.load(ga_ptr + base + idx, mask=ok, other=0)
        token = tl.minimum(token, tl.min(tl.where(ok & (gb == g), ga, 2**62)))

    if SAMPLE:
        T = tl.load(temp_ptr + row).to(tl.float32)
        if T > 0.0:
            M = tl.full([], float("-inf"), tl.float32)
            for start in range(0, S, BLOCK_S):
                idx = start + tl.arange(0, BLOCK_S)
                M = tl.maximum(M, tl.max(tl.load(rm_ptr + base + idx, mask=idx < S, other=float("-inf"))))
            if M == float("-inf"):
                # Nothing positive survived the clamp (probs: the Pilot's argmax) or an all -inf row (logits).
                if FUSION_PROBS:
                    _m, _s, token = row_softmax_stats(pm_ptr + row * P, ps_ptr + row * P, pa_ptr + row * P, P, BLOCK_P)
            else:
                # Each tile raced with its own maximum m_t in place of M: shift its best score by (m_t - M) / T.
                best = tl.full([], float("-inf"), tl.float32)
                for start in range(0, S, BLOCK_S):
                    idx = start + tl.arange(0, BLOCK_S)
                    ok = idx < S
                    rm = tl.load(rm_ptr + base + idx, mask=ok, other=float("-inf"))
                    rb = tl.load(rb_ptr + base + idx, mask=ok, other=float("-inf"))
                    live = ok & (rm > float("-inf"))
                    best = tl.maximum(best, tl.max(tl.where(live, rb + (rm - M) / T, float("-inf"))))
                token = tl.full([], 2**62, tl.int64)
                for start in range(0, S, BLOCK_S):
                    idx = start + tl.arange(0, BLOCK_S)
                    ok = idx < S
                    rm = tl.load(rm_ptr + base + idx, mask=ok, other=float("-inf"))
                    rb = tl.load(rb_ptr + base + idx, mask=ok, other=float("-inf"))
                    ra = tl.load(ra_ptr + base + idx, mask=ok, other=0)
                    live = ok & (rm > float("-inf"))
                    shifted = tl.where(live, rb + (rm - M) / T, float("-inf"))
                    token = tl.minimum(token, tl.min(tl.where(live & (shifted == best), ra, 2**62)))

    token = tl.minimum(tl.maximum(token, 0), V - 1)
    tl.store(out_ptr + row, token)


# --------------------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------------------


def softmax_partials_buffers(batch: int, parts: int, device: torch.device):
    """Empty ``(max, sum exp, argmax)`` partial buffers, [batch, parts] each (fp32, fp32, int64)."""
    return (torch.empty(batch, parts, dtype=torch.float32, device=device),
            torch.empty(batch, parts, dtype=torch.float32, device=device),
            torch.empty(batch, parts, dtype=torch.int64, device=device))


def split_rows_next_token(z, f, u, seeds, lam_t, temp_t, out, *, fusion_probs: bool, sample: bool, philox: bool,
                          seed_per_row: bool, stride_u: int, row_stats=None) -> torch.Tensor:
    """Fill ``out`` [B] with the tokens of rows without top-k / top-p (prepared inputs: ``z``, ``f`` [B, V] with unit
    column stride, per-row [B] ``lam_t`` / ``temp_t``, ``u`` or ``seeds`` as ``triton_impl`` prepares them).

    ``row_stats``: ``(max, sum exp, argmax)`` partials of ``z`` ([B, P] each, any P) that the caller already has
    (``fusion_probs`` only); without them the first launch computes them per tile.
    """
    batch, vocab = z.shape
    chunk = min(chunk_size(), triton.next_power_of_2(vocab))
    tiles = triton.cdiv(vocab, chunk)
    device = z.device
    warps = {} if _interpreting() else dict(num_warps=_GPU_WARPS)
    if fusion_probs and row_stats is None:
        row_stats = softmax_partials_buffers(batch, tiles, device)
        _softmax_partials_kernel[(batch * tiles,)](*(z, *row_stats), vocab, z.stride(0), tiles, CHUNK=chunk,
                                                   **warps)
    if row_stats is None:
        row_stats = (out, out, out)  # unread ("logits" fusion)
        parts = 1
    else:
        parts = row_stats[0].shape[1]
        row_stats = tuple(t.contiguous() for t in row_stats)
    block_p = min(_MAX_BLOCK_P, triton.next_power_of_2(parts))
    gb = torch.empty(batch, tiles, dtype=torch.float32, device=device)
    ga = torch.empty(batch, tiles, dtype=torch.int64, device=device)
    race = (torch.empty_like(gb), torch.empty_like(gb), torch.empty_like(ga)) if sample else (gb, gb, ga)
    meta = dict(FUSION_PROBS=fusion_probs, SAMPLE=sample)
    _choice_partials_kernel[(batch * tiles,)](
        z, f, u, seeds, lam_t, temp_t, *row_stats, gb, ga, *race,
        vocab, z.stride(0), f.stride(0), stride_u, parts, tiles,
        PHILOX=philox, SEED_PER_ROW=seed_per_row, CHUNK=chunk, BLOCK_P=block_p, **meta, **warps,
    )  # fmt: skip
    block_s = min(_MAX_BLOCK_P, triton.next_power_of_2(tiles))
    _combine_kernel[(batch,)](out, temp_t, *row_stats, gb, ga, *race, vocab, parts, tiles,
                              BLOCK_S=block_s, BLOCK_P=block_p, **meta, **warps)
    return out


__all__ = [
    "chunk_size", "fused_tile", "philox_uniforms", "row_softmax_stats", "softmax_partials_buffers",
    "split_rows_next_token",
]
