"""Train a Pilot and a Copilot jointly on TRL's SFT data pipeline (``trl.SFTTrainer``) with tcopilot's loss.

    pip install -e ".[hf]" trl
    python examples/trl_sft.py --steps 20 --output-dir runs/trl_sft   # CPU, a tiny random Llama, no network

How: :func:`copilot_sft_trainer` builds a ``trl.SFTTrainer`` for the Pilot only to prepare the data (tokenising
prompt-completion, language-modelling or conversational rows with the chat template, labels set to -100 outside the
completion / assistant turns, truncation to ``max_length``; with ``peft_config`` it also wraps the Pilot in PEFT)
and hands its dataset, collator and arguments to :class:`tcopilot.integrations.CopilotTrainer`, which trains the
pair with tcopilot's loss (the Pilot's cross-entropy and the Copilot's error RMSE from one pass over the
vocabulary), per-model learning rates and clipping, and saves the Copilot in ``checkpoint-N/copilot/``.

Why not a subclass of ``SFTTrainer``: its ``__init__`` takes a ``PreTrainedModel`` (it reads ``model.config`` and
patches ``model.forward`` with TRL's own fused LM head) and its ``compute_loss`` is TRL's; ``TransformerCopilot`` is
an ``nn.Module`` holding both models, whose loss is ``CopilotTrainer``'s. Packing and padding-free batches are
refused: the pair derives positions from the padded batch's attention mask.
"""

from __future__ import annotations

import argparse
import os

ROW_BREAKING = ("packing", "padding_free")


def copilot_sft_trainer(pilot, args, train_dataset, processing_class, *, copilot=None, eval_dataset=None,
                        peft_config=None, formatting_func=None, copilot_learning_rate=None, **trainer_kwargs):
    """A :class:`~tcopilot.integrations.CopilotTrainer` for ``pilot`` + a Copilot, on data prepared by ``SFTTrainer``.

    Args:
        pilot: a Hugging Face causal LM (``PreTrainedModel``), as for ``SFTTrainer``.
        args: a ``trl.SFTConfig`` (a ``TrainingArguments`` is converted by TRL); ``packing`` and ``padding_free``
            must be off and ``loss_type`` must be ``"nll"``.
        train_dataset, eval_dataset, processing_class, peft_config, formatting_func: as for ``SFTTrainer``.
        copilot: a :class:`tcopilot.Copilot` for this Pilot; default ``Copilot.from_pilot`` of the prepared Pilot
            (built after TRL, so any PEFT wrapping or pad-token setup has happened).
        copilot_learning_rate, trainer_kwargs: passed to ``CopilotTrainer`` (callbacks, compute_metrics, ...).
    """
    from trl import SFTTrainer

    from tcopilot import Copilot, TransformerCopilot
    from tcopilot.integrations import CopilotTrainer

    for name in ROW_BREAKING:
        if getattr(args, name, False):
            raise ValueError(
                f"{name}: TransformerCopilot needs padded rows with an attention mask (it derives positions from it); "
                f"set {name}=False in the SFTConfig"
            )
    if getattr(args, "loss_type", "nll") != "nll":
        raise ValueError(f"loss_type: the pair is trained with tcopilot's loss, set loss_type='nll' (got "
                         f"{args.loss_type!r})")
    sft = SFTTrainer(model=pilot, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                     processing_class=processing_class, peft_config=peft_config, formatting_func=formatting_func)
    pilot = sft.model  # the PEFT-wrapped Pilot when peft_config was given
    model = TransformerCopilot(pilot, copilot if copilot is not None else Copilot.from_pilot(pilot))
    return CopilotTrainer(model=model, args=sft.args, train_dataset=sft.train_dataset,
                          eval_dataset=sft.eval_dataset, data_collator=sft.data_collator,
                          processing_class=processing_class, copilot_learning_rate=copilot_learning_rate,
                          **trainer_kwargs)


# ------------------------------------------------------------------------------------------ a tiny runnable demo
def tiny_tokenizer():
    """A word-level ``PreTrainedTokenizerFast`` for "what is A plus B ?" prompts (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "</s>", "<unk>", "what", "is", "plus", "?"] + [str(i) for i in range(20)]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def tiny_data(n: int = 64):
    """Prompt-completion rows: the completion (the sum) is what the Pilot is trained on."""
    from datasets import Dataset

    rows = [{"prompt": f"what is {a} plus {b} ?", "completion": f" {a + b}"} for a in range(10) for b in range(10)]
    return Dataset.from_list(rows[:n])


def main(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--output-dir", default="runs/trl_sft")
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local (this also stops TRL's telemetry)

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig

    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    pilot = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None))
    args = SFTConfig(
        output_dir=a.output_dir, max_steps=a.steps, per_device_train_batch_size=4, gradient_accumulation_steps=2,
        learning_rate=1e-3, max_length=32, completion_only_loss=True, packing=False, padding_free=False,
        bf16=False, use_cpu=not torch.cuda.is_available(), logging_steps=1, save_steps=a.steps, report_to=[],
        disable_tqdm=True, seed=0,
    )  # SFTConfig defaults to activation checkpointing: CopilotTrainer applies it to the Pilot's layers
    trainer = copilot_sft_trainer(pilot, args, tiny_data(), tokenizer, copilot_learning_rate=5e-4)
    trainer.train()
    prompt = tokenizer("what is 2 plus 3 ?", return_tensors="pt")["input_ids"].to(trainer.args.device)
    out = trainer.model.generate(prompt, max_new_tokens=2, do_sample=False)
    print("what is 2 plus 3 ? ->", tokenizer.decode(out[0, prompt.shape[1]:]))
    return trainer


if __name__ == "__main__":
    main()
