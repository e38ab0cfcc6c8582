"""Triton ``rectified_next_token`` (semantics: ``api.rectified_next_token``; oracle: ``reference.py``).

Two kernel families. Rows that need no threshold search (greedy, or sampling without top-k / top-p) run the
split-row kernels of ``triton_split.py``: many programs per row, so a batch-1 decode step reads ``z`` and ``f``
on every SM. Rows with a filter run the kernel of this file, which needs the whole row in one place for its
searches: one program per row walks the vocabulary in tiles, several times, inside a single launch, with no host
sync. No pass writes anything of size V: every pass re-reads the Pilot logits ``z`` and the Copilot output
``f`` and recomputes each token's weight from a handful of per-row scalars. Nothing is sorted.

Passes over V (``fusion="logits"`` skips pass A; greedy rows stop after pass B):

* **A. Pilot statistics** (``fusion="probs"``): online max / sum-exp of ``z`` (so ``p^ = exp(z - m) / s``)
  and ``argmax z`` (ties: lowest id), the fallback token of a row whose clamped ``p~`` is all zero.
* **B. Fused statistics**: ``p~ = p^ + lam * f`` (or ``z~ = z + lam * f``) and its argmax (greedy; ties:
  lowest id). When sampling, of the log-weights ``lw = log(max(p~, 0))`` (or ``z~``): the row max ``M``, the
  smallest finite value and the number of finite values. A sampling row with ``M = -inf`` has nothing
  left after the clamp and returns ``argmax z``.
* **C. Threshold search** (rows with top-k or top-p on). With the tempered weight
  ``w = max((lw - M) / T, -FLT_MAX)`` (the row maximum is exactly 0), the set either filter keeps is
  ``{w >= t}`` for a threshold ``t`` that is one of the row's own weights, and "is ``x <= t``?" is
  monotone in ``x``:

    - top-k: ``#{w >= x} >= k`` (a k at least the number of finite weights keeps them all: no search);
    - top-p, among the top-k survivors ``{w >= t_k}`` of total mass ``S_k = sum exp(w)``:
      ``sum{exp(w) : w >= x} >= top_p * S_k``. (The reference keeps token ``i`` iff the mass of the
      tokens strictly more likely than ``i`` is below ``top_p``; ``t_p`` is the smallest such weight.)

  Each counting pass evaluates ``NPIV`` pivots at once: per pivot ``x`` the count and (top-p) the mass
  of ``{w >= x}``, and ``min{w >= x}``. The search keeps ``v0``, a weight known to be ``<= t`` (it starts
  at the smallest finite weight, or at ``t_k`` for top-p), and ``hi``, known to be ``> t``. A pass tests
  the next float above ``v0`` (if it fails, ``t == v0`` exactly: done), pivots evenly spaced in value up
  to ``hi`` (quick on ordinary rows) and a few evenly spaced in the order-preserving integer image of the
  floats (a bisection on the bit pattern, which bounds the search for any values). Then ``v0`` becomes
  the smallest weight at or above the largest passing pivot and ``hi`` the smallest failing pivot. Top-k
  also stops as soon as exactly ``k`` weights are ``>= v0``.

  **Gather.** Pivots only narrow ``[v0, hi)``; once it holds at most ``CAP`` weights (1024 on a GPU), one
  more pass copies them and their ids into a per-row buffer (all of ``{w >= v0}`` when that fits), loads
  the ``CAP`` values into registers and finds ``t`` among them by bisection on the order key (at most 32
  steps): the ``(k - #{w >= hi})``-th largest, or the largest weight whose mass above it, added to that
  of ``{w >= hi}``, reaches ``top_p * S_k``. When the top-k buffer holds all of ``{w >= t_k}``, top-p is
  solved from it without touching V. (Before the gather, a top-p search narrowed down to the exact
  weight: 6-7 counting passes on the benchmark's V=128256 rows.)
* **D. Sample**: Gumbel-max over the kept tokens, ``argmax(w - log(-log u))`` (ties: lowest id); it
  differs from the reference's ``log(q_final) - log(-log u)`` by a per-row constant only. A search that
  ends in a gather runs the race there instead: every weight ``>= hi`` is kept, so the gather pass races
  them as it reads them, and the kept buffer entries race after the threshold is known. (Not when a later
  top-p search will cut below ``hi``, nor in the rare top-p row where a weight just below ``v0`` could
  round to the cut-off's probability: those rows run pass D.)

Passes over V per sampled row, measured on the benchmark's inputs (V=128256, ``fusion="probs"``, CPU
interpreter, CAP=1024): top-k 50 + top-p 0.9: A, B, one counting pass, one gather (+ race) = 4 (was 9.0
with pass D and searches to the exact weight); top-p 0.9 alone: A, B, 3 counting passes, gather = 6 (was
9.5). Those rows are noise-dominated (a 70k-token plateau of ``p~ ~ 1e-5``); peaked LLM-like rows
gather after one counting pass.

Ties at a cut-off are all kept, as in the reference: the filters are thresholds on the weights, and the
top-p one on the probabilities (``exp(w) >= exp(t_p)``, which also keeps tokens whose probability only
rounds to the cut-off's).

Randomness: by default ``u = torch.rand([B, V], generator)`` clamped to ``finfo(float32).tiny``, drawn
exactly as the PyTorch path draws it, so both paths return the same tokens for the same generator state
(up to the rounding noted below). Opt-in ``seed=``: ``u`` comes from Triton's Philox in the kernel (key =
the seed, counter = (token id, row); with a [B] tensor of per-row seeds the counter is (token id, 0)):
nothing of size V is drawn or read.

Equality with the PyTorch path. Both evaluate the same formulas in fp32, but not bit for bit (softmax and
summation orders, ``exp``/``log`` implementations, FMA contraction on a GPU). A different token can come
out only where two candidates are within float rounding of each other: fused scores equal to the last
bit (greedy, the top-k cut-off, the Gumbel race), probabilities that round together only after the
reference's division by their sum, or a cumulative mass within rounding of ``top_p``. The last one grows
with V: a float32 ``cumsum`` over 131072 sorted probabilities is off by ~1e-6 of the mass, enough to move
the reference's top-p cut-off by a few tail tokens in ~2% of LLM-like rows (in a simulation, tree-ordered
sums as used here agreed with a float64 cut-off in those rows); the sampled token changes only if one of
those tail tokens wins the race.
"""

from __future__ import annotations

import os
from contextlib import nullcontext

import torch
import triton
import triton.language as tl

from .api import check_row_option, check_row_values
from .triton_split import fused_tile, philox_uniforms, row_softmax_stats, split_rows_next_token

_TINY = torch.finfo(torch.float32).tiny

# Pivots per counting pass: the base set, the next float above v0, then value-spaced and key-spaced ones.
# 12 value + 2 key pivots took 4.4 passes per row on average over simulated V=131072 rows (Gaussian, flat
# and LLM-like logits; top-k 50 / 1000, top-p 0.5 / 0.9, both), against 5.0 for 7 + 7 and 5.8 for 8 pivots.
_NPIV = 16
_N_VALUE_PIVOTS = 12
_MAX_SEARCH_PASSES = 48  # never reached: the key-spaced pivots shrink the key range 3x per pass (~20)

# (BLOCK_V for the streaming passes, BLOCK_S for the counting passes, num_warps, CAP: the size of the buffer
# a search gathers its last candidates into). Not yet tuned on a GPU. The interpreter runs each program
# sequentially in numpy: small tiles still give several per row, and a small CAP lets the tests' rows
# (V ~ 1000) run counting passes before the gather.
_GPU_CFG = (2048, 256, 8, 1024)
_INTERP_CFG = (256, 256, 4, 64)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# --------------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------------


# Helpers are few and the key arithmetic is written inline: under the interpreter every call of a
# @triton.jit function costs milliseconds, on a GPU it is inlined anyway.


@triton.jit
def _gumbel_score(w, keep, ids, u_row, seed_ptr, row, PHILOX: tl.constexpr, SEED_PER_ROW: tl.constexpr):
    """The race's score ``w - log(-log u)`` of the kept lanes (-inf elsewhere); ``u`` of the token ``ids``
    from in-kernel Philox, or read from the row of drawn uniforms (kept lanes only)."""
    if PHILOX:
        u = philox_uniforms(seed_ptr, row, ids, SEED_PER_ROW)
    else:
        u = tl.load(u_row + ids, mask=keep, other=0.5)
    u = tl.maximum(u, 1.1754943508222875e-38)
    return tl.where(keep, w - tl.log(-tl.log(u)), float("-inf"))


@triton.jit
def _search(
    z_row, f_row, bufw_row, bufi_row, u_row, seed_ptr, row, V, lam, m_z, s_z, M, T, base, cnt_base, n_buf,
    k, top_p, race,
    IS_TOP_P: tl.constexpr, FUSION_PROBS: tl.constexpr, PHILOX: tl.constexpr, SEED_PER_ROW: tl.constexpr,
    BLOCK_S: tl.constexpr, NPIV: tl.constexpr, N_VALUE: tl.constexpr, MAX_PASSES: tl.constexpr,
    CAP: tl.constexpr,
):  # fmt: skip
    """Threshold t (one of the row's weights) of top-k (IS_TOP_P=False) or of top-p among {w >= base}.

    The kept set is {w >= t} (top-p: and the ties in probability, see pass D). ``cnt_base`` is
    #{w >= base} when known (else -1); ``n_buf >= 0`` says that the row's buffer already holds, in its
    first ``n_buf`` slots, every weight >= base (a top-k search left it so). With ``race`` set, a search
    that ends in a gather also runs the Gumbel race of pass D. Returns (t, passes over V, #{w >= t}
    (top-k), n_buf for a following top-p search, whether the race ran, its token).
    """
    slot = tl.arange(0, NPIV)
    N_KEY: tl.constexpr = NPIV - 2 - N_VALUE
    TOP: tl.constexpr = 1.1754943508222875e-38  # above every weight (all are <= 0)
    v0 = base  # a weight <= t: {w >= v0} contains the answer
    cnt_v0 = cnt_base  # #{w >= v0}, -1 while unknown
    hi = tl.full([], TOP, tl.float32)  # > t
    cnt_hi = tl.full([], 0, tl.int32)  # #{w >= hi}, and their mass (top-p)
    mass_hi = tl.full([], 0.0, tl.float32)
    mass_base = tl.full([], -1.0, tl.float32)  # sum of exp(w) over {w >= base} (top-p), -1 while unknown
    n_pass = tl.full([], 0, tl.int32)
    # Few enough candidates already: go straight to the gather (below), no counting pass.
    gather = (n_buf >= 0) | ((cnt_v0 >= 0) & (cnt_v0 <= CAP))
    going = gather == 0
    while going:
        # Pivots: slot 0 = base (top-p: its mass normalises), 1 = x0 = the next float above v0, then
        # N_VALUE pivots evenly spaced in value and N_KEY evenly spaced in order key, all in (x0, hi).
        # Order key of an fp32 x: its bits b as int32, negatives mirrored: b ^ ((b >> 31) & 0x7FFFFFFF)
        # (an involution; integers then compare like the floats). Every weight is finite and <= 0.
        b = v0.to(tl.int32, bitcast=True)
        k_lo = (b ^ ((b >> 31) & 0x7FFFFFFF)) + 1
        b = k_lo ^ ((k_lo >> 31) & 0x7FFFFFFF)
        x0 = b.to(tl.float32, bitcast=True)
        b = hi.to(tl.int32, bitcast=True)
        k_hi = b ^ ((b >> 31) & 0x7FFFFFFF)
        frac = tl.minimum(tl.maximum(slot - 1, 0), N_VALUE + 1).to(tl.float32) / (N_VALUE + 1)
        by_value = tl.maximum(x0 + (hi - x0) * frac, x0)
        step = tl.maximum(slot - 1 - N_VALUE, 0).to(tl.int64)
        k_span = k_hi.to(tl.int64) - k_lo.to(tl.int64)
        b = (k_lo.to(tl.int64) + (k_span * step) // (N_KEY + 1)).to(tl.int32)
        by_key = (b ^ ((b >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
        piv = tl.where(slot < 2 + N_VALUE, by_value, by_key)
        piv = tl.where(slot == 1, x0, piv)
        piv = tl.where(slot == 0, base, piv)

        # One counting pass: per pivot x, #{w >= x}, the mass sum of exp(w) over {w >= x} (top-p) and
        # min{w >= x}.
        stat_i = tl.zeros([NPIV], dtype=tl.int32)
        stat_f = tl.zeros([NPIV], dtype=tl.float32)
        mn = tl.full([NPIV], float("inf"), dtype=tl.float32)
        for start in range(0, V, BLOCK_S):
            offs = start + tl.arange(0, BLOCK_S)
            mask = offs < V
            _, lw = fused_tile(z_row, f_row, offs, mask, lam, m_z, s_z, FUSION_PROBS)
            w = tl.where(mask, tl.maximum((lw - M) / T, -3.4028234663852886e38), float("-inf"))
            ge = w[:, None] >= piv[None, :]
            if IS_TOP_P:
                stat_f += tl.sum(tl.where(ge, tl.exp(w)[:, None], 0.0), axis=0)
            stat_i += tl.sum(ge.to(tl.int32), axis=0)
            mn = tl.minimum(mn, tl.min(tl.where(ge, w[:, None], float("inf")), axis=0))
        if n_pass == 0:
            cnt_v0 = tl.max(tl.where(slot == 0, stat_i, 0))  # v0 is still base
            mass_base = tl.max(tl.where(slot == 0, stat_f, 0.0))

        # "x <= t?" is monotone in x. (Every candidate pivot lies above base, a kept weight, so the
        # top-p rule "or no kept token below x" never applies to them.)
        if IS_TOP_P:
            ok = stat_f >= top_p * mass_base
        else:
            ok = stat_i >= k
        cand = slot >= 1
        passing = cand & ok
        # `x == 0`, not `~x`, negates these booleans: Triton 3.3's interpreter has no `~` for them (pyproject floor).
        failing = cand & (ok == 0)
        best = tl.max(tl.where(passing, piv, float("-inf")))
        any_pass = best > float("-inf")
        sel = passing & (piv == best)
        lowest_fail = tl.min(tl.where(failing, piv, float("inf")))
        at_fail = failing & (piv == lowest_fail)
        if lowest_fail < hi:
            hi = lowest_fail
            cnt_hi = tl.max(tl.where(at_fail, stat_i, 0))
            mass_hi = tl.max(tl.where(at_fail, stat_f, 0.0))
        # {w >= best} = {w >= its smallest member}: move v0 up to that weight.
        v0_new = tl.where(any_pass, tl.min(tl.where(sel, mn, float("inf"))), v0)
        cnt_v0 = tl.where(any_pass, tl.max(tl.where(sel, stat_i, 0)), cnt_v0)
        stalled = v0_new <= v0  # cannot happen in exact arithmetic; guards against denormal flushing
        v0 = v0_new
        n_pass += 1
        # Done when x0 failed (t == v0), nothing lies between v0 and hi, or v0 is the row maximum.
        b = v0.to(tl.int32, bitcast=True)
        k_v0 = b ^ ((b >> 31) & 0x7FFFFFFF)
        b = hi.to(tl.int32, bitcast=True)
        k_hi = b ^ ((b >> 31) & 0x7FFFFFFF)
        stop = (any_pass == 0) | stalled | (v0 >= 0.0) | (k_v0 + 1 >= k_hi) | (n_pass >= MAX_PASSES)
        if not IS_TOP_P:
            stop = stop | (cnt_v0 == k)  # exactly k kept: no tie to resolve
        # Few candidates left in [v0, hi): collect them and finish in registers.
        gather = (stop == 0) & (cnt_v0 - cnt_hi <= CAP)
        going = (stop == 0) & (gather == 0)

    t = v0
    cnt_t = cnt_v0
    n_whole = tl.full([], -1, tl.int32)
    raced = gather & race
    token = tl.full([], 0, tl.int64)
    if gather:
        # The buffer receives the weights in [v0, hi_g) and their token ids, in id order: everything >= v0
        # when that fits, else [v0, hi), whose #{w >= hi} and mass are known. Every weight >= hi_g is kept
        # (hi_g > t), so the gather pass also runs their part of the race.
        whole = (n_buf >= 0) | (cnt_v0 <= CAP)
        hi_g = tl.where(whole, TOP, hi)
        cnt_g = tl.where(whole, 0, cnt_hi)
        mass_g = tl.where(whole, 0.0, mass_hi)
        n_g = n_buf
        best = tl.full([], float("-inf"), tl.float32)
        if n_buf < 0:
            n_g = 0
            for start in range(0, V, BLOCK_S):
                offs = start + tl.arange(0, BLOCK_S)
                mask = offs < V
                _, lw = fused_tile(z_row, f_row, offs, mask, lam, m_z, s_z, FUSION_PROBS)
                w = tl.where(mask, tl.maximum((lw - M) / T, -3.4028234663852886e38), float("-inf"))
                pick = (w >= v0) & (w < hi_g)
                pos = n_g + tl.cumsum(pick.to(tl.int32), axis=0) - 1
                tl.store(bufw_row + pos, w, mask=pick & (pos < CAP))
                tl.store(bufi_row + pos, offs, mask=pick & (pos < CAP))
                n_g += tl.sum(pick.to(tl.int32))
                if race:
                    score = _gumbel_score(w, w >= hi_g, offs, u_row, seed_ptr, row, PHILOX, SEED_PER_ROW)
                    t_max = tl.max(score)
                    token = tl.where(t_max > best, start + tl.argmax(score, axis=0), token)
                    best = tl.maximum(best, t_max)
            n_pass += 1
            n_g = tl.minimum(n_g, CAP)  # equal to cnt_v0 - cnt_g; the guard keeps the stores in bounds
            tl.debug_barrier()  # the stores above, by all threads, are read back below
        # The threshold, by bisection on the order key over the buffered weights: "x <= t?" is monotone,
        # v0 passes and hi_g fails, and each step halves the key range (at most 32 steps, each a sum over
        # CAP values in registers). When it ends, key lo passes and lo + 1 fails, so lo is a buffered
        # weight: t. (No sort: tl.sort of 1024 values costs ~15 s of compile time per kernel variant.)
        idx = tl.arange(0, CAP)
        wb = tl.load(bufw_row + idx, mask=idx < n_g, other=float("-inf"))
        wb = tl.where(wb >= v0, wb, float("-inf"))  # a buffer left by top-k may also hold weights < base
        if IS_TOP_P:
            eb = tl.exp(wb)
            if mass_base < 0.0:  # no counting pass ran: the buffer holds all of {w >= base}
                mass_base = tl.sum(eb)
            need_f = top_p * mass_base - mass_g
        else:
            need_i = k - cnt_g
        b = v0.to(tl.int32, bitcast=True)
        lo = (b ^ ((b >> 31) & 0x7FFFFFFF)).to(tl.int64)
        b = hi_g.to(tl.int32, bitcast=True)
        hi_k = (b ^ ((b >> 31) & 0x7FFFFFFF)).to(tl.int64)
        while hi_k - lo > 1:
            mid = lo + (hi_k - lo) // 2
            b = mid.to(tl.int32)
            x = (b ^ ((b >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
            if IS_TOP_P:
                ok = tl.sum(tl.where(wb >= x, eb, 0.0)) >= need_f
            else:
                ok = tl.sum((wb >= x).to(tl.int32)) >= need_i
            lo = tl.where(ok, mid, lo)
            hi_k = tl.where(ok, hi_k, mid)
        b = lo.to(tl.int32)
        t = (b ^ ((b >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
        if IS_TOP_P:
            # A weight below v0 whose probability rounds to the cut-off's is kept too (pass D), but it
            # is not in the buffer: leave such a row to pass D (rare: exp(v0) must equal exp(t)).
            raced = raced & ((n_buf >= 0) | (v0 == base) | (tl.exp(v0) < tl.exp(t)))
        else:
            cnt_t = cnt_g + tl.sum((wb >= t).to(tl.int32))
        n_whole = tl.where(whole, n_g, -1)
        if raced:
            # The race among the kept candidates, in id order (ties: lowest id, as in pass D).
            ib = tl.load(bufi_row + idx, mask=idx < n_g, other=0)
            keep = (idx < n_g) & (wb >= base) & (wb >= t)
            if IS_TOP_P:
                keep = (idx < n_g) & (wb >= base) & ((wb >= t) | (tl.exp(wb) >= tl.exp(t)))
            score = _gumbel_score(wb, keep, ib, u_row, seed_ptr, row, PHILOX, SEED_PER_ROW)
            b_max = tl.max(score)
            b_tok = tl.min(tl.where((score == b_max) & keep, ib, 2147483647)).to(tl.int64)
            take = (b_max > best) | ((b_max == best) & (b_tok < token))
            token = tl.where(take, b_tok, token)
    return t, n_pass, cnt_t, n_whole, raced, token


@triton.jit
def _rectified_next_token_kernel(
    z_ptr, f_ptr, u_ptr, seed_ptr, out_ptr, passes_ptr, bufw_ptr, bufi_ptr, lam_ptr, temp_ptr, topk_ptr, topp_ptr,
    pm_ptr, ps_ptr, pa_ptr, V, stride_z, stride_f, stride_u, P,
    FUSION_PROBS: tl.constexpr, SAMPLE: tl.constexpr, PHILOX: tl.constexpr, SEED_PER_ROW: tl.constexpr,
    HAS_STATS: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_S: tl.constexpr, NPIV: tl.constexpr, N_VALUE: tl.constexpr,
    MAX_PASSES: tl.constexpr, CAP: tl.constexpr, WRITE_PASSES: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    f_row = f_ptr + row * stride_f
    bufw_row = bufw_ptr + row * CAP
    bufi_row = bufi_ptr + row * CAP
    u_row = u_ptr + row * stride_u
    lam = tl.load(lam_ptr + row).to(tl.float32)
    cols = tl.arange(0, BLOCK_V)

    # ---- pass A (probs fusion): softmax statistics of z and argmax z (the fallback token), or their fold
    # from per-block partials that the decode head wrote with z (HAS_STATS: no pass over V)
    m_z = tl.full([], 0.0, tl.float32)
    s_z = tl.full([], 1.0, tl.float32)
    arg_z = tl.full([], 0, tl.int64)
    if FUSION_PROBS and HAS_STATS:
        m_z, s_z, arg_z = row_softmax_stats(pm_ptr + row * P, ps_ptr + row * P, pa_ptr + row * P, P, BLOCK_P)
    elif FUSION_PROBS:
        m_z = tl.full([], float("-inf"), tl.float32)
        s_z = tl.full([], 0.0, tl.float32)
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            z = tl.load(z_row + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
            t_max = tl.max(z)
            arg_z = tl.where(t_max > m_z, start + tl.argmax(z, axis=0), arg_z)  # strict: first wins
            m_new = tl.maximum(m_z, t_max)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            s_z = s_z * tl.exp(m_z - m_safe) + tl.sum(tl.exp(z - m_safe))
            m_z = m_new

    # ---- pass B: argmax of the fused scores (greedy); max, smallest finite value and count of finite
    # values of the log-weights (sampling)
    if SAMPLE:
        T = tl.load(temp_ptr + row).to(tl.float32)
    else:
        T = tl.full([], 0.0, tl.float32)
    best = tl.full([], float("-inf"), tl.float32)
    arg = tl.full([], 0, tl.int64)
    M = tl.full([], float("-inf"), tl.float32)
    lw_min = tl.full([], float("inf"), tl.float32)
    n_fin = tl.full([], 0, tl.int32)
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        fused, lw = fused_tile(z_row, f_row, offs, offs < V, lam, m_z, s_z, FUSION_PROBS)
        t_max = tl.max(fused)
        arg = tl.where(t_max > best, start + tl.argmax(fused, axis=0), arg)
        best = tl.maximum(best, t_max)
        if SAMPLE:
            fin = lw > float("-inf")
            M = tl.maximum(M, tl.max(lw))
            lw_min = tl.minimum(lw_min, tl.min(tl.where(fin, lw, float("inf"))))
            n_fin += tl.sum(fin.to(tl.int32))
    token = arg
    passes_k = tl.full([], 0, tl.int32)
    passes_p = tl.full([], 0, tl.int32)
    passes_d = tl.full([], 0, tl.int32)

    if SAMPLE:
        if T > 0.0:
            if M == float("-inf"):
                # Nothing positive survived the clamp (probs) or an all -inf row (logits, undefined).
                if FUSION_PROBS:
                    token = arg_z
            else:
                k = tl.load(topk_ptr + row)
                top_p = tl.load(topp_ptr + row).to(tl.float32)
                # The smallest weight of a token of nonzero probability (weights are monotone in lw).
                thr = tl.maximum((lw_min - M) / T, -3.4028234663852886e38)
                # #{w >= thr}: the finite weights, or every token when thr is clamped at -FLT_MAX too.
                cnt_thr = tl.where(thr > -3.4028234663852886e38, n_fin, V)
                n_buf = tl.full([], -1, tl.int32)
                raced = n_buf == 0  # False; set when a search's gather pass also ran the race
                # Top-k with k >= the number of such tokens keeps all of them: nothing to search.
                if (k > 0) & (k < n_fin):
                    thr, passes_k, cnt_thr, n_buf, raced, token = _search(
                        z_row, f_row, bufw_row, bufi_row, u_row, seed_ptr, row, V, lam, m_z, s_z, M, T, thr,
                        cnt_thr, n_buf, k, top_p, top_p >= 1.0,
                        False, FUSION_PROBS, PHILOX, SEED_PER_ROW, BLOCK_S, NPIV, N_VALUE, MAX_PASSES, CAP,
                    )  # fmt: skip
                thr_p = thr
                e_p = tl.zeros([BLOCK_V], dtype=tl.float32) + float("inf")  # top-p off: w >= thr_p decides
                if top_p < 1.0:
                    thr_p, passes_p, _, _, raced, token = _search(
                        z_row, f_row, bufw_row, bufi_row, u_row, seed_ptr, row, V, lam, m_z, s_z, M, T, thr,
                        cnt_thr, n_buf, k, top_p, True,
                        True, FUSION_PROBS, PHILOX, SEED_PER_ROW, BLOCK_S, NPIV, N_VALUE, MAX_PASSES, CAP,
                    )  # fmt: skip
                    # Top-p compares probabilities: a top-k survivor whose exp(w) rounds to exp(thr_p) is
                    # tied with the cut-off and kept too (exp on a full tile, as for the weights below).
                    e_p = tl.exp(tl.zeros([BLOCK_V], dtype=tl.float32) + thr_p)

                # ---- pass D: Gumbel-max race among the kept tokens, unless the last search's gather pass
                # ran it. log(q_final) differs from w by the row constant log(sum of kept exp(w)), which
                # the argmax ignores.
                best = tl.full([], float("-inf"), tl.float32)
                n_race = tl.where(raced, 0, V)
                passes_d = tl.where(raced, 0, 1)
                for start in range(0, n_race, BLOCK_V):
                    offs = start + cols
                    mask = offs < V
                    _, lw = fused_tile(z_row, f_row, offs, mask, lam, m_z, s_z, FUSION_PROBS)
                    w = tl.maximum((lw - M) / T, -3.4028234663852886e38)
                    keep = mask & (w >= thr) & ((w >= thr_p) | (tl.exp(w) >= e_p))
                    score = _gumbel_score(w, keep, offs, u_row, seed_ptr, row, PHILOX, SEED_PER_ROW)
                    t_max = tl.max(score)
                    token = tl.where(t_max > best, start + tl.argmax(score, axis=0), token)
                    best = tl.maximum(best, t_max)

    token = tl.minimum(tl.maximum(token, 0), V - 1)
    tl.store(out_ptr + row, token.to(tl.int64))
    if WRITE_PASSES:
        tl.store(passes_ptr + 3 * row, passes_k)
        tl.store(passes_ptr + 3 * row + 1, passes_p)
        tl.store(passes_ptr + 3 * row + 2, passes_d)


# --------------------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------------------


def _per_row(name, value, batch, device, dtype, is_int=False):
    """A [B] tensor from a scalar or a [B] (or 0-d) tensor; checks shape and dtype, never values (no sync)."""
    if isinstance(value, torch.Tensor):
        check_row_option(name, value, batch, device, integer=is_int)
        return value.reshape(-1).expand(batch).to(dtype).contiguous()
    return torch.full((batch,), value, dtype=dtype, device=device)


def rectified_next_token_triton(
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
    validate: bool = True,
    return_search_passes: bool = False,
    split: bool | None = None,
    row_stats: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Triton next token [B] int64 (semantics: ``api.rectified_next_token``; inputs validated there).

    As in the public API, every per-row parameter may be a [B] tensor (scalars broadcast): ``lam``,
    ``temperature`` (0 = greedy for that row), ``top_k`` (0 or >= V = off) and ``top_p`` (1 = off). With
    ``validate=True`` the values of such tensors are checked in one host sync; ``validate=False`` (what the
    public API passes, having checked them) skips it, for CUDA-graph capture; bad values then give an
    unspecified but valid id.

    Randomness: with ``seed=None`` (default) the uniforms are ``torch.rand([B, V], generator)`` clamped
    to ``finfo(float32).tiny``, exactly as ``impl="torch"`` draws them (so the same generator gives the
    same tokens); they are drawn when ``temperature`` is a positive number or any tensor, never for a
    greedy call with a number. ``seed`` (an int or 0-d tensor, or a [B] integer tensor of per-row seeds) switches to
    Philox uniforms generated in the kernel: nothing of size V is drawn or read, ``generator`` must then
    be None. Same seed, same tokens; a per-row seed makes a row's draw independent of its batch position.
    ``philox.philox_uniforms`` computes the same numbers in PyTorch (the reference and ``impl="torch"``).

    ``return_search_passes=True`` (diagnostics, benchmarks) also returns a [B, 3] int32 tensor of the
    passes over V each row made after its statistics: the top-k search's, the top-p search's (counting
    passes and gather; 0 = filter off, or top-p solved from the top-k buffer) and pass D's (1 when the
    race ran as its own pass, 0 when a gather ran it, or for greedy and split-kernel rows).

    Kernels. A call whose rows need no threshold search (greedy, or sampling with top-k and top-p off, known
    from Python numbers: a ``top_k`` / ``top_p`` tensor counts as a filter) runs the split-row kernels of
    ``triton_split.py`` (many programs per row); any other call runs the one-program-per-row kernel above.
    ``split`` (benchmarks, tests) forces the choice: ``False`` always takes the one-program kernel, ``True``
    the split one (a ``ValueError`` for a call that needs a search). ``row_stats`` (``rectified_decode_head``):
    per-block ``(max, sum exp, argmax)`` partials of ``z``, [B, P] each, that replace the pass computing them
    (``fusion="probs"``).
    """
    if pilot_logits.dim() != 2 or copilot_out.shape != pilot_logits.shape:
        raise ValueError(
            f"copilot_out: expected shape {list(pilot_logits.shape)} (like pilot_logits [B, V]), "
            f"got {list(copilot_out.shape)}"
        )
    if fusion not in ("probs", "logits"):
        raise ValueError(f"fusion: expected one of ('probs', 'logits'), got {fusion!r}")
    batch, vocab = pilot_logits.shape
    device = pilot_logits.device
    if vocab >= 2**31 - 1:
        raise ValueError(f"pilot_logits: expected fewer than 2**31 - 1 columns, got {vocab}")
    if seed is not None and generator is not None:
        raise ValueError("seed: expected None when a generator is given (seed selects in-kernel Philox)")
    if validate:
        check_row_values(lam, temperature, top_k, top_p)

    sample = isinstance(temperature, torch.Tensor) or float(temperature) > 0.0
    filtered = sample and (isinstance(top_k, torch.Tensor) or isinstance(top_p, torch.Tensor)
                           or 0 < int(top_k) < vocab or float(top_p) < 1.0)
    if split and filtered:
        raise ValueError("split: the split-row kernels need top_k and top_p off (numbers), got a filter")
    use_split = not filtered if split is None else split
    lam_t = _per_row("lam", lam, batch, device, torch.float32)
    temp_t = _per_row("temperature", temperature, batch, device, torch.float32)
    # any k >= V means off: clamp before the int32 cast
    if isinstance(top_k, torch.Tensor):
        top_k = top_k.clamp(max=vocab) if not top_k.dtype.is_floating_point else top_k
    else:
        top_k = min(int(top_k), vocab)
    topk_t = _per_row("top_k", top_k, batch, device, torch.int32, is_int=True)
    topp_t = _per_row("top_p", top_p, batch, device, torch.float32)

    z, f = pilot_logits, copilot_out
    if z.dtype == torch.float64:
        z = z.float()
    if f.dtype == torch.float64:
        f = f.float()
    if z.stride(1) != 1:
        z = z.contiguous()
    if f.stride(1) != 1:
        f = f.contiguous()

    philox = sample and seed is not None
    seed_per_row = isinstance(seed, torch.Tensor) and seed.dim() == 1  # a 0-d tensor is one seed for the batch
    if philox:
        seeds = _per_row("seed", seed, batch, device, torch.int64, is_int=True)
        u = z  # unused
    else:
        seeds = topk_t  # unused
        if sample:
            u = torch.rand((batch, vocab), generator=generator, device=device, dtype=torch.float32)
            u = u.clamp_(min=_TINY)
        else:
            u = z  # unused: greedy calls draw nothing
    stride_u = u.stride(0) if sample and not philox else 0

    out = torch.full((batch,), -1, dtype=torch.int64, device=device)  # -1 = poison: never a valid id
    passes = torch.zeros((batch, 3), dtype=torch.int32, device=device) if return_search_passes else out
    if batch == 0:
        return (out, passes) if return_search_passes else out
    fusion_probs = fusion == "probs"
    has_stats = row_stats is not None and fusion_probs
    ctx = torch.cuda.device(device) if device.type == "cuda" else nullcontext()
    if use_split:
        with ctx:
            split_rows_next_token(z, f, u, seeds, lam_t, temp_t, out, fusion_probs=fusion_probs, sample=sample,
                                  philox=philox, seed_per_row=seed_per_row, stride_u=stride_u,
                                  row_stats=row_stats if has_stats else None)
        return (out, passes) if return_search_passes else out
    block_v, block_s, num_warps, cap = _INTERP_CFG if _interpreting() else _GPU_CFG
    block_v = min(block_v, triton.next_power_of_2(vocab))
    block_s = min(block_s, max(16, triton.next_power_of_2(vocab)))
    stats = tuple(t.contiguous() for t in row_stats) if has_stats else (out, out, out)  # unread without stats
    parts = stats[0].shape[1] if has_stats else 1
    # Per-row scratch for the searches' last candidates, CAP weights and their ids (never of size V).
    bufw = torch.empty((batch, cap), dtype=torch.float32, device=device) if sample else out
    bufi = torch.empty((batch, cap), dtype=torch.int32, device=device) if sample else out
    with ctx:
        _rectified_next_token_kernel[(batch,)](
            z, f, u, seeds, out, passes, bufw, bufi, lam_t, temp_t, topk_t, topp_t, *stats,
            vocab, z.stride(0), f.stride(0), stride_u, parts,
            FUSION_PROBS=fusion_probs, SAMPLE=sample, PHILOX=philox, SEED_PER_ROW=seed_per_row,
            HAS_STATS=has_stats, BLOCK_P=min(1024, triton.next_power_of_2(parts)),
            BLOCK_V=block_v, BLOCK_S=block_s, NPIV=_NPIV, N_VALUE=_N_VALUE_PIVOTS,
            MAX_PASSES=_MAX_SEARCH_PASSES, CAP=cap, WRITE_PASSES=return_search_passes, num_warps=num_warps,
        )  # fmt: skip
    return (out, passes) if return_search_passes else out


__all__ = ["rectified_next_token_triton"]
