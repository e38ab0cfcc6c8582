"""CUDA-graph decoding (``generate(cuda_graph=True)``, :mod:`tcopilot.graph_decode`).

A CPU cannot capture a graph, so these tests check what capture needs and what it must not change:

* the static decoder (fixed-size caches, device-side counters, state updated in place), run eagerly
  (``capture=False``), returns exactly ``generate``'s tokens: greedy, seeded and generator sampling, filters,
  EOS stops, both fusions, the fused head and the materialised path, Triton kernels under the interpreter;
* a step is capturable: no host read of a tensor (``.item()``, ``bool()``, ``.tolist()``, ``.numpy()``, data-
  dependent shapes) and the same ops on the same shapes at every step;
* the options a graph cannot serve raise a ValueError.

GPU-only tests capture and replay for real and compare with eager decoding.
"""

from __future__ import annotations

import os

import torch

_HAS_CUDA = torch.cuda.is_available()
if not _HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton / the kernels

import pytest  # noqa: E402
from decode_audit import StepAudit  # noqa: E402

from tcopilot.beam_search import beam_search  # noqa: E402
from tcopilot.generate import _PairDecoder, generate, resolve_generation_options  # noqa: E402
from tcopilot.graph_decode import _StaticLoop, graph_decode  # noqa: E402
from tcopilot.pilot import pilot_states  # noqa: E402
from tcopilot.testing import decoding_pair, left_padded_prompts  # noqa: E402

DEV = "cuda" if _HAS_CUDA else "cpu"


def _pair(family="llama", attention_impl="torch"):
    return decoding_pair(family, attention_impl).to(DEV)


def _static(model, ids, mask, max_new, *, lam=1.0, fusion="probs", impl="torch", generator=None, seed=None,
            check_every=3, **options):  # fmt: skip
    o = resolve_generation_options(ids.shape[1], None, max_new_tokens=max_new, **options)
    return graph_decode(model, ids, mask, max_new, lam, fusion, o["temperature"], o["top_k"], o["top_p"],
                        (generator, seed), impl, o["eos_token_ids"], o["pad_token_id"],
                        use_copilot=model.copilot is not None and lam != 0, capture=False,
                        check_every=check_every)  # fmt: skip


def _prompts():
    ids, mask = left_padded_prompts(3, 6, 97, 0, low=1)
    return ids.to(DEV), mask.to(DEV)


SAMPLING = {
    "greedy": dict(),
    "seed+logits": dict(temperature=1.0, seed=5, fusion="logits"),
    "row-seeds+filters": dict(temperature=0.8, top_k=10, top_p=0.9, seed=[11, -2, 2**62]),
    "generator": dict(temperature=1.0, generator=3),
    "eos": dict(temperature=1.0, seed=9, eos_token_id=list(range(1, 97, 5)), pad_token_id=0),
}


def _randomness(kw):
    kw = dict(kw)
    if "generator" in kw:
        kw["generator"] = torch.Generator(device=DEV).manual_seed(kw["generator"])
    if isinstance(kw.get("seed"), list):
        kw["seed"] = torch.tensor(kw["seed"], device=DEV)
    return kw


@pytest.mark.parametrize("impl", ["auto", "torch"])  # on the CPU: materialised z, f / the fused head
@pytest.mark.parametrize("mode", list(SAMPLING))
def test_static_decoding_equals_generate(mode, impl):
    model = _pair()
    ids, mask = _prompts()
    want = generate(model, ids, attention_mask=mask, max_new_tokens=9, impl=impl, **_randomness(SAMPLING[mode]))
    got = _static(model, ids, mask, 9, impl=impl, **_randomness(SAMPLING[mode]))
    assert torch.equal(got, want)
    if mode == "eos":
        assert want.shape[1] < ids.shape[1] + 9, "no early stop: the EOS case tests nothing"


def test_static_decoding_with_triton_kernels_equals_generate():
    model = _pair(attention_impl="triton")
    ids, mask = _prompts()
    kw = dict(temperature=0.9, top_k=12, top_p=0.95, seed=4, impl="triton")
    want = generate(model, ids, attention_mask=mask, max_new_tokens=3, **kw)
    assert torch.equal(_static(model, ids, mask, 3, **kw), want)


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_static_decoding_other_families_and_the_pilot_alone(family):
    model = _pair(family)
    ids, mask = _prompts()
    for lam in (1.0, 0.0):  # lam=0: the Pilot alone, no Copilot cache at all
        want = generate(model, ids, attention_mask=mask, max_new_tokens=6, lam=lam, temperature=1.0, seed=2)
        assert torch.equal(_static(model, ids, mask, 6, lam=lam, temperature=1.0, seed=2), want)


def test_one_new_token_and_early_stop_at_every_check_interval():
    model = _pair()
    ids, mask = _prompts()
    assert torch.equal(_static(model, ids, mask, 1), generate(model, ids, attention_mask=mask, max_new_tokens=1))
    eos = dict(eos_token_id=list(range(1, 97, 3)), pad_token_id=0, temperature=1.0, seed=1)
    want = generate(model, ids, attention_mask=mask, max_new_tokens=12, **eos)
    assert want.shape[1] < ids.shape[1] + 12
    for every in (1, 2, 5, 50):  # the host looks at the "all finished" flags every `every` steps
        assert torch.equal(_static(model, ids, mask, 12, check_every=every, **eos), want)


@pytest.fixture
def static_on_cpu(monkeypatch):
    """``cuda_graph=True`` through the public API on CPU tensors: the device check off, so the static loop runs
    eagerly (``graph_loop`` captures only CUDA tensors)."""
    import importlib

    generate_mod = importlib.import_module("tcopilot.generate")  # the module, not the function on the package
    if not _HAS_CUDA:
        monkeypatch.setattr(generate_mod, "_require_cuda", lambda device: None)


def test_generate_and_generate_settings_with_cuda_graph_equal_eager_decoding(static_on_cpu):
    from tcopilot.generate import generate_settings

    model = _pair()
    ids, mask = _prompts()
    kw = dict(attention_mask=mask, max_new_tokens=7, temperature=0.9, top_k=15, seed=3)
    assert torch.equal(generate(model, ids, cuda_graph=True, **kw), generate(model, ids, **kw))
    settings = [(1.0, "probs"), (0.0, "probs"), (0.5, "logits"), (1.0, "probs")]
    # forks of one static prefill: each must own its positions, h, g and caches (they are written in place)
    swept = generate_settings(model, ids, settings, cuda_graph=True, **kw)
    for lam, fusion in settings:
        assert torch.equal(swept[(lam, fusion)], generate(model, ids, lam=lam, fusion=fusion, **kw)), (lam, fusion)


# ------------------------------------------------------------------------------------------ capturability


def _assert_capturable(step, host_copies, n: int = 3) -> list:
    """Run ``step`` ``n`` times: no host read or copy of a tensor's values, the same ops on the same shapes each
    time (what a captured graph replays). Returns the first step's ops."""
    host_copies.clear()
    steps = []
    for _ in range(n):
        with StepAudit() as audit:
            step()
        steps.append(audit)
    assert not host_copies, f"a step copies tensor values to the host: {host_copies}"
    for audit in steps:
        assert not audit.host_reads, f"a step reads tensor values on the host: {audit.host_reads}"
    assert all(a.ops == steps[0].ops for a in steps), "a step's ops or shapes change from step to step"
    return steps[0].ops


@pytest.mark.parametrize(("impl", "sampling"), [("triton", "seed"), ("triton", "generator"), ("torch", "seed")])
def test_a_decode_step_reads_nothing_on_the_host_and_keeps_its_shapes(impl, sampling, host_copies):
    model = _pair(attention_impl="triton")  # the torch attention plans its key spans on the host
    ids, mask = _prompts()
    randomness = (None, 7) if sampling == "seed" else (torch.Generator(device=DEV).manual_seed(0), None)
    with torch.no_grad(), pilot_states(model.pilot) as states:
        dec = _PairDecoder(model, states, True, static=True)
        dec.prefill(ids, mask, 8)
        loop = _StaticLoop(model, dec, ids, 8, 1.0, "probs", 0.9, 20, 0.9, randomness, impl, list(range(1, 97, 5)), 0)
        loop.choose()
        ops = _assert_capturable(loop.step, host_copies)
    assert any("index_copy" in name for name, _ in ops)  # the audit saw the step's cache writes


def test_static_copilot_cache_is_fixed_size_and_keeps_its_addresses():
    model = _pair()
    cache = model.copilot.new_cache(max_positions=4, static=True)
    kv = cache.layers[0]
    k = torch.randn(2, kv_heads(model), 3, 8, device=DEV)
    kv.append(k, k, torch.arange(3, device=DEV).expand(2, 3))
    ptr = kv.k.data_ptr()
    out_k, _, out_pos = kv.append(k[:, :, :1], k[:, :, :1], torch.full((2, 1), 3, device=DEV))
    assert out_k.shape[2] == 4 and kv.k.data_ptr() == ptr and int(kv.fill) == 4
    assert out_pos.tolist() == [[0, 1, 2, 3]] * 2
    cache.reorder(torch.tensor([1, 0], device=DEV))
    assert kv.k.data_ptr() == ptr
    with pytest.raises(ValueError, match="index: a static cache keeps its 2 rows, got 3"):
        cache.reorder(torch.tensor([1, 0, 0], device=DEV))
    with pytest.raises(ValueError, match="static Copilot cache holds 4 entries"):
        kv.append(k[:, :, :1], k[:, :, :1], torch.full((2, 1), 4, device=DEV))
    with pytest.raises(ValueError, match="max_positions: a static cache needs its size"):
        model.copilot.new_cache(static=True)
    with pytest.raises(ValueError, match="static"):
        model.copilot.new_cache(max_positions=4, static="yes")


@pytest.mark.parametrize("attention", ["torch", "triton"])
def test_static_cache_slots_not_yet_filled_hold_zeros_whatever_fresh_memory_holds(attention, poison_fresh_memory):
    """The attention reads a static cache's whole buffers; unfilled slots are masked out by their position (the
    Triton kernels load them as zeros), but SDPA, the torch path's, multiplies their values by a probability of 0,
    and 0 * NaN is NaN. Fresh memory is poisoned with NaN here (a bf16 NaN is 1 in 256 bit patterns of
    uninitialised memory): decoding must not see it, whichever attention runs."""
    model = _pair(attention_impl=attention)
    ids, mask = _prompts()
    kw = dict(impl=attention, temperature=1.0, seed=3)
    want = generate(model, ids, attention_mask=mask, max_new_tokens=5, **kw)
    poison_fresh_memory()
    cache = model.copilot.new_cache(max_positions=ids.shape[1] + 5, static=True)
    kv = cache.layers[0]
    kv.append(*(torch.randn(3, kv_heads(model), 2, 8, device=DEV),) * 2, torch.arange(2, device=DEV).expand(3, 2))
    assert kv.k[:, :, 2:].eq(0).all() and kv.v[:, :, 2:].eq(0).all()
    assert torch.equal(_static(model, ids, mask, 5, **kw), want)


def kv_heads(model) -> int:
    return model.copilot.config.num_key_value_heads


# ------------------------------------------------------------------------------------------ beam search


def _beam(model, ids, mask, steps, k, *, static, lam=1.0, fusion="probs", eos=(), early_stopping=False,
          length_penalty=1.0, check_every=8):  # fmt: skip
    return beam_search(model, ids, mask, num_beams=k, max_new_tokens=steps, lam=lam, fusion=fusion,
                       eos_token_ids=list(eos), pad_token_id=1, length_penalty=length_penalty,
                       early_stopping=early_stopping, static=static, capture=False, check_every=check_every)


def _hitting_eos(model, ids, mask, steps, k, **kw) -> int:
    """An id the best hypothesis emits early, so that hypotheses end (and rows finish) before ``steps``."""
    out = _beam(model, ids, mask, steps, k, static=False, **kw)
    return int(out[0, ids.shape[1] + 1])


@pytest.mark.parametrize(("family", "lam", "fusion"), [("llama", 1.0, "probs"), ("llama", 1.0, "logits"),
                                                       ("qwen2", 0.0, "probs"), ("gpt2", 1.0, "probs")])
def test_static_beam_search_equals_beam_search(family, lam, fusion):
    model = _pair(family)
    ids, mask = _prompts()
    k, steps = 3, 9
    # one id the best hypothesis emits, plus every other id: every row collects its hypotheses early
    eos = [_hitting_eos(model, ids, mask, steps, k, lam=lam, fusion=fusion)] + list(range(2, 97, 2))
    early = False
    for early_stopping, lp in [(True, 1.0), (False, 2.0), ("never", 0.5)]:
        kw = dict(lam=lam, fusion=fusion, eos=eos, early_stopping=early_stopping, length_penalty=lp)
        want = _beam(model, ids, mask, steps, k, static=False, **kw)
        early |= want.shape[1] < ids.shape[1] + steps
        # the host notices "every row done" every `every` steps: later steps must leave the result alone
        for every in (1, 2, 50):
            got = _beam(model, ids, mask, steps, k, static=True, check_every=every, **kw)
            assert torch.equal(got, want), (early_stopping, lp, every)
    assert early, "no search stopped early: the frozen state after 'done' is untested"


def test_generate_with_beams_and_cuda_graph_equals_eager_beams(static_on_cpu):
    # the public route (generate -> static beam search); the Triton kernels' step is audited below
    model = _pair()
    ids, mask = _prompts()
    kw = dict(attention_mask=mask, max_new_tokens=5, num_beams=2, eos_token_id=7, pad_token_id=1)
    assert torch.equal(generate(model, ids, cuda_graph=True, **kw), generate(model, ids, **kw))


def test_a_beam_step_reads_nothing_on_the_host_and_keeps_its_shapes(host_copies):
    from tcopilot.beam_search import _BeamState

    model = _pair(attention_impl="triton")
    ids, mask = _prompts()
    k = 2
    with torch.no_grad(), pilot_states(model.pilot) as states:
        dec = _PairDecoder(model, states, True, static=True)
        dec.prefill(ids.repeat_interleave(k, 0), mask.repeat_interleave(k, 0), 6)
        search = _BeamState(dec, ids.shape[0], k, 6, [5, 9], 1, 1.0, "probs", 1.0, False, static=True)
        search.score(0)
        _assert_capturable(search.step, host_copies)


def test_static_beam_state_is_frozen_once_every_row_is_done():
    # Replays run on until the host reads the "done" flags: those steps must not touch the result's state (the
    # best live beam is the fallback of a row whose hypotheses all score -inf).
    from tcopilot.beam_search import _BeamState

    model = _pair()
    ids, mask = _prompts()
    k, steps = 2, 12
    with torch.no_grad(), pilot_states(model.pilot) as states:
        dec = _PairDecoder(model, states, True, static=True)
        dec.prefill(ids.repeat_interleave(k, 0), mask.repeat_interleave(k, 0), steps)
        search = _BeamState(dec, ids.shape[0], k, steps, list(range(2, 97, 2)), 1, 1.0, "probs", 1.0, True,
                            static=True)  # fmt: skip
        search.score(0)
        while not bool(search.done.any()):
            search.step()
        names = ("run_seq", "run_scores", "fin_seq", "fin_scores", "fin_valid", "fin_len", "unsatisfied")
        frozen = {n: getattr(search, n).clone() for n in names}
        assert int(search.t) < steps - 2, "the search did not finish early: nothing to check"
        for _ in range(2):
            search.step()
    for n in names:
        assert torch.equal(getattr(search, n), frozen[n]), f"{n} changed after every row was done"


def test_static_pilot_cache_reorders_rows_in_place():
    from tcopilot.generate import reorder_static_pilot_cache, static_pilot_cache
    from tcopilot.pilot import pilot_backbone, run_base

    model = _pair()
    ids, mask = _prompts()
    base = pilot_backbone(model.pilot)
    cache = static_pilot_cache(base, ids.shape[1] + 2)
    with torch.no_grad():
        run_base(base, ids, mask, torch.arange(ids.shape[1], device=DEV).expand_as(ids), cache=cache, use_cache=True)
    layer = cache.layers[0]
    keys, ptr = layer.keys.clone(), layer.keys.data_ptr()
    index = torch.tensor([2, 0, 0], device=DEV)
    reorder_static_pilot_cache(cache, index)
    assert layer.keys.data_ptr() == ptr and torch.equal(layer.keys, keys[index])
    assert int(layer.cumulative_length) == ids.shape[1]  # shared, not per row


# ------------------------------------------------------------------------------------------ errors


def test_cuda_graph_option_errors():
    model = _pair()
    ids, mask = _prompts()
    with pytest.raises(ValueError, match="cuda_graph: expected a bool"):
        generate(model, ids, attention_mask=mask, max_new_tokens=2, cuda_graph=1)
    if not _HAS_CUDA:
        with pytest.raises(ValueError, match="cuda_graph: expected CUDA tensors"):
            generate(model, ids, attention_mask=mask, max_new_tokens=2, cuda_graph=True)


@pytest.mark.skipif(hasattr(torch.cuda.CUDAGraph, "register_generator_state"), reason="this torch can register it")
def test_a_generator_this_torch_cannot_register_is_refused_before_decoding():
    model = _pair(attention_impl="triton")
    ids, mask = _prompts()
    gen = torch.Generator(device=DEV).manual_seed(0)
    with pytest.raises(ValueError, match="generator: this torch cannot replay a user generator"):
        graph_decode(model, ids, mask, 8, 1.0, "probs", 1.0, 0, 1.0, (gen, None), "torch", [], 0, use_copilot=True,
                     capture=True)  # fmt: skip


# ------------------------------------------------------------------------------------------ GPU: real capture


def _cuda_pair(dtype=torch.float32):
    model = _pair(attention_impl="auto").to(dtype)
    return model


@pytest.mark.gpu
@pytest.mark.skipif(not _HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("mode", ["greedy", "seed+logits", "row-seeds+filters", "eos"])
@pytest.mark.parametrize("impl", ["auto", "torch"])
def test_cuda_graph_replays_the_static_steps_exactly(mode, impl):
    model = _cuda_pair()
    ids, mask = _prompts()
    kw = dict(max_new_tokens=24, impl=impl, **_randomness(SAMPLING[mode]))
    graphed = generate(model, ids, attention_mask=mask, cuda_graph=True, **kw)
    # the same kernels on the same shapes, eagerly: bit-identical tokens
    eager_static = _static(model, ids, mask, 24, check_every=8, impl=impl, **_randomness(SAMPLING[mode]))
    assert torch.equal(graphed, eager_static)
    if mode == "greedy":  # dynamic caches read views instead of the whole buffers: same math, other splits
        assert torch.equal(graphed, generate(model, ids, attention_mask=mask, **kw))


@pytest.mark.gpu
@pytest.mark.skipif(not _HAS_CUDA, reason="needs CUDA")
def test_cuda_graph_with_a_generator_is_reproducible_and_bf16_runs():
    model = _cuda_pair()
    ids, mask = _prompts()

    def run(model):
        gen = torch.Generator(device=DEV).manual_seed(3)
        return generate(model, ids, attention_mask=mask, max_new_tokens=16, temperature=1.0, generator=gen,
                        cuda_graph=True)  # fmt: skip

    first = run(model)
    assert torch.equal(run(model), first)
    assert ((first >= 0) & (first < 97)).all()
    bf16 = _cuda_pair(torch.bfloat16)
    out = generate(bf16, ids, attention_mask=mask, max_new_tokens=16, seed=1, temperature=1.0, cuda_graph=True)
    assert out.shape == (3, ids.shape[1] + 16)
    assert torch.equal(out, _static(bf16, ids, mask, 16, seed=1, temperature=1.0, check_every=8, impl="auto"))


@pytest.mark.gpu
@pytest.mark.skipif(not _HAS_CUDA, reason="needs CUDA")
def test_cuda_graph_refuses_the_host_planned_torch_attention():
    model = _pair(attention_impl="torch")
    ids, mask = _prompts()
    with pytest.raises(ValueError, match="attention_impl is 'torch'"):
        generate(model, ids, attention_mask=mask, max_new_tokens=8, cuda_graph=True)


@pytest.mark.gpu
@pytest.mark.skipif(not _HAS_CUDA, reason="needs CUDA")
def test_cuda_graph_lambda_sweep_equals_one_call_per_setting():
    from tcopilot.generate import generate_settings

    model = _cuda_pair()
    ids, mask = _prompts()
    kw = dict(attention_mask=mask, max_new_tokens=20, temperature=1.0, seed=8, cuda_graph=True)
    settings = [(1.0, "probs"), (0.0, "probs"), (0.5, "logits")]
    swept = generate_settings(model, ids, settings, **kw)
    for lam, fusion in settings:
        assert torch.equal(swept[(lam, fusion)], generate(model, ids, lam=lam, fusion=fusion, **kw)), (lam, fusion)


@pytest.mark.gpu
@pytest.mark.skipif(not _HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize(("early_stopping", "fusion"), [(True, "probs"), (False, "logits")])
def test_cuda_graph_beam_search_replays_the_static_steps_exactly(early_stopping, fusion):
    model = _cuda_pair()
    ids, mask = _prompts()
    eos = list(range(2, 97, 2))  # rows finish early: replays past "done" must leave the result alone
    graphed = generate(model, ids, attention_mask=mask, max_new_tokens=20, num_beams=3, fusion=fusion,
                       eos_token_id=eos, pad_token_id=1, early_stopping=early_stopping, cuda_graph=True)
    eager_static = _beam(model, ids, mask, 20, 3, static=True, fusion=fusion, eos=eos,
                         early_stopping=early_stopping)  # fmt: skip
    assert torch.equal(graphed, eager_static)
