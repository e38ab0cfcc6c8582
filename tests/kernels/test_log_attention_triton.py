"""Triton log_attention (DESIGN 4.5) against an fp64 oracle: outputs and dq/dk/dv.

On machines without CUDA the kernels run under TRITON_INTERPRET=1 (set before Triton is imported), with
tiny shapes: under the interpreter every tile is 16 x 16, so L <= 64 already gives several query blocks,
key tiles and decode splits. fp32 is compared tightly, fp16 against 2x PyTorch's own fp16 error (DESIGN 6).
bf16 tl.dot is broken in the interpreter, so bf16 is tested on a GPU only.
"""

from __future__ import annotations

import os

import torch

_HAS_CUDA = torch.cuda.is_available()
if not _HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton / the kernels

import pytest  # noqa: E402

triton = pytest.importorskip("triton")

from tcopilot.kernels.log_attention import triton_impl  # noqa: E402
from tcopilot.kernels.log_attention.triton_impl import (  # noqa: E402
    log_attention_fwd,
    log_attention_triton,
)

try:
    from tcopilot.kernels.log_attention.reference import log_attention_reference
except ImportError:  # the oracle lives in another module; fall back to the materialised softmax below
    log_attention_reference = None

DEV = "cuda" if _HAS_CUDA else "cpu"


def _naive(q, k, v, q_pos, k_pos, scale):
    """Materialised masked softmax computed in the inputs' dtype ("PyTorch at this dtype")."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    vis = ((k_pos[:, None, :] >= 0) & (k_pos[:, None, :] <= q_pos[:, :, None]))[:, None]
    any_vis = vis.any(-1, keepdim=True)
    s = (q @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~vis, float("-inf")).masked_fill(~any_vis, 0.0)
    p = torch.where(any_vis, torch.softmax(s, -1), torch.zeros_like(s))
    return p @ v


def _oracle(q, k, v, q_pos, k_pos, scale):
    if log_attention_reference is not None:
        return log_attention_reference(q, k, v, q_pos=q_pos, k_pos=k_pos, scale=scale)
    return _naive(q, k, v, q_pos, k_pos, scale)


def _fwd_bwd(fn, q, k, v, do, dtype=None):
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    out.backward(do.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves]


def _inputs(b, hq, hk, lq, lk, d, dv, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, lq, d, generator=g)
    k = torch.randn(b, hk, lk, d, generator=g)
    v = torch.randn(b, hk, lk, dv, generator=g)
    do = torch.randn(b, hq, lq, dv, generator=g)
    return [t.to(DEV, dtype) for t in (q, k, v, do)]


def _check(q, k, v, do, q_pos, k_pos, *, scale=None, clean=None):
    """Triton fwd+bwd vs the fp64 oracle. ``clean`` = (k, v) to give the oracle instead of poisoned ones."""
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    q_pos, k_pos = q_pos.to(DEV), k_pos.to(DEV)
    got = _fwd_bwd(lambda a, b, c: log_attention_triton(a, b, c, q_pos, k_pos, scale), q, k, v, do)
    ko, vo = clean if clean is not None else (k, v)
    want = _fwd_bwd(lambda a, b, c: _oracle(a, b, c, q_pos, k_pos, scale), q, ko, vo, do, torch.float64)
    names = ("out", "dq", "dk", "dv")
    assert got[0].dtype == q.dtype and got[0].shape == (*q.shape[:3], v.shape[-1])
    for name, x in zip(names, got):
        assert torch.isfinite(x).all(), f"{name} has non-finite values"
    if q.dtype == torch.float32:
        for name, x, y in zip(names, got, want):
            torch.testing.assert_close(x.double(), y, atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    else:
        # DESIGN 6: error vs fp64 at most 2x PyTorch's own error at this dtype, plus a small atol.
        base = _fwd_bwd(lambda a, b, c: _naive(a, b, c, q_pos, k_pos, scale), q, ko, vo, do)
        for name, x, y, t in zip(names, got, want, base):
            err = (x.double() - y).abs().max().item()
            ref_err = (t.double() - y).abs().max().item()
            msg = f"{name}: error {err:.3e} vs torch {q.dtype} error {ref_err:.3e}"
            assert err <= 2 * ref_err + 2e-3, msg
    return got


def _ar(n, b=1, start=0):
    return torch.arange(start, start + n).repeat(b, 1)


# ------------------------------------------------------------------------------------------------ fp32


def test_causal_fp32():
    q, k, v, do = _inputs(1, 2, 2, 40, 40, 16, 16)
    _check(q, k, v, do, _ar(40), _ar(40))


def test_two_segment_log_gqa2_strided_dv_ne_d():
    # The Copilot's log: X~ positions then pooled-h positions, each sorted. q/k/v are strided views of
    # [B, L, H, D] buffers (k and v interleaved in one buffer), as a projection would produce them.
    b, hq, hk, lq, d, dv = 1, 4, 2, 40, 32, 16
    g = torch.Generator().manual_seed(1)
    q = torch.randn(b, lq, hq, d, generator=g).to(DEV).transpose(1, 2)
    kv = torch.randn(b, 2 * lq, hk, d + dv, generator=g).to(DEV)
    k, v = kv[..., :d].transpose(1, 2), kv[..., d:].transpose(1, 2)
    do = torch.randn(b, hq, lq, dv, generator=g).to(DEV)
    assert not q.is_contiguous() and not k.is_contiguous()
    _check(q, k, v, do, _ar(lq), torch.cat([_ar(lq), _ar(lq)], 1))


def test_left_padding_gqa4_empty_rows():
    # Batch row 0 left-padded by 6 (queries with negative positions see nothing), row 1 unpadded.
    b, n = 2, 36
    pos = torch.stack([torch.arange(n) - 6, torch.arange(n)])
    q, k, v, do = _inputs(b, 4, 1, n, n, 16, 16, seed=2)
    out, dq, dk, dv = _check(q, k, v, do, pos, pos)
    assert (out[0, :, :6] == 0).all() and (dq[0, :, :6] == 0).all()
    assert (dk[0, :, :6] == 0).all() and (dv[0, :, :6] == 0).all()


def test_cross_unsorted_positions_lq_ne_lk():
    # Lq != Lk and key positions in no particular order, with some padding: no causal cutoff to exploit.
    # Narrow integer position dtypes are accepted as they come.
    g = torch.Generator().manual_seed(3)
    kp = (torch.randperm(56, generator=g)[None] - 8).to(torch.int16)  # 8 padded keys scattered around
    qp = torch.randint(-2, 50, (1, 24), generator=g).to(torch.int8)
    q, k, v, do = _inputs(1, 2, 1, 24, 56, 16, 32, seed=3)
    _check(q, k, v, do, qp, kp, scale=0.3)


def test_positions_past_int32():
    # Absolute positions of a long stream: int64 values past 2**31 (the kernels compare int32, so each row
    # is shifted by its smallest valid key position), a row with padding and a query before every key,
    # and int32 positions at the very top of their range (no clamp may merge 2**31 - 2 with 2**31 - 1).
    base = 2**31 + 3
    kp = torch.stack([torch.arange(base, base + 40), torch.arange(40) - 5])
    qp = torch.stack([torch.arange(base + 5, base + 29), torch.arange(-3, 21)])
    qp[0, 0] = base - 1  # before every key of its row: sees nothing
    q, k, v, do = _inputs(2, 2, 1, 24, 40, 16, 16, seed=11)
    got = _check(q, k, v, do, qp, kp)
    assert (got[0][0, :, 0] == 0).all()
    top = 2**31 - 1
    kp32 = torch.tensor([[top - 3, top - 2, top - 1, top, 5, -1, 0, top - 2]], dtype=torch.int32)
    qp32 = torch.tensor([[top - 2, top - 1, top, 4, -7, top - 3]], dtype=torch.int32)
    q, k, v, do = _inputs(1, 1, 1, 6, 8, 16, 16, seed=12)
    _check(q, k, v, do, qp32, kp32)


def test_non_power_of_two_head_dims():
    q, k, v, do = _inputs(1, 2, 1, 20, 20, 24, 40, seed=4)
    _check(q, k, v, do, _ar(20), _ar(20))


# ------------------------------------------------------------------------------------------------ decode


def test_decode_split_k_gqa_padding():
    # Lq = 1 against a 64-key cache: split-K over 4 key tiles, GQA rows packed, one query sees nothing.
    b, hq, hk, lk = 3, 4, 2, 64
    q, k, v, do = _inputs(b, hq, hk, 1, lk, 16, 32, seed=5)
    kp = torch.stack([torch.arange(lk), torch.arange(lk) - 10, torch.arange(lk)])
    qp = torch.tensor([[63], [20], [-1]])
    out, lse = log_attention_fwd(q, k, v, qp.to(DEV, torch.int32), kp.to(DEV, torch.int32), 0.25,
                                 decode=True, num_splits=4)  # fmt: skip
    want = _oracle(q.double(), k.double(), v.double(), qp.to(DEV), kp.to(DEV), 0.25)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    assert torch.isinf(lse[2]).all() and torch.isfinite(lse[:2]).all()
    # The regular kernel on a single query row gives the same output and lse.
    out2, lse2 = log_attention_fwd(q, k, v, qp.to(DEV, torch.int32), kp.to(DEV, torch.int32), 0.25,
                                   decode=False)  # fmt: skip
    torch.testing.assert_close(out2, out, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lse2, lse, atol=1e-6, rtol=1e-6)
    # Through autograd: the default path for Lq = 1 is split-K, the backward the normal kernels.
    got = _check(q, k, v, do, qp, kp)
    assert (got[0][2] == 0).all() and (got[1][2] == 0).all()


def test_decode_small_lq_uneven_splits():
    # Lq = 3 queries x 4 heads per kv head = 12 packed rows; 5 key tiles over 2 splits (3 + 2 tiles).
    q, k, v, do = _inputs(1, 4, 1, 3, 72, 16, 16, seed=6)
    qp, kp = torch.tensor([[40, 55, 71]]), _ar(72)
    out, _ = log_attention_fwd(q, k, v, qp.to(DEV, torch.int32), kp.to(DEV, torch.int32), 0.25,
                               decode=True, num_splits=2)  # fmt: skip
    want = _oracle(q.double(), k.double(), v.double(), qp.to(DEV), kp.to(DEV), 0.25)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ strided positions


def _wide_rows(pos, extra, fill=-1):
    """int32 ``pos`` as the ``[:, :n]`` view of a wider buffer, the unused tail ``fill``: what a decode cache
    hands over (at B > 1 not contiguous: the row stride is the buffer's capacity)."""
    buf = torch.full((pos.shape[0], pos.shape[1] + extra), fill, dtype=torch.int32, device=DEV)
    buf[:, : pos.shape[1]] = pos.to(DEV)
    return buf[:, : pos.shape[1]]


def _assert_same(got, want):
    for name, x, y in zip(("out", "dq", "dk", "dv"), got, want):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_row_strided_positions_equal_contiguous(dtype):
    # The kernels read positions at their batch-row stride, in place: forward and dq/dk/dv bit for bit the
    # contiguous result. A kernel that assumed contiguous rows would read the next row's start or the tail
    # (-1 in k_pos, as in a cache's unused slots; a large position in q_pos) and differ.
    b, lq, lk = 2, 24, 40
    q, k, v, do = _inputs(b, 4, 2, lq, lk, 16, 16, dtype=dtype, seed=15)
    qp = torch.stack([torch.arange(lq) + 16, torch.arange(lq) - 3])
    kp = torch.cat([torch.stack([torch.arange(20), torch.arange(20) - 5])] * 2, 1)  # two-segment log, padded
    qv, kv = _wide_rows(qp, 9, fill=10**6), _wide_rows(kp, 13)
    assert not qv.is_contiguous() and not kv.is_contiguous()

    def run(q_pos, k_pos):
        return _fwd_bwd(lambda a, b, c: log_attention_triton(a, b, c, q_pos, k_pos, 0.25), q, k, v, do)

    want = _check(q, k, v, do, qp, kp, scale=0.25)  # the contiguous result, itself against the oracle
    _assert_same(run(qv, kv), want)
    # One row of positions broadcast over the batch (row stride 0) is read in place too.
    shared = torch.arange(lq, dtype=torch.int32, device=DEV)
    _assert_same(run(shared.expand(b, lq), kv), run(shared.expand(b, lq).contiguous(), kv.contiguous()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_row_strided_positions_decode(monkeypatch, dtype):
    # Lq = 1 against a cache, as a Copilot decode step passes it: the query positions a column of a wider
    # buffer, the keys the filled part of the cache. Split-K forward, then the regular backward kernels.
    b, lk = 3, 50
    q, k, v, do = _inputs(b, 4, 2, 1, lk, 16, 16, dtype=dtype, seed=16)
    kp = torch.stack([torch.arange(lk), torch.arange(lk) - 10, torch.arange(lk)])
    qbuf = torch.tensor([[3, 49, 0], [7, 30, 1], [9, -1, 2]], dtype=torch.int32, device=DEV)
    qv, kv = qbuf[:, 1:2], _wide_rows(kp, 14)
    assert qv.stride(0) == 3 and not kv.is_contiguous()
    qc, kc = qv.contiguous(), kv.contiguous()
    want = log_attention_fwd(q, k, v, qc, kc, 0.25, decode=True, num_splits=3)
    got = log_attention_fwd(q, k, v, qv, kv, 0.25, decode=True, num_splits=3)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    counter = _LaunchCounter(triton_impl._log_attention_decode_kernel)
    monkeypatch.setattr(triton_impl, "_log_attention_decode_kernel", counter)
    want = _check(q, k, v, do, qc, kc, scale=0.25)
    got = _fwd_bwd(lambda a, b, c: log_attention_triton(a, b, c, qv, kv, 0.25), q, k, v, do)
    assert counter.launches == 2  # both took the split-K forward
    _assert_same(got, want)
    assert (got[0][2] == 0).all()  # the query at -1 sees nothing


class _LaunchCounter:
    """Stands in for a @triton.jit kernel in the launcher's module: counts ``kernel[grid](...)`` launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


@pytest.mark.parametrize(
    ("lq", "hq", "d", "decode"),
    [
        (8, 4, 128, False),  # fp32, 32 packed rows at head dim 128: the regular forward kernel
        (1, 2, 256, False),  # fp32 at head dim 256, even a single row: the regular forward kernel
        (1, 4, 128, True),  # 16 packed rows at 128 stay split-K
        (16, 4, 64, True),  # 64 packed rows at 64 stay split-K (32-key tiles on CUDA)
    ],
)
def test_fp32_decode_routing(monkeypatch, lq, hq, d, decode):
    # fp32 split-K spills registers on sm_90 past 16 packed rows at head dim 128 and at any row count at 256
    # (benchmarks/results/sm90-compile.md), so those shapes take the regular kernels; results must not change.
    assert triton_impl._use_decode(lq, hq, d, torch.float32) == decode
    assert triton_impl._use_decode(lq, hq, d, torch.bfloat16)  # half precision: always split-K here
    q, k, v, do = _inputs(1, hq, 1, lq, 48, d, d, seed=14)
    qp, kp = torch.arange(30, 30 + lq)[None], _ar(48)
    counter = _LaunchCounter(triton_impl._log_attention_decode_kernel)
    monkeypatch.setattr(triton_impl, "_log_attention_decode_kernel", counter)
    out = _check(q, k, v, do, qp, kp)[0]  # default routing, forward and backward against the fp64 oracle
    assert counter.launches == int(decode)
    # The other path gives the same output and lse.
    args = (q, k, v, qp.to(DEV, torch.int32), kp.to(DEV, torch.int32), d**-0.5)
    out_d, lse_d = log_attention_fwd(*args, decode=True, num_splits=2)
    out_r, lse_r = log_attention_fwd(*args, decode=False)
    torch.testing.assert_close(out_d, out_r, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lse_d, lse_r, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out, out_r, atol=1e-6, rtol=1e-6)
    if not _HAS_CUDA:
        # bf16 runs in fp32 under the interpreter but is routed as bf16 (split-K), as on a GPU.
        counter.launches = 0
        log_attention_triton(q.bfloat16(), k.bfloat16(), v.bfloat16(), qp, kp, d**-0.5)
        assert counter.launches == 1


def test_autotune_candidates():
    # Every kernel / head dim / precision keeps at least two candidates and its table default (the launch
    # of TCOPILOT_AUTOTUNE=0); the 4-warp candidates that spilled on sm_90 are gone where 8 warps do not.
    for kind in ("fwd", "dkdv", "dq"):
        for fp32 in (False, True):
            dtype = torch.float32 if fp32 else torch.float16
            for dim, (_, _, warps, stages) in triton_impl._blocks_table(kind, fp32).items():
                got = [(c.num_warps, c.num_stages) for c in triton_impl._tune_configs(kind, dim, dtype)]
                assert len(got) >= 2 and (warps, stages) in got, (kind, fp32, dim, got)
                assert len(set(got)) == len(got)
    assert all(c.num_warps == 8 for c in triton_impl._tune_configs("fwd", 128, torch.bfloat16))
    assert all(c.num_warps == 8 for c in triton_impl._tune_configs("dkdv", 64, torch.float16))
    assert len(triton_impl._tune_configs("dq", 64, torch.bfloat16)) == 6


# ------------------------------------------------------------------------------------------------ skipping


def test_masked_tiles_are_never_read():
    # Keys 32..63 are invisible to every query (positions 0..31): their tiles must be skipped, so NaN
    # there cannot reach the output or gradients. Padded keys (negative positions) inside a visited tile
    # are never read either.
    q, k, v, do = _inputs(1, 2, 1, 32, 64, 16, 16, seed=7)
    kp = _ar(64)
    kp[0, :3] = -1
    ko, vo = k.clone(), v.clone()
    for t in (k, v):
        t[:, :, 32:] = float("nan")
        t[:, :, :3] = float("nan")
    out, dq, dk, dv = _check(q, k, v, do, _ar(32), kp, clean=(ko, vo))
    assert (dk[:, :, 32:] == 0).all() and (dv[:, :, :3] == 0).all()
    # Same for the split-K decode path (a query at position 20: tiles 2 and 3 are invisible).
    out, _ = log_attention_fwd(q[:, :, :1], k, v, torch.tensor([[20]], dtype=torch.int32, device=DEV),
                               kp.to(DEV, torch.int32), 0.25, decode=True, num_splits=4)  # fmt: skip
    want = _oracle(q[:, :, :1].double(), ko.double(), vo.double(), torch.tensor([[20]], device=DEV),
                   kp.to(DEV), 0.25)  # fmt: skip
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)


def _torch_ops_outside_triton(fn):
    """The aten ops ``fn`` issues, leaving out those the Triton interpreter issues to run the kernels."""
    import collections
    import sys

    from torch.utils._python_dispatch import TorchDispatchMode

    class _Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            frame = sys._getframe(1)
            while frame is not None and "triton" + os.sep + "runtime" not in frame.f_code.co_filename:
                frame = frame.f_back
            if frame is None:
                self.ops[func.__name__] += 1
            return func(*args, **(kwargs or {}))

    with _Count() as counter:
        result = fn()
    return result, counter.ops


@pytest.mark.skipif(_HAS_CUDA, reason="counts the ops around the interpreter's launches")
@pytest.mark.skipif(os.environ.get("TCOPILOT_TEST_POISON_EMPTY") == "1",
                    reason="counts ops, and TCOPILOT_TEST_POISON_EMPTY adds a fill to every allocation")
@pytest.mark.parametrize("layout", ["contiguous", "row_strided"])
def test_launchers_issue_only_allocations(layout):
    # With int32 positions (what the Copilot passes) a forward and a backward launch allocate their outputs
    # and launch kernels, nothing else: the tile schedule is one kernel, not ~25 small torch ops per launch
    # (a 16-layer Copilot's training step makes ~100 such launches). Row-strided positions (a decode cache's
    # views of its buffers) are read in place: no copy either, at every attention of every decode step.
    q, k, v, do = _inputs(2, 4, 2, 40, 80, 16, 16)
    pos = _ar(40, 2).to(torch.int32)
    k_pos = torch.cat([pos, pos], 1)
    if layout == "row_strided":
        pos, k_pos = _wide_rows(pos, 8), _wide_rows(k_pos, 24)
        assert not pos.is_contiguous() and not k_pos.is_contiguous()
    allocations = {"empty.memory_format", "full.default", "detach.default"}
    (out, lse), fwd_ops = _torch_ops_outside_triton(
        lambda: triton_impl.log_attention_fwd(q, k, v, pos, k_pos, 0.25, decode=False)
    )
    _, bwd_ops = _torch_ops_outside_triton(
        lambda: triton_impl.log_attention_bwd(do, q, k, v, out, lse, pos, k_pos, 0.25)
    )
    q1, pos1 = q[:, :, :1], pos[:, :1]
    _, decode_ops = _torch_ops_outside_triton(
        lambda: triton_impl.log_attention_fwd(q1, k, v, pos1, k_pos, 0.25, decode=True)
    )
    for ops in (fwd_ops, bwd_ops, decode_ops):
        assert set(ops) <= allocations, ops
    assert sum(fwd_ops.values()) <= 6 and sum(bwd_ops.values()) <= 12, (fwd_ops, bwd_ops)
    assert sum(decode_ops.values()) <= 5, decode_ops
    # The whole Triton entry point, positions preparation included (no autograd: a decode step).
    with torch.no_grad():
        _, ops = _torch_ops_outside_triton(lambda: log_attention_triton(q, k, v, pos, k_pos, 0.25))
    assert set(ops) <= allocations, ops


@pytest.mark.skipif(_HAS_CUDA, reason="the Copilot runs on CPU tensors here: the interpreter's variant")
def test_copilot_decode_step_reads_cache_positions_in_place(monkeypatch):
    # A Copilot attention layer decoding at B = 2 from its dynamic cache: the cache hands over views of its
    # buffers (pos[:, :n], row stride = capacity), which the Triton attention reads without copying them.
    # Outputs are the PyTorch path's.
    from tcopilot import CopilotConfig, copilot

    cfg = CopilotConfig(vocab_size=30, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, attention_impl="triton")  # fmt: skip
    torch.manual_seed(0)
    layer = copilot.CopilotAttention(cfg, is_log_layer=False).eval()
    calls, attend = [], copilot.log_attention

    def spy(q, k, v, *, q_pos, k_pos, impl):
        out, ops = _torch_ops_outside_triton(lambda: attend(q, k, v, q_pos=q_pos, k_pos=k_pos, impl=impl))
        calls.append((k_pos, ops))
        return out

    monkeypatch.setattr(copilot, "log_attention", spy)
    b, n = 2, 7
    pos = torch.stack([torch.arange(n + 2), torch.arange(n + 2) - 2]).to(torch.int32)  # row 1 left-padded
    x = torch.randn(b, n + 2, 32)
    outs = {}
    with torch.no_grad():
        for impl in ("triton", "torch"):
            layer.impl, cache = impl, copilot._KV(reserve=24)
            outs[impl] = [layer(x[:, :n], pos[:, :n], x[:, :n], pos[:, :n], cache)]
            for t in (n, n + 1):  # two decode steps
                outs[impl].append(layer(x[:, t : t + 1], pos[:, t : t + 1], x[:, t : t + 1], pos[:, t : t + 1], cache))
    for k_pos, ops in calls[1:3]:  # the Triton decode steps
        assert k_pos.stride(0) == 24 and not k_pos.is_contiguous()
        assert set(ops) <= {"empty.memory_format", "full.default"}, ops
    for got, want in zip(outs["triton"], outs["torch"]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ fp16


def test_fp16_two_segment_gqa2():
    q, k, v, do = _inputs(1, 4, 2, 32, 64, 32, 32, dtype=torch.float16, seed=8)
    _check(q, k, v, do, _ar(32), torch.cat([_ar(32), _ar(32)], 1))


def test_fp16_decode():
    q, k, v, do = _inputs(2, 2, 1, 1, 48, 16, 16, dtype=torch.float16, seed=9)
    _check(q, k, v, do, torch.tensor([[47], [30]]), _ar(48, 2))


# ------------------------------------------------------------------------------------------------ api, errors


def test_public_api_dispatches_to_triton():
    from tcopilot.kernels.log_attention.api import log_attention

    q, k, v, _ = _inputs(1, 2, 1, 16, 32, 16, 16, seed=10)
    pos = _ar(16).to(DEV)
    out = log_attention(q, k, v, q_pos=pos, k_pos=torch.cat([pos, pos], 1), impl="triton")
    want = _oracle(q.double(), k.double(), v.double(), pos, torch.cat([pos, pos], 1), 0.25)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(_HAS_CUDA, reason="the interpreter's bf16 workaround; bf16 on a GPU is tested below")
def test_bf16_under_interpreter_runs_in_fp32():
    q, k, v, _ = _inputs(1, 2, 1, 16, 16, 16, 16, dtype=torch.bfloat16, seed=11)
    out = log_attention_triton(q, k, v, _ar(16), _ar(16), 0.25)
    want = _oracle(q.double(), k.double(), v.double(), _ar(16), _ar(16), 0.25)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), want, atol=1e-2, rtol=1e-2)


def test_unsupported_inputs_raise():
    q = torch.zeros(1, 1, 4, 16, dtype=torch.float64, device=DEV)
    pos = _ar(4).to(DEV)
    with pytest.raises(ValueError, match="float64"):
        log_attention_triton(q, q, q, pos, pos, 0.25)
    q = torch.zeros(1, 1, 4, 512, device=DEV)
    with pytest.raises(ValueError, match="head dim"):
        log_attention_triton(q, q, q, pos, pos, 0.25)


# ------------------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
@pytest.mark.skipif(not _HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_realistic_two_segment(d, dtype):
    # Copilot-like: B=2, 8 query heads over 2 kv heads, L=1000 (ragged), the log is 2L keys, left padding.
    b, hq, hk, lq = 2, 8, 2, 1000
    q, k, v, do = _inputs(b, hq, hk, lq, 2 * lq, d, d, dtype=dtype, seed=12)
    qp = torch.stack([torch.arange(lq), torch.arange(lq) - 37])
    _check(q, k, v, do, qp, torch.cat([qp, qp], 1))


@pytest.mark.gpu
@pytest.mark.skipif(not _HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("group", [1, 4])
def test_gpu_decode_long_cache(group):
    b, hk, lk = 4, 2, 8192
    q, k, v, do = _inputs(b, hk * group, hk, 1, lk, 128, 128, dtype=torch.bfloat16, seed=13)
    qp = torch.tensor([[8191], [4000], [17], [-1]])
    kp = torch.cat([_ar(lk // 2, b), _ar(lk // 2, b)], 1)
    _check(q, k, v, do, qp, kp)
