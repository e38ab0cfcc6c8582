"""``CopilotTrainer``: train a Pilot and a Copilot jointly with ``transformers.Trainer``.

The model is one :class:`tcopilot.TransformerCopilot` (an ``nn.Module`` holding both), so a single
``accelerator.prepare`` covers them (DDP wraps the pair). What the subclass changes:

- **Optimizer**: the optimizer named by ``args.optim`` (AdamW by default) gets parameter groups per model
  (and per decay/no-decay as the stock Trainer): the Pilot's at ``args.learning_rate``, the Copilot's at
  ``copilot_learning_rate``. The stock scheduler is a ``LambdaLR`` whose factor multiplies each group's own
  base rate, so both follow the same warm-up + decay shape (``args.lr_scheduler_type``) from their own bases.
- **Loss and gradient accumulation**: ``num_items_in_batch`` (the counted tokens of the whole optimisation
  step, over all ranks with ``average_tokens_across_devices``) goes to the model, so the Pilot's loss is a
  token sum divided by it, exactly as the stock Trainer does for a causal LM; with labels shifted inside the
  model, tokens are counted over ``labels[..., 1:]``. The Copilot's token RMSE is not additive over tokens:
  each micro-batch's RMSE is divided by the number of micro-batches (and DDP averages it over ranks), as in
  :class:`tcopilot.train.Trainer`.
- **Clipping**: ``_clip_grad_norm`` (the Trainer's hook, called when ``args.max_grad_norm > 0``) clips the
  Pilot's gradients to ``args.max_grad_norm`` and the Copilot's to ``copilot_max_grad_norm`` separately
  (``torch.nn.utils.clip_grad_norm_`` per model, after unscaling fp16 gradients once). The logged
  ``grad_norm`` is the norm of both together, before clipping; ``grad_norm_pilot`` / ``grad_norm_copilot``
  are logged too. Under DeepSpeed or FSDP1 (flat parameters) the stock joint clipping is used.
- **Logs**: ``loss`` (= pilot + copilot), ``pilot_loss``, ``copilot_loss``, ``copilot_learning_rate``. They and the
  per-model gradient norms stay on the device until a logging step reads them (one host read): between logging steps
  the package reads the device only in the forwards (the count ``num_items_in_batch`` is read with their range
  check). The stock Trainer's ``logging_nan_inf_filter`` (on by default) reads each micro-batch's loss itself.
- **Checkpoints**: each ``checkpoint-N/`` holds the Pilot in ``save_pretrained`` form (safetensors; a PEFT
  Pilot saves its adapter) and the Copilot in ``checkpoint-N/copilot/`` (``Copilot.save_pretrained``),
  beside the stock optimizer, scheduler, RNG and trainer state. ``trainer.train(resume_from_checkpoint=...)``
  loads both; :func:`load_checkpoint` does it outside a Trainer.

Differences from :class:`tcopilot.train.Trainer` (our own loop) with the same data, seed and settings:
HF's warm-up starts at ``lr = 0`` on the first step (``step / warmup``) where ours starts at
``lr / warmup`` (``(step + 1) / warmup``); with ``warmup_steps=0``, ``lr_scheduler_type="cosine_with_min_lr"``
and ``lr_scheduler_kwargs={"min_lr_rate": r}`` the schedules are identical to ours with ``min_lr_ratio=r``.
HF's default weight decay skips biases and norms, ours decays every parameter (the default is 0 in both).
The data order comes from the Trainer's sampler (ours from :func:`tcopilot.train.batch_indices`).

**TRL** (``SFTTrainer``): its ``__init__`` expects a ``PreTrainedModel`` (it reads ``model.config`` and patches
``model.forward`` with its own fused LM head) and its loss is its own, so do not mix the classes. Let TRL prepare
the data (tokenised ``input_ids`` and ``labels`` with -100 outside completions / assistant turns) and the collator,
then train the pair with ``CopilotTrainer``: ``examples/trl_sft.py`` (``copilot_sft_trainer``) does this, refusing
``packing`` / ``padding_free`` (the pair derives positions from the padded batch's attention mask). With
``peft_config`` pass ``sft.model``, the wrapped Pilot, to ``TransformerCopilot``.

**Activation checkpointing** (``args.activation_checkpointing``, on by default in TRL's ``SFTConfig``): enabled on
the Pilot's decoder layers by ``train``; losses and gradients are unchanged.

**Distributed**: ``accelerate launch`` / ``torchrun`` with DDP works as for any model (tested with 2 CPU
processes on gloo: losses, gradient norms and weights equal one process). FSDP2 requirement: the fused ops
read whole weight matrices without calling their modules (``logit_capture`` takes ``lm_head.weight`` ``[V, d]``,
the Copilot's capture values and error loss take ``error_in`` / ``error_out``), so these must be left to the
*root* unit: ``fully_shard`` each decoder layer (Pilot and Copilot) and then the ``TransformerCopilot``. The root's
pre-forward hook all-gathers the parameters left to it, so ``forward`` sees plain full tensors (tested with 2 CPU
processes on gloo in ``tests/integrations/test_fsdp2.py``: loss, gathered gradients and updated weights equal one
process, and a ``full_state_dict`` checkpoint loads into an unsharded model). A unit of their own for ``lm_head``
or the whole Copilot would leave them sharded (``forward`` raises a ``ValueError`` saying so). Through
``TrainingArguments(fsdp=True, fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": [<Pilot layer class>,
"CopilotLayer"], "state_dict_type": "FULL_STATE_DICT"})`` accelerate builds the same plan (it carves out
``lm_head`` only for a model with ``get_output_embeddings``, which ``TransformerCopilot`` has not); that path is
not tested here, since accelerate enables FSDP only on accelerators (on CPU it silently runs DDP). Resuming an
FSDP run through ``CopilotTrainer`` is not implemented (``load_checkpoint`` + a new run).
"""

from __future__ import annotations

import json
import math
import os

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import Trainer

from tcopilot.integrations.lora import is_peft_model, load_adapters
from tcopilot.pilot import TransformerCopilot

COPILOT_DIR = "copilot"
_SAFE, _SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
_BIN, _BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
_ADAPTER = ("adapter_model.safetensors", "adapter_model.bin")


def _core(model: nn.Module) -> TransformerCopilot:
    """The TransformerCopilot inside DDP/FSDP/compile wrappers."""
    seen = 0
    while not isinstance(model, TransformerCopilot) and seen < 8:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            break
        model, seen = inner, seen + 1
    if not isinstance(model, TransformerCopilot):
        raise ValueError(
            f"model: expected a tcopilot.TransformerCopilot (Pilot + Copilot in one module), got {type(model).__name__}"
        )
    return model


# ---------------------------------------------------------------------------------------------- checkpoints
def _split_state_dict(state_dict: dict | None, prefix: str) -> dict | None:
    if state_dict is None:
        return None
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def save_checkpoint(model: TransformerCopilot, output_dir: str, state_dict: dict | None = None) -> None:
    """Save the Pilot to ``output_dir`` and the Copilot to ``output_dir/copilot`` with ``save_pretrained``
    (safetensors; PEFT models save their adapters). ``state_dict``: a full state dict of ``model`` (keys
    ``pilot.*`` / ``copilot.*``), e.g. gathered under FSDP; default: the modules' own."""
    model = _core(model)
    os.makedirs(output_dir, exist_ok=True)
    pilot_sd = _split_state_dict(state_dict, "pilot.")
    kw = {} if pilot_sd is None else {"state_dict": pilot_sd}
    model.pilot.save_pretrained(output_dir, **kw)
    if model.copilot is not None:
        cop_sd = _split_state_dict(state_dict, "copilot.")
        kw = {} if cop_sd is None else {"state_dict": cop_sd}
        model.copilot.save_pretrained(os.path.join(output_dir, COPILOT_DIR), **kw)


def _read_weights(folder: str) -> dict:
    for index_name in (_SAFE_INDEX, _BIN_INDEX):
        index = os.path.join(folder, index_name)
        if os.path.isfile(index):
            with open(index) as fh:
                files = sorted(set(json.load(fh)["weight_map"].values()))
            out = {}
            for f in files:
                out.update(_read_file(os.path.join(folder, f)))
            return out
    for name in (_SAFE, _BIN):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return _read_file(path)
    raise ValueError(f"checkpoint: no {_SAFE} (or sharded/.bin weights) in {folder!r}")


def _read_file(path: str) -> dict:
    if path.endswith(".safetensors"):
        return load_file(path, device="cpu")
    return torch.load(path, map_location="cpu", weights_only=True)


def _load_module(module: nn.Module, folder: str, what: str) -> None:
    if is_peft_model(module):
        if not any(os.path.isfile(os.path.join(folder, f)) for f in _ADAPTER):
            raise ValueError(f"checkpoint: the {what} is a PEFT model but {folder!r} has no adapter_model.safetensors")
        load_adapters(module, folder)
        return
    state = _read_weights(folder)
    result = module.load_state_dict(state, strict=False)
    # save_pretrained drops tied duplicates (lm_head.weight when tied to the embedding): a missing key is
    # fine when another name of the same tensor was loaded.
    names_of: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(p), []).append(name)
    loaded = set(state)
    params = dict(module.named_parameters(remove_duplicate=False))
    missing = [k for k in result.missing_keys
               if not (k in params and any(n in loaded for n in names_of[id(params[k])]))]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"checkpoint: the {what} in {folder!r} does not match the model "
            f"(missing {missing[:5]}, unexpected {list(result.unexpected_keys)[:5]})"
        )


def load_checkpoint(model: nn.Module, path: str) -> None:
    """Load a checkpoint written by :func:`save_checkpoint` / ``CopilotTrainer`` into ``model`` in place:
    the Pilot from ``path`` and the Copilot from ``path/copilot``. PEFT models get their adapters loaded."""
    model = _core(model)
    _load_module(model.pilot, path, "Pilot")
    if model.copilot is not None:
        cdir = os.path.join(path, COPILOT_DIR)
        if not os.path.isdir(cdir):
            raise ValueError(f"checkpoint: {path!r} has no {COPILOT_DIR}/ folder, but the model has a Copilot")
        _load_module(model.copilot, cdir, "Copilot")


# ---------------------------------------------------------------------------------------------- the trainer
class CopilotTrainer(Trainer):
    """A ``transformers.Trainer`` for a :class:`tcopilot.TransformerCopilot` (see the module docstring).

    Args (beyond ``transformers.Trainer``'s; each also read from ``args`` when it has a field of that name):
        copilot_learning_rate: the Copilot's peak learning rate (default: ``args.learning_rate``).
        copilot_max_grad_norm: the Copilot's clipping norm (default: ``args.max_grad_norm``; <= 0: no clipping
            of the Copilot). Clipping runs only when ``args.max_grad_norm > 0`` (the Trainer's own switch).
        copilot_weight_decay: the Copilot's weight decay (default: ``args.weight_decay``).

    Example (runs on the CPU)::

        from transformers import TrainingArguments
        from tcopilot.integrations import CopilotTrainer
        args = TrainingArguments("out", max_steps=10, per_device_train_batch_size=4,
                                 gradient_accumulation_steps=2, learning_rate=1e-3, report_to=[])
        trainer = CopilotTrainer(model=TransformerCopilot(pilot, copilot), args=args, train_dataset=examples,
                                 data_collator=collate, copilot_learning_rate=3e-4)
        trainer.train()
    """

    # transformers >= 5.2x: the loss from compute_loss is already scaled for gradient accumulation (set per call:
    # False when no token count came with the batch). Older versions decide from model_accepts_loss_kwargs.
    loss_is_scaled_for_ga = True

    def __init__(self, model=None, args=None, *pos, copilot_learning_rate: float | None = None,
                 copilot_max_grad_norm: float | None = None, copilot_weight_decay: float | None = None, **kwargs):
        if model is None:
            raise ValueError("model: CopilotTrainer needs a TransformerCopilot instance (model_init is not supported)")
        core = _core(model)
        super().__init__(model, args, *pos, **kwargs)
        a = self.args
        self.copilot_learning_rate = _pick(copilot_learning_rate, a, "copilot_learning_rate", a.learning_rate)
        self.copilot_max_grad_norm = _pick(copilot_max_grad_norm, a, "copilot_max_grad_norm", a.max_grad_norm)
        self.copilot_weight_decay = _pick(copilot_weight_decay, a, "copilot_weight_decay", a.weight_decay)
        lr = self.copilot_learning_rate
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0):
            raise ValueError(f"copilot_learning_rate: expected a finite number >= 0, got {lr!r}")
        if a.n_gpu > 1:
            raise ValueError(
                f"args: {a.n_gpu} GPUs in one process would use torch DataParallel, which CopilotTrainer does not "
                "support; launch one process per GPU (torchrun / accelerate launch) for DDP"
            )
        if core.copilot is None:
            raise ValueError(
                "model: the TransformerCopilot has no Copilot; train a Pilot alone with transformers.Trainer"
            )
        # The model takes num_items_in_batch (count the step's tokens, pass them on) and shifts labels inside
        # (count labels[..., 1:]). Both attributes exist in transformers 5.17 and 5.2x.
        self.model_accepts_loss_kwargs = True
        self._loss_shifts_labels = True
        self._tc_sums: dict[str, torch.Tensor] = {}
        self._tc_last_logged: int | None = None
        self._tc_grad_norms: dict[str, torch.Tensor] = {}  # the last clipping's norms, read when logged
        self._tc_copilot_lr: float | None = None
        self._tc_copilot_groups: list[int] = []

    # ------------------------------------------------------------------ activation checkpointing
    def train(self, *args, **kwargs):
        """``transformers.Trainer.train``; with ``args.activation_checkpointing`` (``gradient_checkpointing`` in older
        versions; TRL's ``SFTConfig`` turns it on by default) checkpointing is enabled on the Pilot's decoder layers,
        since the stock Trainer would call ``activation_checkpointing_enable`` on the pair, which has none. The
        Copilot keeps its activations (it is small). Losses and gradients are unchanged."""
        a = self.args
        names = [n for n in _CHECKPOINTING_FLAGS if getattr(a, n, False)]
        if not names:
            return super().train(*args, **kwargs)
        _enable_pilot_checkpointing(_core(self.model).pilot, a)
        try:
            for n in names:
                setattr(a, n, False)
            return super().train(*args, **kwargs)
        finally:
            for n in names:
                setattr(a, n, True)

    # ------------------------------------------------------------------ optimizer
    def create_optimizer(self, model=None):
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model if model is None else model
        core = _core(opt_model)
        decay = set(self.get_decay_parameter_names(core))
        groups, copilot_groups = [], []
        for part, lr, wd in (("pilot", self.args.learning_rate, self.args.weight_decay),
                             ("copilot", self.copilot_learning_rate, self.copilot_weight_decay)):
            named = [(n, p) for n, p in core.named_parameters() if n.startswith(part + ".") and p.requires_grad]
            for with_decay in (True, False):
                params = [p for n, p in named if (n in decay) == with_decay]
                if params:
                    if part == "copilot":
                        copilot_groups.append(len(groups))
                    groups.append({"params": params, "lr": lr, "weight_decay": wd if with_decay else 0.0})
        if self.optimizer_cls_and_kwargs is not None:
            cls, kw = self.optimizer_cls_and_kwargs
        else:
            cls, kw = self.get_optimizer_cls_and_kwargs(self.args, core)
        kw = dict(kw)
        if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)) or {"params", "model",
                                                                                     "optimizer_dict"} & set(kw):
            raise ValueError(
                f"optim: CopilotTrainer needs an optimizer that takes parameter groups (e.g. adamw_torch), "
                f"got {self.args.optim!r}"
            )
        self.optimizer = cls(groups, **kw)
        self._tc_copilot_groups = copilot_groups
        return self.optimizer

    # ------------------------------------------------------------------ loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        if num_items_in_batch is not None:
            # a step whose labels are all ignored counts 0 tokens; its loss is 0 whatever the divisor
            if isinstance(num_items_in_batch, torch.Tensor):
                num_items_in_batch = num_items_in_batch.clamp(min=1)
            else:
                num_items_in_batch = max(1, int(num_items_in_batch))
            inputs["num_items_in_batch"] = num_items_in_batch
        out = model(**inputs)
        pilot_loss, copilot_loss = out.pilot_loss, out.copilot_loss
        if copilot_loss is None:
            copilot_loss = pilot_loss.new_zeros(())
        counted = num_items_in_batch is not None
        across = getattr(self.args, "average_tokens_across_devices", False)
        if counted and across and self.accelerator.num_processes > 1:
            # num_items_in_batch counts every rank's tokens and DDP averages gradients over ranks: undo the mean
            # (as the stock Trainer does), so the Pilot's gradient is the global token sum / global count.
            pilot_loss = pilot_loss * self.accelerator.num_processes
        if model.training:
            steps = getattr(self, "current_gradient_accumulation_steps", 1) or 1
            if counted:  # the Pilot's part is already a share of the whole step's token mean
                pilot_part, copilot_part = pilot_loss, copilot_loss / steps
                loss = pilot_part + copilot_part
            else:  # no token count (no labels in the batch): per-micro-batch means, the Trainer divides by steps
                pilot_part, copilot_part = pilot_loss / steps, copilot_loss / steps
                loss = pilot_loss + copilot_loss
            # transformers 5.2x reads this after compute_loss; 5.17 decides the same from
            # model_accepts_loss_kwargs (True) and whether num_items_in_batch is None.
            self.loss_is_scaled_for_ga = counted
            self._accumulate(pilot_part.detach(), copilot_part.detach())
        else:
            loss = pilot_loss + copilot_loss
        if return_outputs:
            return loss, {"loss": loss, "pilot_loss": pilot_loss.detach(), "copilot_loss": copilot_loss.detach()}
        return loss

    def _accumulate(self, pilot: torch.Tensor, copilot: torch.Tensor) -> None:
        if self._tc_last_logged is None:
            self._tc_last_logged = self.state.global_step
        for name, value in (("pilot_loss", pilot), ("copilot_loss", copilot)):
            prev = self._tc_sums.get(name)
            self._tc_sums[name] = value.float() if prev is None else prev + value.float()
        if self.optimizer is not None and self._tc_copilot_groups:
            self._tc_copilot_lr = float(self.optimizer.param_groups[self._tc_copilot_groups[0]]["lr"])

    # ------------------------------------------------------------------ clipping
    def _clip_grad_norm(self, model):
        from accelerate.utils import DistributedType

        acc = self.accelerator
        fsdp1 = self.is_fsdp_enabled and not getattr(acc, "is_fsdp2", False)
        if acc.distributed_type == DistributedType.DEEPSPEED or fsdp1 or hasattr(self.optimizer, "clip_master_grads"):
            return super()._clip_grad_norm(model)
        acc.unscale_gradients()  # once for both models (a GradScaler refuses a second unscale_ per step)
        core = _core(model)
        norms = {}
        for name, module, max_norm in (("pilot", core.pilot, self.args.max_grad_norm),
                                       ("copilot", core.copilot, self.copilot_max_grad_norm)):
            params = [p for p in module.parameters() if p.grad is not None]
            if not params:
                norms[name] = torch.zeros((), device=self.args.device)
                continue
            limit = max_norm if max_norm is not None and max_norm > 0 else float("inf")
            norm = torch.nn.utils.clip_grad_norm_(params, limit)
            norms[name] = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        self._tc_grad_norms = norms  # read in log(): no host read between logging steps
        return torch.sqrt(norms["pilot"].float() ** 2 + norms["copilot"].float().to(norms["pilot"].device) ** 2)

    # ------------------------------------------------------------------ logging
    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs and self._tc_sums and self._tc_last_logged is not None:
            steps = self.state.global_step - self._tc_last_logged
            # the logged values, read from the device together (one host read per logging step)
            names, values = [], []
            if steps > 0:
                for name, total in self._tc_sums.items():
                    names.append(name)
                    values.append(self.accelerator.gather(total.reshape(1)).mean())
                self._tc_sums = {}
                self._tc_last_logged = self.state.global_step
            n_sums = len(names)
            for name, value in self._tc_grad_norms.items():
                names.append(f"grad_norm_{name}")
                values.append(value)
            if values:
                dev = values[0].device
                read = torch.stack([v.detach().to(dev, torch.float64).reshape(()) for v in values]).tolist()
                for i, (name, value) in enumerate(zip(names, read)):
                    logs[name] = value / steps if i < n_sums else value  # the sums first, then the norms
            if self._tc_copilot_lr is not None:
                logs["copilot_learning_rate"] = self._tc_copilot_lr
        super().log(logs, *args, **kwargs)

    # ------------------------------------------------------------------ checkpoints
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        save_checkpoint(self.accelerator.unwrap_model(self.model), output_dir, state_dict)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            raise ValueError(
                "resume_from_checkpoint: resuming CopilotTrainer under FSDP/DeepSpeed is not implemented yet; "
                "load the weights with tcopilot.integrations.load_checkpoint and start a new run"
            )
        load_checkpoint(self.accelerator.unwrap_model(model if model is not None else self.model),
                        resume_from_checkpoint)

    def _load_best_model(self) -> None:
        self._load_from_checkpoint(self.state.best_model_checkpoint)


_CHECKPOINTING_FLAGS = ("activation_checkpointing", "gradient_checkpointing")  # transformers >= 5.2x, older


def _enable_pilot_checkpointing(pilot: nn.Module, args) -> None:
    kw = dict(getattr(args, "activation_checkpointing_kwargs", None)
              or getattr(args, "gradient_checkpointing_kwargs", None) or {})
    enable = getattr(pilot, "activation_checkpointing_enable", None)
    if enable is not None:
        every, offload = kw.pop("every_n_layers", 1), kw.pop("offload", False)
        enable(activation_checkpointing_kwargs=kw or None, every_n_layers=every, offload=offload)
    elif callable(getattr(pilot, "gradient_checkpointing_enable", None)):
        pilot.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw or None)
    else:
        raise ValueError(
            f"activation_checkpointing: the Pilot ({type(pilot).__name__}) has no activation_checkpointing_enable; "
            "set activation_checkpointing=False (gradient_checkpointing=False in older transformers)"
        )


def _pick(value, args, name, default):
    if value is not None:
        return value
    from_args = getattr(args, name, None)
    return from_args if from_args is not None else default


__all__ = ["COPILOT_DIR", "CopilotTrainer", "load_checkpoint", "save_checkpoint"]
