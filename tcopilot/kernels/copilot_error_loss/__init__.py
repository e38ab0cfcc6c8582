"""``copilot_error_loss``: the Copilot's token RMSE from the capture's statistics, no vocabulary pass."""

from .api import copilot_error_loss
from .reference import copilot_error_loss_reference

__all__ = ["copilot_error_loss", "copilot_error_loss_reference"]
