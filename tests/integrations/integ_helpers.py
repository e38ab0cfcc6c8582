"""Shared data and settings for the integration tests (tiny models, CPU, a few steps)."""

from __future__ import annotations

import functools

import torch

from tcopilot.data.prompts import collate

VOCAB = 97


def examples(n: int = 16, length: int = 12, seed: int = 0) -> list[dict]:
    """Equal-length rows (so micro-batches pad alike) whose prompts (label -100) have different lengths, so
    micro-batches count different numbers of tokens: the case where ``num_items_in_batch`` matters."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        start = int(torch.randint(1, VOCAB, (1,), generator=g))
        stride = int(torch.randint(1, 4, (1,), generator=g))
        ids = [(start + stride * i) % (VOCAB - 1) + 1 for i in range(length)]
        prompt = int(torch.randint(1, length - 2, (1,), generator=g))
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


collate_fn = functools.partial(collate, pad_token_id=0)


def ckpt_flag() -> str:
    """The name of TrainingArguments' checkpointing switch: ``activation_checkpointing`` (transformers >= 5.2x) or
    ``gradient_checkpointing`` (older, e.g. the 5.17 of the lent GPU image); the code under test accepts both."""
    from transformers import TrainingArguments

    fields = TrainingArguments.__dataclass_fields__
    return "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"


def hf_args(output_dir, **kw):
    from transformers import TrainingArguments

    base = dict(
        output_dir=str(output_dir), max_steps=4, per_device_train_batch_size=4, gradient_accumulation_steps=2,
        learning_rate=3e-3, weight_decay=0.0, max_grad_norm=1.0, warmup_steps=0,
        lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1},
        optim="adamw_torch", train_sampling_strategy="sequential", logging_steps=1, save_strategy="no",
        report_to=[], use_cpu=True, disable_tqdm=True, seed=0, dataloader_num_workers=0,
    )
    base.update(kw)
    return TrainingArguments(**base)


def train_logs(trainer) -> list[dict]:
    return [r for r in trainer.state.log_history if "pilot_loss" in r]


def ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """One rank of a CPU/gloo DDP run of CopilotTrainer (spawned by test_distributed.py)."""
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from tcopilot.integrations import CopilotTrainer
    from tcopilot.testing import tiny_pair

    model = tiny_pair("llama")
    args = hf_args(out_dir, max_steps=2, per_device_train_batch_size=4, gradient_accumulation_steps=1,
                   ddp_backend="gloo", save_strategy="steps", save_steps=2)
    tr = CopilotTrainer(model=model, args=args, train_dataset=examples(), data_collator=collate_fn,
                        copilot_learning_rate=1e-3)
    tr.train()
    if rank == 0:
        torch.save({"state": model.state_dict(), "logs": train_logs(tr), "world": tr.args.world_size},
                   os.path.join(out_dir, "ddp.pt"))
