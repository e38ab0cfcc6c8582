"""Beam search (tcopilot.beam_search): equals HF at lam=0 and a cache-free reference with the Copilot."""

import pytest
import torch

from tcopilot import TransformerCopilot
from tcopilot.beam_search import beam_log_probs
from tcopilot.generate import reorder_pilot_cache
from tcopilot.pilot import pilot_states, positions_from_mask, run_base
from tcopilot.testing import left_padded_prompts, tiny_pair

PAD = 1


def _prompts(B=3, L=6, vocab=97, seed=0):
    return left_padded_prompts(B, L, vocab, seed, low=2)


def _eos_that_hits(model, ids, mask, k, steps, lam=0.0, fusion="probs"):
    """An EOS id taken from the best hypotheses of a run without EOS, so that hypotheses do end early."""
    out = model.generate(ids, attention_mask=mask, max_new_tokens=steps, num_beams=k, lam=lam, fusion=fusion,
                         eos_token_id=96, pad_token_id=PAD)
    L = ids.shape[1]
    return int(out[0, L + 2])


def _naive_next_scores(model, seqs, mask, L0, fs, lam, fusion):
    """No caches: the Pilot and the Copilot over whole sequences; returns (log p~ [R, V], f [R, V])."""
    cop = model.copilot
    pos = positions_from_mask(mask)
    with pilot_states(model.pilot) as st:
        hidden, _ = run_base(model.pilot.base_model, seqs, mask, pos.clamp(min=0))
    z = model.pilot.get_output_embeddings()(hidden[:, -1]).float()
    R, L = seqs.shape
    stream = cop.error_in.bias.expand(R, L, -1).clone()
    for r in range(R):
        for j, f in enumerate(fs[r]):  # the Copilot output of position L0-1+j feeds position L0+j
            stream[r, L0 + j] = cop.error_in(f)
    log = torch.cat([st.x_tilde, st.pooled], 1)
    f = cop.error_out(cop(stream, log, pos, torch.cat([pos, pos], 1))[:, -1]).float()
    if fusion == "logits":
        return torch.log_softmax(z + lam * f, -1), f
    q = (torch.softmax(z, -1) + lam * f).clamp(min=0)
    if (q.sum(-1) == 0).any():
        raise AssertionError("test setup: a beam with all p~ clamped to 0")
    return torch.log(q / q.sum(-1, keepdim=True)), f


def naive_beam_search(model, ids, mask, k, steps, lam, fusion, eos, pad, length_penalty=1.0):
    """Textbook beam search with ``early_stopping=True``: per row, the 2k best (beam, token) candidates in
    order; an EOS (or last-step) candidate ranked in the top k becomes a finished hypothesis; the first k
    others are the live beams; a row is done once it holds k finished hypotheses."""
    B, L0 = ids.shape
    live = [[([], 0.0, [])] for _ in range(B)]  # (tokens, score, Copilot outputs used at each new token)
    finished = [[] for _ in range(B)]  # (normalised score, tokens)
    for t in range(steps):
        rows = [(b, h) for b in range(B) if len(finished[b]) < k for h in live[b]]
        if not rows:
            break
        seqs = torch.stack([torch.cat([ids[b], torch.tensor(h[0], dtype=torch.long)]) for b, h in rows])
        msk = torch.stack([torch.cat([mask[b], torch.ones(t, dtype=torch.long)]) for b, h in rows])
        logp, f = _naive_next_scores(model, seqs, msk, L0, [h[2] for _, h in rows], lam, fusion)
        for b in range(B):
            if len(finished[b]) >= k:
                continue
            cands = [(h[1] + float(logp[r, v]), r, v) for r, (bb, h) in enumerate(rows) if bb == b
                     for v in range(logp.shape[1])]
            cands.sort(key=lambda c: -c[0])
            new_live = []
            for rank, (s, r, v) in enumerate(cands[: 2 * k]):
                h = rows[r][1]
                if v == eos or t == steps - 1:
                    if rank < k:
                        finished[b].append((s / (t + 1) ** length_penalty, h[0] + [v]))
                elif len(new_live) < k:
                    new_live.append((h[0] + [v], s, h[2] + [f[r]]))
            finished[b] = sorted(finished[b], key=lambda x: -x[0])[:k]
            live[b] = new_live
    best = [finished[b][0][1] for b in range(B)]
    T = max(len(x) for x in best)
    out = torch.full((B, T), pad, dtype=torch.long)
    for b, x in enumerate(best):
        out[b, : len(x)] = torch.tensor(x)
    return torch.cat([ids, out], 1)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_lambda_zero_equals_hf_beam_search(family):
    model = tiny_pair(family)
    ids, mask = _prompts()
    k, steps = 3, 8
    eos = _eos_that_hits(model, ids, mask, k, steps)
    for early_stopping, lp in [(True, 1.0), (False, 2.0), ("never", 0.5)]:
        kw = dict(attention_mask=mask, max_new_tokens=steps, num_beams=k, length_penalty=lp,
                  early_stopping=early_stopping, eos_token_id=eos, pad_token_id=PAD)
        ours = model.generate(ids, lam=0.0, **kw)
        hf = model.pilot.generate(ids, do_sample=False, **kw)
        assert torch.equal(ours, hf), (early_stopping, lp)
    assert (ours[:, ids.shape[1]:] == PAD).any(), "no hypothesis ended early: the EOS test is vacuous"


@pytest.mark.parametrize("fusion", ["probs", "logits"])
def test_cached_beam_search_equals_naive_reference(fusion):
    model = tiny_pair("llama", layers=3)
    with torch.no_grad():  # a head strong enough to change tokens, and layers strong enough that the Copilot's
        model.copilot.error_out.weight.normal_(0, 0.5)  # state depends on its beam's history: a cache or fed-back
        model.copilot.error_in.weight.normal_(0, 0.3)  # g left on the wrong beam then changes the result
        for mod in model.copilot.layers.modules():
            if isinstance(mod, torch.nn.Linear):
                mod.weight.normal_(0, 0.3)
    ids, mask = _prompts()
    k, steps = 3, 7
    eos = _eos_that_hits(model, ids, mask, k, steps, lam=1.0, fusion=fusion)
    kw = dict(attention_mask=mask, max_new_tokens=steps, num_beams=k, eos_token_id=eos, pad_token_id=PAD,
              early_stopping=True, length_penalty=1.0)
    with torch.no_grad():
        fast = model.generate(ids, lam=1.0, fusion=fusion, **kw)
        slow = naive_beam_search(model, ids, mask, k, steps, 1.0, fusion, eos, PAD)
        alone = model.generate(ids, lam=0.0, **kw)
    assert torch.equal(fast, slow)
    assert not torch.equal(fast, alone), "the test Copilot is too weak to change any token"
    assert (fast[:, ids.shape[1]:] == eos).any(), "no hypothesis hit EOS: the EOS test is vacuous"


def test_finished_hypotheses_end_with_eos_then_padding():
    model = tiny_pair("llama")
    ids, mask = _prompts()
    L, k, steps = ids.shape[1], 4, 9
    eos = _eos_that_hits(model, ids, mask, k, steps, lam=1.0)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=steps, num_beams=k, lam=1.0, eos_token_id=eos,
                         pad_token_id=PAD, early_stopping=True)
    assert out.shape[0] == 3 and L < out.shape[1] <= L + steps
    assert torch.equal(out[:, :L], ids)
    for row in out[:, L:].tolist():
        if eos in row:  # a finished hypothesis: EOS, then only padding
            end = row.index(eos)
            assert all(t == PAD for t in row[end + 1:])
        else:  # ran to the length limit: no padding inside
            assert len(row) == steps and PAD not in row
    # one beam is greedy decoding
    greedy = model.generate(ids, attention_mask=mask, max_new_tokens=steps, lam=1.0, eos_token_id=eos,
                            pad_token_id=PAD)
    one = model.generate(ids, attention_mask=mask, max_new_tokens=steps, num_beams=1, lam=1.0, eos_token_id=eos,
                         pad_token_id=PAD)
    assert torch.equal(greedy, one)
    # a Pilot-only model beam-searches too (lam is then irrelevant)
    alone = TransformerCopilot(model.pilot, None)
    a = alone.generate(ids, attention_mask=mask, max_new_tokens=4, num_beams=k, lam=1.0)
    b = model.generate(ids, attention_mask=mask, max_new_tokens=4, num_beams=k, lam=0.0)
    assert torch.equal(a, b)


def test_beam_log_probs_rules():
    z = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 0.0, 0.0]])
    f = torch.tensor([[-0.9, 0.1, 0.0, 0.0], [-1.0, -1.0, -1.0, -1.0]])
    lp = beam_log_probs(z, f, 1.0, "probs")
    q = (torch.softmax(z[0], -1) + f[0]).clamp(min=0)
    assert torch.isneginf(lp[0, 0]) and torch.allclose(lp[0, 1:], torch.log(q / q.sum())[1:])
    assert torch.allclose(lp[1], torch.log_softmax(z[1], -1))  # all clamped: the Pilot alone
    assert torch.allclose(beam_log_probs(z, f, 0.5, "logits"), torch.log_softmax(z + 0.5 * f, -1))
    assert torch.equal(beam_log_probs(z, None, 1.0, "probs"), torch.log_softmax(z, -1))


def test_reorder_pilot_cache_legacy_tuple_and_dynamic_cache():
    k = torch.arange(24.0).view(3, 1, 4, 2)
    legacy = ((k, k + 100),)
    out = reorder_pilot_cache(legacy, torch.tensor([2, 2, 0]))
    assert torch.equal(out[0][0], k[[2, 2, 0]]) and torch.equal(out[0][1], (k + 100)[[2, 2, 0]])
    model = tiny_pair("llama")
    ids, mask = _prompts()
    _, cache = run_base(model.pilot.base_model, ids, mask, positions_from_mask(mask).clamp(min=0), use_cache=True)
    keys = [layer.keys.clone() for layer in cache.layers]
    reorder_pilot_cache(cache, torch.tensor([1, 0, 0]))
    assert all(torch.equal(layer.keys, kk[[1, 0, 0]]) for layer, kk in zip(cache.layers, keys))


def test_bad_beam_options_raise():
    model = tiny_pair("llama")
    ids, _ = _prompts()
    with pytest.raises(ValueError, match="beam sampling"):
        model.generate(ids, max_new_tokens=2, num_beams=2, do_sample=True)
    with pytest.raises(ValueError, match="num_beams"):
        model.generate(ids, max_new_tokens=2, num_beams=0)
    with pytest.raises(ValueError, match="early_stopping"):
        model.generate(ids, max_new_tokens=2, num_beams=2, early_stopping="sometimes")
    with pytest.raises(ValueError, match="length_penalty"):
        model.generate(ids, max_new_tokens=2, num_beams=2, length_penalty=float("inf"))


def test_length_penalty_past_float32_range_raises():
    """The finished score divides by n ** length_penalty (n up to max_new_tokens): 1e300 overflowed in Python
    (OverflowError), a smaller excess would turn into inf / 0 in fp32."""
    model = tiny_pair("llama")
    ids, mask = _prompts()
    kw = dict(attention_mask=mask, max_new_tokens=3, num_beams=2)
    for lp in (1e300, -1e300, 80.0, -80.0):  # ln(3) * 80 = 87.9 > ln(1 / fp32 tiny) = 87.3
        with pytest.raises(ValueError, match="length_penalty: expected a finite number with \\|length_penalty\\|"):
            model.generate(ids, length_penalty=lp, **kw)
    for lp in (79.0, -79.0, 2.0):
        assert model.generate(ids, length_penalty=lp, **kw).shape[0] == 3
    # unused without beams; a one-token search divides by 1 ** p = 1
    assert model.generate(ids, length_penalty=1e300, attention_mask=mask, max_new_tokens=3).shape == (3, 9)
    assert model.generate(ids, length_penalty=1e300, attention_mask=mask, max_new_tokens=1, num_beams=2).shape == (3, 7)


def test_eos_lists_longer_than_the_candidates():
    """(1 + #eos) * k candidates can exceed the k * V that exist (every id an EOS, repeated ids): topk failed
    ("selected index k out of range"); the count is clamped, with the result of an unbounded count."""
    model = tiny_pair("llama")
    ids, mask = _prompts()
    L, k = ids.shape[1], 2
    kw = dict(attention_mask=mask, max_new_tokens=5, num_beams=k, pad_token_id=PAD)
    every = model.generate(ids, eos_token_id=list(range(97)), **kw)  # every first token finishes its hypothesis
    first = model.generate(ids, attention_mask=mask, max_new_tokens=1)  # the best first token (greedy)
    assert torch.equal(every, first)
    eos = _eos_that_hits(model, ids, mask, k, 5, lam=1.0)
    once = model.generate(ids, eos_token_id=eos, **kw)
    assert torch.equal(model.generate(ids, eos_token_id=[eos] * 200, **kw), once)
    assert (once[:, L:] == eos).any(), "no hypothesis hit EOS: the comparison is vacuous"


def test_static_beam_state_reset_rewrites_every_buffer_in_place():
    """``_BeamState.reset`` (a GraphDecoder's later call): every tensor of the search back to a fresh one's values,
    at the addresses a captured step reads."""
    from tcopilot.beam_search import _BeamState
    from tcopilot.generate import _PairDecoder

    model = tiny_pair("llama")
    ids, mask = _prompts()
    k, steps = 2, 5
    with torch.no_grad(), pilot_states(model.pilot) as states:
        dec = _PairDecoder(model, states, True, static=True)
        dec.prefill(ids.repeat_interleave(k, 0), mask.repeat_interleave(k, 0), steps)
        options = (dec, ids.shape[0], k, steps, [3, 5], PAD, 1.0, "probs", 1.0, False)
        fresh = {n: v.clone() for n, v in vars(_BeamState(*options, static=True)).items()
                 if isinstance(v, torch.Tensor)}  # fmt: skip
        search = _BeamState(*options, static=True)
        search.score(0)
        for _ in range(3):
            search.step()
        used = {n: getattr(search, n) for n in fresh}
        changed = [n for n in fresh if not torch.equal(used[n], fresh[n])]
        assert {"run_seq", "run_scores", "fin_seq", "t", "run_src", "run_tok"} <= set(changed), changed
        search.reset()
    for n, value in fresh.items():
        assert getattr(search, n) is used[n], f"{n}: reset replaced the buffer"
        assert torch.equal(used[n], value), f"{n}: reset left a value of the last search"
