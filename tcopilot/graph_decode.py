"""CUDA-graph decoding of the Pilot + Copilot pair: ``generate(..., cuda_graph=True)``.

Why: at small batch a decode step is bound by kernel launches, not by bytes. One step of the pair runs
the Pilot's layers, the Copilot's layers, the fed-back product, the decode head and the sampler: hundreds
of small kernels, each a few microseconds of launch work on the host. A CUDA graph replays the whole step
with one launch.

What makes a step capturable (the same kernels on the same addresses at every replay, no host sync):

* the decoder runs ``static`` (:class:`tcopilot.generate._PairDecoder`): a ``transformers.StaticCache`` for
  the Pilot, ``Copilot.new_cache(static=True)`` (appends at a device-side count; the attention reads the whole
  buffers and skips the unfilled key tiles), the attention mask allocated at its final length, positions and
  the fed-back ``g`` updated in place;
* the loop's own bookkeeping lives on the device too (:class:`_StaticLoop`): the step counter, the output ids,
  the finished rows, each step's Philox key (``seed + offsets[step]``, the keys :func:`generate` uses), and a
  per-step "every row finished" flag the host reads only every ``check_every`` steps;
* the options are Python numbers (per-row option tensors cost a host sync to check their values).

The first token is picked right after the prefill; ``warmup`` eager steps follow (Triton compilation and
autotuning, cuBLAS workspaces), on a side stream as PyTorch's graph capture asks; then one step is captured
and replayed for the rest. Steps run past the last row's EOS (at most ``check_every - 1``) only write
padding, and the result is cut where :func:`generate` stops, so the tokens are :func:`generate`'s.

Without capture (``capture=False``, what the CPU tests run) the same static steps run eagerly.
"""

from __future__ import annotations

import torch

from tcopilot.generate import _decode_head_weights, _PairDecoder, _pick_next, _step_key_offset
from tcopilot.pilot import pilot_states


class _StaticLoop:
    """Algorithm 2's loop state on the device: ``choose`` picks one token, ``step`` feeds the last one and
    picks the next (the body a CUDA graph captures)."""

    def __init__(self, model, dec: _PairDecoder, input_ids, max_new_tokens, lam, fusion, temperature, top_k,
                 top_p, randomness, impl, eos_ids, pad_token_id):  # fmt: skip
        device = input_ids.device
        batch, length = input_ids.shape
        self.model, self.dec, self.length = model, dec, length
        self.options = (lam, fusion, temperature, top_k, top_p, impl)
        self.head = _decode_head_weights(model, dec, impl)
        self.out = torch.full((batch, length + max_new_tokens), pad_token_id, dtype=torch.int64, device=device)
        self.out[:, :length] = input_ids
        self.pad = pad_token_id
        self.step_index = torch.zeros(1, dtype=torch.int64, device=device)  # the token being picked
        self.tok = torch.zeros(batch, dtype=torch.int64, device=device)
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)
        self.done = torch.zeros(max_new_tokens, dtype=torch.bool, device=device)
        self.eos = torch.tensor(eos_ids, dtype=torch.int64, device=device) if eos_ids else None
        self.generator, seed = randomness
        self.seed = self.offsets = None
        if seed is not None:
            # generate()'s step keys (seed + _step_key_offset(t), mod 2**64) with the offsets precomputed:
            # an int seed becomes a 0-d tensor, which the sampler reads as that int (a key for the batch).
            self.offsets = torch.tensor([_step_key_offset(t) for t in range(max_new_tokens)], dtype=torch.int64,
                                        device=device)  # fmt: skip
            self.seed = (seed if isinstance(seed, torch.Tensor) else torch.tensor(seed, device=device)).to(
                torch.int64
            )

    def _randomness(self) -> dict:
        if self.offsets is None:
            return dict(generator=self.generator)
        # index_select, not offsets[step]: indexing by a tensor would read it on the host
        return dict(seed=self.seed + self.offsets.index_select(0, self.step_index).reshape(()))

    def choose(self) -> None:
        lam, fusion, temperature, top_k, top_p, impl = self.options
        nxt = _pick_next(self.model, self.dec, self.head, lam, fusion, temperature, top_k, top_p, impl,
                         self._randomness())  # fmt: skip
        nxt = torch.where(self.finished, self.pad, nxt)
        self.out.index_copy_(1, self.step_index + self.length, nxt[:, None])
        if self.eos is not None:
            self.finished |= (nxt[:, None] == self.eos).any(1)  # isin may sort: kept to a plain compare
        self.done.index_copy_(0, self.step_index, self.finished.all().reshape(1))
        self.tok.copy_(nxt)
        self.step_index += 1

    def step(self) -> None:
        self.dec.advance(self.tok)
        self.choose()


def _capture(loop: _StaticLoop):
    """One ``loop.step`` recorded (not run) in a CUDA graph."""
    graph = torch.cuda.CUDAGraph()
    if loop.generator is not None:  # its Philox offset must advance at every replay, as the default one's does
        graph.register_generator_state(loop.generator)
    with torch.cuda.graph(graph):
        loop.step()
    return graph


def graph_loop(model, dec: _PairDecoder, input_ids, max_new_tokens, lam, fusion, temperature, top_k, top_p,
               randomness, impl, eos_ids, pad_token_id, *, capture: bool | None = None, warmup: int = 2,
               check_every: int = 8) -> torch.Tensor:  # fmt: skip
    """:func:`tcopilot.generate._decode_loop` (same arguments, same tokens) from a prefilled ``static`` decoder:
    its steps captured in a CUDA graph after ``warmup`` eager ones when ``capture`` (default: on CUDA tensors),
    else run eagerly."""
    capture = input_ids.is_cuda if capture is None else capture
    generator = randomness[0]
    if capture and generator is not None and not hasattr(torch.cuda.CUDAGraph, "register_generator_state"):
        raise ValueError(
            "generator: this torch cannot replay a user generator in a CUDA graph "
            "(CUDAGraph.register_generator_state); pass seed= or no generator"
        )
    if capture and dec.use_copilot and any(layer.self_attn.impl == "torch" for layer in model.copilot.layers):
        raise ValueError(
            "cuda_graph: the Copilot's attention_impl is 'torch', which plans its key blocks on the host (a sync "
            "a CUDA graph cannot capture); set it to 'auto' or 'triton'"
        )
    loop = _StaticLoop(model, dec, input_ids, max_new_tokens, lam, fusion, temperature, top_k, top_p, randomness,
                       impl, eos_ids, pad_token_id)  # fmt: skip
    loop.choose()
    picked, graph = 1, None
    if capture and max_new_tokens - 1 > warmup:  # a graph that would never replay is not worth capturing
        device = input_ids.device
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                loop.step()
        torch.cuda.current_stream(device).wait_stream(side)
        picked += warmup
        graph = _capture(loop)
    while picked < max_new_tokens:
        if picked % check_every == 0 and bool(loop.done[picked - 1]):
            break
        graph.replay() if graph is not None else loop.step()
        picked += 1
    done = loop.done[:picked].nonzero()
    new = int(done[0, 0]) + 1 if done.numel() else picked
    return loop.out[:, : loop.length + new]


@torch.no_grad()
def graph_decode(model, input_ids, attention_mask, max_new_tokens, lam, fusion, temperature, top_k, top_p,
                 randomness, impl, eos_ids, pad_token_id, *, use_copilot: bool, **loop_options) -> torch.Tensor:
    """A static prefill and :func:`graph_loop`: ``generate(cuda_graph=True)``'s decoding (validated options,
    ``max_new_tokens >= 1``); ``loop_options``: ``capture``, ``warmup``, ``check_every``."""
    with pilot_states(model.pilot) as states:
        dec = _PairDecoder(model, states, use_copilot, static=True)
        dec.prefill(input_ids, attention_mask, max_new_tokens)
        return graph_loop(model, dec, input_ids, max_new_tokens, lam, fusion, temperature, top_k, top_p,
                          randomness, impl, eos_ids, pad_token_id, **loop_options)  # fmt: skip


__all__ = ["graph_decode", "graph_loop"]
