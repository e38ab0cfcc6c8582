"""Loading a Pilot for fine-tuning: from a folder, a Hub id, or a GGUF file; and training only its top layers.

Two things every run on a small machine needed and wrote by hand (``examples/reproduce.py`` did):

- A Pilot loaded from a GGUF file (``from_pretrained(..., gguf_file=...)``) is dequantised into ordinary float
  weights, but transformers still leaves a GGUF quantizer on the model and a ``quantization_config`` in its
  config. ``save_pretrained`` then refuses or writes a config that claims quantised weights, so checkpoints of the
  fine-tuned Pilot do not round-trip. :func:`load_pilot` removes both, since the weights really are plain floats.
- Fine-tuning only the top K decoder layers (and the final norm) of a Pilot, the cheap setting used when the full
  model does not fit the time budget: :func:`freeze_pilot_layers`. The trainers hand every Pilot parameter to
  AdamW; frozen ones have no gradient and AdamW skips them, so nothing else changes.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from tcopilot.pilot import find_decoder_layers


def strip_gguf_quantizer(model: nn.Module) -> nn.Module:
    """Remove the quantizer and ``quantization_config`` that a GGUF load leaves on a dequantised model.

    Only call this on a model whose weights are plain float tensors (true after a GGUF load, which dequantises);
    returns ``model`` so calls chain.
    """
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    for attr in ("is_quantized", "quantization_method"):
        if getattr(model, attr, None):
            try:
                setattr(model, attr, None if attr == "quantization_method" else False)
            except AttributeError:  # a read-only property in some transformers versions: derived from the above
                pass
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    return model


def load_pilot(
    name_or_path: str,
    *,
    gguf_file: str | None = None,
    dtype: torch.dtype = torch.float32,
    cache_dir: str | None = None,
):
    """``(model, tokenizer)`` of a causal LM to fine-tune as the Pilot.

    Args:
        name_or_path: a local folder or a Hub id (as ``AutoModelForCausalLM.from_pretrained``).
        gguf_file: the ``.gguf`` file name inside ``name_or_path`` to load and dequantise (None: a normal
            checkpoint). The result has its GGUF quantizer removed (:func:`strip_gguf_quantizer`), so
            ``save_pretrained`` works.
        dtype: the weights' dtype after loading (GGUF weights are dequantised to it).
        cache_dir: when given, a folder holding a converted copy (safetensors + tokenizer): loaded from there when
            it exists, written there after a GGUF conversion otherwise. GGUF conversion takes about a minute for a
            135M model on a CPU; the cached copy loads in about a second.

    Raises:
        ValueError: when ``gguf_file`` does not exist in the folder ``name_or_path``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if cache_dir and os.path.exists(os.path.join(cache_dir, "config.json")):
        return AutoModelForCausalLM.from_pretrained(cache_dir, dtype=dtype), AutoTokenizer.from_pretrained(cache_dir)
    kw = {}
    if gguf_file is not None:
        if os.path.isdir(name_or_path) and not os.path.exists(os.path.join(name_or_path, gguf_file)):
            have = sorted(f for f in os.listdir(name_or_path) if f.endswith(".gguf"))
            raise ValueError(f"gguf_file: expected a .gguf file in {name_or_path!r}, got {gguf_file!r} "
                             f"(the folder has {have or 'no .gguf files'})")
        kw["gguf_file"] = gguf_file
    tok = AutoTokenizer.from_pretrained(name_or_path, **kw)
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, **kw)
    if gguf_file is not None:
        strip_gguf_quantizer(model)
    if cache_dir:
        model.save_pretrained(cache_dir)
        tok.save_pretrained(cache_dir)
    return model, tok


def _final_norm(pilot: nn.Module) -> nn.Module | None:
    """The norm applied after the last decoder layer (Llama/Qwen2: ``model.norm``, GPT-2: ``transformer.ln_f``)."""
    base = getattr(pilot, "base_model", pilot)  # HF: the backbone; peft: unwrap further below
    for holder in (base, getattr(base, "model", None), getattr(pilot, "model", None),
                   getattr(pilot, "transformer", None)):
        if holder is None:
            continue
        for name in ("norm", "ln_f", "final_layernorm", "final_layer_norm"):
            mod = getattr(holder, name, None)
            if isinstance(mod, nn.Module) and not isinstance(mod, nn.ModuleList):
                return mod
    return None


def freeze_pilot_layers(pilot: nn.Module, train_layers: int) -> int:
    """Train only the top ``train_layers`` decoder layers and the final norm; returns the trainable count.

    ``train_layers=0`` leaves every parameter as it is (full fine-tuning). Embeddings and the LM head (often tied
    to the embeddings) are frozen, with everything else below the top layers.

    Raises:
        ValueError: when ``train_layers`` is not an int in ``[0, number of decoder layers]``.
    """
    layers = find_decoder_layers(pilot)
    if isinstance(train_layers, bool) or not isinstance(train_layers, int) or not 0 <= train_layers <= len(layers):
        raise ValueError(f"train_layers: expected an int in [0, {len(layers)}] (the Pilot's decoder layers), "
                         f"got {train_layers!r}")
    if train_layers > 0:
        for p in pilot.parameters():
            p.requires_grad_(False)
        for layer in layers[len(layers) - train_layers:]:
            for p in layer.parameters():
                p.requires_grad_(True)
        norm = _final_norm(pilot)
        if norm is not None:
            for p in norm.parameters():
                p.requires_grad_(True)
    return sum(p.numel() for p in pilot.parameters() if p.requires_grad)
