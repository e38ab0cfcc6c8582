"""``logit_capture``: the Pilot loss and the Mistake Log statistics in one pass over the vocabulary."""

from .api import logit_capture
from .capture import Capture
from .reference import logit_capture_reference

__all__ = ["Capture", "logit_capture", "logit_capture_reference"]
