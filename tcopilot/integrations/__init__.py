"""Hugging Face ecosystem integrations: ``transformers.Trainer``, PEFT/LoRA, TRL recipes.

Imported lazily so that ``import tcopilot.integrations`` costs nothing and needs neither ``accelerate``
(required by ``transformers.Trainer``) nor ``peft`` until the name that needs it is used. Install the
extras with ``pip install "tcopilot[hf]"``.

- :class:`CopilotTrainer`: a ``transformers.Trainer`` for a :class:`tcopilot.TransformerCopilot`.
- :func:`load_checkpoint`: load a ``CopilotTrainer`` checkpoint (Pilot + ``copilot/``) into a model.
- :func:`lora_copilot`: LoRA on the Copilot's decoder layers (``peft``), heads trained in full.
- :func:`load_adapters`: load saved PEFT adapters into a PEFT model in place.
"""

from __future__ import annotations

_EXPORTS = {
    "CopilotTrainer": "tcopilot.integrations.trainer",
    "COPILOT_DIR": "tcopilot.integrations.trainer",
    "load_checkpoint": "tcopilot.integrations.trainer",
    "save_checkpoint": "tcopilot.integrations.trainer",
    "lora_copilot": "tcopilot.integrations.lora",
    "load_adapters": "tcopilot.integrations.lora",
    "is_peft_model": "tcopilot.integrations.lora",
    "COPILOT_LORA_TARGETS": "tcopilot.integrations.lora",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'tcopilot.integrations' has no attribute {name!r}")
