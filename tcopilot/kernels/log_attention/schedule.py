"""Which key tiles each query block of ``log_attention`` visits: the tile schedule, and the int32 positions.

The attention kernels loop over two dense lists per (batch, query block) instead of testing every key
tile: *full* tiles (every key valid and visible to every query of the block: no mask at all) and
*partial* tiles (some key visible to some query: masked). The rest are never loaded. The dK/dV kernel
reads the transposed lists (query blocks per key tile).

Why a kernel: the schedule is rebuilt at every launch (twice in the backward), for every attention of
every Copilot layer. Written as torch ops it was ~25 small launches each (pads, min/max reductions,
compares, an argsort to compact the lists): ~75 per layer and attention for a forward and backward, more
than the attention itself at training shapes of a small Copilot. ``_tile_schedule_kernel`` builds both
lists in one launch: one program per (batch, row) reads the row's positions, walks the column tiles in
chunks, and compacts the visited ids with a prefix sum. :func:`tile_schedule_reference` is the torch
version it is tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

_INT32_MAX = 2**31 - 1
_INT64_MAX = 2**63 - 1
# Positions one program holds per chunk of column tiles (chunk x tile): a few registers per thread.
_CHUNK_ELEMENTS = 4096


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def positions_int32(q_pos: torch.Tensor, k_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions as the int32 the kernels compare, with the same visibility ``0 <= k <= q``.

    Positions of 32 bits or fewer pass unchanged. int64 positions (the default dtype of ``arange``) may lie
    past 2**31 (a long-running stream's absolute positions), so each batch row is shifted by the smallest
    of its valid key positions ``r``: valid keys map to ``k - r >= 0``, padding keys to -1, a query to
    ``q - r`` when it is at least ``r`` and to -1 otherwise (it sees no key either way). Differences are
    what visibility depends on, so this is exact whenever the valid keys of a row span fewer than 2**31 - 1
    positions (any log with a key per position does: its span is below its length). Larger spans are
    clamped at the top: keys and queries past ``r + 2**31 - 2`` compare as equal. No host sync.
    (The rebase costs ~15 small launches: callers that know their positions are small pass int32.)

    Batch rows may be strided: the kernels take a row stride, so only the positions within a row must be
    adjacent. int32 positions laid out so (a decode cache's ``pos[:, :n]`` view of a wider buffer) pass as
    they are, not copied at every attention of every decode step; anything else is made contiguous.
    """
    if q_pos.dtype != torch.int64 and k_pos.dtype != torch.int64:
        return _rows_int32(q_pos), _rows_int32(k_pos)
    q, k = q_pos.to(torch.int64), k_pos.to(torch.int64)
    valid = k >= 0
    r = torch.where(valid, k, _INT64_MAX).amin(1, keepdim=True) if k.shape[1] else k.new_zeros(k.shape[0], 1)
    r = torch.where(r == _INT64_MAX, 0, r)  # a row with no valid key: nothing to shift
    top = _INT32_MAX - 1
    k32 = torch.where(valid, (k - r).clamp_max(top), -1)
    q32 = torch.where(q >= r, (q - r).clamp_max(top), -1)
    return _rows_int32(q32), _rows_int32(k32)


def _rows_int32(pos: torch.Tensor) -> torch.Tensor:
    # A copy only where the kernels need one: a cast (a fresh tensor anyway) or a row that is not adjacent.
    # A row of one position has no stride to respect.
    pos = pos.to(torch.int32)
    return pos if pos.stride(-1) == 1 or pos.shape[-1] == 1 else pos.contiguous()


@triton.jit
def _tile_schedule_kernel(
    QPOS, KPOS, FULL_CNT, FULL_IDX, PART_CNT, PART_IDX,
    stride_qpos_b, stride_kpos_b, Lq, Lk, N_ROWS, N_COLS,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr, BY_KEY: tl.constexpr,
):  # fmt: skip
    # One program per (batch, row): a row is a query block (its key tiles are the columns) or, BY_KEY, a
    # key tile (its query blocks are the columns). Same rule as tile_schedule_reference, tile by tile.
    pid = tl.program_id(0)
    b = (pid // N_ROWS).to(tl.int64)
    row = pid % N_ROWS
    q_base = QPOS + b * stride_qpos_b
    k_base = KPOS + b * stride_kpos_b
    out_base = pid.to(tl.int64) * N_COLS
    big = 2147483647
    if BY_KEY:
        offs = row * BLOCK_N + tl.arange(0, BLOCK_N)
        kp = tl.load(k_base + offs, mask=offs < Lk, other=-1)  # past Lk counts as padding
        r_min_valid = tl.min(tl.where(kp >= 0, kp, big), 0)
        r_all_valid = tl.min(kp, 0) >= 0
        r_max = tl.max(kp, 0)
    else:
        offs = row * BLOCK_M + tl.arange(0, BLOCK_M)
        ok = offs < Lq
        qp = tl.load(q_base + offs, mask=ok, other=-1)
        r_max = tl.max(qp, 0)
        r_min = tl.min(tl.where(ok, qp, big), 0)
    n_full = tl.zeros([], dtype=tl.int32)
    n_part = tl.zeros([], dtype=tl.int32)
    for c0 in range(0, N_COLS, CHUNK):
        cols = c0 + tl.arange(0, CHUNK)
        col_ok = cols < N_COLS
        if BY_KEY:
            offs2 = cols[:, None] * BLOCK_M + tl.arange(0, BLOCK_M)[None, :]
            ok2 = offs2 < Lq
            qp2 = tl.load(q_base + offs2, mask=ok2, other=-1)
            visible = r_min_valid <= tl.max(qp2, 1)
            full = r_all_valid & (r_max <= tl.min(tl.where(ok2, qp2, big), 1))
        else:
            offs2 = cols[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
            kp2 = tl.load(k_base + offs2, mask=offs2 < Lk, other=-1)
            visible = tl.min(tl.where(kp2 >= 0, kp2, big), 1) <= r_max
            full = (tl.min(kp2, 1) >= 0) & (tl.max(kp2, 1) <= r_min)
        full = full & col_ok
        part = visible & (~full) & col_ok
        f = full.to(tl.int32)
        p = part.to(tl.int32)
        # (Masks from the int32 flags: the interpreter's scalar-and-vector bool & is not a valid store mask.)
        # Compaction: the k-th set column of the chunk goes to slot count + k (ascending, as the reference).
        tl.store(FULL_IDX + out_base + n_full + tl.cumsum(f, 0) - 1, cols, mask=f != 0)
        tl.store(PART_IDX + out_base + n_part + tl.cumsum(p, 0) - 1, cols, mask=p != 0)
        n_full += tl.sum(f, 0)
        n_part += tl.sum(p, 0)
    tl.store(FULL_CNT + pid, n_full)
    tl.store(PART_CNT + pid, n_part)


def tile_schedule(
    q_pos: torch.Tensor, k_pos: torch.Tensor, block_m: int, block_n: int, *, by_key: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Which key tiles each query block visits (or, ``by_key``, which query blocks each key tile meets).

    Returns ``(full_count, full_ids, partial_count, partial_ids)``: counts ``[B, n_rows]`` int32 and ids
    ``[B, n_rows, n_cols]`` int32, the visited ids first in ascending order (entries past the count are
    unspecified: the kernels never read them). A *full* tile has every key valid and visible to every query
    of the block (no mask needed); a *partial* tile has some key visible to some query; the rest are
    skipped. One Triton launch; :func:`tile_schedule_reference` gives the same lists. Also the debug view of
    how many tiles a launch visits.
    """
    q_pos, k_pos = positions_int32(q_pos, k_pos)
    bsz, lq = q_pos.shape
    lk = k_pos.shape[1]
    nqb, nkb = _cdiv(lq, block_m), _cdiv(lk, block_n)
    rows, cols = (nkb, nqb) if by_key else (nqb, nkb)
    device = q_pos.device
    full_cnt = torch.empty((bsz, rows), dtype=torch.int32, device=device)
    part_cnt = torch.empty((bsz, rows), dtype=torch.int32, device=device)
    full_ids = torch.empty((bsz, rows, cols), dtype=torch.int32, device=device)
    part_ids = torch.empty((bsz, rows, cols), dtype=torch.int32, device=device)
    if bsz * rows == 0:
        return full_cnt, full_ids, part_cnt, part_ids
    inner = block_m if by_key else block_n
    chunk = max(2, min(triton.next_power_of_2(max(cols, 1)), _CHUNK_ELEMENTS // inner))
    _tile_schedule_kernel[(bsz * rows,)](
        q_pos, k_pos, full_cnt, full_ids, part_cnt, part_ids, q_pos.stride(0), k_pos.stride(0), lq, lk, rows, cols,
        BLOCK_M=block_m, BLOCK_N=block_n, CHUNK=chunk, BY_KEY=by_key, num_warps=4,
    )  # fmt: skip
    return full_cnt, full_ids, part_cnt, part_ids


def _compact(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(count, ids): per row, how many entries are set and their column ids first, in ascending order."""
    count = mask.sum(-1, dtype=torch.int32)
    ids = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return count.contiguous(), ids.contiguous()


def tile_schedule_reference(
    q_pos: torch.Tensor, k_pos: torch.Tensor, block_m: int, block_n: int, *, by_key: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`tile_schedule` in torch ops (the readable oracle; ids past the count are the skipped tiles).

    Visibility ``0 <= k_pos <= q_pos`` is monotone in ``q_pos``, so per-tile min/max of the positions decide
    it exactly at tile granularity, whatever order the positions come in: a key tile is visible to a query
    block iff its smallest valid key position is at most the block's largest query position, and full iff
    all its keys are valid and its largest is at most the block's smallest query position.
    """
    q_pos, k_pos = positions_int32(q_pos, k_pos)
    bsz, lq = q_pos.shape
    lk = k_pos.shape[1]
    nqb, nkb = _cdiv(lq, block_m), _cdiv(lk, block_n)
    q_pad, k_pad = nqb * block_m - lq, nkb * block_n - lk
    q_max = F.pad(q_pos, (0, q_pad), value=-1).view(bsz, nqb, block_m).amax(-1)
    q_min = F.pad(q_pos, (0, q_pad), value=_INT32_MAX).view(bsz, nqb, block_m).amin(-1)
    kp = F.pad(k_pos, (0, k_pad), value=-1).view(bsz, nkb, block_n)
    k_min_valid = torch.where(kp >= 0, kp, _INT32_MAX).amin(-1)
    k_all_valid = kp.amin(-1) >= 0
    k_max = kp.amax(-1)
    visible = k_min_valid[:, None, :] <= q_max[:, :, None]  # [B, nqb, nkb]
    full = k_all_valid[:, None, :] & (k_max[:, None, :] <= q_min[:, :, None])
    partial = visible & ~full
    if by_key:
        full, partial = full.transpose(1, 2), partial.transpose(1, 2)
    return (*_compact(full), *_compact(partial))


__all__ = ["positions_int32", "tile_schedule", "tile_schedule_reference"]
