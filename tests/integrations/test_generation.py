"""GenerationConfig-named options of TransformerCopilot.generate / tcopilot.generate."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig

from tcopilot import Copilot, TransformerCopilot, generate
from tcopilot.testing import tiny_pair, tiny_pilot

IDS = torch.tensor([[5, 9, 13, 17, 21], [0, 0, 3, 4, 5]])
MASK = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])


@pytest.fixture(scope="module")
def model():
    return tiny_pair("llama")


def _gen(seed=3):
    return torch.Generator().manual_seed(seed)


def test_generation_config_equals_keywords(model):
    kw = dict(max_new_tokens=6, do_sample=True, temperature=0.7, top_k=10, top_p=0.9, eos_token_id=[7, 8],
              pad_token_id=0)
    by_kw = model.generate(IDS, attention_mask=MASK, lam=1.0, generator=_gen(), **kw)
    cfg = GenerationConfig(**kw)
    by_cfg = model.generate(IDS, attention_mask=MASK, lam=1.0, generator=_gen(), generation_config=cfg)
    positional = model.generate(IDS, cfg, attention_mask=MASK, lam=1.0, generator=_gen())
    functional = generate(model, IDS, attention_mask=MASK, generation_config=cfg, generator=_gen())
    assert by_kw.shape == (2, 11)
    assert torch.equal(by_kw, by_cfg) and torch.equal(by_kw, positional) and torch.equal(by_kw, functional)
    # a keyword overrides the config, as in PreTrainedModel.generate
    short = model.generate(IDS, attention_mask=MASK, generator=_gen(), generation_config=cfg, max_new_tokens=2)
    assert short.shape == (2, 7)
    # max_length counts the prompt when max_new_tokens is unset
    assert model.generate(IDS, generation_config=GenerationConfig(max_length=8)).shape == (2, 8)


def test_do_sample_false_is_greedy_whatever_the_temperature(model):
    greedy = model.generate(IDS, attention_mask=MASK, max_new_tokens=6)
    hot = model.generate(IDS, attention_mask=MASK, max_new_tokens=6, do_sample=False, temperature=5.0, top_k=3,
                         generator=_gen())
    cfg = model.generate(IDS, attention_mask=MASK, generation_config=GenerationConfig(
        max_new_tokens=6, do_sample=False, temperature=5.0))
    assert torch.equal(greedy, hot) and torch.equal(greedy, cfg)
    sampled = [model.generate(IDS, attention_mask=MASK, max_new_tokens=6, do_sample=True, temperature=5.0,
                              generator=_gen(s)) for s in range(4)]
    assert any(not torch.equal(s, greedy) for s in sampled), "sampling at T=5 never left the greedy path"
    # the older convention still holds when do_sample is not given: temperature > 0 samples
    legacy = model.generate(IDS, attention_mask=MASK, max_new_tokens=6, temperature=5.0, generator=_gen(0))
    assert torch.equal(legacy, sampled[0])


def test_eos_list_stops_and_pads(model):
    first = model.generate(IDS, attention_mask=MASK, max_new_tokens=1)[:, -1]
    out = model.generate(IDS, attention_mask=MASK, max_new_tokens=5,
                         generation_config=GenerationConfig(eos_token_id=[int(first[0]), 96], pad_token_id=1))
    assert out[0, IDS.shape[1]] == first[0] and (out[0, IDS.shape[1] + 1:] == 1).all()


def test_bad_combinations_raise(model):
    assert model.generate(IDS, max_new_tokens=2, num_beams=3).shape[0] == 2  # beam search is implemented
    with pytest.raises(ValueError, match="num_beams"):
        model.generate(IDS, max_new_tokens=2, num_beams=0)
    with pytest.raises(ValueError, match="beam sampling"):
        model.generate(IDS, generation_config=GenerationConfig(num_beams=2, do_sample=True))
    with pytest.raises(ValueError, match="temperature"):
        model.generate(IDS, max_new_tokens=2, do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="repetition_penalty"):
        model.generate(IDS, generation_config=GenerationConfig(repetition_penalty=1.3))
    with pytest.raises(ValueError, match="num_return_sequences"):
        model.generate(IDS, generation_config=GenerationConfig(num_return_sequences=2, do_sample=True))
    with pytest.raises(ValueError, match="generation_config"):
        model.generate(IDS, generation_config={"max_new_tokens": 3})
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(IDS, max_new_tokens=-1)
    # neutral values of unsupported fields are fine
    model.generate(IDS, max_new_tokens=1, generation_config=GenerationConfig(repetition_penalty=1.0))


def test_bad_models_raise():
    pilot = tiny_pilot("llama")
    wrong_vocab = Copilot.from_pilot(tiny_pilot("llama", vocab=100))
    with pytest.raises(ValueError, match="vocab_size"):
        TransformerCopilot(pilot, wrong_vocab)
    no_hidden = tiny_pilot("llama")
    no_hidden.base_model_prefix = "missing"  # base_model is then the causal LM itself: logits, no hidden states
    with pytest.raises(ValueError, match="last_hidden_state"):
        TransformerCopilot(no_hidden, None)(torch.tensor([[1, 2, 3]]))
