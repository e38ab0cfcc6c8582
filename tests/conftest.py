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
