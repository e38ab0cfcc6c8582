"""The README is true: its Python examples run as written, its command lines parse, and the public names, keyword
arguments and repository paths it cites exist.

Not executed here: the install commands (Quick start) and the ``torchrun`` line, which only gets parsed (the
2-process run itself is ``tests/integrations/test_train_distributed.py``, marked slow).
"""

from __future__ import annotations

import importlib
import inspect
import re
import shlex
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"


def _section(title: str) -> str:
    """The text of ``## title`` up to the next ``## `` heading (its ``###`` subsections included)."""
    text = README.read_text()
    assert f"\n## {title}\n" in text, f"README has no section '## {title}'"
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def _blocks(section: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", section, flags=re.S)


def _example() -> str:
    blocks = _blocks(_section("Use it from your trainer"), "python")
    assert len(blocks) == 1, "expected one python block in the section"
    return blocks[0]


def test_readme_trainer_example_runs(tmp_path, monkeypatch, capsys):
    pytest.importorskip("accelerate")
    code = _example()
    assert len(code.strip().splitlines()) <= 20
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    exec(compile(code, str(README), "exec"), namespace)
    trainer = namespace["trainer"]
    logs = [r for r in trainer.state.log_history if "pilot_loss" in r]
    assert len(logs) == 2 and all("copilot_loss" in r for r in logs)
    assert (tmp_path / "runs/hf/checkpoint-6/copilot/model.safetensors").exists()
    assert (tmp_path / "runs/hf/checkpoint-6/model.safetensors").exists()
    assert "tensor(" in capsys.readouterr().out


def test_readme_use_it_example_runs(monkeypatch):
    """The "Use it" block as written, with a tiny random Llama for ``from_pretrained(...)`` and a left-padded batch
    for the tensors it leaves to the reader."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    blocks = _blocks(_section("Use it"), "python")
    assert len(blocks) == 1, "expected one python block in the section"
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    torch.manual_seed(0)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *args, **kwargs: LlamaForCausalLM(cfg))
    ids = torch.randint(0, 64, (2, 8))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    namespace: dict = {"__name__": "__readme__", "input_ids": ids, "attention_mask": mask,
                       "labels": ids.masked_fill(mask == 0, -100), "prompt_ids": ids[:, :5], "prompt_mask": mask[:, :5]}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    model, out, tokens = namespace["model"], namespace["out"], namespace["tokens"]
    assert model.copilot.config.num_hidden_layers == 4
    assert out.copilot_loss is not None
    torch.testing.assert_close(out.loss, out.pilot_loss + out.copilot_loss)
    assert model.pilot.get_output_embeddings().weight.grad is not None
    assert model.copilot.error_out.weight.grad is not None
    assert tokens.shape[0] == 2 and 5 < tokens.shape[1] <= 5 + 64
    assert torch.equal(tokens[:, :5], ids[:, :5])


def _command_lines() -> list[list[str]]:
    """``argv`` of every ``tcopilot ...`` line of "Command line" and of every ``torchrun ... -m tcopilot ...`` line."""
    (block,) = _blocks(_section("Command line"), "")
    lines = []
    for line in block.strip().splitlines():
        line = re.sub(r"\s+#.*$", "", line).replace("[", " ").replace("]", " ").replace("...", " ")
        argv = shlex.split(line.replace("RUN_DIR", "runs/x"))
        assert argv[0] == "tcopilot", line
        lines.append(argv[1:])
    for rest in re.findall(r"^\s*torchrun .*?-m tcopilot (.*)$", README.read_text(), flags=re.M):
        lines.append(shlex.split(rest))
    return lines


def test_readme_command_lines_parse():
    from tcopilot.cli import DEVICE_CHOICES, build_parser

    argvs = _command_lines()
    assert {a[0] for a in argvs} >= {"train", "eval", "generate", "inspect"} and len(argvs) == 5
    for argv in argvs:
        args = build_parser().parse_args(argv)  # argparse exits (SystemExit) on an unknown flag or choice
        assert args.fn is not None, argv
    # the values shown for `tcopilot train [...]` are its defaults
    train = next(a for a in argvs if a[0] == "train" and "--steps" in a)
    assert vars(build_parser().parse_args(train)) == vars(build_parser().parse_args(["train"]))
    shown = re.findall(r"--device ([a-z]+(?:\|[a-z]+)+)", README.read_text())
    assert shown and all(tuple(choices.split("|")) == DEVICE_CHOICES for choices in shown)


def _resolve(dotted: str):
    """``tcopilot.a.b.c`` -> the object: the longest importable module prefix, then attributes (so that
    ``tcopilot.generate``, the function the package exports, does not hide the module of that name)."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for name in parts[i:]:
            obj = getattr(obj, name)
        return obj
    raise ModuleNotFoundError(dotted)


def test_readme_names_exist():
    pytest.importorskip("accelerate")  # tcopilot.integrations.CopilotTrainer subclasses transformers.Trainer
    text = README.read_text()
    names = set(re.findall(r"`(tcopilot(?:\.[A-Za-z_]\w*)+)", text))
    assert "tcopilot.pilot.LOGIT_SCALE_RULES" in names
    for dotted in sorted(names):
        _resolve(dotted)
    for name, module in re.findall(r"from (tcopilot[\w.]*) import (\w+)", text):
        getattr(importlib.import_module(name), module)


def test_readme_fused_op_table_matches_signatures():
    """Each row ``name(a, b, kw=, ...)`` of the fused-op table: ``name`` is exported and takes those keywords."""
    import tcopilot

    rows = re.findall(r"^\| `(\w+)\((.*?)\)` \|", _section("Use it"), flags=re.M)
    assert [r[0] for r in rows] == ["logit_capture", "copilot_error_loss", "log_attention", "rectified_next_token",
                                    "rectified_decode_head"]
    for name, args in rows:
        assert name in tcopilot.__all__ and f"{name}_reference" in tcopilot.__all__
        params = inspect.signature(getattr(tcopilot, name)).parameters
        positional = [p for p in params.values() if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
        shown = [a.strip() for a in args.split(",") if a.strip() and a.strip() != "..."]
        assert len([a for a in shown if "=" not in a]) <= len(positional), name
        for arg in shown:
            if "=" in arg:
                key, default = arg.split("=", 1)
                assert key in params, f"{name}: no parameter {key!r}"
                if default:
                    assert repr(params[key].default) == default, f"{name}: {key} defaults to {params[key].default!r}"


def test_readme_paths_exist():
    text = README.read_text()
    cited = set(re.findall(r"`((?:tcopilot|tests|benchmarks|examples|notes)/[\w./-]*)`", text))
    (layout,) = _blocks(_section("Layout"), "")
    cited |= {p for p in re.findall(r"(?<!\S)((?:tcopilot|tests|benchmarks)/[\w./-]*)", layout)}
    assert "benchmarks/results/main-job-cpu.md" in cited
    missing = sorted(p for p in cited if not (ROOT / p).exists())
    assert not missing, f"README cites paths that do not exist: {missing}"
