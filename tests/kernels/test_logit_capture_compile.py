"""logit_capture under torch.amp autocast, under torch.compile (the tcopilot:: custom ops), and FSDP-style inputs.

CPU only and small: autocast on the CPU (bf16 and fp16), ``torch.compile`` with the ``aot_eager`` backend (it
traces the fake implementations and the autograd formula of the custom ops, without Inductor's slow CPU
codegen), the Triton path in the interpreter (``TRITON_INTERPRET=1``, set by conftest without a GPU).
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import sys
import types

import pytest
import torch

from tcopilot.kernels.logit_capture import Capture, logit_capture, logit_capture_reference

IGNORE = -100
N, D, V, K = 11, 16, 70, 5
HAS_TRITON = importlib.util.find_spec("triton") is not None
# The CPU-tensor Triton cases run in the interpreter only (on a GPU machine the gpu-marked test covers CUDA).
needs_interpreter = pytest.mark.skipif(
    not HAS_TRITON or os.environ.get("TRITON_INTERPRET") != "1", reason="needs Triton with TRITON_INTERPRET=1"
)
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _inputs(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g, dtype=torch.float64)
    w = torch.randn(V, D, generator=g, dtype=torch.float64) * (2.0 / D**0.5)
    v = torch.randn(V, K, generator=g, dtype=torch.float64)
    y = torch.randint(0, V, (N,), generator=g)
    y[1::3] = IGNORE
    tw = torch.rand(N, generator=g, dtype=torch.float64) + 0.5
    return h.to(dtype), w.to(dtype), y, v.to(dtype), tw.to(dtype)


def _upstream(cap: Capture, seed=1):
    g = torch.Generator().manual_seed(seed)
    # drawn on the CPU (the same numbers on every device), then moved: autograd refuses a gradient on another device
    gl = torch.randn(cap.loss.shape, generator=g, dtype=torch.float64).to(cap.loss.device, cap.loss.dtype)
    gv = torch.randn(cap.p_values.shape, generator=g, dtype=torch.float64).to(cap.p_values.device, cap.p_values.dtype)
    return gl, gv


def _backward(cap: Capture, leaves):
    gl, gv = _upstream(cap)
    torch.autograd.backward([cap.loss, cap.p_values], [gl, gv])
    return [x.grad for x in leaves]


def _leaves(*ts):
    return [t.detach().clone().requires_grad_() for t in ts]


def _assert_close(got, want, rtol, atol_rel, name):
    """``|got - want| <= atol_rel * max|want| + rtol * |want|``, compared in fp64."""
    want = want.double()
    atol = atol_rel * max(want.abs().max().item(), 1e-30)
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


# ---------------------------------------------------------------------------------------------------------
# Autocast
# ---------------------------------------------------------------------------------------------------------


def _autocast_case(amp_dtype, impl, reduction="mean", **kw):
    """fp32 leaves, the capture inside ``torch.autocast("cpu", amp_dtype)``, backward outside it; and the fp64
    oracle on the inputs rounded to ``amp_dtype`` (what autocast hands the op)."""
    h, w, y, v, _ = _inputs()
    leaves = _leaves(h, w, v)
    with torch.autocast("cpu", dtype=amp_dtype):
        cap = logit_capture(leaves[0], leaves[1], y, leaves[2], reduction=reduction, impl=impl, **kw)
    grads = _backward(cap, leaves)
    exact = _leaves(*(t.to(amp_dtype).double() for t in (h, w, v)))
    ref = logit_capture_reference(exact[0], exact[1], y, exact[2], reduction=reduction, **kw)
    ref_grads = _backward(ref, exact)
    return cap, grads, ref, ref_grads


def _check_autocast(cap, grads, ref, ref_grads, stat_tol, grad_tol):
    for name in ("loss", "lse", "p_target", "p_sq_sum", "p_values", "topk_logits"):
        got, want = getattr(cap, name), getattr(ref, name)
        if want is None:
            continue
        assert got.dtype == torch.float32, (name, got.dtype)  # statistics stay fp32 under autocast
        _assert_close(got, want, stat_tol, stat_tol, name)
    if ref.topk_ids is not None:
        assert torch.equal(cap.topk_ids, ref.topk_ids)
    for name, got, want in zip(("hidden", "weight", "values"), grads, ref_grads):
        assert got.dtype == torch.float32, (name, got.dtype)  # the leaves' own dtype, not the autocast one
        _assert_close(got, want, grad_tol, grad_tol, f"d {name}")


@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16])
def test_autocast_torch_path(amp_dtype):
    cap, grads, ref, ref_grads = _autocast_case(amp_dtype, "torch", topk=3)
    # The torch path computes in fp32 from the rounded inputs: the statistics are as tight as fp32 allows,
    # which also proves that the op's own GEMMs were not recast to the autocast dtype. Gradients are stored
    # in the autocast dtype before the cast back to fp32 (bf16: 8 bits of mantissa).
    grad_tol = 1e-2 if amp_dtype == torch.bfloat16 else 2e-3
    _check_autocast(cap, grads, ref, ref_grads, stat_tol=1e-5, grad_tol=grad_tol)


@needs_interpreter
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_autocast_triton_path_fp16(reduction):
    cap, grads, ref, ref_grads = _autocast_case(torch.float16, "triton", reduction=reduction)
    # The Triton path keeps its chunk logits in the input dtype (fp16 here), as every fp16 LM head does.
    _check_autocast(cap, grads, ref, ref_grads, stat_tol=5e-3, grad_tol=1e-2)


def test_autocast_bf16_hidden_meets_fp32_weight():
    """The usual case: an autocast model hands a bf16 hidden state to an fp32 LM-head parameter."""
    h, w, y, v, _ = _inputs()
    hb, wl, vl = _leaves(h.to(torch.bfloat16), w, v)
    with pytest.raises(ValueError, match="weight: expected dtype bfloat16"):
        logit_capture(hb, wl, y, vl)  # outside autocast the dtypes must agree
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cap = logit_capture(hb, wl, y, vl)
    dh, dw, dv = _backward(cap, [hb, wl, vl])
    assert (dh.dtype, dw.dtype, dv.dtype) == (torch.bfloat16, torch.float32, torch.float32)
    assert cap.loss.dtype == cap.lse.dtype == cap.p_values.dtype == torch.float32
    exact = _leaves(hb.double(), w.to(torch.bfloat16).double(), v.to(torch.bfloat16).double())
    ref = logit_capture_reference(*exact[:2], y, exact[2])
    for name in ("loss", "lse", "p_target", "p_sq_sum", "p_values"):
        _assert_close(getattr(cap, name), getattr(ref, name), 1e-5, 1e-5, name)
    for name, got, want in zip(("hidden", "weight", "values"), (dh, dw, dv), _backward(ref, exact)):
        _assert_close(got, want, 1e-2, 1e-2, f"d {name}")


def test_autocast_leaves_fp64_alone_and_mismatches_still_raise():
    h, w, y, v, _ = _inputs(dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cap = logit_capture(h, w, y, v)  # fp64 is not an autocast dtype: nothing is cast
        with pytest.raises(ValueError, match="weight: expected dtype"):
            logit_capture(h, w.float(), y, v)  # fp64 hidden stays fp64, fp32 weight goes to bf16
    ref = logit_capture_reference(h, w, y, v)
    assert cap.lse.dtype == torch.float64
    torch.testing.assert_close(cap.lse, ref.lse, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("h_dtype", "w_dtype"),
    [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32), (torch.float16, torch.float64)],
)
def test_mismatched_dtypes_outside_autocast_raise(h_dtype, w_dtype):
    h, w, y, v, _ = _inputs()
    with pytest.raises(ValueError, match="weight: expected dtype"):
        logit_capture(h.to(h_dtype), w.to(w_dtype), y, v)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        with pytest.raises(ValueError, match="weight: expected dtype"):
            logit_capture(h.to(h_dtype), w.to(w_dtype), y, v)


def _bias(seed=5, dtype=torch.float32):
    return (torch.randn(V, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 1.5).to(dtype)


@pytest.mark.parametrize(
    ("amp_dtype", "impl"),
    [(torch.bfloat16, "torch"), pytest.param(torch.float16, "triton", marks=needs_interpreter)],
)
def test_autocast_casts_bias_like_weight(amp_dtype, impl):
    """fp32 leaves including the bias: inside autocast the bias is cast with the weight (as F.linear does),
    the op matches the oracle on the rounded inputs, and d bias comes back fp32."""
    h, w, y, v, _ = _inputs()
    b = _bias()
    leaves = _leaves(h, w, v, b)
    with torch.autocast("cpu", dtype=amp_dtype):
        cap = logit_capture(leaves[0], leaves[1], y, leaves[2], bias=leaves[3], softcap=5.0, impl=impl)
    grads = _backward(cap, leaves)
    exact = _leaves(*(t.to(amp_dtype).double() for t in (h, w, v, b)))
    ref = logit_capture_reference(exact[0], exact[1], y, exact[2], bias=exact[3], softcap=5.0)
    ref_grads = _backward(ref, exact)
    # bf16 gradients (8 bits of mantissa) before the cast back; fp16 chunk logits on the Triton path.
    stat_tol, grad_tol = (1e-5, 1e-2) if impl == "torch" else (5e-3, 1e-2)
    for name in ("loss", "lse", "p_target", "p_sq_sum", "p_values"):
        assert getattr(cap, name).dtype == torch.float32, name
        _assert_close(getattr(cap, name), getattr(ref, name), stat_tol, stat_tol, name)
    for name, got, want in zip(("hidden", "weight", "values", "bias"), grads, ref_grads):
        assert got.dtype == torch.float32, (name, got.dtype)
        _assert_close(got, want, grad_tol, grad_tol, f"d {name}")


def test_bias_dtype_follows_weight():
    """Outside autocast the bias must have the weight's dtype; inside, an fp32 bias is cast with an fp32
    weight to meet a bf16 hidden, while an fp64 bias (left alone by autocast) is refused."""
    h, w, y, v, _ = _inputs()
    hb = h.to(torch.bfloat16)
    with pytest.raises(ValueError, match="bias: expected dtype bfloat16 \\(the dtype of weight\\), got float32"):
        logit_capture(hb, w.to(torch.bfloat16), y, v, bias=_bias())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cap = logit_capture(hb, w, y, v, bias=_bias())
        with pytest.raises(ValueError, match="bias: expected dtype bfloat16.*got float64"):
            logit_capture(hb, w, y, v, bias=_bias(dtype=torch.float64))
    ref = logit_capture_reference(hb.double(), w.to(torch.bfloat16).double(), y, v, bias=_bias(dtype=torch.bfloat16))
    _assert_close(cap.loss, ref.loss, 1e-5, 1e-5, "loss")


# ---------------------------------------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------------------------------------


def _recording_backend():
    """``aot_eager`` that keeps the Dynamo graphs, to check that the op is one opaque node."""
    graphs = []
    aot_eager = torch._dynamo.lookup_backend("aot_eager")

    def backend(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    return backend, graphs


def _eager_and_compiled(fn, tensors):
    """Run ``fn(*leaves)`` eagerly and compiled (fullgraph, aot_eager); returns both (outputs, grads)."""
    backend, graphs = _recording_backend()
    compiled = torch.compile(fn, backend=backend, fullgraph=True)
    results = []
    for f in (fn, compiled):
        leaves = _leaves(*tensors)
        cap = f(*leaves)
        results.append((cap, _backward(cap, leaves)))
    # One graph, no graph break, and the capture in it as the custom op (not traced through).
    assert len(graphs) == 1
    targets = [str(node.target) for node in graphs[0].graph.nodes if node.op == "call_function"]
    assert sum(t.startswith("tcopilot.logit_capture_fwd") for t in targets) == 1, targets
    return results


def _assert_same(eager, compiled, rtol=1e-6, atol=1e-6):
    (cap_e, grads_e), (cap_c, grads_c) = eager, compiled
    assert isinstance(cap_c, Capture)
    for name, a, b in zip(Capture._fields, cap_e, cap_c):
        if a is None:
            assert b is None, name
            continue
        assert b is not None and a.dtype == b.dtype and a.shape == b.shape, name
        assert not b.requires_grad or name in ("loss", "p_values"), name
        torch.testing.assert_close(b, a, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")
    for name, a, b in zip(("hidden", "weight", "values"), grads_e, grads_c):
        torch.testing.assert_close(b, a, rtol=rtol, atol=atol, msg=lambda m, n=name: f"d {n}: {m}")


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compiled_matches_eager_torch_path(reduction):
    h, w, y, v, tw = _inputs()
    kw = dict(reduction=reduction, topk=3, softcap=5.0, token_weights=tw, impl="torch")
    if reduction == "mean":
        kw["num_items_in_batch"] = torch.tensor(9)  # a tensor: its value check runs inside the op

    def fn(h, w, v):
        return logit_capture(h, w, y, v, **kw)

    _assert_same(*_eager_and_compiled(fn, (h, w, v)))


@needs_interpreter
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compiled_matches_eager_triton_path(reduction):
    h, w, y, v, _ = _inputs()

    def fn(h, w, v):
        return logit_capture(h, w, y, v, reduction=reduction, label_smoothing=0.1, impl="triton")

    _assert_same(*_eager_and_compiled(fn, (h, w, v)))


def test_compiled_matches_eager_under_autocast():
    """Autocast entered inside the compiled function, the hidden state produced by an autocast matmul."""
    h, w, y, v, _ = _inputs()
    proj = torch.randn(D, D, generator=torch.Generator().manual_seed(3)) / D**0.5

    def fn(x, w, v):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            hb = x @ proj
            return logit_capture(hb, w, y, v, reduction="none")

    eager, compiled = _eager_and_compiled(fn, (h, w, v))
    assert compiled[0].loss.dtype == torch.float32 and compiled[1][1].dtype == torch.float32
    _assert_same(eager, compiled, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.gpu_late  # a cold inductor compilation: tests/conftest.py runs it after the other GPU tests
@gpu
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_cuda_autocast_triton_gpu(backend):
    """On a GPU: CUDA autocast (bf16) around an fp32 model, the Triton path inside a compiled function."""
    g = torch.Generator().manual_seed(0)
    n, d, vocab, k = 300, 256, 5000, 65
    x = torch.randn(n, d, generator=g).cuda()
    proj = (torch.randn(d, d, generator=g) / d**0.5).cuda()
    w = (torch.randn(vocab, d, generator=g) / d**0.5).cuda()
    v = torch.randn(vocab, k, generator=g).cuda()
    y = torch.randint(0, vocab, (n,), generator=g).cuda()
    y[::5] = IGNORE

    def fn(x, w, v):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return logit_capture(x @ proj, w, y, v, reduction="none", impl="triton")

    results = []
    for f in (fn, torch.compile(fn, backend=backend, fullgraph=True)):
        leaves = _leaves(x, w, v)
        cap = f(*leaves)
        results.append((cap, _backward(cap, leaves)))
    assert results[1][0].lse.dtype == torch.float32 and results[1][1][1].dtype == torch.float32
    _assert_same(*results, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize(
    ("impl", "bias_grad"),
    [("torch", True), ("torch", False), pytest.param("triton", True, marks=needs_interpreter)],
)
def test_compiled_with_bias(impl, bias_grad):
    """The custom ops carry the bias (fullgraph, one node): compiled equals eager and the oracle, d bias
    included; a frozen bias gets no gradient there either."""
    h, w, y, v, tw = _inputs()
    b = _bias()
    kw = dict(reduction="sum", softcap=5.0, z_loss=1e-3, token_weights=tw, topk=2, impl=impl)

    def fn(h, w, v, b):
        return logit_capture(h, w, y, v, bias=b if bias_grad else b.detach(), **kw)

    eager, compiled = _eager_and_compiled(fn, (h, w, v, b))
    _assert_same(eager, compiled)  # the captures and d hidden, d weight, d values
    d_bias = compiled[1][3]
    assert (d_bias is not None) == bias_grad
    if bias_grad:
        torch.testing.assert_close(d_bias, eager[1][3], rtol=1e-6, atol=1e-6)
    exact = _leaves(*(t.double() for t in (h, w, v, b)))
    ref_kw = {k: x for k, x in kw.items() if k != "impl"}
    ref = logit_capture_reference(exact[0], exact[1], y, exact[2], bias=exact[3], **ref_kw)
    ref_grads = _backward(ref, exact)
    names = ("hidden", "weight", "values", "bias")
    for name, got, want in zip(names, compiled[1], ref_grads):
        if got is not None:
            _assert_close(got, want, 1e-5, 1e-5, f"d {name}")
    _assert_close(compiled[0].loss, ref.loss, 1e-6, 1e-6, "loss")


def test_compiled_gradient_subsets():
    """Only ``values`` needs a gradient, and ``p_values`` unused: the backward op gets the subsets right."""
    h, w, y, v, _ = _inputs()
    f = torch.compile(lambda h, w, v: logit_capture(h, w, y, v), backend="aot_eager", fullgraph=True)
    vl = v.clone().requires_grad_()
    cap = f(h, w, vl)
    cap.p_values.sum().backward()
    v_ref = v.double().requires_grad_()
    logit_capture_reference(h.double(), w.double(), y, v_ref).p_values.sum().backward()
    torch.testing.assert_close(vl.grad.double(), v_ref.grad, rtol=1e-5, atol=1e-6)
    hl = h.clone().requires_grad_()
    cap = f(hl, w, v)
    cap.loss.backward()
    assert hl.grad is not None and torch.isfinite(hl.grad).all()


def test_compiled_across_batch_sizes():
    """A second batch size recompiles with a dynamic N (automatic dynamic shapes): the fake implementations
    must hold for symbolic sizes."""
    h, w, y, v, _ = _inputs()
    f = torch.compile(lambda h, w, y, v: logit_capture(h, w, y, v, reduction="sum"), backend="aot_eager")
    for rows in (N, N - 4, N - 2):
        leaves = _leaves(h[:rows], w, v)
        cap = f(leaves[0], leaves[1], y[:rows], leaves[2])
        grads = _backward(cap, leaves)
        eager_leaves = _leaves(h[:rows], w, v)
        want = logit_capture(eager_leaves[0], eager_leaves[1], y[:rows], eager_leaves[2], reduction="sum")
        _assert_same((want, _backward(want, eager_leaves)), (cap, grads))


def test_compiled_checks_labels_at_run_time():
    h, w, y, v, _ = _inputs()
    bad = y.clone()
    bad[0] = V
    f = torch.compile(lambda h, w, y: logit_capture(h, w, y, v), backend="aot_eager", fullgraph=True)
    f(h, w, y)
    with pytest.raises(ValueError, match=f"labels: expected values in \\[0, {V}\\).*got {V}"):
        f(h, w, bad)


def test_compiled_check_labels_false_skips_the_run_time_check(monkeypatch):
    """``check_labels`` travels through the op's schema: with False the compiled op never reads the labels back
    (the same results as with the check); with True it checks them when it runs."""
    from tcopilot.kernels.logit_capture import api

    h, w, y, v, _ = _inputs()
    checked = []
    real = api.check_label_values
    monkeypatch.setattr(api, "check_label_values", lambda *a: checked.append(a[0]) or real(*a))
    want = logit_capture(h, w, y, v)
    for flag in (False, True):
        checked.clear()
        f = torch.compile(lambda h, w, y, flag=flag: logit_capture(h, w, y, v, check_labels=flag),
                          backend="aot_eager", fullgraph=True)
        cap = f(h, w, y)
        assert checked == (["labels"] if flag else []), flag
        _assert_same((want, []), (cap, []))


@pytest.mark.parametrize("with_bias", [False, True])
def test_custom_ops_pass_opcheck(with_bias):
    h, w, y, v, tw = _inputs()
    b = torch.randn(V, generator=torch.Generator().manual_seed(4)).requires_grad_() if with_bias else None
    fwd_args = (h.requires_grad_(), w.requires_grad_(), b, y, v.requires_grad_(), tw, None, IGNORE, "mean", 2)
    fwd_args += (None, 0.0, 0.01, "torch", True)
    torch.library.opcheck(torch.ops.tcopilot.logit_capture_fwd.default, fwd_args)
    cap = torch.ops.tcopilot.logit_capture_fwd(*fwd_args)
    lse, den = cap[1].detach(), cap[7].detach()
    gl, gv = torch.tensor(1.0), torch.randn(N, K)
    b = b.detach() if b is not None else None
    bwd_args = (h.detach(), w.detach(), b, y, lse, tw, den, gl, gv, K, torch.float32, True, True, with_bias)
    bwd_args += (IGNORE, "mean", None, 0.0, 0.01, "torch")
    torch.library.opcheck(torch.ops.tcopilot.logit_capture_bwd.default, bwd_args)


# ---------------------------------------------------------------------------------------------------------
# FSDP-style parameters
# ---------------------------------------------------------------------------------------------------------


def test_weight_as_view_of_flat_parameter():
    """FSDP1 (use_orig_params) hands modules views into one flat parameter: the gradient must reach it."""
    h, w, y, v, _ = _inputs()
    flat = torch.cat([torch.zeros(7), w.reshape(-1), torch.zeros(3)]).requires_grad_()
    cap = logit_capture(h, flat[7 : 7 + V * D].view(V, D), y, v, impl="torch")
    cap.loss.backward()
    wl = w.double().requires_grad_()
    logit_capture_reference(h.double(), wl, y, v.double()).loss.backward()
    torch.testing.assert_close(flat.grad[7 : 7 + V * D].view(V, D).double(), wl.grad, rtol=1e-5, atol=1e-6)
    assert flat.grad[:7].abs().sum() == 0 and flat.grad[-3:].abs().sum() == 0


def test_sharded_dtensor_weight_is_rejected(monkeypatch):
    class DTensor(torch.Tensor):
        placements = ("Shard(dim=0)",)

    fake = types.SimpleNamespace(DTensor=DTensor)
    monkeypatch.setitem(sys.modules, "torch.distributed.tensor", fake)
    h, w, y, v, _ = _inputs()
    with pytest.raises(ValueError, match="weight: expected a plain .*gathered.*DTensor"):
        logit_capture(h, w.as_subclass(DTensor), y, v)
    with pytest.raises(ValueError, match="bias: expected a plain .*gathered.*DTensor"):
        logit_capture(h, w, y, v, bias=_bias().as_subclass(DTensor))


def test_api_never_reads_dot_data():
    """``.data`` bypasses autograd and breaks FSDP-style parameter wrappers: none of the op's modules use it."""
    root = pathlib.Path(__file__).resolve().parents[2] / "tcopilot" / "kernels" / "logit_capture"
    for name in sorted(p.name for p in root.glob("*.py")):  # every module of the op, new ones included
        src = (root / name).read_text()
        assert not re.search(r"[\w)\]]\.data\b", src), name


def test_compile_dynamic_shapes_and_symbolic_options():
    """``torch.compile(dynamic=True)`` traces float options as symbols: validation must not break the graph."""

    def loss_of(h, w, y, v, softcap):
        cap = logit_capture(h, w, y, values=v, softcap=softcap, impl="torch")
        return cap.loss + cap.p_values.square().sum()

    compiled = torch.compile(loss_of, backend="eager", dynamic=True, fullgraph=True)
    for seed, n_keep, softcap in ((0, N, 30.0), (1, N - 4, 20.0)):
        h, w, y, v, _ = _inputs(seed)
        h, y = h[:n_keep].clone(), y[:n_keep]
        grads = []
        for fn in (compiled, loss_of):
            hh, ww, vv = (t.clone().requires_grad_(True) for t in (h, w, v))
            out = fn(hh, ww, y, vv, softcap)
            out.backward()
            grads.append((out.detach(), hh.grad, ww.grad, vv.grad))
        for got, want in zip(*grads):
            torch.testing.assert_close(got, want)


def test_compile_num_items_int_changing_between_calls():
    """A Python-int ``num_items_in_batch`` that changes between calls becomes a symbol under torch.compile
    (the Trainer passes one per step): the graph must not break, and a bad value is still refused."""

    def loss_of(h, w, y, n):
        return logit_capture(h, w, y, num_items_in_batch=n, impl="torch").loss

    compiled = torch.compile(loss_of, backend="eager", fullgraph=True)
    h, w, y, _, _ = _inputs(0)
    for n in (7, 5, 11):
        torch.testing.assert_close(compiled(h, w, y, n), loss_of(h, w, y, n))
    with pytest.raises(ValueError, match="num_items_in_batch: expected a finite number > 0"):
        compiled(h, w, y, 0)
