"""Position-masked (log) attention: see ``api.log_attention``."""

from .api import log_attention
from .reference import log_attention_reference

__all__ = ["log_attention", "log_attention_reference"]
