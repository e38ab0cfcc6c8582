"""Triton flash attention over the Mistake Log (DESIGN 4.5).

``out[b, h, i] = softmax_j(q[b, h, i] . k[b, h', j] * scale) v[b, h', j]`` over the keys with
``0 <= k_pos[b, j] <= q_pos[b, i]``, ``h' = h // (Hq // Hk)``.

Design:

* Tile schedule (:mod:`.schedule`). Positions are arbitrary integers (the log is two sorted segments,
  padding is negative), so there is no single causal cutoff. Before each launch one small kernel reduces
  the positions to per-tile bounds and builds, for every (batch, query block), two dense lists of key
  tiles: *full* tiles (every key valid and visible to every query of the block: no mask is computed at
  all) and *partial* tiles (some key visible to some query: masked). Every other tile is skipped, never
  loaded. The kernels loop over these lists without branches (the FlexAttention "block mask" idea), so
  Triton can pipeline the loads. The backward dK/dV kernel uses the transposed lists (query blocks per key
  tile).
* Forward (FlashAttention-2): one program per (query block, b*Hq), online softmax in fp32 with exp2
  (``scale * log2(e)`` folded in), writes ``lse`` (natural log, fp32, ``+inf`` for a row that sees no key:
  the backward then recomputes ``p = exp(s - inf) = 0`` and returns exact zeros without a special case).
* Backward: ``delta = rowsum(dO * O)``; one program per (key block, b*Hk) accumulates dK/dV over the query
  blocks of all Hq/Hk heads of its group (GQA reduced in registers, no atomics); one program per
  (query block, b*Hq) accumulates dQ. Both recompute ``p`` from ``lse``.
* Decode (small Lq, e.g. 1 against a long cache): split-K "flash-decoding". The Hq/Hk query heads of a
  kv head (times Lq) are packed as the rows of one tile, so K/V are read once per group; several
  programs split the key range and write partial (max, sum, acc); a small kernel combines them and also
  writes ``lse``, so the same autograd backward serves this path. fp32 takes it only at the head dims and
  packed row counts where it compiles without register spills (``_FP32_DECODE_MAX_ROWS``), the regular
  forward kernel otherwise.
* Keys with a negative position are never read (masked loads with 0), so garbage or NaN in padded cache
  slots cannot reach the output; skipped tiles are not read at all.

Numerics: fp32 softmax statistics and accumulators; p and dS are rounded to the input dtype before their
matmuls (as in FlashAttention). fp32 inputs use 3xTF32 products on CUDA (exact fp32 in the interpreter).
Row offsets inside one (batch, head) slice are 32-bit; batch and head offsets are 64-bit.
"""

from __future__ import annotations

import functools
import os
from contextlib import nullcontext

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from .schedule import _cdiv, positions_int32, tile_schedule

_LOG2E = 1.4426950408889634
_INT32_MAX = 2**31 - 1
_MAX_HEAD_DIM = 256

# A query block of at most this many packed rows (Hq/Hk heads x Lq queries) takes the split-K decode path.
_DECODE_MAX_ROWS = 64
_DECODE_MAX_LQ = 16


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# --------------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------------

# Hopper (H100/H200) starting points, keyed by the padded head dim max(BLOCK_D, BLOCK_DV):
# (BLOCK_M, BLOCK_N, num_warps, num_stages). Block sizes are fixed per head dim because the tile schedule
# is built for them before the launch; on CUDA the autotuner only varies warps and stages around them.
# Chosen so that ptxas (sm_90a, bf16) reports no register spills, or under 100 bytes (dK/dV at 128, where
# K, V, dK and dV all live in registers); not yet timed on a GPU.
_FWD_CFG = {
    16: (128, 64, 8, 3),
    32: (128, 64, 8, 3),
    64: (128, 64, 8, 3),
    128: (128, 64, 8, 3),
    256: (64, 64, 8, 2),
}
# dK/dV: few queries per step, many keys per program (the program's K/V stay in registers).
_DKDV_CFG = {
    16: (32, 128, 8, 3),
    32: (32, 128, 8, 3),
    64: (32, 128, 8, 3),
    128: (32, 64, 8, 2),
    256: (16, 32, 4, 1),
}
# dQ: many queries per program, few keys per step.
_DQ_CFG = {
    16: (128, 32, 8, 3),
    32: (128, 32, 8, 3),
    64: (128, 32, 8, 3),
    128: (64, 32, 4, 2),
    256: (32, 32, 4, 1),
}
# fp32 inputs: tiles take twice the registers and the products run as 3xTF32, so smaller blocks. fp32 is
# the exact path, not the fast one. Spill bytes per thread below are ptxas' for sm_90a
# (benchmarks/sm90_compile.py, Triton 3.9; benchmarks/results/sm90-compile.md):
# * 128, dK/dV: (16, 32, 4, 2) spilled 720 B, and every warps/stages variant of (16, 32) spilled (56-732 B):
#   K, V, dK, dV stay in registers for the whole program. (32, 16, 8, 2) spills nothing (220 registers),
#   nor does any 8-warp variant of it. dQ: (32, 16, 4, 2) spilled 132 B, 8 warps / 3 stages 0 B.
# * 256: the old 128 entries spilled 1644 B (forward), 29928 B (dK/dV: 32 registers used, the rest in
#   local memory) and 3592 B (dQ). (16, 16, 8, 1) spills 0 / 428 / 232 B, the least of the
#   block sizes tried; dK/dV at 256 in fp32 cannot avoid spills in this design (16 is tl.dot's minimum).
# * 64, dK/dV: (32, 32, 4, 2) spilled 24 B (4 warps / 3 stages: 40 B); with 8 warps no stage count spills
#   (195-246 registers), hence (32, 32, 8, 2).
# * 32, dK/dV: the (32, 32) tile of 16 and 64 spilled at every warps/stages tried (24-200 B; 4 warps /
#   2 stages 136 B): ptxas lays the narrow fp32 tiles out badly. (32, 64) spills 0 B at all six (183-229
#   registers); 16 keeps (32, 32): 0 B at all six (168-249 registers). (Head dims 16 and 32 are not in
#   sm90_compile.py's table: compiled with its 64 cases rescaled.)
_FP32_FWD_CFG = {**dict.fromkeys((16, 32, 64), (64, 32, 4, 2)), 128: (32, 32, 4, 2), 256: (16, 16, 8, 1)}
_FP32_DKDV_CFG = {16: (32, 32, 4, 2), 32: (32, 64, 8, 2), 64: (32, 32, 8, 2), 128: (32, 16, 8, 2), 256: (16, 16, 8, 1)}
_FP32_DQ_CFG = {**dict.fromkeys((16, 32, 64), (64, 32, 4, 2)), 128: (32, 16, 8, 3), 256: (16, 16, 8, 1)}
# Decode key tile per head dim (memory-bound: wide tiles, but the per-element K/V pointers cost registers).
_DECODE_BLOCK_N = {16: 128, 32: 128, 64: 64, 128: 32, 256: 16}
# fp32 split-K decode: the most packed rows (BLOCK_M) per head dim at which the split-K kernel compiles
# without spills; a larger fp32 tile takes the regular forward kernel instead (its fp32 tables spill 0 B
# at every head dim). Split-K fp32 spills whatever the key tile (16 or 32) and warps (4 or 8): head dim
# 128, 32 rows 104-248 B, 64 rows 320-456 B; 256, 16 rows 284-528 B, 32 rows 6608-9184 B (32 registers,
# the rest in local memory), 64 rows 2320 B. Up to 64 rows at head dim <= 64 (key tile 32, see
# _decode_cfg) and 16 rows at 128 it spills 0 B.
_FP32_DECODE_MAX_ROWS = {16: 64, 32: 64, 64: 64, 128: 16, 256: 0}


def _decode_cfg(key_dim: int, block_m: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages) for the split-K kernel with ``block_m`` packed query rows."""
    block_n = _DECODE_BLOCK_N[key_dim]
    if block_m <= 16:
        return block_n, 4, 2
    if dtype == torch.float32 and key_dim <= 64:
        # fp32 with 32 or 64 packed rows: the half-precision key tiles spilled (head dim 64, 64 rows, 64 keys:
        # 140 B; head dim 32, 128 keys: 32 rows 10148 B, 64 rows 64 B; head dim 16, 32 rows: 44 B). 32 keys
        # and 8 warps spill 0 B at every head dim <= 64 and both row counts (120-241 registers).
        return 32, 8, 2
    # Larger packed tiles (GQA groups x Lq): 8 warps, and half the key tile from 128 on (register spills).
    return (block_n if key_dim <= 64 else max(16, block_n // 2)), 8, 2


# Under the interpreter every program runs sequentially in numpy: 16 is the smallest tile tl.dot accepts
# and gives several tiles even for the tiny test shapes.
_INTERP_BLOCK = 16


# 4-warp autotune candidates dropped per (kernel, padded head dim, fp32): those ptxas showed to spill
# registers (sm_90a, Triton 3.9, benchmarks/results/sm90-compile.md) where 8-warp candidates of the same
# tile do not (or, fp32 dK/dV and dQ at 256, spill 2-3x less). A spilling candidate cannot win the race,
# but a GPU run compiles and times it for every autotune key. Spills at stages 1 / 2 / 3:
_TUNE_DROP = {
    # bf16/fp16 forward, (128, 64): 148 / 392 / 424 B at 255 registers; 8 warps 0 B (180-195 registers).
    ("fwd", 128, False): {(4, 1), (4, 2), (4, 3)},
    # bf16/fp16 forward, (64, 64): 100 / 8 / 20 B; 8 warps 0 B (215-232 registers).
    ("fwd", 256, False): {(4, 1), (4, 2), (4, 3)},
    # bf16/fp16 dK/dV, (32, 128): 20 / 172 / 192 B; 8 warps 0 B (144-177 registers).
    ("dkdv", 64, False): {(4, 1), (4, 2), (4, 3)},
    # bf16/fp16 dK/dV, (32, 64): 4 warps / 2 stages 16 B; stages 1 and 3 spill 0 B (at 255 registers).
    ("dkdv", 128, False): {(4, 2)},
    # fp32 dK/dV, (32, 32): - / 24 / 40 B; stage 1 and 8 warps 0 B.
    ("dkdv", 64, True): {(4, 2), (4, 3)},
    # fp32 dK/dV, (32, 16): - / 244 / 244 B; stage 1 and 8 warps 0 B.
    ("dkdv", 128, True): {(4, 2), (4, 3)},
    # fp32 dQ, (32, 16): 80 / 132 / 152 B; 8 warps 8 / 16 / 0 B (kept: at least two candidates).
    ("dq", 128, True): {(4, 1), (4, 2), (4, 3)},
    # fp32 at 256, (16, 16): forward 80 / 128 / 148 B, 8 warps 0 B; dK/dV 1348 / 2068 / 2132 B, 8 warps
    # 428 / 1020 / 1020 B; dQ 700 / 748 / 804 B, 8 warps 232 / 324 / 308 B.
    ("fwd", 256, True): {(4, 1), (4, 2), (4, 3)},
    ("dkdv", 256, True): {(4, 1), (4, 2), (4, 3)},
    ("dq", 256, True): {(4, 1), (4, 2), (4, 3)},
}


def _tune_configs(kind: str, key_dim: int, dtype: torch.dtype) -> list[triton.Config]:
    """Autotune candidates (warps, stages) of kernel ``kind`` ("fwd", "dkdv", "dq") at this head dim."""
    # No num_stages=4: for all three kernels (bf16 and fp32, head dims 64 and 128) it compiled to exactly
    # the same PTX as num_stages=3 (sm_90a, Triton 3.9, benchmarks/sm90_compile.py): two more candidates
    # compiled and timed per autotune key for nothing.
    fp32 = dtype == torch.float32
    drop = _TUNE_DROP.get((kind, key_dim, fp32), set())
    table = _blocks_table(kind, fp32)[key_dim][2:]
    # The table's own (warps, stages) always stays: TCOPILOT_AUTOTUNE=0 launches it.
    return [
        triton.Config({}, num_warps=w, num_stages=s)
        for w in (4, 8)
        for s in (1, 2, 3)
        if (w, s) not in drop or (w, s) == table
    ]


@functools.cache
def _tuned(kind: str, key_dim: int, fp32: bool):
    """Autotuned wrapper on CUDA (warps/stages only), unless TCOPILOT_AUTOTUNE=0 asks for the table."""
    configs = _tune_configs(kind, key_dim, torch.float32 if fp32 else torch.bfloat16)
    return triton.autotune(configs=configs, key=["HEAD_DIM", "V_DIM", "BLOCK_M", "BLOCK_N"])(_KERNELS[kind])


def _poison() -> bool:
    # Outputs start as NaN under the interpreter (and with TCOPILOT_POISON=1) so the tests see any element
    # a kernel forgets to write; on a GPU run they are plain torch.empty.
    return _interpreting() or os.environ.get("TCOPILOT_POISON", "0") == "1"


def _empty(shape, dtype, device) -> torch.Tensor:
    if _poison():
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _use_autotune() -> bool:
    return not _interpreting() and os.environ.get("TCOPILOT_AUTOTUNE", "1") != "0"


# --------------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------------


@triton.jit
def _load_tile(ptrs, row_mask, offs_c, NCOL: tl.constexpr, BLOCK_C: tl.constexpr, ROW_MASKED: tl.constexpr):
    # Masks are built only where needed: a full tile of a power-of-two head dim is a plain load.
    if ROW_MASKED:
        if BLOCK_C == NCOL:
            x = tl.load(ptrs, mask=row_mask[:, None], other=0.0)
        else:
            x = tl.load(ptrs, mask=row_mask[:, None] & (offs_c[None, :] < NCOL), other=0.0)
    else:
        if BLOCK_C == NCOL:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=offs_c[None, :] < NCOL, other=0.0)
    return x


@triton.jit
def _online_softmax_step(
    acc, m_i, l_i, q, k, v, qpos, kpos, kvalid, sm_scale2, MASKED: tl.constexpr, DOT_PREC: tl.constexpr
):
    # Scores in base 2: s = q.k * scale * log2(e), so exp2 replaces exp.
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * sm_scale2
    if MASKED:
        vis = kvalid[None, :] & (kpos[None, :] <= qpos[:, None])
        s = tl.where(vis, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if MASKED:
        # A row that has seen nothing yet keeps m = -inf; subtracting 0 instead gives p = 0, not NaN.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_use = m_new
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PREC)
    return acc, m_new, l_i


@triton.jit
def _log_attention_fwd_kernel(
    Q, K, V, QPOS, KPOS, OUT, LSE,
    FULL_CNT, FULL_IDX, PART_CNT, PART_IDX,
    sm_scale2,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_qpos_b, stride_kpos_b,
    H, GROUP, Lq, Lk, NQB, NKB,
    HEAD_DIM: tl.constexpr, V_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    bh = pid // NQB
    # Last query blocks first: with causal-like masks they have the most tiles, so the tail is short.
    qb = NQB - 1 - pid % NQB
    b = (bh // H).to(tl.int64)
    h = bh % H
    hk = (h // GROUP).to(tl.int64)
    h = h.to(tl.int64)

    offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < Lq
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :]
    q = _load_tile(q_ptrs, row_ok, offs_d, HEAD_DIM, BLOCK_D, True)
    qpos = tl.load(QPOS + b * stride_qpos_b + offs_m, mask=row_ok, other=-1)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    sched = b * NQB + qb
    # Full tiles: every key valid and visible to every query of the block, so no mask and no bounds.
    n_full = tl.load(FULL_CNT + sched)
    for i in range(0, n_full):
        t = tl.load(FULL_IDX + sched * NKB + i)
        offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
        k = _load_tile(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], offs_n, offs_d,
                       HEAD_DIM, BLOCK_D, False)  # fmt: skip
        v = _load_tile(v_base + offs_n[:, None] * stride_vn + offs_dv[None, :], offs_n, offs_dv,
                       V_DIM, BLOCK_DV, False)  # fmt: skip
        acc, m_i, l_i = _online_softmax_step(
            acc, m_i, l_i, q, k, v, qpos, offs_n, row_ok, sm_scale2, False, DOT_PREC
        )
    # Partial tiles: masked. Padded keys (negative position, or past Lk) are never read.
    n_part = tl.load(PART_CNT + sched)
    for i in range(0, n_part):
        t = tl.load(PART_IDX + sched * NKB + i)
        offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
        kpos = tl.load(KPOS + b * stride_kpos_b + offs_n, mask=offs_n < Lk, other=-1)
        kvalid = kpos >= 0
        k = _load_tile(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], kvalid, offs_d,
                       HEAD_DIM, BLOCK_D, True)  # fmt: skip
        v = _load_tile(v_base + offs_n[:, None] * stride_vn + offs_dv[None, :], kvalid, offs_dv,
                       V_DIM, BLOCK_DV, True)  # fmt: skip
        acc, m_i, l_i = _online_softmax_step(
            acc, m_i, l_i, q, k, v, qpos, kpos, kvalid, sm_scale2, True, DOT_PREC
        )

    has_key = l_i > 0
    l_safe = tl.where(has_key, l_i, 1.0)
    out = acc / l_safe[:, None]
    # +inf marks "no visible key": the backward's exp(s - lse) is then exactly 0.
    lse = tl.where(has_key, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("inf"))
    o_ptrs = OUT + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :]
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < V_DIM))
    tl.store(LSE + (b * H + h) * Lq + offs_m, lse, mask=row_ok)


@triton.jit
def _log_attention_decode_kernel(
    Q, K, V, QPOS, KPOS, M_PART, L_PART, ACC_PART,
    sm_scale2,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_qpos_b, stride_kpos_b,
    H, HK, GROUP, Lq, Lk, NSPLIT, TILES_PER_SPLIT, NKB,
    HEAD_DIM: tl.constexpr, V_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    split = pid % NSPLIT
    bhk = pid // NSPLIT
    b = (bhk // HK).to(tl.int64)
    hk = (bhk % HK).to(tl.int64)

    # Row r of the tile is query i = r % Lq of head hk * GROUP + r // Lq: the group shares every K/V load.
    offs_r = tl.arange(0, BLOCK_M)
    row_ok = offs_r < GROUP * Lq
    qi = offs_r % Lq
    h = hk * GROUP + (offs_r // Lq).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_ptrs = Q + b * stride_qb + h[:, None] * stride_qh + qi[:, None] * stride_qm + offs_d[None, :]
    q = _load_tile(q_ptrs, row_ok, offs_d, HEAD_DIM, BLOCK_D, True)
    qpos = tl.load(QPOS + b * stride_qpos_b + qi, mask=row_ok, other=-1)
    q_max = tl.max(qpos, 0)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    t0 = split * TILES_PER_SPLIT
    t1 = tl.minimum(t0 + TILES_PER_SPLIT, NKB)
    for t in range(t0, t1):
        offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
        kpos = tl.load(KPOS + b * stride_kpos_b + offs_n, mask=offs_n < Lk, other=-1)
        kvalid = kpos >= 0
        # Decoding is memory-bound: a branch that skips the K/V reads of an invisible tile is the saving,
        # and costs nothing since there is no pipelined matmul stream to break.
        k_min = tl.min(tl.where(kvalid, kpos, 2147483647), 0)
        if k_min <= q_max:
            k = _load_tile(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], kvalid, offs_d,
                           HEAD_DIM, BLOCK_D, True)  # fmt: skip
            v = _load_tile(v_base + offs_n[:, None] * stride_vn + offs_dv[None, :], kvalid, offs_dv,
                           V_DIM, BLOCK_DV, True)  # fmt: skip
            acc, m_i, l_i = _online_softmax_step(
                acc, m_i, l_i, q, k, v, qpos, kpos, kvalid, sm_scale2, True, DOT_PREC
            )

    # Partials [B, H, Lq, NSPLIT] (+ Dv for acc), unnormalised, max in base-2 units.
    prow = ((b * H + h) * Lq + qi) * NSPLIT + split
    tl.store(M_PART + prow, m_i, mask=row_ok)
    tl.store(L_PART + prow, l_i, mask=row_ok)
    tl.store(ACC_PART + prow[:, None] * V_DIM + offs_dv[None, :], acc,
             mask=row_ok[:, None] & (offs_dv[None, :] < V_DIM))  # fmt: skip


@triton.jit
def _log_attention_decode_combine_kernel(
    M_PART, L_PART, ACC_PART, OUT, LSE, NSPLIT,
    V_DIM: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)  # one (b, h, i) row of the contiguous output
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    s_ok = offs_s < NSPLIT
    m = tl.load(M_PART + row * NSPLIT + offs_s, mask=s_ok, other=float("-inf"))
    l_part = tl.load(L_PART + row * NSPLIT + offs_s, mask=s_ok, other=0.0)
    m_max = tl.max(m, 0)
    m_use = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp2(m - m_use)  # a split that saw nothing has m = -inf: weight 0
    l_tot = tl.sum(w * l_part, 0)
    acc = tl.load(ACC_PART + (row * NSPLIT + offs_s)[:, None] * V_DIM + offs_dv[None, :],
                  mask=s_ok[:, None] & (offs_dv[None, :] < V_DIM), other=0.0)  # fmt: skip
    has_key = l_tot > 0
    out = tl.sum(acc * w[:, None], 0) / tl.where(has_key, l_tot, 1.0)
    tl.store(OUT + row * V_DIM + offs_dv, out.to(OUT.dtype.element_ty), mask=offs_dv < V_DIM)
    lse = tl.where(has_key, (m_use + tl.log2(tl.where(has_key, l_tot, 1.0))) * 0.6931471805599453,
                   float("inf"))  # fmt: skip
    tl.store(LSE + row, lse)


@triton.jit
def _log_attention_bwd_preprocess(
    OUT, DO, DELTA,
    stride_ob, stride_oh, stride_om,
    stride_dob, stride_doh, stride_dom,
    H, Lq, NQB,
    V_DIM: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    bh = pid // NQB
    qb = pid % NQB
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < Lq
    o = _load_tile(OUT + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :],
                   row_ok, offs_dv, V_DIM, BLOCK_DV, True)  # fmt: skip
    do = _load_tile(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_dv[None, :],
                    row_ok, offs_dv, V_DIM, BLOCK_DV, True)  # fmt: skip
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + (b * H + h) * Lq + offs_m, delta, mask=row_ok)


@triton.jit
def _bwd_kv_step(
    dk, dv, k, v, kpos, kvalid, q_base, do_base, lse_base, delta_base, qpos_base, qb,
    stride_qm, stride_dom, sm_scale2, Lq,
    HEAD_DIM: tl.constexpr, V_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, MASKED: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: skip
    offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < Lq
    q = _load_tile(q_base + offs_m[:, None] * stride_qm + offs_d[None, :], row_ok, offs_d,
                   HEAD_DIM, BLOCK_D, True)  # fmt: skip
    do = _load_tile(do_base + offs_m[:, None] * stride_dom + offs_dv[None, :], row_ok, offs_dv,
                    V_DIM, BLOCK_DV, True)  # fmt: skip
    # Rows past Lq read lse = +inf, so their p is 0 even in unmasked full tiles.
    lse2 = tl.load(lse_base + offs_m, mask=row_ok, other=float("inf")) * 1.4426950408889634
    delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
    # Transposed problem ([keys, queries]) so the reductions over queries land in dk/dv's rows.
    p_t = tl.exp2(tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * sm_scale2 - lse2[None, :])
    if MASKED:
        qpos = tl.load(qpos_base + offs_m, mask=row_ok, other=-1)
        p_t = tl.where(kvalid[:, None] & (kpos[:, None] <= qpos[None, :]), p_t, 0.0)
    dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PREC)
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
    ds_t = p_t * (dp_t - delta[None, :])
    dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PREC)
    return dk, dv


@triton.jit
def _log_attention_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, QPOS, KPOS, DK, DV,
    FULL_CNT, FULL_IDX, PART_CNT, PART_IDX,
    sm_scale2, sm_scale,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_qpos_b, stride_kpos_b,
    H, HK, GROUP, Lq, Lk, NQB, NKB,
    HEAD_DIM: tl.constexpr, V_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    bhk = pid // NKB
    kb = pid % NKB
    b = (bhk // HK).to(tl.int64)
    hk = (bhk % HK).to(tl.int64)
    offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    kpos = tl.load(KPOS + b * stride_kpos_b + offs_n, mask=offs_n < Lk, other=-1)
    kvalid = kpos >= 0
    k = _load_tile(K + b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :],
                   kvalid, offs_d, HEAD_DIM, BLOCK_D, True)  # fmt: skip
    v = _load_tile(V + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vn + offs_dv[None, :],
                   kvalid, offs_dv, V_DIM, BLOCK_DV, True)  # fmt: skip
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)

    sched = b * NKB + kb
    n_full = tl.load(FULL_CNT + sched)
    n_part = tl.load(PART_CNT + sched)
    qpos_base = QPOS + b * stride_qpos_b
    # All query heads of this kv head: the GQA reduction of dK/dV happens here, in registers.
    for g in range(0, GROUP):
        h = hk * GROUP + g
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        lse_base = LSE + (b * H + h) * Lq
        delta_base = DELTA + (b * H + h) * Lq
        for i in range(0, n_full):
            qb = tl.load(FULL_IDX + sched * NQB + i)
            dk, dv = _bwd_kv_step(
                dk, dv, k, v, kpos, kvalid, q_base, do_base, lse_base, delta_base, qpos_base, qb,
                stride_qm, stride_dom, sm_scale2, Lq,
                HEAD_DIM, V_DIM, BLOCK_D, BLOCK_DV, BLOCK_M, False, DOT_PREC,
            )  # fmt: skip
        for i in range(0, n_part):
            qb = tl.load(PART_IDX + sched * NQB + i)
            dk, dv = _bwd_kv_step(
                dk, dv, k, v, kpos, kvalid, q_base, do_base, lse_base, delta_base, qpos_base, qb,
                stride_qm, stride_dom, sm_scale2, Lq,
                HEAD_DIM, V_DIM, BLOCK_D, BLOCK_DV, BLOCK_M, True, DOT_PREC,
            )  # fmt: skip

    n_ok = offs_n < Lk
    dk_ptrs = DK + b * stride_dkb + hk * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :]
    dk = dk * sm_scale
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=n_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
    dv_ptrs = DV + b * stride_dvb + hk * stride_dvh + offs_n[:, None] * stride_dvn + offs_dv[None, :]
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=n_ok[:, None] & (offs_dv[None, :] < V_DIM))


@triton.jit
def _bwd_q_step(
    dq, q, do, lse2, delta, qpos, k_base, v_base, KPOS_B, t,
    stride_kn, stride_vn, sm_scale2, Lk,
    HEAD_DIM: tl.constexpr, V_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_N: tl.constexpr, MASKED: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: skip
    offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    if MASKED:
        kpos = tl.load(KPOS_B + offs_n, mask=offs_n < Lk, other=-1)
        kvalid = kpos >= 0
        k = _load_tile(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], kvalid, offs_d,
                       HEAD_DIM, BLOCK_D, True)  # fmt: skip
        v = _load_tile(v_base + offs_n[:, None] * stride_vn + offs_dv[None, :], kvalid, offs_dv,
                       V_DIM, BLOCK_DV, True)  # fmt: skip
    else:
        k = _load_tile(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], offs_n, offs_d,
                       HEAD_DIM, BLOCK_D, False)  # fmt: skip
        v = _load_tile(v_base + offs_n[:, None] * stride_vn + offs_dv[None, :], offs_n, offs_dv,
                       V_DIM, BLOCK_DV, False)  # fmt: skip
    p = tl.exp2(tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * sm_scale2 - lse2[:, None])
    if MASKED:
        p = tl.where(kvalid[None, :] & (kpos[None, :] <= qpos[:, None]), p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
    ds = p * (dp - delta[:, None])
    dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PREC)
    return dq


@triton.jit
def _log_attention_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, QPOS, KPOS, DQ,
    FULL_CNT, FULL_IDX, PART_CNT, PART_IDX,
    sm_scale2, sm_scale,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_dqb, stride_dqh, stride_dqm,
    stride_qpos_b, stride_kpos_b,
    H, GROUP, Lq, Lk, NQB, NKB,
    HEAD_DIM: tl.constexpr, V_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    bh = pid // NQB
    qb = NQB - 1 - pid % NQB
    b = (bh // H).to(tl.int64)
    h = bh % H
    hk = (h // GROUP).to(tl.int64)
    h = h.to(tl.int64)
    offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < Lq
    q = _load_tile(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                   row_ok, offs_d, HEAD_DIM, BLOCK_D, True)  # fmt: skip
    do = _load_tile(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_dv[None, :],
                    row_ok, offs_dv, V_DIM, BLOCK_DV, True)  # fmt: skip
    lse2 = tl.load(LSE + (b * H + h) * Lq + offs_m, mask=row_ok, other=float("inf")) * 1.4426950408889634
    delta = tl.load(DELTA + (b * H + h) * Lq + offs_m, mask=row_ok, other=0.0)
    qpos = tl.load(QPOS + b * stride_qpos_b + offs_m, mask=row_ok, other=-1)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    kpos_b = KPOS + b * stride_kpos_b
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    sched = b * NQB + qb
    n_full = tl.load(FULL_CNT + sched)
    for i in range(0, n_full):
        t = tl.load(FULL_IDX + sched * NKB + i)
        dq = _bwd_q_step(
            dq, q, do, lse2, delta, qpos, k_base, v_base, kpos_b, t, stride_kn, stride_vn, sm_scale2, Lk,
            HEAD_DIM, V_DIM, BLOCK_D, BLOCK_DV, BLOCK_N, False, DOT_PREC,
        )  # fmt: skip
    n_part = tl.load(PART_CNT + sched)
    for i in range(0, n_part):
        t = tl.load(PART_IDX + sched * NKB + i)
        dq = _bwd_q_step(
            dq, q, do, lse2, delta, qpos, k_base, v_base, kpos_b, t, stride_kn, stride_vn, sm_scale2, Lk,
            HEAD_DIM, V_DIM, BLOCK_D, BLOCK_DV, BLOCK_N, True, DOT_PREC,
        )  # fmt: skip

    dq_ptrs = DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :]
    tl.store(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))  # fmt: skip


# The autotuned kernels; _tuned wraps them on CUDA (the plain kernels are what the interpreter runs).
_KERNELS = {
    "fwd": _log_attention_fwd_kernel,
    "dkdv": _log_attention_bwd_dkdv_kernel,
    "dq": _log_attention_bwd_dq_kernel,
}


# --------------------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------------------


def _pow2_dim(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _check_dims(d: int, dv: int) -> None:
    for name, x in (("q", d), ("v", dv)):
        if not 1 <= x <= _MAX_HEAD_DIM:
            raise ValueError(
                f"{name}: the Triton log_attention supports a head dim in [1, {_MAX_HEAD_DIM}] (16, 32, 64, "
                f"128 are the tuned sizes; others are zero-padded to the next power of two), got {x}"
            )


def _check_row_offsets(name: str, t: torch.Tensor) -> None:
    # Offsets inside one (batch, head) slice are computed in 32 bits in the kernels.
    if (t.shape[2] - 1) * t.stride(2) + t.shape[3] >= _INT32_MAX:
        raise ValueError(
            f"{name}: one (batch, head) slice spans more than 2**31 elements (shape {list(t.shape)}, "
            f"strides {list(t.stride())}); make it contiguous per head"
        )


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs must keep fp32 accuracy (DESIGN 6 promises 1e-5): 3xTF32 on tensor cores is that close
    # at a fraction of the cost of "ieee" (FMA). Half inputs ignore the setting.
    if dtype != torch.float32:
        return "tf32"
    return "ieee" if _interpreting() else "tf32x3"


def _blocks_table(kind: str, fp32: bool) -> dict[int, tuple[int, int, int, int]]:
    return {
        "fwd": (_FWD_CFG, _FP32_FWD_CFG),
        "dkdv": (_DKDV_CFG, _FP32_DKDV_CFG),
        "dq": (_DQ_CFG, _FP32_DQ_CFG),
    }[kind][fp32]


def _blocks(kind: str, dim: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    if _interpreting():
        return _INTERP_BLOCK, _INTERP_BLOCK, 4, 1
    return _blocks_table(kind, dtype == torch.float32)[dim]


def _launch(kind, grid, args, key_dim, dtype, block_m, block_n, warps, stages, **meta):
    if _use_autotune():
        _tuned(kind, key_dim, dtype == torch.float32)[grid](*args, BLOCK_M=block_m, BLOCK_N=block_n, **meta)
    else:
        _KERNELS[kind][grid](*args, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages, **meta)


def _decode_splits(bsz: int, hk: int, nkb: int, device: torch.device) -> int:
    if _interpreting():
        return min(nkb, 3)
    # About two programs per SM: enough to hide memory latency, few enough that the combine stays tiny.
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(nkb, _cdiv(2 * sms, bsz * hk)))


def _use_decode(lq: int, group: int, key_dim: int, dtype: torch.dtype) -> bool:
    """Split-K decode for few packed rows; fp32 only where that kernel compiles without spills."""
    if lq > _DECODE_MAX_LQ or lq * group > _DECODE_MAX_ROWS:
        return False
    return dtype != torch.float32 or _pow2_dim(lq * group) <= _FP32_DECODE_MAX_ROWS[key_dim]


def log_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    scale: float,
    *,
    decode: bool | None = None,
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward launcher: ``(out [B, Hq, Lq, Dv] in q's dtype, lse [B, Hq, Lq] fp32, +inf = no key)``.

    Expects last-dim-contiguous q/k/v and int32 positions whose rows are contiguous, the batch rows at any
    stride (``log_attention_triton`` prepares them). ``decode`` forces (True) or forbids (False) the split-K
    path; default ``_use_decode``: small Lq x group takes it (fp32 only at the head dims and row counts where
    it compiles without spills).
    ``num_splits`` overrides the split-K factor (tests use it to exercise uneven splits).
    """
    bsz, hq, lq, d = q.shape
    hk, lk, dv = k.shape[1], k.shape[2], v.shape[3]
    group = hq // hk
    block_d, block_dv = _pow2_dim(d), _pow2_dim(dv)
    key_dim = max(block_d, block_dv)
    out = _empty((bsz, hq, lq, dv), q.dtype, q.device)
    lse = _empty((bsz, hq, lq), torch.float32, q.device)
    sm_scale2 = scale * _LOG2E
    prec = _dot_precision(q.dtype)
    dims = dict(HEAD_DIM=d, V_DIM=dv, BLOCK_D=block_d, BLOCK_DV=block_dv, DOT_PREC=prec)
    if decode is None:
        decode = _use_decode(lq, group, key_dim, q.dtype)

    if decode:
        block_m = _pow2_dim(lq * group)
        block_n, warps, stages = _decode_cfg(key_dim, block_m, q.dtype)
        if _interpreting():
            block_n = _INTERP_BLOCK
        nkb = _cdiv(lk, block_n)
        splits = num_splits if num_splits is not None else _decode_splits(bsz, hk, nkb, q.device)
        tiles_per_split = _cdiv(nkb, max(1, min(splits, nkb)))
        splits = _cdiv(nkb, tiles_per_split)
        m_part = _empty((bsz, hq, lq, splits), torch.float32, q.device)
        l_part = _empty((bsz, hq, lq, splits), torch.float32, q.device)
        acc_part = _empty((bsz, hq, lq, splits, dv), torch.float32, q.device)
        _log_attention_decode_kernel[(bsz * hk * splits,)](
            q, k, v, q_pos, k_pos, m_part, l_part, acc_part, sm_scale2,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            q_pos.stride(0), k_pos.stride(0),
            hq, hk, group, lq, lk, splits, tiles_per_split, nkb,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages, **dims,
        )  # fmt: skip
        _log_attention_decode_combine_kernel[(bsz * hq * lq,)](
            m_part, l_part, acc_part, out, lse, splits,
            V_DIM=dv, BLOCK_DV=block_dv, BLOCK_S=triton.next_power_of_2(splits), num_warps=4,
        )  # fmt: skip
        return out, lse

    block_m, block_n, warps, stages = _blocks("fwd", key_dim, q.dtype)
    nqb, nkb = _cdiv(lq, block_m), _cdiv(lk, block_n)
    full_cnt, full_ids, part_cnt, part_ids = tile_schedule(q_pos, k_pos, block_m, block_n)
    args = (
        q, k, v, q_pos, k_pos, out, lse, full_cnt, full_ids, part_cnt, part_ids, sm_scale2,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        q_pos.stride(0), k_pos.stride(0),
        hq, group, lq, lk, nqb, nkb,
    )  # fmt: skip
    _launch("fwd", (bsz * hq * nqb,), args, key_dim, q.dtype, block_m, block_n, warps, stages, **dims)
    return out, lse


def log_attention_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward launcher: ``(dq, dk, dv)`` in the inputs' dtypes, recomputing ``p`` from ``lse``."""
    bsz, hq, lq, d = q.shape
    hk, lk, dv_dim = k.shape[1], k.shape[2], v.shape[3]
    group = hq // hk
    if do.stride(-1) != 1:
        do = do.contiguous()
    block_d, block_dv = _pow2_dim(d), _pow2_dim(dv_dim)
    key_dim = max(block_d, block_dv)
    sm_scale2 = scale * _LOG2E
    prec = _dot_precision(q.dtype)
    dims = dict(HEAD_DIM=d, V_DIM=dv_dim, BLOCK_D=block_d, BLOCK_DV=block_dv, DOT_PREC=prec)

    pre_m = 16 if _interpreting() else 64
    delta = _empty((bsz, hq, lq), torch.float32, q.device)
    nqb_pre = _cdiv(lq, pre_m)
    _log_attention_bwd_preprocess[(bsz * hq * nqb_pre,)](
        out, do, delta,
        out.stride(0), out.stride(1), out.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        hq, lq, nqb_pre,
        V_DIM=dv_dim, BLOCK_DV=block_dv, BLOCK_M=pre_m, num_warps=4,
    )  # fmt: skip

    dq = _empty(q.shape, q.dtype, q.device)
    dk = _empty(k.shape, k.dtype, k.device)
    dv = _empty(v.shape, v.dtype, v.device)

    block_m, block_n, warps, stages = _blocks("dkdv", key_dim, q.dtype)
    nqb, nkb = _cdiv(lq, block_m), _cdiv(lk, block_n)
    sched = tile_schedule(q_pos, k_pos, block_m, block_n, by_key=True)
    args = (
        q, k, v, do, lse, delta, q_pos, k_pos, dk, dv, *sched, sm_scale2, scale,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2),
        dv.stride(0), dv.stride(1), dv.stride(2),
        q_pos.stride(0), k_pos.stride(0),
        hq, hk, group, lq, lk, nqb, nkb,
    )  # fmt: skip
    _launch("dkdv", (bsz * hk * nkb,), args, key_dim, q.dtype, block_m, block_n, warps, stages, **dims)

    block_m, block_n, warps, stages = _blocks("dq", key_dim, q.dtype)
    nqb, nkb = _cdiv(lq, block_m), _cdiv(lk, block_n)
    sched = tile_schedule(q_pos, k_pos, block_m, block_n)
    args = (
        q, k, v, do, lse, delta, q_pos, k_pos, dq, *sched, sm_scale2, scale,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        q_pos.stride(0), k_pos.stride(0),
        hq, group, lq, lk, nqb, nkb,
    )  # fmt: skip
    _launch("dq", (bsz * hq * nqb,), args, key_dim, q.dtype, block_m, block_n, warps, stages, **dims)
    return dq, dk, dv


class LogAttentionFunction(torch.autograd.Function):
    """Autograd wrapper: saves q, k, v, out and the fp32 lse; the backward recomputes the probabilities."""

    @staticmethod
    def forward(ctx, q, k, v, q_pos, k_pos, scale, decode=None):
        out, lse = log_attention_fwd(q, k, v, q_pos, k_pos, scale, decode=decode)
        ctx.save_for_backward(q, k, v, out, lse, q_pos, k_pos)
        ctx.scale = scale
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, do):
        q, k, v, out, lse, q_pos, k_pos = ctx.saved_tensors
        dq, dk, dv = log_attention_bwd(do, q, k, v, out, lse, q_pos, k_pos, ctx.scale)
        return dq, dk, dv, None, None, None, None


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def log_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Triton ``log_attention`` (inputs already validated by ``api.log_attention``; ``scale`` resolved).

    Supports fp16, bf16 and fp32; any head dims D, Dv in [1, 256] (powers of two 16..128 are the tuned
    sizes). Strides on the B, H, L dims are free; the last dim is made contiguous only if it is not. So are
    the positions' batch strides: a decode cache's ``pos[:, :n]`` view of a wider buffer is read in place.
    """
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(
            f"q: the Triton log_attention supports float16, bfloat16 and float32, got "
            f"{str(q.dtype).replace('torch.', '')}; use impl='torch' for it"
        )
    _check_dims(q.shape[-1], v.shape[-1])
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_row_offsets(name, t)
    q_pos32, k_pos32 = positions_int32(q_pos, k_pos)
    out_dtype = q.dtype
    # Routed on the caller's dtype: the interpreter's fp32 stand-in for bf16 (below) takes bf16's path.
    key_dim = max(_pow2_dim(q.shape[-1]), _pow2_dim(v.shape[-1]))
    decode = _use_decode(q.shape[2], q.shape[1] // k.shape[1], key_dim, q.dtype)
    if _interpreting() and q.dtype == torch.bfloat16:
        # The interpreter's bf16 tl.dot multiplies raw bit patterns (triton issue 11584): compute in fp32.
        q, k, v = q.float(), k.float(), v.float()
    ctx = torch.cuda.device(q.device) if q.is_cuda else nullcontext()
    with ctx:
        out = LogAttentionFunction.apply(q, k, v, q_pos32, k_pos32, float(scale), decode)
    return out.to(out_dtype)


__all__ = [
    "LogAttentionFunction",
    "log_attention_bwd",
    "log_attention_fwd",
    "log_attention_triton",
]
