"""examples/trl_sft.py: TRL's SFTTrainer prepares the data, CopilotTrainer trains the pair (2 steps, tiny model).

Also: activation checkpointing (on by default in TRL's SFTConfig) goes to the Pilot's layers and changes nothing.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

pytest.importorskip("accelerate")

from integ_helpers import ckpt_flag, collate_fn, examples, hf_args, train_logs  # noqa: E402

from tcopilot.integrations import CopilotTrainer, load_checkpoint  # noqa: E402
from tcopilot.testing import tiny_pair  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "trl_sft.py"


def _has_trl() -> bool:
    try:
        import datasets  # noqa: F401
        import trl  # noqa: F401
    except Exception:  # noqa: BLE001 (an install that fails to import for any reason counts as absent)
        return False
    return True


needs_trl = pytest.mark.skipif(not _has_trl(), reason="trl (and datasets) not importable: pip install trl")


def _example():
    spec = importlib.util.spec_from_file_location("trl_sft_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _checkpointing(pilot) -> bool:
    flag = getattr(pilot, "is_activation_checkpointing", None)  # transformers >= 5.2x; older: is_gradient_...
    return bool(pilot.is_gradient_checkpointing if flag is None else flag)


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")


@needs_trl
def test_trl_recipe_trains_pilot_and_copilot(tmp_path, offline, capsys):
    ex = _example()
    trainer = ex.main(["--steps", "2", "--output-dir", str(tmp_path)])
    assert isinstance(trainer, CopilotTrainer)
    logs = train_logs(trainer)
    assert len(logs) == 2
    for r in logs:
        assert r["copilot_loss"] > 0 and r["loss"] == pytest.approx(r["pilot_loss"] + r["copilot_loss"], rel=1e-5)

    # TRL's data: prompt tokens are -100 (completion-only loss), rows end with EOS, the collator pads with a mask
    tok = trainer.processing_class
    row = trainer.train_dataset[0]
    prompt_len = len(tok("what is 0 plus 0 ?")["input_ids"])
    assert row["labels"][:prompt_len] == [-100] * prompt_len and row["labels"][prompt_len:] == row["input_ids"][
        prompt_len:]
    assert row["input_ids"][-1] == tok.eos_token_id
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    assert set(batch) == {"input_ids", "attention_mask", "labels"}

    # SFTConfig's default activation checkpointing went to the Pilot; the flag is restored after training
    assert _checkpointing(trainer.model.pilot) and getattr(trainer.args, ckpt_flag())

    # the checkpoint holds both models and loads into a fresh pair
    ckpt = tmp_path / "checkpoint-2"
    assert (ckpt / "model.safetensors").exists() and (ckpt / "copilot" / "model.safetensors").exists()
    from transformers import LlamaForCausalLM

    from tcopilot import Copilot, TransformerCopilot

    pilot = LlamaForCausalLM(trainer.model.pilot.config)
    fresh = TransformerCopilot(pilot, Copilot(trainer.model.copilot.config))
    load_checkpoint(fresh, str(ckpt))
    for name, p in trainer.model.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[name], p, rtol=0, atol=0, msg=name)
    assert "what is 2 plus 3 ? ->" in capsys.readouterr().out


@needs_trl
def test_trl_recipe_refuses_row_breaking_options(offline):
    from trl import SFTConfig

    ex = _example()
    for option in ("packing", "padding_free"):
        args = SFTConfig(output_dir="unused", report_to=[], use_cpu=True, bf16=False, **{option: True})
        with pytest.raises(ValueError, match=f"{option}=False"):
            ex.copilot_sft_trainer(None, args, None, None)
    args = SFTConfig(output_dir="unused", report_to=[], use_cpu=True, bf16=False, loss_type="dft")
    with pytest.raises(ValueError, match="loss_type='nll'"):
        ex.copilot_sft_trainer(None, args, None, None)


def test_activation_checkpointing_goes_to_the_pilot(tmp_path):
    """The stock Trainer would call activation_checkpointing_enable on the pair (AttributeError); CopilotTrainer
    enables it on the Pilot, and the weights after 2 steps equal the run without it."""
    states = []
    for on in (False, True):
        model = tiny_pair("llama")
        args = hf_args(tmp_path / str(on), max_steps=2, **{ckpt_flag(): on})
        tr = CopilotTrainer(model=model, args=args, train_dataset=examples(), data_collator=collate_fn)
        tr.train()
        assert _checkpointing(model.pilot) == on and getattr(tr.args, ckpt_flag()) == on
        states.append(model.state_dict())
    for name, p in states[0].items():
        torch.testing.assert_close(states[1][name], p, rtol=1e-6, atol=1e-7, msg=name)
