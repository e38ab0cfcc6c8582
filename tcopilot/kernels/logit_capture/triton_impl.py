"""Triton path of :func:`tcopilot.logit_capture` (DESIGN.md 4.1, 4.3, 4.6).

Design (the "chunked GEMM + fused epilogue kernel" of DESIGN 4.6, the one that works for Copilot-width
``values``):

Forward, per chunk of ``T`` token rows (the whole vocabulary per chunk, so each row's softmax is complete):

1. ``logits[T, V] = hidden[chunk] @ weight.T (+ bias)``: one cuBLAS GEMM (fp32 accumulation inside the GEMM,
   output in the input dtype, as every eager LM head does) into a preallocated chunk buffer. A bias goes into
   that GEMM (``torch.addmm(bias, ...)``), not into the Triton kernels: PyTorch sends ``addmm`` with a
   contiguous 1-D bias to cuBLASLt's bias epilogue, which adds it to the fp32 accumulator before the one
   rounding into the buffer (the same semantics as ``nn.Linear``) at no cost; otherwise it pre-fills the
   buffer with the bias and accumulates the product onto it (beta=1), still one rounding. In-kernel it would
   be one more ``[V]`` load per row block in both forward sweeps, in the target-logit gather and in the
   backward kernel, a kernel parameter more, and the ``torch.topk`` fallback would need it separately.
2. ``_logit_capture_fwd_kernel``: per row, one sweep over the vocabulary in ``BLOCK_V`` tiles with an online
   max (softcap applied in-kernel) gives ``lse``, ``p[y]``, ``sum p^2`` (the running sum is rescaled by
   ``exp(2 (m_old - m_new))``), ``sum z`` (label smoothing) and the per-row loss (label smoothing, z-loss);
   with ``topk = K > 0`` the same sweep merges each tile of (capped) logits into a running per-row top-K
   held in registers (see "Top-k" below); with ``values`` a second sweep overwrites the logits IN PLACE with
   ``p`` (or writes ``p`` into a buffer of ``values``' dtype when that differs from the logits' dtype). All
   statistics in fp32 (fp64 for fp64 inputs).
3. ``p_values[chunk] = p @ values``: one GEMM with a fp32 result.

No ``[N x V]`` tensor exists; the forward saves only ``lse`` and ``[N]`` vectors for the backward.

Backward, blocked in BOTH dimensions: vocabulary chunks of ``Vc`` columns (outer loop) x token blocks of
``Tb`` rows (inner loop). ``lse`` is known from the forward, so a block's ``dz`` needs no row reduction:

1. ``logits[Tb, Vc] = hidden[block] @ weight[chunk].T (+ bias[chunk])`` (GEMM, recomputed).
2. ``_logit_capture_bwd_kernel`` (2-D grid of elementwise tiles) turns them in place into
   ``dz = dloss_i * ((1 + 2 z_loss lse_i) p - (1 - eps) onehot(y) - eps / V) * (1 - tanh^2)`` (the last factor
   only with softcap), 0 on ignored rows, and, when ``values`` needs a gradient, writes ``p`` to a second
   buffer in ``values``' dtype.
3. ``d values[chunk] (+)= p^T @ d p_values[block]``, ``d hidden[block] (+)= dz @ weight[chunk]``,
   ``d weight[chunk] (+)= dz^T @ hidden[block]``: GEMMs; with a bias that needs a gradient,
   ``d bias[chunk] (+)= sum over the block's rows of dz`` (a fp32 column sum of the same ``dz`` buffer the
   ``d weight`` GEMM reads: one more read of the block, ``~1/d`` of that GEMM's work; into a fp32 ``[V]``).

Why this order and these reductions:

- ``d weight`` and ``d values`` rows belong to one vocabulary chunk, so with the vocabulary loop outside they
  are finished chunk by chunk: with a single token block (``Tb = N``, the usual case) each is ONE GEMM whose
  fp32 accumulation runs inside cuBLAS and is rounded once; with several token blocks the partial sums go into
  a fp32 accumulator of only ``[Vc, d]`` (``[Vc, k]``). A token-chunked backward would instead need a fp32
  ``[V, d]`` accumulator (2 GiB at V=128k, d=4096) plus a ``[V, 2c+1]`` one for ``d values``, and would
  read-modify-write it once per chunk (Liger's Triton FLCE pays exactly this traffic). Here the only split-K
  accumulation is ``d hidden`` over vocabulary chunks: a fp32 ``[N, d]`` accumulator for fp16/bf16 inputs
  (none when a single vocabulary chunk covers V, or for fp32/fp64 inputs which accumulate in the output).
  No atomics anywhere: the result is deterministic.
- The second buffer for ``p`` (only when ``values`` needs a gradient): turning one buffer into ``p``, running
  ``d values = p^T dU`` and then turning ``p`` into ``dz`` would save it, but once the buffer holds ``p`` the
  logits are gone: the softcap chain rule needs ``tanh(z / cap)``, which cannot be recovered from a fp16/bf16
  ``p`` that underflowed, and ``p_y - 1`` computed from a bf16 ``p_y`` close to 1 loses all its digits. One
  kernel that reads the logits once and writes both is exact, and the block is sized so that the two buffers
  together stay within the same memory budget.

Chunk sizes: all chunk buffers of one pass together take at most ``budget_bytes`` (default
``max(2% of a bf16 [N x V] tensor, 32 MiB)``, i.e. ``T * V <= 2**24`` elements of bf16 for small ``N``): the
forward takes ``T = budget // (V * bytes per element)`` rows (a multiple of 16); the backward takes the whole
``N x V`` when it fits, else all ``N`` rows by ``Vc = budget elements // N`` columns (``Vc >= 1024``), else
(very large ``N``) near-square blocks: see :func:`plan_bwd_block`. Examples with bf16 and the default budget:
N=8192, V=128k: ``T = 160``, backward blocks ``8192 x 2560``; N=8192, V=32k: ``T = 512``, ``8192 x 2048``.
The forward GEMM of ``T`` rows re-reads ``weight`` once per chunk and is compute-bound on an H100 only for
``T >~ 300``, so a larger budget trades memory for speed (:class:`CaptureTuning`); to be measured on a GPU.
Extra memory besides the buffers: the outputs and ``[N]`` vectors, the fp32 ``[N, d]`` ``d hidden``
accumulator (fp16/bf16 inputs, several vocabulary chunks: 128 MiB at N=8192, d=4096), and fp32 ``[Vc, d]`` /
``[Vc, k]`` accumulators only with several token blocks. The in-kernel top-k needs no memory beyond its
``[N, K]`` outputs; only the ``torch.topk`` fallback (``K > TOPK_MAX_IN_KERNEL``) adds temporaries, counted in
the forward budget.

Top-k (``topk = K``, ``1 <= K <= TOPK_MAX_IN_KERNEL = 128``): the result equals ``torch_impl._topk_lowest_id``
of the capped logits: the K largest in descending order, equal values by ascending vocabulary id, ids int64,
logits in the accumulation dtype. Every row gets one, ignored rows included (as in the torch path). Each
program keeps, per row, an unsorted candidate set ``S`` of K (value, id) pairs in registers (``[BLOCK_M,
K_PAD]``, initialised with ``-inf`` sentinels whose ids ``V + slot`` lose every tie) and its worst member
under the total order "value descending, id ascending". For each tile it counts the tile's entries that beat
the worst; only that many times (at most K) it extracts the tile's best remaining entry (a max and a min-id
reduction) and, if it still beats the worst, overwrites the worst slot and recomputes the worst (two
reductions over ``K_PAD``). Entries leave a tile in descending order, so a row stops at its first entry that
does not enter. After the sweep K extractions from ``S`` write the result in order. WHY this method: it is
exact (pure compares, no key packing, so fp64 and the id tie rule come for free), it needs only reductions
and ``where`` (correct under the interpreter, no sorting network, no ``tl.gather``), and the threshold test
makes it cheap where it matters: the first tile costs ``min(K, BLOCK_V)`` extraction steps of
``O(BLOCK_V + K_PAD)``, later tiles only as many steps as entries that improve the top-K (about ``K / j``
for the j-th tile of a randomly ordered row, ``K ln(V / BLOCK_V)`` over the row), i.e. a few reductions
per tile for K ~ 8 and nothing at all for a tile that cannot contribute. The worst case (logits increasing
with the id) is K steps per tile. A sorting network over ``BLOCK_V + K`` elements would cost
``O(BLOCK_V log^2 BLOCK_V)`` per tile whatever the data. Above ``TOPK_MAX_IN_KERNEL`` the per-tile work
(K steps on every tile of a row whose worst entry keeps rising) grows too large and the launcher falls back
to ``torch.topk`` on the chunk's materialised logits before the kernel overwrites them (softcap then through
``torch.tanh``, which can differ from the kernel's cap by an ulp). NaN logits never enter the in-kernel
top-k. Not yet timed on a GPU.

fp32 results of fp16/bf16 GEMMs use ``torch.mm(..., out_dtype=torch.float32)`` /
``torch.addmm(..., out_dtype=torch.float32, out=acc)`` on CUDA when this PyTorch has them (probed once per
device); otherwise (older PyTorch, or CPU tensors under ``TRITON_INTERPRET=1``) the operands are upcast.

Inputs are assumed validated by :mod:`.api`. Set ``TCOPILOT_POISON=1`` to fill every output buffer with NaN
before the kernels write it, so that an entry a kernel forgot shows up.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# _acc_dtype: the launch code's name for it, also imported by name by benchmarks/sm90_compile.py.
from .._triton_math import softcap as softcap_tanh
from .autograd import acc_dtype as _acc_dtype
from .autograd import capture_methods, mean_denom, reduce_rows, row_grads
from .capture import Capture
from .torch_impl import _topk_lowest_id

__all__ = [
    "CaptureTuning",
    "capture_bwd_triton",
    "capture_fwd_triton",
    "LogitCaptureFunction",
    "logit_capture_bwd",
    "logit_capture_fwd",
    "logit_capture_triton",
]

_MIN_BUDGET_BYTES = 32 << 20
_BUDGET_FRACTION = 0.02  # of one bf16 [N x V] tensor (DESIGN 4.6)
_MIN_BWD_COLS = 1024  # vocabulary columns per backward block below which the d hidden accumulator dominates
# Largest topk merged inside the forward kernel (module doc, "Top-k"); larger K take the torch.topk fallback.
TOPK_MAX_IN_KERNEL = 128
_TOPK_TEMP_BYTES = 12  # per chunk element: temporaries of the torch.topk fallback (masks, int32 keys)


@dataclass(frozen=True)
class CaptureTuning:
    """Chunking and launch parameters; every ``None`` means "choose from the shapes" (see the module doc).

    ``budget_bytes`` bounds the chunk buffers of one pass; ``fwd_rows`` (T), ``bwd_rows`` (Tb) and
    ``bwd_cols`` (Vc) override the chunking; the block sizes and ``num_warps`` set the kernel launches
    (powers of two).
    """

    budget_bytes: int | None = None
    fwd_rows: int | None = None
    bwd_rows: int | None = None
    bwd_cols: int | None = None
    fwd_block_m: int | None = None
    fwd_block_v: int | None = None
    bwd_block_m: int | None = None
    bwd_block_v: int | None = None
    num_warps: int | None = None


# ---------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _topk_best(vals, ids, live):
    # Per row, the best live (value, id) under "value descending, id ascending": (-inf, INT32_MAX) if none.
    bv = tl.max(tl.where(live, vals, float("-inf")), axis=1)
    bi = tl.min(tl.where(live & (vals == bv[:, None]), ids, 2147483647), axis=1)
    return bv, bi


@triton.jit
def _topk_worst(vals, ids, live):
    # Per row, the worst live (value, id): the smallest value, among equal ones the highest id.
    wv = tl.min(tl.where(live, vals, float("inf")), axis=1)
    wi = tl.max(tl.where(live & (vals == wv[:, None]), ids, -1), axis=1)
    return wv, wi


@triton.jit
def _logit_capture_fwd_kernel(
    logits_ptr,  # [T, V] raw (uncapped) logits of the chunk, read
    stride_lm,  # row stride of logits, in elements
    p_ptr,  # [T, V] where p is written when WRITE_P; may be logits_ptr itself (in place)
    stride_pm,
    labels_ptr,  # [T] int64
    lse_ptr,  # [T] fp32/fp64 out; its dtype is the accumulation dtype of the kernel
    p_target_ptr,  # [T] out: p[y], 0 on ignored rows
    p_sq_ptr,  # [T] out: sum_v p_v^2
    loss_ptr,  # [T] out: per-row loss without token weights, 0 on ignored rows
    params_ptr,  # [3] (softcap, label_smoothing, z_loss) in the accumulation dtype: no fp32 kernel scalars
    topk_ids_ptr,  # [T, K] int64 out when TOPK
    topk_logits_ptr,  # [T, K] out when TOPK, the accumulation dtype
    stride_km,  # row stride of both top-k outputs, in elements
    n_rows,
    V,
    K,  # topk; 1 <= K <= K_PAD
    ignore_index,
    HAS_SOFTCAP: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    WRITE_P: tl.constexpr,
    TOPK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    K_PAD: tl.constexpr,  # a power of two >= K
):
    acc_ty = lse_ptr.dtype.element_ty
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    # int64 row offsets: row * stride exceeds 2**31 for large chunks of a large vocabulary.
    l_rows = logits_ptr + rows.to(tl.int64) * stride_lm
    cols = tl.arange(0, BLOCK_V)
    cap = tl.load(params_ptr)
    eps = tl.load(params_ptr + 1)
    zl = tl.load(params_ptr + 2)

    # Online softmax statistics, one value per row: running max m, s = sum exp(z - m),
    # s2 = sum exp(2 (z - m)) (so sum p^2 = s2 / s^2), sz = sum z (label smoothing).
    m = tl.full([BLOCK_M], float("-inf"), acc_ty)
    s = tl.zeros([BLOCK_M], acc_ty)
    s2 = tl.zeros([BLOCK_M], acc_ty)
    sz = tl.zeros([BLOCK_M], acc_ty)
    if TOPK:
        # Running top-K per row (module doc, "Top-k"): an unsorted set of K (value, id) pairs plus its worst
        # member (wv, wi). Sentinels (-inf, V + slot) lose to every real entry, -inf logits included.
        kslot = tl.arange(0, K_PAD)
        slot_ok = (kslot < K)[None, :]
        top_v = tl.full([BLOCK_M, K_PAD], float("-inf"), acc_ty)
        top_i = tl.zeros([BLOCK_M, K_PAD], tl.int32) + (V + kslot)[None, :]
        wv, wi = _topk_worst(top_v, top_i, slot_ok)
    for v0 in range(0, V, BLOCK_V):
        c = v0 + cols
        mask = row_ok[:, None] & (c < V)[None, :]
        z = tl.load(l_rows[:, None] + c[None, :], mask=mask, other=0.0).to(acc_ty)
        if HAS_SOFTCAP:
            z = softcap_tanh(z, cap)
        if HAS_SMOOTHING:
            sz += tl.sum(tl.where(mask, z, 0.0), axis=1)
        # Padded lanes must not enter the normaliser (a capped pad would otherwise count as -cap).
        z = tl.where(mask, z, float("-inf"))
        if TOPK:
            # Entries that beat the current worst (tile ids exceed every real id in the set, so a tie with the
            # worst only enters over a sentinel). Only that many extraction steps run, at most K.
            ent = mask & ((z > wv[:, None]) | ((z == wv[:, None]) & (c[None, :] < wi[:, None])))
            n_steps = tl.minimum(tl.max(tl.sum(ent.to(tl.int32), axis=1)), K)
            for _ in range(n_steps):
                bv, bi = _topk_best(z, c[None, :], ent)
                ins = (bv > wv) | ((bv == wv) & (bi < wi))
                hit = slot_ok & (top_v == wv[:, None]) & (top_i == wi[:, None]) & ins[:, None]
                top_v = tl.where(hit, bv[:, None], top_v)
                top_i = tl.where(hit, bi[:, None], top_i)
                # Entries leave in descending order: once a row's best remaining entry fails, all of them do.
                ent = ent & (c[None, :] != bi[:, None]) & ins[:, None]
                wv, wi = _topk_worst(top_v, top_i, slot_ok)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        # Rows past n_rows stay at -inf; pin them to 0 so that no inf - inf = NaN is ever formed.
        m_new = tl.where(row_ok, m_new, 0.0)
        alpha = tl.exp(m - m_new)  # 0 on the first tile (m = -inf)
        e = tl.exp(z - m_new[:, None])
        s = s * alpha + tl.sum(e, axis=1)
        s2 = s2 * (alpha * alpha) + tl.sum(e * e, axis=1)
        m = m_new

    s_safe = tl.where(row_ok, s, 1.0)
    lse = m + tl.log(s_safe)
    p_sq = s2 / (s_safe * s_safe)

    label = tl.load(labels_ptr + rows, mask=row_ok, other=0)
    counted = row_ok & (label != ignore_index)
    y = tl.where(counted, label, 0)
    # The target logit is gathered directly (one element per row), before a second sweep overwrites it.
    z_y = tl.load(l_rows + y, mask=counted, other=0.0).to(acc_ty)
    if HAS_SOFTCAP:
        z_y = softcap_tanh(z_y, cap)
    p_t = tl.where(counted, tl.exp(z_y - lse), 0.0)
    loss = lse - z_y
    if HAS_SMOOTHING:
        # (1 - eps) * ce + eps * (lse - mean_v z): the smoothed target puts eps / V on every class.
        loss = (1.0 - eps) * loss + eps * (lse - sz / V)
    loss = loss + zl * lse * lse
    loss = tl.where(counted, loss, 0.0)

    tl.store(lse_ptr + rows, lse, mask=row_ok)
    tl.store(p_target_ptr + rows, p_t, mask=row_ok)
    tl.store(p_sq_ptr + rows, p_sq, mask=row_ok)
    tl.store(loss_ptr + rows, loss, mask=row_ok)

    if TOPK:
        # K extractions from the set give the result in order (ids in the set are distinct).
        live = slot_ok & row_ok[:, None]
        k_rows = rows.to(tl.int64) * stride_km
        for j in range(0, K):
            bv, bi = _topk_best(top_v, top_i, live)
            tl.store(topk_logits_ptr + k_rows + j, bv, mask=row_ok)
            tl.store(topk_ids_ptr + k_rows + j, bi.to(tl.int64), mask=row_ok)
            live = live & (top_i != bi[:, None])

    if WRITE_P:
        # Second sweep: p = exp(z - lse). Each element is loaded before the same program stores over it, so
        # p_ptr may alias logits_ptr (the chunk buffer becomes the probabilities, no second buffer).
        p_rows = p_ptr + rows.to(tl.int64) * stride_pm
        for v0 in range(0, V, BLOCK_V):
            c = v0 + cols
            mask = row_ok[:, None] & (c < V)[None, :]
            z = tl.load(l_rows[:, None] + c[None, :], mask=mask, other=0.0).to(acc_ty)
            if HAS_SOFTCAP:
                z = softcap_tanh(z, cap)
            p = tl.exp(z - lse[:, None])
            tl.store(p_rows[:, None] + c[None, :], p.to(p_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _logit_capture_bwd_kernel(
    logits_ptr,  # [Tb, Vc] raw logits of the block; overwritten with dz when WRITE_DZ
    stride_lm,
    p_ptr,  # [Tb, Vc] where p is written when WRITE_P (aliases logits_ptr only when not WRITE_DZ)
    stride_pm,
    labels_ptr,  # [Tb] int64
    lse_ptr,  # [Tb] fp32/fp64 (the accumulation dtype)
    dloss_ptr,  # [Tb] d total / d row loss (upstream grad x reduction scale x token weight; 0 if ignored)
    params_ptr,  # [3] (softcap, label_smoothing, z_loss)
    n_rows,
    n_cols,  # Vc, the columns of this block
    col_offset,  # vocabulary id of the block's column 0 (labels are global ids)
    V,  # the whole vocabulary (label smoothing spreads eps / V)
    HAS_SOFTCAP: tl.constexpr,
    WRITE_DZ: tl.constexpr,
    WRITE_P: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    acc_ty = lse_ptr.dtype.element_ty
    pid_m = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (cols < n_cols)[None, :]
    rows64 = rows.to(tl.int64)

    offs = rows64[:, None] * stride_lm + cols[None, :]
    z = tl.load(logits_ptr + offs, mask=mask, other=0.0).to(acc_ty)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    cap = tl.load(params_ptr)
    if HAS_SOFTCAP:
        z = softcap_tanh(z, cap)
    # lse is known from the forward: p needs no reduction, every tile is independent.
    p = tl.exp(z - lse[:, None])
    if WRITE_P:
        p_offs = rows64[:, None] * stride_pm + cols[None, :]
        tl.store(p_ptr + p_offs, p.to(p_ptr.dtype.element_ty), mask=mask)
    if WRITE_DZ:
        eps = tl.load(params_ptr + 1)
        zl = tl.load(params_ptr + 2)
        label = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
        dl = tl.load(dloss_ptr + rows, mask=row_ok, other=0.0)
        hit = (cols + col_offset)[None, :] == label[:, None]
        # d row_loss / d z_v = (1 + 2 z_loss lse) p_v - (1 - eps) [v = y] - eps / V
        g = p * (1.0 + 2.0 * zl * lse)[:, None] - eps / V - tl.where(hit, 1.0 - eps, 0.0)
        g = g * dl[:, None]
        if HAS_SOFTCAP:
            # chain rule through cap * tanh(z / cap): 1 - tanh^2 = 1 - (z_capped / cap)^2
            t = z / cap
            g = g * (1.0 - t * t)
        tl.store(logits_ptr + offs, g.to(logits_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------------
# Host-side helpers
# ---------------------------------------------------------------------------------------------------------

_HALF = (torch.float16, torch.bfloat16)
_FP32_OUT_OK: dict[tuple[str, int | None], bool] = {}


def _poison() -> bool:
    return os.environ.get("TCOPILOT_POISON", "0") == "1"


def _out(shape, dtype, device) -> torch.Tensor:
    """An output buffer: NaN-filled (-1 for integers) under ``TCOPILOT_POISON=1`` so that unwritten entries
    show up."""
    if _poison():
        fill = float("nan") if dtype.is_floating_point else -1
        return torch.full(shape, fill, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _fp32_out_ok(device: torch.device) -> bool:
    """Whether this PyTorch runs ``torch.addmm(out, a, b, beta=0|1, out_dtype=torch.float32, out=out)`` for
    fp16/bf16 ``a``, ``b`` and a fp32 ``out`` on ``device``: a GEMM rounded once into a fp32 result, written
    (beta=0, the NaN in ``out`` ignored) or accumulated in place (beta=1) without a temporary. Probed once
    per device and checked numerically, so a PyTorch without the overload (< 2.8), or one that rejects the
    aliasing form, takes the upcasting fallback of :func:`_matmul_into` instead."""
    if device.type != "cuda":
        return False
    key = (device.type, device.index)
    if key not in _FP32_OUT_OK:
        ok = False
        try:
            g = torch.Generator(device=device).manual_seed(0)
            a = torch.randn(16, 32, device=device, generator=g).to(torch.bfloat16)
            b = torch.randn(32, 24, device=device, generator=g).to(torch.bfloat16)
            prod = (a.double() @ b.double()).float()
            out = torch.full((16, 24), float("nan"), device=device)
            torch.addmm(out, a, b, beta=0, out_dtype=torch.float32, out=out)
            first = bool(torch.allclose(out, prod, rtol=1e-4, atol=1e-4))
            torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
            ok = first and bool(torch.allclose(out, 2 * prod, rtol=1e-4, atol=1e-4))
        except (TypeError, RuntimeError, NotImplementedError):
            ok = False
        _FP32_OUT_OK[key] = ok
    return _FP32_OUT_OK[key]


def _matmul_into(
    out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool, bias: torch.Tensor | None = None
) -> None:
    """``out = a @ b (+ bias)`` or ``out += a @ b`` with fp32 (fp64) accumulation and a single rounding into
    ``out``.

    ``out`` is either ``a``'s dtype (the GEMM accumulates in fp32 internally) or the wider fp32/fp64 dtype.
    ``bias`` (``[out.shape[1]]`` in ``a``'s dtype, only with ``accumulate=False``) is added inside the GEMM
    (``addmm``; on CUDA cuBLASLt's bias epilogue, see the module doc), before the rounding.
    """
    if b.dtype != a.dtype:
        b = b.to(a.dtype)
    if out.dtype == a.dtype and (a.is_cuda or a.dtype not in _HALF):
        if accumulate:
            out.addmm_(a, b)
        elif bias is not None:
            torch.addmm(bias, a, b, out=out)
        else:
            torch.mm(a, b, out=out)
        return
    fp32_out = a.is_cuda and out.dtype == torch.float32 and a.dtype in _HALF
    if fp32_out and bias is None and _fp32_out_ok(a.device):
        torch.addmm(out, a, b, beta=1 if accumulate else 0, out_dtype=torch.float32, out=out)
        return
    # CPU fp16/bf16 (interpreter tests), or a PyTorch without out_dtype (a slow fallback on a GPU: fp32
    # copies of the operands, outside the chunk budget): upcast, then round once into out.
    wide = out.dtype if out.dtype not in _HALF else torch.float32
    if bias is not None:
        r = torch.addmm(bias.to(wide), a.to(wide), b.to(wide))
    else:
        r = torch.mm(a.to(wide), b.to(wide))
    if accumulate:
        out.add_(r)
    else:
        out.copy_(r)


def _block(x: int, cap: int, floor: int) -> int:
    """A power-of-two block size: the next power of two >= x, at most ``cap``, at least ``floor`` (tiny blocks
    such as ``tl.arange(0, 1)`` are avoided; masking handles the extra lanes)."""
    return max(floor, min(cap, triton.next_power_of_2(max(1, x))))


def _default_budget(n: int, vocab: int) -> int:
    return max(int(_BUDGET_FRACTION * n * vocab * 2), _MIN_BUDGET_BYTES)


def _round_rows(t: int, n: int) -> int:
    t = max(1, min(t, n))
    if t < n and t >= 32:
        t -= t % 16  # GEMM-friendly
    return t


def plan_fwd_rows(n: int, vocab: int, bytes_per_elem: int, budget_bytes: int | None = None) -> int:
    """Rows ``T`` of a forward chunk: all its ``[T, V]`` buffers within the budget (at least one row)."""
    budget = budget_bytes if budget_bytes is not None else _default_budget(n, vocab)
    return _round_rows(budget // max(1, vocab * bytes_per_elem), n)


def plan_bwd_block(n: int, vocab: int, bytes_per_elem: int, budget_bytes: int | None = None) -> tuple[int, int]:
    """``(Tb, Vc)`` of a backward block: ``Tb * Vc * bytes_per_elem <= budget``.

    The whole ``N x V`` when it fits (one GEMM per gradient, no accumulation at all). Else all ``N`` rows and
    as many vocabulary columns as fit, when that is at least ``_MIN_BWD_COLS`` (or V): ``d weight`` and
    ``d values`` are then single GEMMs per chunk and only ``d hidden`` (``[N, d]``, smaller than
    ``[V, d]``) is accumulated over chunks. Only for very large ``N`` near-square blocks, which minimise the
    accumulator traffic ``(V / Vc) |d hidden| + (N / Tb) |d weight|`` for a given block size.
    """
    budget = budget_bytes if budget_bytes is not None else _default_budget(n, vocab)
    elems = max(1, budget // max(1, bytes_per_elem))
    if n * vocab <= elems:
        return n, vocab
    if elems // n >= min(vocab, _MIN_BWD_COLS):
        rows = n
    else:
        rows = _round_rows(max(math.isqrt(elems), elems // vocab), n)
    cols = max(1, min(vocab, elems // rows))
    if cols < vocab and cols >= 128:
        cols -= cols % 64
    return rows, cols


def _launch_defaults(device: torch.device, tuning: CaptureTuning):
    if device.type == "cuda":
        fwd = (tuning.fwd_block_m or 2, tuning.fwd_block_v or 2048)
        bwd = (tuning.bwd_block_m or 8, tuning.bwd_block_v or 1024)
        warps = tuning.num_warps or 8
    else:
        # The interpreter runs programs one after another in numpy: few, large tiles are fastest.
        fwd = (tuning.fwd_block_m or 16, tuning.fwd_block_v or 1024)
        bwd = (tuning.bwd_block_m or 16, tuning.bwd_block_v or 1024)
        warps = tuning.num_warps or 4
    return fwd, bwd, warps


def _params(softcap, label_smoothing, z_loss, dtype, device) -> torch.Tensor:
    # Filled in on the device: torch.tensor([...], device=cuda) copies from pageable host memory, a copy that
    # waits for the device (one synchronisation per forward and per backward).
    params = torch.empty(3, dtype=dtype, device=device)
    for i, value in enumerate((1.0 if softcap is None else float(softcap), float(label_smoothing), float(z_loss))):
        params[i].fill_(value)
    return params


# ---------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------


def logit_capture_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    values: torch.Tensor | None,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    topk: int = 0,
    softcap: float | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    tuning: CaptureTuning | None = None,
):
    """Forward pass over token chunks. ``labels`` int64 contiguous ``[N]``; ``bias`` ``[V]`` in the dtype of
    ``weight`` or ``None``.

    Returns ``(lse, p_target, p_sq_sum, row_loss, p_values, topk_ids, topk_logits)``: ``[N]`` statistics in
    fp32 (fp64 for fp64 inputs), ``row_loss`` without token weights (0 on ignored rows), ``p_values [N, k]``
    or ``None``, the top-k outputs or ``None``.
    """
    tuning = tuning or CaptureTuning()
    n, _ = hidden.shape
    vocab = weight.shape[0]
    dev = hidden.device
    acc = _acc_dtype(hidden.dtype)
    write_p = values is not None
    # p goes over the logits in place unless the p @ values GEMM needs it in another dtype.
    p_separate = write_p and values.dtype != hidden.dtype
    per_elem = hidden.element_size() + (values.element_size() if p_separate else 0)
    topk_in_kernel = 0 < topk <= TOPK_MAX_IN_KERNEL
    if topk > TOPK_MAX_IN_KERNEL:
        # torch.topk fallback: about 12 bytes per element of masks and int32 keys, plus the capped fp32 copy.
        per_elem += _TOPK_TEMP_BYTES + (acc.itemsize if softcap is not None else 0)
    rows = tuning.fwd_rows or plan_fwd_rows(n, vocab, per_elem, tuning.budget_bytes)
    rows = max(1, min(rows, n))
    (bm, bv), _, warps = _launch_defaults(dev, tuning)
    bm = _block(rows, bm, 2)
    bv = _block(vocab, bv, 16)

    lse = _out((n,), acc, dev)
    p_target = _out((n,), acc, dev)
    p_sq = _out((n,), acc, dev)
    row_loss = _out((n,), acc, dev)
    p_values = _out((n, values.shape[1]), acc, dev) if write_p else None
    topk_ids = _out((n, topk), torch.int64, dev) if topk > 0 else None
    topk_logits = _out((n, topk), acc, dev) if topk > 0 else None
    k_pad = _block(topk, TOPK_MAX_IN_KERNEL, 2) if topk_in_kernel else 2
    # Dummy pointers when the kernel writes no top-k (never dereferenced): lse has the right element type.
    k_ids = topk_ids if topk_in_kernel else lse
    k_logits = topk_logits if topk_in_kernel else lse

    buf = torch.empty(rows * vocab, dtype=hidden.dtype, device=dev)
    pbuf = _out((rows * vocab,), values.dtype, dev) if p_separate else None
    params = _params(softcap, label_smoothing, z_loss, acc, dev)
    w_t = weight.t()

    for n0 in range(0, n, rows):
        n1 = min(n, n0 + rows)
        t = n1 - n0
        z = buf[: t * vocab].view(t, vocab)
        _matmul_into(z, hidden[n0:n1], w_t, accumulate=False, bias=bias)
        if topk > TOPK_MAX_IN_KERNEL:
            # torch.topk fallback, before the kernel overwrites the logits. Capping is monotonic but can merge
            # distinct logits into equal capped values, so the tie rule needs the capped values (a fp32 copy).
            zt = z if softcap is None else softcap * torch.tanh(z.to(acc) / softcap)
            topk_ids[n0:n1], topk_logits[n0:n1] = _topk_lowest_id(zt, topk)
            del zt
        p = pbuf[: t * vocab].view(t, vocab) if p_separate else z
        _logit_capture_fwd_kernel[(triton.cdiv(t, bm),)](
            z,
            z.stride(0),
            p,
            p.stride(0),
            labels[n0:n1],
            lse[n0:n1],
            p_target[n0:n1],
            p_sq[n0:n1],
            row_loss[n0:n1],
            params,
            k_ids[n0:n1],
            k_logits[n0:n1],
            k_ids.stride(0),
            t,
            vocab,
            topk if topk_in_kernel else 1,
            ignore_index,
            HAS_SOFTCAP=softcap is not None,
            HAS_SMOOTHING=label_smoothing > 0,
            WRITE_P=write_p,
            TOPK=topk_in_kernel,
            BLOCK_M=bm,
            BLOCK_V=bv,
            K_PAD=k_pad,
            num_warps=warps,
        )
        if write_p:
            _matmul_into(p_values[n0:n1], p, values, accumulate=False)
    return lse, p_target, p_sq, row_loss, p_values, topk_ids, topk_logits


def logit_capture_bwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    dloss: torch.Tensor | None,
    d_p_values: torch.Tensor | None,
    values_meta: tuple[torch.Size, torch.dtype] | None,
    *,
    need_hidden: bool,
    need_weight: bool,
    bias: torch.Tensor | None = None,
    need_bias: bool = False,
    softcap: float | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    tuning: CaptureTuning | None = None,
):
    """Backward pass over (vocabulary chunk x token block) blocks; see the module docstring.

    ``dloss [N]`` (accumulation dtype) is ``d total / d row_loss`` (0 on ignored rows) or ``None`` when the
    loss has no gradient; ``d_p_values [N, k]`` the gradient of ``p_values`` or ``None``; ``values_meta`` the
    shape and dtype of ``values``; ``bias`` the forward's bias (recomputing the logits) or ``None``. Returns
    ``(d_hidden, d_weight, d_bias, d_values)`` in the inputs' dtypes (``None`` where not needed).
    """
    tuning = tuning or CaptureTuning()
    n, d = hidden.shape
    vocab = weight.shape[0]
    dev = hidden.device
    acc = _acc_dtype(hidden.dtype)
    need_bias = need_bias and bias is not None
    need_dz = dloss is not None and (need_hidden or need_weight or need_bias)
    need_p = d_p_values is not None and values_meta is not None
    if not (need_dz or need_p):
        return None, None, None, None
    v_dtype = values_meta[1] if need_p else hidden.dtype
    p_separate = need_p and (need_dz or v_dtype != hidden.dtype)
    per_elem = hidden.element_size() + (v_dtype.itemsize if p_separate else 0)
    rows, cols = plan_bwd_block(n, vocab, per_elem, tuning.budget_bytes)
    rows = max(1, min(tuning.bwd_rows or rows, n))
    cols = max(1, min(tuning.bwd_cols or cols, vocab))
    _, (bm, bv), warps = _launch_defaults(dev, tuning)
    bm = _block(rows, bm, 2)
    bv = _block(cols, bv, 16)
    one_vchunk = cols >= vocab
    one_tblock = rows >= n

    buf = torch.empty(rows * cols, dtype=hidden.dtype, device=dev)
    pbuf = _out((rows * cols,), v_dtype, dev) if p_separate else None
    params = _params(softcap, label_smoothing, z_loss, acc, dev)
    dl = dloss.to(acc).contiguous() if need_dz else lse  # lse: a valid dummy pointer, never read
    gpv = d_p_values.to(v_dtype) if need_p else None

    # d hidden: split-K over vocabulary chunks -> fp32 accumulator unless one chunk or a wide dtype.
    d_hidden = dh_acc = None
    if need_dz and need_hidden:
        d_hidden = _out((n, d), hidden.dtype, dev)
        dh_acc = d_hidden if (one_vchunk or hidden.dtype == acc) else torch.empty((n, d), dtype=acc, device=dev)
    d_weight = _out((vocab, d), weight.dtype, dev) if need_dz and need_weight else None
    d_values = _out(tuple(values_meta[0]), v_dtype, dev) if need_p else None
    # d bias: fp32 (fp64) column sums of dz, rounded once into bias' dtype at the end ([V], negligible).
    db_acc = _out((vocab,), acc, dev) if need_dz and need_bias else None

    for v0 in range(0, vocab, cols):
        v1 = min(vocab, v0 + cols)
        vc = v1 - v0
        w_c = weight[v0:v1]
        # d weight / d values rows of this chunk: finished here. fp16/bf16 ones get a fp32 [Vc, *] accumulator
        # only if several token blocks add into them; fp32/fp64 ones accumulate in place.
        dw_acc = dv_acc = None
        if d_weight is not None:
            dw_acc = d_weight[v0:v1]
            if not one_tblock and weight.dtype in _HALF:
                dw_acc = torch.empty((vc, d), dtype=acc, device=dev)
        if d_values is not None:
            dv_acc = d_values[v0:v1]
            if not one_tblock and v_dtype in _HALF:
                dv_acc = torch.empty((vc, d_values.shape[1]), dtype=acc, device=dev)
        for n0 in range(0, n, rows):
            n1 = min(n, n0 + rows)
            t = n1 - n0
            z = buf[: t * vc].view(t, vc)
            h = hidden[n0:n1]
            b_c = bias[v0:v1] if bias is not None else None
            _matmul_into(z, h, w_c.t(), accumulate=False, bias=b_c)
            p = (pbuf[: t * vc].view(t, vc) if p_separate else z) if need_p else z
            _logit_capture_bwd_kernel[(triton.cdiv(t, bm), triton.cdiv(vc, bv))](
                z,
                z.stride(0),
                p,
                p.stride(0),
                labels[n0:n1],
                lse[n0:n1],
                dl[n0:n1],
                params,
                t,
                vc,
                v0,
                vocab,
                HAS_SOFTCAP=softcap is not None,
                WRITE_DZ=need_dz,
                WRITE_P=need_p,
                BLOCK_M=bm,
                BLOCK_V=bv,
                num_warps=warps,
            )
            first = n0 == 0
            if need_p:
                _matmul_into(dv_acc, p.t(), gpv[n0:n1], accumulate=not first)
            if need_dz:
                if dh_acc is not None:
                    _matmul_into(dh_acc[n0:n1], z, w_c, accumulate=v0 > 0)
                if dw_acc is not None:
                    _matmul_into(dw_acc, z.t(), h, accumulate=not first)
                if db_acc is not None:
                    # The same dz the d weight GEMM reads (in the input dtype), summed in fp32 (fp64).
                    if first:
                        torch.sum(z, dim=0, dtype=acc, out=db_acc[v0:v1])
                    else:
                        db_acc[v0:v1] += z.sum(dim=0, dtype=acc)
        if dw_acc is not None and dw_acc.dtype != d_weight.dtype:
            d_weight[v0:v1].copy_(dw_acc)
        if dv_acc is not None and dv_acc.dtype != d_values.dtype:
            d_values[v0:v1].copy_(dv_acc)
    if dh_acc is not None and dh_acc is not d_hidden:
        d_hidden.copy_(dh_acc)
    d_bias = db_acc.to(bias.dtype) if db_acc is not None else None
    return d_hidden, d_weight, d_bias, d_values


# ---------------------------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------------------------


def capture_fwd_triton(
    hidden,
    weight,
    bias,
    labels,
    values,
    token_weights,
    denom,
    ignore_index,
    reduction,
    topk,
    softcap,
    label_smoothing,
    z_loss,
    tuning=None,
):
    """The forward with the loss reduction, without autograd (arguments as :class:`LogitCaptureFunction`).

    Returns ``(loss, lse, p_target, p_sq_sum, p_values, topk_ids, topk_logits, denom)`` with ``None`` for
    absent outputs; ``denom`` is the "mean" denominator actually used (0-d, accumulation dtype).
    """
    lab = labels.to(torch.int64).contiguous()
    lse, p_target, p_sq, row, p_values, topk_ids, topk_logits = logit_capture_fwd(
        hidden,
        weight,
        lab,
        values,
        bias=bias,
        ignore_index=ignore_index,
        topk=topk,
        softcap=softcap,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        tuning=tuning,
    )
    loss, denom = reduce_rows(row, lab != ignore_index, token_weights, denom, reduction)
    return loss, lse, p_target, p_sq, p_values, topk_ids, topk_logits, denom


def capture_bwd_triton(
    hidden,
    weight,
    bias,
    labels,
    lse,
    token_weights,
    denom,
    g_loss,
    g_values,
    values_meta,
    *,
    need_hidden,
    need_weight,
    need_bias=False,
    ignore_index,
    reduction,
    softcap,
    label_smoothing,
    z_loss,
    tuning=None,
):
    """The backward without autograd: ``(d_hidden, d_weight, d_bias, d_values)``, ``None`` where not needed.

    ``denom`` as returned by :func:`capture_fwd_triton`; ``g_loss`` / ``g_values`` the upstream gradients of
    ``loss`` / ``p_values`` or ``None``; ``values_meta`` ``(shape, dtype)`` of ``values`` or ``None``.
    """
    lab = labels.to(torch.int64).contiguous()
    dloss = None  # need_bias is False without a bias: capture_grads, the one caller, decides it
    if g_loss is not None and (need_hidden or need_weight or need_bias):
        dloss = row_grads(g_loss, lab != ignore_index, token_weights, denom, reduction, lse.dtype)
    if values_meta is None:
        g_values = None
    dh, dw, db, dv = logit_capture_bwd(
        hidden,
        weight,
        lab,
        lse,
        dloss,
        g_values,
        values_meta,
        need_hidden=need_hidden,
        need_weight=need_weight,
        bias=bias,
        need_bias=need_bias,
        softcap=softcap,
        label_smoothing=float(label_smoothing),
        z_loss=float(z_loss),
        tuning=tuning,
    )
    return dh if need_hidden else None, dw if need_weight else None, db if need_bias else None, dv


class LogitCaptureFunction(torch.autograd.Function):
    """The capture as one autograd node.

    ``forward(hidden, weight, bias, labels, values, token_weights, denom, ignore_index, reduction, topk,
    softcap, label_smoothing, z_loss, tuning)`` returns ``(loss, lse, p_target, p_sq_sum, p_values, topk_ids,
    topk_logits)``. ``denom``: the "mean" denominator as a 0-d tensor, or ``None`` for the number of counted
    rows. Saved for backward: hidden, weight, bias, labels, lse, token weights, denom (``values`` only as shape
    and dtype: ``d values = P^T dU`` does not read it). Only ``loss`` (-> hidden, weight, bias) and ``p_values``
    (-> values) are differentiable. Forward and backward run with autocast off (the GEMMs of the chunk loop
    have their own fp32 accumulation; :mod:`.api` casts the inputs for an autocast region).
    """

    forward, backward = capture_methods(capture_fwd_triton, capture_bwd_triton, "tuning")


def logit_capture_triton(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    values: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    topk: int = 0,
    softcap: float | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    token_weights: torch.Tensor | None = None,
    num_items_in_batch=None,
    tuning: CaptureTuning | None = None,
) -> Capture:
    """Triton capture; same arguments and result as :func:`tcopilot.logit_capture` (inputs validated there),
    plus ``tuning`` (:class:`CaptureTuning`: chunking and launch parameters, ``None`` = automatic)."""
    denom = mean_denom(num_items_in_batch, reduction, hidden)
    opts = (ignore_index, reduction, int(topk), softcap, float(label_smoothing), float(z_loss), tuning)
    return Capture(*LogitCaptureFunction.apply(hidden, weight, bias, labels, values, token_weights, denom, *opts))
