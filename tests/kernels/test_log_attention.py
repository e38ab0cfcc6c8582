"""log_attention: PyTorch path and reference against SDPA in fp64, outputs and gradients."""

from __future__ import annotations

import importlib
import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F

from tcopilot.kernels.log_attention import log_attention, log_attention_reference
from tcopilot.kernels.log_attention.torch_impl import log_attention_torch

# fp16/bf16: no worse than twice PyTorch's own SDPA error at that dtype (measured against fp64) plus this.
LOW_PRECISION_ATOL = {torch.float16: 1e-3, torch.bfloat16: 1e-2}


def _arange(b: int, n: int) -> torch.Tensor:
    return torch.arange(n)[None].repeat(b, 1)


def _causal(b, length):
    pos = _arange(b, length)
    return pos, pos


def _two_segment_log(b, length):
    pos = _arange(b, length)
    return pos, torch.cat([pos, pos], dim=1)


def _left_padding(b, length):
    pads = torch.tensor([0, 4, 11, 1][:b])
    pos = _arange(b, length) - pads[:, None]  # padded tokens get negative positions
    return pos, pos


def _left_padding_log(b, length):
    q_pos, _ = _left_padding(b, length)
    return q_pos, torch.cat([q_pos, q_pos], dim=1)


def _chunked_prefill(b, length):
    # the last 5 queries of a sequence whose keys are all cached
    return _arange(b, length)[:, -5:], _arange(b, length)


def _decode(b, length):
    pads = torch.tensor([0, 7, 2, 0][:b])
    k_pos = _arange(b, length) - pads[:, None]
    return k_pos[:, -1:], k_pos


def _decode_log(b, length):
    q_pos, k_pos = _decode(b, length)
    return q_pos, torch.cat([k_pos, k_pos], dim=1)


def _random_positions(b, length):
    # unsorted positions including padding; many queries sit below every key and see nothing
    g = torch.Generator().manual_seed(7)
    q_pos = torch.randint(-4, 12, (b, length), generator=g)
    return q_pos, torch.randint(-3, 20, (b, length + 3), generator=g)


LAYOUTS = {
    "causal": _causal,
    "two_segment_log": _two_segment_log,
    "left_padding": _left_padding,
    "left_padding_log": _left_padding_log,
    "chunked_prefill": _chunked_prefill,
    "decode": _decode,
    "decode_log": _decode_log,
    "random_positions": _random_positions,
}


def _make(layout, b, hq, hk, length, d, dv, dtype, seed=0):
    q_pos, k_pos = LAYOUTS[layout](b, length)
    g = torch.Generator().manual_seed(seed)
    lq, lk = q_pos.shape[1], k_pos.shape[1]
    q = torch.randn(b, hq, lq, d, generator=g).to(dtype)
    k = torch.randn(b, hk, lk, d, generator=g).to(dtype)
    v = torch.randn(b, hk, lk, dv, generator=g).to(dtype)
    dy = torch.randn(b, hq, lq, dv, generator=g).to(dtype)
    return q, k, v, q_pos, k_pos, dy


def _sdpa(q, k, v, q_pos, k_pos, scale):
    """SDPA with the equivalent boolean mask; rows with no visible key are zeroed (outputs and grads)."""
    group = q.shape[1] // k.shape[1]
    visible = ((k_pos[:, None, :] >= 0) & (k_pos[:, None, :] <= q_pos[:, :, None]))[:, None]
    any_visible = visible.any(dim=-1, keepdim=True)
    # SDPA's answer for an all-masked row differs across versions; give such rows every key, then zero them.
    out = F.scaled_dot_product_attention(
        q,
        k.repeat_interleave(group, dim=1),
        v.repeat_interleave(group, dim=1),
        attn_mask=visible | ~any_visible,
        scale=scale,
    )
    return torch.where(any_visible, out, torch.zeros_like(out))


def _run(fn, q, k, v, q_pos, k_pos, dy, dtype=None):
    """Output and (dq, dk, dv) of ``fn`` for upstream gradient ``dy``, inputs cast to ``dtype``."""
    dtype = dtype or q.dtype
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out = fn(*leaves, q_pos, k_pos)
    grads = torch.autograd.grad(out, leaves, dy.to(out.dtype))
    return [out.detach(), *grads]


def _max_err(a, gold):
    return (a.double() - gold).abs().max().item()


CASES = [
    # layout, B, Hq, Hk, L, D, Dv
    ("causal", 2, 2, 2, 37, 16, 16),
    ("two_segment_log", 2, 4, 2, 23, 16, 24),
    ("left_padding", 3, 2, 1, 29, 8, 8),
    ("left_padding_log", 3, 4, 2, 19, 16, 12),
    ("chunked_prefill", 2, 4, 1, 40, 16, 16),
    ("decode", 3, 4, 2, 40, 16, 16),
    ("decode_log", 3, 8, 2, 33, 16, 8),
    ("random_positions", 2, 4, 4, 17, 12, 20),
]


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"]
)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_log_attention_matches_sdpa(case, dtype):
    layout, b, hq, hk, length, d, dv = case
    q, k, v, q_pos, k_pos, dy = _make(layout, b, hq, hk, length, d, dv, dtype)
    scale = 1.0 / math.sqrt(d)
    sdpa = lambda q, k, v, qp, kp: _sdpa(q, k, v, qp, kp, scale)
    gold = _run(sdpa, q, k, v, q_pos, k_pos, dy, torch.float64)
    impls = {
        "torch": lambda q, k, v, qp, kp: log_attention(q, k, v, q_pos=qp, k_pos=kp, impl="torch"),
        # blocks of 5 query rows exercise the block loop and the per-block key span
        "torch_block5": lambda q, k, v, qp, kp: log_attention_torch(q, k, v, qp, kp, scale, block_q=5),
        "reference": lambda q, k, v, qp, kp: log_attention_reference(q, k, v, q_pos=qp, k_pos=kp),
    }
    own = _run(sdpa, q, k, v, q_pos, k_pos, dy) if dtype != torch.float32 else None
    for name, fn in impls.items():
        got = _run(fn, q, k, v, q_pos, k_pos, dy)
        for what, g_, ref in zip(("out", "dq", "dk", "dv"), got, gold):
            assert g_.dtype == dtype, (name, what)
            assert torch.isfinite(g_).all(), (name, what)
            if dtype == torch.float32:
                torch.testing.assert_close(g_.double(), ref, rtol=1e-5, atol=1e-5, msg=f"{name} {what}")
            else:
                budget = (
                    2 * _max_err(own[("out", "dq", "dk", "dv").index(what)], ref) + LOW_PRECISION_ATOL[dtype]
                )
                err = _max_err(g_, ref)
                assert err <= budget, f"{name} {what}: max error {err:.2e} > budget {budget:.2e}"


@pytest.mark.parametrize("group", [1, 2, 4])
def test_log_attention_gqa_matches_repeated_heads(group):
    hk = 2
    q, k, v, q_pos, k_pos, dy = _make("two_segment_log", 2, hk * group, hk, 21, 16, 16, torch.float64)
    got = _run(lambda *a: log_attention(a[0], a[1], a[2], q_pos=a[3], k_pos=a[4]), q, k, v, q_pos, k_pos, dy)
    gold = _run(lambda *a: _sdpa(*a, 0.25), q, k, v, q_pos, k_pos, dy)
    for g_, ref in zip(got, gold):
        torch.testing.assert_close(g_, ref, rtol=1e-10, atol=1e-10)


def test_log_attention_no_visible_key_gives_zeros_and_zero_grads():
    b, h, lq, lk, d = 2, 2, 6, 5, 8
    q = torch.randn(b, h, lq, d, requires_grad=True)
    k = torch.randn(b, h, lk, d, requires_grad=True)
    v = torch.randn(b, h, lk, d, requires_grad=True)
    # batch 0: queries 0-2 are padding or before every key; batch 1: no valid key at all
    q_pos = torch.tensor([[-1, -5, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5]])
    k_pos = torch.tensor([[3, 4, 5, 6, -1], [-1, -1, -2, -3, -1]])
    blind = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    for block_q in (None, 2):
        out = log_attention_torch(q, k, v, q_pos, k_pos, 0.5, block_q=block_q)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
        for t in (out, dq, dk, dv):
            assert torch.isfinite(t).all()
        assert (out[blind[:, None].expand(b, h, lq)] == 0).all()
        assert (dq[blind[:, None].expand(b, h, lq)] == 0).all()
        assert (out[0, :, 3:] != 0).any()
        # keys nobody sees (position 6 > every query, padding) get no gradient
        assert (dk[0, :, 3:] == 0).all() and (dv[0, :, 3:] == 0).all()
        assert (dk[1] == 0).all() and (dv[1] == 0).all()
    ref = log_attention_reference(q, k, v, q_pos=q_pos, k_pos=k_pos, scale=0.5)
    assert torch.isfinite(ref).all() and (ref[blind[:, None].expand(b, h, lq)] == 0).all()


def test_log_attention_accepts_strided_inputs():
    # models produce [B, L, H, D] projections and transpose them; no copy should be required
    b, length, hq, hk, d = 2, 11, 4, 2, 8
    q = torch.randn(b, length, hq, d).transpose(1, 2)
    k = torch.randn(b, length, hk, d).transpose(1, 2)
    v = torch.randn(b, length, hk, d).transpose(1, 2)
    pos = _arange(b, length)
    got = log_attention(q, k, v, q_pos=pos, k_pos=pos)
    want = log_attention(q.contiguous(), k.contiguous(), v.contiguous(), q_pos=pos, k_pos=pos)
    # Not bit-equal: the CPU matmul's summation order depends on the operands' layout (seen on AMD EPYC, 3e-7).
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_log_attention_fp64_gradcheck():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 2, 5, 3, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(1, 1, 7, 3, dtype=torch.float64, generator=g, requires_grad=True)
    v = torch.randn(1, 1, 7, 2, dtype=torch.float64, generator=g, requires_grad=True)
    q_pos = torch.tensor([[-1, 0, 1, 2, 3]])
    k_pos = torch.tensor([[0, 1, 2, -1, 0, 1, 2]])
    fn = lambda q, k, v: log_attention_torch(q, k, v, q_pos, k_pos, 0.7, block_q=2)
    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_log_attention_fp64_gradcheck_one_sdpa_call():
    # The one-call SDPA path (no block_q, D == Dv): grouped heads, padding and queries that see no key.
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 4, 5, 3, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(2, 2, 7, 3, dtype=torch.float64, generator=g, requires_grad=True)
    v = torch.randn(2, 2, 7, 3, dtype=torch.float64, generator=g, requires_grad=True)
    q_pos = torch.tensor([[-1, 0, 1, 2, 3], [0, 1, 2, 3, 4]])
    k_pos = torch.tensor([[0, 1, 2, -1, 0, 1, 2], [2, 3, 4, 5, -1, 3, 4]])
    fn = lambda q, k, v: log_attention_torch(q, k, v, q_pos, k_pos, 0.7)
    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_log_attention_torch_path_choice(monkeypatch):
    """One SDPA call on CPU within the score budget with D == Dv; the blocked loop otherwise, or when asked."""
    from tcopilot.kernels.log_attention import torch_impl

    calls = []
    real = torch_impl.F.scaled_dot_product_attention
    spy = lambda *a, **kw: calls.append(1) or real(*a, **kw)  # noqa: E731
    monkeypatch.setattr(torch_impl.F, "scaled_dot_product_attention", spy)
    q, k, v, q_pos, k_pos, _ = _make("two_segment_log", 2, 4, 2, 9, 8, 8, torch.float32)
    _, _, v12, *_ = _make("two_segment_log", 2, 4, 2, 9, 8, 12, torch.float32)
    one_call = log_attention_torch(q, k, v, q_pos, k_pos, 0.5)
    assert len(calls) == 1
    blocked = log_attention_torch(q, k, v, q_pos, k_pos, 0.5, block_q=9)
    log_attention_torch(q, k, v12, q_pos, k_pos, 0.5)  # Dv != D
    monkeypatch.setattr(torch_impl, "_SCORE_BUDGET", 2 * 4 * 9 * 18 - 1)  # B * Hq * Lq * Lk, less one
    over_budget = log_attention_torch(q, k, v, q_pos, k_pos, 0.5)
    assert len(calls) == 1
    torch.testing.assert_close(one_call, blocked, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(over_budget, blocked, rtol=1e-5, atol=1e-6)  # smaller blocks: other rounding


def test_log_attention_auto_is_torch_on_cpu():
    q, k, v, q_pos, k_pos, _ = _make("causal", 1, 2, 1, 9, 8, 8, torch.float32)
    torch.testing.assert_close(
        log_attention(q, k, v, q_pos=q_pos, k_pos=k_pos),
        log_attention(q, k, v, q_pos=q_pos, k_pos=k_pos, impl="torch"),
        rtol=0,
        atol=0,
    )


def test_log_attention_triton_on_cpu_never_falls_back(monkeypatch):
    if importlib.util.find_spec("triton") is not None:
        # Import (decorate) the kernels under the interpreter first: one first imported without it would stay
        # compiled for a GPU for every later test of the session.
        importlib.import_module("tcopilot.kernels.log_attention.triton_impl")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v, q_pos, k_pos, _ = _make("causal", 1, 2, 1, 9, 8, 8, torch.float32)
    # NotImplementedError while no kernel is importable, ValueError (needs CUDA) once there is one
    with pytest.raises((NotImplementedError, ValueError)):
        log_attention(q, k, v, q_pos=q_pos, k_pos=k_pos, impl="triton")


def _bad_inputs():
    b, hq, hk, lq, lk, d, dv = 2, 4, 2, 5, 7, 8, 6
    q = torch.randn(b, hq, lq, d)
    k = torch.randn(b, hk, lk, d)
    v = torch.randn(b, hk, lk, dv)
    q_pos, k_pos = _arange(b, lq), _arange(b, lk)
    base = dict(q=q, k=k, v=v, q_pos=q_pos, k_pos=k_pos)
    cases = {
        "q_rank": ("q", dict(q=q[0])),
        "q_int": ("q", dict(q=q.long())),
        "k_rank": ("k", dict(k=k[0])),
        "v_rank": ("v", dict(v=v[..., 0])),
        "k_batch": ("k", dict(k=k[:1])),
        "v_batch": ("v", dict(v=v[:1])),
        "k_head_dim": ("k", dict(k=k[..., :-1])),
        "v_length": ("v", dict(v=v[:, :, :-1])),
        "v_heads": ("v", dict(v=v[:, :1])),
        "heads_not_multiple": ("k", dict(q=q[:, :3])),
        "k_dtype": ("k", dict(k=k.double())),
        "v_dtype": ("v", dict(v=v.half())),
        "k_device": ("k", dict(k=k.to("meta"))),
        "q_pos_float": ("q_pos", dict(q_pos=q_pos.float())),
        "q_pos_shape": ("q_pos", dict(q_pos=q_pos[:, :-1])),
        "q_pos_rank": ("q_pos", dict(q_pos=q_pos[0])),
        "k_pos_shape": ("k_pos", dict(k_pos=k_pos[:1])),
        "k_pos_float": ("k_pos", dict(k_pos=k_pos.double())),
        "k_pos_device": ("k_pos", dict(k_pos=k_pos.to("meta"))),
        "scale_zero": ("scale", dict(scale=0.0)),
        "scale_negative": ("scale", dict(scale=-1.0)),
        "scale_nan": ("scale", dict(scale=float("nan"))),
        "scale_inf": ("scale", dict(scale=float("inf"))),
        "impl": ("impl", dict(impl="cuda")),
    }
    return {name: (arg, {**base, **change}) for name, (arg, change) in cases.items()}


BAD = _bad_inputs()


@pytest.mark.parametrize("name", list(BAD))
def test_log_attention_rejects_bad_input(name):
    arg, kwargs = BAD[name]
    q, k, v = kwargs.pop("q"), kwargs.pop("k"), kwargs.pop("v")
    with pytest.raises(ValueError, match=rf"^{arg}\b"):
        log_attention(q, k, v, **kwargs)
