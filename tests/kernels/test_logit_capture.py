"""logit_capture: the chunked PyTorch path against the materialised oracle, and the oracle against PyTorch."""

from __future__ import annotations

import importlib.util
import os
import re

import pytest
import torch
import torch.nn.functional as F

from tcopilot.kernels.logit_capture import Capture, logit_capture, logit_capture_reference
from tcopilot.kernels.logit_capture.torch_impl import (
    LogitCaptureTorchFunction,
    default_chunk_size,
    logit_capture_torch,
)

IGNORE = -100
REDUCTIONS = ("mean", "sum", "none")


def make_case(n, d, v, k=7, *, dtype=torch.float64, ignore_every=4, seed=0, label_dtype=torch.int64):
    """Inputs with logits of O(1) spread (the softmax neither flat nor one-hot) and some ignored rows."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g, dtype=torch.float64)
    weight = torch.randn(v, d, generator=g, dtype=torch.float64) * (2.0 / d**0.5)
    values = torch.randn(v, k, generator=g, dtype=torch.float64) if k else None
    labels = torch.randint(0, v, (n,), generator=g)
    if ignore_every:
        labels[1::ignore_every] = IGNORE
    token_weights = torch.rand(n, generator=g, dtype=torch.float64) + 0.5
    cast = (lambda t: None if t is None else t.to(dtype))
    return dict(
        hidden=cast(hidden),
        weight=cast(weight),
        labels=labels.to(label_dtype),
        values=cast(values),
        token_weights=cast(token_weights),
        seed=seed,
    )


def run(fn, case, **kwargs):
    """Forward and backward with random upstream gradients on loss and p_values; returns (capture, grads)."""
    h = case["hidden"].detach().clone().requires_grad_()
    w = case["weight"].detach().clone().requires_grad_()
    vals = case["values"].detach().clone().requires_grad_() if case["values"] is not None else None
    cap = fn(h, w, case["labels"], vals, **kwargs)
    g = torch.Generator().manual_seed(case["seed"] + 1)
    # Drawn in fp64 and cast, so every dtype under test sees the same upstream gradients.
    up = torch.randn(cap.loss.shape, generator=g, dtype=torch.float64)
    outs, grads = [cap.loss], [up.to(cap.loss.dtype)]
    if cap.p_values is not None:
        outs.append(cap.p_values)
        up = torch.randn(cap.p_values.shape, generator=g, dtype=torch.float64)
        grads.append(up.to(cap.p_values.dtype))
    torch.autograd.backward(outs, grads)
    return cap, {"hidden": h.grad, "weight": w.grad, "values": None if vals is None else vals.grad}


def assert_capture_close(got: Capture, want: Capture, rtol, atol):
    for name, a, b in zip(Capture._fields, got, want):
        if b is None:
            assert a is None, name
            continue
        assert a is not None, name
        assert a.shape == b.shape, (name, a.shape, b.shape)
        assert a.dtype == b.dtype, (name, a.dtype, b.dtype)
        if name == "topk_ids":
            assert torch.equal(a, b), name
        else:
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


def assert_grads_close(got, want, rtol, atol):
    for name in got:
        if want[name] is None:
            assert got[name] is None, name
            continue
        torch.testing.assert_close(
            got[name], want[name], rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}"
        )


OPTION_SETS = {
    "plain": {},
    "softcap": {"softcap": 1.5},
    "smoothing": {"label_smoothing": 0.1},
    "z_loss": {"z_loss": 1e-2},
    "token_weights": {"token_weights": True},
    "topk": {"topk": 5},
    "everything": {"softcap": 2.0, "label_smoothing": 0.2, "z_loss": 1e-3, "token_weights": True, "topk": 3},
}


def options(name, case):
    opts = dict(OPTION_SETS[name])
    if opts.pop("token_weights", False):
        opts["token_weights"] = case["token_weights"]
    return opts


# ---------------------------------------------------------------------------------------------------------
# The torch path against the oracle


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("opt", sorted(OPTION_SETS))
def test_torch_matches_reference_fp64(opt, reduction):
    case = make_case(37, 63, 997)
    kw = dict(options(opt, case), reduction=reduction)
    got, g_got = run(lambda *a, **k: logit_capture_torch(*a, chunk_size=5, **k), case, **kw)
    want, g_want = run(logit_capture_reference, case, **kw)
    assert_capture_close(got, want, rtol=1e-10, atol=1e-12)
    assert_grads_close(g_got, g_want, rtol=1e-10, atol=1e-12)


def test_num_items_in_batch_fp64():
    case = make_case(37, 63, 997)
    # 29.17 and 2**24 + 1 have no exact float32: they must reach the fp64 division unrounded
    for num_items in (100, 7.5, 29.17, 16777217.0, torch.tensor(64)):
        got, g_got = run(
            lambda *a, **k: logit_capture_torch(*a, chunk_size=8, **k), case, num_items_in_batch=num_items
        )
        want, g_want = run(logit_capture_reference, case, num_items_in_batch=num_items)
        assert_capture_close(got, want, rtol=1e-10, atol=1e-12)
        assert_grads_close(g_got, g_want, rtol=1e-10, atol=1e-12)
    # Normalising by a global count is a plain rescale of the summed loss.
    mean100 = logit_capture(case["hidden"], case["weight"], case["labels"], num_items_in_batch=100).loss
    total = logit_capture(case["hidden"], case["weight"], case["labels"], reduction="sum").loss
    torch.testing.assert_close(mean100, total / 100)


@pytest.mark.parametrize("chunk_size", [1, 4, 36, 37, 1000])
def test_chunk_sizes(chunk_size):
    case = make_case(37, 16, 101, k=3)
    kw = dict(softcap=3.0, topk=2, reduction="none")
    got, g_got = run(lambda *a, **k: logit_capture_torch(*a, chunk_size=chunk_size, **k), case, **kw)
    want, g_want = run(logit_capture_reference, case, **kw)
    assert_capture_close(got, want, rtol=1e-10, atol=1e-12)
    assert_grads_close(g_got, g_want, rtol=1e-10, atol=1e-12)


def test_default_chunk_size():
    assert default_chunk_size(1000) == 4194
    assert default_chunk_size(32000) * 32000 <= 1 << 22
    assert default_chunk_size(1 << 23) == 1


@pytest.mark.parametrize("opt", ["plain", "everything"])
def test_torch_matches_reference_fp32(opt):
    # Default chunking through the public API; the oracle and the chunked path differ only in summation order.
    case = make_case(37, 63, 1000, dtype=torch.float32)
    kw = options(opt, case)
    got, g_got = run(lambda *a, **k: logit_capture(*a, impl="torch", **k), case, **kw)
    want, g_want = run(logit_capture_reference, case, **kw)
    assert_capture_close(got, want, rtol=1e-5, atol=1e-5)
    assert_grads_close(g_got, g_want, rtol=1e-5, atol=1e-5)


def _native(h, w, labels, vals):
    """What plain PyTorch computes at the inputs' own dtype: the error yardstick of DESIGN.md 6."""
    h = h.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    vals = vals.detach().clone().requires_grad_()
    z = h @ w.T
    loss = F.cross_entropy(z, labels.long(), ignore_index=IGNORE)
    p = torch.softmax(z, dim=1)
    p_values = p.detach() @ vals
    g = torch.Generator().manual_seed(1)
    gl = torch.randn((), generator=g, dtype=torch.float64)
    gu = torch.randn(p_values.shape, generator=g, dtype=torch.float64)
    torch.autograd.backward([loss, p_values], [gl.to(loss.dtype), gu.to(p_values.dtype)])
    stats = {"loss": loss, "lse": torch.logsumexp(z, 1), "p_sq_sum": (p * p).sum(1), "p_values": p_values}
    return stats, {"hidden": h.grad, "weight": w.grad, "values": vals.grad}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_against_fp64(dtype):
    case = make_case(37, 63, 997, dtype=dtype)
    case64 = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in case.items()}
    got, g_got = run(lambda *a, **k: logit_capture(*a, impl="torch", **k), case)
    truth, g_truth = run(logit_capture_reference, case64)
    nat, g_nat = _native(case["hidden"], case["weight"], case["labels"], case["values"])
    assert got.lse.dtype == torch.float32
    assert g_got["hidden"].dtype == dtype and g_got["values"].dtype == dtype

    def err(a, b):
        return (a.double() - b.double()).abs().max().item()

    for name in ("loss", "lse", "p_sq_sum", "p_values"):
        ours, theirs = err(getattr(got, name), getattr(truth, name)), err(nat[name], getattr(truth, name))
        assert ours <= 2 * theirs + 1e-6, (name, ours, theirs)
    for name in ("hidden", "weight", "values"):
        ours, theirs = err(g_got[name], g_truth[name]), err(g_nat[name], g_truth[name])
        assert ours <= 2 * theirs + 1e-6, (name, ours, theirs)


# ---------------------------------------------------------------------------------------------------------
# The oracle against plain PyTorch, so that "matches the reference" means something


def test_reference_matches_pytorch_cross_entropy():
    case = make_case(37, 63, 997)
    h, w, y = case["hidden"], case["weight"], case["labels"]
    z = h @ w.T
    for eps in (0.0, 0.3):
        cap = logit_capture_reference(h, w, y, label_smoothing=eps)
        want = F.cross_entropy(z, y, ignore_index=IGNORE, label_smoothing=eps)
        torch.testing.assert_close(cap.loss, want, rtol=1e-12, atol=1e-12)
    cap = logit_capture_reference(h, w, y, case["values"], reduction="none")
    p = torch.softmax(z, 1)
    counted = y != IGNORE
    torch.testing.assert_close(cap.loss, F.cross_entropy(z, y, ignore_index=IGNORE, reduction="none"))
    torch.testing.assert_close(cap.lse, torch.logsumexp(z, 1))
    torch.testing.assert_close(cap.p_sq_sum, (p * p).sum(1))
    torch.testing.assert_close(cap.p_values, p @ case["values"])
    torch.testing.assert_close(cap.p_target[counted], p[counted, y[counted]])
    assert torch.all(cap.p_target[~counted] == 0)


# ---------------------------------------------------------------------------------------------------------
# Top-k


def test_topk_matches_torch_topk():
    case = make_case(37, 63, 997)
    h, w, y = case["hidden"], case["weight"], case["labels"]
    for softcap in (None, 1.0):
        cap = logit_capture_torch(h, w, y, topk=8, softcap=softcap, chunk_size=6)
        z = h @ w.T
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        want = torch.topk(z, 8, dim=1)
        assert cap.topk_ids.dtype == torch.int64
        assert torch.equal(cap.topk_ids, want.indices)
        torch.testing.assert_close(cap.topk_logits, want.values, rtol=1e-12, atol=1e-12)


def test_topk_ties_lowest_id_first():
    # Rows of weight repeated so several vocabulary entries share each logit exactly; torch.topk does not
    # promise which of equal values it returns, the contract says lowest id first.
    # Small integers keep every dot product exact, so ties survive any GEMM blocking.
    g = torch.Generator().manual_seed(3)
    base = torch.randint(-3, 4, (5, 8), generator=g).double()
    weight = base[torch.tensor([0, 1, 2, 1, 3, 1, 2, 4, 0, 2, 1, 3, 4])]
    hidden = torch.randint(-2, 3, (6, 8), generator=g).double() / 4
    labels = torch.tensor([0, 1, IGNORE, 3, 4, 5])
    for k in (1, 2, 3, 5, 13):
        want = logit_capture_reference(hidden, weight, labels, topk=k)
        got = logit_capture_torch(hidden, weight, labels, topk=k, chunk_size=4)
        assert torch.equal(got.topk_ids, want.topk_ids), k
        assert torch.equal(got.topk_logits, want.topk_logits), k
    # All-equal logits: ids 0..k-1 in order.
    flat = logit_capture_torch(torch.zeros(2, 4), torch.ones(50, 4), torch.tensor([1, 2]), topk=6)
    assert flat.topk_ids.tolist() == [list(range(6))] * 2


# ---------------------------------------------------------------------------------------------------------
# Layout and edge cases


def test_non_contiguous_hidden():
    case = make_case(37, 63, 997)
    wide = torch.randn(37, 126, dtype=torch.float64)
    wide[:, ::2] = case["hidden"]
    transposed = case["hidden"].T.contiguous().T
    for hidden in (wide[:, ::2], transposed):
        assert not hidden.is_contiguous()
        strided = dict(case, hidden=hidden)
        got, g_got = run(lambda *a, **k: logit_capture_torch(*a, chunk_size=5, **k), strided, softcap=4.0)
        want, g_want = run(logit_capture_reference, case, softcap=4.0)
        assert_capture_close(got, want, rtol=1e-10, atol=1e-12)
        assert_grads_close(g_got, g_want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_single_row(reduction):
    case = make_case(1, 63, 1000, ignore_every=0)
    got, g_got = run(lambda *a, **k: logit_capture(*a, impl="torch", **k), case, reduction=reduction, topk=4)
    want, g_want = run(logit_capture_reference, case, reduction=reduction, topk=4)
    assert_capture_close(got, want, rtol=1e-10, atol=1e-12)
    assert_grads_close(g_got, g_want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_ignored(reduction):
    case = make_case(9, 16, 50, k=3, dtype=torch.float32)
    case["labels"][:] = IGNORE
    kw = dict(reduction=reduction, label_smoothing=0.1, z_loss=1e-3, token_weights=case["token_weights"])
    got, grads = run(lambda *a, **k: logit_capture(*a, impl="torch", **k), case, **kw)
    assert torch.all(got.loss == 0)
    assert torch.all(got.p_target == 0)
    assert torch.isfinite(got.lse).all() and torch.isfinite(got.p_values).all()
    assert torch.all(grads["hidden"] == 0) and torch.all(grads["weight"] == 0)
    assert torch.isfinite(grads["values"]).all()


def test_ignored_rows_have_no_gradient_even_with_nan_upstream():
    case = make_case(8, 16, 50, k=0)
    h = case["hidden"].clone().requires_grad_()
    cap = logit_capture_torch(h, case["weight"], case["labels"], reduction="none", chunk_size=3)
    up = torch.ones(8, dtype=torch.float64)
    ignored = case["labels"] == IGNORE
    up[ignored] = float("nan")
    cap.loss.backward(up)
    assert torch.isfinite(h.grad).all()
    assert torch.all(h.grad[ignored] == 0)


def test_int32_labels():
    case = make_case(37, 63, 997, label_dtype=torch.int32)
    got, g_got = run(lambda *a, **k: logit_capture(*a, impl="torch", **k), case, topk=2)
    want, g_want = run(logit_capture_reference, dict(case, labels=case["labels"].long()), topk=2)
    assert_capture_close(got, want, rtol=1e-10, atol=1e-12)
    assert_grads_close(g_got, g_want, rtol=1e-10, atol=1e-12)


def test_p_values_gradient_reaches_values_only():
    case = make_case(12, 16, 50, k=3)
    h = case["hidden"].clone().requires_grad_()
    w = case["weight"].clone().requires_grad_()
    vals = case["values"].clone().requires_grad_()
    cap = logit_capture(h, w, case["labels"], vals)
    cap.p_values.sum().backward()
    assert h.grad is None and w.grad is None
    p = torch.softmax(case["hidden"] @ case["weight"].T, 1)
    torch.testing.assert_close(vals.grad, p.T @ torch.ones(12, 3, dtype=torch.float64))


def test_mixed_values_dtype():
    # values may be stored in another dtype than the Pilot (a bf16 Copilot on an fp32 Pilot).
    case = make_case(20, 16, 64, k=5, dtype=torch.float32)
    vals16 = case["values"].half()
    got, g_got = run(lambda *a, **k: logit_capture(*a, impl="torch", **k), dict(case, values=vals16))
    want, g_want = run(logit_capture_reference, dict(case, values=vals16.float()))
    assert got.p_values.dtype == torch.float32 and g_got["values"].dtype == torch.float16
    torch.testing.assert_close(got.p_values, want.p_values, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_got["values"].float(), g_want["values"], rtol=1e-3, atol=1e-3)


def test_gradcheck_fp64():
    g = torch.Generator().manual_seed(5)
    h = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 3, generator=g, dtype=torch.float64, requires_grad=True)
    vals = torch.randn(7, 2, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 6, IGNORE, 3, 3])
    tw = torch.rand(5, generator=g, dtype=torch.float64) + 0.5
    kw = dict(softcap=2.5, label_smoothing=0.1, z_loss=0.05, token_weights=tw, chunk_size=2)
    for reduction in ("mean", "none"):
        loss = lambda h, w, r=reduction: logit_capture_torch(h, w, y, vals, reduction=r, **kw).loss
        assert torch.autograd.gradcheck(loss, (h, w))
    # p_values depends on hidden and weight numerically but is detached from them by contract, so only its
    # Jacobian in values is checked.
    p_values = lambda vals: logit_capture_torch(h, w, y, vals, **kw).p_values
    assert torch.autograd.gradcheck(p_values, (vals,))


# ---------------------------------------------------------------------------------------------------------
# Dispatch and validation


def test_auto_is_torch_on_cpu():
    case = make_case(10, 8, 30)
    a = logit_capture(case["hidden"], case["weight"], case["labels"], case["values"], impl="auto")
    b = logit_capture(case["hidden"], case["weight"], case["labels"], case["values"], impl="torch")
    for x, z in zip(a, b):
        assert (x is None and z is None) or torch.equal(x, z)


def test_impl_triton():
    case = make_case(4, 8, 30)
    args = (case["hidden"], case["weight"], case["labels"])
    has_module = importlib.util.find_spec("tcopilot.kernels.logit_capture.triton_impl") is not None
    if not has_module:
        with pytest.raises(NotImplementedError, match="logit_capture: impl='triton'"):
            logit_capture(*args, impl="triton")
    elif os.environ.get("TRITON_INTERPRET", "0") != "1":
        with pytest.raises(ValueError, match="impl"):
            logit_capture(*args, impl="triton")
    else:
        pytest.skip("Triton path is tested in test_logit_capture_triton.py")


def _good():
    g = torch.Generator().manual_seed(0)
    return dict(
        hidden=torch.randn(6, 8, generator=g),
        weight=torch.randn(30, 8, generator=g),
        labels=torch.tensor([1, 2, IGNORE, 29, 0, 5]),
        values=torch.randn(30, 3, generator=g),
    )


BAD_INPUTS = [
    ("hidden", dict(hidden=torch.randn(6, 8, 1)), "expected a 2-d"),
    ("hidden", dict(hidden=torch.randint(0, 3, (6, 8))), "dtype"),
    ("hidden", dict(hidden=torch.randn(0, 8), labels=torch.zeros(0, dtype=torch.long)), "non-empty"),
    ("weight", dict(weight=torch.randn(30, 9)), r"\[\*, 8\]"),
    ("weight", dict(weight=torch.randn(30, 8, dtype=torch.float64)), "dtype of hidden"),
    ("weight", dict(weight=torch.randn(30, 8, device="meta")), "meta"),
    ("labels", dict(labels=torch.tensor([1, 2, 3])), r"\[6\]"),
    ("labels", dict(labels=torch.tensor([1, 2, 3, 30, 0, 5])), "got 30"),
    ("labels", dict(labels=torch.tensor([1, 2, -1, 3, 0, 5])), "got -1"),
    ("labels", dict(labels=torch.ones(6)), "dtype"),
    ("bias", dict(bias=torch.randn(31)), r"expected shape \[30\], got \[31\]"),
    ("bias", dict(bias=torch.randn(30, 1)), "1-d"),
    ("bias", dict(bias=torch.arange(30)), "dtype in"),
    ("bias", dict(bias=torch.randn(30, dtype=torch.float64)), r"dtype float32 \(the dtype of weight\), got float64"),
    ("bias", dict(bias=torch.randn(30, device="meta")), "meta"),
    ("bias", dict(bias=[0.0] * 30), "torch.Tensor"),
    ("values", dict(values=torch.randn(31, 3)), r"\[30, \*\]"),
    ("values", dict(values=torch.randn(30)), "2-d"),
    ("reduction", dict(reduction="avg"), "avg"),
    ("impl", dict(impl="cuda"), "cuda"),
    ("topk", dict(topk=31), "31"),
    ("topk", dict(topk=-1), "-1"),
    ("topk", dict(topk=2.0), "2.0"),
    ("softcap", dict(softcap=0.0), "> 0"),
    ("softcap", dict(softcap=float("inf")), "finite"),
    ("label_smoothing", dict(label_smoothing=1.0), r"\[0, 1\)"),
    ("label_smoothing", dict(label_smoothing=float("nan")), "finite"),
    ("z_loss", dict(z_loss=-1e-4), ">= 0"),
    ("z_loss", dict(z_loss=float("inf")), "finite"),
    ("num_items_in_batch", dict(num_items_in_batch=0), "> 0"),
    ("num_items_in_batch", dict(num_items_in_batch=torch.tensor([1, 2])), "one-element"),
    ("num_items_in_batch", dict(num_items_in_batch=10, reduction="sum"), "reduction='mean'"),
    ("token_weights", dict(token_weights=torch.ones(5)), r"\[6\]"),
    ("token_weights", dict(token_weights=torch.ones(6, dtype=torch.long)), "dtype"),
    ("ignore_index", dict(ignore_index=None), "int"),
    ("check_labels", dict(check_labels=1), "expected a bool, got 1"),
    ("check_labels", dict(check_labels="no"), "expected a bool, got 'no'"),
    ("check_labels", dict(check_labels=None), "expected a bool, got None"),
]


@pytest.mark.parametrize(
    "arg,change,detail", BAD_INPUTS, ids=[f"{a}-{i}" for i, (a, _, _) in enumerate(BAD_INPUTS)]
)
def test_bad_input_names_the_argument(arg, change, detail):
    kwargs = dict(_good(), **change)
    with pytest.raises(ValueError, match=arg) as err:
        logit_capture(**kwargs)
    assert re.search(detail, str(err.value)), str(err.value)


def test_check_labels_false_gives_the_same_capture_and_gradients():
    """``check_labels=False`` only skips the range check (its host read): the same values and gradients."""
    caps, grads = [], []
    for check in (True, False):
        kwargs = _good()
        leaves = [kwargs[k].requires_grad_() for k in ("hidden", "weight", "values")]
        cap = logit_capture(**kwargs, topk=3, impl="torch", check_labels=check)
        (cap.loss + cap.p_values.square().sum()).backward()
        caps.append(cap)
        grads.append([t.grad for t in leaves])
    for name, a, b in zip(Capture._fields, *caps):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_function_saves_no_vocab_sized_tensor():
    case = make_case(37, 16, 997, k=3)
    h = case["hidden"].clone().requires_grad_()
    w = case["weight"].clone().requires_grad_()
    vals = case["values"].clone().requires_grad_()
    cap = logit_capture_torch(h, w, case["labels"], vals, softcap=2.0, topk=3, chunk_size=5)
    node = cap.loss.grad_fn
    assert node.name().startswith(LogitCaptureTorchFunction.__name__)
    for t in node.saved_tensors:
        if t is not None:
            assert t.numel() < 37 * 997, tuple(t.shape)
