"""The top-k of ``logit_capture(..., topk=K, impl="triton")``, computed inside the forward kernel's vocabulary sweep.

Contract (``Capture``, ``torch_impl._topk_lowest_id``): the K largest capped logits per row in descending order,
equal values by ascending vocabulary id, ids int64, logits in the accumulation dtype, every row (ignored rows
too). Checked against ``_topk_lowest_id`` of the logits exactly as the kernel sees them (same chunk GEMM, same
cap formula), and against ``torch.topk`` of the fp64 logits that ``reference.py`` materialises (values to a
tolerance, ids wherever the reference has no near-tie). The tuning forces several forward chunks, several
programs per chunk, partial tiles and K larger than one vocabulary tile. Runs in the Triton interpreter on a
machine without CUDA; ``TCOPILOT_POISON=1`` makes an unwritten output show up (NaN logits, id -1).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from tcopilot.kernels.logit_capture import triton_impl  # noqa: E402
from tcopilot.kernels.logit_capture.torch_impl import _topk_lowest_id  # noqa: E402
from tcopilot.kernels.logit_capture.triton_impl import (  # noqa: E402
    TOPK_MAX_IN_KERNEL,
    CaptureTuning,
    _matmul_into,
    logit_capture_triton,
)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# Forward chunks of 5 rows (N=13 -> 5/5/3), programs of 4 rows, vocabulary tiles of 16 (V=37 -> 16/16/5).
TILED = CaptureTuning(fwd_rows=5, fwd_block_m=4, fwd_block_v=16, bwd_rows=6, bwd_cols=24, bwd_block_m=4, bwd_block_v=16)
DUPLICATES = ((2, 30), (5, 20), (9, 33))  # weight row b := weight row a: equal logits at ids a < b, other tiles


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    monkeypatch.setenv("TCOPILOT_POISON", "1")


def _inputs(n, d, vocab, dtype, seed=0, ignore=(), scale=3.0, duplicates=DUPLICATES):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g) * (scale / d**0.5)
    w = torch.randn(vocab, d, generator=g)
    for a, b in duplicates:
        if b < vocab:
            w[b] = w[a]
    y = torch.randint(0, vocab, (n,), generator=g)
    y[[i for i in ignore if i < n]] = -100
    return h.to(DEV, dtype), w.to(DEV, dtype), y.to(DEV)


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _kernel_logits(h, w, softcap, rows):
    """The capped logits exactly as the forward kernel sees them: the launcher's GEMMs of ``rows``-row chunks
    (a BLAS may sum in another order for another shape) rounded to the input dtype, upcast to the accumulation
    dtype, then the kernel's cap formula (``_softcap``)."""
    n = h.shape[0]
    z = torch.empty(n, w.shape[0], dtype=h.dtype, device=h.device)
    for n0 in range(0, n, rows):
        _matmul_into(z[n0 : n0 + rows], h[n0 : n0 + rows], w.t(), accumulate=False)
    z = z.to(_acc(h.dtype))
    if softcap is not None:
        x = z / softcap
        t = torch.exp(-2.0 * x.abs())
        th = (1.0 - t) / (1.0 + t)
        z = softcap * torch.where(x >= 0, th, -th)
    return z


def _reference_logits(h, w, softcap):
    """The fp64 logits of ``reference.py``."""
    z = h.double() @ w.double().T
    return z if softcap is None else softcap * torch.tanh(z / softcap)


def _check_topk(cap, h, w, k, softcap, tol, tuning):
    n = h.shape[0]
    assert cap.topk_ids.shape == (n, k) and cap.topk_ids.dtype == torch.int64
    assert cap.topk_logits.shape == (n, k) and cap.topk_logits.dtype == _acc(h.dtype)
    assert torch.isfinite(cap.topk_logits).all(), "unwritten top-k logits"

    # 1. Exactly the lowest-id rule on the logits the kernel saw. Without softcap they are bitwise the same
    # numbers; the cap formula runs in numpy (interpreter) vs torch here, so allow an ulp on its values.
    zk = _kernel_logits(h, w, softcap, (tuning.fwd_rows if tuning else None) or n)
    ids, vals = _topk_lowest_id(zk, k)
    assert torch.equal(cap.topk_ids, ids)
    if softcap is None:
        assert torch.equal(cap.topk_logits, vals)
    else:
        torch.testing.assert_close(cap.topk_logits, vals, rtol=4e-7, atol=4e-7 * softcap)
    # the logits are those of the ids
    torch.testing.assert_close(cap.topk_logits, zk.gather(1, cap.topk_ids), rtol=4e-7, atol=1e-6)

    # 2. torch.topk of the fp64 reference logits: sorted values within the input dtype's rounding; each id
    # wherever its reference value is more than 2 tol away from its neighbours (no tie, no near tie).
    zr = _reference_logits(h, w, softcap)
    rv, ri = torch.topk(zr, min(k + 1, zr.shape[1]), dim=1)
    torch.testing.assert_close(cap.topk_logits.double(), rv[:, :k], rtol=0, atol=tol)
    gap = rv[:, :-1] - rv[:, 1:]
    inf = torch.full((n, 1), float("inf"), dtype=gap.dtype, device=gap.device)
    if rv.shape[1] == k:  # K = V: the last entry has no successor
        gap = torch.cat([gap, inf], dim=1)
    sep = (torch.cat([inf, gap[:, : k - 1]], dim=1) > 2 * tol) & (gap[:, :k] > 2 * tol)
    assert torch.equal(cap.topk_ids[sep], ri[:, :k][sep])
    return sep


# (n, vocab, k): odd sizes, K = 1, K < tile, K > tile (32 > 16), K = V, a single row
SHAPES = [(13, 37, 1), (13, 37, 5), (13, 37, 32), (1, 37, 37), (1, 100, 5), (13, 100, 20)]
TOL = {torch.float32: 1e-5, torch.float16: 1e-2}  # fp16: half an ulp of |z| < 16


@pytest.mark.parametrize("softcap", [None, 2.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n, vocab, k", SHAPES)
def test_topk_matches_lowest_id_rule_and_torch_topk(n, vocab, k, dtype, softcap):
    h, w, y = _inputs(n, 16, vocab, dtype, seed=vocab + k, ignore=(0, 6))
    cap = logit_capture_triton(h, w, y, topk=k, softcap=softcap, tuning=TILED)
    sep = _check_topk(cap, h, w, k, softcap, TOL[dtype], TILED)
    assert sep.any()


def test_topk_fp64_exact():
    h, w, y = _inputs(13, 16, 37, torch.float64, ignore=(3,))
    for softcap in (None, 1.5):
        cap = logit_capture_triton(h, w, y, topk=7, softcap=softcap, tuning=TILED)
        _check_topk(cap, h, w, 7, softcap, 1e-12, TILED)


def test_topk_default_tiling():
    """Automatic chunking and block sizes (one program for all rows, one tile for the vocabulary)."""
    h, w, y = _inputs(13, 16, 100, torch.float32, ignore=(1,))
    cap = logit_capture_triton(h, w, y, topk=8, softcap=5.0)
    _check_topk(cap, h, w, 8, 5.0, 1e-5, None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_topk_ties_lowest_id_first(dtype):
    """Exact ties: equal weight rows in different tiles, a whole row of equal logits, distinct logits that the
    softcap saturates to the same value, and ties cut by the K-th slot."""
    vocab = 37
    h, w, y = _inputs(5, 4, vocab, dtype, duplicates=())
    h[:] = 0.0
    w[:] = w.clamp(-1, 1)
    h[0, 0] = 1.0
    w[[33, 3, 17], 0] = 4.0  # row 0: z = 4 at ids 3, 17, 33 (tiles 0, 1, 2), all else < 4
    w[[36, 20], 0] = 3.0  # then z = 3 at ids 20, 36
    h[1, 1] = 1.0
    w[[8, 29], 1] = 100.0
    w[[31, 2], 1] = 200.0  # row 1 raw: 200 at 2, 31; 100 at 8, 29 -> capped at 1: all four equal 1.0
    # row 2: h = 0, every logit is 0: ids 0, 1, 2, ...
    h[3, 2] = 1.0
    w[:, 2] = -2.0
    w[[35, 1], 2] = -1.0  # row 3: the top value sits at the highest id and id 1; the rest all tie at -2
    y[4] = -100
    h[4] = h[0]  # an ignored row gets its top-k too
    for softcap, k, row0, row1 in (
        (None, 4, [3, 17, 33, 20], [2, 31, 8, 29]),
        (None, 2, [3, 17], [2, 31]),
        (1.0, 4, [3, 17, 33, 20], [2, 8, 29, 31]),
        (None, 9, [3, 17, 33, 20, 36], [2, 31, 8, 29]),
    ):
        cap = logit_capture_triton(h, w, y, topk=k, softcap=softcap, tuning=TILED)
        _check_topk(cap, h, w, k, softcap, TOL[dtype], TILED)
        assert cap.topk_ids[0, : len(row0)].tolist() == row0
        assert cap.topk_ids[1, : len(row1)].tolist() == row1
        assert cap.topk_ids[2].tolist() == list(range(k))
        assert cap.topk_ids[3].tolist() == ([1, 35] + [i for i in range(vocab) if i not in (1, 35)])[:k]
        assert torch.equal(cap.topk_ids[4], cap.topk_ids[0])


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # lse of a +inf row is NaN
def test_topk_infinite_logits():
    """fp16 logits that overflow to -inf / +inf are ranked like any other value, ties still by lowest id (the
    kernel's sentinels must lose to a real -inf)."""
    vocab = 37
    h, w, y = _inputs(2, 4, vocab, torch.float16, duplicates=())
    h[:] = 0.0
    h[0, 0], h[1, 0] = 2.0, -2.0
    w[:, 0] = -60000.0  # z = -120000 -> -inf in fp16 (row 0), +inf (row 1)
    w[[30, 11, 4], 0] = torch.tensor([3.0, 2.0, 1.0], dtype=w.dtype)
    cap = logit_capture_triton(h, w, y, topk=9, tuning=TILED)
    ids, vals = _topk_lowest_id(_kernel_logits(h, w, None, TILED.fwd_rows), 9)
    assert torch.equal(cap.topk_ids, ids) and torch.equal(cap.topk_logits, vals)
    assert cap.topk_ids[0].tolist() == [30, 11, 4, 0, 1, 2, 3, 5, 6]
    assert cap.topk_ids[1].tolist() == [0, 1, 2, 3, 5, 6, 7, 8, 9]
    assert torch.isneginf(cap.topk_logits[0, 3:]).all() and torch.isposinf(cap.topk_logits[1]).all()


def test_topk_all_rows_ignored():
    h, w, y = _inputs(6, 16, 37, torch.float32, ignore=range(6))
    cap = logit_capture_triton(h, w, y, topk=5, tuning=TILED)
    _check_topk(cap, h, w, 5, None, 1e-5, TILED)


def test_topk_at_and_above_the_in_kernel_maximum(monkeypatch):
    """K = TOPK_MAX_IN_KERNEL runs in the kernel; one more takes the torch.topk fallback, same contract."""
    calls = []

    def spy(z, k):
        calls.append(k)
        return _topk_lowest_id(z, k)

    monkeypatch.setattr(triton_impl, "_topk_lowest_id", spy)
    vocab = TOPK_MAX_IN_KERNEL + 9
    h, w, y = _inputs(3, 8, vocab, torch.float32, ignore=(1,))
    tuning = CaptureTuning(fwd_rows=2, fwd_block_m=2, fwd_block_v=64)
    for k in (TOPK_MAX_IN_KERNEL, TOPK_MAX_IN_KERNEL + 1):
        cap = logit_capture_triton(h, w, y, topk=k, tuning=tuning)
        _check_topk(cap, h, w, k, None, 1e-5, tuning)
        assert bool(calls) == (k > TOPK_MAX_IN_KERNEL)  # the torch.topk path runs only above the maximum
    # the fallback caps with torch.tanh: equal to the kernel's cap up to an ulp
    cap = logit_capture_triton(h, w, y, topk=TOPK_MAX_IN_KERNEL + 1, softcap=3.0, tuning=tuning)
    _check_topk(cap, h, w, TOPK_MAX_IN_KERNEL + 1, 3.0, 1e-5, tuning)


def _capture_and_grads(h, w, y, v, tw, k, tuning, **kw):
    leaves = [x.detach().clone().requires_grad_(True) for x in (h, w, v)]
    cap = logit_capture_triton(leaves[0], leaves[1], y, leaves[2], topk=k, token_weights=tw, tuning=tuning, **kw)
    g = torch.Generator().manual_seed(1)
    gl = torch.randn(cap.loss.shape, generator=g).to(DEV)
    gpv = torch.randn(cap.p_values.shape, generator=g).to(DEV)
    total = (cap.loss * gl).sum() + (cap.p_values * gpv).sum()
    return cap, torch.autograd.grad(total, leaves)


@pytest.mark.parametrize("tuning", [TILED, None], ids=["tiled", "default"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_topk_leaves_the_rest_of_the_capture_unchanged(dtype, tuning):
    """loss, lse, p_target, p_sq_sum, p_values and every gradient are bitwise those of topk=0."""
    h, w, y = _inputs(13, 16, 37, dtype, ignore=(2, 9))
    g = torch.Generator().manual_seed(2)
    v = torch.randn(37, 3, generator=g).to(DEV, dtype)
    tw = (torch.rand(13, generator=g) + 0.5).to(DEV)
    kw = dict(reduction="none", softcap=4.0, label_smoothing=0.1, z_loss=1e-3)
    base, g0 = _capture_and_grads(h, w, y, v, tw, 0, tuning, **kw)
    assert base.topk_ids is None and base.topk_logits is None
    for k in (1, 6, 32):
        cap, gk = _capture_and_grads(h, w, y, v, tw, k, tuning, **kw)
        for name in ("loss", "lse", "p_target", "p_sq_sum", "p_values"):
            assert torch.equal(getattr(cap, name), getattr(base, name)), name
        for name, a, b in zip(("hidden", "weight", "values"), gk, g0):
            assert torch.equal(a, b), f"d {name}"
        _check_topk(cap, h, w, k, 4.0, TOL[dtype], tuning)
