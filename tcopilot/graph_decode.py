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

Beam search (``generate(num_beams=k, cuda_graph=True)``) runs the same capture and replay helpers over
:class:`tcopilot.beam_search._BeamState`, whose step keeps the search's bookkeeping on the device.

:class:`GraphDecoder` keeps the decoder, the loop state and the graph for many calls: a later call refills the
same buffers (``_PairDecoder.prefill(refill=True)``: the Pilot's ``StaticCache`` and the Copilot's static caches
reset in place, the mask, positions, ``h``, ``g`` and the fed-back product copied in; ``_StaticLoop.reset``, or
``_BeamState.reset`` with beams) and replays the graph captured at the first call.
"""

from __future__ import annotations

import torch

from tcopilot._validation import IMPLS, check_choice, check_finite, check_int
from tcopilot.beam_search import _BeamState
from tcopilot.generate import (
    _check_prompts,
    _check_static_cache_family,
    _check_token_ids,
    _decode_head_weights,
    _PairDecoder,
    _pick_next,
    _step_key_offset,
    _uses_copilot,
    resolve_generation_options,
)
from tcopilot.kernels.rectified_next_token.api import FUSIONS
from tcopilot.pilot import check_token_ids, pilot_backbone, pilot_states


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
        self.out = torch.empty((batch, length + max_new_tokens), dtype=torch.int64, device=device)
        self.pad = pad_token_id
        self.step_index = torch.empty(1, dtype=torch.int64, device=device)  # the token being picked
        self.tok = torch.empty(batch, dtype=torch.int64, device=device)
        self.finished = torch.empty(batch, dtype=torch.bool, device=device)
        self.done = torch.empty(max_new_tokens, dtype=torch.bool, device=device)
        self.eos = torch.tensor(eos_ids, dtype=torch.int64, device=device) if eos_ids else None
        self.generator, seed = randomness
        self.seed = self.offsets = None
        if seed is not None:
            # generate()'s step keys (seed + _step_key_offset(t), mod 2**64) with the offsets precomputed:
            # an int seed becomes a 0-d tensor, which the sampler reads as that int (a key for the batch).
            self.offsets = torch.tensor([_step_key_offset(t) for t in range(max_new_tokens)], dtype=torch.int64,
                                        device=device)  # fmt: skip
            shape = seed.shape if isinstance(seed, torch.Tensor) else ()
            self.seed = torch.empty(shape, dtype=torch.int64, device=device)  # its own buffer: reset writes it
        self.reset(input_ids, seed)

    def reset(self, input_ids: torch.Tensor, seed=None) -> None:
        """Start over with new prompts (same shape) and seed, in place: a captured step reads these buffers."""
        self.out.fill_(self.pad)
        self.out[:, : self.length] = input_ids
        self.step_index.zero_()
        self.tok.zero_()
        self.finished.zero_()
        self.done.zero_()
        if self.seed is not None:
            self.seed.copy_(seed if isinstance(seed, torch.Tensor) else torch.tensor(seed, dtype=torch.int64))

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


def _check_capturable(model, dec: _PairDecoder, generator) -> None:
    """What a captured step cannot do, refused before any decoding."""
    if generator is not None and not hasattr(torch.cuda.CUDAGraph, "register_generator_state"):
        raise ValueError(
            "generator: this torch cannot replay a user generator in a CUDA graph "
            "(CUDAGraph.register_generator_state); pass seed= or no generator"
        )
    if dec.use_copilot and any(layer.self_attn.impl == "torch" for layer in model.copilot.layers):
        raise ValueError(
            "cuda_graph: the Copilot's attention_impl is 'torch', which plans its key blocks on the host (a sync "
            "a CUDA graph cannot capture); set it to 'auto' or 'triton'"
        )


def _warm_up_and_capture(loop: _StaticLoop, device: torch.device, warmup: int):
    """``warmup`` eager steps on a side stream (compilation, autotuning, workspaces), then one step captured."""
    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            loop.step()
    torch.cuda.current_stream(device).wait_stream(side)
    return _capture(loop)


def _run(loop: _StaticLoop, max_new_tokens: int, picked: int, graph, check_every: int) -> int:
    """Steps (graph replays, or eager steps without a graph) until ``max_new_tokens`` tokens are picked or
    every row finished (read on the host every ``check_every`` steps); returns how many tokens count."""
    while picked < max_new_tokens:
        if picked % check_every == 0 and bool(loop.done[picked - 1]):
            break
        graph.replay() if graph is not None else loop.step()
        picked += 1
    done = loop.done[:picked].nonzero()
    return int(done[0, 0]) + 1 if done.numel() else picked


def _after_first_token(loop, max_new_tokens: int, device, *, capture: bool, warmup: int, check_every: int,
                       keep_graph: bool = False):  # fmt: skip
    """The steps after the first token (which ``loop`` has just picked): ``warmup`` eager ones and a capture when
    ``capture``, then replays (or eager steps) to the end. A single call captures only when the graph would replay;
    a caller that keeps the graph for later calls (``keep_graph``) whenever a step remains. Returns ``(tokens that
    count, graph or None)``."""
    picked, graph = 1, None
    if keep_graph:
        warmup = min(warmup, max_new_tokens - 1)
    if capture and (max_new_tokens - 1 > warmup or (keep_graph and max_new_tokens > 1)):
        graph = _warm_up_and_capture(loop, device, warmup)
        picked += warmup
    return _run(loop, max_new_tokens, picked, graph, check_every), graph


def graph_loop(model, dec: _PairDecoder, input_ids, max_new_tokens, lam, fusion, temperature, top_k, top_p,
               randomness, impl, eos_ids, pad_token_id, *, capture: bool | None = None, warmup: int = 2,
               check_every: int = 8) -> torch.Tensor:  # fmt: skip
    """:func:`tcopilot.generate._decode_loop` (same arguments, same tokens) from a prefilled ``static`` decoder:
    its steps captured in a CUDA graph after ``warmup`` eager ones when ``capture`` (default: on CUDA tensors),
    else run eagerly."""
    capture = input_ids.is_cuda if capture is None else capture
    if capture:
        _check_capturable(model, dec, randomness[0])
    loop = _StaticLoop(model, dec, input_ids, max_new_tokens, lam, fusion, temperature, top_k, top_p, randomness,
                       impl, eos_ids, pad_token_id)  # fmt: skip
    loop.choose()
    new, _ = _after_first_token(loop, max_new_tokens, input_ids.device, capture=capture, warmup=warmup,
                                check_every=check_every)  # fmt: skip
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


def _require_model_on_cuda(device: torch.device) -> None:
    # (the CPU tests replace this check to run the static steps eagerly)
    if device.type != "cuda":
        raise ValueError(f"model: a GraphDecoder replays CUDA graphs, expected the model on CUDA, got it on {device}")


class GraphDecoder:
    """Decode many prompt batches with one captured CUDA graph: :func:`tcopilot.generate` with ``cuda_graph=True``
    for repeated calls (evaluation over a dataset, serving).

    ``generate(cuda_graph=True)`` captures a new graph at every call: two eager warm-up steps and a capture,
    which a short generation does not win back. A ``GraphDecoder`` holds static caches for ``batch_size``
    prompts of up to ``prompt_length`` tokens, captures the decode step of the Pilot + Copilot pair at its
    first call, and at every later call writes the new prompts' prefill into the same buffers and replays the
    same graph. Each call returns what :func:`tcopilot.generate` returns for its prompts with the same options:
    prompts shorter than ``prompt_length`` are left-padded inside (a left-padded prompt decodes as itself),
    and a batch smaller than ``batch_size`` is completed with copies of its first row, decoded and dropped.

    The decoding options (``generate``'s names) are fixed at construction: they are constants of the graph.
    Sampling takes a ``seed`` per call (an int; counter-based draws as ``generate(seed=)``, default: one drawn
    from torch's default CPU generator, so ``torch.manual_seed`` makes runs reproducible). ``num_beams > 1``
    (the paper evaluates with 4): beam search as ``generate(num_beams=k)`` (greedy beams, ``length_penalty`` and
    ``early_stopping`` as there; beam sampling raises a ValueError, as in ``generate``): the caches hold
    ``batch_size * num_beams`` rows, the search's bookkeeping lives on the device
    (:class:`tcopilot.beam_search._BeamState`, reset in place at every call) and its step is the graph; the
    beams score in PyTorch whatever ``impl``.

    The graph replays the model as it was at the first call, through the addresses of its parameters: in-place
    updates of the weights (an optimizer step, ``load_state_dict``) are seen (the Copilot's fed-back product
    is recomputed at every call); a call after parameters were replaced (``.to()``, ``.half()``, a module
    swapped) raises a ValueError; switching a LoRA adapter on or off, or merging it, changes which kernels run
    without changing any parameter: build a new ``GraphDecoder`` then.

    Needs what ``generate(cuda_graph=True)`` needs: the model on CUDA, a Pilot family with a static KV cache in
    transformers, the Copilot's attention not ``"torch"``.

    Example:
        >>> dec = GraphDecoder(model, batch_size=64, prompt_length=256, max_new_tokens=48, lam=1.0,
        ...                    eos_token_id=tok.eos_token_id, num_beams=4)
        >>> for ids, mask in batches:
        ...     out = dec.generate(ids, attention_mask=mask)   # [B, L + new], as generate(..., num_beams=4)
    """

    def __init__(self, model, *, batch_size: int, prompt_length: int, max_new_tokens: int | None = None,
                 lam: float = 1.0, fusion: str = "probs", do_sample: bool | None = None,
                 temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                 num_beams: int | None = None, length_penalty: float | None = None,
                 early_stopping: bool | str | None = None, eos_token_id=None, pad_token_id: int | None = None,
                 generation_config=None, impl: str = "auto") -> None:  # fmt: skip
        self.batch_size = check_int("batch_size", batch_size, low=1, what="an int >= 1")
        self.prompt_length = check_int("prompt_length", prompt_length, low=1, what="an int >= 1")
        # generate()'s rules, beam sampling refused included
        o = resolve_generation_options(
            self.prompt_length, generation_config, max_new_tokens=max_new_tokens, do_sample=do_sample,
            temperature=temperature, top_k=top_k, top_p=top_p, num_beams=num_beams, length_penalty=length_penalty,
            early_stopping=early_stopping, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
        )
        self.max_new_tokens, self.num_beams = o["max_new_tokens"], o["num_beams"]
        self.length_penalty, self.early_stopping = o["length_penalty"], o["early_stopping"]
        self.eos_ids, self.pad_token_id = o["eos_token_ids"], o["pad_token_id"]
        _check_token_ids(model, self.eos_ids, self.pad_token_id)
        self.lam = check_finite("lam", lam)
        check_choice("fusion", fusion, FUSIONS)
        check_choice("impl", impl, IMPLS)
        self.fusion, self.impl = fusion, impl
        self.temperature, self.top_k, self.top_p = o["temperature"], o["top_k"], o["top_p"]
        self.sampling = bool(o["do_sample"])
        self.model = model
        self.device = next(model.pilot.parameters()).device
        _require_model_on_cuda(self.device)
        _check_static_cache_family(pilot_backbone(model.pilot))
        self.use_copilot = _uses_copilot(model, self.lam)
        # _loop: the state the captured step runs, a _StaticLoop (num_beams=1) or a static _BeamState
        self._dec = self._loop = self._graph = self._params = None
        self.warmup, self.check_every = 2, 8
        self.capture = self.device.type == "cuda"

    def _fingerprint(self) -> list:
        return [(id(p), p.data_ptr(), p.dtype, tuple(p.shape)) for p in self.model.parameters()]

    def _pad(self, input_ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-pad to ``prompt_length`` and complete the batch with copies of row 0."""
        rows, length = input_ids.shape
        extra = self.prompt_length - length
        if extra:
            input_ids = torch.cat([input_ids.new_full((rows, extra), self.pad_token_id), input_ids], dim=1)
            mask = torch.cat([mask.new_zeros((rows, extra)), mask], dim=1)
        if rows < self.batch_size:
            fill = self.batch_size - rows
            input_ids = torch.cat([input_ids, input_ids[:1].expand(fill, -1)], dim=0)
            mask = torch.cat([mask, mask[:1].expand(fill, -1)], dim=0)
        return input_ids, mask

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 seed: int | None = None) -> torch.Tensor:  # fmt: skip
        """``[B, L + new]`` ids for ``[B, L]`` left-padded prompts (``B <= batch_size``, ``L <= prompt_length``),
        equal to :func:`tcopilot.generate` with this decoder's options (and ``seed``, when sampling)."""
        if not isinstance(input_ids, torch.Tensor):
            raise ValueError(f"input_ids: expected a torch.Tensor [batch, length], got {type(input_ids).__name__}")
        mask = _check_prompts(input_ids, attention_mask)
        rows, length = input_ids.shape
        if rows > self.batch_size or length > self.prompt_length:
            raise ValueError(
                f"input_ids: expected at most [{self.batch_size}, {self.prompt_length}] (batch_size, prompt_length), "
                f"got {list(input_ids.shape)}"
            )
        if input_ids.device != self.device or mask.device != self.device:
            raise ValueError(f"input_ids: expected tensors on the model's device {self.device}, got {input_ids.device}")
        check_token_ids(self.model.pilot, input_ids)
        if seed is not None:
            if not self.sampling:
                how = "decodes greedily" if self.num_beams == 1 else f"searches {self.num_beams} beams"
                raise ValueError(f"seed: this GraphDecoder {how} (no draws), got a seed")
            seed = check_int("seed", seed, what="an int in [-2**63, 2**63)")
        elif self.sampling:
            seed = int(torch.randint(-(2**62), 2**62, ()))
        if self.max_new_tokens == 0:
            return input_ids
        ids, mask = self._pad(input_ids, mask)
        if self.num_beams > 1:  # every prompt row repeated num_beams times, as beam_search prefills
            ids, mask = ids.repeat_interleave(self.num_beams, dim=0), mask.repeat_interleave(self.num_beams, dim=0)
        with pilot_states(self.model.pilot) as states:
            if self._dec is None:
                new = self._first_call(states, ids, mask, seed)
            else:
                if self._fingerprint() != self._params:
                    raise ValueError(
                        "model: its parameters were replaced since this GraphDecoder captured its graph (moved, "
                        "cast or swapped); build a new GraphDecoder"
                    )
                dec, loop = self._dec, self._loop
                dec.states = states
                dec.prefill(ids, mask, self.max_new_tokens, refill=True)
                if self.num_beams > 1:
                    loop.reset()
                    loop.score(0)
                else:
                    loop.reset(ids, seed)
                    loop.choose()
                new = _run(loop, self.max_new_tokens, 1, self._graph, self.check_every)
        if self.num_beams > 1:
            # the real rows' best hypotheses after their own prompts, cut to their longest (a new tensor)
            return self._loop.result(input_ids, new - 1)
        return self._cut(self._loop.out, rows, length, new)

    def _first_call(self, states, ids, mask, seed) -> int:
        dec = _PairDecoder(self.model, states, self.use_copilot, static=True)
        dec.prefill(ids, mask, self.max_new_tokens)
        if self.capture:
            _check_capturable(self.model, dec, None)
        if self.num_beams > 1:
            loop = _BeamState(dec, self.batch_size, self.num_beams, self.max_new_tokens, self.eos_ids,
                              self.pad_token_id, self.lam, self.fusion,
                              self.length_penalty, self.early_stopping, static=True)  # fmt: skip
            loop.score(0)
        else:
            loop = _StaticLoop(self.model, dec, ids, self.max_new_tokens, self.lam, self.fusion, self.temperature,
                               self.top_k, self.top_p, (None, seed), self.impl, self.eos_ids, self.pad_token_id)
            loop.choose()
        new, graph = _after_first_token(loop, self.max_new_tokens, self.device, capture=self.capture,
                                        warmup=self.warmup, check_every=self.check_every, keep_graph=True)
        self._dec, self._loop, self._graph, self._params = dec, loop, graph, self._fingerprint()
        return new

    def _cut(self, out: torch.Tensor, rows: int, in_length: int, new: int) -> torch.Tensor:
        """The real rows, without the inner left padding, cut where :func:`generate` stops for them."""
        length = self.prompt_length
        if rows < self.batch_size and self.eos_ids:
            # The copies of row 0 may finish later (sampling draws per row): stop where the real rows do.
            gen = out[:rows, length : length + new]
            is_eos = (gen[..., None] == torch.tensor(self.eos_ids, device=gen.device)).any(-1)
            if bool(is_eos.any(1).all()):
                new = int(is_eos.int().argmax(1).max()) + 1
        # a copy: the buffer is the next call's (a view would change under the caller's feet)
        return out[:rows, length - in_length : length + new].clone()


__all__ = ["GraphDecoder", "graph_decode", "graph_loop"]
