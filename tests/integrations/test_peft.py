"""PEFT/LoRA Pilots and Copilots: capture, fused loss, training with CopilotTrainer, generation, adapters."""

from __future__ import annotations

import pytest
import torch

peft = pytest.importorskip("peft")
pytest.importorskip("accelerate")

from integ_helpers import collate_fn, examples, hf_args, train_logs  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402

from tcopilot import Copilot, TransformerCopilot  # noqa: E402
from tcopilot.integrations import COPILOT_DIR, CopilotTrainer, load_checkpoint, lora_copilot  # noqa: E402
from tcopilot.testing import tiny_pilot  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _lora_pilot(adapter_seed: int = 0):
    pilot = tiny_pilot("llama", seed=0)
    torch.manual_seed(adapter_seed)
    # init_lora_weights=False: random A and B, so the adapters change the outputs from the first step
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM", init_lora_weights=False)
    return get_peft_model(pilot, cfg)


def _copilot(pilot, seed: int = 1):
    torch.manual_seed(seed)
    cop = Copilot.from_pilot(pilot, num_hidden_layers=2).float()
    with torch.no_grad():
        cop.error_out.weight.normal_(0, 0.05)
    return cop


def _batch():
    b = collate_fn(examples(n=4))
    return b["input_ids"], b["attention_mask"], b["labels"]


def test_lora_pilot_capture_and_fused_loss_match_peft_forward():
    pm = _lora_pilot()
    model = TransformerCopilot(pm, _copilot(pm.get_base_model()), impl="torch")
    ids, mask, labels = _batch()
    out = model(ids, attention_mask=mask, labels=labels)
    ref = pm(input_ids=ids, attention_mask=mask, labels=labels).loss  # PEFT's own forward, adapters active
    torch.testing.assert_close(out.pilot_loss, ref, rtol=1e-5, atol=1e-6)
    with pm.disable_adapter():
        plain = model(ids, attention_mask=mask, labels=labels).pilot_loss
    assert abs(float(plain.detach()) - float(ref.detach())) > 1e-3, "the adapters changed nothing: vacuous test"
    out.loss.backward()
    lora = [p for n, p in pm.named_parameters() if "lora_" in n]
    assert lora and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)
    assert all(p.grad is None for n, p in pm.named_parameters() if "lora_" not in n)
    assert model.copilot.error_out.weight.grad is not None


def test_lora_pilot_trains_generates_saves_and_loads(tmp_path):
    pm = _lora_pilot()
    model = TransformerCopilot(pm, _copilot(pm.get_base_model()), impl="torch")
    frozen = {n: p.detach().clone() for n, p in pm.named_parameters() if not p.requires_grad}
    lora = {n: p.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}
    tr = CopilotTrainer(model=model, args=hf_args(tmp_path, max_steps=3), train_dataset=examples(),
                        data_collator=collate_fn, copilot_learning_rate=1e-3)
    tr.train()
    assert len(train_logs(tr)) == 3
    params = dict(pm.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in frozen.items()), "a frozen base weight moved"
    assert any(not torch.equal(params[n], v) for n, v in lora.items()), "no adapter weight moved"

    # generation on the PEFT Pilot: lam=0 is exactly PEFT's own greedy decoding; lam=1 runs the Copilot
    ids = torch.tensor([[5, 9, 13, 17], [3, 4, 5, 6]])
    model.eval()
    ours = model.generate(ids, max_new_tokens=5, lam=0.0, do_sample=False)
    with torch.no_grad():
        hf = pm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                         pad_token_id=0)
    assert torch.equal(ours, hf[:, : ours.shape[1]])
    assert model.generate(ids, max_new_tokens=5, lam=1.0).shape == (2, 9)

    # adapters saved (no full Pilot weights), Copilot beside them; loaded into a fresh pair
    tr.save_model(str(tmp_path / "final"))
    assert (tmp_path / "final" / "adapter_model.safetensors").exists()
    assert not (tmp_path / "final" / "model.safetensors").exists()
    assert (tmp_path / "final" / COPILOT_DIR / "model.safetensors").exists()
    pm2 = _lora_pilot(adapter_seed=5)
    fresh = TransformerCopilot(pm2, _copilot(pm2.get_base_model(), seed=9), impl="torch")
    load_checkpoint(fresh, str(tmp_path / "final"))
    b_ids, b_mask, b_labels = _batch()
    with torch.no_grad():
        a = model(b_ids, attention_mask=b_mask, labels=b_labels)
        b = fresh(b_ids, attention_mask=b_mask, labels=b_labels)
    torch.testing.assert_close(a.pilot_loss, b.pilot_loss, rtol=0, atol=0)
    torch.testing.assert_close(a.copilot_loss, b.copilot_loss, rtol=0, atol=0)


def test_lora_copilot_trains_only_adapters_and_heads_and_round_trips(tmp_path):
    pilot = tiny_pilot("llama", seed=0)
    lc = lora_copilot(_copilot(pilot), r=4, alpha=8)
    trainable = {n for n, p in lc.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "error_in" in n or "error_out" in n for n in trainable)
    model = TransformerCopilot(pilot, lc, impl="torch")
    frozen = {n: p.detach().clone() for n, p in lc.named_parameters() if not p.requires_grad}
    tr = CopilotTrainer(model=model, args=hf_args(tmp_path, max_steps=3), train_dataset=examples(),
                        data_collator=collate_fn, copilot_learning_rate=3e-3)
    tr.train()
    params = dict(lc.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in frozen.items())
    assert not torch.equal(lc.base_model.model.error_out.weight, _copilot(pilot).error_out.weight)
    assert model.generate(torch.tensor([[5, 9, 13]]), max_new_tokens=4, lam=1.0).shape == (1, 7)

    tr.save_model(str(tmp_path / "final"))
    assert (tmp_path / "final" / COPILOT_DIR / "adapter_model.safetensors").exists()
    # the frozen base Copilot is rebuilt the same way; the adapter and the heads come from the checkpoint
    fresh = TransformerCopilot(tiny_pilot("llama", seed=4), lora_copilot(_copilot(pilot), r=4, alpha=8),
                               impl="torch")
    load_checkpoint(fresh, str(tmp_path / "final"))
    ids, mask, labels = _batch()
    with torch.no_grad():
        a, b = model(ids, attention_mask=mask, labels=labels), fresh(ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(a.copilot_loss, b.copilot_loss, rtol=0, atol=0)
    torch.testing.assert_close(a.pilot_loss, b.pilot_loss, rtol=0, atol=0)


def test_bad_peft_setups_raise():
    pilot = tiny_pilot("llama", seed=0)
    with pytest.raises(ValueError, match="target_modules"):
        lora_copilot(_copilot(pilot), target_modules=["q_proj", "error_out"])
    head = get_peft_model(tiny_pilot("llama"), LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ValueError, match="LM head"):
        TransformerCopilot(head, None)
    prompt = get_peft_model(tiny_pilot("llama"), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    with pytest.raises(ValueError, match="prompt-learning"):
        TransformerCopilot(prompt, None)(torch.tensor([[1, 2, 3]]))
