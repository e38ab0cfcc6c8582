"""tcopilot.loading: GGUF quantizer stripping (save_pretrained round-trip) and top-layer freezing."""

from __future__ import annotations

import pytest
import torch

from tcopilot.loading import freeze_pilot_layers, load_pilot, strip_gguf_quantizer
from tcopilot.pilot import find_decoder_layers
from tcopilot.testing import tiny_pilot


def test_freeze_pilot_layers_trains_top_layers_and_final_norm():
    pilot = tiny_pilot()
    layers = find_decoder_layers(pilot)
    n = freeze_pilot_layers(pilot, 1)
    expected = {id(p) for p in layers[-1].parameters()} | {id(p) for p in pilot.model.norm.parameters()}
    trainable = {id(p) for p in pilot.parameters() if p.requires_grad}
    assert trainable == expected
    assert n == sum(p.numel() for p in pilot.parameters() if p.requires_grad)
    assert not pilot.model.embed_tokens.weight.requires_grad


def test_freeze_pilot_layers_zero_keeps_everything_trainable():
    pilot = tiny_pilot()
    total = sum(p.numel() for p in pilot.parameters())
    assert freeze_pilot_layers(pilot, 0) == total


@pytest.mark.parametrize("bad", [-1, 99, 1.5, True, "2"])
def test_freeze_pilot_layers_rejects_bad_counts(bad):
    with pytest.raises(ValueError, match="train_layers"):
        freeze_pilot_layers(tiny_pilot(), bad)


def test_strip_gguf_quantizer_lets_save_pretrained_round_trip(tmp_path):
    from transformers import AutoModelForCausalLM

    pilot = tiny_pilot()
    # What a GGUF load leaves behind (weights already dequantised to float).
    pilot.hf_quantizer = object()
    pilot.config.quantization_config = {"quant_method": "gguf"}
    strip_gguf_quantizer(pilot)
    assert pilot.hf_quantizer is None and not hasattr(pilot.config, "quantization_config")
    pilot.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert getattr(again.config, "quantization_config", None) is None
    for (name, a), b in zip(pilot.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name


def test_load_pilot_names_a_missing_gguf_file(tmp_path):
    (tmp_path / "model.Q4.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match=r"gguf_file: .*model\.Q4\.gguf"):
        load_pilot(str(tmp_path), gguf_file="missing.gguf")


def test_freeze_pilot_layers_gpt2_final_norm():
    pilot = tiny_pilot("gpt2")
    freeze_pilot_layers(pilot, 1)
    assert all(p.requires_grad for p in pilot.transformer.ln_f.parameters())
    assert all(p.requires_grad for p in pilot.transformer.h[-1].parameters())
    assert not any(p.requires_grad for p in pilot.transformer.h[0].parameters())
