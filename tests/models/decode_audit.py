"""What a CUDA graph's decode step must not do, checked on the CPU (shared by the graph-decoding tests).

``StepAudit`` records every aten op with its shapes and every host read of a tensor's values; the ``host_copies``
fixture (``tests/models/conftest.py``) records ``.tolist()`` / ``.numpy()`` calls, which dispatch no aten op.
"""

from __future__ import annotations

import os
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

HOST_READS = ("_local_scalar_dense", "nonzero", "masked_select", "unique")


class StepAudit(TorchDispatchMode):
    """Records every aten op with its tensor shapes, and every host read of a tensor's values."""

    def __init__(self):
        super().__init__()
        self.ops, self.host_reads = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if any(r in name for r in HOST_READS):
            self.host_reads.append(name)
        self.ops.append((name, tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))))
        return func(*args, **(kwargs or {}))


def outside_triton_interpreter() -> bool:
    # The interpreter runs kernels on the host: its own copies to numpy are not a GPU launch's.
    frame = sys._getframe(2)
    while frame is not None:
        if f"{os.sep}triton{os.sep}" in frame.f_code.co_filename:
            return False
        frame = frame.f_back
    return True


def spy_host_copies(monkeypatch) -> list:
    """Patch ``Tensor.tolist`` / ``Tensor.numpy`` to record their calls outside the Triton interpreter."""
    seen = []
    for name in ("tolist", "numpy"):
        original = getattr(torch.Tensor, name)

        def spy(self, *a, _original=original, _name=name, **k):
            if outside_triton_interpreter():
                seen.append(_name)
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, spy)
    return seen
