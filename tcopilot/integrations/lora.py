"""PEFT/LoRA for both models of a :class:`tcopilot.TransformerCopilot`.

**Pilot.** Wrap it as usual and hand the ``PeftModel`` to ``TransformerCopilot``::

    from peft import LoraConfig, get_peft_model
    pilot = get_peft_model(pilot, LoraConfig(r=32, lora_alpha=64, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))          # the paper's r=32, alpha=64
    model = TransformerCopilot(pilot, Copilot.from_pilot(pilot.get_base_model()))

``TransformerCopilot`` runs the decoder stack of ``pilot.get_base_model()`` (with the adapters active:
LoRA lives inside the wrapped Linear layers) and applies the fused LM head itself, so hidden-state capture,
``logit_capture`` and generation behave as with a plain Pilot. Two limits: the LM head must not be a LoRA
target (the fused op reads ``lm_head.weight``; ``target_modules="all-linear"`` already leaves it out, and
``modules_to_save=["lm_head"]`` is fine), and prompt-learning methods (prefix/prompt tuning) are refused.
``pilot.save_pretrained(dir)`` saves the adapter only; :func:`load_adapters` (or ``PeftModel.from_pretrained``)
loads it back.

**Copilot.** :func:`lora_copilot` puts LoRA on the Copilot's attention and MLP projections and trains its
error heads (``error_in``, ``error_out``, and ``pilot_proj`` when the widths differ) in full: they are new
(``error_out`` starts at zero) and the fused ops read their weights directly, so they cannot carry LoRA.
This is useful when the Copilot starts from pretrained decoder layers (``Copilot.from_pilot_layers``).
"""

from __future__ import annotations

import os

from torch import nn

# The Copilot's projections inside its decoder layers (Llama naming, see tcopilot/copilot.py).
COPILOT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_HEADS = ("error_in", "error_out", "pilot_proj")


def is_peft_model(module: nn.Module) -> bool:
    """True for a ``peft.PeftModel`` (without importing peft when it is not installed)."""
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(module, PeftModel)


def lora_copilot(copilot, r: int = 32, alpha: float = 64, *, dropout: float = 0.0,
                 target_modules=COPILOT_LORA_TARGETS, train_heads: bool = True, **lora_kwargs):
    """Wrap a :class:`tcopilot.Copilot` in a ``peft.PeftModel`` with LoRA on its decoder layers.

    Args:
        copilot: the Copilot (e.g. ``Copilot.from_pilot_layers(pilot, layers=[...])``).
        r / alpha / dropout: ``LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout)``.
        target_modules: names of Linear layers inside the decoder layers; ``error_in``, ``error_out`` and
            ``pilot_proj`` are refused (the fused ops read their weights, a LoRA delta would be ignored).
        train_heads: train ``error_in``, ``error_out`` (and ``pilot_proj`` when present) in full via PEFT's
            ``modules_to_save`` (saved with the adapter). Without it ``error_out`` stays at its zero init.
        lora_kwargs: more ``LoraConfig`` fields.

    Returns the ``PeftModel``; pass it to ``TransformerCopilot(pilot, peft_copilot)``. ``save_pretrained``
    writes the adapter and the heads; the frozen layers come from how the base Copilot was built
    (``from_pilot_layers`` is deterministic given the Pilot), so rebuild it the same way and call
    :func:`load_adapters` (or ``peft.PeftModel.from_pretrained(base_copilot, dir)``).
    """
    from peft import LoraConfig, get_peft_model

    from tcopilot.copilot import Copilot

    if not isinstance(copilot, Copilot):
        raise ValueError(f"copilot: expected a tcopilot.Copilot, got {type(copilot).__name__}")
    targets = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    bad = [t for t in targets if t in _HEADS]
    if bad:
        raise ValueError(
            f"target_modules: {bad} cannot carry LoRA (the fused ops read their weights directly); "
            "train them in full with train_heads=True instead"
        )
    to_save = None
    if train_heads:
        to_save = [h for h in _HEADS if isinstance(getattr(copilot, h, None), nn.Linear)]
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                        modules_to_save=to_save, **lora_kwargs)
    return get_peft_model(copilot, config)


def load_adapters(model, path: str) -> None:
    """Load adapter weights saved by ``PeftModel.save_pretrained(path)`` into ``model`` (a ``PeftModel``) in place,
    into its active adapter. Raises ValueError when ``path`` holds no adapter or its keys do not match."""
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    if not is_peft_model(model):
        raise ValueError(f"model: expected a peft.PeftModel, got {type(model).__name__}")
    if not any(os.path.isfile(os.path.join(path, f)) for f in ("adapter_model.safetensors", "adapter_model.bin")):
        raise ValueError(f"path: no adapter_model.safetensors in {path!r}")
    weights = load_peft_weights(path, device="cpu")
    result = set_peft_model_state_dict(model, weights, adapter_name=model.active_adapter)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise ValueError(f"path: adapter in {path!r} has keys this model lacks: {unexpected[:5]}")


__all__ = ["COPILOT_LORA_TARGETS", "is_peft_model", "lora_copilot", "load_adapters"]
