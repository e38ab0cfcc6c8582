"""Rectified decoding (paper, Algorithm 2) with KV caches for the Pilot and the Copilot.

Per step: the Pilot decodes one token with its cache, hooks give the new position's ``X~`` and pooled
state, the Copilot decodes one position with its own caches (self-attention over its stream, attention
over the growing log), ``f = error_out(g)`` rectifies the Pilot's distribution and the next token is
picked. The Copilot's next input is its own output fed back: ``error_in(f) = g @ M + m`` with the c x c
matrix ``M`` computed once per call.

Picking the token (``num_beams=1``) takes one of two paths:

* the fused decode head, :func:`tcopilot.rectified_decode_head` on the Pilot's last hidden state ``h``,
  ``lm_head``'s weight and bias (if any), the Copilot's ``g`` and ``error_out``'s weight and bias (its PyTorch
  path holds no ``[B, V]`` tensor for greedy decoding; its Triton path writes ``z`` and ``f`` to a ``[B, V]`` fp32
  scratch in one pass over both weights and picks the token from it with the Triton sampler; either way sampling
  draws as below). Taken when the Copilot is used (``lam != 0``), the LM head is a plain ``nn.Linear``, with or
  without a bias, without hooks and with its weight on ``h``'s device (so ``_pilot_logits(h)`` is
  ``(s h) @ W^T + s c`` with the Pilot's output-logit scale ``s`` and the head's bias ``c``: the scale goes into
  ``h`` and ``c`` as in training, :func:`tcopilot.pilot.lm_head_operands`; then soft-capped when the Pilot's
  config sets ``final_logit_softcapping``, which the head does too), ``error_out`` is a plain ``nn.Linear``, and
  ``impl`` is ``"torch"`` / ``"triton"``, or ``"auto"`` with CUDA tensors;
* otherwise the materialised path: ``z = _pilot_logits(h)`` and ``f = error_out(g)`` as ``[B, V]`` tensors,
  then :func:`tcopilot.rectified_next_token`. This is what ``impl="auto"`` runs on the CPU (the simplest
  path there), what a Pilot alone or ``lam=0`` runs, and the fallback for any other LM head (a PEFT
  adapter on it, a quantised or hooked module). PEFT's ``modules_to_save`` wrapper (``lm_head`` trained in
  full beside LoRA) counts as the plain copy its forward runs.

Both compute the same tokens up to floating-point rounding (the head forms both products in fp32 from
fp32-cast inputs, the materialised path in the weights' dtype). Beam search always materialises: it needs
the full log-probabilities (:mod:`tcopilot.beam_search`).

Prompt positions are treated as uncounted (their errors are not known to the model at inference), so
the Copilot reads "no error" (the bias of ``error_in``) there, exactly as in training where the loss
covers response tokens only.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from tcopilot._validation import FLOAT32_TINY, FLOAT_DTYPES, IMPLS, check_bool, check_choice, check_finite, check_int
from tcopilot.kernels.rectified_decode_head import rectified_decode_head
from tcopilot.kernels.rectified_next_token import rectified_next_token
from tcopilot.kernels.rectified_next_token.api import FUSIONS, check_seed
from tcopilot.pilot import (
    check_token_ids,
    lm_head_operands,
    pilot_backbone,
    pilot_states,
    positions_from_mask,
    run_base,
)


def _pilot_logits(model, hidden_last: torch.Tensor) -> torch.Tensor:
    """The Pilot's next-token logits ``[rows, V]`` fp32, as its ``*ForCausalLM`` forms them: its LM head, times the
    family's output scale if any (Cohere, Granite, ...: :func:`tcopilot.pilot.pilot_logit_scale`), then Gemma-2
    soft-capping if configured. The scale multiplies the head's output, which is exact whatever the head is (a bias,
    a PEFT wrapper); the ``[rows, V]`` tensor exists here anyway."""
    w = model.pilot.get_output_embeddings()
    z = w(hidden_last).float()
    scale = model.logit_scale
    if scale is not None:
        z = z * scale
    cap = model.softcap
    if cap:
        z = cap * torch.tanh(z / cap)
    return z


def _plain_linear(module, device: torch.device) -> bool:
    """True when ``module(x)`` is exactly ``x @ weight^T (+ bias)`` with a readable weight (and bias) on ``device``.

    Exactly ``nn.Linear`` (not a subclass: PEFT adapter layers and ``modules_to_save`` wrappers, quantised
    linears), no forward (pre-)hooks and no accelerate hook (offloading, device maps), a floating-point
    weight and bias (if any) that are ordinary tensors (not FSDP ``DTensor`` shards) on ``device``.
    """
    if type(module) is not nn.Linear or module._forward_hooks or module._forward_pre_hooks:
        return False
    if getattr(module, "_hf_hook", None) is not None:
        return False
    params = (module.weight,) if module.bias is None else (module.weight, module.bias)
    return all(type(p) in (torch.Tensor, nn.Parameter) and p.dtype in FLOAT_DTYPES and p.device == device
               for p in params)


def _active_module(module):
    """The module that ``module(x)`` runs: itself, or for PEFT's ``modules_to_save`` wrapper (``lm_head`` trained
    in full beside LoRA adapters) the inner copy its forward dispatches to (the adapter's copy, or the original
    module while adapters are disabled or inactive). None when that cannot be told (hooks on the wrapper itself,
    several active adapters): the caller then calls the module as it is."""
    if type(module).__name__ != "ModulesToSaveWrapper" or not hasattr(module, "modules_to_save"):
        return module
    if module._forward_hooks or module._forward_pre_hooks or getattr(module, "_hf_hook", None) is not None:
        return None
    active = list(module.active_adapters)
    if module.disable_adapters or not active or any(a not in module.modules_to_save for a in active):
        return module.original_module  # the wrapper's pass-through
    return module.modules_to_save[active[0]] if len(active) == 1 else None


def _decode_head_weights(model, dec, impl: str):
    """``(lm_head, error_out_weight, error_out_bias)`` (``lm_head`` the ``nn.Linear`` the Pilot's head runs) when
    the fused decode head should pick the tokens of this call (see the module docstring for the rule), else None
    (materialised path)."""
    if not dec.use_copilot:
        return None
    device = dec.h.device
    if impl == "auto" and device.type != "cuda":
        return None
    head, out = _active_module(model.pilot.get_output_embeddings()), dec.copilot.error_out
    if head is None or not _plain_linear(head, device) or not _plain_linear(out, device):
        return None
    return head, out.weight, out.bias


# GenerationConfig fields honoured by :func:`generate` (the rest of a config must be unset or neutral).
GENERATION_FIELDS = ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "num_beams",
                     "length_penalty", "early_stopping", "eos_token_id", "pad_token_id")
# Fields that change which tokens come out; a config setting one of them to a non-neutral value is refused
# rather than silently ignored. Everything else (bos_token_id, use_cache, output_* flags, ...) is ignored.
_UNSUPPORTED_NEUTRAL = {
    "num_return_sequences": (1,), "repetition_penalty": (1.0,), "encoder_repetition_penalty": (1.0,),
    "no_repeat_ngram_size": (0,), "min_length": (0,), "min_new_tokens": (0,), "typical_p": (1.0,),
    "min_p": (), "epsilon_cutoff": (0.0,), "eta_cutoff": (0.0,), "top_h": (), "penalty_alpha": (),
    "num_beam_groups": (1,), "diversity_penalty": (0.0,), "bad_words_ids": (), "force_words_ids": (),
    "suppress_tokens": (), "begin_suppress_tokens": (), "forced_bos_token_id": (), "forced_eos_token_id": (),
    "sequence_bias": (), "guidance_scale": (1.0,), "renormalize_logits": (False,), "stop_strings": (),
    "exponential_decay_length_penalty": (), "max_time": (), "watermarking_config": (),
    "prompt_lookup_num_tokens": (), "assistant_early_exit": (), "dola_layers": (),
    "return_dict_in_generate": (False,),
}


def resolve_generation_options(input_length: int, generation_config=None, **kwargs) -> dict:
    """Merge ``GenerationConfig``-named options: keywords (when not None) > ``generation_config`` > defaults.

    Returns a dict with ``max_new_tokens``, ``do_sample`` (bool), ``temperature`` (0.0 when greedy),
    ``top_k``, ``top_p``, ``num_beams``, ``length_penalty`` (default 1.0), ``early_stopping`` (True, False or
    ``"never"``; default False, as ``GenerationConfig``), ``eos_token_ids`` (a list, maybe empty) and
    ``pad_token_id``. Raises ValueError, naming the option, for a value of the wrong type (checked before any
    conversion: ints are ``numbers.Integral`` and numbers ``numbers.Real``, Python or numpy, never bools; flags
    are bools), out of range (negative ids, ``length_penalty`` that beam search cannot hold, see
    :func:`generate`), beam sampling (``num_beams > 1`` with ``do_sample``), a non-positive temperature with
    sampling, and config fields that would change the output but are not implemented here. Token ids are
    checked against the vocabulary by :func:`generate`, which knows the model.
    """
    opts: dict = {}
    if generation_config is not None:
        if not hasattr(generation_config, "to_diff_dict"):
            raise ValueError(
                f"generation_config: expected a transformers.GenerationConfig, got {type(generation_config).__name__}"
            )
        for name, neutral in _UNSUPPORTED_NEUTRAL.items():
            value = getattr(generation_config, name, None)
            if value is not None and value not in neutral:
                raise ValueError(
                    f"generation_config: {name}={value!r} is not supported by tcopilot.generate (it honours "
                    f"{', '.join(GENERATION_FIELDS)}); unset it or use a neutral value"
                )
        for name in GENERATION_FIELDS:
            value = getattr(generation_config, name, None)
            if value is not None:
                opts[name] = value
        if "max_new_tokens" not in opts and getattr(generation_config, "max_length", None) is not None:
            max_length = check_int("max_length", generation_config.max_length, low=0, what="an int >= 0")
            opts["max_new_tokens"] = max(0, max_length - input_length)
    unknown = set(kwargs) - set(GENERATION_FIELDS)
    if unknown:
        raise TypeError(f"generate() got unexpected keyword arguments {sorted(unknown)}")
    opts.update({k: v for k, v in kwargs.items() if v is not None})

    # Types are checked before any conversion (int(2.7) is 2, bool("no") is True, float(True) is 1.0): integers are
    # numbers.Integral but not bools (numpy ints too), numbers are numbers.Real but not bools (numpy floats too).
    max_new_tokens = check_int("max_new_tokens", opts.get("max_new_tokens", 32), low=0, what="an int >= 0")
    temperature = opts.get("temperature")
    if temperature is not None:
        temperature = check_finite("temperature", temperature)
    do_sample = opts.get("do_sample")
    if do_sample is None:  # the pre-GenerationConfig convention: temperature > 0 samples, 0 is greedy
        do_sample = temperature is not None and temperature > 0
    do_sample = check_bool("do_sample", do_sample, "True, False or None")
    num_beams = check_int("num_beams", opts.get("num_beams", 1), low=1, what="an int >= 1")
    if num_beams > 1 and do_sample:
        raise ValueError(
            f"num_beams: beam sampling (num_beams > 1 with do_sample=True) is not implemented, got "
            f"num_beams={num_beams!r}; use do_sample=False (beam search) or num_beams=1 (sampling)"
        )
    length_penalty = check_finite("length_penalty", opts.get("length_penalty", 1.0))
    if num_beams > 1 and max_new_tokens > 1 and abs(length_penalty) * math.log(max_new_tokens) > _LOG_FP32_NORMAL:
        # Beam search divides fp32 scores by the Python float n ** length_penalty for n = 1 .. max_new_tokens
        # (exactly HF's formula, so lam=0 keeps matching pilot.generate): that divisor must be a normal fp32 number
        # (past the range n ** p overflows, OverflowError in Python, or rounds to inf / 0 in fp32, which turns every
        # finished score into 0 or -inf). |p| * log(max_new_tokens) <= log(1 / fp32 tiny) ~ 87.3 keeps it so.
        limit = _LOG_FP32_NORMAL / math.log(max_new_tokens)
        raise ValueError(
            f"length_penalty: expected a finite number with |length_penalty| <= {limit:.4g} for "
            f"max_new_tokens={max_new_tokens} (max_new_tokens ** |length_penalty| must stay within the float32 "
            f"range of the beam scores), got {length_penalty!r}"
        )
    early_stopping = opts.get("early_stopping", False)
    if not (isinstance(early_stopping, str) and early_stopping == "never"):
        early_stopping = check_bool("early_stopping", early_stopping, "True, False or 'never'")
    if do_sample:
        temperature = 1.0 if temperature is None else temperature
        if temperature <= 0:
            raise ValueError(
                f"temperature: expected a number > 0 with do_sample=True, got {temperature!r}; "
                "use do_sample=False for greedy decoding"
            )
    else:
        temperature = 0.0  # greedy whatever the temperature (GenerationConfig semantics)
    top_k = check_int("top_k", opts.get("top_k", 0), low=0, what="an int >= 0 (0 = off)")
    top_p = check_finite("top_p", opts.get("top_p", 1.0))  # its range (0, 1] is the sampler's check
    eos = opts.get("eos_token_id")
    eos_list = eos if isinstance(eos, (list, tuple)) else ([] if eos is None else [eos])
    eos_ids = [check_int("eos_token_id", e, low=0, what="an int id >= 0 or a list of them") for e in eos_list]
    pad = opts.get("pad_token_id")
    pad = (eos_ids[0] if eos_ids else 0) if pad is None else check_int("pad_token_id", pad, low=0,
                                                                        what="an int id >= 0")
    return dict(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=float(temperature),
                top_k=top_k, top_p=top_p, num_beams=num_beams, length_penalty=length_penalty,
                early_stopping=early_stopping, eos_token_ids=eos_ids, pad_token_id=pad)


# log(1 / smallest normal fp32) ~ 87.34: the bound on |length_penalty| * log(max_new_tokens) (beam search).
_LOG_FP32_NORMAL = -math.log(FLOAT32_TINY)


def _vocab_size(model) -> int | None:
    """Rows of the Pilot's LM head (the ids it can emit), else its config's ``vocab_size``; None if unknown."""
    head = model.pilot.get_output_embeddings()
    weight = getattr(head, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.shape[0] > 0:
        return int(weight.shape[0])
    vocab = getattr(getattr(model.pilot, "config", None), "vocab_size", None)
    return vocab if isinstance(vocab, int) and vocab > 0 else None


def _check_token_ids(model, eos_ids: list[int], pad_token_id: int) -> None:
    """EOS and pad ids must be ids of the Pilot's vocabulary: a pad id is fed back into its embedding once a row
    has finished (an IndexError deep inside torch otherwise), an EOS id outside it could never be emitted."""
    vocab = _vocab_size(model)
    if vocab is None:
        return
    for e in eos_ids:
        if e >= vocab:
            raise ValueError(f"eos_token_id: expected ids in [0, {vocab}) (the Pilot's vocabulary), got {e}")
    if pad_token_id >= vocab:
        raise ValueError(
            f"pad_token_id: expected an id in [0, {vocab}) (the Pilot's vocabulary), got {pad_token_id}"
        )


# Families whose Hugging Face ``generate`` passes no attention mask after the prompt (their
# ``prepare_inputs_for_generation``, transformers 5.24): these state-space models use the mask only to zero the
# states of padded positions, a decode step's new token is never padding, and a [B, L + t] mask would be broadcast
# against its one position.
_DECODE_WITHOUT_MASK = ("mamba", "falcon_mamba", "mamba2")


class _PairDecoder:
    """Decoding state of the Pilot + Copilot pair (Algorithm 2), one row per sequence (or per beam).

    Holds the Pilot's KV cache, the Copilot's caches, the attention mask, the current position, the Pilot's
    last final hidden state ``h`` (its logits ``z = _pilot_logits(h)`` are computed on first access of
    ``z`` only, so the fused decode head never materialises them) and the Copilot's last final hidden state
    ``g`` (whose ``error_in(error_out(g)) = g @ M + m`` is the Copilot's next input). Must be used inside
    ``pilot_states(model.pilot)`` (``states``).

    ``static=True`` (:mod:`tcopilot.graph_decode`): fixed-size caches (a ``transformers.StaticCache`` for the
    Pilot, ``Copilot.new_cache(static=True)``), the attention mask allocated at its final length by
    :meth:`prefill`, and :meth:`advance` updating the state it reads at the next step (positions, ``h``, ``g``)
    in place: a step has the same shapes and addresses every time, so it can be captured in a CUDA graph.
    """

    def __init__(self, model, states, use_copilot: bool, static: bool = False):
        self.model, self.states, self.use_copilot, self.static = model, states, use_copilot, static
        self.base = pilot_backbone(model.pilot)
        self.copilot = model.copilot if use_copilot else None
        self.h, self._z = None, None
        self.mask_on_decode = getattr(model.pilot.config, "model_type", None) not in _DECODE_WITHOUT_MASK

    @property
    def z(self) -> torch.Tensor:
        """The Pilot's next-token logits ``[rows, V]`` fp32 (``_pilot_logits`` of ``h``), computed once per step."""
        if self._z is None:
            self._z = _pilot_logits(self.model, self.h)
        return self._z

    def prefill(self, input_ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int = 0, *,
                refill: bool = False) -> None:  # fmt: skip
        """Run the prompt through both models. ``max_new_tokens`` sizes the Copilot's caches up front (and
        every cache and the mask, ``static``). ``refill`` (``static``, after a first prefill of the same
        shapes): write the new prompts' state into the existing buffers, so that a step captured in a CUDA
        graph reads them at its next replay (:class:`tcopilot.graph_decode.GraphDecoder`)."""
        total = input_ids.shape[1] + max_new_tokens
        pos = positions_from_mask(mask)
        self.states.reset()
        cache = None
        if self.static:
            # The new tokens' mask entries are 1 from the start: the Pilot's causal mask hides the slots
            # not yet written (key index past the query's), as HF's own static-cache decoding relies on.
            full_mask = torch.cat([mask, mask.new_ones(mask.shape[0], max_new_tokens)], dim=1)
            if refill:
                self.mask.copy_(full_mask)
                cache = self.cache
                cache.reset()  # zeroes keys, values and the fill counts in place
            else:
                self.mask = full_mask
                cache = static_pilot_cache(self.base, total)
        else:
            self.mask = mask.clone()
        hidden, self.cache = run_base(self.base, input_ids, self.mask, pos.clamp(min=0), cache=cache,
                                      use_cache=True)  # fmt: skip
        self._z = None
        if refill:
            self.h.copy_(hidden[:, -1])
            self.cur_pos.copy_(pos[:, -1].clamp(min=-1))
        else:
            self.h = hidden[:, -1].clone() if self.static else hidden[:, -1]
            self.cur_pos = pos[:, -1].clamp(min=-1)
        if self.use_copilot:
            cop, states = self.copilot, self.states
            m_mat, m_vec = cop.feedback_matrices()  # from the current weights (they may have been trained since)
            if refill:
                self.ccache.reset()
                self.m_mat.copy_(m_mat)
                self.m_vec.copy_(m_vec)
            else:
                self.ccache = cop.new_cache(max_positions=total, static=self.static)
                self.m_mat, self.m_vec = m_mat, m_vec
            self.wdtype = cop.error_in.weight.dtype
            stream = cop.error_in.bias.to(self.wdtype).expand(input_ids.shape[0], input_ids.shape[1], -1)
            log = torch.cat([states.x_tilde, states.pooled.to(states.x_tilde.dtype)], dim=1)
            # int32 positions (< prompt + new tokens, far below 2**31): the attention compares int32, and
            # int64 ones cost a rebase of every layer's whole cache positions at every step.
            pos = pos.to(torch.int32)
            g = cop(stream, log, pos, torch.cat([pos, pos], 1), cache=self.ccache)[:, -1]
            if refill:
                self.g.copy_(g)
            else:
                self.g = g.clone()

    def copilot_out(self) -> torch.Tensor | None:
        """``f = error_out(g)`` [rows, V] fp32 for the next token, or None without the Copilot."""
        return self.copilot.error_out(self.g).float() if self.use_copilot else None

    def advance(self, tokens: torch.Tensor) -> None:
        """Feed one new token per row; updates ``h`` (hence ``z``) and ``g`` (``static``: in place)."""
        if self.static:
            self.cur_pos += 1  # a captured step must advance the state the next replay reads
        else:
            self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
            self.cur_pos = self.cur_pos + 1
        new_pos = self.cur_pos[:, None]
        states = self.states
        states.reset()
        hidden, self.cache = run_base(self.base, tokens[:, None], self.mask if self.mask_on_decode else None,
                                      new_pos.clamp(min=0), cache=self.cache, use_cache=True)
        self._z = None
        if self.static:
            self.h.copy_(hidden[:, -1])
        else:
            self.h = hidden[:, -1]
        if self.use_copilot:
            fed = (self.g.float() @ self.m_mat + self.m_vec).to(self.wdtype)[:, None]  # error_in(f_prev)
            log = torch.cat([states.x_tilde, states.pooled.to(states.x_tilde.dtype)], dim=1)
            new_pos = new_pos.to(torch.int32)
            g = self.copilot(fed, log, new_pos, torch.cat([new_pos, new_pos], 1), cache=self.ccache)[:, -1]
            if self.static:
                self.g.copy_(g)
            else:
                self.g = g

    def fork(self, use_copilot: bool) -> _PairDecoder:
        """An independent decoder from this prefilled state (its own copies of the caches), with or without the
        Copilot: several decodings of one prompt batch share one prefill (:func:`generate_settings`)."""
        if use_copilot and not self.use_copilot:
            raise ValueError("use_copilot: this decoder was prefilled without the Copilot, so a fork cannot use it")
        new = copy.copy(self)  # advance() replaces these tensors (static: writes them in place); caches are mutated
        new.cache = copy.deepcopy(self.cache)
        new.use_copilot = use_copilot
        if self.static:
            new.cur_pos, new.h = self.cur_pos.clone(), self.h.clone()
        if use_copilot:
            new.ccache = copy.deepcopy(self.ccache)
            if self.static:
                new.g = self.g.clone()
        else:
            new.copilot = None
        return new

    def reorder(self, index: torch.Tensor) -> None:
        """Select rows (beam search): every cache, the mask, the positions and the fed-back ``g`` (``static``: in
        place, so that a captured step reads the reordered state). The logits are dropped, not reordered: they
        derive from ``h`` and are recomputed when next asked for (the search feeds new tokens first, which
        recomputes them anyway; in a captured step a reordered copy would be a buffer from outside the graph)."""
        self._z = None
        if self.static:
            reorder_static_pilot_cache(self.cache, index)
            for t in (self.mask, self.cur_pos, self.h):
                t.copy_(t.index_select(0, index))
            if self.use_copilot:
                self.ccache.reorder(index)
                self.g.copy_(self.g.index_select(0, index))
            return
        self.cache = reorder_pilot_cache(self.cache, index)
        self.mask, self.cur_pos, self.h = self.mask[index], self.cur_pos[index], self.h[index]
        if self.use_copilot:
            self.ccache.reorder(index)
            self.g = self.g[index]


def static_pilot_cache(base: nn.Module, max_len: int):
    """A ``transformers.StaticCache`` of ``max_len`` positions for the Pilot's backbone ``base``.

    Raises a ValueError for a family whose transformers class does not declare static-cache decoding
    (``_can_compile_fullgraph``: Mamba and FalconH1, whose recurrent states have no static cache layer).
    """
    from transformers import StaticCache

    _check_static_cache_family(base)
    return StaticCache(config=base.config, max_cache_len=max_len)


def _check_static_cache_family(base: nn.Module) -> None:
    """ValueError unless the Pilot's backbone ``base`` has a static KV cache in transformers."""
    if not getattr(base, "_can_compile_fullgraph", False):
        family = getattr(base.config, "model_type", type(base).__name__)
        raise ValueError(
            f"cuda_graph: the Pilot's family ({family}) has no static KV cache in transformers "
            f"({type(base).__name__}._can_compile_fullgraph is False), so its decode step cannot be captured; "
            "decode without cuda_graph"
        )


def reorder_pilot_cache(cache, index: torch.Tensor):
    """Select batch rows of a Hugging Face KV cache; returns the (maybe new) cache.

    ``Cache.reorder_cache`` (transformers 4.x and 5.x, in place) when present, else ``batch_select_indices``,
    else a legacy tuple of ``(key, value)`` per layer is index-selected.
    """
    if cache is None:
        return None
    if hasattr(cache, "reorder_cache"):
        cache.reorder_cache(index)
        return cache
    if hasattr(cache, "batch_select_indices"):
        cache.batch_select_indices(index)
        return cache
    if isinstance(cache, (tuple, list)):
        return type(cache)(tuple(t.index_select(0, index.to(t.device)) for t in layer) for layer in cache)
    raise ValueError(f"pilot: cannot reorder its KV cache of type {type(cache).__name__} for beam search")


def reorder_static_pilot_cache(cache, index: torch.Tensor) -> None:
    """Select batch rows of a ``transformers.StaticCache`` in place (its buffers keep their addresses).

    ``Cache.reorder_cache`` rebinds each layer to new tensors (and reads the filled length on the host first);
    here every per-row tensor of a layer (first dimension = the row count: keys, values, and the recurrent states
    of hybrid layers) is overwritten with its selected rows instead. Shared state (the fill count) is left as is.
    """
    rows = index.shape[0]
    for layer in cache.layers:
        for value in vars(layer).values():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == rows:
                value.copy_(value.index_select(0, index))


def _check_prompts(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The attention mask of a non-empty ``[B, L]`` prompt batch (all ones when None); ValueError otherwise."""
    if input_ids.dim() != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids: expected a non-empty [batch, length] tensor, got {tuple(input_ids.shape)}")
    if attention_mask is None:
        return torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask: expected shape {tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}")
    # Decoding appends after the last position of every row, so a row must end with its prompt: a 0 after a 1
    # (right padding) would continue from a padding position. One host synchronisation per call.
    real = attention_mask != 0
    after = ~real & (real.cumsum(dim=1) > 0)
    if bool(after.any()):
        row = int(after.any(dim=1).nonzero()[0, 0])
        raise ValueError(
            f"attention_mask: expected left-padded prompts (all 0s before the first 1 of a row), got a 0 after a 1 "
            f"in row {row}; pad prompts on the left (tokenizer.padding_side = 'left')"
        )
    return attention_mask


def _uses_copilot(model, lam: float) -> bool:
    """Whether decoding with ``lam`` runs the Copilot at all (``lam=0`` gives the Pilot's own tokens)."""
    return model.copilot is not None and lam != 0.0


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int | None = None,
    lam: float = 1.0,
    fusion: str = "probs",
    do_sample: bool | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    num_beams: int | None = None,
    length_penalty: float | None = None,
    early_stopping: bool | str | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    generation_config=None,
    generator: torch.Generator | None = None,
    seed: int | torch.Tensor | None = None,
    impl: str = "auto",
    cuda_graph: bool = False,
) -> torch.Tensor:
    """Generate with the Pilot rectified by the Copilot; returns ``[B, L + new]`` token ids.

    The decoding options are named like ``transformers.GenerationConfig`` and may come from one
    (``generation_config=GenerationConfig(...)``, e.g. ``pilot.generation_config``); a keyword that is not
    None overrides the config, as in ``PreTrainedModel.generate``.

    Why not ``pilot.generate(..., logits_processor=[...])``: a ``LogitsProcessor`` is called with the
    input ids and the Pilot's next-token scores only. The Copilot needs the Pilot's hidden states of every
    new position (``X~`` and the mean of the decoder layers' outputs: the Mistake Log) and keeps its own
    key/value caches across steps (self-attention over its error stream, attention over the growing log),
    which would have to be rebuilt from scratch at every step without them; and the rectified distribution
    is ``softmax(z) + lam * f`` in probability space, not a function of the scores alone. So the decoding
    loop lives here, with both caches (Algorithm 2), and takes ``GenerationConfig``'s names instead.

    Args:
        model: a :class:`tcopilot.TransformerCopilot` (its ``copilot`` may be None: Pilot alone). The Pilot may
            be a ``peft`` LoRA model.
        input_ids / attention_mask: ``[B, L]`` prompts, left-padded when lengths differ (a right-padded mask
            raises a ValueError: decoding continues after each row's last position).
        max_new_tokens: how many tokens to add at most (default 32; all rows stop early once every row hit
            EOS). From a config without ``max_new_tokens``, ``max_length - L``.
        lam: the Copilot's weight lambda; ``lam=0`` gives exactly the Pilot's own tokens (the Copilot
            is then not run at all).
        fusion: ``"probs"`` (paper Eq. 8, ``softmax(z) + lam*f``) or ``"logits"`` (``z + lam*f``).
        do_sample: False = greedy (whatever ``temperature`` says); True = sample with ``temperature``
            (default 1.0, must be > 0), ``top_k`` (default 0 = off) and ``top_p`` (default 1.0 = off).
            None (not given anywhere) keeps the older convention: sample iff ``temperature > 0``.
        num_beams: 1 (greedy or sampling), or > 1 for beam search with greedy beams
            (:func:`tcopilot.beam_search.beam_search`: scores are sums of ``log p~``, the Pilot's and the
            Copilot's caches follow the beams; with ``lam=0`` the tokens equal
            ``pilot.generate(num_beams=..., do_sample=False)``). Beam sampling (with ``do_sample=True``)
            raises a ValueError. Beam search returns the best finished hypothesis per row, padded with
            ``pad_token_id`` to the longest one.
        length_penalty / early_stopping: beam search only, ``GenerationConfig`` semantics: a finished
            hypothesis scores ``sum log p~ / new_tokens ** length_penalty`` (default 1.0);
            ``early_stopping`` True (a row stops once it holds ``num_beams`` finished hypotheses), False
            (default: stops when the best live beam, normalised at its current length, cannot beat the
            worst kept hypothesis) or ``"never"``.
        eos_token_id / pad_token_id: an id or a list of ids; rows that emitted EOS are padded with
            ``pad_token_id`` afterwards (default: the first EOS id, else 0).
        generation_config: a ``transformers.GenerationConfig``; fields other than the ones above that
            would change the output (``repetition_penalty``, ``num_return_sequences``, ``min_new_tokens``,
            ...) raise a ValueError instead of being ignored.
        generator: ``torch.Generator`` for sampling (reproducible draws).
        seed: instead of ``generator``, counter-based sampling (``rectified_next_token(seed=)``'s Philox
            numbers): an int (or the same as a 0-d integer tensor), or a ``[B]`` integer tensor with one seed per
            prompt, so that a prompt's draws depend on its own seed only, not on its batch or row. Step ``t`` uses
            the key ``seed + (t + 1) * 0x9E3779B97F4A7C15`` (mod 2**64), a new stream per step. The same seed
            gives the same tokens on the torch and Triton paths up to float rounding ties. Unused by greedy
            decoding and beam search.
        impl: how the next token is picked (``num_beams=1``; beam search scores in PyTorch whatever ``impl``).
            ``"auto"``: the fused :func:`tcopilot.rectified_decode_head` (Triton) on CUDA tensors, the
            materialised ``z``, ``f`` and :func:`tcopilot.rectified_next_token` on the CPU. ``"torch"`` /
            ``"triton"``: the fused head with that implementation. Either way a Pilot alone, ``lam=0`` or an
            LM head that is not a plain ``nn.Linear`` (a bias is fine; one carrying a PEFT adapter is not; PEFT's
            ``modules_to_save`` wrapper counts as the copy it runs) takes the materialised path, with
            ``rectified_next_token(impl=impl)``; see the module docstring.
        cuda_graph: decode with static caches and replay each step as one CUDA graph
            (:mod:`tcopilot.graph_decode`): the same tokens, without the per-step launch cost of the Pilot's
            and the Copilot's kernels, which dominates small-batch decoding. Needs CUDA tensors, a Pilot family
            with a static KV cache in transformers (``_can_compile_fullgraph``: Llama, Qwen2, Mistral, Gemma,
            ...) and a ``seed`` or the default generator for sampling (a user ``generator`` needs
            ``CUDAGraph.register_generator_state``). Beam search is captured too (its bookkeeping on the device,
            the caches reordered in place; :func:`tcopilot.beam_search.beam_search` with ``static=True``). Each
            call captures its own graph (a few eager warm-up steps first), so it pays off from a few dozen new
            tokens on; :class:`tcopilot.GraphDecoder` keeps one graph for many calls (greedy, sampling or beams).
            Both caches hold ``L + max_new_tokens`` positions from the start, and the Pilot's attention reads all
            of them at every step (HF's static cache), so a ``max_new_tokens`` far beyond what is generated costs
            bandwidth.

    Raises:
        ValueError: naming the option, for bad shapes (``input_ids``, ``attention_mask``), ``input_ids`` that are
            not integer ids of the Pilot's embedding, an ``attention_mask`` that is not left-padded (a 0 after
            a 1 in a row), a non-finite ``lam``, an unknown ``fusion`` or
            ``impl``, bad decoding options, checked before any conversion: ``max_new_tokens``, ``num_beams``,
            ``top_k`` not ints (Python or numpy, not bools) in range; ``temperature``, ``top_p``,
            ``length_penalty`` not finite numbers (nor bools); ``do_sample`` / ``early_stopping`` not bools
            (``early_stopping`` also ``"never"``); ``eos_token_id`` / ``pad_token_id`` not ints (or a list of
            ints) in ``[0, V)`` for the Pilot's vocabulary size ``V`` (its LM head's rows); with ``num_beams > 1``
            a ``length_penalty`` with ``max_new_tokens ** |length_penalty|`` past the float32 range (about
            ``|length_penalty| * ln(max_new_tokens) > 87.3``); beam sampling; ``seed``; ``cuda_graph`` not a bool,
            or True with CPU tensors, a Pilot family without a static cache or the Copilot's
            ``attention_impl="torch"``; and
            ``generation_config`` fields that would change the output but are not implemented.
        TypeError: an unknown keyword (as ``PreTrainedModel.generate`` would).
    """
    attention_mask = _check_prompts(input_ids, attention_mask)
    o = resolve_generation_options(
        input_ids.shape[1], generation_config, max_new_tokens=max_new_tokens, do_sample=do_sample,
        temperature=temperature, top_k=top_k, top_p=top_p, num_beams=num_beams, length_penalty=length_penalty,
        early_stopping=early_stopping, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
    )
    max_new_tokens, temperature, top_k, top_p = o["max_new_tokens"], o["temperature"], o["top_k"], o["top_p"]
    eos_ids, pad_token_id = o["eos_token_ids"], o["pad_token_id"]
    _check_token_ids(model, eos_ids, pad_token_id)
    check_token_ids(model.pilot, input_ids)
    check_finite("lam", lam)
    check_choice("fusion", fusion, FUSIONS)
    check_choice("impl", impl, IMPLS)
    check_seed(seed, generator, input_ids.shape[0], input_ids.device)
    cuda_graph = _check_cuda_graph(cuda_graph, input_ids.device)

    use_copilot = _uses_copilot(model, lam)
    if max_new_tokens == 0:
        return input_ids
    if o["num_beams"] > 1:
        from tcopilot.beam_search import beam_search

        return beam_search(
            model, input_ids, attention_mask, num_beams=o["num_beams"], max_new_tokens=max_new_tokens,
            lam=lam if use_copilot else 0.0, fusion=fusion, eos_token_ids=eos_ids, pad_token_id=pad_token_id,
            length_penalty=o["length_penalty"], early_stopping=o["early_stopping"], static=cuda_graph,
        )
    loop = _loop(cuda_graph)
    with pilot_states(model.pilot) as states:
        dec = _PairDecoder(model, states, use_copilot, static=cuda_graph)
        dec.prefill(input_ids, attention_mask, max_new_tokens)
        return loop(model, dec, input_ids, max_new_tokens, lam, fusion, temperature, top_k, top_p,
                    (generator, seed), impl, eos_ids, pad_token_id)


def _require_cuda(device: torch.device) -> None:
    if device.type != "cuda":
        raise ValueError(f"cuda_graph: expected CUDA tensors (input_ids), got them on {device}")


def _check_cuda_graph(cuda_graph, device: torch.device) -> bool:
    """``cuda_graph`` as a bool, refused without CUDA tensors."""
    cuda_graph = check_bool("cuda_graph", cuda_graph)
    if cuda_graph:
        _require_cuda(device)  # (the CPU tests replace this check to run the static loop eagerly)
    return cuda_graph


def _loop(cuda_graph: bool):
    """The decoding loop from a prefilled :class:`_PairDecoder`: :func:`_decode_loop`, or with ``cuda_graph``
    (a ``static`` decoder) :func:`tcopilot.graph_decode.graph_loop`."""
    if not cuda_graph:
        return _decode_loop
    from tcopilot.graph_decode import graph_loop

    return graph_loop


# Step keys of a seeded generation: seed + (t + 1) * this odd constant (2**64 / golden ratio) mod 2**64, so
# consecutive steps (and nearby seeds) get far-apart Philox keys.
_STEP_KEY = 0x9E3779B97F4A7C15


def _as_int64(x: int) -> int:
    """``x`` mod 2**64 as a signed int64 value."""
    x %= 2**64
    return x - 2**64 if x >= 2**63 else x


def _step_key_offset(step: int) -> int:
    """What decoding step ``step`` adds to the seed: ``(step + 1) * _STEP_KEY`` as a signed int64."""
    return _as_int64(_STEP_KEY * (step + 1))


def _step_randomness(randomness, step: int) -> dict:
    """``generator=`` / ``seed=`` keywords of the sampler at decoding step ``step``."""
    generator, seed = randomness
    if seed is None:
        return dict(generator=generator)
    offset = _step_key_offset(step)
    if isinstance(seed, torch.Tensor):  # int64 addition wraps: the key is taken mod 2**64
        return dict(seed=seed.to(torch.int64) + offset)
    return dict(seed=_as_int64(seed + offset))


def _pick_next(model, dec: _PairDecoder, head, lam, fusion, temperature, top_k, top_p, impl, randomness: dict):
    """The next token of every row from ``dec``'s state: the fused decode head when ``head`` (from
    :func:`_decode_head_weights`) is not None, else the materialised ``z`` and ``f`` and the sampler.
    ``randomness``: the sampler's ``generator=`` / ``seed=`` keywords for this step."""
    if head is not None:  # fused head: both products and the choice in one call
        # the Pilot's output scale enters through h and the head's bias, as in training:
        # s (h W^T + c) = (s h) W^T + s c (c None for a bias-free head)
        h, weight, bias = lm_head_operands(head[0], dec.h, model.logit_scale)
        return rectified_decode_head(
            h, weight, dec.g, head[1], head[2], lm_head_bias=bias, lam=lam, fusion=fusion,
            temperature=temperature, top_k=top_k, top_p=top_p, softcap=model.softcap or None, impl=impl,
            **randomness,
        )
    f = dec.copilot_out()
    return rectified_next_token(
        dec.z, torch.zeros_like(dec.z) if f is None else f, lam=lam if dec.use_copilot else 0.0,
        fusion=fusion, temperature=temperature, top_k=top_k, top_p=top_p, impl=impl, **randomness,
    )


def _decode_loop(model, dec: _PairDecoder, input_ids, max_new_tokens, lam, fusion, temperature, top_k, top_p,
                 randomness, impl, eos_ids, pad_token_id) -> torch.Tensor:
    """Algorithm 2 from a prefilled decoder (``num_beams=1``): ``[B, L + new]`` ids (see :func:`generate`).

    ``randomness``: ``(generator, seed)``, at most one of them set."""
    device = input_ids.device
    out_ids = input_ids
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=device)
    head = _decode_head_weights(model, dec, impl)
    eos = torch.tensor(eos_ids, device=device) if eos_ids else None  # once, not a host-to-device copy per step
    for step in range(max_new_tokens):
        nxt = _pick_next(model, dec, head, lam, fusion, temperature, top_k, top_p, impl,
                         _step_randomness(randomness, step))  # fmt: skip
        nxt = torch.where(finished, torch.full_like(nxt, pad_token_id), nxt)
        out_ids = torch.cat([out_ids, nxt[:, None]], dim=1)
        if eos is not None:
            finished = finished | torch.isin(nxt, eos)
        if step == max_new_tokens - 1 or bool(finished.all()):
            break
        dec.advance(nxt)
    return out_ids


@torch.no_grad()
def generate_settings(model, input_ids: torch.Tensor, settings, *, attention_mask: torch.Tensor | None = None,
                      **options) -> dict:
    """:func:`generate` for several ``(lam, fusion)`` pairs of one prompt batch, with one shared prefill.

    Returns ``{(lam, fusion): [B, L + new] ids}``, each equal to ``generate(model, input_ids, lam=lam,
    fusion=fusion, attention_mask=attention_mask, **options)`` (a lambda sweep pays for the prompts once).
    ``options``: :func:`generate`'s other keywords; ``num_beams`` must be 1. Sampling draws from one
    ``generator`` setting after setting, in the order given; with ``seed`` every setting draws the numbers
    ``generate(seed=...)`` would. ``cuda_graph=True``: one static prefill, each setting captured and replayed
    as :func:`generate` does.
    """
    settings = [(float(check_finite("lam", lam)), fusion) for lam, fusion in settings]
    if not settings:
        raise ValueError("settings: expected at least one (lam, fusion) pair, got none")
    for _, fusion in settings:
        check_choice("fusion", fusion, FUSIONS)
    attention_mask = _check_prompts(input_ids, attention_mask)
    impl, generator = options.pop("impl", "auto"), options.pop("generator", None)
    seed, cuda_graph = options.pop("seed", None), options.pop("cuda_graph", False)
    check_choice("impl", impl, IMPLS)
    check_seed(seed, generator, input_ids.shape[0], input_ids.device)
    o = resolve_generation_options(input_ids.shape[1], options.pop("generation_config", None), **options)
    if o["num_beams"] != 1:
        raise ValueError(f"num_beams: expected 1 (generate_settings decodes greedily or samples), got {o['num_beams']}")
    cuda_graph = _check_cuda_graph(cuda_graph, input_ids.device)
    _check_token_ids(model, o["eos_token_ids"], o["pad_token_id"])
    check_token_ids(model.pilot, input_ids)
    if o["max_new_tokens"] == 0:
        return {setting: input_ids for setting in settings}
    uses = {setting: _uses_copilot(model, setting[0]) for setting in settings}
    results = {}
    loop = _loop(cuda_graph)
    with pilot_states(model.pilot) as states:
        root = _PairDecoder(model, states, any(uses.values()), static=cuda_graph)
        root.prefill(input_ids, attention_mask, o["max_new_tokens"])
        for setting in settings:
            lam, fusion = setting
            results[setting] = loop(
                model, root.fork(uses[setting]), input_ids, o["max_new_tokens"], lam, fusion, o["temperature"],
                o["top_k"], o["top_p"], (generator, seed), impl, o["eos_token_ids"], o["pad_token_id"],
            )
    return results


__all__ = ["generate", "generate_settings", "resolve_generation_options", "reorder_pilot_cache", "GENERATION_FIELDS"]
