"""Shared test fixtures."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def gen() -> torch.Generator:
    """A CPU generator with a fixed seed, so each test draws the same data whatever runs before it."""
    return torch.Generator().manual_seed(0)
