from __future__ import annotations

import pytest
from decode_audit import spy_host_copies


@pytest.fixture
def host_copies(monkeypatch):
    """``.tolist()`` / ``.numpy()`` calls outside the Triton interpreter (they do not dispatch an aten op)."""
    return spy_host_copies(monkeypatch)
