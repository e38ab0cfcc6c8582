"""Shared test fixtures."""

from __future__ import annotations

import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors. The variable must be set
# before any kernel module is imported (triton.jit reads it at decoration time), hence here.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def gen() -> torch.Generator:
    """A CPU generator with a fixed seed, so each test draws the same data whatever runs before it."""
    return torch.Generator().manual_seed(0)
