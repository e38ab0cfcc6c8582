"""Shared test fixtures."""

from __future__ import annotations

import importlib
import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors. The variable must be set
# before any kernel module is imported (triton.jit reads it at decoration time), hence here.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _poison_fresh_memory(set_attr=setattr) -> None:
    """``TCOPILOT_TEST_POISON_EMPTY=1``: every ``torch.empty`` / ``empty_like`` / ``Tensor.new_empty`` made from
    Python comes back filled with NaN (floats), a large integer, or True, so that code reading memory it never
    wrote fails instead of passing on whatever the allocator happened to hand out (a static decode cache did).
    ``set_attr``: how the three are replaced (``monkeypatch.setattr`` for one test: the ``poison_fresh_memory``
    fixture)."""
    real = (torch.empty, torch.empty_like, torch.Tensor.new_empty)

    def poison(t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point() or t.is_complex():
            return t.fill_(float("nan"))
        if t.dtype == torch.bool:
            return t.fill_(True)
        return t.fill_(torch.iinfo(t.dtype).max // 3)

    set_attr(torch, "empty", lambda *a, **k: poison(real[0](*a, **k)))
    set_attr(torch, "empty_like", lambda *a, **k: poison(real[1](*a, **k)))
    set_attr(torch.Tensor, "new_empty", lambda self, *a, **k: poison(real[2](self, *a, **k)))


if os.environ.get("TCOPILOT_TEST_POISON_EMPTY", "0") == "1":
    _poison_fresh_memory()


@pytest.fixture
def poison_fresh_memory(monkeypatch):
    """Call it to poison fresh memory (as ``TCOPILOT_TEST_POISON_EMPTY=1`` does) for the rest of the test."""
    return lambda: _poison_fresh_memory(monkeypatch.setattr)


def pytest_collection_modifyitems(config, items):
    # gpu_late: GPU tests with long cold compilations (inductor) run after all others, so that a time-limited GPU
    # run (benchmarks/gpu_check.sh's test stage) cuts them first. A stable sort: the rest keeps its order.
    items.sort(key=lambda item: item.get_closest_marker("gpu_late") is not None)


@pytest.fixture
def gen() -> torch.Generator:
    """A CPU generator with a fixed seed, so each test draws the same data whatever runs before it."""
    return torch.Generator().manual_seed(0)


@pytest.fixture
def head_calls(monkeypatch):
    """The ``impl`` of each call generate() makes to the fused decode head (a spy on ``tcopilot.generate``'s
    module; the package attribute of that name is the function)."""
    generate_mod = importlib.import_module("tcopilot.generate")
    calls = []
    real = generate_mod.rectified_decode_head

    def spy(*args, **kwargs):
        calls.append(kwargs["impl"])
        return real(*args, **kwargs)

    monkeypatch.setattr(generate_mod, "rectified_decode_head", spy)
    return calls
