import pytest
import torch

from tcopilot import TransformerCopilot
from tcopilot.testing import left_padded_prompts, naive_joint_losses, tiny_pair, tiny_pilot


def _batch(vocab=97, B=3, L=11, seed=0, left_pad=True):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    if left_pad:
        mask[1, :3] = 0
        ids[1, :3] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :4] = -100  # the "prompt": no loss there, as in instruction tuning
    return ids, mask, labels


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_losses_and_gradients_match_materialised_oracle(family):
    model = tiny_pair(family)
    ids, mask, labels = _batch()
    out = model(ids, attention_mask=mask, labels=labels)
    ref_p, ref_c, _, _ = naive_joint_losses(model, ids, mask, labels)
    torch.testing.assert_close(out.pilot_loss, ref_p, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.copilot_loss, ref_c, rtol=1e-5, atol=1e-6)

    params = [p for p in model.parameters() if p.requires_grad]
    g_fused = torch.autograd.grad(out.loss, params, allow_unused=True)
    g_ref = torch.autograd.grad(ref_p + ref_c, params, allow_unused=True)
    for (name, _), a, b in zip(model.named_parameters(), g_fused, g_ref):
        a = torch.zeros(1) if a is None else a
        b = torch.zeros(1) if b is None else b
        torch.testing.assert_close(
            a.expand_as(b) if a.numel() == 1 else a, b, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}"
        )


def test_pilot_loss_equals_hugging_face_loss_and_copilot_never_touches_pilot():
    model = tiny_pair("llama")
    ids, mask, labels = _batch(left_pad=False)
    out = model(ids, attention_mask=mask, labels=labels)
    hf = model.pilot(input_ids=ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(out.pilot_loss, hf, rtol=1e-5, atol=1e-6)
    out.copilot_loss.backward()
    for name, p in model.pilot.named_parameters():
        assert p.grad is None or torch.count_nonzero(p.grad) == 0, name
    assert any(p.grad is not None and torch.count_nonzero(p.grad) > 0 for p in model.copilot.parameters())


def test_narrow_copilot_and_pilot_only():
    model = tiny_pair("llama", copilot_hidden=16)
    ids, mask, labels = _batch()
    out = model(ids, attention_mask=mask, labels=labels)
    ref_p, ref_c, _, _ = naive_joint_losses(model, ids, mask, labels)
    torch.testing.assert_close(out.copilot_loss, ref_c, rtol=1e-5, atol=1e-6)
    alone = TransformerCopilot(model.pilot, None, impl="torch")
    o2 = alone(ids, attention_mask=mask, labels=labels)
    assert o2.copilot_loss is None
    torch.testing.assert_close(o2.loss, ref_p, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("copilot", [True, False])
def test_num_tokens_counts_the_shifted_labels(copilot):
    """``num_tokens`` stays on the device in forward (``num_tokens_tensor``) and is a Python int when read."""
    model = tiny_pair("llama")
    if not copilot:
        model = TransformerCopilot(model.pilot, None, impl="torch")
    ids, mask, labels = _batch()
    out = model(ids, attention_mask=mask, labels=labels)
    want = int((labels[:, 1:] != -100).sum())
    assert out.num_tokens_tensor.shape == () and out.num_tokens_tensor.dtype == torch.int64
    assert type(out.num_tokens) is int and out.num_tokens == want
    out = model(ids, attention_mask=mask)  # labels from the ids: every real token but each row's first
    assert out.num_tokens == int(mask[:, 1:].sum())


def test_all_ignored_batch_gives_zero_losses_not_nan():
    model = tiny_pair("llama")
    ids, mask, _ = _batch()
    labels = torch.full_like(ids, -100)
    out = model(ids, attention_mask=mask, labels=labels)
    assert out.pilot_loss.item() == 0.0 and out.copilot_loss.item() == 0.0
    out.loss.backward()
    for p in model.parameters():
        assert p.grad is None or torch.isfinite(p.grad).all()


def test_bad_inputs():
    model = tiny_pair("llama")
    ids, mask, labels = _batch()
    with pytest.raises(ValueError, match="labels"):
        model(ids, attention_mask=mask, labels=labels[:, :-1])
    with pytest.raises(ValueError, match="input_ids"):
        model(ids[0], attention_mask=mask, labels=labels)
    with pytest.raises(ValueError, match="input_ids"):
        model(ids[:0])
    bad = labels.clone()
    bad[0, -1] = 500
    with pytest.raises(ValueError, match="labels"):
        model(ids, attention_mask=mask, labels=bad)
    from tcopilot import Copilot

    other = Copilot.from_pilot(tiny_pilot("llama", vocab=50))
    with pytest.raises(ValueError, match="vocab_size"):
        TransformerCopilot(model.pilot, other)


def test_impl_triton_model_runs_copilot_error_loss_on_its_torch_path(monkeypatch):
    """``TransformerCopilot(impl="triton")``: the Triton kernels where they exist; copilot_error_loss has none, so it
    gets "auto" (its PyTorch path), not an explicit "triton" that it would refuse."""
    import tcopilot.pilot as pilot_mod
    from tcopilot.testing import left_padded_prompts

    seen = []
    real = pilot_mod.copilot_error_loss

    def spy(*args, impl, **kwargs):
        seen.append(impl)
        return real(*args, impl=impl, **kwargs)

    monkeypatch.setattr(pilot_mod, "copilot_error_loss", spy)
    model = tiny_pair("llama")
    model.impl = "triton"
    ids, mask = left_padded_prompts()
    out = model(ids, attention_mask=mask)
    assert torch.isfinite(out.loss) and seen == ["auto"]


@pytest.mark.parametrize("name", ["cache", "past_key_values", "cache_params"])
def test_run_base_passes_and_reads_the_cache_under_the_backbones_own_name(name):
    """transformers 5.2x says ``cache``; older attention models ``past_key_values`` and 5.17's Mamba family
    ``cache_params``. A cache passed under a name the forward lacks vanishes into ``**kwargs`` and each decode
    step restarts from an empty state, so the name must be read off the signature (and the output's fields)."""
    import inspect
    from dataclasses import make_dataclass

    from tcopilot.pilot import run_base

    out_type = make_dataclass("Out", ["last_hidden_state", name])

    class Backbone(torch.nn.Module):
        def forward(self, input_ids=None, attention_mask=None, position_ids=None, use_cache=None, **kwargs):
            seen.update(kwargs)
            return out_type(torch.zeros(1, 1, 2), "new-cache")

    # The forward declares the cache under ``name`` (its **kwargs still swallow anything else, as HF's do).
    params = list(inspect.signature(Backbone.forward).parameters.values())
    params.insert(-1, inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None))
    Backbone.forward.__signature__ = inspect.Signature(params)
    seen = {}
    hidden, cache = run_base(Backbone(), torch.zeros(1, 1, dtype=torch.long), None, None, cache="old-cache",
                             use_cache=True)
    assert seen == {name: "old-cache"} and cache == "new-cache"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pilot_states_pool_the_layer_outputs_in_fp32_without_touching_them(dtype):
    # The running sum adds each layer's output into an fp32 buffer of its own, in place: the mean of the fp32
    # outputs, while the outputs themselves (an fp32 layer's is the very tensor the next layer reads) stay intact.
    from tcopilot.pilot import find_decoder_layers, pilot_states

    pilot = tiny_pilot("llama").to(dtype)
    ids, mask = left_padded_prompts()
    outs = []
    layers = find_decoder_layers(pilot)


    def record(module, args, out):  # runs before pilot_states' hooks (registered first): a snapshot and the tensor
        out = out[0] if isinstance(out, tuple) else out
        outs.append((out, out.clone()))

    handles = [layer.register_forward_hook(record) for layer in layers]
    with torch.no_grad(), pilot_states(pilot) as states:
        pilot(input_ids=ids, attention_mask=mask)
        pooled = states.pooled
    for h in handles:
        h.remove()
    want = sum(k.float() for _, k in outs) / len(outs)
    assert len(outs) == len(layers) and pooled.dtype == torch.float32 and torch.equal(pooled, want)
    assert all(torch.equal(o, k) for o, k in outs)
    with torch.no_grad():  # and the Pilot's output is what it is without the hooks
        plain = pilot(input_ids=ids, attention_mask=mask).logits
        with pilot_states(pilot):
            hooked = pilot(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(plain, hooked)


def test_copilot_attention_gets_int32_positions_in_training_and_replay(monkeypatch):
    # int64 positions would cost every attention call a rebase (~15 small launches, positions_int32).
    import tcopilot.copilot as copilot_module
    from tcopilot import MistakeLog
    from tcopilot.replay import replay_copilot_loss

    seen = []
    real = copilot_module.log_attention

    def spy(q, k, v, *, q_pos, k_pos, **kw):
        seen.append((q_pos.dtype, k_pos.dtype))
        return real(q, k, v, q_pos=q_pos, k_pos=k_pos, **kw)

    monkeypatch.setattr(copilot_module, "log_attention", spy)
    model = tiny_pair("llama")
    model.mistake_log = MistakeLog(topk=8)
    model.train()
    ids, mask, labels = _batch()
    model(ids, attention_mask=mask, labels=labels)
    n_online = len(seen)
    replay_copilot_loss(model, model.mistake_log[0])
    assert n_online > 0 and len(seen) > n_online
    assert set(seen) == {(torch.int32, torch.int32)}, seen
