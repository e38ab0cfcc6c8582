"""The log_attention tile schedule: the one-launch Triton kernel against its torch reference.

On machines without CUDA the kernel runs under TRITON_INTERPRET=1 (set before Triton is imported).
"""

from __future__ import annotations

import os

import torch

_HAS_CUDA = torch.cuda.is_available()
if not _HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton / the kernels

import pytest  # noqa: E402

triton = pytest.importorskip("triton")

from tcopilot.kernels.log_attention.schedule import tile_schedule, tile_schedule_reference  # noqa: E402

DEV = "cuda" if _HAS_CUDA else "cpu"


def _ar(n, b=1, start=0):
    return torch.arange(start, start + n).repeat(b, 1)


def _same_schedule(q_pos, k_pos, block_m, block_n, by_key):
    got = tile_schedule(q_pos.to(DEV), k_pos.to(DEV), block_m, block_n, by_key=by_key)
    want = tile_schedule_reference(q_pos.cpu(), k_pos.cpu(), block_m, block_n, by_key=by_key)
    for kind, (cnt, ids), (wcnt, wids) in (("full", got[:2], want[:2]), ("partial", got[2:], want[2:])):
        assert cnt.dtype == ids.dtype == torch.int32 and ids.shape == wids.shape, kind
        assert torch.equal(cnt.cpu(), wcnt), f"{kind} counts differ"
        listed = torch.arange(wids.shape[-1]) < wcnt[..., None]  # the first `count` ids of a row are its list
        assert torch.equal(torch.where(listed, ids.cpu(), -1), torch.where(listed, wids, -1)), f"{kind} ids differ"
    return want


def test_tile_schedule_skips_invisible_tiles():
    # Causal 64 x 64 in 16-tiles: block i has i full tiles below the diagonal and 1 partial on it.
    pos = _ar(64)
    fc, fi, pc, pi = tile_schedule(pos, pos, 16, 16)
    assert fc.tolist() == [[0, 1, 2, 3]] and pc.tolist() == [[1, 1, 1, 1]]
    assert fi[0, 3, :3].tolist() == [0, 1, 2] and pi[0, 3, 0].item() == 3
    # Two-segment log: the same pattern in both segments, nothing past the diagonal of either.
    fc, fi, pc, pi = tile_schedule(pos, torch.cat([pos, pos], 1), 16, 16)
    assert fc.tolist() == [[0, 2, 4, 6]] and pc.tolist() == [[2, 2, 2, 2]]
    assert pi[0, 1, :2].tolist() == [1, 5]
    # By key tile (the dK/dV kernel): key tile j meets 3 - j full query blocks and 1 partial.
    fc, _, pc, _ = tile_schedule(pos, pos, 16, 16, by_key=True)
    assert fc.tolist() == [[3, 2, 1, 0]] and pc.tolist() == [[1, 1, 1, 1]]
    # Left padding and a ragged tail: a tile with a padded key (or past Lk) is never "full".
    kp = torch.cat([torch.full((1, 5), -1), _ar(35)], 1)  # Lk = 40: 3 tiles, the last one ragged
    fc, _, pc, _ = tile_schedule(_ar(40, start=-5), kp, 16, 16)
    assert fc.tolist() == [[0, 0, 1]] and pc.tolist() == [[1, 2, 2]]
    # All-padding tiles are skipped by everyone.
    kp = torch.cat([torch.full((1, 32), -7), _ar(32)], 1)
    fc, _, pc, _ = tile_schedule(_ar(32), kp, 16, 16)
    assert (fc + pc).tolist() == [[1, 2]]


def _random_positions(b, n, seed):
    """Unsorted positions with negatives (padding) and repeats: the rule must not assume any order."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-3, n, (b, n), generator=g)


_LAYOUTS = {
    # name: (q_pos, k_pos)
    "causal": (_ar(75, 2), _ar(75, 2)),
    "two_segment_log": (_ar(50, 2), torch.cat([_ar(50, 2), _ar(50, 2)], 1)),
    "left_padding": (
        torch.cat([torch.full((2, 9), -1), _ar(40, 2)], 1),
        torch.cat([torch.full((2, 9), -1), _ar(40, 2)], 1),
    ),
    "decode_row": (torch.tensor([[60], [3]]), torch.cat([_ar(61, 2), torch.full((2, 20), -1)], 1)),
    "random": (_random_positions(3, 70, 0), _random_positions(3, 90, 1)),
    "long_rows": (_ar(300), _ar(300)),  # several chunks of columns per program
}


@pytest.mark.parametrize("by_key", [False, True], ids=["by_query", "by_key"])
@pytest.mark.parametrize("blocks", [(16, 16), (16, 32), (32, 16), (64, 128)], ids=lambda b: f"{b[0]}x{b[1]}")
@pytest.mark.parametrize("layout", list(_LAYOUTS))
def test_kernel_equals_reference(layout, blocks, by_key):
    q_pos, k_pos = _LAYOUTS[layout]
    _same_schedule(q_pos, k_pos, *blocks, by_key)


def test_chunks_of_columns():
    # 300 keys in 2-key tiles: 150 columns, more than one chunk at any block size the launcher picks.
    pos = _ar(300)
    want = _same_schedule(pos, pos, 16, 2, False)
    assert want[0].sum() > 0 and want[2].sum() > 0
    _same_schedule(pos, pos, 2, 16, True)


def _wide_rows(pos, extra, fill):
    """``pos`` as the ``[:, :n]`` view of a wider buffer (a decode cache's), the unused tail ``fill``."""
    buf = torch.full((pos.shape[0], pos.shape[1] + extra), fill, dtype=torch.int32, device=DEV)
    buf[:, : pos.shape[1]] = pos.to(DEV)
    return buf[:, : pos.shape[1]]


@pytest.mark.parametrize("by_key", [False, True], ids=["by_query", "by_key"])
@pytest.mark.parametrize("layout", ["two_segment_log", "left_padding", "decode_row"])
def test_row_strided_positions(layout, by_key):
    # Batch rows at a stride (the decode cache's views) read in place: the same lists as contiguous rows.
    # The tails past each row hold -1 and large positions: a kernel that ignored the row stride would read them.
    q_pos, k_pos = _LAYOUTS[layout]
    for fill in (-1, 10**6):
        qv, kv = _wide_rows(q_pos, 5, fill), _wide_rows(k_pos, 11, fill)
        assert not qv.is_contiguous() and not kv.is_contiguous()
        for blocks in ((16, 16), (32, 16)):
            want = _same_schedule(qv, kv, *blocks, by_key)  # the kernel on the views vs the reference
            contiguous = tile_schedule_reference(q_pos, k_pos, *blocks, by_key=by_key)
            assert all(torch.equal(x, y) for x, y in zip(want, contiguous))


def test_positions_int32_copies_only_what_it_must():
    from tcopilot.kernels.log_attention.schedule import positions_int32

    buf = torch.full((3, 20), -1, dtype=torch.int32)
    buf[:, :12] = torch.arange(12)
    q, k = buf[:, 4:5], buf[:, :12]  # a decode step: one query, the filled part of the cache
    q32, k32 = positions_int32(q, k)
    assert q32.data_ptr() == q.data_ptr() and q32.stride() == q.stride()
    assert k32.data_ptr() == k.data_ptr() and k32.stride() == (20, 1)
    # Positions not adjacent within a row are made contiguous; narrower dtypes are cast.
    t = torch.arange(24, dtype=torch.int32).view(8, 3).t()
    t32, k16 = positions_int32(t, k.to(torch.int16))
    assert t32.is_contiguous() and torch.equal(t32, t)
    assert k16.dtype == torch.int32 and k16.stride(-1) == 1 and torch.equal(k16, k)
    # int64 rows at a stride: the rebase reads them as they are.
    wide = buf.long() + 2**40
    q64, k64 = positions_int32(wide[:, 4:5], wide[:, :12])
    assert torch.equal(q64, q) and torch.equal(k64, k)


def test_int64_positions_past_int32():
    # Absolute positions past 2**31 are rebased per row, as the attention launcher does.
    base = 2**40
    pos = _ar(40) + base
    want = tile_schedule_reference(_ar(40), _ar(40), 16, 16)
    got = tile_schedule(pos.to(DEV), pos.to(DEV), 16, 16)
    assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[2].cpu(), want[2])


def test_empty_sides():
    # No keys: every query block visits nothing. No queries: no rows.
    fc, fi, pc, pi = tile_schedule(_ar(20).to(DEV), torch.empty(1, 0, dtype=torch.int64, device=DEV), 16, 16)
    assert fc.tolist() == [[0, 0]] and pc.tolist() == [[0, 0]] and fi.shape == (1, 2, 0)
    fc, fi, pc, pi = tile_schedule(torch.empty(2, 0, dtype=torch.int64, device=DEV), _ar(20, 2).to(DEV), 16, 16)
    assert fc.shape == (2, 0) and fi.shape == (2, 0, 2)


@pytest.mark.gpu
@pytest.mark.skipif(not _HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("by_key", [False, True], ids=["by_query", "by_key"])
def test_gpu_realistic_sizes_every_table_tile(by_key):
    # The launchers' tile shapes at a training size: a 4096-entry two-segment log with left padding, and
    # unsorted random positions.
    from tcopilot.kernels.log_attention import triton_impl

    pos = torch.cat([torch.full((2, 100), -1), _ar(1948, 2)], 1)
    layouts = [(pos, torch.cat([pos, pos], 1)), (_random_positions(2, 3000, 5), _random_positions(2, 4100, 6))]
    tiles = {(bm, bn) for kind in ("fwd", "dkdv", "dq") for fp32 in (False, True)
             for bm, bn, _, _ in triton_impl._blocks_table(kind, fp32).values()}  # fmt: skip
    for q_pos, k_pos in layouts:
        for bm, bn in sorted(tiles):
            _same_schedule(q_pos, k_pos, bm, bn, by_key)
