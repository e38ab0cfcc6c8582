"""tcopilot: the Transformer Copilot method (Zou et al., NeurIPS 2025) with fused Triton kernels.

Public API (DESIGN.md section 5): the fused ops ``logit_capture`` (returning a ``Capture``),
``copilot_error_loss``, ``log_attention``, ``rectified_next_token``, ``rectified_decode_head`` (each with a
naive ``*_reference`` oracle), the models ``CopilotConfig`` / ``Copilot`` / ``TransformerCopilot``,
``generate`` / ``generate_settings`` (a lambda sweep over one prefill), ``GraphDecoder`` (CUDA-graph decoding
reused across calls), and the replay buffer ``MistakeLog``.

Every name above is imported at its first use (``from tcopilot import logit_capture`` loads that op and torch;
``tcopilot.Copilot`` loads ``transformers``, which takes seconds), so ``import tcopilot`` and ``tcopilot --help``
are instant. Triton is imported lazily too, so ``import tcopilot`` works on machines without it.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what the lazy names are, for type checkers and editors
    from tcopilot.copilot import Copilot, CopilotConfig
    from tcopilot.generate import generate, generate_settings
    from tcopilot.graph_decode import GraphDecoder
    from tcopilot.kernels.copilot_error_loss import copilot_error_loss, copilot_error_loss_reference
    from tcopilot.kernels.log_attention import log_attention, log_attention_reference
    from tcopilot.kernels.logit_capture import Capture, logit_capture, logit_capture_reference
    from tcopilot.kernels.rectified_decode_head import rectified_decode_head, rectified_decode_head_reference
    from tcopilot.kernels.rectified_next_token import rectified_next_token, rectified_next_token_reference
    from tcopilot.mistake_log import MistakeLog
    from tcopilot.pilot import TransformerCopilot

__version__ = "0.1.0"

# Name -> the module that defines it, imported at the first access of the name.
_LAZY = {
    "Capture": "tcopilot.kernels.logit_capture",
    "Copilot": "tcopilot.copilot",
    "CopilotConfig": "tcopilot.copilot",
    "GraphDecoder": "tcopilot.graph_decode",
    "MistakeLog": "tcopilot.mistake_log",
    "TransformerCopilot": "tcopilot.pilot",
    "copilot_error_loss": "tcopilot.kernels.copilot_error_loss",
    "copilot_error_loss_reference": "tcopilot.kernels.copilot_error_loss",
    "generate": "tcopilot.generate",
    "generate_settings": "tcopilot.generate",
    "log_attention": "tcopilot.kernels.log_attention",
    "log_attention_reference": "tcopilot.kernels.log_attention",
    "logit_capture": "tcopilot.kernels.logit_capture",
    "logit_capture_reference": "tcopilot.kernels.logit_capture",
    "rectified_decode_head": "tcopilot.kernels.rectified_decode_head",
    "rectified_decode_head_reference": "tcopilot.kernels.rectified_decode_head",
    "rectified_next_token": "tcopilot.kernels.rectified_next_token",
    "rectified_next_token_reference": "tcopilot.kernels.rectified_next_token",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module), name)
        globals()[name] = value
        return value
    # A submodule, so that dotted names work after a bare ``import tcopilot`` (``tcopilot.train.Trainer``,
    # ``tcopilot.integrations.CopilotTrainer``, ``tcopilot.pilot.LOGIT_SCALE_RULES``); importing it binds it here.
    if not name.startswith("__") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'tcopilot' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value) -> None:
        # Importing the submodule ``tcopilot.generate`` sets the package attribute ``generate`` to that module,
        # which would hide the function of the same name (the eager imports this file used to make rebound it
        # right after). The module stays reachable as sys.modules["tcopilot.generate"].
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

__all__ = [  # the names of _LAZY (tests/test_package.py checks that they agree)
    "Capture",
    "Copilot",
    "CopilotConfig",
    "GraphDecoder",
    "MistakeLog",
    "TransformerCopilot",
    "copilot_error_loss",
    "copilot_error_loss_reference",
    "generate",
    "generate_settings",
    "log_attention",
    "log_attention_reference",
    "logit_capture",
    "logit_capture_reference",
    "rectified_decode_head",
    "rectified_decode_head_reference",
    "rectified_next_token",
    "rectified_next_token_reference",
]
