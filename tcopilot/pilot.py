"""The Pilot side: reading a Hugging Face causal LM's states, and the joint model ``TransformerCopilot``.

The Mistake Log needs, per position, the input representation ``X~`` (what enters the first decoder
layer: token embeddings, plus position embeddings for GPT-2-style models) and the mean of the decoder
layers' outputs (``pooled h``). Forward hooks collect both during the Pilot's ordinary forward pass:
the pooled state is a running sum of detached layer outputs, so nothing beyond what autograd already
keeps is stored.
"""

from __future__ import annotations

import inspect
import sys
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from tcopilot._validation import (
    IMPLS,
    check_choice,
    check_int,
    check_label_extrema,
    int64_as_scalar,
    label_extrema,
    scalar_as_int64,
)
from tcopilot.copilot import Copilot
from tcopilot.kernels.copilot_error_loss import copilot_error_loss
from tcopilot.kernels.logit_capture import logit_capture
from tcopilot.mistake_log import MistakeLog

IGNORE_INDEX = -100
LOG_MODES = ("online", "replay")
# What an embedding lookup takes as indices (and logit_capture as labels).
ID_DTYPES = (torch.int64, torch.int32)


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def _choice_property(name: str, choices: tuple[str, ...]) -> property:
    """An attribute that only takes one of ``choices``, checked at every assignment (``check_choice``)."""
    attr = "_" + name

    def set_value(self, value: str) -> None:
        check_choice(name, value, choices)
        setattr(self, attr, value)

    return property(lambda self: getattr(self, attr), set_value)


def input_vocab_size(pilot: nn.Module) -> int | None:
    """Rows of the Pilot's input embedding (None when it has no plain one to read)."""
    try:
        emb = pilot.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    weight = getattr(emb, "weight", None)
    return weight.shape[0] if isinstance(weight, torch.Tensor) and weight.dim() == 2 else None


def check_token_ids(pilot: nn.Module, input_ids: torch.Tensor) -> None:
    """``input_ids`` must be int64/int32 ids of the Pilot's input embedding: one host synchronisation (an
    IndexError deep inside ``torch.embedding`` otherwise)."""
    if input_ids.dtype not in ID_DTYPES:
        raise ValueError(f"input_ids: expected token ids of dtype int64 or int32, got {_dtype_name(input_ids)}")
    vocab = input_vocab_size(pilot)
    if vocab is None:
        return
    lo, hi = token_id_extrema(input_ids).tolist()
    check_token_id_extrema(lo, hi, vocab)


def token_id_extrema(input_ids: torch.Tensor) -> torch.Tensor:
    """``[2]`` int64 tensor ``(min, max)`` of ``input_ids`` (non-empty), on their device (no host read)."""
    return torch.stack(torch.aminmax(input_ids)).long()


def check_token_id_extrema(lo: int, hi: int, vocab: int) -> None:
    """Raise the ValueError of :func:`check_token_ids` for the host values of :func:`token_id_extrema`."""
    if lo < 0 or hi >= vocab:
        raise ValueError(f"input_ids: expected token ids in [0, {vocab}) (the Pilot's input embedding), "
                         f"got {lo if lo < 0 else hi}")


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layer list of a Hugging Face causal LM (Llama/Qwen2: ``model.layers``, GPT-2: ``transformer.h``).

    Found as the ``nn.ModuleList`` whose length equals ``config.num_hidden_layers`` (the longest one if
    several match), so new architectures work without a table of attribute names.
    """
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    best = None
    for _, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and (n is None or len(mod) == n):
            if best is None or len(mod) > len(best):
                best = mod
    if best is None:
        raise ValueError(
            f"pilot: could not find its decoder layers (an nn.ModuleList of num_hidden_layers={n} modules) "
            f"in {type(model).__name__}"
        )
    return best


class PilotStates:
    """Collects ``X~`` and the running sum of decoder-layer outputs during one forward of the Pilot."""

    def __init__(self, layers: nn.ModuleList):
        self.layers = layers
        self.x_tilde: torch.Tensor | None = None
        self._sum: torch.Tensor | None = None
        self._count = 0
        self._handles = []

    def reset(self) -> None:
        self.x_tilde, self._sum, self._count = None, None, 0

    @property
    def pooled(self) -> torch.Tensor:
        if self._sum is None or self._count != len(self.layers):
            raise RuntimeError(
                f"pilot: saw {self._count} of {len(self.layers)} decoder layer outputs; "
                "was the Pilot run inside PilotStates?"
            )
        if self._sum.dim() != 3 or self.x_tilde is None or self.x_tilde.shape != self._sum.shape:
            # e.g. Gemma-3n's AltUp stack carries [streams, batch, length, hidden]: which stream is "the" state of
            # the Mistake Log is a modelling choice, not something to guess
            raise ValueError(
                f"pilot: expected its decoder layers to take and return hidden states [batch, length, hidden], got "
                f"input {None if self.x_tilde is None else tuple(self.x_tilde.shape)} and output "
                f"{tuple(self._sum.shape)} ({type(self.layers[0]).__name__}); the Mistake Log cannot be read from "
                "this architecture: use it as a Pilot alone (copilot=None, no mistake_log)"
            )
        return self._sum / self._count

    def _pre_hook(self, module, args, kwargs):
        hs = args[0] if args else kwargs.get("hidden_states")
        self.x_tilde = hs.detach()

    def _hook(self, module, args, output):
        out = output[0] if isinstance(output, (tuple, list)) else output
        out = out.detach()
        if self._sum is None:
            self._sum = out.to(torch.float32, copy=True)  # our own buffer (never the layer's fp32 output itself)
        elif self._sum.shape == out.shape:
            # one mixed-dtype kernel per layer, in place: no fp32 copy of each output (a decode step's launches,
            # a training step's bytes); the same sums in the same order as adding fp32 copies
            self._sum.add_(out)
        else:
            self._sum = self._sum + out.float()  # broadcastable oddities keep their old behaviour; pooled checks
        self._count += 1

    def attach(self) -> None:
        self._handles.append(self.layers[0].register_forward_pre_hook(self._pre_hook, with_kwargs=True))
        for layer in self.layers:
            self._handles.append(layer.register_forward_hook(self._hook))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


@contextmanager
def pilot_states(pilot: nn.Module):
    """Context manager: hooks on the Pilot's decoder layers; yields a :class:`PilotStates`."""
    states = PilotStates(find_decoder_layers(pilot))
    states.attach()
    try:
        yield states
    finally:
        states.detach()


# The names a backbone's forward takes its cache by, and its output returns it by: transformers 5.2x calls it
# ``cache`` everywhere; before that attention models said ``past_key_values`` and the state-space ones (Mamba,
# Mamba-2, FalconMamba in 5.17) ``cache_params``. A name the forward lacks would vanish into its ``**kwargs``:
# each decode step would then start from an empty state, silently.
_CACHE_NAMES = ("cache", "past_key_values", "cache_params")


def _cache_kwarg(base: nn.Module) -> str:
    params = inspect.signature(base.forward).parameters
    return next((n for n in _CACHE_NAMES if n in params), "past_key_values")


def pilot_backbone(pilot: nn.Module) -> nn.Module:
    """The Pilot's decoder stack without its LM head (``LlamaModel`` inside ``LlamaForCausalLM``).

    A ``peft.PeftModel`` is unwrapped first: its own ``base_model`` is PEFT's tuner, whose forward runs the
    whole causal LM (materialising ``[tokens x vocab]`` logits). Adapter methods such as LoRA live inside
    the wrapped Linear layers, so the backbone of ``get_base_model()`` runs with the adapters active.
    Prompt-learning methods (prefix/prompt tuning) edit the inputs inside ``PeftModel.forward``, which
    this bypasses, so they are refused.
    """
    peft_config = getattr(pilot, "active_peft_config", None)
    if peft_config is not None and callable(getattr(pilot, "get_base_model", None)):
        if getattr(peft_config, "is_prompt_learning", False):
            raise ValueError(
                f"pilot: prompt-learning PEFT methods ({type(peft_config).__name__}) are not supported; "
                "use an adapter method such as LoRA (peft.LoraConfig)"
            )
        pilot = pilot.get_base_model()
    return pilot.base_model


# Causal LMs that scale their LM head's output, by ``config.model_type``: ``(config attribute, divides)``, the logits
# being ``lm_head(h) / value`` when ``divides`` else ``lm_head(h) * value`` (before any soft-capping), or None for a
# family whose Hugging Face model ignores the attribute. Keyed by family, not by attribute name, because the same
# name means opposite things: Granite divides its logits by ``logits_scaling``, HyperCLOVAX multiplies them by it,
# MiniCPM3 divides the last hidden state by it (the same logits for its bias-free head). Read in transformers 5.24's
# ``*ForCausalLM.forward``; add an entry for a family not listed here.
LOGIT_SCALE_RULES: dict[str, tuple[str, bool] | None] = {
    "cohere": ("logit_scale", False),
    "cohere2": ("logit_scale", False),
    "cohere2_moe": ("logit_scale", False),
    "cohere_compass_text": ("logit_scale", False),
    "granite": ("logits_scaling", True),
    "granite_swa": ("logits_scaling", True),
    "granitemoe": ("logits_scaling", True),
    "granitemoe_swa": ("logits_scaling", True),
    "granitemoehybrid": ("logits_scaling", True),
    "granitemoeshared": ("logits_scaling", True),
    "minicpm3": ("logits_scaling", True),
    "hyperclovax": ("logits_scaling", False),
    "falcon_h1": ("lm_head_multiplier", False),
    "mpt": None,  # MptConfig.logit_scale comes from MosaicML's own code; MptForCausalLM does not apply it
}
# The attributes above: a family missing from LOGIT_SCALE_RULES whose config sets one of them to something other
# than 1 is refused, since which way (or whether) it scales cannot be guessed from the name.
_LOGIT_SCALE_ATTRIBUTES = ("logit_scale", "logits_scaling", "lm_head_multiplier", "output_multiplier")


def pilot_logit_scale(config) -> float | None:
    """The factor ``s`` of a Pilot's logits ``z = s * lm_head(h)`` (soft-capping, if any, comes after), from its
    config (see ``LOGIT_SCALE_RULES``); None when ``s`` is 1.

    Every path that forms the Pilot's logits applies it: training (:class:`TransformerCopilot`), decoding
    (:func:`tcopilot.generate.generate`'s materialised logits and its fused decode head) and hence beam search.
    """
    model_type = getattr(config, "model_type", None)
    if model_type in LOGIT_SCALE_RULES:
        rule = LOGIT_SCALE_RULES[model_type]
        value = getattr(config, rule[0], None) if rule is not None else None
        if value is None:  # e.g. CohereCompass: no scale configured
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"pilot: expected config.{rule[0]} to be a number > 0 ({model_type}), got {value!r}")
        scale = 1.0 / value if rule[1] else float(value)
        return None if scale == 1.0 else scale
    for attr in _LOGIT_SCALE_ATTRIBUTES:
        value = getattr(config, attr, None)
        if value is not None and value != 1:
            raise ValueError(
                f"pilot: its config (model_type={model_type!r}) sets {attr}={value!r}, an output-logit scale of a "
                f"family tcopilot does not know, so whether it multiplies or divides the logits is unknown; register "
                f"it with tcopilot.pilot.LOGIT_SCALE_RULES[{model_type!r}] = ({attr!r}, divides) (or None when the "
                "model ignores it) before building the TransformerCopilot"
            )
    return None


def lm_head_operands(lm_head: nn.Module, hidden: torch.Tensor, scale: float | None):
    """``(hidden', weight, bias')`` such that ``hidden' @ weight^T + bias'`` is the Pilot's logits
    ``scale * lm_head(hidden)``, for the fused ops, which read a weight (and bias) instead of calling the head
    (``hidden`` is ``[N, d]``; ``bias'`` is ``None`` for a bias-free head).

    The scale goes into the hidden state and the bias: ``s (h W^T + b) = (s h) W^T + s b`` exactly, with no
    ``[N, V]`` tensor; both are ordinary differentiable products, so ``h`` and ``b`` get the gradients of the
    scaled loss and ``W`` is passed as is (never copied). A bias ``b`` (Phi, GPT-J, CodeGen) is handed to
    :func:`tcopilot.logit_capture` as its ``bias``, which adds it inside each chunk's GEMM and returns
    ``d b = sum_i dz_i``: the only copies are the ``[V]`` ``s b`` and the ``[N, d]`` ``s h`` when scaled.
    """
    weight, bias = lm_head.weight, getattr(lm_head, "bias", None)
    if bias is not None:
        bias = bias.to(weight.dtype)  # a no-op for nn.Linear (one dtype); logit_capture wants weight's dtype
    if scale is not None:
        hidden = hidden * scale
        if bias is not None:
            bias = bias * scale
    return hidden, weight, bias


def _check_lm_head(pilot: nn.Module) -> None:
    """The fused ops read ``lm_head.weight``: refuse an adapter on the head, whose delta they would ignore."""
    head = pilot.get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise ValueError(f"pilot: expected an LM head with a weight (get_output_embeddings()), got {head!r}")
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return
    if isinstance(head, BaseTunerLayer):
        raise ValueError(
            "pilot: its LM head carries a PEFT adapter, which the fused LM head would ignore; leave lm_head out "
            "of target_modules (train it in full with modules_to_save=['lm_head'] if needed)"
        )


def _check_gathered(model: TransformerCopilot) -> None:
    """The fused ops read ``lm_head.weight`` and the Copilot's ``error_in`` / ``error_out`` weights without
    calling those modules, so under FSDP2 only the root unit's pre-forward all-gather makes them whole: a
    ``DTensor`` here means they got an FSDP unit of their own (checked only once ``torch.distributed.tensor``
    is loaded, so that ``import tcopilot`` does not import it)."""
    if torch.compiler.is_compiling():
        return
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    if dtensor is None:
        return
    named = [("the Pilot's LM head weight", model.pilot.get_output_embeddings().weight)]
    if model.copilot is not None:
        named += [("copilot.error_in.weight", model.copilot.error_in.weight),
                  ("copilot.error_out.weight", model.copilot.error_out.weight)]
    for name, t in named:
        if isinstance(t, dtensor):
            raise ValueError(
                f"{name}: sharded (a DTensor) when TransformerCopilot.forward runs; the fused ops read it without "
                "calling its module, so a fully_shard unit of its own (or of the whole Copilot) is never gathered. "
                "Call fully_shard on each decoder layer (Pilot and Copilot) and then on the TransformerCopilot itself "
                "(the root), not on lm_head or the Copilot as a whole (README, 'Distributed training')"
            )


def run_base(base: nn.Module, input_ids, attention_mask, position_ids, cache=None, use_cache=False):
    """Run the Pilot's base model (see :func:`pilot_backbone`); returns ``(last_hidden_state, cache)``."""
    kw = {_cache_kwarg(base): cache} if cache is not None else {}
    out = base(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=use_cache,
        **kw,
    )
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None:
        raise ValueError(
            f"pilot: its backbone {type(base).__name__} returned no last_hidden_state (got "
            f"{type(out).__name__}); pass a Hugging Face causal LM whose base_model is the decoder stack "
            "(e.g. LlamaForCausalLM) or a peft LoRA model of one"
        )
    # Read the field this transformers version has: touching the other (deprecated) name logs a warning per call.
    fields = getattr(out, "__dataclass_fields__", {})
    new_cache = getattr(out, next((n for n in _CACHE_NAMES if n in fields), "past_key_values"), None)
    return hidden, new_cache


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of each token among the real tokens of its row; -1 on padding (masked out everywhere)."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, -1)


def shift_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Hugging Face convention: position t predicts ``labels[t+1]``; the last position predicts nothing."""
    out = torch.full_like(labels, ignore_index)
    out[:, :-1] = labels[:, 1:]
    return out


@dataclass
class CopilotOutput:
    """What :meth:`TransformerCopilot.forward` returns.

    ``num_tokens_tensor`` is the number of counted (shifted) labels as a 0-d int64 tensor on the model's device,
    so that ``forward`` need not read it back; the ``num_tokens`` property gives it as a Python int, and reading it
    synchronises with the device (a host read, like ``int(tensor)``).
    """

    loss: torch.Tensor  # pilot_loss + copilot_loss: one backward trains both (their gradients are disjoint)
    pilot_loss: torch.Tensor
    copilot_loss: torch.Tensor | None
    num_tokens_tensor: torch.Tensor

    @property
    def num_tokens(self) -> int:
        """The number of counted (shifted) labels; reading it synchronises with the device."""
        return int(self.num_tokens_tensor)


class TransformerCopilot(nn.Module):
    """A Pilot (any Hugging Face causal LM) and a Copilot trained jointly (paper, Algorithm 1).

    ``forward(input_ids, attention_mask, labels)`` runs the Pilot once, computes its loss and the whole
    Mistake Log with :func:`tcopilot.logit_capture` (no ``[tokens x vocab]`` tensor), feeds the Copilot
    the shifted errors and returns both losses. The Copilot's loss reaches no Pilot parameter: the log
    is detached (paper, App. A.3), so ``output.loss.backward()`` trains both models at once.

    ``copilot=None`` gives the Pilot alone with the same fused loss (the paper's "Pilot-only" baseline).

    ``mistake_log`` (a :class:`tcopilot.MistakeLog`): when set, every training-mode forward (``model.train()``
    with gradients enabled) also pushes its compressed log (top-k from the same capture pass) into it.
    ``log_mode="replay"`` (paper, Algorithm 1 lines 13-19): the Copilot is then trained on an entry drawn
    uniformly from that buffer instead of the current batch (:func:`tcopilot.replay.replay_copilot_loss`);
    a default ``MistakeLog()`` is created when none is given. Outside training, replay mode computes the
    exact online Copilot loss of the given batch.

    ``impl``, ``log_mode`` and ``mistake_log`` are checked when given and whenever assigned later (ValueError).
    ``forward`` checks the shapes, dtypes and devices of its tensors, that the ids are inside the Pilot's input
    embedding and that the labels that count are inside its LM head (or ``ignore_index``): both ranges in one
    host read (on an accelerator, one synchronisation per forward), after which the fused ops are told not to check
    the labels again (``check_labels=False``). The same read takes the value of a tensor ``num_items_in_batch`` (on
    the ids' device; :func:`tcopilot.logit_capture` then checks that number) and, when a Mistake Log records (with
    the forward's ``ignore_index``), the number of rows its entry keeps, which :meth:`MistakeLog.push` is given
    (``counts=``) so that it reads nothing. While ``torch.compile`` traces, the ids are left to the embedding's
    own index check and the labels to the capture op, which checks them when it runs. The output's ``num_tokens``
    is read from the device only when accessed (:class:`CopilotOutput`).

    ``impl`` (``"auto"``, ``"torch"``, ``"triton"``) is passed to the fused ops; with ``"triton"``,
    :func:`tcopilot.copilot_error_loss`, which has no Triton kernel, runs its PyTorch path (as ``"auto"`` does).
    """

    def __init__(self, pilot: nn.Module, copilot: Copilot | None = None, *, impl: str = "auto",
                 log_mode: str = "online", mistake_log=None):
        super().__init__()
        self.pilot = pilot
        self.copilot = copilot
        self.impl = impl
        self.log_mode = log_mode
        if log_mode == "replay" and mistake_log is None:
            mistake_log = MistakeLog()
        self.mistake_log = mistake_log
        find_decoder_layers(pilot)  # fail early with a clear message
        _check_lm_head(pilot)
        pilot_logit_scale(pilot.config)  # an unknown logit scale, too
        if copilot is not None:
            vocab = pilot.get_output_embeddings().weight.shape[0]
            if copilot.config.vocab_size != vocab:
                raise ValueError(
                    f"copilot: expected vocab_size={vocab} (the Pilot's LM head), got {copilot.config.vocab_size}; "
                    "the Copilot predicts errors over the Pilot's vocabulary, so build it for this Pilot with "
                    "Copilot.from_pilot(pilot) (and use the Pilot's tokenizer)"
                )
            d = pilot.config.hidden_size
            if copilot.config.pilot_hidden_size != d:
                raise ValueError(
                    f"copilot: expected pilot_hidden_size={d} (the Pilot's width), "
                    f"got {copilot.config.pilot_hidden_size}; build it for this Pilot with Copilot.from_pilot(pilot)"
                )

    # ``impl``, ``log_mode`` and ``mistake_log`` stay assignable attributes (benchmarks and the Trainer set them after
    # construction); the setters check every assignment, so a bad value fails where it is given, not at a later
    # forward (or never: generate does not read ``mistake_log``).
    impl = _choice_property("impl", IMPLS)
    log_mode = _choice_property("log_mode", LOG_MODES)

    @property
    def mistake_log(self) -> MistakeLog | None:
        return self._mistake_log

    @mistake_log.setter
    def mistake_log(self, value: MistakeLog | None) -> None:
        if value is not None and not isinstance(value, MistakeLog):
            raise ValueError(f"mistake_log: expected a tcopilot.MistakeLog or None, got {type(value).__name__}")
        self._mistake_log = value

    @property
    def softcap(self) -> float | None:
        return getattr(self.pilot.config, "final_logit_softcapping", None)

    @property
    def logit_scale(self) -> float | None:
        """The Pilot's output-logit factor (:func:`pilot_logit_scale`), applied before ``softcap``."""
        return pilot_logit_scale(self.pilot.config)

    def forward(self, input_ids, attention_mask=None, labels=None, ignore_index: int = IGNORE_INDEX,
                num_items_in_batch: int | float | torch.Tensor | None = None) -> CopilotOutput:
        self._check_inputs(input_ids, attention_mask, labels)
        ignore_index = check_int("ignore_index", ignore_index, what="an int (in int64 range)")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if labels is None:
            labels = input_ids.masked_fill(attention_mask == 0, ignore_index)
        log = self.mistake_log
        record = log is not None and self.training and torch.is_grad_enabled()
        # Read with the range check, in its one host read: a tensor num_items_in_batch (checked by logit_capture as
        # the number read here; the same denominator) and, when recording, the rows the Mistake Log keeps (so that
        # push reads nothing). Nothing is read while torch.compile traces (_check_values returns None).
        extra, items_packed, counts_packed = [], None, False
        compiling = torch.compiler.is_compiling()
        items = num_items_in_batch
        if not compiling and isinstance(items, torch.Tensor) and items.device == input_ids.device:
            items_packed = scalar_as_int64(items)
            if items_packed is not None:
                extra.append(items_packed)
        if not compiling and record and log.ignore_index == ignore_index:
            # push's rows: counted = shift_labels(labels) != ignore_index (labels[:, 1:]), real = attention_mask != 0
            extra.append(torch.stack([(labels[:, 1:] != ignore_index).sum(), (attention_mask != 0).sum()]))
            counts_packed = True
        read = self._check_values(input_ids, labels, ignore_index, extra)
        # the fused ops need not check the labels again (each check would be another host synchronisation)
        labels_checked = read is not None
        log_counts = None
        if read is not None:
            if items_packed is not None:
                num_items_in_batch = int64_as_scalar(read.pop(0), items.dtype)
            if counts_packed:
                log_counts = (read[0], read[1])
        bsz, length = input_ids.shape
        _check_gathered(self)
        pos = positions_from_mask(attention_mask)
        with pilot_states(self.pilot) as states:
            hidden, _ = run_base(pilot_backbone(self.pilot), input_ids, attention_mask, pos.clamp(min=0))
        lm_head = self.pilot.get_output_embeddings()
        target = shift_labels(labels, ignore_index)
        flat_target = target.reshape(-1)
        replaying = record and self.log_mode == "replay" and self.copilot is not None
        vocab = lm_head.weight.shape[0]
        values = self.copilot.capture_values() if self.copilot is not None and not replaying else None
        head_in, head_w, head_b = lm_head_operands(lm_head, hidden.reshape(bsz * length, -1), self.logit_scale)
        cap = logit_capture(
            head_in,
            head_w,
            flat_target,
            values,
            bias=head_b,
            ignore_index=ignore_index,
            softcap=self.softcap,
            num_items_in_batch=num_items_in_batch,
            topk=min(log.topk, vocab) if record else 0,
            impl=self.impl,
            check_labels=not labels_checked,
        )
        if record:
            log.push(input_ids=input_ids, attention_mask=attention_mask, targets=flat_target, capture=cap,
                     pooled=states.pooled, vocab_size=vocab, ignore_index=ignore_index, counts=log_counts)
        counted = flat_target != ignore_index
        n_tok = counted.sum()  # stays on the device: CopilotOutput.num_tokens reads it when asked
        if self.copilot is None:
            return CopilotOutput(cap.loss, cap.loss, None, n_tok)
        if replaying:
            from tcopilot.replay import replay_copilot_loss

            copilot_loss = replay_copilot_loss(self, log.sample(hidden.device), log.ignore_index)
            return CopilotOutput(cap.loss + copilot_loss, cap.loss, copilot_loss, n_tok)

        cop = self.copilot
        c = cop.config.hidden_size
        emb = error_embedding(cop, cap, flat_target, counted).view(bsz, length, c)
        # Position t reads the error of position t-1; position 0 reads "no error" (bias only).
        start = cop.error_in.bias.to(emb.dtype).expand(bsz, 1, c)
        stream = torch.cat([start, emb[:, :-1]], dim=1)
        log_states = torch.cat([states.x_tilde, states.pooled.to(states.x_tilde.dtype)], dim=1)
        # int32 positions (< L): the attention compares int32, and int64 ones cost each layer's attention a
        # rebase of ~15 small launches (positions_int32).
        pos = pos.to(torch.int32)
        g = cop(stream.to(cop.error_in.weight.dtype), log_states, pos, torch.cat([pos, pos], dim=1))
        copilot_loss = copilot_error_loss(
            g.reshape(bsz * length, c), cop.error_out.weight, cop.error_out.bias, cap, flat_target,
            # no Triton kernel for this op (the Gram form is a few small GEMMs): a model asked for the Triton
            # kernels uses them where they exist, as "auto" does on CUDA
            ignore_index=ignore_index, impl="auto" if self.impl == "triton" else self.impl,
            # the capture's labels: checked above, or (while compiling) by the capture op before this runs
            check_labels=False,
        )
        return CopilotOutput(cap.loss + copilot_loss, cap.loss, copilot_loss, n_tok)

    def _check_inputs(self, input_ids, attention_mask, labels) -> None:
        """Shapes, dtypes and devices of ``forward``'s tensors (no host read; the values: :meth:`_check_values`)."""
        if not isinstance(input_ids, torch.Tensor):
            raise ValueError(f"input_ids: expected a torch.Tensor [batch, length], got {type(input_ids).__name__}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids: expected [batch, length], got shape {tuple(input_ids.shape)}")
        if input_ids.numel() == 0:
            raise ValueError(f"input_ids: expected a non-empty batch, got shape {tuple(input_ids.shape)}")
        if input_ids.dtype not in ID_DTYPES:
            raise ValueError(f"input_ids: expected token ids of dtype int64 or int32, got {_dtype_name(input_ids)}")
        shape = tuple(input_ids.shape)
        for name, t in (("attention_mask", attention_mask), ("labels", labels)):
            if t is None:
                continue
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{name}: expected a torch.Tensor of shape {shape} (like input_ids), got "
                                 f"{type(t).__name__}")
            if tuple(t.shape) != shape:
                raise ValueError(f"{name}: expected shape {shape} (like input_ids), got {tuple(t.shape)}")
            if t.device != input_ids.device:
                raise ValueError(f"{name}: expected a tensor on {input_ids.device} (like input_ids), got {t.device}")
        if labels is not None and labels.dtype not in ID_DTYPES:
            raise ValueError(f"labels: expected token ids of dtype int64 or int32, got {_dtype_name(labels)}")

    def _check_values(self, input_ids, labels, ignore_index: int, extra: list[torch.Tensor] = ()) -> list[int] | None:
        """The ids in the Pilot's input embedding (:func:`check_token_ids`) and the labels that count in its LM head
        (``check_labels``), with one host read for both (one synchronisation on an accelerator), which also reads
        ``extra`` (1-d int64 tensors on the ids' device) for the caller.

        Only ``labels[:, 1:]`` is read: :func:`shift_labels` drops the first column. Returns the host values of
        ``extra`` (one list) once the checks pass, or ``None`` when nothing was read or checked: while
        ``torch.compile`` traces (a host read would break the graph; the capture op then checks the labels when it
        runs, and the ids are left to the embedding's own index check).
        """
        if torch.compiler.is_compiling():
            return None
        id_vocab = input_vocab_size(self.pilot)
        counted = labels[:, 1:]
        parts = [] if id_vocab is None else [token_id_extrema(input_ids)]
        if counted.numel() > 0:
            parts.append(label_extrema(counted, ignore_index))
        parts.extend(extra)
        values = torch.cat(parts).tolist() if parts else []
        if id_vocab is not None:
            check_token_id_extrema(values[0], values[1], id_vocab)
            values = values[2:]
        if counted.numel() > 0:
            vocab = self.pilot.get_output_embeddings().weight.shape[0]
            check_label_extrema("labels", values[0], values[1], vocab, ignore_index)
            values = values[2:]
        return values

    def generate(self, input_ids, max_new_tokens=None, lam: float = 1.0, fusion: str = "probs", **kwargs):
        """Algorithm 2: see :func:`tcopilot.generate.generate` for every option (``GenerationConfig`` names;
        ``generation_config=`` or, as in ``PreTrainedModel.generate``, a config as the second argument)."""
        from tcopilot.generate import generate

        if hasattr(max_new_tokens, "to_diff_dict"):  # generate(ids, GenerationConfig(...))
            if kwargs.get("generation_config") is not None:
                raise ValueError("generation_config: given twice (positionally and by keyword)")
            kwargs["generation_config"], max_new_tokens = max_new_tokens, None
        return generate(self, input_ids, max_new_tokens=max_new_tokens, lam=lam, fusion=fusion, **kwargs)


def error_embedding(copilot: Copilot, cap, labels: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    """``error_in(ell_i) = A[:, y_i] - U_i[:c] + a`` for counted rows, ``a`` elsewhere ([N, c], fp32).

    ``U = p @ A^T`` comes from the capture's pass over the vocabulary, so the V-dimensional error vector
    never exists (DESIGN.md 4.1).
    """
    c = copilot.config.hidden_size
    a_w, a_b = copilot.error_in.weight, copilot.error_in.bias  # [c, V], [c]
    safe = labels.clamp(min=0)
    gathered = a_w.t()[safe].float() - cap.p_values[:, :c]
    return torch.where(counted[:, None], gathered, torch.zeros_like(gathered)) + a_b.float()


__all__ = [
    "TransformerCopilot",
    "CopilotOutput",
    "PilotStates",
    "pilot_states",
    "find_decoder_layers",
    "positions_from_mask",
    "shift_labels",
    "run_base",
    "pilot_backbone",
    "error_embedding",
    "pilot_logit_scale",
    "lm_head_operands",
    "LOGIT_SCALE_RULES",
]
