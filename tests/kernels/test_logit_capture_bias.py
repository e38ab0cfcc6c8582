"""``logit_capture(..., bias=b)``: logits ``hidden @ weight.T + b``, for the torch and Triton paths, against the
oracle (outputs and the gradients of hidden, weight, values and bias), and the Pilot's biased LM head.

Small odd shapes (N=13, d=7, V=101) with a tuning that gives the Triton path several forward chunks, several
vocabulary chunks and token blocks in the backward (so ``d bias`` is summed across token blocks too) and
masked tiles. The bias is of the logits' own size, so dropping it (or its gradient) fails every comparison.
Compile and autocast checks with a bias live in ``test_logit_capture_compile.py``, the argument checks in
``test_logit_capture.py`` (``BAD_INPUTS``).
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tcopilot.kernels.logit_capture import logit_capture, logit_capture_reference
from tcopilot.pilot import lm_head_operands

IGNORE = -100
N, D, V, K = 13, 7, 101, 3
DEV = "cuda" if torch.cuda.is_available() else "cpu"
RUNS_TRITON = importlib.util.find_spec("triton") is not None and (
    DEV == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
)
needs_triton = pytest.mark.skipif(not RUNS_TRITON, reason="needs Triton on CUDA, or TRITON_INTERPRET=1")
# Every result field of the capture that is a float.
FIELDS = ("loss", "lse", "p_target", "p_sq_sum", "p_values", "topk_logits")
ALL = dict(softcap=4.0, label_smoothing=0.1, z_loss=1e-3, topk=3)


def _tuning():
    from tcopilot.kernels.logit_capture.triton_impl import CaptureTuning

    # N=13, V=101: forward chunks 5/5/3, tiles of 32; backward vocabulary chunks 48/48/5 x token blocks 6/6/1.
    return CaptureTuning(
        fwd_rows=5, bwd_rows=6, bwd_cols=48, fwd_block_m=4, fwd_block_v=32, bwd_block_m=4, bwd_block_v=32
    )


def _case(n=N, dtype=torch.float32, seed=0, device=DEV):
    """Logits of O(1) spread from ``h W^T`` and a bias of std 1.5 (as large as them)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, D, generator=g) * 0.8
    w = torch.randn(V, D, generator=g) * (2.0 / D**0.5)
    b = torch.randn(V, generator=g) * 1.5
    v = torch.randn(V, K, generator=g)
    y = torch.randint(0, V, (n,), generator=g)
    if n > 2:
        y[[1, n - 2]] = IGNORE
    gl = torch.randn(n, generator=g)
    gv = torch.randn(n, K, generator=g)
    return [t.to(device, dtype) for t in (h, w, b, v)], y.to(device), gl.to(device), gv.to(device)


def _run(fn, tensors, y, gl, gv, *, values=True, bias_grad=True, **kw):
    """``fn`` on leaves made from ``tensors``; backward of ``sum(loss * gl) + sum(p_values * gv)``."""
    h, w, b, v = (t.detach().clone() for t in tensors)
    h.requires_grad_()
    w.requires_grad_()
    b.requires_grad_(bias_grad)
    v = v.requires_grad_() if values else None
    cap = fn(h, w, y, v, bias=b, **kw)
    total = (cap.loss * gl.to(cap.loss.dtype)).sum() if kw.get("reduction") == "none" else cap.loss * 1.7
    if v is not None:
        total = total + (cap.p_values * gv.to(cap.p_values.dtype)).sum()
    total.backward()
    return cap, {"hidden": h.grad, "weight": w.grad, "bias": b.grad, "values": None if v is None else v.grad}


def _impl(impl):
    if impl == "triton":
        from tcopilot.kernels.logit_capture.triton_impl import logit_capture_triton

        tuning = _tuning()
        return lambda *a, **k: logit_capture_triton(*a, tuning=tuning, **k)
    return lambda *a, **k: logit_capture(*a, impl="torch", **k)


def _close(got, want, tol, name):
    """``|got - want| <= tol * (max|want| + |want|)`` in fp64: relative to the field's scale."""
    want = want.double()
    scale = max(want.abs().max().item(), 1e-30)
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * scale, msg=lambda m: f"{name}: {m}")


def _compare(cap, grads, ref, ref_grads, tol):
    for name in FIELDS:
        a, b = getattr(cap, name), getattr(ref, name)
        assert (a is None) == (b is None), name
        if b is not None:
            assert torch.isfinite(a).all(), name
            _close(a, b, tol, name)
    if ref.topk_ids is not None:
        assert torch.equal(cap.topk_ids, ref.topk_ids)
    for name, b in ref_grads.items():
        a = grads[name]
        assert (a is None) == (b is None), f"d {name}"
        if b is not None:
            _close(a, b, tol, f"d {name}")


# fp32: summation order only. fp16: the inputs are exact in fp64 (the oracle runs on the fp16 values); what
# remains is the fp16 storage of the Triton path's chunk logits / dz and of the gradients.
TOL = {torch.float32: 2e-5, torch.float16: 4e-3}
IMPLS = ["torch", pytest.param("triton", marks=needs_triton)]
FP = {"fp32": torch.float32, "fp16": torch.float16}
# Every reduction for both dtypes on the torch path; on the (interpreted, slow) Triton path every reduction in
# fp32 and fp16 with one: the reduction is shared glue (autograd.py), the dtype decides the bias' rounding.
TRITON_CASES = (("fp32", "mean"), ("fp32", "sum"), ("fp32", "none"), ("fp16", "none"))
MATCH_CASES = [("torch", f, r) for f in FP for r in ("mean", "sum", "none")]
MATCH_CASES += [pytest.param("triton", f, r, marks=needs_triton) for f, r in TRITON_CASES]


@pytest.mark.parametrize(("impl", "fp", "reduction"), MATCH_CASES)
def test_bias_matches_reference(impl, fp, reduction):
    """Softcap, label smoothing, z-loss, top-k and values all on; the bias needs a gradient."""
    dtype = FP[fp]
    tensors, y, gl, gv = _case(dtype=dtype)
    kw = dict(ALL, reduction=reduction)
    cap, grads = _run(_impl(impl), tensors, y, gl, gv, **kw)
    ref, ref_grads = _run(logit_capture_reference, [t.double() for t in tensors], y, gl, gv, **kw)
    assert grads["bias"].dtype == dtype and grads["hidden"].dtype == dtype
    assert cap.p_target[1] == 0 and cap.p_target[N - 2] == 0
    _compare(cap, grads, ref, ref_grads, TOL[dtype])


@pytest.mark.parametrize("n", [1, N])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("impl", IMPLS)
def test_bias_without_grad_or_values(impl, dtype, n):
    """A frozen bias (``requires_grad=False``) and ``values=None``: hidden and weight still get the gradients
    of the biased logits, the bias none; N=1 included."""
    tensors, y, gl, gv = _case(n=n, dtype=dtype, seed=1)
    kw = dict(reduction="mean", label_smoothing=0.05)
    cap, grads = _run(_impl(impl), tensors, y, gl, gv, values=False, bias_grad=False, **kw)
    ref, ref_grads = _run(logit_capture_reference, [t.double() for t in tensors], y, gl, gv, values=False, **kw)
    assert grads["bias"] is None and cap.p_values is None
    ref_grads["bias"] = None
    _compare(cap, grads, ref, ref_grads, TOL[dtype])


def test_reference_bias_matches_linear_cross_entropy():
    """The oracle's bias is nn.Linear's: ``F.cross_entropy(F.linear(h, W, b))`` and its gradient in b."""
    (h, w, b, _), y, _, _ = _case(dtype=torch.float64, device="cpu")
    b1, b2 = b.clone().requires_grad_(), b.clone().requires_grad_()
    ref = logit_capture_reference(h, w, y, bias=b1, label_smoothing=0.1)
    want = F.cross_entropy(F.linear(h, w, b2), y, ignore_index=IGNORE, label_smoothing=0.1)
    torch.testing.assert_close(ref.loss, want, rtol=1e-12, atol=1e-12)
    ref.loss.backward()
    want.backward()
    torch.testing.assert_close(b1.grad, b2.grad, rtol=1e-12, atol=1e-12)
    # Not vacuous: the bias moves the loss well beyond every tolerance above.
    assert abs(logit_capture_reference(h, w, y).loss.item() - ref.loss.item()) > 0.1


@needs_triton
@pytest.mark.parametrize("bias_grad", [False, True])
def test_frozen_bias_asks_no_bias_gradient(monkeypatch, bias_grad):
    """The backward launcher is asked for ``d bias`` only when the bias requires a gradient: a frozen bias
    costs no column sums (the shared autograd glue decides this for every implementation)."""
    from tcopilot.kernels.logit_capture import triton_impl

    seen = []
    real = triton_impl.logit_capture_bwd

    def spy(*args, **kwargs):
        seen.append(kwargs["need_bias"])
        out = real(*args, **kwargs)
        assert (out[2] is not None) == kwargs["need_bias"]
        return out

    monkeypatch.setattr(triton_impl, "logit_capture_bwd", spy)
    tensors, y, gl, gv = _case(n=5)
    _, grads = _run(_impl("triton"), tensors, y, gl, gv, values=False, bias_grad=bias_grad, reduction="sum")
    assert seen == [bias_grad]
    assert (grads["bias"] is not None) == bias_grad


@pytest.mark.parametrize("scale", [None, 0.25])
def test_lm_head_operands_biased_scaled_head(scale):
    """The Pilot's biased head (Phi, GPT-J) with a logit scale (Cohere-style): ``s (h W^T + b)`` through the
    fused op equals the materialised head, loss and the gradients of h, W and b; the weight is not copied."""
    torch.manual_seed(0)
    head = nn.Linear(D, V).double()
    with torch.no_grad():
        head.bias.normal_(0.0, 1.5)
    (h, *_), y, _, _ = _case(dtype=torch.float64, device="cpu")
    h1, h2 = h.clone().requires_grad_(), h.clone().requires_grad_()
    hid, weight, bias = lm_head_operands(head, h1, scale)
    assert weight is head.weight and bias.shape == (V,)
    cap = logit_capture(hid, weight, y, bias=bias, softcap=3.0, impl="torch")
    cap.loss.backward()
    got = (h1.grad, head.weight.grad.clone(), head.bias.grad.clone())
    head.zero_grad()
    z = head(h2) * (1.0 if scale is None else scale)
    want = F.cross_entropy(3.0 * torch.tanh(z / 3.0), y, ignore_index=IGNORE)
    want.backward()
    torch.testing.assert_close(cap.loss, want, rtol=1e-12, atol=1e-12)
    for name, a, b in zip(("hidden", "weight", "bias"), got, (h2.grad, head.weight.grad, head.bias.grad)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m, n=name: f"d {n}: {m}")
    bias_free = nn.Linear(D, V, bias=False).double()
    assert lm_head_operands(bias_free, h, scale)[2] is None
