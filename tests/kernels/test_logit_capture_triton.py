"""Triton kernels of ``logit_capture`` against the naive oracle ``logit_capture_reference``.

On a machine without CUDA the kernels run in the Triton interpreter (numpy, sequential): the environment
variable is set here, before anything imports Triton, so CI on CPU runs these tests. Shapes stay tiny and
the chunking is forced small (``SMALL``) so that every test still crosses several forward chunks, several
vocabulary chunks and token blocks in the backward, and masked (partial) tiles. ``TCOPILOT_POISON=1`` (set
for every test of this module) makes the launchers fill their outputs with NaN first, so an entry a kernel
forgot to write fails the comparison. Small bf16 checks run in the interpreter too (the kernels use no
``tl.dot``); realistic shapes and > 2**31-element buffers run only on a GPU (``-m gpu``).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from tcopilot.kernels.logit_capture.reference import logit_capture_reference  # noqa: E402
from tcopilot.kernels.logit_capture.triton_impl import (  # noqa: E402
    CaptureTuning,
    logit_capture_triton,
    plan_bwd_block,
    plan_fwd_rows,
)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# Several chunks and partial tiles everywhere: V=257 -> forward tiles of 64 (last one masked), backward
# vocabulary chunks 96/96/65; N=13 -> forward chunks 5/5/3, backward token blocks 6/6/1.
SMALL = CaptureTuning(
    fwd_rows=5, bwd_rows=6, bwd_cols=96, fwd_block_m=4, fwd_block_v=64, bwd_block_m=4, bwd_block_v=64
)
FIELDS = ("loss", "lse", "p_target", "p_sq_sum", "p_values", "topk_logits")


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    monkeypatch.setenv("TCOPILOT_POISON", "1")


def _inputs(n, d, vocab, k, dtype, seed=0, ignore=(), scale=3.0, values_dtype=None):
    """Logits of std ``scale`` (peaked enough that p_target spans (0, 1)); labels with ``ignore`` rows."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g) * (scale / d**0.5)
    w = torch.randn(vocab, d, generator=g)
    v = torch.randn(vocab, k, generator=g) if k else None
    y = torch.randint(0, vocab, (n,), generator=g)
    y[list(ignore)] = -100
    tw = torch.rand(n, generator=g) + 0.5
    gl = torch.randn(n, generator=g)
    gpv = torch.randn(n, k, generator=g) if k else None
    h, w = h.to(DEV, dtype), w.to(DEV, dtype)
    v = v.to(DEV, values_dtype or dtype) if v is not None else None
    return h, w, y.to(DEV), v, tw.to(DEV), gl.to(DEV), (gpv.to(DEV) if gpv is not None else None)


def _grads(cap, leaves, gl, gpv, reduction):
    """Gradients of ``sum(loss * gl) + sum(p_values * gpv)`` (random upstream grads) w.r.t. ``leaves``."""
    total = (cap.loss * gl).sum() if reduction == "none" else cap.loss * 1.7
    if gpv is not None and cap.p_values is not None:
        total = total + (cap.p_values * gpv.to(cap.p_values.dtype)).sum()
    wanted = [x for x in leaves if x is not None and x.requires_grad]
    got = torch.autograd.grad(total, wanted, allow_unused=True)
    it = iter(got)
    return [next(it) if (x is not None and x.requires_grad) else None for x in leaves]


def _leaf(x, dtype=None, grad=True):
    if x is None:
        return None
    return x.detach().to(dtype or x.dtype).requires_grad_(grad)


def _run_pair(h, w, y, v, tw, gl, gpv, *, tuning=SMALL, grad_hw=True, grad_v=True, **kw):
    """Kernel on the given dtype, oracle in fp64 on the same values; returns both captures and gradients."""
    red = kw.get("reduction", "mean")
    leaves = [_leaf(h, grad=grad_hw), _leaf(w, grad=grad_hw), _leaf(v, grad=grad_v)]
    ref_leaves = [_leaf(x, torch.float64, x.requires_grad) if x is not None else None for x in leaves]
    if "token_weights" in kw and kw["token_weights"] is not None:
        kw["token_weights"] = tw
    cap = logit_capture_triton(leaves[0], leaves[1], y, leaves[2], tuning=tuning, **kw)
    ref = logit_capture_reference(ref_leaves[0], ref_leaves[1], y, ref_leaves[2], **kw)
    g = _grads(cap, leaves, gl, gpv, red)
    gr = _grads(ref, ref_leaves, gl.double(), gpv.double() if gpv is not None else None, red)
    return cap, ref, g, gr


def _assert_fields(cap, ref, rtol, atol):
    for name in FIELDS:
        a, b = getattr(cap, name), getattr(ref, name)
        assert (a is None) == (b is None), name
        if a is None:
            continue
        assert torch.isfinite(a).all(), f"{name}: non-finite entries (unwritten?)"
        torch.testing.assert_close(a.double(), b, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")
    if ref.topk_ids is not None:
        assert torch.equal(cap.topk_ids, ref.topk_ids)


def _assert_grads(g, gr, rtol, atol):
    for name, a, b in zip(("hidden", "weight", "values"), g, gr):
        assert (a is None) == (b is None), name
        if a is None:
            continue
        assert torch.isfinite(a).all(), f"d {name}: non-finite entries"
        torch.testing.assert_close(a.double(), b, rtol=rtol, atol=atol, msg=lambda m, n=name: f"d {n}: {m}")


# ---------------------------------------------------------------------------------------------------------
# fp32 / fp64: tight
# ---------------------------------------------------------------------------------------------------------

OPTIONS = {
    "plain": dict(),
    "all": dict(softcap=4.0, label_smoothing=0.1, z_loss=1e-3, token_weights=True, topk=4),
}


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opts", list(OPTIONS))
def test_fp32_matches_reference(reduction, opts):
    h, w, y, v, tw, gl, gpv = _inputs(13, 63, 257, 5, torch.float32, ignore=(2, 7))
    cap, ref, g, gr = _run_pair(h, w, y, v, tw, gl, gpv, reduction=reduction, **OPTIONS[opts])
    assert cap.lse.dtype == torch.float32 and cap.p_values.dtype == torch.float32
    assert cap.p_target[2] == 0 and cap.p_target[7] == 0
    if reduction == "none":
        assert cap.loss.shape == (13,) and cap.loss[2] == 0 and cap.loss[7] == 0
    _assert_fields(cap, ref, rtol=1e-5, atol=1e-5)
    _assert_grads(g, gr, rtol=1e-5, atol=1e-5)
    assert g[0].dtype == torch.float32 and g[1].dtype == torch.float32 and g[2].dtype == torch.float32


def test_fp64_all_options_exact():
    """fp64 end to end (kernel statistics in fp64 too): agreement to rounding, every field and gradient."""
    h, w, y, v, tw, gl, gpv = _inputs(13, 63, 257, 5, torch.float64, ignore=(0, 12))
    cap, ref, g, gr = _run_pair(
        h,
        w,
        y,
        v,
        tw,
        gl,
        gpv,
        reduction="none",
        softcap=3.0,
        label_smoothing=0.2,
        z_loss=1e-2,
        token_weights=True,
        topk=3,
    )
    assert cap.lse.dtype == torch.float64
    _assert_fields(cap, ref, rtol=1e-12, atol=1e-12)
    _assert_grads(g, gr, rtol=1e-12, atol=1e-12)


def test_fp32_large_softcap_keeps_fp32_accuracy():
    """A cap far above the logits: cap * tanh(z / cap) ~ z must keep z's fp32 accuracy. The textbook
    (1 - t) / (1 + t) form erred by ~cap * 3e-8 on every logit (3e-4 here), far outside this tolerance."""
    h, w, y, v, tw, gl, gpv = _inputs(13, 63, 257, 5, torch.float32, ignore=(5,))
    cap, ref, g, gr = _run_pair(h, w, y, v, tw, gl, gpv, reduction="mean", softcap=1e4, topk=3)
    _assert_fields(cap, ref, rtol=1e-5, atol=1e-5)
    _assert_grads(g, gr, rtol=1e-5, atol=1e-5)


def test_single_row_vocab_1000_default_chunking():
    """N=1, V=1000, d=63 with the automatic chunk plan and launch defaults."""
    h, w, y, v, tw, gl, gpv = _inputs(1, 63, 1000, 3, torch.float32)
    cap, ref, g, gr = _run_pair(h, w, y, v, tw, gl, gpv, tuning=None, reduction="mean", topk=5)
    _assert_fields(cap, ref, rtol=1e-5, atol=1e-5)
    _assert_grads(g, gr, rtol=1e-5, atol=1e-5)


def test_num_items_in_batch():
    h, w, y, v, tw, gl, gpv = _inputs(13, 63, 257, 0, torch.float32, ignore=(3,))
    for items in (40, torch.tensor(40.0, device=DEV)):
        cap, ref, g, gr = _run_pair(h, w, y, v, tw, gl, gpv, reduction="mean", num_items_in_batch=items)
        _assert_fields(cap, ref, rtol=1e-5, atol=1e-6)
        _assert_grads(g, gr, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_ignored(reduction):
    """No counted row: loss 0 (mean divides by max(count, 1)), zero loss gradients, statistics still valid."""
    n = 6
    h, w, y, v, tw, gl, gpv = _inputs(n, 63, 257, 4, torch.float32, ignore=range(n))
    cap, ref, g, gr = _run_pair(h, w, y, v, tw, gl, gpv, reduction=reduction, token_weights=True)
    assert torch.all(cap.loss == 0)
    assert torch.all(cap.p_target == 0)
    _assert_fields(cap, ref, rtol=1e-5, atol=1e-5)
    assert torch.all(g[0] == 0) and torch.all(g[1] == 0)  # only p_values feeds values
    _assert_grads(g, gr, rtol=1e-5, atol=1e-5)


def test_non_contiguous_hidden():
    """Rows of hidden with a stride that is not d (a slice of a wider tensor) and a transposed weight copy."""
    h, w, y, v, tw, gl, gpv = _inputs(13, 63, 257, 5, torch.float32, ignore=(4,))
    wide = torch.zeros(13, 2 * 63, device=DEV)
    wide[:, ::2] = h
    h_strided = wide[:, ::2]
    w_t = w.t().contiguous().t()  # column-major weight
    assert not h_strided.is_contiguous() and not w_t.is_contiguous()
    cap, ref, g, gr = _run_pair(h_strided, w_t, y, v, tw, gl, gpv, reduction="sum", softcap=5.0)
    _assert_fields(cap, ref, rtol=1e-5, atol=1e-5)
    _assert_grads(g, gr, rtol=1e-5, atol=1e-5)


def test_gradient_subsets_and_mixed_values_dtype():
    """values in another dtype than hidden (p goes to its own buffer); only values, or only hidden/weight,
    requiring a gradient; values=None."""
    h, w, y, v, tw, gl, gpv = _inputs(13, 63, 257, 5, torch.float32, ignore=(1,), values_dtype=torch.float64)
    cap, ref, g, gr = _run_pair(h, w, y, v, tw, gl, gpv, reduction="mean", label_smoothing=0.1)
    assert g[2].dtype == torch.float64
    _assert_fields(cap, ref, rtol=1e-5, atol=1e-5)
    _assert_grads(g, gr, rtol=1e-5, atol=1e-5)

    h, w, y, v, tw, gl, gpv = _inputs(13, 63, 257, 5, torch.float32, ignore=(1,))
    cap, ref, g, gr = _run_pair(h, w, y, v, tw, gl, gpv, grad_hw=False, reduction="mean", softcap=2.0)
    assert g[0] is None and g[1] is None
    _assert_grads(g, gr, rtol=1e-5, atol=1e-5)
    cap, ref, g, gr = _run_pair(h, w, y, v, tw, gl, gpv, grad_v=False, reduction="mean", z_loss=1e-2)
    assert g[2] is None
    _assert_grads(g, gr, rtol=1e-5, atol=1e-5)
    cap, ref, g, gr = _run_pair(h, w, y, None, tw, gl, None, reduction="sum")
    _assert_fields(cap, ref, rtol=1e-5, atol=1e-5)
    _assert_grads(g, gr, rtol=1e-5, atol=1e-5)


def test_chunking_does_not_change_results():
    """One block for everything vs. many small chunks: the same numbers up to fp32 summation order."""
    h, w, y, v, tw, gl, gpv = _inputs(7, 63, 100, 5, torch.float32, ignore=(5,))
    big = CaptureTuning(budget_bytes=1 << 30)
    tiny = CaptureTuning(
        fwd_rows=2, bwd_rows=3, bwd_cols=33, fwd_block_m=2, fwd_block_v=32, bwd_block_m=2, bwd_block_v=16
    )
    a, _, ga, _ = _run_pair(h, w, y, v, tw, gl, gpv, tuning=big, reduction="mean", softcap=3.0)
    b, _, gb, _ = _run_pair(h, w, y, v, tw, gl, gpv, tuning=tiny, reduction="mean", softcap=3.0)
    for name in FIELDS:
        if getattr(a, name) is not None:
            torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-6, atol=1e-6)
    for x, z in zip(ga, gb):
        torch.testing.assert_close(x, z, rtol=1e-5, atol=1e-6)


def test_topk_ties_lowest_id_first():
    """Equal logits, and distinct logits that the softcap saturates to the same value, come out in ascending
    id order (exact integer logits, so no rounding decides the order)."""
    h, w, y, v, tw, gl, gpv = _inputs(3, 16, 64, 0, torch.float32)
    h[:2] = 0.0
    h[0, 0] = h[1, 1] = 1.0
    w[:, :2] = w[:, :2].clamp(-2, 2)
    w[[40, 7, 21], 0] = 4.0  # row 0: z = 4 at ids 7, 21, 40
    w[9, 1], w[50, 1] = 1e4, 2e4  # row 1: raw order 50, 9; softcap=1 caps both to 1.0
    for softcap, first in ((None, [50, 9]), (1.0, [9, 50])):
        cap, ref, *_ = _run_pair(h, w, y, v, tw, gl, gpv, reduction="sum", topk=4, softcap=softcap)
        _assert_fields(cap, ref, rtol=1e-5, atol=1e-5)
        assert cap.topk_ids[0, :3].tolist() == [7, 21, 40]
        assert cap.topk_ids[1, :2].tolist() == first


def test_api_dispatches_to_triton():
    import tcopilot

    h, w, y, v, *_ = _inputs(4, 16, 50, 3, torch.float32)
    cap = tcopilot.logit_capture(h, w, y, v, impl="triton", topk=2)
    ref = logit_capture_reference(h.double(), w.double(), y, v.double(), topk=2)
    _assert_fields(cap, ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# fp16: error against fp64 at most 2x PyTorch's own fp16 error (DESIGN 6)
# ---------------------------------------------------------------------------------------------------------


def _eager_lowp(h, w, y, v, **kw):
    """What plain PyTorch does at low precision: the logits GEMM in fp16/bf16 and the statistics in fp32 (the
    oracle on those logits through an identity head, so gradients still flow into h and w through the
    low-precision GEMM), and ``softmax(z).to(dtype) @ values`` in the low dtype."""
    z = h @ w.t()
    eye = torch.eye(w.shape[0], device=h.device, dtype=torch.float32)
    cap = logit_capture_reference(z.float(), eye, y, None, **kw)
    if v is not None:
        zc = z.detach().float()
        if kw.get("softcap") is not None:
            zc = kw["softcap"] * torch.tanh(zc / kw["softcap"])
        cap = cap._replace(p_values=(torch.softmax(zc, dim=1).to(v.dtype) @ v).float())
    return cap


def _lowp_check(dtype, n, d, vocab, k, tuning, **kw):
    red = kw.get("reduction", "mean")
    # The Triton interpreter truncates fp32 -> bf16 casts (measured: 1.9x the mean error of round-to-nearest;
    # fp16 is rounded correctly), so bf16 kernel outputs stored by a kernel get a looser factor there only.
    factor = 3.0 if (dtype == torch.bfloat16 and not torch.cuda.is_available()) else 2.0
    h, w, y, v, tw, gl, gpv = _inputs(n, d, vocab, k, dtype, ignore=(1,))
    if kw.get("token_weights"):
        kw["token_weights"] = tw
    leaves = [_leaf(h), _leaf(w), _leaf(v)]
    exact = [_leaf(x, torch.float64) for x in leaves]
    own_leaves = [_leaf(x) for x in leaves]
    cap = logit_capture_triton(*leaves[:2], y, leaves[2], tuning=tuning, **kw)
    ref = logit_capture_reference(exact[0], exact[1], y, exact[2], **kw)
    own = _eager_lowp(own_leaves[0], own_leaves[1], y, own_leaves[2], **kw)
    g = _grads(cap, leaves, gl, gpv, red)
    gr = _grads(ref, exact, gl.double(), gpv.double(), red)
    go = _grads(own, own_leaves, gl, gpv, red)
    pairs = [
        (getattr(cap, f), getattr(ref, f), getattr(own, f), f) for f in FIELDS if getattr(ref, f) is not None
    ]
    pairs += [(a, b, c, f"d {f}") for a, b, c, f in zip(g, gr, go, ("hidden", "weight", "values"))]
    for mine, exact_v, own_v, name in pairs:
        assert torch.isfinite(mine).all(), name
        err = (mine.double() - exact_v).abs().max().item()
        own_err = (own_v.double() - exact_v).abs().max().item()
        scale = exact_v.abs().max().item()
        assert err <= factor * own_err + 1e-3 * scale + 1e-6, (
            f"{name}: error {err:.3g} vs PyTorch's own {own_err:.3g}"
        )


@pytest.mark.parametrize(("dtype", "reduction"), [(torch.float16, "mean"), (torch.bfloat16, "none")])
def test_half_within_twice_pytorch_error(dtype, reduction):
    """fp16 and bf16 (bf16 runs in the interpreter too: the kernels use no tl.dot, whose bf16 form is broken
    there; see the factor in _lowp_check). Several token blocks and vocabulary chunks, so the fp32
    accumulators of d hidden and d weight are exercised."""
    _lowp_check(
        dtype,
        13,
        63,
        257,
        5,
        SMALL,
        reduction=reduction,
        softcap=4.0,
        label_smoothing=0.1,
        z_loss=1e-3,
        token_weights=True,
    )


# ---------------------------------------------------------------------------------------------------------
# Chunk planning (pure Python)
# ---------------------------------------------------------------------------------------------------------


def test_chunk_plans_respect_the_budget():
    for n, vocab, per in [
        (8192, 131072, 2),
        (8192, 131072, 4),
        (100, 32000, 2),
        (1, 262144, 2),
        (65536, 50257, 4),
    ]:
        budget = max(int(0.02 * n * vocab * 2), 32 << 20)
        t = plan_fwd_rows(n, vocab, per)
        assert 1 <= t <= n and (t == 1 or t * vocab * per <= budget)
        tb, vc = plan_bwd_block(n, vocab, per)
        assert 1 <= tb <= n and 1 <= vc <= vocab and tb * vc * per <= budget
    # small problems: one block, so d weight and d values are single GEMMs without accumulators
    assert plan_bwd_block(100, 32000, 2) == (100, 32000)
    # realistic: all rows per vocabulary chunk (only d hidden is accumulated), chunks of >= 1024 columns
    tb, vc = plan_bwd_block(8192, 131072, 2)
    assert tb == 8192 and 1024 <= vc < 131072


# ---------------------------------------------------------------------------------------------------------
# GPU only: bf16, realistic shapes, int64 offsets
# ---------------------------------------------------------------------------------------------------------

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_realistic_shape_gpu(dtype):
    """Copilot-width values (2c+1 = 257) at a vocabulary of 32k, default chunking (several chunks forced by a
    small budget), against fp64 with 2x PyTorch's own error."""
    _lowp_check(
        dtype, 2048, 512, 32768, 257, CaptureTuning(budget_bytes=16 << 20), reduction="mean", softcap=30.0
    )


@pytest.mark.gpu
@gpu
def test_int64_offsets_gpu():
    """A chunk buffer of more than 2**31 elements: row * stride overflows int32 in the last rows."""
    n, d, vocab = 16448, 16, 131072
    h, w, y, *_ = _inputs(n, d, vocab, 0, torch.bfloat16)
    cap = logit_capture_triton(h, w, y, None, reduction="none", tuning=CaptureTuning(budget_bytes=1 << 34))
    tail = slice(n - 64, n)
    ref = logit_capture_reference(h[tail].double(), w.double(), y[tail], reduction="none")
    torch.testing.assert_close(cap.lse[tail].double(), ref.lse, rtol=0, atol=0.05)
    torch.testing.assert_close(cap.loss[tail].double(), ref.loss, rtol=0, atol=0.05)
