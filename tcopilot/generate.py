"""Rectified decoding (paper, Algorithm 2) with KV caches for the Pilot and the Copilot.

Per step: the Pilot decodes one token with its cache, hooks give the new position's ``X~`` and pooled
state, the Copilot decodes one position with its own caches (self-attention over its stream, attention
over the growing log), ``f = error_out(g)`` rectifies the Pilot's distribution and
:func:`tcopilot.rectified_next_token` picks the token. The Copilot's next input is its own output fed
back: ``error_in(f) = g @ M + m`` with the c x c matrix ``M`` computed once per call.

Prompt positions are treated as uncounted (their errors are not known to the model at inference), so
the Copilot reads "no error" (the bias of ``error_in``) there, exactly as in training where the loss
covers response tokens only.
"""

from __future__ import annotations

import torch

from tcopilot._validation import check_choice, check_finite
from tcopilot.kernels.rectified_next_token import rectified_next_token
from tcopilot.pilot import pilot_backbone, pilot_states, positions_from_mask, run_base


def _pilot_logits(model, hidden_last: torch.Tensor) -> torch.Tensor:
    w = model.pilot.get_output_embeddings()
    z = w(hidden_last).float()
    cap = model.softcap
    if cap:
        z = cap * torch.tanh(z / cap)
    return z


# GenerationConfig fields honoured by :func:`generate` (the rest of a config must be unset or neutral).
GENERATION_FIELDS = ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "num_beams",
                     "eos_token_id", "pad_token_id")
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
    ``top_k``, ``top_p``, ``eos_token_ids`` (a list, maybe empty) and ``pad_token_id``. Raises ValueError for
    beam search, a non-positive temperature with sampling, and config fields that would change the output
    but are not implemented here.
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
            opts["max_new_tokens"] = max(0, int(generation_config.max_length) - input_length)
    unknown = set(kwargs) - set(GENERATION_FIELDS)
    if unknown:
        raise TypeError(f"generate() got unexpected keyword arguments {sorted(unknown)}")
    opts.update({k: v for k, v in kwargs.items() if v is not None})

    max_new_tokens = opts.get("max_new_tokens", 32)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens: expected an int >= 0, got {max_new_tokens!r}")
    temperature = opts.get("temperature")
    do_sample = opts.get("do_sample")
    if do_sample is None:  # the pre-GenerationConfig convention: temperature > 0 samples, 0 is greedy
        do_sample = temperature is not None and temperature > 0
    do_sample = bool(do_sample)
    num_beams = opts.get("num_beams", 1)
    if num_beams != 1:
        what = "beam sampling (num_beams > 1 with do_sample=True)" if do_sample else "beam search"
        raise ValueError(
            f"num_beams: {what} is not implemented yet, got num_beams={num_beams!r}; use num_beams=1 "
            "(greedy, or sampling with do_sample=True)"
        )
    if do_sample:
        temperature = 1.0 if temperature is None else temperature
        check_finite("temperature", temperature)
        if temperature <= 0:
            raise ValueError(
                f"temperature: expected a number > 0 with do_sample=True, got {temperature!r}; "
                "use do_sample=False for greedy decoding"
            )
    else:
        temperature = 0.0  # greedy whatever the temperature (GenerationConfig semantics)
    eos = opts.get("eos_token_id")
    eos_ids = [] if eos is None else [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
    pad = opts.get("pad_token_id")
    if pad is None:
        pad = eos_ids[0] if eos_ids else 0
    return dict(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=float(temperature),
                top_k=int(opts.get("top_k", 0)), top_p=float(opts.get("top_p", 1.0)),
                eos_token_ids=eos_ids, pad_token_id=int(pad))


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
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    generation_config=None,
    generator: torch.Generator | None = None,
    impl: str = "auto",
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
        input_ids / attention_mask: ``[B, L]`` prompts, left-padded when lengths differ.
        max_new_tokens: how many tokens to add at most (default 32; all rows stop early once every row hit
            EOS). From a config without ``max_new_tokens``, ``max_length - L``.
        lam: the Copilot's weight lambda; ``lam=0`` gives exactly the Pilot's own tokens (the Copilot
            is then not run at all).
        fusion: ``"probs"`` (paper Eq. 8, ``softmax(z) + lam*f``) or ``"logits"`` (``z + lam*f``).
        do_sample: False = greedy (whatever ``temperature`` says); True = sample with ``temperature``
            (default 1.0, must be > 0), ``top_k`` (default 0 = off) and ``top_p`` (default 1.0 = off).
            None (not given anywhere) keeps the older convention: sample iff ``temperature > 0``.
        num_beams: only 1; beam search (with or without sampling) raises a ValueError for now.
        eos_token_id / pad_token_id: an id or a list of ids; rows that emitted EOS are padded with
            ``pad_token_id`` afterwards (default: the first EOS id, else 0).
        generation_config: a ``transformers.GenerationConfig``; fields other than the ones above that
            would change the output (``repetition_penalty``, ``num_return_sequences``, ``min_new_tokens``,
            ...) raise a ValueError instead of being ignored.
        generator: ``torch.Generator`` for sampling (reproducible draws).
    """
    if input_ids.dim() != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids: expected a non-empty [batch, length] tensor, got {tuple(input_ids.shape)}")
    o = resolve_generation_options(
        input_ids.shape[1], generation_config, max_new_tokens=max_new_tokens, do_sample=do_sample,
        temperature=temperature, top_k=top_k, top_p=top_p, num_beams=num_beams, eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
    max_new_tokens, temperature, top_k, top_p = o["max_new_tokens"], o["temperature"], o["top_k"], o["top_p"]
    eos_ids, pad_token_id = o["eos_token_ids"], o["pad_token_id"]
    check_finite("lam", lam)
    check_choice("fusion", fusion, ("probs", "logits"))
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask: expected shape {tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}")

    pilot, copilot = model.pilot, model.copilot
    use_copilot = copilot is not None and lam != 0.0
    base = pilot_backbone(pilot)
    device = input_ids.device
    bsz = input_ids.shape[0]
    mask = attention_mask.clone()
    pos = positions_from_mask(mask)
    out_ids = input_ids
    finished = torch.zeros(bsz, dtype=torch.bool, device=device)
    if max_new_tokens == 0:
        return out_ids

    with pilot_states(pilot) as states:
        hidden, cache = run_base(base, input_ids, mask, pos.clamp(min=0), use_cache=True)
        z = _pilot_logits(model, hidden[:, -1])
        if use_copilot:
            ccache = copilot.new_cache()
            m_mat, m_vec = copilot.feedback_matrices()
            wdtype = copilot.error_in.weight.dtype
            stream = copilot.error_in.bias.to(wdtype).expand(bsz, input_ids.shape[1], -1)
            log = torch.cat([states.x_tilde, states.pooled.to(states.x_tilde.dtype)], dim=1)
            g = copilot(stream, log, pos, torch.cat([pos, pos], 1), cache=ccache)[:, -1]
        cur_pos = pos[:, -1].clamp(min=-1)
        for step in range(max_new_tokens):
            f = copilot.error_out(g).float() if use_copilot else torch.zeros_like(z)
            nxt = rectified_next_token(
                z, f, lam=lam if use_copilot else 0.0, fusion=fusion, temperature=temperature,
                top_k=top_k, top_p=top_p, generator=generator, impl=impl,
            )
            nxt = torch.where(finished, torch.full_like(nxt, pad_token_id), nxt)
            out_ids = torch.cat([out_ids, nxt[:, None]], dim=1)
            if eos_ids:
                finished = finished | torch.isin(nxt, torch.tensor(eos_ids, device=device))
            if step == max_new_tokens - 1 or bool(finished.all()):
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            cur_pos = cur_pos + 1
            new_pos = cur_pos[:, None]
            states.reset()
            hidden, cache = run_base(base, nxt[:, None], mask, new_pos.clamp(min=0), cache=cache, use_cache=True)
            z = _pilot_logits(model, hidden[:, -1])
            if use_copilot:
                fed = (g.float() @ m_mat + m_vec).to(wdtype)[:, None]  # error_in(f_prev), no V-sized product
                log = torch.cat([states.x_tilde, states.pooled.to(states.x_tilde.dtype)], dim=1)
                g = copilot(fed, log, new_pos, torch.cat([new_pos, new_pos], 1), cache=ccache)[:, -1]
    return out_ids


__all__ = ["generate", "resolve_generation_options", "GENERATION_FIELDS"]
