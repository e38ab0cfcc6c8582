"""generate() routed through the fused decode head (impl="torch"/"triton") equals the materialised path
(impl="auto" on the CPU: z = lm_head(h), f = error_out(g), rectified_next_token), a biased LM head included
(its bias goes to the head as ``lm_head_bias``), and LM heads the head cannot read exactly fall back to the
materialised path."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

from tcopilot import TransformerCopilot
from tcopilot.generate import generate
from tcopilot.pilot import LOGIT_SCALE_RULES
from tcopilot.testing import tiny_pair

# the module, not the function that ``tcopilot.generate`` names on the package
generate_mod = importlib.import_module("tcopilot.generate")


@pytest.fixture(scope="module")
def model():
    m = tiny_pair("llama", layers=2).eval()
    with torch.no_grad():  # a strong head so the Copilot actually changes tokens
        m.copilot.error_out.weight.normal_(0, 2.0)
    return m


def _prompts(B=3, L=5, vocab=97):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, vocab, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, :2] = 0  # left padding
    ids[1, :2] = 0
    return ids, mask


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("fusion", ["probs", "logits"])
@pytest.mark.parametrize("lam", [0.5, 1.0])
def test_greedy_head_equals_materialised(model, head_calls, impl, fusion, lam):
    ids, mask = _prompts()
    kw = dict(attention_mask=mask, max_new_tokens=5, lam=lam, fusion=fusion, do_sample=False)
    ref = generate(model, ids, impl="auto", **kw)  # CPU: the materialised path
    assert head_calls == []
    out = generate(model, ids, impl=impl, **kw)
    assert head_calls == [impl] * 5
    assert torch.equal(out, ref)
    if lam == 1.0:
        alone = generate(model, ids, attention_mask=mask, max_new_tokens=5, lam=0.0, impl=impl)
        assert not torch.equal(out, alone), "the test Copilot changes no token: the comparison is vacuous"


def _sharp_pair():
    """A tiny pair whose Pilot is confident (logits of std ~3, not ~0.1), so what its LM head does matters
    next to the Copilot (whose error_out has std 0.05)."""
    model = tiny_pair("llama", layers=1).eval()
    with torch.no_grad():
        model.pilot.get_output_embeddings().weight.mul_(30.0)
    return model


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("fusion", ["probs", "logits"])
def test_greedy_head_applies_softcap(head_calls, monkeypatch, impl, fusion):
    model = _sharp_pair()
    ids, mask = _prompts()
    kw = dict(attention_mask=mask, max_new_tokens=4, lam=1.0, fusion=fusion)
    plain = generate(model, ids, impl="auto", **kw)
    monkeypatch.setattr(model.pilot.config, "final_logit_softcapping", 4.0, raising=False)
    assert model.softcap == 4.0
    ref = generate(model, ids, impl="auto", **kw)
    out = generate(model, ids, impl=impl, **kw)
    assert head_calls == [impl] * 4
    assert torch.equal(out, ref)
    assert not torch.equal(ref, plain), "the softcap changes no token: the comparison is vacuous"


def _materialised(model, ids, impl, monkeypatch, **kw):
    """generate() with the fused head switched off: z and f materialised, rectified_next_token(impl=impl)."""
    with monkeypatch.context() as m:
        m.setattr(generate_mod, "_decode_head_weights", lambda *a: None)
        return generate(model, ids, impl=impl, **kw)


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("fusion", ["probs", "logits"])
def test_sampling_head_draws_like_materialised(model, head_calls, monkeypatch, impl, fusion):
    # the head's sampling materialises z and f and calls rectified_next_token(impl=impl): with the same
    # generator it draws the same tokens as the materialised path with the same sampler implementation
    ids, mask = _prompts()
    kw = dict(attention_mask=mask, max_new_tokens=5, lam=1.0, fusion=fusion, do_sample=True, temperature=0.9,
              top_k=30, top_p=0.95)
    ref = _materialised(model, ids, impl, monkeypatch, generator=torch.Generator().manual_seed(11), **kw)
    assert head_calls == []
    out = generate(model, ids, impl=impl, generator=torch.Generator().manual_seed(11), **kw)
    assert head_calls == [impl] * 5
    assert torch.equal(out, ref)
    other = generate(model, ids, impl=impl, generator=torch.Generator().manual_seed(12), **kw)
    assert not torch.equal(out, other), "the seed changes no draw: the comparison is vacuous"


def test_pilot_alone_and_lam_zero_stay_materialised(model, head_calls):
    ids, mask = _prompts()
    generate(model, ids, attention_mask=mask, max_new_tokens=3, lam=0.0, impl="torch")
    alone = TransformerCopilot(model.pilot, None)
    generate(alone, ids, attention_mask=mask, max_new_tokens=3, impl="triton")
    assert head_calls == []


class _SubclassedLinear(nn.Linear):
    """A Linear subclass (like a quantised linear): its forward may differ, so it is not read as plain."""

    def forward(self, x):
        return super().forward(x).flip(-1)


def _swap_head(model, kind):
    pilot = model.pilot
    old = pilot.get_output_embeddings()
    if kind == "bias":
        new = nn.Linear(old.in_features, old.out_features, bias=True)
        with torch.no_grad():
            new.weight.copy_(old.weight)
            new.bias.normal_(0, 1.0)
    elif kind == "subclass":
        new = _SubclassedLinear(old.in_features, old.out_features, bias=False)
        with torch.no_grad():
            new.weight.copy_(old.weight)
    elif kind == "hook":
        new = nn.Linear(old.in_features, old.out_features, bias=False)
        with torch.no_grad():
            new.weight.copy_(old.weight)
        new.register_forward_hook(lambda mod, args, out: out + torch.linspace(-2, 2, out.shape[-1]))
    else:
        raise ValueError(kind)
    pilot.set_output_embeddings(new)


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("fusion", ["probs", "logits"])
def test_biased_lm_head_is_fused(head_calls, monkeypatch, impl, fusion):
    """A plain ``nn.Linear`` head with a bias (Phi, GPT-J, CodeGen) takes the fused head, with the Pilot's output
    scale ``s`` on both ``h`` and the bias (``s (h W^T + c)``, as ``lm_head_operands`` gives it to training)."""
    model = _sharp_pair()
    ids, mask = _prompts()
    # next to p = softmax(z) a full-strength Copilot decides these tokens alone, whatever the Pilot's bias
    kw = dict(attention_mask=mask, max_new_tokens=4, lam=1.0 if fusion == "logits" else 0.1, fusion=fusion)
    _swap_head(model, "bias")
    bias = model.pilot.get_output_embeddings().bias
    # an output-logit scale on this Llama (as Cohere's logit_scale): registered, since an unknown one is refused
    monkeypatch.setitem(LOGIT_SCALE_RULES, "llama", ("logit_scale", False))
    monkeypatch.setattr(model.pilot.config, "logit_scale", 0.5, raising=False)
    assert model.logit_scale == 0.5
    ref = generate(model, ids, impl="auto", **kw)  # CPU: the materialised path, 0.5 * lm_head(h)
    assert head_calls == []
    out = generate(model, ids, impl=impl, **kw)
    assert head_calls == [impl] * 4
    assert torch.equal(out, ref)
    # what a head that dropped the bias, or scaled only h ((s h) W^T + c = s (h W^T + c / s)), would have picked:
    # the materialised path with the bias zeroed or divided by s must differ, or the comparison above is vacuous
    with torch.no_grad():
        saved = bias.clone()
        for wrong in (torch.zeros_like(saved), saved / 0.5):
            bias.copy_(wrong)
            assert not torch.equal(generate(model, ids, impl="auto", **kw), ref), "the bias' handling picks no token"
        bias.copy_(saved)


@pytest.mark.parametrize("kind", ["subclass", "hook"])
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_non_plain_lm_head_falls_back(head_calls, kind, impl):
    model = _sharp_pair()
    ids, mask = _prompts()
    kw = dict(attention_mask=mask, max_new_tokens=4, lam=1.0, fusion="probs")
    before = generate(model, ids, impl="auto", **kw)
    _swap_head(model, kind)
    ref = generate(model, ids, impl="auto", **kw)
    out = generate(model, ids, impl=impl, **kw)
    assert head_calls == []
    assert torch.equal(out, ref)
    assert not torch.equal(ref, before), f"the {kind} head changes no token: the comparison is vacuous"


def test_peft_lora_lm_head_falls_back(head_calls):
    peft = pytest.importorskip("peft")
    model = _sharp_pair()
    ids, mask = _prompts()
    kw = dict(attention_mask=mask, max_new_tokens=4, lam=1.0, fusion="probs")
    before = generate(model, ids, impl="auto", **kw)
    # set after construction: TransformerCopilot refuses a LoRA head for training
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head"], init_lora_weights=False)
    model.pilot = peft.get_peft_model(model.pilot, cfg).eval()
    ref = generate(model, ids, impl="auto", **kw)
    out = generate(model, ids, impl="torch", **kw)
    assert head_calls == []
    assert torch.equal(out, ref)
    assert not torch.equal(ref, before), "the LoRA head changes no token: the comparison is vacuous"


def test_peft_modules_to_save_head_is_fused(head_calls):
    """``modules_to_save=["lm_head"]``: the fused head reads the copy the wrapper runs (the trained copy, or
    the original while adapters are disabled)."""
    peft = pytest.importorskip("peft")
    model = _sharp_pair()
    ids, mask = _prompts()
    kw = dict(attention_mask=mask, max_new_tokens=4, lam=1.0, fusion="probs")
    before = generate(model, ids, impl="auto", **kw)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"])
    model.pilot = peft.get_peft_model(model.pilot, cfg).eval()
    wrapper = model.pilot.get_output_embeddings()
    with torch.no_grad():  # the trained copy now differs from the original head
        wrapper.modules_to_save["default"].weight.mul_(-1.0)
    ref = generate(model, ids, impl="auto", **kw)
    out = generate(model, ids, impl="torch", **kw)
    assert head_calls == ["torch"] * 4
    assert torch.equal(out, ref)
    assert not torch.equal(ref, before), "the saved copy changes no token: the comparison is vacuous"
    head_calls.clear()
    with model.pilot.disable_adapter():  # the wrapper passes through to the original head
        assert torch.equal(generate(model, ids, impl="torch", **kw), before)
    assert head_calls == ["torch"] * 4
