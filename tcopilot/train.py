"""Joint training of a Pilot and a Copilot (paper, Algorithm 1) in online log mode.

One Pilot forward and one backward per micro-batch serve both models: :class:`TransformerCopilot`
returns ``pilot_loss + copilot_loss`` whose gradients reach disjoint parameters (the log is detached).
Two AdamW optimisers with linear warm-up + cosine decay and separate learning rates step after each
optimisation step; gradients are clipped per model.

Gradient accumulation: the Pilot's loss is normalised by the number of counted tokens of the whole
optimisation step (``num_items_in_batch``), so accumulating k micro-batches equals one big batch
exactly. The Copilot's RMSE is not additive over tokens; its micro-batch losses are averaged.

Runs are resumable: ``run_dir/checkpoint-<step>/`` holds both models (safetensors), both optimisers,
schedulers, RNG states and the step; the data order is a pure function of (seed, step), so a resumed
run continues with exactly the batches it would have seen.

Mistake Log: with ``keep_log=True`` (or a model that already holds a :class:`tcopilot.MistakeLog`, as
``log_mode="replay"`` does) every forward pushes its compressed log; checkpoints hold it in
``checkpoint-<step>/mistake_log/`` (so a resumed run continues with the same buffer and sampler state), the
finished run writes ``run_dir/mistake_log/`` for ``tcopilot inspect``, and ``metrics.jsonl`` gains the
step's mean error mass ``1 - p(y)`` and the top-k residual mass.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from safetensors.torch import load_model, save_model
from tqdm.auto import tqdm

from tcopilot.data.prompts import collate
from tcopilot.mistake_log import MistakeLog


@dataclass
class TrainConfig:
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


class Trainer:
    """Trains ``model`` (a :class:`TransformerCopilot`) on encoded examples (``input_ids``/``labels`` lists)."""

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
        final = os.path.join(self.run_dir, f"checkpoint-{self.step}")
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
        if self.mistake_log is not None:
            self.mistake_log.save(os.path.join(tmp, "mistake_log"))
        # state.json last: a checkpoint without it is incomplete and ignored on resume.
        with open(os.path.join(tmp, "state.json"), "w") as fh:
            json.dump({"step": self.step, "config": asdict(self.cfg)}, fh)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for _, old in self._ckpt_dirs()[: -self.cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def maybe_resume(self) -> bool:
        ckpts = self._ckpt_dirs()
        if not ckpts:
            return False
        step, path = ckpts[-1]
        load_model(self.model.pilot, os.path.join(path, "pilot.safetensors"))
        opt = torch.load(os.path.join(path, "optimizer.pt"), weights_only=False)
        self.opt_pilot.load_state_dict(opt["pilot"])
        self.sched_pilot.load_state_dict(opt["sched_pilot"])
        if self.model.copilot is not None:
            load_model(self.model.copilot, os.path.join(path, "copilot.safetensors"))
            self.opt_copilot.load_state_dict(opt["copilot"])
            self.sched_copilot.load_state_dict(opt["sched_copilot"])
        torch.set_rng_state(opt["rng"])
        log_dir = os.path.join(path, "mistake_log")
        if self.mistake_log is not None and os.path.isdir(log_dir):
            self.mistake_log.load_state_dict(MistakeLog.load(log_dir).state_dict())
        self.step = step
        return True

    def save_log(self) -> str | None:
        """Write the Mistake Log (if any) to ``run_dir/mistake_log/``; returns that directory."""
        if self.mistake_log is None:
            return None
        out = os.path.join(self.run_dir, "mistake_log")
        self.mistake_log.save(out)
        return out

    # ------------------------------------------------------------------ the loop
    def _log(self, record: dict) -> None:
        with open(os.path.join(self.run_dir, "metrics.jsonl"), "a") as fh:
            fh.write(json.dumps(record) + "\n")

    def accumulate_gradients(self) -> dict:
        """Forward and backward every micro-batch of the current step; gradients are left in ``.grad``."""
        cfg, model = self.cfg, self.model
        model.train()
        idx = batch_indices(len(self.examples), cfg.batch_size, cfg.seed, self.step)
        batch = collate([self.examples[i] for i in idx], self.pad_token_id, padding_side=cfg.padding_side)
        n_items = int((batch["labels"][:, 1:] != -100).sum())
        micro = cfg.batch_size // cfg.grad_accum
        p_sum, c_sum = 0.0, 0.0
        log = self.mistake_log
        if log is not None:
            log.next_step = self.step + 1
        for k in range(cfg.grad_accum):
            sl = slice(k * micro, (k + 1) * micro)
            out = model(
                batch["input_ids"][sl].to(self._device),
                attention_mask=batch["attention_mask"][sl].to(self._device),
                labels=batch["labels"][sl].to(self._device),
                num_items_in_batch=max(1, n_items),
            )
            loss = out.pilot_loss
            if out.copilot_loss is not None:
                loss = loss + out.copilot_loss / cfg.grad_accum
                c_sum += float(out.copilot_loss.detach()) / cfg.grad_accum
            loss.backward()
            p_sum += float(out.pilot_loss.detach())
        rec = {"step": self.step + 1, "pilot_loss": p_sum, "tokens": n_items}
        if model.copilot is not None:
            rec["copilot_loss"] = c_sum
        stats = log.step_stats(self.step + 1) if log is not None else None
        if stats is not None:
            rec.update(error_mass=stats["err_mass"], topk_residual=stats["residual"], log_bytes=log.nbytes)
        return rec

    def train_step(self) -> dict:
        cfg, model = self.cfg, self.model
        rec = self.accumulate_gradients()
        gn_p = torch.nn.utils.clip_grad_norm_(model.pilot.parameters(), cfg.clip_pilot)
        self.opt_pilot.step()
        self.sched_pilot.step()
        self.opt_pilot.zero_grad(set_to_none=True)
        rec.update(grad_norm_pilot=float(gn_p), lr_pilot=self.sched_pilot.get_last_lr()[0])
        if model.copilot is not None:
            gn_c = torch.nn.utils.clip_grad_norm_(model.copilot.parameters(), cfg.clip_copilot)
            self.opt_copilot.step()
            self.sched_copilot.step()
            self.opt_copilot.zero_grad(set_to_none=True)
            rec.update(grad_norm_copilot=float(gn_c), lr_copilot=self.sched_copilot.get_last_lr()[0])
        self.step += 1
        return rec

    @property
    def _device(self) -> torch.device:
        return next(self.model.pilot.parameters()).device

    def train(self, stop_after: int | None = None) -> dict:
        """Run until ``config.steps`` (or until ``stop_after`` steps of this call: used to test resuming)."""
        cfg = self.cfg
        resumed = self.maybe_resume()
        if not resumed:
            torch.manual_seed(cfg.seed)
            with open(os.path.join(self.run_dir, "config.json"), "w") as fh:
                json.dump({"train": asdict(cfg)}, fh, indent=2)
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not self.progress, desc="train",
                   dynamic_ncols=True)
        done_here, last = 0, {}
        while self.step < cfg.steps and (stop_after is None or done_here < stop_after):
            t0 = time.perf_counter()
            rec = self.train_step()
            dt = time.perf_counter() - t0
            self.step_times.append(dt)
            rec["step_time_s"] = dt
            done_here += 1
            post = {"P": f"{rec['pilot_loss']:.3f}"}
            if "copilot_loss" in rec:
                post["C"] = f"{rec['copilot_loss']:.4f}"
            bar.set_postfix(post)
            bar.update(1)
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                self._log(rec)
            if self.eval_fn is not None and cfg.eval_every and self.step % cfg.eval_every == 0:
                ev = self.eval_fn(self.model, self.step)
                self._log({"step": self.step, **{f"eval/{k}": v for k, v in ev.items()}})
            if cfg.ckpt_every and self.step % cfg.ckpt_every == 0:
                self.save_checkpoint()
            last = rec
        bar.close()
        if self.step >= cfg.steps:
            self.save_log()
        return last


__all__ = ["TrainConfig", "Trainer", "cosine_with_warmup", "batch_indices"]
