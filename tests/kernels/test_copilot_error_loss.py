"""copilot_error_loss: the Gram form, composed with logit_capture, against the materialised RMSE."""

from __future__ import annotations

import re

import pytest
import torch

from tcopilot.kernels.copilot_error_loss import copilot_error_loss, copilot_error_loss_reference
from tcopilot.kernels.logit_capture import Capture, logit_capture

IGNORE = -100


def make_case(n=37, d=63, v=997, c=6, *, dtype=torch.float64, ignore_every=4, seed=0):
    """Pilot (h, W), Copilot error_in A [c, V], error_out B [V, c] and b [V], Copilot states g, labels."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    labels = torch.randint(0, v, (n,), generator=g)
    if ignore_every:
        labels[1::ignore_every] = IGNORE
    return dict(
        h=rnd(n, d),
        W=rnd(v, d, scale=2.0 / d**0.5),
        A=rnd(c, v, scale=0.1),
        B=rnd(v, c, scale=0.1),
        b=rnd(v, scale=0.01),
        g=rnd(n, c),
        labels=labels,
    )


def leaves(case, names):
    return {k: (case[k].detach().clone().requires_grad_() if k in names else case[k]) for k in case}


def composed(case, *, bias=True, width_plus_one=True, softcap=None, impl="torch"):
    """End to end as in training: the capture sees values built from the Copilot's leaf parameters."""
    t = leaves(case, ("h", "W", "A", "B", "b", "g"))
    cols = [t["A"].T, t["B"]]
    if bias or width_plus_one:
        cols.append(t["b"][:, None])
    values = torch.cat(cols, 1)
    cap = logit_capture(t["h"], t["W"], t["labels"], values, softcap=softcap, impl=impl)
    loss = copilot_error_loss(t["g"], t["B"], t["b"] if bias else None, cap, t["labels"], impl=impl)
    loss.backward()
    return loss, {k: t[k].grad for k in ("h", "W", "A", "B", "b", "g")}


def materialised(case, *, bias=True, softcap=None):
    t = leaves(case, ("B", "b", "g"))
    z = case["h"] @ case["W"].T
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    loss = copilot_error_loss_reference(t["g"], t["B"], t["b"] if bias else None, z, t["labels"])
    loss.backward()
    return loss, {k: t[k].grad for k in ("B", "b", "g")}


def zero_or_none(t):
    return t is None or bool(torch.all(t == 0))


@pytest.mark.parametrize(
    "bias,width_plus_one,softcap",
    [(True, True, None), (False, False, None), (False, True, None), (True, True, 2.0)],
)
def test_composed_matches_reference_fp64(bias, width_plus_one, softcap):
    case = make_case()
    loss, grads = composed(case, bias=bias, width_plus_one=width_plus_one, softcap=softcap)
    want, want_grads = materialised(case, bias=bias, softcap=softcap)
    assert loss.dtype == torch.float64 and loss.dim() == 0
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-12)
    names = ("B", "b", "g") if bias else ("B", "g")
    for k in names:
        torch.testing.assert_close(
            grads[k], want_grads[k], rtol=1e-9, atol=1e-12, msg=lambda m, k=k: f"{k}: {m}"
        )
    if not bias:
        assert zero_or_none(grads["b"])
    # error_in's columns of p_values are not read by this loss; the log is detached from the Pilot.
    for k in ("A", "h", "W"):
        assert zero_or_none(grads[k]), k


def test_composed_matches_reference_fp32():
    case = make_case(dtype=torch.float32)
    loss, grads = composed(case)
    case64 = {k: (v.double() if v.is_floating_point() else v) for k, v in case.items()}
    want, want_grads = materialised(case64)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-5)
    for k in ("B", "b", "g"):
        torch.testing.assert_close(grads[k].double(), want_grads[k], rtol=1e-5, atol=1e-5)


def _native(case):
    """The materialised RMSE in plain PyTorch at the inputs' own dtype: the yardstick of DESIGN.md 6."""
    t = leaves(case, ("B", "b", "g"))
    y = t["labels"]
    counted = y != IGNORE
    p = torch.softmax(t["h"] @ t["W"].T, 1)
    ell = torch.nn.functional.one_hot(y.clamp(min=0), p.shape[1]).to(p.dtype) - p
    f = t["g"] @ t["B"].T + t["b"]
    loss = torch.sqrt(((f - ell) ** 2).sum(1)[counted].mean())
    loss.backward()
    return loss, {k: t[k].grad for k in ("B", "b", "g")}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_against_fp64(dtype):
    case = make_case(dtype=dtype)
    loss, grads = composed(case)
    case64 = {k: (v.double() if v.is_floating_point() else v) for k, v in case.items()}
    want, want_grads = materialised(case64)
    nat, nat_grads = _native(case)
    assert loss.dtype == torch.float32
    assert grads["g"].dtype == dtype and grads["B"].dtype == dtype

    def err(a, b):
        return (a.double() - b.double()).abs().max().item()

    assert err(loss, want) <= 2 * err(nat, want) + 1e-6
    # Not a fixed rtol: B's gradient is the sum of two terms of opposite sign (direct, and through p_values)
    # that autograd adds in B's dtype, so its relative error exceeds one ulp of the result.
    for k in ("B", "b", "g"):
        ours, theirs = err(grads[k], want_grads[k]), err(nat_grads[k], want_grads[k])
        assert ours <= 2 * theirs + 1e-6, (k, ours, theirs)


def test_gram_form_on_given_statistics():
    # A capture built by hand from a materialised softmax: checks the Gram form alone, not the capture.
    case = make_case(n=20, v=300, c=5)
    z = case["h"] @ case["W"].T
    p = torch.softmax(z, 1)
    y = case["labels"]
    counted = y != IGNORE
    values = torch.cat([case["A"].T, case["B"], case["b"][:, None]], 1)
    p_target = torch.where(counted, p.gather(1, y.clamp(min=0)[:, None]).squeeze(1), torch.zeros(20).double())
    cap = Capture(torch.zeros(()), torch.logsumexp(z, 1), p_target, (p * p).sum(1), p @ values)
    got = copilot_error_loss(case["g"], case["B"], case["b"], cap, y)
    want = copilot_error_loss_reference(case["g"], case["B"], case["b"], z, y)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_all_ignored_is_zero_without_nan():
    case = make_case(n=9, v=50, c=4, dtype=torch.float32)
    case["labels"][:] = IGNORE
    loss, grads = composed(case)
    assert loss.item() == 0.0
    for k, gr in grads.items():
        assert gr is None or (torch.isfinite(gr).all() and torch.all(gr == 0)), k


def test_zero_mse_has_zero_gradient():
    # V = 1: p = 1 and ell = onehot - p = 0 exactly; with B = 0, b = 0 also f = 0, so the mean is 0 and the
    # square root sits at its singular point.
    case = make_case(n=5, d=4, v=1, c=3, ignore_every=0)
    case["B"] = torch.zeros_like(case["B"])
    case["b"] = torch.zeros_like(case["b"])
    loss, grads = composed(case)
    assert loss.item() == 0.0
    for k in ("B", "b", "g"):
        assert torch.isfinite(grads[k]).all() and torch.all(grads[k] == 0), k


def test_non_finite_inputs_give_a_non_finite_loss():
    # A diverged Copilot (NaN in g) or Pilot (NaN statistics) must not look perfect: the loss is NaN, as
    # the reference's, never the 0 that the "x <= 0" branch of the square root gives.
    case = make_case(n=6, v=40, c=4, dtype=torch.float32, ignore_every=0)
    case["g"][2, 0] = float("nan")
    loss, _ = composed(case)
    want, _ = materialised(case)
    assert torch.isnan(loss) and torch.isnan(want)
    case = make_case(n=6, v=40, c=4, dtype=torch.float32, ignore_every=0)
    case["h"][0, 0] = float("nan")
    loss, _ = composed(case)
    assert torch.isnan(loss)


def test_single_row_and_auto_impl():
    case = make_case(n=1, ignore_every=0)
    loss, grads = composed(case, impl="auto")
    want, want_grads = materialised(case)
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grads["g"], want_grads["g"], rtol=1e-9, atol=1e-12)


def test_impl_triton_not_implemented():
    case = make_case(n=4, v=20, c=2)
    values = torch.cat([case["A"].T, case["B"], case["b"][:, None]], 1)
    cap = logit_capture(case["h"], case["W"], case["labels"], values, impl="torch")
    with pytest.raises(NotImplementedError, match="copilot_error_loss: impl='triton'"):
        copilot_error_loss(case["g"], case["B"], case["b"], cap, case["labels"], impl="triton")


def _good():
    case = make_case(n=6, d=8, v=30, c=3, dtype=torch.float32)
    values = torch.cat([case["A"].T, case["B"], case["b"][:, None]], 1)
    cap = logit_capture(case["h"], case["W"], case["labels"], values, impl="torch")
    return dict(hidden=case["g"], weight=case["B"], bias=case["b"], capture=cap, labels=case["labels"])


def _cap(**fields):
    cap = _good()["capture"]
    return cap._replace(**fields)


BAD_INPUTS = [
    ("hidden", dict(hidden=torch.randn(6)), "2-d"),
    ("hidden", dict(hidden=torch.randn(0, 3)), "non-empty"),
    ("weight", dict(weight=torch.randn(30, 4)), r"\[\*, 3\]"),
    ("weight", dict(weight=torch.randn(30, 3, device="meta")), "meta"),
    ("bias", dict(bias=torch.randn(29)), r"\[30\]"),
    ("bias", dict(bias=torch.randn(30).long()), "dtype"),
    ("capture", dict(capture=(1, 2, 3)), "p_values"),
    ("capture.p_values", dict(capture=_cap(p_values=None)), "None"),
    ("capture.p_values", dict(capture=_cap(p_values=torch.randn(6, 6))), r"\[6, 7\]"),
    ("capture.p_values", dict(capture=_cap(p_values=torch.randn(5, 7))), r"\[6, 7\]"),
    ("capture.p_target", dict(capture=_cap(p_target=torch.randn(5))), r"\[6\]"),
    ("capture.p_sq_sum", dict(capture=_cap(p_sq_sum=torch.randn(6, 1))), "1-d"),
    ("labels", dict(labels=torch.tensor([1, 2, 3, 30, 0, 5])), "got 30"),
    ("labels", dict(labels=torch.tensor([1, 2, 3])), r"\[6\]"),
    ("labels", dict(labels=torch.ones(6)), "dtype"),
    ("impl", dict(impl="fast"), "fast"),
    ("check_labels", dict(check_labels=0), "expected a bool, got 0"),
    ("check_labels", dict(check_labels="yes"), "expected a bool, got 'yes'"),
]


@pytest.mark.parametrize(
    "arg,change,detail", BAD_INPUTS, ids=[f"{a}-{i}" for i, (a, _, _) in enumerate(BAD_INPUTS)]
)
def test_bad_input_names_the_argument(arg, change, detail):
    kwargs = dict(_good(), **change)
    with pytest.raises(ValueError, match=re.escape(arg)) as err:
        copilot_error_loss(**kwargs)
    assert re.search(detail, str(err.value)), str(err.value)


def test_check_labels_false_gives_the_same_loss_and_gradients():
    """``check_labels=False`` only skips the range check (its host read): the same loss and gradients."""
    losses, grads = [], []
    for check in (True, False):
        kwargs = _good()
        leaves = [kwargs[k].requires_grad_() for k in ("hidden", "weight", "bias")]
        loss = copilot_error_loss(**kwargs, check_labels=check)
        loss.backward()
        losses.append(loss)
        grads.append([t.grad for t in leaves])
    torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=0)
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_bias_none_accepts_both_widths():
    good = _good()
    c = good["hidden"].shape[1]
    for width in (2 * c, 2 * c + 1):
        cap = _cap(p_values=good["capture"].p_values[:, :width])
        loss = copilot_error_loss(good["hidden"], good["weight"], None, cap, good["labels"])
        assert torch.isfinite(loss)
