"""CopilotTrainer (transformers.Trainer) against our own loop, checkpoints and resuming."""

from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("accelerate")

from integ_helpers import collate_fn, examples, hf_args, train_logs  # noqa: E402

from tcopilot import Copilot  # noqa: E402
from tcopilot.integrations import COPILOT_DIR, CopilotTrainer, load_checkpoint  # noqa: E402
from tcopilot.testing import tiny_pair  # noqa: E402
from tcopilot.train import TrainConfig, Trainer, batch_indices  # noqa: E402

STEPS, BATCH, ACCUM = 4, 8, 2
LR_P, LR_C = 3e-3, 1e-3


def _ours(tmp_path):
    ex = examples()
    model = tiny_pair("llama")
    cfg = TrainConfig(steps=STEPS, batch_size=BATCH, grad_accum=ACCUM, lr_pilot=LR_P, lr_copilot=LR_C,
                      warmup_steps=0, min_lr_ratio=0.1, clip_pilot=1.0, clip_copilot=1.0, seed=0,
                      log_every=1, ckpt_every=0)
    Trainer(model, ex, cfg, str(tmp_path / "ours"), progress=False).train()
    recs = [json.loads(x) for x in open(tmp_path / "ours" / "metrics.jsonl")]
    # the batches our loop drew, in order, for the Trainer's sequential sampler
    ordered = [ex[i] for s in range(STEPS) for i in batch_indices(len(ex), BATCH, 0, s)]
    return model, recs, ordered


def test_matches_our_loop_with_gradient_accumulation(tmp_path):
    ours_model, ours, ordered = _ours(tmp_path)
    model = tiny_pair("llama")
    args = hf_args(tmp_path / "hf", max_steps=STEPS, per_device_train_batch_size=BATCH // ACCUM,
                   gradient_accumulation_steps=ACCUM, learning_rate=LR_P)
    tr = CopilotTrainer(model=model, args=args, train_dataset=ordered, data_collator=collate_fn,
                        copilot_learning_rate=LR_C, copilot_max_grad_norm=1.0)
    tr.train()
    hf = train_logs(tr)
    assert len(hf) == len(ours) == STEPS
    for a, b in zip(hf, ours):
        assert a["pilot_loss"] == pytest.approx(b["pilot_loss"], rel=1e-5, abs=1e-6)
        assert a["copilot_loss"] == pytest.approx(b["copilot_loss"], rel=1e-5, abs=1e-6)
        assert a["loss"] == pytest.approx(b["pilot_loss"] + b["copilot_loss"], rel=1e-5)
        # per-model clipping: both norms exceed 1.0 at some step, and each is the model's own norm
        assert a["grad_norm_pilot"] == pytest.approx(b["grad_norm_pilot"], rel=1e-4)
        assert a["grad_norm_copilot"] == pytest.approx(b["grad_norm_copilot"], rel=1e-4)
    # HF logs the rate a step used; our loop logs the rate after its scheduler step (the next step's)
    for a, b in zip(hf[1:], ours[:-1]):
        assert a["learning_rate"] == pytest.approx(b["lr_pilot"], rel=1e-6)
        assert a["copilot_learning_rate"] == pytest.approx(b["lr_copilot"], rel=1e-6)
    assert max(r["grad_norm_copilot"] for r in hf) > 1.0, "clipping never engaged: the test would not see it"
    for (name, p), q in zip(model.named_parameters(), ours_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)


def test_param_groups_and_schedule(tmp_path):
    model = tiny_pair("llama")
    args = hf_args(tmp_path, max_steps=6, warmup_steps=2, lr_scheduler_type="cosine", lr_scheduler_kwargs={},
                   learning_rate=2e-3)
    tr = CopilotTrainer(model=model, args=args, train_dataset=examples(), data_collator=collate_fn,
                        copilot_learning_rate=5e-4)
    tr.create_optimizer_and_scheduler(num_training_steps=6)
    pilot_ids = {id(p) for p in model.pilot.parameters()}
    seen = set()
    for g in tr.optimizer.param_groups:
        kinds = {id(p) in pilot_ids for p in g["params"]}
        assert len(kinds) == 1, "a group mixes Pilot and Copilot parameters"
        assert g["initial_lr"] == (2e-3 if kinds.pop() else 5e-4)
        seen.update(id(p) for p in g["params"])
    assert seen == {id(p) for p in model.parameters()}
    sched = tr.lr_scheduler
    for _ in range(6):  # every group follows warm-up + cosine from its own base
        lam = sched.lr_lambdas[0](sched.last_epoch)
        for g in tr.optimizer.param_groups:
            assert g["lr"] == pytest.approx(g["initial_lr"] * lam)
        tr.optimizer.step()
        sched.step()


def test_checkpoint_layout_save_and_resume(tmp_path):
    ex = examples()
    kw = dict(max_steps=4, save_strategy="steps", save_steps=2, warmup_steps=1, lr_scheduler_type="cosine",
              lr_scheduler_kwargs={})
    ref = tiny_pair("llama")
    CopilotTrainer(model=ref, args=hf_args(tmp_path / "a", **kw), train_dataset=ex, data_collator=collate_fn,
                   copilot_learning_rate=LR_C).train()

    ck = tmp_path / "a" / "checkpoint-2"
    assert (ck / "model.safetensors").exists() and (ck / "config.json").exists()
    assert (ck / COPILOT_DIR / "model.safetensors").exists() and (ck / COPILOT_DIR / "config.json").exists()
    assert (ck / "optimizer.pt").exists() and (ck / "trainer_state.json").exists()
    cop = Copilot.from_pretrained(str(ck / COPILOT_DIR))
    assert cop.config.vocab_size == ref.copilot.config.vocab_size

    # a new process: fresh (different) weights, resume from step 2 -> the same end state as the straight run
    torch.manual_seed(123)
    resumed = tiny_pair("llama", seed=7)
    tr = CopilotTrainer(model=resumed, args=hf_args(tmp_path / "a", **kw), train_dataset=ex,
                        data_collator=collate_fn, copilot_learning_rate=LR_C)
    tr.train(resume_from_checkpoint=str(ck))
    assert tr.state.global_step == 4
    for (name, p), q in zip(ref.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)

    # load_checkpoint outside a Trainer, and a clear error for a folder without the Copilot
    other = tiny_pair("llama", seed=3)
    load_checkpoint(other, str(tmp_path / "a" / "checkpoint-4"))
    for (name, p), q in zip(ref.state_dict().items(), other.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)
    os.rename(ck / COPILOT_DIR, ck / "elsewhere")
    with pytest.raises(ValueError, match="copilot/"):
        load_checkpoint(other, str(ck))


def test_bad_setups_raise(tmp_path):
    from tcopilot import TransformerCopilot

    model = tiny_pair("llama")
    with pytest.raises(ValueError, match="TransformerCopilot"):
        CopilotTrainer(model=model.pilot, args=hf_args(tmp_path), train_dataset=examples(), data_collator=collate_fn)
    with pytest.raises(ValueError, match="no Copilot"):
        CopilotTrainer(model=TransformerCopilot(model.pilot, None), args=hf_args(tmp_path),
                       train_dataset=examples(), data_collator=collate_fn)
    with pytest.raises(ValueError, match="copilot_learning_rate"):
        CopilotTrainer(model=model, args=hf_args(tmp_path), train_dataset=examples(), data_collator=collate_fn,
                       copilot_learning_rate=float("nan"))


def test_evaluate_reports_the_joint_loss(tmp_path):
    model = tiny_pair("llama")
    ev = examples(n=4, seed=1)
    tr = CopilotTrainer(model=model, args=hf_args(tmp_path, per_device_eval_batch_size=4), train_dataset=examples(),
                        eval_dataset=ev, data_collator=collate_fn)
    metrics = tr.evaluate()
    batch = collate_fn(ev)
    with torch.no_grad():
        out = model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    assert metrics["eval_loss"] == pytest.approx(float(out.pilot_loss + out.copilot_loss), rel=1e-5)
