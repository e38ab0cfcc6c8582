import pytest
import torch

from tcopilot import TransformerCopilot, rectified_next_token
from tcopilot.pilot import pilot_states, positions_from_mask, run_base
from tcopilot.testing import left_padded_prompts, tiny_pair


def _prompts(B=3, L=6, vocab=97, seed=0):
    return left_padded_prompts(B, L, vocab, seed, low=1)


def naive_generate(model, ids, mask, steps, lam, fusion):
    """No caches: every step recomputes the Pilot and the Copilot over the whole sequence."""
    cop = model.copilot
    L0 = ids.shape[1]
    fs = []  # the Copilot outputs at generated positions, fed back as inputs
    for _ in range(steps):
        pos = positions_from_mask(mask)
        with pilot_states(model.pilot) as st:
            hidden, _ = run_base(model.pilot.base_model, ids, mask, pos.clamp(min=0))
        z = model.pilot.get_output_embeddings()(hidden[:, -1]).float()
        B, L = ids.shape
        stream = cop.error_in.bias.expand(B, L, -1).clone()
        for j, f in enumerate(fs):  # f of position L0-1+j feeds position L0+j
            stream[:, L0 + j] = cop.error_in(f)
        log = torch.cat([st.x_tilde, st.pooled], 1)
        g = cop(stream, log, pos, torch.cat([pos, pos], 1))[:, -1]
        f = cop.error_out(g)
        fs.append(f)
        nxt = rectified_next_token(z, f, lam=lam, fusion=fusion, impl="torch")
        ids = torch.cat([ids, nxt[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return ids


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("fusion", ["probs", "logits"])
def test_cached_generation_equals_naive_recomputation(family, fusion):
    model = tiny_pair(family, layers=3)
    with torch.no_grad():  # a strong head so the Copilot actually changes tokens
        model.copilot.error_out.weight.normal_(0, 2.0)
    ids, mask = _prompts()
    with torch.no_grad():
        fast = model.generate(ids, attention_mask=mask, max_new_tokens=6, lam=1.0, fusion=fusion, impl="torch")
        slow = naive_generate(model, ids, mask, 6, 1.0, fusion)
        alone = model.generate(ids, attention_mask=mask, max_new_tokens=6, lam=0.0)
    assert torch.equal(fast, slow)
    assert not torch.equal(fast, alone), "the test Copilot is too weak to change any token"


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_lambda_zero_equals_pilot_alone_hf_generate(family):
    model = tiny_pair(family)
    ids, mask = _prompts()
    eos = 5
    with torch.no_grad():
        ours = model.generate(ids, attention_mask=mask, max_new_tokens=8, lam=0.0, eos_token_id=eos, pad_token_id=0)
        hf = model.pilot.generate(
            ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=eos, pad_token_id=0
        )
    assert torch.equal(ours, hf[:, : ours.shape[1]])
    assert hf.shape[1] == ours.shape[1] or (hf[:, ours.shape[1] :] == 0).all()


def test_sampling_reproducible_with_seed_and_eos_padding():
    model = tiny_pair("llama")
    ids, mask = _prompts()
    kw = dict(attention_mask=mask, max_new_tokens=10, lam=1.0, temperature=1.0, top_k=20, top_p=0.9)
    a = model.generate(ids, generator=torch.Generator().manual_seed(3), **kw)
    b = model.generate(ids, generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(a, b)
    eos = int(a[0, ids.shape[1]])  # force row 0 to stop at once
    c = model.generate(ids, generator=torch.Generator().manual_seed(3), eos_token_id=eos, pad_token_id=0, **kw)
    assert c[0, ids.shape[1]] == eos and (c[0, ids.shape[1] + 1 :] == 0).all()


def test_pilot_only_model_generates_and_bad_args():
    model = tiny_pair("llama")
    alone = TransformerCopilot(model.pilot, None)
    ids, mask = _prompts()
    out = alone.generate(ids, attention_mask=mask, max_new_tokens=3, lam=1.0)
    assert out.shape == (3, ids.shape[1] + 3)
    with pytest.raises(ValueError, match="lam"):
        model.generate(ids, max_new_tokens=2, lam=float("nan"))
    with pytest.raises(ValueError, match="fusion"):
        model.generate(ids, max_new_tokens=2, fusion="sum")
    with pytest.raises(ValueError, match="top_p"):
        model.generate(ids, max_new_tokens=2, temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="input_ids"):
        model.generate(ids[:0], max_new_tokens=2)


@pytest.mark.parametrize("impl", ["auto", "torch"])  # materialised path / fused decode head
def test_generate_settings_equals_generate_per_setting(impl):
    """One shared prefill, forked per (lam, fusion): each result equals its own generate() call, greedy and
    sampled (the generator is used setting after setting, in order)."""
    from tcopilot.generate import generate, generate_settings

    model = tiny_pair("llama").eval()
    with torch.no_grad():  # a strong head so that the settings differ
        model.copilot.error_out.weight.normal_(0, 2.0)
    ids, mask = _prompts()
    settings = [(0.0, "probs"), (0.5, "probs"), (1.0, "logits"), (0.5, "probs")]
    eos = dict(eos_token_id=5, pad_token_id=0)
    got = generate_settings(model, ids, settings, attention_mask=mask, max_new_tokens=6, impl=impl, **eos)
    assert list(got) == list(dict.fromkeys(settings))
    outs = set()
    for lam, fusion in settings:
        ref = generate(model, ids, attention_mask=mask, max_new_tokens=6, lam=lam, fusion=fusion, impl=impl, **eos)
        assert torch.equal(got[(lam, fusion)], ref), (lam, fusion)
        outs.add(tuple(ref.flatten().tolist()))
    assert len(outs) == 3, "the settings decode identically: the comparison is vacuous"

    kw = dict(attention_mask=mask, max_new_tokens=5, temperature=1.0, top_k=20, impl=impl)
    got = generate_settings(model, ids, settings[:3], generator=torch.Generator().manual_seed(7), **kw)
    gen = torch.Generator().manual_seed(7)
    for lam, fusion in settings[:3]:
        assert torch.equal(got[(lam, fusion)], generate(model, ids, lam=lam, fusion=fusion, generator=gen, **kw))


def test_generate_settings_bad_args():
    from tcopilot.generate import generate_settings

    model = tiny_pair("llama")
    ids, mask = _prompts()
    with pytest.raises(ValueError, match="settings: expected at least one"):
        generate_settings(model, ids, [])
    with pytest.raises(ValueError, match="fusion"):
        generate_settings(model, ids, [(1.0, "sum")])
    with pytest.raises(ValueError, match="lam"):
        generate_settings(model, ids, [(float("inf"), "probs")])
    with pytest.raises(ValueError, match="num_beams: expected 1"):
        generate_settings(model, ids, [(1.0, "probs")], num_beams=2)
    with pytest.raises(TypeError, match="unexpected keyword"):
        generate_settings(model, ids, [(1.0, "probs")], beams=2)
    out = generate_settings(model, ids, [(1.0, "probs")], attention_mask=mask, max_new_tokens=0)
    assert torch.equal(out[(1.0, "probs")], ids)


def test_seeded_sampling_is_reproducible_per_prompt():
    """``seed=``: counter-based draws. Same seed, same tokens; a [B] tensor of per-prompt seeds makes each
    prompt's continuation follow its own seed wherever it sits in the batch."""
    model = tiny_pair("llama")
    ids, mask = _prompts(B=4, L=5, seed=2)
    mask[:] = 1  # same-length prompts: a row's arithmetic does not depend on its neighbours' padding
    kw = dict(attention_mask=mask, max_new_tokens=8, lam=1.0, temperature=1.0, top_p=0.95)
    seeds = torch.tensor([101, 202, 303, 404])
    a = model.generate(ids, seed=seeds, **kw)
    assert torch.equal(a, model.generate(ids, seed=seeds, **kw))
    perm = torch.tensor([2, 0, 3, 1])
    b = model.generate(ids[perm], seed=seeds[perm], **{**kw, "attention_mask": mask[perm]})
    assert torch.equal(b, a[perm])
    assert not torch.equal(a, model.generate(ids, seed=seeds + 1, **kw)), "the seed changes nothing"
    # an int seed; the fused decode head (impl="torch") draws the numbers of the materialised path
    c = model.generate(ids, seed=7, **kw)
    assert torch.equal(c, model.generate(ids, seed=7, impl="torch", **kw))
    assert torch.equal(c, model.generate(ids, seed=7, **kw))


def test_seed_step_keys():
    from tcopilot.generate import _step_randomness

    for seed in (0, 5, -3, 2**63 - 1):
        for step in (0, 1, 17):
            key = _step_randomness((None, seed), step)["seed"]
            assert key == ((seed + 0x9E3779B97F4A7C15 * (step + 1) + 2**63) % 2**64) - 2**63
            assert _step_randomness((None, torch.tensor([seed])), step)["seed"].item() == key
    assert _step_randomness((None, 5), 0)["seed"] != _step_randomness((None, 5), 1)["seed"]


def test_seed_bad_args():
    from tcopilot.generate import generate_settings

    model = tiny_pair("llama")
    ids, _ = _prompts()
    kw = dict(max_new_tokens=2, temperature=1.0)
    for seed, match in ((1.5, "seed: expected an int"), (True, "seed: expected an int"),
                        (torch.tensor([1, 2]), "shape \\[3\\]"), (torch.ones(3), "integer tensor")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            model.generate(ids, seed=seed, **kw)
    with pytest.raises(ValueError, match="seed: expected None when a generator"):
        model.generate(ids, seed=3, generator=torch.Generator(), **kw)
    with pytest.raises(ValueError, match="seed"):
        generate_settings(model, ids, [(1.0, "probs")], seed=2.0, **kw)


def test_generate_settings_with_seed_equals_generate():
    from tcopilot.generate import generate, generate_settings

    model = tiny_pair("llama")
    ids, mask = _prompts()
    kw = dict(attention_mask=mask, max_new_tokens=5, temperature=1.0, top_k=20, seed=torch.tensor([4, 5, 6]))
    settings = [(0.5, "probs"), (1.0, "logits")]
    got = generate_settings(model, ids, settings, **kw)
    for lam, fusion in settings:
        assert torch.equal(got[(lam, fusion)], generate(model, ids, lam=lam, fusion=fusion, **kw))


def test_right_padded_attention_mask_raises():
    """A 0 after a 1 in a row (right padding) would make the row continue from a padding position."""
    from tcopilot.generate import generate_settings

    model = tiny_pair("llama")
    ids, mask = _prompts()
    right = mask.flip(1)  # rows 1 and 2 padded on the right
    with pytest.raises(ValueError, match="attention_mask: expected left-padded prompts.*row 1"):
        model.generate(ids, attention_mask=right, max_new_tokens=2)
    with pytest.raises(ValueError, match="attention_mask: expected left-padded"):
        generate_settings(model, ids, [(1.0, "probs")], attention_mask=right.bool(), max_new_tokens=2)
    with pytest.raises(ValueError, match="attention_mask: expected left-padded"):
        model.generate(ids, attention_mask=right, max_new_tokens=2, num_beams=2)
    holes = torch.ones_like(mask)
    holes[0, 2] = 0  # a hole inside the prompt is not left padding either
    with pytest.raises(ValueError, match="attention_mask.*row 0"):
        model.generate(ids, attention_mask=holes, max_new_tokens=2)
    empty = mask.clone()
    empty[2] = 0  # an all-padding row is left-padded (all its 0s come first)
    assert model.generate(ids, attention_mask=empty, max_new_tokens=2).shape == (3, ids.shape[1] + 2)


def test_token_ids_checked_against_vocabulary():
    """EOS and pad ids outside [0, V): a ValueError naming them (a pad id was fed into the embedding once a
    row had finished, an IndexError inside torch)."""
    from tcopilot.generate import generate_settings

    model = tiny_pair("llama")  # V = 97
    ids, mask = _prompts()
    eos = int(model.generate(ids, attention_mask=mask, max_new_tokens=1)[0, -1])  # row 0 finishes at once
    kw = dict(attention_mask=mask, max_new_tokens=3)
    for bad in (-1, 97, 200):
        with pytest.raises(ValueError, match=f"pad_token_id: expected an (int )?id .*got {bad}"):
            model.generate(ids, eos_token_id=eos, pad_token_id=bad, **kw)
    for bad in (97, [eos, 97], [-1], list(range(200, 400))):
        with pytest.raises(ValueError, match="eos_token_id: expected"):
            model.generate(ids, eos_token_id=bad, **kw)
    with pytest.raises(ValueError, match="eos_token_id: expected ids in \\[0, 97\\)"):
        model.generate(ids, eos_token_id=97, num_beams=2, **kw)
    with pytest.raises(ValueError, match="pad_token_id: expected an id in \\[0, 97\\)"):
        generate_settings(model, ids, [(1.0, "probs")], eos_token_id=eos, pad_token_id=97, **kw)
    out = model.generate(ids, eos_token_id=eos, pad_token_id=96, **kw)  # the last id is fine
    assert out[0, -1] == 96


@pytest.mark.parametrize("option, value, match", [
    ("top_k", 2.7, "top_k: expected an int >= 0"), ("top_k", True, "top_k: expected an int"),
    ("top_k", "x", "top_k: expected an int"), ("top_k", torch.tensor([1, 2, 3]), "top_k: expected an int"),
    ("top_k", -1, "top_k: expected an int >= 0"), ("top_p", True, "top_p: expected a finite number"),
    ("top_p", "x", "top_p: expected a finite number"), ("top_p", float("nan"), "top_p"),
    ("do_sample", "no", "do_sample: expected True, False or None"), ("do_sample", 1, "do_sample"),
    ("temperature", "hot", "temperature: expected a finite number"), ("temperature", True, "temperature"),
    ("eos_token_id", 3.7, "eos_token_id: expected an int"), ("eos_token_id", [None], "eos_token_id"),
    ("eos_token_id", [2, True], "eos_token_id"), ("pad_token_id", 2.0, "pad_token_id: expected an int"),
    ("max_new_tokens", 2.0, "max_new_tokens: expected an int >= 0"), ("num_beams", 2.0, "num_beams"),
    ("num_beams", True, "num_beams"), ("early_stopping", 1, "early_stopping: expected True, False or 'never'"),
    ("early_stopping", "no", "early_stopping"), ("length_penalty", True, "length_penalty"),
])  # fmt: skip
def test_generation_options_are_checked_before_conversion(option, value, match):
    """int()/float()/bool() used to coerce first: top_k=2.7 ran with 2, do_sample='no' sampled, eos 3.7 was 3,
    top_k='x' failed inside int() without naming the option."""
    from tcopilot.generate import resolve_generation_options

    with pytest.raises(ValueError, match=match):
        resolve_generation_options(6, **{option: value})
    if option in ("top_k", "do_sample", "eos_token_id"):  # and through generate
        model = tiny_pair("llama")
        ids, mask = _prompts()
        with pytest.raises(ValueError, match=match):
            model.generate(ids, attention_mask=mask, max_new_tokens=2, temperature=1.0, **{option: value})


def test_numpy_scalars_and_generation_config_values_accepted():
    np = pytest.importorskip("numpy")
    from transformers import GenerationConfig

    from tcopilot.generate import resolve_generation_options

    o = resolve_generation_options(6, max_new_tokens=np.int64(3), num_beams=np.int32(2), top_k=np.int64(4),
                                   top_p=np.float32(0.5), do_sample=np.bool_(False), early_stopping=np.bool_(True),
                                   eos_token_id=[np.int64(5), 7], pad_token_id=np.int16(1))
    assert o == dict(max_new_tokens=3, do_sample=False, temperature=0.0, top_k=4, top_p=0.5, num_beams=2,
                     length_penalty=1.0, early_stopping=True, eos_token_ids=[5, 7], pad_token_id=1)
    assert all(type(o[k]) is int for k in ("max_new_tokens", "num_beams", "top_k", "pad_token_id"))
    assert type(o["do_sample"]) is bool and type(o["early_stopping"]) is bool
    cfg = GenerationConfig(max_length=10, num_beams=3, early_stopping="never", eos_token_id=[2, 3], top_k=50)
    o = resolve_generation_options(6, cfg)
    assert (o["max_new_tokens"], o["num_beams"], o["early_stopping"], o["eos_token_ids"]) == (4, 3, "never", [2, 3])
    assert resolve_generation_options(6, GenerationConfig(eos_token_id=4))["pad_token_id"] == 4
    model = tiny_pair("llama")
    ids, mask = _prompts()
    a = model.generate(ids, attention_mask=mask, max_new_tokens=np.int64(3), num_beams=np.int64(2))
    assert torch.equal(a, model.generate(ids, attention_mask=mask, max_new_tokens=3, num_beams=2))


def test_prompt_ids_checked_against_the_embedding():
    from tcopilot.generate import generate_settings

    model = tiny_pair("llama")
    ids, mask = _prompts()
    for bad, match in ((ids.float(), "int64 or int32"), (ids.clone().fill_(97), r"\[0, 97\).*got 97"),
                       (ids.clone().fill_(-1), "got -1")):  # fmt: skip
        with pytest.raises(ValueError, match="input_ids") as err:
            model.generate(bad, attention_mask=mask, max_new_tokens=2)
        assert err.match(match)
        with pytest.raises(ValueError, match="input_ids"):
            generate_settings(model, bad, [(1.0, "probs")], attention_mask=mask, max_new_tokens=2)
    assert model.generate(ids.int(), attention_mask=mask, max_new_tokens=2).shape[1] == ids.shape[1] + 2
