"""The README's "Use it from your trainer" example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("accelerate")

README = Path(__file__).resolve().parents[2] / "README.md"


def _example() -> str:
    text = README.read_text()
    section = text.split("## Use it from your trainer", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "expected one python block in the section"
    return blocks[0]


def test_readme_trainer_example_runs(tmp_path, monkeypatch, capsys):
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
