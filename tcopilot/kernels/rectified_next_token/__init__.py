"""Next-token selection from the Pilot's logits rectified by the Copilot: see ``api.rectified_next_token``."""

from .api import rectified_next_token
from .reference import rectified_next_token_reference, rectified_probs_reference

__all__ = ["rectified_next_token", "rectified_next_token_reference", "rectified_probs_reference"]
