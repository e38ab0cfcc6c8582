"""tcopilot: the Transformer Copilot method (Zou et al., NeurIPS 2025) with fused Triton kernels.

Public API (DESIGN.md section 5): the fused ops ``logit_capture`` (returning a ``Capture``),
``copilot_error_loss``, ``log_attention``, ``rectified_next_token``, ``rectified_decode_head`` (each with a
naive ``*_reference`` oracle), the models ``CopilotConfig`` / ``Copilot`` / ``TransformerCopilot``,
``generate`` / ``generate_settings`` (a lambda sweep over one prefill), ``GraphDecoder`` (CUDA-graph decoding
reused across calls), and the replay buffer ``MistakeLog``.
Triton is imported lazily, so ``import tcopilot`` works on machines without it.
"""

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

__all__ = [
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
