"""Bad combinations raise a ValueError that names the option and says what to do instead.

The plain "it raises" checks live beside their features (tests/models/test_beam_search.py,
test_transformer_copilot.py, tests/integrations/test_generation.py); here each message is also checked for its
remedy, so a reworded error cannot silently drop the advice.
"""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig

from tcopilot import Copilot, TransformerCopilot
from tcopilot.testing import tiny_pair, tiny_pilot

IDS = torch.tensor([[5, 9, 13, 17], [2, 4, 6, 8]])


@pytest.fixture(scope="module")
def model():
    return tiny_pair("llama")


@pytest.mark.parametrize("how", ["keywords", "generation_config"])
def test_beam_search_with_sampling(model, how):
    kw = dict(max_new_tokens=2, num_beams=2, do_sample=True)
    with pytest.raises(ValueError, match="beam sampling") as err:
        if how == "keywords":
            model.generate(IDS, **kw)
        else:
            model.generate(IDS, generation_config=GenerationConfig(**kw))
    assert "use do_sample=False (beam search) or num_beams=1 (sampling)" in str(err.value)
    # each half alone works
    assert model.generate(IDS, max_new_tokens=2, num_beams=2, do_sample=False).shape == (2, 6)
    assert model.generate(IDS, max_new_tokens=2, do_sample=True, generator=torch.Generator().manual_seed(0)).shape == (
        2, 6)


def test_copilot_with_another_vocabulary():
    pilot = tiny_pilot("llama")  # vocab 97
    other = Copilot.from_pilot(tiny_pilot("llama", vocab=100))
    with pytest.raises(ValueError, match=r"copilot: expected vocab_size=97 \(the Pilot's LM head\), got 100") as err:
        TransformerCopilot(pilot, other)
    assert "Copilot.from_pilot(pilot)" in str(err.value) and "tokenizer" in str(err.value)
    assert TransformerCopilot(pilot, Copilot.from_pilot(pilot)).copilot.config.vocab_size == 97


def test_copilot_for_another_pilot_width():
    pilot = tiny_pilot("llama")  # hidden 32
    wide = tiny_pilot("llama")
    wide.config.hidden_size = 48
    copilot = Copilot.from_pilot(wide, init_error_in=False)
    with pytest.raises(ValueError, match="pilot_hidden_size=32") as err:
        TransformerCopilot(pilot, copilot)
    assert "Copilot.from_pilot(pilot)" in str(err.value)


def test_pilot_without_hidden_state_outputs():
    pilot = tiny_pilot("llama")
    pilot.base_model_prefix = "missing"  # base_model is then the causal LM itself: logits, no last_hidden_state
    model = TransformerCopilot(pilot, Copilot.from_pilot(pilot))
    for call in (lambda: model(IDS), lambda: model.generate(IDS, max_new_tokens=1)):
        with pytest.raises(ValueError, match="returned no last_hidden_state") as err:
            call()
        assert "pass a Hugging Face causal LM whose base_model is the decoder stack" in str(err.value)


def test_pilot_without_lm_head():
    pilot = tiny_pilot("llama")
    pilot.get_output_embeddings = lambda: None
    with pytest.raises(ValueError, match=r"expected an LM head with a weight \(get_output_embeddings\(\)\)"):
        TransformerCopilot(pilot, None)


def test_activation_checkpointing_on_a_pilot_without_it():
    pytest.importorskip("accelerate")
    from integ_helpers import ckpt_flag
    from transformers import TrainingArguments

    from tcopilot.integrations.trainer import _enable_pilot_checkpointing

    args = TrainingArguments("unused", report_to=[], use_cpu=True, **{ckpt_flag(): True})
    with pytest.raises(ValueError, match="set activation_checkpointing=False"):
        _enable_pilot_checkpointing(torch.nn.Linear(2, 2), args)
