"""The shared ``@triton.jit`` math helpers (``tcopilot/kernels/_triton_math.py``) against float64 PyTorch."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton / the kernels

import pytest  # noqa: E402

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from tcopilot.kernels._triton_math import softcap  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@triton.jit
def _softcap_kernel(x_ptr, y_ptr, n, cap, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, softcap(tl.load(x_ptr + offs, mask=mask), cap), mask=mask)


def _softcap(x, cap):
    y = torch.empty_like(x)
    _softcap_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), cap, BLOCK=1024)
    return y


@pytest.mark.parametrize("cap", [0.5, 30.0, 1e4])
def test_softcap_fp32_relative_error_is_a_few_ulp(cap):
    # Dense over [-3 cap, 3 cap] (both branches and the 0.25 switch), tiny |z| down to 1e-30 * cap (where a
    # 1 - exp(-2|x|) form loses every bit), and the saturated ends.
    x64 = torch.cat([
        torch.linspace(-3, 3, 6001, dtype=torch.float64) * cap,
        torch.logspace(-30, 0.5, 800, dtype=torch.float64) * cap,
        -torch.logspace(-30, 0.5, 800, dtype=torch.float64) * cap,
        torch.tensor([0.0, 0.2499 * cap, 0.25 * cap, 0.2501 * cap, 1e30], dtype=torch.float64),
    ])  # fmt: skip
    x = x64.float().to(DEV)
    got = _softcap(x, cap).double().cpu()
    want = cap * torch.tanh(x.double().cpu() / cap)
    rel = (got - want).abs() / want.abs().clamp_min(torch.finfo(torch.float32).tiny)
    assert rel.max().item() <= 4 * torch.finfo(torch.float32).eps, rel.max().item()
    assert got[-1] == cap and got[-5] == 0


def test_softcap_fp64_absolute_error():
    x = (torch.linspace(-3, 3, 4001, dtype=torch.float64) * 30.0).to(DEV)
    got = _softcap(x, 30.0).cpu()
    want = 30.0 * torch.tanh(x.cpu() / 30.0)
    assert (got - want).abs().max().item() <= 30.0 * 4 * torch.finfo(torch.float64).eps
