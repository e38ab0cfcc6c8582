"""Fused decode head: both vocabulary products feeding the rectified next-token choice (see ``api``)."""

from .api import rectified_decode_head
from .reference import rectified_decode_head_reference

__all__ = ["rectified_decode_head", "rectified_decode_head_reference"]
