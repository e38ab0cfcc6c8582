"""Joint training of a Pilot and a Copilot (paper, Algorithm 1) in online log mode.

One Pilot forward and one backward per micro-batch serve both models: :class:`TransformerCopilot`
returns ``pilot_loss + copilot_loss`` whose gradients reach disjoint parameters (the log is detached).
Two AdamW optimisers with linear warm-up + cosine decay and separate learning rates step after each
optimisation step; gradients are clipped per model.

Gradient accumulation: the Pilot's loss is normalised by the number of counted tokens of the whole
optimisation step (``num_items_in_batch``), so accumulating k micro-batches equals one big batch
exactly. The Copilot's RMSE is not additive over tokens; its micro-batch losses are averaged.

Runs are resumable: ``run_dir/checkpoint-<step>/`` holds both models (safetensors), both optimisers,
schedulers, the torch CPU RNG state and the step (the last ``keep_checkpoints`` are kept); the data order is a
pure function of (seed, step), so a resumed run continues with exactly the batches it would have seen.

Mistake Log: with ``keep_log=True`` (or a model that already holds a :class:`tcopilot.MistakeLog`, as
``log_mode="replay"`` does) every forward pushes its compressed log; checkpoints hold it in
``checkpoint-<step>/mistake_log/`` (so a resumed run continues with the same buffer and sampler state), the
finished run writes ``run_dir/mistake_log/`` for ``tcopilot inspect``, and ``metrics.jsonl`` gains the
step's mean error mass ``1 - p(y)`` and the top-k residual mass.

Several processes (``torchrun``, ``accelerate launch``): when ``torch.distributed`` is initialised, or when
``WORLD_SIZE > 1`` is set (the :class:`Trainer` then calls :func:`init_distributed`), the model is wrapped in
DDP (``TrainConfig.distributed="ddp"``, the default) or sharded with FSDP2 (``"fsdp2"``: ``fully_shard`` on each
decoder layer of the Pilot and of the Copilot, then on the :class:`TransformerCopilot` root, the plan of
``tests/integrations/test_fsdp2.py``). The model stays on the device it was given (CPU: gloo; CUDA: nccl, after
moving the model to ``cuda:LOCAL_RANK``). What each piece means with ``W`` ranks:

- **Data**: ``batch_size`` is the *global* batch. Every rank draws the same :func:`batch_indices` and collates
  the whole global batch (so padding is the single-process run's), then keeps the *contiguous* rows
  ``[rank * B/W, (rank + 1) * B/W)`` and splits them into ``grad_accum`` micro-batches. Rank ``r``'s micro-batch
  ``k`` is therefore micro-batch ``r * grad_accum + k`` of one process running ``grad_accum * W`` micro-batches.
  ``batch_size`` must be a multiple of ``grad_accum * W``.
- **Pilot loss**: ``num_items_in_batch`` is the counted tokens of the whole global batch (every rank holds the
  global batch, so this is the all-reduced count without a collective). DDP and FSDP2 average gradients over
  ranks, so each rank backpropagates ``W * pilot_loss``: the Pilot's loss and gradients are the token mean of
  the global batch, exactly one process's (any ``grad_accum``).
- **Copilot loss**: its token RMSE is not additive over rows; each micro-batch's RMSE is divided by
  ``grad_accum`` and the gradient averaging divides by ``W``, so the Copilot trains on the mean of the
  ``grad_accum * W`` micro-batch RMSEs: exactly one process with ``grad_accum * W`` accumulation steps (the
  same rows in the same micro-batches), not one process with ``grad_accum``.
- **Gradient accumulation**: gradients cross ranks once per step, after the last micro-batch (DDP: ``no_sync``
  before it; FSDP2: ``set_requires_gradient_sync(False)``, so each rank holds its unsharded gradient sum until
  the last micro-batch's reduce-scatter: more memory per rank, ``grad_accum`` times less traffic).
- **Logs**: ``pilot_loss`` is the all-reduced sum of the ranks' shares (the global token mean),
  ``copilot_loss`` the all-reduced mean of the ranks' values, ``tokens`` the global count; gradient norms are
  those of the full gradients (DDP: replicated after the all-reduce; FSDP2: DTensor norms, reduced), so per-model
  clipping acts as in one process. The logged values are read (and all-reduced) only at logging steps
  (:meth:`Trainer.train`), on every rank. Only rank 0 writes ``config.json``, ``metrics.jsonl``, checkpoints and the
  progress bar; ``eval_fn`` runs on every rank (under FSDP2 its forwards are collectives), rank 0 logs it.
- **Checkpoints** hold full, unsharded state in the single-process files (``pilot.safetensors``,
  ``copilot.safetensors``, ``optimizer.pt`` with index-keyed ``torch.optim`` state dicts), so a checkpoint
  written with any world size and either wrapper resumes with any other (including one process). DDP:
  everything is replicated and rank 0 saves. FSDP2: parameters and optimizer moments are gathered
  (``DTensor.full_tensor``, a collective on every rank) and rank 0 saves; on resume every rank reads the full
  files and keeps its shard. Checkpoints must be on a file system every rank can read (rank 0 picks the
  checkpoint to resume and tells the others).
- **Mistake Log**: each rank records its own rows in its own buffer; the step's ``error_mass`` /
  ``topk_residual`` in ``metrics.jsonl`` are token-weighted means over all ranks, but checkpoints and
  ``run_dir/mistake_log/`` hold rank 0's buffer only, and a resumed run gives every rank that buffer.
  (``log_mode="replay"`` therefore continues from rank 0's entries on every rank after a resume.)

The Trainer never destroys the process group (a script may train several models); call
``torch.distributed.destroy_process_group()`` at the end, as ``tcopilot train`` does.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from tqdm.auto import tqdm

from tcopilot.data.prompts import collate
from tcopilot.mistake_log import MistakeLog

DISTRIBUTED = ("ddp", "fsdp2")


@dataclass
class TrainConfig:
    """Settings of :class:`Trainer` (``tcopilot train`` sets ``steps``, ``batch_size``, ``grad_accum``, ``seed``,
    the learning rates and ``distributed`` from its flags).

    ``batch_size`` is the examples of one optimisation step (the global batch under several processes), split
    into ``grad_accum`` micro-batches. Learning rates warm up linearly over ``warmup_steps``, then follow a cosine
    down to ``min_lr_ratio`` times the peak; ``clip_pilot`` / ``clip_copilot`` clip each model's gradient norm.
    ``metrics.jsonl`` gets a record every ``log_every`` steps and at the last one, ``eval_fn`` runs every
    ``eval_every`` steps (0: never during training), a checkpoint is written every ``ckpt_every`` steps (0: never)
    and the last ``keep_checkpoints`` are kept. ``keep_log`` and ``log_*`` size the :class:`tcopilot.MistakeLog` the
    Trainer creates (see the module docstring). :meth:`validate` raises ``ValueError`` on bad values.
    """

    steps: int = 300
    batch_size: int = 32
    grad_accum: int = 1
    lr_pilot: float = 1e-3
    lr_copilot: float = 1e-3
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    clip_pilot: float = 1.0
    clip_copilot: float = 1.0
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0 = only at the end
    ckpt_every: int = 100
    keep_checkpoints: int = 2
    padding_side: str = "right"
    # Mistake Log (tcopilot.MistakeLog): kept when keep_log or when the model already holds one.
    keep_log: bool = False
    log_steps: int = 128  # R: steps kept in the replay buffer (entries = log_steps * grad_accum)
    log_max_bytes: int = 1 << 30
    log_topk: int = 32
    log_pooled_dtype: str = "bfloat16"
    # Under torchrun / accelerate launch (several processes): "ddp" or "fsdp2"; ignored in one process.
    distributed: str = "ddp"

    def validate(self) -> None:
        for name in ("steps", "batch_size", "grad_accum"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
        if self.batch_size % self.grad_accum:
            raise ValueError(
                f"batch_size: expected a multiple of grad_accum={self.grad_accum}, got {self.batch_size}"
            )
        for name in ("lr_pilot", "lr_copilot"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name}: expected a finite number > 0, got {v!r}")
        if self.distributed not in DISTRIBUTED:
            raise ValueError(f"distributed: expected one of {DISTRIBUTED}, got {self.distributed!r}")


def cosine_with_warmup(warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    return f


def batch_indices(n_examples: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Indices of the examples of optimisation ``step``: epochs of seeded permutations, no state."""
    per_epoch = max(1, n_examples // batch_size)
    epoch, k = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n_examples, generator=g)
    return perm[k * batch_size : (k + 1) * batch_size].tolist()


def dist_info() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialised default process group, ``(0, 1)`` without one."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed() -> tuple[int, int]:
    """Initialise the default process group when launched with ``WORLD_SIZE > 1`` (torchrun, accelerate launch)
    and none exists yet; returns ``(rank, world_size)`` (``(0, 1)`` in a plain single process).

    Backend: ``gloo`` without CUDA; with CUDA, ``cpu:gloo,cuda:nccl`` (nccl for CUDA tensors, gloo for CPU
    ones, so a model left on the CPU still works) and the current CUDA device is set to ``LOCAL_RANK``.
    """
    dist = torch.distributed
    if not dist.is_available():
        return 0, 1
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return 0, 1
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("cpu:gloo,cuda:nccl")
        else:
            dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def barrier() -> None:
    """``torch.distributed.barrier()`` when a process group is initialised; nothing otherwise."""
    if dist_info()[1] > 1:
        torch.distributed.barrier()


def _is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor" and hasattr(t, "full_tensor")


def full_state_dict(module: torch.nn.Module, keep: bool = True) -> dict:
    """The unsharded state dict of ``module`` on the CPU: FSDP2 shards (DTensors) are gathered with
    ``full_tensor()``, a collective, so every rank must call this; ``keep=False`` (ranks > 0) gathers and returns
    ``{}``. Names that alias one tensor (tied weights) map to one CPU tensor, as in ``module.state_dict()``."""
    out, seen = {}, {}
    for name, t in module.state_dict(keep_vars=True).items():
        if id(t) not in seen:
            v = t.detach()
            if _is_dtensor(v):
                v = v.full_tensor()
            seen[id(t)] = v.cpu() if keep else None
        if keep:
            out[name] = seen[id(t)]
    return out


def _save_state(state: dict, path: str) -> None:
    """Write a full state dict as ``safetensors.torch.save_model`` writes the module: of names sharing one tensor
    the first in sorted order is kept (the others are recorded in the metadata), tensors made contiguous."""
    groups: dict[int, list[str]] = {}
    for name, t in state.items():
        groups.setdefault(id(t), []).append(name)
    state, metadata = dict(state), None
    for names in groups.values():
        keep, *drop = sorted(names)
        for name in drop:
            metadata = metadata or {}
            metadata[name] = keep
            del state[name]
    save_file({k: v.contiguous() for k, v in state.items()}, path, metadata=metadata)


def _load_sharded(module: torch.nn.Module, path: str) -> None:
    """Load a file written by ``save_model`` / :func:`_save_state` into an FSDP2-sharded ``module``: every rank
    reads the full tensors and keeps its own shard (``distribute_tensor`` without communication)."""
    from torch.distributed.tensor import distribute_tensor

    full = load_file(path)
    current = module.state_dict(keep_vars=True)
    groups: dict[int, list[str]] = {}
    for name, t in current.items():
        groups.setdefault(id(t), []).append(name)
    for names in groups.values():  # a tied weight is stored under one of its names
        present = [n for n in names if n in full]
        if present:
            for n in names:
                full.setdefault(n, full[present[0]])
    missing = sorted(set(current) - set(full))
    unexpected = sorted(set(full) - set(current))
    if missing or unexpected:
        raise ValueError(f"{path}: missing keys {missing}, unexpected keys {unexpected}")
    new = {}
    for name, t in current.items():
        v = full[name].to(device=t.device, dtype=t.dtype)
        new[name] = distribute_tensor(v, t.device_mesh, t.placements, src_data_rank=None) if _is_dtensor(t) else v
    module.load_state_dict(new)


def _full_optim_state(opt: torch.optim.Optimizer, keep: bool = True) -> dict:
    """``opt.state_dict()`` with DTensor moments gathered to full CPU tensors (a collective under FSDP2)."""
    sd = opt.state_dict()
    state = {}
    for i in sorted(sd["state"]):
        row = {}
        for k, v in sd["state"][i].items():
            if _is_dtensor(v):
                v = v.full_tensor()
            row[k] = v.cpu() if isinstance(v, torch.Tensor) else v
        state[i] = row
    return {"state": state, "param_groups": sd["param_groups"]} if keep else {}


def _load_optim_sharded(opt: torch.optim.Optimizer, sd: dict) -> None:
    """Load an index-keyed full optimizer state dict into an optimizer over FSDP2 (DTensor) parameters."""
    from torch.distributed.tensor import distribute_tensor

    params = [p for g in opt.param_groups for p in g["params"]]
    state = {}
    for i, row in sd["state"].items():
        p = params[i]
        state[i] = {
            k: distribute_tensor(v.to(device=p.device, dtype=p.dtype), p.device_mesh, p.placements, src_data_rank=None)
            if _is_dtensor(p) and isinstance(v, torch.Tensor) and v.shape == p.shape else v
            for k, v in row.items()
        }
    opt.load_state_dict({"state": state, "param_groups": sd["param_groups"]})


def fsdp2_shard(model, mesh) -> None:
    """The FSDP2 plan: ``fully_shard`` each decoder layer of the Pilot and of the Copilot, then the
    :class:`TransformerCopilot` root (whose pre-forward gathers the LM head and the Copilot's head weights,
    which the fused ops read without calling their modules)."""
    from torch.distributed.fsdp import fully_shard

    from tcopilot.pilot import find_decoder_layers

    for layer in find_decoder_layers(model.pilot):
        fully_shard(layer, mesh=mesh)
    if model.copilot is not None:
        for layer in model.copilot.layers:
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def _full(t: torch.Tensor) -> torch.Tensor:
    """A gradient norm as a plain tensor (FSDP2's is a DTensor: its full value, a collective but no host read)."""
    return t.full_tensor() if _is_dtensor(t) else t


# Where a pending record (Trainer._accumulate) puts the Mistake Log's statistics, read with the record.
_LOG_STATS = "_log_stats"


class Trainer:
    """Trains ``model`` (a :class:`TransformerCopilot`) on encoded examples (``input_ids``/``labels`` lists).

    Args:
        model: the :class:`TransformerCopilot`, already on its device (its ``copilot`` may be None).
        examples: dicts with ``input_ids`` and ``labels`` lists; at least ``config.batch_size`` of them.
        config: a :class:`TrainConfig` (validated here).
        run_dir: where ``config.json``, ``metrics.jsonl``, checkpoints and ``mistake_log/`` go (created).
        pad_token_id: the id padding the collated batches.
        eval_fn: ``eval_fn(model, step) -> dict``, run every ``config.eval_every`` steps; its values are logged
            as ``eval/<key>``.
        progress: show a progress bar (rank 0 only).

    Raises:
        ValueError: a bad ``config``, fewer examples than ``batch_size``, or (several processes) a
            ``batch_size`` that is not a multiple of ``grad_accum * world_size``.

    In several processes (see the module docstring) every rank builds the same model, examples and config;
    the Trainer wraps the model in DDP or shards it with FSDP2 (``config.distributed``) before creating the
    optimisers. ``self.model`` stays the :class:`TransformerCopilot` (under FSDP2 with sharded parameters).
    """

    def __init__(self, model, examples: list[dict], config: TrainConfig, run_dir: str, *,
                 pad_token_id: int = 0, eval_fn: Callable | None = None, progress: bool = True):
        config.validate()
        if len(examples) < config.batch_size:
            raise ValueError(
                f"examples: expected at least batch_size={config.batch_size} examples, got {len(examples)}"
            )
        self.model, self.examples, self.cfg = model, examples, config
        self.run_dir, self.pad_token_id = run_dir, pad_token_id
        self.eval_fn, self.progress = eval_fn, progress
        self.rank, self.world = init_distributed()
        self._ddp = None
        if self.world > 1:
            if config.batch_size % (config.grad_accum * self.world):
                raise ValueError(
                    f"batch_size: expected a multiple of grad_accum * world_size = {config.grad_accum} * "
                    f"{self.world}, got {config.batch_size}"
                )
            dev = self._device
            if config.distributed == "fsdp2":
                from torch.distributed.device_mesh import init_device_mesh

                fsdp2_shard(model, init_device_mesh(dev.type, (self.world,)))
            else:
                from torch.nn.parallel import DistributedDataParallel

                self._ddp = DistributedDataParallel(model, device_ids=[dev] if dev.type == "cuda" else None)
        os.makedirs(run_dir, exist_ok=True)
        sched = cosine_with_warmup(config.warmup_steps, config.steps, config.min_lr_ratio)
        self.opt_pilot = torch.optim.AdamW(
            model.pilot.parameters(), lr=config.lr_pilot, weight_decay=config.weight_decay
        )
        self.sched_pilot = torch.optim.lr_scheduler.LambdaLR(self.opt_pilot, sched)
        self.opt_copilot = self.sched_copilot = None
        if model.copilot is not None:
            self.opt_copilot = torch.optim.AdamW(
                model.copilot.parameters(), lr=config.lr_copilot, weight_decay=config.weight_decay
            )
            self.sched_copilot = torch.optim.lr_scheduler.LambdaLR(self.opt_copilot, sched)
        self.step = 0
        self.step_times: list[float] = []
        if getattr(model, "mistake_log", None) is None and config.keep_log:
            model.mistake_log = MistakeLog(
                capacity=config.log_steps * config.grad_accum, max_bytes=config.log_max_bytes,
                topk=config.log_topk, pooled_dtype=config.log_pooled_dtype, seed=config.seed,
            )

    @property
    def mistake_log(self) -> MistakeLog | None:
        return getattr(self.model, "mistake_log", None)

    @property
    def _net(self) -> torch.nn.Module:
        """What the forward runs through: the DDP wrapper, or the model itself (one process, FSDP2)."""
        return self.model if self._ddp is None else self._ddp

    @property
    def _fsdp(self) -> bool:
        return self.world > 1 and self.cfg.distributed == "fsdp2"

    def full_state_dict(self) -> dict:
        """The model's full state dict (keys ``pilot.*`` / ``copilot.*``) on rank 0; ``{}`` on other ranks under
        FSDP2. Under FSDP2 a collective: call it on every rank."""
        if self._fsdp:
            return full_state_dict(self.model, keep=self.rank == 0)
        return self.model.state_dict()

    # ------------------------------------------------------------------ checkpoints
    def _ckpt_dirs(self) -> list[tuple[int, str]]:
        out = []
        for name in os.listdir(self.run_dir):
            if name.startswith("checkpoint-") and name[11:].isdigit():
                path = os.path.join(self.run_dir, name)
                if os.path.exists(os.path.join(path, "state.json")):
                    out.append((int(name[11:]), path))
        return sorted(out)

    def save_checkpoint(self) -> str:
        """Write ``run_dir/checkpoint-<step>/``. In several processes call it on every rank: rank 0 writes
        (under FSDP2 after gathering full tensors, a collective), then all ranks meet at a barrier."""
        final = os.path.join(self.run_dir, f"checkpoint-{self.step}")
        if self.world > 1:
            self._save_checkpoint_distributed(final)
            barrier()
            return final
        tmp = final + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        save_model(self.model.pilot, os.path.join(tmp, "pilot.safetensors"))
        opt = {"pilot": self.opt_pilot.state_dict(), "sched_pilot": self.sched_pilot.state_dict()}
        if self.model.copilot is not None:
            save_model(self.model.copilot, os.path.join(tmp, "copilot.safetensors"))
            opt["copilot"] = self.opt_copilot.state_dict()
            opt["sched_copilot"] = self.sched_copilot.state_dict()
        opt["rng"] = torch.get_rng_state()
        torch.save(opt, os.path.join(tmp, "optimizer.pt"))
        self._finish_checkpoint(tmp, final)
        return final

    def _finish_checkpoint(self, tmp: str, final: str) -> None:
        if self.mistake_log is not None:
            self.mistake_log.save(os.path.join(tmp, "mistake_log"))
        # state.json last: a checkpoint without it is incomplete and ignored on resume.
        with open(os.path.join(tmp, "state.json"), "w") as fh:
            json.dump({"step": self.step, "config": asdict(self.cfg)}, fh)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for _, old in self._ckpt_dirs()[: -self.cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)

    def _save_checkpoint_distributed(self, final: str) -> None:
        keep = self.rank == 0
        model = self.model
        if self._fsdp:  # every rank takes part in the gathers; rank 0 keeps the full tensors
            pilot = full_state_dict(model.pilot, keep)
            copilot = full_state_dict(model.copilot, keep) if model.copilot is not None else None
            opt = {"pilot": _full_optim_state(self.opt_pilot, keep)}
            if model.copilot is not None:
                opt["copilot"] = _full_optim_state(self.opt_copilot, keep)
        if not keep:
            return
        tmp = final + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        if self._fsdp:
            _save_state(pilot, os.path.join(tmp, "pilot.safetensors"))
            if copilot is not None:
                _save_state(copilot, os.path.join(tmp, "copilot.safetensors"))
        else:  # DDP: weights and optimizer state are replicated, rank 0's are everyone's
            save_model(model.pilot, os.path.join(tmp, "pilot.safetensors"))
            opt = {"pilot": self.opt_pilot.state_dict()}
            if model.copilot is not None:
                save_model(model.copilot, os.path.join(tmp, "copilot.safetensors"))
                opt["copilot"] = self.opt_copilot.state_dict()
        opt["sched_pilot"] = self.sched_pilot.state_dict()
        if model.copilot is not None:
            opt["sched_copilot"] = self.sched_copilot.state_dict()
        opt["rng"] = torch.get_rng_state()
        torch.save(opt, os.path.join(tmp, "optimizer.pt"))
        self._finish_checkpoint(tmp, final)

    def maybe_resume(self) -> bool:
        ckpts = self._ckpt_dirs()
        if self.world > 1:  # rank 0 decides, so every rank resumes from the same checkpoint (or none)
            pick = [ckpts[-1] if ckpts else None]
            torch.distributed.broadcast_object_list(pick, src=0)
            ckpts = [pick[0]] if pick[0] is not None else []
        if not ckpts:
            return False
        step, path = ckpts[-1]
        opt = torch.load(os.path.join(path, "optimizer.pt"), weights_only=False)
        parts = [("pilot", self.model.pilot, self.opt_pilot, self.sched_pilot)]
        if self.model.copilot is not None:
            parts.append(("copilot", self.model.copilot, self.opt_copilot, self.sched_copilot))
        for name, module, optim, sched in parts:
            weights = os.path.join(path, f"{name}.safetensors")
            if self._fsdp:  # full tensors on disk; each rank keeps its shard
                _load_sharded(module, weights)
                _load_optim_sharded(optim, opt[name])
            else:
                load_model(module, weights)
                optim.load_state_dict(opt[name])
            sched.load_state_dict(opt[f"sched_{name}"])
        torch.set_rng_state(opt["rng"])
        log_dir = os.path.join(path, "mistake_log")
        if self.mistake_log is not None and os.path.isdir(log_dir):
            self.mistake_log.load_state_dict(MistakeLog.load(log_dir).state_dict())
        self.step = step
        return True

    def save_log(self) -> str | None:
        """Write the Mistake Log (if any) to ``run_dir/mistake_log/``; returns that directory. In several
        processes only rank 0 writes (its own buffer) and the others return ``None``."""
        if self.mistake_log is None or self.rank != 0:
            return None
        out = os.path.join(self.run_dir, "mistake_log")
        self.mistake_log.save(out)
        return out

    # ------------------------------------------------------------------ the loop
    def _log(self, record: dict) -> None:
        if self.rank != 0:
            return
        with open(os.path.join(self.run_dir, "metrics.jsonl"), "a") as fh:
            fh.write(json.dumps(record) + "\n")

    def accumulate_gradients(self) -> dict:
        """Forward and backward every micro-batch of the current step; gradients are left in ``.grad``. Returns
        the step's record (``step``, ``pilot_loss``, ``tokens``, ...), read from the device (see :meth:`train`).

        In several processes: this rank's contiguous slice of the global batch (module docstring); the
        gradients left are the averaged ones (DDP: after its all-reduce; FSDP2: the local shards)."""
        return self._read_record(self._accumulate())

    def _accumulate(self) -> dict:
        """:meth:`accumulate_gradients` with the record left pending: its losses stay tensors on the device and
        the Mistake Log's statistics unread, for :meth:`_read_record`. The host reads of the step are the
        forwards' own (one each: the range check of the ids and labels) and two of host tensors (the batch's
        indices and its token count, counted on the collated batch before it goes to the device)."""
        cfg, model = self.cfg, self.model
        self._net.train()
        idx = batch_indices(len(self.examples), cfg.batch_size, cfg.seed, self.step)
        batch = collate([self.examples[i] for i in idx], self.pad_token_id, padding_side=cfg.padding_side)
        n_items = int((batch["labels"][:, 1:] != -100).sum())  # a CPU tensor: no synchronisation
        world = self.world
        if world > 1:
            rows = cfg.batch_size // world
            batch = {k: v[self.rank * rows : (self.rank + 1) * rows] for k, v in batch.items()}
        micro = cfg.batch_size // (cfg.grad_accum * world)
        dev = self._device
        # CUDA: pinned memory and asynchronous copies (a copy from pageable memory waits for the device)
        copy_async = dev.type == "cuda"
        if copy_async:
            batch = {k: v.pin_memory() for k, v in batch.items()}
        # detached running sums, read with the record: no host sync between micro-batches
        p_sum = torch.zeros((), dtype=torch.float64, device=dev)
        c_sum = torch.zeros_like(p_sum)
        log = self.mistake_log
        if log is not None:
            log.next_step = self.step + 1
        for k in range(cfg.grad_accum):
            sl = slice(k * micro, (k + 1) * micro)
            # reduce gradients across ranks once, after the last micro-batch
            with self._gradient_sync(last_micro=k == cfg.grad_accum - 1):
                out = self._net(
                    batch["input_ids"][sl].to(dev, non_blocking=copy_async),
                    attention_mask=batch["attention_mask"][sl].to(dev, non_blocking=copy_async),
                    labels=batch["labels"][sl].to(dev, non_blocking=copy_async),
                    num_items_in_batch=max(1, n_items),
                )
                # world > 1: DDP / FSDP2 average gradients over ranks; undo it for the Pilot's token-sum share
                loss = out.pilot_loss if world == 1 else out.pilot_loss * world
                if out.copilot_loss is not None:
                    loss = loss + out.copilot_loss / cfg.grad_accum
                    c_sum += out.copilot_loss.detach().double() / cfg.grad_accum
                loss.backward()
            p_sum += out.pilot_loss.detach().double()
        rec = {"step": self.step + 1, "pilot_loss": p_sum, "tokens": n_items}
        if model.copilot is not None:
            rec["copilot_loss"] = c_sum
        if log is not None:
            rec[_LOG_STATS] = log.nbytes
        return rec

    def _read_record(self, pending: dict) -> dict:
        """The record of a pending one (:meth:`_accumulate`, :meth:`_train_step`): its tensors read in one host
        read, the Mistake Log's statistics of its step (``error_mass``, ``topk_residual``, ``log_bytes``; the log's
        :meth:`~tcopilot.MistakeLog.step_stats`, which folds in its pending pushes: one more read) and, in several
        processes, the logged values all-reduced (a collective: every rank reads the same records)."""
        names = [k for k, v in pending.items() if isinstance(v, torch.Tensor)]
        read = {}
        if names:
            dev = pending[names[0]].device
            values = torch.stack([pending[k].detach().to(dev, torch.float64) for k in names]).tolist()
            read = dict(zip(names, values))
        p_sum, c_sum = read.get("pilot_loss", 0.0), read.get("copilot_loss", 0.0)
        with_log = _LOG_STATS in pending
        stats = self.mistake_log.step_stats(pending["step"]) if with_log and self.mistake_log is not None else None
        if self.world > 1:
            p_sum, c_sum, stats = self._reduce_logs(p_sum, c_sum, stats, with_log)
            read.update(pilot_loss=p_sum, **({"copilot_loss": c_sum} if "copilot_loss" in read else {}))
        rec = {}
        for k, v in pending.items():
            if k != _LOG_STATS:
                rec[k] = read.get(k, v)
            elif stats is not None:
                rec.update(error_mass=stats["err_mass"], topk_residual=stats["residual"], log_bytes=v)
        return rec

    def _gradient_sync(self, last_micro: bool):
        """Context for one micro-batch's forward and backward: with several ranks, gradients are reduced
        only in the last one (DDP: ``no_sync`` before it; FSDP2: ``set_requires_gradient_sync(False)``, which
        keeps the unsharded gradients locally and reduce-scatters their sum once)."""
        if self._fsdp:
            self.model.set_requires_gradient_sync(last_micro)
            return contextlib.nullcontext()
        if self._ddp is None or last_micro:
            return contextlib.nullcontext()
        return self._ddp.no_sync()

    def _reduce_logs(self, p_sum: float, c_sum: float, stats: dict | None, with_log: bool):
        """All-reduce the step's logged values: the Pilot's shares summed (the global token mean), the
        Copilot's averaged over ranks, the Mistake Log's means weighted by each rank's counted tokens."""
        n = stats["tokens"] if stats is not None else 0
        vals = [p_sum, c_sum]
        if with_log:
            vals += [stats["err_mass"] * n, stats["residual"] * n, n] if stats is not None else [0.0, 0.0, 0]
        t = torch.tensor(vals, dtype=torch.float64)
        if self._device.type == "cuda" and torch.distributed.get_backend() == "nccl":
            t = t.to(self._device)
        torch.distributed.all_reduce(t)
        t = t.cpu().tolist()
        out_stats = None
        if with_log and t[4] > 0:
            out_stats = {"err_mass": t[2] / t[4], "residual": t[3] / t[4], "tokens": int(t[4])}
        return t[0], t[1] / self.world, out_stats

    def train_step(self) -> dict:
        """One optimisation step (micro-batches, per-model clipping, both optimisers); returns its record, read from
        the device."""
        return self._read_record(self._train_step())

    def _train_step(self) -> dict:
        """:meth:`train_step` with the record left pending (:meth:`_read_record`): gradient clipping and the
        optimisers read no device value (AdamW's step counts are host tensors), so the step's only device reads are
        its forwards'."""
        cfg, model = self.cfg, self.model
        rec = self._accumulate()
        gn_p = torch.nn.utils.clip_grad_norm_(model.pilot.parameters(), cfg.clip_pilot)
        self.opt_pilot.step()
        self.sched_pilot.step()
        self.opt_pilot.zero_grad(set_to_none=True)
        rec.update(grad_norm_pilot=_full(gn_p), lr_pilot=self.sched_pilot.get_last_lr()[0])
        if model.copilot is not None:
            gn_c = torch.nn.utils.clip_grad_norm_(model.copilot.parameters(), cfg.clip_copilot)
            self.opt_copilot.step()
            self.sched_copilot.step()
            self.opt_copilot.zero_grad(set_to_none=True)
            rec.update(grad_norm_copilot=_full(gn_c), lr_copilot=self.sched_copilot.get_last_lr()[0])
        self.step += 1
        return rec

    @property
    def _device(self) -> torch.device:
        return next(self.model.pilot.parameters()).device

    def train(self, stop_after: int | None = None) -> dict:
        """Run until ``config.steps`` (or until ``stop_after`` steps of this call: used to test resuming); returns
        the last step's record. In several processes every rank calls it (same arguments).

        A step's record (losses, gradient norms, the Mistake Log's statistics) is read from the device only when
        it is logged (every ``log_every`` steps and the last; the progress bar's losses are refreshed then too)
        and for the returned record: between logging steps a step's only host reads are its forwards' (one per
        micro-batch). ``step_times`` / ``step_time_s`` are host times: on an accelerator a step's work may
        finish in a later step's time (their median stays the step time)."""
        cfg = self.cfg
        resumed = self.maybe_resume()
        if not resumed:
            torch.manual_seed(cfg.seed)
            if self.rank == 0:
                with open(os.path.join(self.run_dir, "config.json"), "w") as fh:
                    json.dump({"train": asdict(cfg)}, fh, indent=2)
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not self.progress or self.rank != 0, desc="train",
                   dynamic_ncols=True)
        done_here, last, last_read = 0, {}, True
        while self.step < cfg.steps and (stop_after is None or done_here < stop_after):
            t0 = time.perf_counter()
            pending = self._train_step()
            dt = time.perf_counter() - t0
            self.step_times.append(dt)
            pending["step_time_s"] = dt
            done_here += 1
            logged = self.step % cfg.log_every == 0 or self.step == cfg.steps
            rec = self._read_record(pending) if logged else pending
            if logged:
                post = {"P": f"{rec['pilot_loss']:.3f}"}
                if "copilot_loss" in rec:
                    post["C"] = f"{rec['copilot_loss']:.4f}"
                bar.set_postfix(post)
            bar.update(1)
            if logged:
                self._log(rec)
            if self.eval_fn is not None and cfg.eval_every and self.step % cfg.eval_every == 0:
                ev = self.eval_fn(self.model, self.step)
                self._log({"step": self.step, **{f"eval/{k}": v for k, v in ev.items()}})
            if cfg.ckpt_every and self.step % cfg.ckpt_every == 0:
                self.save_checkpoint()
            last, last_read = rec, logged
        if not last_read:
            last = self._read_record(last)
        bar.close()
        if self.step >= cfg.steps:
            self.save_log()
        return last


__all__ = ["TrainConfig", "Trainer", "cosine_with_warmup", "batch_indices", "init_distributed", "dist_info", "barrier",
           "full_state_dict", "fsdp2_shard"]
