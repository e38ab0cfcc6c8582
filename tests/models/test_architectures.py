"""Architecture conformance: the Pilot inside ``TransformerCopilot`` computes what the Hugging Face model computes.

One tiny random model per family (2 layers, width 32, vocabulary 128, seeded), left-padded batches and
ignore-index labels. For each family:

(a) ``TransformerCopilot(pilot)`` (no Copilot): its loss is the HF model's own ``loss``, and the gradients of the
    LM head (weight, and bias where the head has one) and of a decoder-layer weight are HF's;
(b) with a small Copilot: forward and backward run, and the Pilot part of the loss is (a)'s;
(c) decoding: ``lam=0`` greedy and beam tokens are HF ``pilot.generate``'s, ``_pilot_logits`` (the Pilot's
    next-token logits during decoding) is HF's last-position logits, and with a Copilot (``lam != 0``) the
    fused decode head picks the same tokens as the materialised path.

What the families differ in, and each check is made to see: output-logit scales (Cohere ``logit_scale``, Granite
``logits_scaling``, HyperCLOVAX ``logits_scaling`` the other way round, MiniCPM3's hidden-state division, FalconH1
``lm_head_multiplier``), final-logit soft-capping (Gemma 2/3), LM heads with a bias (Phi, GPT-J: randomised here,
as their zero init would hide a dropped bias), tied heads (GPT-2, Gemma), absolute position embeddings (GPT-2),
parallel blocks (GPT-NeoX, Phi), MoE layers, multi-head latent attention (MiniCPM3, DeepSeek-V3), hybrid
linear-attention and Mamba stacks (Qwen3.5, FalconH1) and a pure state-space model (Mamba, whose decode steps take
no attention mask, as in HF's ``generate``).

HF's reference forward gets ``position_ids`` from the attention mask (what ``pilot.generate`` and tcopilot do):
without them HF's training forward numbers a left-padded row from its first pad, which changes the absolute
position embeddings of GPT-2-style models (rotary models are unaffected).
"""

from __future__ import annotations

import importlib

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from tcopilot import Copilot, TransformerCopilot
from tcopilot.pilot import LOGIT_SCALE_RULES, find_decoder_layers, pilot_logit_scale, pilot_states, positions_from_mask

# the module, not the function that ``tcopilot.generate`` names on the package
generate_mod = importlib.import_module("tcopilot.generate")

VOCAB = 128
# PAD is not 0: HF's beam search pads finished rows with `pad_token_id or eos_token_id`
EOS, PAD = 2, 3
# Heads untied (so that sharpening the head below leaves the input embeddings alone) except where a family's tied
# head is the point of the case (GPT-2, Gemma).
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, pad_token_id=PAD, bos_token_id=1, eos_token_id=EOS,
              tie_word_embeddings=False)
_MLA = dict(num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4,
            v_head_dim=8)

# model_type -> (config overrides, the overrides that make its logits "plain" lm_head(h): used to show that the
# scale / soft-cap changes the decoded tokens of the test, so a path that ignored it would be caught)
ARCHS = {
    "llama": ({}, None),
    "mistral": ({}, None),
    "qwen2": ({}, None),
    "mixtral": (dict(num_local_experts=4, num_experts_per_tok=2), None),
    "qwen3": (dict(head_dim=8), None),
    "qwen3_moe": (dict(head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16), None),
    "qwen3_5_text": (dict(head_dim=8, layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2,
                          linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8), None),
    "gemma": (dict(head_dim=8, tie_word_embeddings=True), None),
    "gemma2": (dict(head_dim=8, final_logit_softcapping=2.0), dict(final_logit_softcapping=None)),
    "gemma3_text": (dict(head_dim=8, sliding_window=4, final_logit_softcapping=2.0),
                    dict(final_logit_softcapping=None)),
    "phi": ({}, None),
    "phi3": ({}, None),
    "cohere": (dict(logit_scale=0.25), dict(logit_scale=1.0)),
    "cohere2": (dict(head_dim=8, logit_scale=0.25), dict(logit_scale=1.0)),
    "cohere2_moe": (dict(head_dim=8, logit_scale=0.25, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16),
                    dict(logit_scale=1.0)),
    "granite": (dict(logits_scaling=4.0), dict(logits_scaling=1.0)),
    "granitemoe": (dict(logits_scaling=4.0, num_local_experts=4, num_experts_per_tok=2), dict(logits_scaling=1.0)),
    "hyperclovax": (dict(logits_scaling=0.25), dict(logits_scaling=1.0)),
    "minicpm3": (dict(_MLA, dim_model_base=8), dict(dim_model_base=32)),
    "falcon_h1": (dict(head_dim=8, lm_head_multiplier=0.25, mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8,
                       mamba_d_state=8, mamba_chunk_size=4), dict(lm_head_multiplier=1.0)),
    "deepseek_v3": (dict(_MLA, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                         first_k_dense_replace=1, n_group=1, topk_group=1), None),
    "mamba": ({}, None),
    "olmo2": ({}, None),
    "stablelm": ({}, None),
    "gpt_neox": ({}, None),
    "gptj": (dict(rotary_dim=4), None),
    "gpt2": (dict(tie_word_embeddings=True), None),
}


def _pilot(model_type: str, **overrides):
    extra, _ = ARCHS[model_type]
    cfg = AutoConfig.for_model(model_type, **{**COMMON, **extra, **overrides})
    torch.manual_seed(0)
    pilot = AutoModelForCausalLM.from_config(cfg).float().eval()
    head = pilot.get_output_embeddings()
    tied = head.weight is pilot.get_input_embeddings().weight
    with torch.no_grad():
        # confident logits (std ~3 from unit-RMS hidden states, not ~0.1): no near-ties between HF's and tcopilot's
        # greedy choices, and the scale / soft-cap / bias then change which tokens are picked. A tied head is also
        # the input embedding, whose scale carries through the residual stream into the last hidden state: less.
        head.weight.mul_((0.1 if tied else 0.6) / float(head.weight.std()))
        if head.bias is not None:  # HF zero-initialises it, which would hide a dropped bias
            head.bias.normal_(0.0, 1.0)
    return pilot


@pytest.fixture(scope="module", params=list(ARCHS))
def arch(request):
    return request.param


def _batch(length=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (3, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    mask[2, :1] = 0
    ids = ids.masked_fill(mask == 0, PAD)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :4] = -100  # a "prompt" without loss
    return ids, mask, labels


def _hf_loss(pilot, ids, mask, labels):
    pos = positions_from_mask(mask).clamp(min=0)
    return pilot(input_ids=ids, attention_mask=mask, position_ids=pos, labels=labels).loss


def _checked_params(pilot):
    """The LM head's weight (and bias) and the first weight matrix of the last decoder layer."""
    head = pilot.get_output_embeddings()
    named = [("lm_head.weight", head.weight)] + ([("lm_head.bias", head.bias)] if head.bias is not None else [])
    layer = find_decoder_layers(pilot)[-1]
    name, w = next((n, p) for n, p in layer.named_parameters() if p.dim() == 2 and p.requires_grad)
    return named + [(f"layers[-1].{name}", w)]


def test_pilot_loss_and_gradients_equal_hugging_face(arch):
    pilot = _pilot(arch)
    ids, mask, labels = _batch()
    named = _checked_params(pilot)
    params = [p for _, p in named]
    hf = _hf_loss(pilot, ids, mask, labels)
    g_hf = torch.autograd.grad(hf, params)
    out = TransformerCopilot(pilot)(ids, attention_mask=mask, labels=labels)
    assert out.copilot_loss is None and out.num_tokens == int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(out.loss, hf, rtol=1e-5, atol=1e-5)
    g_ours = torch.autograd.grad(out.loss, params)
    for (name, _), a, b in zip(named, g_ours, g_hf):
        # atol relative to the gradient's scale: entries far below it carry only summation-order noise
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()),
                                   msg=lambda m, n=name: f"{arch} {n}: {m}")


def _pair(pilot, error_out_std=0.05):
    torch.manual_seed(1)
    copilot = Copilot.from_pilot(pilot, num_hidden_layers=2).float()
    with torch.no_grad():  # a zero head hides bugs downstream of it
        copilot.error_out.weight.normal_(0.0, error_out_std)
        copilot.error_out.bias.normal_(0.0, error_out_std)
    return TransformerCopilot(pilot, copilot).eval()


def test_with_copilot_pilot_loss_unchanged_and_both_train(arch):
    pilot = _pilot(arch)
    ids, mask, labels = _batch()
    with torch.no_grad():
        hf = _hf_loss(pilot, ids, mask, labels)
    model = _pair(pilot)
    out = model(ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(out.pilot_loss, hf, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(out.copilot_loss) and out.copilot_loss > 0
    out.loss.backward()
    for part in (model.pilot, model.copilot):
        grads = [p.grad for p in part.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        assert any(torch.count_nonzero(g) for g in grads)


def _prompts():
    ids, mask, _ = _batch(length=6, seed=1)
    return ids, mask


def test_pilot_logits_equal_hugging_face_last_position(arch):
    pilot = _pilot(arch)
    model = TransformerCopilot(pilot)
    ids, mask = _prompts()
    with torch.no_grad():
        hf = pilot(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask).clamp(min=0)).logits
        with pilot_states(pilot) as states:
            dec = generate_mod._PairDecoder(model, states, use_copilot=False)
            dec.prefill(ids, mask)
            ours = dec.z
    torch.testing.assert_close(ours, hf[:, -1].float(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("num_beams", [1, 2])
def test_lam_zero_tokens_equal_hugging_face_generate(arch, num_beams):
    pilot = _pilot(arch)
    model = _pair(pilot)
    ids, mask = _prompts()
    kw = dict(attention_mask=mask, max_new_tokens=3, num_beams=num_beams, eos_token_id=EOS, pad_token_id=PAD)
    with torch.no_grad():
        hf = pilot.generate(ids, do_sample=False, **kw)
    ours = model.generate(ids, lam=0.0, **kw)
    assert torch.equal(ours, hf[:, : ours.shape[1]]), f"{arch}: {ours[:, ids.shape[1]:]} vs {hf[:, ids.shape[1]:]}"
    assert hf.shape[1] == ours.shape[1] or (hf[:, ours.shape[1]:] == PAD).all()


def _materialised(model, ids, monkeypatch, **kw):
    """generate() with the fused head switched off: z and f materialised, then rectified_next_token."""
    with monkeypatch.context() as m:
        m.setattr(generate_mod, "_decode_head_weights", lambda *a: None)
        return model.generate(ids, impl="torch", **kw)


# Copilot strength per fusion, so that both the Copilot and the Pilot's scale / soft-cap change tokens: next to
# p = softmax(z) (entries <= 1) the Copilot's f must be smaller than next to the logits z (std ~3).
ERROR_OUT_STD = {"logits": 0.2, "probs": 0.02}


def test_fused_decode_head_picks_materialised_tokens(arch, head_calls, monkeypatch):
    steps = 3
    pilot = _pilot(arch)
    ids, mask = _prompts()
    _, neutral = ARCHS[arch]
    biased = pilot.get_output_embeddings().bias is not None
    alone = TransformerCopilot(pilot).generate(ids, attention_mask=mask, max_new_tokens=steps, lam=0.0,
                                               pad_token_id=PAD)
    # the fused head is arch-specific only through what reaches h and W (scale, soft-cap, bias): one fusion for
    # plain families, both where the logits are scaled or capped
    for fusion in ("logits", "probs") if neutral is not None else ("logits",):
        model = _pair(pilot, error_out_std=ERROR_OUT_STD[fusion])
        kw = dict(attention_mask=mask, max_new_tokens=steps, lam=1.0, fusion=fusion, pad_token_id=PAD)
        ref = _materialised(model, ids, monkeypatch, **kw)
        assert head_calls == []
        out = model.generate(ids, impl="torch", **kw)
        # every family's head is a plain nn.Linear: the fused head runs, a biased one too (lm_head_bias)
        assert head_calls == ["torch"] * steps
        head_calls.clear()
        assert torch.equal(out, ref), f"{arch} {fusion}: {out[:, ids.shape[1]:]} vs {ref[:, ids.shape[1]:]}"
        assert not torch.equal(out, alone), f"{arch} {fusion}: the Copilot changes no token: the test is vacuous"
        if biased:  # the bias matters here, so a fused head that dropped it would differ
            unbiased = _pilot(arch)
            with torch.no_grad():
                unbiased.get_output_embeddings().bias.zero_()
            plain = _materialised(_pair(unbiased, error_out_std=ERROR_OUT_STD[fusion]), ids, monkeypatch, **kw)
            assert not torch.equal(plain, ref), f"{arch} {fusion}: its LM-head bias changes no token"
        if neutral is not None:  # the scale / soft-cap matters here, so a path that dropped it would differ
            plain_pilot = _pilot(arch, **neutral)
            plain_pilot.load_state_dict(pilot.state_dict())
            plain = _materialised(_pair(plain_pilot, error_out_std=ERROR_OUT_STD[fusion]), ids, monkeypatch, **kw)
            assert not torch.equal(plain, ref), f"{arch} {fusion}: its logit scale / soft-cap changes no token"


def test_static_decoding_equals_generate_or_is_refused(arch):
    """``generate(cuda_graph=True)``'s static caches, run eagerly: the same tokens for every family whose
    transformers class declares static-cache decoding, a ValueError naming the option for the others."""
    from tcopilot.beam_search import beam_search
    from tcopilot.graph_decode import graph_decode

    pilot = _pilot(arch)
    model = _pair(pilot, error_out_std=ERROR_OUT_STD["probs"])
    ids, mask = _prompts()
    args = (model, ids, mask, 3, 1.0, "probs", 1.0, 0, 1.0, (None, 4), "torch", [EOS], PAD)
    if not getattr(pilot.base_model, "_can_compile_fullgraph", False):
        with pytest.raises(ValueError, match="cuda_graph: the Pilot's family"):
            graph_decode(*args, use_copilot=True, capture=False)
        return
    want = model.generate(ids, attention_mask=mask, max_new_tokens=3, temperature=1.0, seed=4, eos_token_id=EOS,
                          pad_token_id=PAD, impl="torch")  # fmt: skip
    got = graph_decode(*args, use_copilot=True, capture=False)
    assert torch.equal(got, want), f"{arch}: {got[:, ids.shape[1]:]} vs {want[:, ids.shape[1]:]}"
    # beams: the static cache reordered in place (every per-row tensor of a layer, recurrent states included)
    beams = dict(num_beams=2, max_new_tokens=3, lam=1.0, fusion="probs", eos_token_ids=[EOS], pad_token_id=PAD)
    want = beam_search(model, ids, mask, **beams)
    got = beam_search(model, ids, mask, static=True, capture=False, **beams)
    assert torch.equal(got, want), f"{arch} beams: {got[:, ids.shape[1]:]} vs {want[:, ids.shape[1]:]}"


def test_multi_stream_decoder_layers_are_refused_with_a_copilot():
    """Gemma-3n's AltUp decoder layers carry ``[streams, batch, length, hidden]``: which stream is the Mistake Log's
    state is not tcopilot's to guess, so a Copilot is refused with a ValueError; the Pilot alone gets HF's loss."""
    cfg = AutoConfig.for_model("gemma3n_text", **{
        **COMMON, "head_dim": 8, "intermediate_size": [64, 64], "num_kv_shared_layers": 0,
        "vocab_size_per_layer_input": VOCAB, "hidden_size_per_layer_input": 8, "laurel_rank": 4,
        "altup_num_inputs": 2, "activation_sparsity_pattern": [0.0, 0.0],
        "layer_types": ["sliding_attention", "full_attention"]})
    torch.manual_seed(0)
    pilot = AutoModelForCausalLM.from_config(cfg).float().eval()
    ids, mask, labels = _batch()
    with torch.no_grad():
        alone = TransformerCopilot(pilot)(ids, attention_mask=mask, labels=labels)
        torch.testing.assert_close(alone.loss, _hf_loss(pilot, ids, mask, labels), rtol=1e-5, atol=1e-5)
    # a single width: Gemma-3n lists one intermediate size per layer
    model = TransformerCopilot(pilot, Copilot.from_pilot(pilot, intermediate_size=64))
    with pytest.raises(ValueError, match="hidden states \\[batch, length, hidden\\]"):
        model(ids, attention_mask=mask, labels=labels)
    with pytest.raises(ValueError, match="hidden states \\[batch, length, hidden\\]"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2, lam=1.0)


def test_logit_scale_of_an_unknown_family_is_refused_until_registered(monkeypatch):
    """``logits_scaling`` divides Granite's logits and multiplies HyperCLOVAX's: on a family tcopilot has no rule
    for, a value other than 1 is refused rather than guessed; a registered rule (here None: HF's Llama ignores the
    attribute) is then followed, and MPT's ``logit_scale``, which HF's MPT ignores, is ignored."""
    pilot = _pilot("llama", logits_scaling=4.0)
    with pytest.raises(ValueError, match="logits_scaling=4.0.*LOGIT_SCALE_RULES\\['llama'\\]"):
        TransformerCopilot(pilot)
    monkeypatch.setitem(LOGIT_SCALE_RULES, "llama", None)
    ids, mask, labels = _batch()
    with torch.no_grad():
        out = TransformerCopilot(pilot)(ids, attention_mask=mask, labels=labels)
        torch.testing.assert_close(out.loss, _hf_loss(pilot, ids, mask, labels), rtol=1e-5, atol=1e-5)
    assert pilot_logit_scale(AutoConfig.for_model("mpt", logit_scale=0.5)) is None
    assert pilot_logit_scale(AutoConfig.for_model("granite", logits_scaling=4.0)) == 0.25
    assert pilot_logit_scale(AutoConfig.for_model("hyperclovax", logits_scaling=4.0)) == 4.0
