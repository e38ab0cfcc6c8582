"""``GraphDecoder``: one captured CUDA graph reused across ``generate`` calls (:mod:`tcopilot.graph_decode`).

A CPU cannot capture, so the decoder runs its static steps eagerly here (the device check off) and the tests
check what reuse needs: every call returns ``generate``'s tokens for its own prompts (other prompts, shorter
prompts and smaller batches than the decoder's shapes, sampling with a per-call seed, EOS stops, beam search), and
a step of a later call reads exactly the buffers a step of the first call read (what a replayed graph reads); the
beam decoder's steps also read nothing on the host and keep their ops and shapes from call to call. GPU-only
tests replay for real.
"""

from __future__ import annotations

import itertools
import os

import torch

_HAS_CUDA = torch.cuda.is_available()
if not _HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton / the kernels

import pytest  # noqa: E402
from decode_audit import StepAudit  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import tcopilot.graph_decode as graph_decode_mod  # noqa: E402
from tcopilot import GraphDecoder, generate  # noqa: E402
from tcopilot.beam_search import _BeamState  # noqa: E402
from tcopilot.pilot import pilot_backbone  # noqa: E402
from tcopilot.testing import decoding_pair, left_padded_prompts  # noqa: E402

DEV = "cuda" if _HAS_CUDA else "cpu"
VOCAB = 97


def _pair(family="llama", attention_impl="torch"):
    return decoding_pair(family, attention_impl).to(DEV)


def _prompts(rows, length, seed):
    """Left-padded prompts (row 1: 2 pads, row 2: 4 pads), the last ``length`` columns of the first ``rows``."""
    ids, mask = left_padded_prompts(max(rows, 3), max(length, 5), VOCAB, seed, low=1)
    return ids[:rows, -length:].to(DEV), mask[:rows, -length:].to(DEV)


@pytest.fixture
def eager_on_cpu(monkeypatch):
    if not _HAS_CUDA:
        monkeypatch.setattr(graph_decode_mod, "_require_model_on_cuda", lambda device: None)


# (rows, length, seed) of successive calls: the decoder's own shape, shorter prompts, a smaller batch
CALLS = [(4, 8, 0), (4, 8, 1), (2, 5, 2), (3, 8, 3), (1, 3, 4)]
OPTIONS = {
    "greedy": dict(),
    "sampling+filters": dict(temperature=0.9, top_k=12, top_p=0.95),
    "logits+eos": dict(fusion="logits", temperature=1.0, eos_token_id=list(range(1, VOCAB, 4)), pad_token_id=0),
}


def _every_call_equals_generate(model, options: dict, sampling: bool = False) -> bool:
    """A decoder of shape [4, 8] called with CALLS: each call returns ``generate``'s ids. Returns whether a call
    stopped before ``max_new_tokens``."""
    dec = GraphDecoder(model, batch_size=4, prompt_length=8, **options)
    stopped_early, results = False, []
    for rows, length, seed in CALLS:
        ids, mask = _prompts(rows, length, seed)
        draws = dict(seed=100 + seed) if sampling else {}
        got = dec.generate(ids, attention_mask=mask, **draws)
        want = generate(model, ids, attention_mask=mask, **options, **draws)
        assert torch.equal(got, want), (rows, length, seed)
        stopped_early |= want.shape[1] < length + options["max_new_tokens"]
        results.append((got, want))
    for got, want in results:  # what a call returned is the caller's: later calls do not write into it
        assert torch.equal(got, want)
    return stopped_early


@pytest.mark.parametrize("impl", ["auto", "torch"])  # on the CPU: materialised z, f / the fused head
@pytest.mark.parametrize("name", list(OPTIONS))
def test_every_call_equals_generate(eager_on_cpu, name, impl):
    options = dict(max_new_tokens=9, impl=impl, **OPTIONS[name])
    stopped_early = _every_call_equals_generate(_pair(), options, sampling="temperature" in options)
    if name == "logits+eos":
        assert stopped_early, "no call stopped early: the EOS case tests nothing"


EOS = dict(eos_token_id=list(range(1, VOCAB, 4)), pad_token_id=0)
BEAM_OPTIONS = {  # with and without the Copilot, both fusions, generate's three early_stopping rules
    "probs": dict(),
    "logits+eos": dict(fusion="logits", length_penalty=2.0, **EOS),
    "probs+eos+early": dict(lam=0.5, early_stopping=True, **EOS),
    "pilot-alone+eos+never": dict(lam=0.0, early_stopping="never", length_penalty=0.5, **EOS),
}


@pytest.mark.parametrize("name", list(BEAM_OPTIONS))
def test_every_beam_call_equals_generate(eager_on_cpu, name):
    options = dict(max_new_tokens=9, num_beams=3, **BEAM_OPTIONS[name])
    stopped_early = _every_call_equals_generate(_pair(), options)
    if "eos" in name:
        assert stopped_early, "no call stopped early: the EOS case tests nothing"


def test_beams_with_one_new_token_and_none(eager_on_cpu):
    model = _pair()
    ids, mask = _prompts(2, 6, 0)
    for new in (1, 0):  # one token: no step after the first, no graph; none: the prompts back
        options = dict(max_new_tokens=new, num_beams=2, **EOS)
        dec = GraphDecoder(model, batch_size=3, prompt_length=6, **options)
        for _ in range(2):
            assert torch.equal(dec.generate(ids, attention_mask=mask),
                               generate(model, ids, attention_mask=mask, **options))  # fmt: skip


def test_the_pilot_alone_and_weights_updated_in_place(eager_on_cpu):
    model = _pair()
    alone = GraphDecoder(model, batch_size=3, prompt_length=6, max_new_tokens=5, lam=0.0)
    ids, mask = _prompts(3, 6, 0)
    assert torch.equal(alone.generate(ids, attention_mask=mask),
                       generate(model, ids, attention_mask=mask, max_new_tokens=5, lam=0.0))  # fmt: skip
    dec = GraphDecoder(model, batch_size=3, prompt_length=6, max_new_tokens=5)
    dec.generate(ids, attention_mask=mask)
    with torch.no_grad():  # an optimizer step: in place, same addresses; the fed-back product is recomputed
        for p in model.copilot.parameters():
            p.add_(torch.randn_like(p), alpha=0.3)
    assert torch.equal(dec.generate(ids, attention_mask=mask),
                       generate(model, ids, attention_mask=mask, max_new_tokens=5))  # fmt: skip


class _ExternalReads(TorchDispatchMode):
    """The tensors a step reads that it did not produce itself: the state a replayed graph reads. Keeps them
    alive, so that a buffer reallocated later cannot reuse an address seen here."""

    def __init__(self):
        super().__init__()
        self.produced, self.read = set(), {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for a in list(args) + list((kwargs or {}).values()):
            for t in a if isinstance(a, (list, tuple)) else (a,):
                if isinstance(t, torch.Tensor) and t.numel() and t.data_ptr() not in self.produced:
                    self.read[t.data_ptr()] = t
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (list, tuple)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel():
                self.produced.add(t.data_ptr())
        return out


def test_a_later_call_reads_the_buffers_of_the_first(eager_on_cpu, monkeypatch):
    # What a CUDA graph replays: the addresses of the first call. Every later call must write its prompts'
    # state into those buffers (caches, mask, positions, h, g, loop counters, seed), not into new ones.
    model = _pair(attention_impl="triton")
    audits = []
    real_step = graph_decode_mod._StaticLoop.step

    def audited_step(self):
        with _ExternalReads() as audit:
            real_step(self)
        audits.append(audit)

    monkeypatch.setattr(graph_decode_mod._StaticLoop, "step", audited_step)
    dec = GraphDecoder(model, batch_size=3, prompt_length=7, max_new_tokens=3, temperature=1.0, top_k=20)
    for rows, length, seed in [(3, 7, 0), (2, 5, 1), (3, 6, 2)]:
        ids, mask = _prompts(rows, length, seed)
        dec.generate(ids, attention_mask=mask, seed=seed)
    first, later = audits[0], audits[2:]  # 2 steps per call (3 tokens, the first picked after the prefill)
    assert len(audits) == 6 and len(first.read) > 50
    for audit in later:
        assert set(audit.read) == set(first.read), "a later call's step reads a buffer the first call did not"


def test_a_later_beam_call_reads_the_buffers_of_the_first_and_nothing_on_the_host(eager_on_cpu, monkeypatch,
                                                                                    host_copies):  # fmt: skip
    # The buffer audit above for the beam decoder (the search's state reset in place: sequences, scores, flags,
    # lengths, the step counter, the done flags), and test_graph_decode's capturability audit of every step of
    # every call: no host read, the same ops on the same shapes as the first call's first step.
    copies = host_copies
    # the torch attention plans its key spans on the host; one Copilot layer keeps the interpreter's work small
    model = decoding_pair("llama", "triton", layers=1).to(DEV)
    audits = []
    real_step = _BeamState.step

    def audited_step(self):
        copies.clear()  # (a call copies values to the host outside its steps: its checks, the result)
        with StepAudit() as ops, _ExternalReads() as reads:
            real_step(self)
        assert not copies, f"a beam step copies tensor values to the host: {copies}"
        audits.append((ops, reads))

    monkeypatch.setattr(_BeamState, "step", audited_step)
    dec = GraphDecoder(model, batch_size=2, prompt_length=5, max_new_tokens=3, num_beams=2, eos_token_id=[5, 9],
                       pad_token_id=1)  # fmt: skip
    for rows, length, seed in [(2, 5, 0), (1, 3, 1)]:  # a later call with fewer and shorter prompts
        ids, mask = _prompts(rows, length, seed)
        dec.generate(ids, attention_mask=mask)
    (first_ops, first_reads), later = audits[0], audits[2:]  # 2 steps per call (the host checks every 8)
    assert len(audits) == 4 and len(first_reads.read) > 50
    for ops, _ in audits:
        assert not ops.host_reads, f"a beam step reads tensor values on the host: {ops.host_reads}"
        assert ops.ops == first_ops.ops, "a beam step's ops or shapes change from step to step or call to call"
    for _, reads in later:
        assert set(reads.read) == set(first_reads.read), "a later call's step reads a buffer the first call did not"


def test_errors(eager_on_cpu, monkeypatch):
    model = _pair()
    ids, mask = _prompts(2, 6, 0)
    with pytest.raises(ValueError, match="batch_size"):
        GraphDecoder(model, batch_size=0, prompt_length=6)
    with pytest.raises(ValueError, match="prompt_length"):
        GraphDecoder(model, batch_size=2, prompt_length=2.5)
    with pytest.raises(ValueError, match="fusion"):
        GraphDecoder(model, batch_size=2, prompt_length=6, fusion="sum")
    from transformers import GenerationConfig

    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="num_beams: expected an int >= 1"):
            GraphDecoder(model, batch_size=2, prompt_length=6, num_beams=bad)
    for sampling in (dict(temperature=1.0), dict(do_sample=True), dict(generation_config=GenerationConfig(
            num_beams=4, do_sample=True))):  # fmt: skip
        with pytest.raises(ValueError, match="num_beams: beam sampling"):  # as generate()
            GraphDecoder(model, batch_size=2, prompt_length=6, **({"num_beams": 2} | sampling))
    with pytest.raises(ValueError, match="length_penalty"):
        GraphDecoder(model, batch_size=2, prompt_length=6, max_new_tokens=20, num_beams=2, length_penalty=100.0)
    with pytest.raises(ValueError, match="early_stopping"):
        GraphDecoder(model, batch_size=2, prompt_length=6, num_beams=2, early_stopping="sometimes")
    greedy = GraphDecoder(model, batch_size=2, prompt_length=6, max_new_tokens=3)
    beams = GraphDecoder(model, batch_size=2, prompt_length=6, max_new_tokens=3, num_beams=2)
    for dec, no_draws in ((beams, "searches 2 beams"), (greedy, "decodes greedily")):
        for rows, length in ((3, 6), (2, 7)):
            with pytest.raises(ValueError, match=r"input_ids: expected at most \[2, 6\]"):
                dec.generate(*_prompts(rows, length, 0))
        with pytest.raises(ValueError, match=f"seed: this GraphDecoder {no_draws}"):
            dec.generate(ids, attention_mask=mask, seed=1)
    sampler = GraphDecoder(model, batch_size=2, prompt_length=6, max_new_tokens=3, temperature=1.0)
    with pytest.raises(ValueError, match="seed"):
        sampler.generate(ids, attention_mask=mask, seed=1.5)
    with pytest.raises(ValueError, match="input_ids: expected token ids"):
        greedy.generate(ids + VOCAB, attention_mask=mask)
    greedy.generate(ids, attention_mask=mask)
    model.double()  # parameters replaced: the captured graph would read the old ones
    with pytest.raises(ValueError, match="model: its parameters were replaced"):
        greedy.generate(ids, attention_mask=mask)
    no_static = _pair()
    pilot_backbone(no_static.pilot)._can_compile_fullgraph = False  # as Mamba's and FalconH1's classes declare
    with pytest.raises(ValueError, match="no static KV cache"):
        GraphDecoder(no_static, batch_size=2, prompt_length=6)
    if not _HAS_CUDA:
        monkeypatch.undo()
        with pytest.raises(ValueError, match="model: a GraphDecoder replays CUDA graphs"):
            GraphDecoder(_pair(), batch_size=2, prompt_length=6)


@pytest.mark.gpu
@pytest.mark.skipif(not _HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("name", list(OPTIONS))
def test_gpu_replays_equal_the_same_steps_run_eagerly_across_calls(name):
    model = _pair(attention_impl="auto")
    options = dict(max_new_tokens=20, **OPTIONS[name])
    graphed = GraphDecoder(model, batch_size=4, prompt_length=8, **options)
    eager = GraphDecoder(model, batch_size=4, prompt_length=8, **options)
    eager.capture = False  # the same static steps on the same shapes, run eagerly: bit-identical tokens
    sampling = "temperature" in options
    for rows, length, seed in CALLS:
        ids, mask = _prompts(rows, length, seed)
        draws = dict(seed=100 + seed) if sampling else {}
        got = graphed.generate(ids, attention_mask=mask, **draws)
        assert torch.equal(got, eager.generate(ids, attention_mask=mask, **draws)), (rows, length, seed)
        assert got.shape[0] == rows and torch.equal(got[:, :length], ids)
    assert graphed._graph is not None and eager._graph is None


def _arithmetic_eval():
    """Seven arithmetic test examples and a word tokenizer of exactly the tiny Pilot's vocabulary."""
    from tcopilot.data.arithmetic import generate_arithmetic
    from tcopilot.data.prompts import format_prompt
    from tcopilot.data.tokenizer import WordTokenizer

    examples = generate_arithmetic(7, split="test", seed=0)
    texts = [format_prompt(x) + " " + x["output"] for x in examples]
    filler = ["".join(w) for w in itertools.product("qzj", repeat=4)]  # letter-only words: one token each
    tok = WordTokenizer.build(texts)
    tok = WordTokenizer.build(texts + filler[: VOCAB - len(tok)])
    assert len(tok) == VOCAB  # every id the tiny Pilot can emit decodes
    return examples, tok


def test_evaluate_accuracy_with_cuda_graph_gives_the_same_predictions(eager_on_cpu):
    from tcopilot.evaluate import evaluate_accuracy

    examples, tok = _arithmetic_eval()
    model = _pair()
    kw = dict(lam=1.0, batch_size=3, max_new_tokens=6)  # batches of 3, 3 and 1 prompts of different lengths
    plain = evaluate_accuracy(model, tok, examples, **kw)
    graphed = evaluate_accuracy(model, tok, examples, cuda_graph=True, **kw)
    assert graphed["predictions"] == plain["predictions"] and graphed["correct"] == plain["correct"]
    assert graphed["new_tokens"] == plain["new_tokens"]
    with pytest.raises(ValueError, match="cuda_graph: expected a bool"):
        evaluate_accuracy(model, tok, examples, cuda_graph="yes", **kw)


def test_evaluate_accuracy_with_beams_equals_generate_per_batch(eager_on_cpu):
    from tcopilot.data.prompts import encode_prompts
    from tcopilot.evaluate import evaluate_accuracy

    examples, tok = _arithmetic_eval()
    model = _pair()
    # batches of 3, 3 and 1 prompts of different lengths; a light Copilot, so that beams and greedy answers differ
    kw = dict(lam=0.05, fusion="logits", batch_size=3, max_new_tokens=6)
    beams = evaluate_accuracy(model, tok, examples, num_beams=2, length_penalty=0.5, **kw)
    want = []
    for start in range(0, len(examples), 3):
        ids, mask = encode_prompts(tok, examples[start : start + 3], style="short", padding_side="left")
        out = generate(model, ids, attention_mask=mask, max_new_tokens=6, lam=0.05, fusion="logits", num_beams=2,
                       length_penalty=0.5, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip
        for row in out[:, ids.shape[1] :].tolist():
            want.append(tok.decode(row[: row.index(tok.eos_token_id)] if tok.eos_token_id in row else row))
    assert beams["predictions"] == want
    # the beams change some answer here, so a num_beams left unused would show
    assert beams["predictions"] != evaluate_accuracy(model, tok, examples, **kw)["predictions"]
    graphed = evaluate_accuracy(model, tok, examples, num_beams=2, length_penalty=0.5, cuda_graph=True, **kw)
    assert graphed["predictions"] == beams["predictions"] and graphed["correct"] == beams["correct"]
    assert graphed["new_tokens"] == beams["new_tokens"]
    for bad in (0, 1.5):
        with pytest.raises(ValueError, match="num_beams: expected an int >= 1"):
            evaluate_accuracy(model, tok, examples, num_beams=bad, **kw)
