"""The Copilot: a small decoder that reads the Pilot's error stream and predicts its next error.

Layer pattern (paper, Table 18): 1-indexed odd layers run causal self-attention over the Copilot's own
stream; even layers replace it by attention over the Mistake Log ``[X~ ; pooled h]`` of the Pilot.
Every layer has RMSNorm and a SwiGLU MLP. The error stream carries no positional encoding (the paper
relies on the Pilot's states for position); ``use_rope=True`` adds rotary embeddings as an option.

Every attention in the Copilot goes through :func:`tcopilot.log_attention`, whose position-based mask
(key visible iff ``0 <= k_pos <= q_pos``) serves causal self-attention, the two-segment log, padding
and decoding against a cache with one rule.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from tcopilot._validation import IMPLS, check_bool, check_choice, check_finite, check_int
from tcopilot.kernels.log_attention import log_attention


def _check_positive(name: str, value) -> float:
    value = check_finite(name, value)
    if not value > 0:
        raise ValueError(f"{name}: expected a finite number > 0, got {value!r}")
    return value


class CopilotConfig(PretrainedConfig):
    """Configuration of a :class:`Copilot` (Hugging Face field names).

    Args:
        vocab_size: the Pilot's vocabulary size V (the error vectors are V-dimensional).
        hidden_size: the Copilot's width c.
        num_hidden_layers: number of decoder layers (odd: self-attention, even: log attention).
        num_attention_heads / num_key_value_heads: query heads and key/value heads (GQA).
        pilot_hidden_size: the Pilot's width d; when it differs from ``hidden_size`` a linear
            ``pilot_proj`` maps the log ``[X~ ; pooled h]`` to the Copilot's width.
        intermediate_size: SwiGLU width (default ``8/3 * hidden_size`` rounded up to a multiple of 8).
        rms_norm_eps: epsilon of every RMSNorm.
        use_rope: rotary position embeddings on queries and keys (default False, as the paper).
        rope_theta: the rotary base, when ``use_rope``.
        attention_bias: biases on the q/k/v projections (Qwen2-style pretrained layers have them).
        attention_impl: ``impl`` passed to :func:`tcopilot.log_attention` (``"auto"``, ``"torch"``, ``"triton"``).
        initializer_range: standard deviation of the normal initialisation of the linear layers.

    Raises:
        ValueError: a size that is not an int >= 1 (Python or numpy; ``None`` picks the default where
            allowed), ``hidden_size`` not a multiple of ``num_attention_heads``, ``num_key_value_heads`` not a
            divisor of ``num_attention_heads``, an odd head dimension with ``use_rope``, ``rms_norm_eps`` or
            ``rope_theta`` not a finite number > 0, ``initializer_range`` not finite and >= 0, a non-bool
            ``use_rope`` / ``attention_bias``, or ``attention_impl`` not one of ``"auto"``, ``"torch"``,
            ``"triton"``.
    """

    model_type = "tcopilot"

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 256,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 4,
        pilot_hidden_size: int | None = None,
        num_key_value_heads: int | None = None,
        intermediate_size: int | None = None,
        rms_norm_eps: float = 1e-6,
        use_rope: bool = False,
        rope_theta: float = 10000.0,
        attention_bias: bool = False,
        attention_impl: str = "auto",
        initializer_range: float = 0.02,
        **kwargs,
    ):
        vocab_size = check_int("vocab_size", vocab_size, low=1, what="an int >= 1")
        hidden_size = check_int("hidden_size", hidden_size, low=1, what="an int >= 1")
        num_hidden_layers = check_int("num_hidden_layers", num_hidden_layers, low=1, what="an int >= 1")
        num_attention_heads = check_int("num_attention_heads", num_attention_heads, low=1, what="an int >= 1")
        if num_key_value_heads is not None:
            num_key_value_heads = check_int(
                "num_key_value_heads", num_key_value_heads, low=1, what="an int >= 1 or None"
            )
        if pilot_hidden_size is not None:
            pilot_hidden_size = check_int("pilot_hidden_size", pilot_hidden_size, low=1, what="an int >= 1 or None")
        if intermediate_size is not None:
            intermediate_size = check_int("intermediate_size", intermediate_size, low=1, what="an int >= 1 or None")
        if hidden_size % num_attention_heads != 0:
            raise ValueError(
                f"hidden_size: expected a multiple of num_attention_heads={num_attention_heads}, got {hidden_size}"
            )
        num_key_value_heads = num_key_value_heads or num_attention_heads
        if num_attention_heads % num_key_value_heads != 0:
            raise ValueError(
                f"num_key_value_heads: expected a divisor of num_attention_heads={num_attention_heads}, "
                f"got {num_key_value_heads}"
            )
        use_rope = check_bool("use_rope", use_rope)
        attention_bias = check_bool("attention_bias", attention_bias)
        if use_rope and (hidden_size // num_attention_heads) % 2 != 0:
            raise ValueError(
                f"use_rope: rotary embeddings need an even head dimension, got hidden_size={hidden_size} / "
                f"num_attention_heads={num_attention_heads} = {hidden_size // num_attention_heads}"
            )
        rms_norm_eps = _check_positive("rms_norm_eps", rms_norm_eps)
        rope_theta = _check_positive("rope_theta", rope_theta)
        initializer_range = check_finite("initializer_range", initializer_range)
        if initializer_range < 0:
            raise ValueError(f"initializer_range: expected a finite number >= 0, got {initializer_range!r}")
        check_choice("attention_impl", attention_impl, IMPLS)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.pilot_hidden_size = pilot_hidden_size or hidden_size
        self.intermediate_size = intermediate_size or 8 * ((8 * hidden_size // 3 + 7) // 8)
        self.rms_norm_eps = rms_norm_eps
        self.use_rope = use_rope
        self.rope_theta = rope_theta
        self.attention_bias = attention_bias
        self.attention_impl = str(attention_impl)
        self.initializer_range = initializer_range
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)

    @classmethod
    def from_pilot(cls, pilot_config, **overrides) -> CopilotConfig:
        """Fill vocabulary, widths and heads from a Pilot's config; ``overrides`` win.

        By default the Copilot has the Pilot's width and heads and 2 layers (one self-attention layer and
        one log-attention layer): pass ``num_hidden_layers`` for more.
        """
        hidden = pilot_config.hidden_size
        heads = getattr(pilot_config, "num_attention_heads", None) or max(1, hidden // 64)
        kwargs = dict(
            vocab_size=pilot_config.vocab_size,
            hidden_size=hidden,
            num_hidden_layers=2,
            num_attention_heads=heads,
            num_key_value_heads=getattr(pilot_config, "num_key_value_heads", None) or heads,
            pilot_hidden_size=hidden,
            intermediate_size=getattr(pilot_config, "intermediate_size", None),
            rms_norm_eps=getattr(pilot_config, "rms_norm_eps", None) or 1e-6,  # None in e.g. Cohere2-MoE's config
        )
        kwargs.update(overrides)
        if kwargs["hidden_size"] != hidden and "num_attention_heads" not in overrides:
            kwargs["num_attention_heads"] = max(1, kwargs["hidden_size"] // 64)
            kwargs["num_key_value_heads"] = kwargs["num_attention_heads"]
        if "intermediate_size" not in overrides and kwargs["hidden_size"] != hidden:
            kwargs["intermediate_size"] = None
        return cls(**kwargs)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 so bf16/fp16 activations keep their scale.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _rotate(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding of ``x [B,H,L,D]`` at integer positions ``pos [B,L]`` (padding clamps to 0)."""
    d = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d))
    ang = pos.clamp(min=0).float()[:, None, :, None] * inv  # [B,1,L,D/2]
    cos, sin = ang.cos(), ang.sin()
    x1, x2 = x.float()[..., : d // 2], x.float()[..., d // 2 :]
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.to(x.dtype)


@dataclass
class _KV:
    """One layer's cached keys, values and positions.

    Decoding appends in place into buffers with room to spare and attends over views of their filled part:
    a ``torch.cat`` per step copied the whole cache, i.e. twice the bytes the attention itself reads, at
    every layer and step. The buffers start at ``reserve`` entries (or the first append's length, if
    larger) and double when full; unused slots hold position -1 (padding). When autograd is recording
    through the cache (never while decoding), appends concatenate instead, so no tensor of a graph is
    written in place.

    ``static=True`` (CUDA-graph decoding, :mod:`tcopilot.graph_decode`): the buffers hold exactly ``reserve``
    entries, never grow, and appends write at a device-side count of filled entries (``fill``, advanced in
    place), so a captured step replays with the same shapes and addresses; the attention then reads the
    whole buffers, its kernels skipping the unfilled (position -1) key tiles.
    """

    k: torch.Tensor | None = None
    v: torch.Tensor | None = None
    pos: torch.Tensor | None = None
    n: int = 0  # filled entries (static: as of the last eager append; graph replays advance ``fill`` only)
    reserve: int = 0
    static: bool = False
    fill: torch.Tensor | None = None

    def append(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor):
        t = k.shape[2]
        if self.static:
            return self._append_static(k, v, pos)
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad or
                                        (self.k is not None and (self.k.requires_grad or self.v.requires_grad))):
            if self.k is not None:
                k = torch.cat([self.k[:, :, : self.n], k], dim=2)
                v = torch.cat([self.v[:, :, : self.n], v], dim=2)
                pos = torch.cat([self.pos[:, : self.n], pos], dim=1)
            self.k, self.v, self.pos, self.n = k, v, pos, k.shape[2]
            return k, v, pos
        need = self.n + t
        if self.k is None or need > self.k.shape[2]:
            self._grow(max(need, self.reserve, 2 * (0 if self.k is None else self.k.shape[2])), k, v, pos)
        self.k[:, :, self.n : need] = k
        self.v[:, :, self.n : need] = v
        self.pos[:, self.n : need] = pos
        self.n = need
        return self.k[:, :, :need], self.v[:, :, :need], self.pos[:, :need]

    def _append_static(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor):
        t = k.shape[2]
        if self.k is None:
            self._grow(self.reserve, k, v, pos)
            # The attention reads the whole buffers. An unfilled slot is masked out (position -1): the Triton
            # kernels load it as zeros, but PyTorch's SDPA (log_attention's torch path) multiplies its value by a
            # probability of exactly 0, and 0 * NaN is NaN. Fresh memory may hold any bit pattern (a bf16 NaN is
            # 1 in 256 of them), so unfilled slots are zeros, as after reset().
            self.k.zero_()
            self.v.zero_()
            self.fill = torch.zeros((), dtype=torch.int64, device=k.device)
        if self.n + t > self.k.shape[2]:
            raise ValueError(
                f"cache: a static Copilot cache holds {self.k.shape[2]} entries and {self.n} are filled, got "
                f"{t} more; size it with Copilot.new_cache(max_positions=prompt length + new tokens, static=True)"
            )
        idx = self.fill + torch.arange(t, device=k.device)
        self.k.index_copy_(2, idx, k)
        self.v.index_copy_(2, idx, v)
        self.pos.index_copy_(1, idx, pos.to(self.pos.dtype))
        self.fill += t
        self.n += t
        return self.k, self.v, self.pos

    def reset(self) -> None:
        """Empty, keeping the buffers (and so their addresses: a captured graph reads them): every slot
        padding (position -1, zero keys and values), the fill count 0."""
        self.n = 0
        if self.k is None:
            return
        self.pos.fill_(-1)
        self.k.zero_()
        self.v.zero_()
        if self.fill is not None:
            self.fill.zero_()

    def _grow(self, capacity: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
        b, h, _, d = k.shape
        new_k = k.new_empty(b, h, capacity, d)
        new_v = v.new_empty(b, h, capacity, v.shape[3])
        new_pos = pos.new_full((b, capacity), -1)
        if self.k is not None:
            new_k[:, :, : self.n] = self.k[:, :, : self.n]
            new_v[:, :, : self.n] = self.v[:, :, : self.n]
            new_pos[:, : self.n] = self.pos[:, : self.n]
        self.k, self.v, self.pos = new_k, new_v, new_pos

    def reorder(self, index: torch.Tensor) -> None:
        if self.k is None:
            return
        if self.static:  # same addresses (a captured graph reads these buffers)
            if index.shape[0] != self.k.shape[0]:
                raise ValueError(
                    f"index: a static cache keeps its {self.k.shape[0]} rows, got {index.shape[0]} (a new row count "
                    "needs a new cache)"
                )
            for buf in (self.k, self.v, self.pos):
                buf.copy_(buf[index])
        elif self.n == self.k.shape[2]:
            self.k, self.v, self.pos = self.k[index], self.v[index], self.pos[index]
        else:  # beams reorder at every step: copy the filled entries, not the whole reserved capacity
            rows = index.shape[0]
            k = self.k.new_empty(rows, *self.k.shape[1:])
            v = self.v.new_empty(rows, *self.v.shape[1:])
            pos = self.pos.new_full((rows, self.pos.shape[1]), -1)
            k[:, :, : self.n] = self.k[index, :, : self.n]
            v[:, :, : self.n] = self.v[index, :, : self.n]
            pos[:, : self.n] = self.pos[index, : self.n]
            self.k, self.v, self.pos = k, v, pos


@dataclass
class CopilotCache:
    """Key/value caches of every Copilot layer for decoding.

    Self-attention layers cache their own stream; log layers cache the projected log ``[X~ ; pooled h]``
    which grows by two entries (the new token's embedding and its pooled state) per decoded position.
    Entries are appended in arrival order; the attention mask comes from the stored positions, so the
    order of entries inside a cache does not matter.
    """

    layers: list[_KV] = field(default_factory=list)

    def reorder(self, index: torch.Tensor) -> None:
        """Select batch rows (beam search reorders its hypotheses with this)."""
        for kv in self.layers:
            kv.reorder(index)

    def reset(self) -> None:
        """Empty every layer's cache in place, keeping its buffers (a reused CUDA graph reads them)."""
        for kv in self.layers:
            kv.reset()


class CopilotAttention(nn.Module):
    def __init__(self, config: CopilotConfig, is_log_layer: bool):
        super().__init__()
        c, hq, hk = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
        self.head_dim = c // hq
        self.hq, self.hk = hq, hk
        self.is_log_layer = is_log_layer
        self.q_proj = nn.Linear(c, hq * self.head_dim, bias=config.attention_bias)
        self.k_proj = nn.Linear(c, hk * self.head_dim, bias=config.attention_bias)
        self.v_proj = nn.Linear(c, hk * self.head_dim, bias=config.attention_bias)
        self.o_proj = nn.Linear(hq * self.head_dim, c, bias=False)
        self.use_rope, self.rope_theta = config.use_rope, config.rope_theta
        self.impl = config.attention_impl

    def _heads(self, x: torch.Tensor, h: int) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, h, self.head_dim).transpose(1, 2)

    def forward(self, x, q_pos, kv_source, kv_pos, cache: _KV | None = None):
        q = self._heads(self.q_proj(x), self.hq)
        k = self._heads(self.k_proj(kv_source), self.hk)
        v = self._heads(self.v_proj(kv_source), self.hk)
        if self.use_rope:
            q = _rotate(q, q_pos, self.rope_theta)
            k = _rotate(k, kv_pos, self.rope_theta)
        if cache is not None:
            k, v, kv_pos = cache.append(k, v, kv_pos)
        out = log_attention(q, k, v, q_pos=q_pos, k_pos=kv_pos, impl=self.impl)
        b, _, n, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(b, n, self.hq * self.head_dim))


class CopilotLayer(nn.Module):
    def __init__(self, config: CopilotConfig, layer_idx: int):
        super().__init__()
        # 1-indexed even layers (layer_idx 1, 3, ...) attend over the Mistake Log.
        self.is_log_layer = layer_idx % 2 == 1
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = CopilotAttention(config, self.is_log_layer)
        # The log mixes token embeddings and pooled hidden states of different scales: normalise it.
        self.log_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps) if self.is_log_layer else None
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(self, x, q_pos, log_states, log_pos, cache: _KV | None = None):
        h = self.input_layernorm(x)
        if self.is_log_layer:
            a = self.self_attn(h, q_pos, self.log_layernorm(log_states), log_pos, cache)
        else:
            a = self.self_attn(h, q_pos, h, q_pos, cache)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x))


class Copilot(PreTrainedModel):
    """The Copilot decoder (a transformers ``PreTrainedModel``: ``save_pretrained`` / ``from_pretrained``).

    Parts:
        ``error_in``: Linear V -> c, the input projection of error vectors (replaces a token embedding);
        ``pilot_proj``: Linear d -> c for the log when the Pilot's width d differs (else identity);
        ``layers``: alternating self-attention / log-attention decoder layers; ``norm``: final RMSNorm;
        ``error_out``: Linear c -> V, the output head predicting the next error, zero-initialised so an
        untrained Copilot leaves the Pilot's distribution unchanged.

    :meth:`forward` maps input embeddings of the error stream to final hidden states ``g``; the head
    ``error_out`` is applied by the caller (training never materialises ``f = error_out(g)`` over the
    vocabulary: :func:`tcopilot.copilot_error_loss` works from ``g`` directly).
    """

    config_class = CopilotConfig
    base_model_prefix = "copilot"
    _no_split_modules = ["CopilotLayer"]
    _supports_attention_backend = False

    def __init__(self, config: CopilotConfig):
        super().__init__(config)
        c, v = config.hidden_size, config.vocab_size
        self.error_in = nn.Linear(v, c, bias=True)
        self.pilot_proj = (
            nn.Linear(config.pilot_hidden_size, c, bias=False) if config.pilot_hidden_size != c else nn.Identity()
        )
        self.layers = nn.ModuleList(CopilotLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(c, config.rms_norm_eps)
        self.error_out = nn.Linear(c, v, bias=True)
        self.post_init()
        self.reset_parameters()

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Deterministic init from the current torch seed (independent of transformers' init flags)."""
        for m in self.modules():
            self._init_weights(m)
        # Zero head: an untrained Copilot outputs f = 0 and changes nothing (DESIGN.md section 2).
        nn.init.zeros_(self.error_out.weight)
        nn.init.zeros_(self.error_out.bias)

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_pilot(cls, pilot, *, init_error_in: bool = True, **overrides) -> Copilot:
        """A Copilot sized from a Pilot model; ``error_in`` starts from the Pilot's token embedding when
        the widths match (so the input becomes ``ell @ E``, a mixture of token embeddings)."""
        config = CopilotConfig.from_pilot(pilot.config, **overrides)
        model = cls(config)
        emb = pilot.get_input_embeddings().weight
        if init_error_in and emb.shape == (config.vocab_size, config.hidden_size):
            with torch.no_grad():
                model.error_in.weight.copy_(emb.detach().t().to(model.error_in.weight.dtype))
        return model

    @classmethod
    def from_pilot_layers(cls, model, layers: list[int], **overrides) -> Copilot:
        """A Copilot whose decoder layers start from pretrained decoder layers of ``model`` (Llama/Qwen2
        family: ``self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``, two RMSNorms), as the paper
        initialises its Copilots. ``layers`` lists the source layer indices, one per Copilot layer."""
        from tcopilot.pilot import find_decoder_layers

        src_layers = find_decoder_layers(model)
        cfg = model.config
        overrides.setdefault("num_hidden_layers", len(layers))
        overrides.setdefault("attention_bias", getattr(cfg, "attention_bias", False) or _has_qkv_bias(src_layers[0]))
        if overrides["num_hidden_layers"] != len(layers):
            raise ValueError(
                f"layers: expected one source layer per Copilot layer ({overrides['num_hidden_layers']}), "
                f"got {len(layers)}"
            )
        copilot = cls.from_pilot(model, **overrides)
        if copilot.config.hidden_size != cfg.hidden_size:
            raise ValueError(
                f"hidden_size: pretrained layers need the source width {cfg.hidden_size}, "
                f"got {copilot.config.hidden_size}"
            )
        for dst, idx in zip(copilot.layers, layers):
            if not 0 <= idx < len(src_layers):
                raise ValueError(f"layers: expected indices in [0, {len(src_layers)}), got {idx}")
            src = src_layers[idx]
            state = {k: v for k, v in src.state_dict().items() if "rotary" not in k}
            missing, unexpected = dst.load_state_dict(state, strict=False)
            leftover = [k for k in missing if not k.startswith("log_layernorm")]
            if leftover or unexpected:
                raise ValueError(
                    f"model: layer {idx} is not Llama/Qwen2-shaped (missing {leftover}, unexpected {unexpected})"
                )
            if dst.log_layernorm is not None:
                with torch.no_grad():
                    dst.log_layernorm.weight.copy_(dst.input_layernorm.weight)
        return copilot

    # ------------------------------------------------------------------ forward
    def new_cache(self, max_positions: int = 0, *, static: bool = False) -> CopilotCache:
        """An empty :class:`CopilotCache`. ``max_positions`` (prompt length + tokens to generate) sizes its
        buffers up front (a log layer holds two entries per position), so decoding never regrows them.

        ``static=True``: buffers of exactly that size, filled at a device-side count, attended over whole
        (unfilled slots are padding), so every decode step has the same shapes and addresses: what a CUDA
        graph needs (:mod:`tcopilot.graph_decode`). Appending past the size raises a ValueError."""
        max_positions = check_int("max_positions", max_positions, low=0, what="an int >= 0")
        static = check_bool("static", static)
        if static and max_positions == 0:
            raise ValueError("max_positions: a static cache needs its size (prompt length + new tokens), got 0")
        return CopilotCache([
            _KV(reserve=max_positions * (2 if layer.is_log_layer else 1), static=static) for layer in self.layers
        ])

    def project_log(self, log_states: torch.Tensor) -> torch.Tensor:
        return self.pilot_proj(log_states.to(self.error_in.weight.dtype))

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        log_states: torch.Tensor,
        q_pos: torch.Tensor,
        log_pos: torch.Tensor,
        cache: CopilotCache | None = None,
    ) -> torch.Tensor:
        """Final hidden states ``g [B, L, c]``.

        Args:
            inputs_embeds: ``[B, L, c]`` the projected error stream (``error_in`` of the shifted errors).
            log_states: ``[B, M, d]`` the (new part of the) log ``[X~ ; pooled h]`` in the Pilot's width.
            q_pos: ``[B, L]`` positions of the stream (negative = padding).
            log_pos: ``[B, M]`` positions of the log entries (negative = padding).
            cache: a :class:`CopilotCache` for decoding; new keys are appended to it.
        """
        log = self.project_log(log_states)
        x = inputs_embeds
        for i, layer in enumerate(self.layers):
            x = layer(x, q_pos, log, log_pos, None if cache is None else cache.layers[i])
        return self.norm(x)

    # ------------------------------------------------------------------ helpers for the caller
    def feedback_matrices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(M, m)`` with ``error_in(error_out(g)) = g @ M + m``: the fed-back input at decode time costs a
        c x c product instead of two vocabulary-sized ones (DESIGN.md section 3)."""
        a, a_bias = self.error_in.weight, self.error_in.bias  # [c, V], [c]
        b, b_bias = self.error_out.weight, self.error_out.bias  # [V, c], [V]
        m_mat = b.t().float() @ a.t().float()
        m_vec = a.float() @ b_bias.float() + a_bias.float()
        return m_mat, m_vec

    def capture_values(self) -> torch.Tensor:
        """``[error_in.weight.T | error_out.weight | error_out.bias]`` ([V, 2c+1]): the values the Pilot's
        logit capture averages under its softmax (DESIGN.md 4.1)."""
        return torch.cat([self.error_in.weight.t(), self.error_out.weight, self.error_out.bias[:, None]], dim=1)


def _has_qkv_bias(layer: nn.Module) -> bool:
    attn = getattr(layer, "self_attn", None)
    q = getattr(attn, "q_proj", None)
    return bool(q is not None and getattr(q, "bias", None) is not None)


def param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = ["Copilot", "CopilotConfig", "CopilotCache", "param_count"]
