"""Whole decoding loops: ``tcopilot.generate`` with and without CUDA graphs, Pilot alone and Pilot + Copilot.

At small batch a decode step is bound by kernel launches: ``bench_e2e.py`` times one step's kernels, this file
times what a user runs, one ``generate`` call (prefill included), and shows what replaying each step as one CUDA
graph (``cuda_graph=True``) saves. The Pilot-alone rows (``copilot=0L``, ``lam=0``) are the baseline of the
paper's inference overhead (Table 15: +7.9% for a 1B Pilot with a 1B Copilot).

Providers:

* ``eager``: ``generate(...)`` as it decodes by default (dynamic caches, one launch per kernel);
* ``static``: the static-cache loop ``generate(cuda_graph=True)`` captures, run eagerly (CPU only: it shows
  what the fixed-size caches cost there, without a graph to pay for them);
* ``graph``: ``generate(..., cuda_graph=True)`` (GPU only): the time includes the graph's capture (two eager
  warm-up steps, one recorded step) at every call, as a user pays it;
* ``graph_reused``: ``GraphDecoder.generate`` (GPU only) after its first call: the prefill is refilled into the
  buffers of the graph captured once, so a call costs the prefill and the replays (a user decoding many batches;
  with 4 beams, ``GraphDecoder(num_beams=4)``: the beam search's state is reset in place too).

Shapes: GPU, the Llama-3.2-1B-shaped Pilot of ``bench_e2e.py`` (bf16, random weights) with Copilots of 0, 4 and
16 layers of its width, batch 1 and 16, a 128-token prompt, 32 greedy new tokens (no EOS: every call decodes
all of them), and batch 1 with 4 beams (the paper's decoding); the quick scope
(``TCOPILOT_BENCH_SCOPE=quick``, what ``gpu_check.sh`` runs) keeps batch 1 with Copilots of 0 and 16 layers.
CPU: a tiny Llama (hidden 64, 2 layers, V=2000), Copilots of 0 and 2 layers, batch 1, 16 tokens, greedy and 4
beams.
``extra_info["ms_per_token"]`` is the call's time over its new tokens (prefill included).

Before timing, each provider's tokens are checked once, untimed: ``graph`` against the same static loop run
eagerly (the same kernels on the same shapes: bit-identical; ``graph_reused`` too, at its capturing first call),
``static`` against ``eager``.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from bench_e2e import COPILOT, CPU_CFG, GPU_CFG, PILOT, models
from benchutil import ON_GPU, case, release, run_bench, set_group

from tcopilot import GraphDecoder, TransformerCopilot
from tcopilot.beam_search import beam_search
from tcopilot.generate import generate
from tcopilot.graph_decode import graph_decode


@dataclass(frozen=True)
class Loop:
    batch: int
    prompt: int
    new_tokens: int
    beams: int = 1  # > 1: beam search (the paper decodes with 4 beams)

    @property
    def mode(self) -> str:
        return "greedy" if self.beams == 1 else f"beam{self.beams}"


CPU_LOOPS = [Loop(1, 16, 16), Loop(1, 16, 16, beams=4)]
GPU_LOOPS = [Loop(1, 128, 32), Loop(1, 128, 32, beams=4), Loop(16, 128, 32)]
LAYERS = {False: [0, 2], True: [0, 4, 16]}
PROVIDERS = {False: ["eager", "static"], True: ["eager", "graph", "graph_reused"]}


def _cases():
    out = []
    for gpu, cfg, loops in ((False, CPU_CFG, CPU_LOOPS), (True, GPU_CFG, GPU_LOOPS)):
        for layers in LAYERS[gpu]:  # outer: one Copilot in memory at a time
            for loop in loops:
                for provider in PROVIDERS[gpu]:
                    cid = f"{cfg.name}-copilot{layers}-B{loop.batch}-{loop.mode}-{provider}"
                    # quick scope (gpu_check.sh): batch 1, the Pilot alone and the paper's 1B + 1B pair
                    full = gpu and (loop.batch != 1 or layers not in (0, 16))
                    out.append(case((cfg, layers, loop, provider), id=cid, gpu=gpu, full=full))
    return out


def _prompt(cfg, loop: Loop, device) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(2)
    return torch.randint(0, cfg.vocab, (loop.batch, loop.prompt), device=device, generator=g)


def _static_eager(model, ids, loop: Loop, lam: float) -> torch.Tensor:
    mask = torch.ones_like(ids)
    if loop.beams > 1:
        return beam_search(model, ids, mask, num_beams=loop.beams, max_new_tokens=loop.new_tokens, lam=lam,
                           fusion="probs", eos_token_ids=[], pad_token_id=0, static=True, capture=False)
    return graph_decode(model, ids, mask, loop.new_tokens, lam, "probs", 0.0, 0, 1.0, (None, None), "auto", [], 0,
                        use_copilot=lam != 0, capture=False)  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def _release_module_state():
    yield
    release(PILOT, COPILOT)


@pytest.mark.parametrize(("cfg", "layers", "loop", "provider"), _cases())
def test_generate_loop(benchmark, cfg, layers: int, loop: Loop, provider: str):
    pilot, cop = models(cfg, layers)
    if cop is not None:
        for layer in cop.layers:
            layer.self_attn.impl = "auto"
    model = TransformerCopilot(pilot, cop).eval()
    ids = _prompt(cfg, loop, pilot.device)
    lam = 1.0 if cop is not None else 0.0
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=loop.new_tokens, lam=lam, temperature=0.0,
              num_beams=loop.beams)  # fmt: skip

    decoder = None
    if provider == "graph_reused":
        decoder = GraphDecoder(model, batch_size=loop.batch, prompt_length=loop.prompt,
                               max_new_tokens=loop.new_tokens, lam=lam, temperature=0.0,
                               num_beams=loop.beams)  # fmt: skip

    def fn():
        if provider == "static":
            return _static_eager(model, ids, loop, lam)
        if decoder is not None:
            return decoder.generate(ids, attention_mask=kw["attention_mask"])
        return generate(model, ids, cuda_graph=provider == "graph", **kw)

    # Correctness first, untimed (for graph_reused this first call also captures its graph).
    got = fn()
    assert got.shape == (loop.batch, loop.prompt + loop.new_tokens)
    assert torch.equal(got[:, : loop.prompt], ids) and bool(((got >= 0) & (got < cfg.vocab)).all())
    if provider != "eager":
        # The graph providers replay the static loop (the same kernels on the same static caches): token for token.
        # (eager is the reference itself: generate against the static loop is exact in fp32 and checked by the
        # tests; in bf16 their caches' different attention lengths may round a near-tie the other way.)
        want = _static_eager(model, ids, loop, lam) if provider.startswith("graph") else generate(model, ids, **kw)
        assert torch.equal(got, want), f"{provider}: tokens differ from the reference loop"
        if decoder is not None:  # and a call that replays the graph of the first
            assert torch.equal(fn(), want), f"{provider}: a reused graph's tokens differ from the reference loop"
        del want
    del got

    shape = f"{cfg.name} B{loop.batch} prompt{loop.prompt} new{loop.new_tokens} copilot={layers}L"
    set_group(benchmark, "generate", shape, cfg.dtype, loop.mode, provider, copilot_layers=layers, batch=loop.batch,
              model=cfg.name, new_tokens=loop.new_tokens)  # fmt: skip
    rounds, warmup = (3, 1) if ON_GPU else (3, 0)
    run_bench(benchmark, fn, rounds=rounds, warmup=warmup)
    stats = benchmark.stats.stats if benchmark.stats is not None else None
    if stats is not None:
        benchmark.extra_info["ms_per_token"] = 1e3 * stats.median / loop.new_tokens
