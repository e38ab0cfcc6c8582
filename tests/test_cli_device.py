"""``--device`` of ``tcopilot train | eval | generate`` (where a run trains and evaluates), and ``--num-beams`` of
``eval`` and ``generate``."""

import json

import pytest
import torch

from tcopilot.cli import DEVICE_CHOICES, build_parser, main
from tcopilot.experiment import DEVICES, load_run_model, resolve_device

ARGS = ["--steps", "1", "--batch-size", "4", "--n-train", "16", "--n-test", "2", "--pilot-layers", "1",
        "--pilot-hidden", "32", "--copilot-layers", "1", "--quiet"]


def test_choices_agree():
    assert DEVICE_CHOICES == DEVICES  # the CLI keeps its own copy so that --help does not import torch


def test_resolve_device_auto_and_cpu():
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == want
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("bad", ["gpu", "CUDA", "cuda:0", ""])
def test_resolve_device_rejects_unknown(bad):
    with pytest.raises(ValueError, match="device: expected one of"):
        resolve_device(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_resolve_device_cuda_without_cuda():
    with pytest.raises(ValueError, match="without CUDA, got 'cuda'"):
        resolve_device("cuda")


def test_parser_accepts_device_on_each_command():
    p = build_parser()
    assert p.parse_args(["train", "--device", "cpu"]).device == "cpu"
    assert p.parse_args(["eval", "run", "--device", "cuda"]).device == "cuda"
    assert p.parse_args(["generate", "run", "--prompt", "x"]).device == "auto"
    with pytest.raises(SystemExit):
        p.parse_args(["train", "--device", "tpu"])


def test_parser_num_beams_and_its_checks(tmp_path):
    p = build_parser()
    assert p.parse_args(["eval", "run"]).num_beams is None  # the run's eval_num_beams (1 unless set)
    assert p.parse_args(["eval", "run", "--num-beams", "4"]).num_beams == 4
    assert p.parse_args(["generate", "run", "--prompt", "x"]).num_beams == 1
    with pytest.raises(SystemExit):
        p.parse_args(["eval", "run", "--num-beams", "2.5"])
    missing = str(tmp_path / "none")  # refused before the run directory is read
    for argv in (["eval", missing], ["generate", missing, "--prompt", "x"]):
        with pytest.raises(SystemExit, match="--num-beams: expected an int >= 1, got 0"):
            main([*argv, "--num-beams", "0"])
    with pytest.raises(SystemExit, match="--num-beams 4 and --temperature 0.7: beam search does not sample"):
        main(["generate", missing, "--prompt", "x", "--num-beams", "4", "--temperature", "0.7"])


def test_train_eval_generate_on_cpu(tmp_path, capsys, monkeypatch):
    import tcopilot.experiment as experiment

    run = tmp_path / "run"
    assert main(["train", "--run-dir", str(run), "--device", "cpu", *ARGS]) == 0
    assert json.load(open(run / "config.json"))["device"] == "cpu"
    assert "device cpu." in (run / "report.md").read_text()
    model = load_run_model(str(run / "joint"), "cpu")
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    beams, evaluate = [], experiment.evaluate_accuracy
    monkeypatch.setattr(experiment, "evaluate_accuracy", lambda *a, **kw: beams.append(kw["num_beams"])
                        or evaluate(*a, **kw))  # fmt: skip
    assert main(["eval", str(run), "--device", "cpu", "--n-test", "2", "--quiet", "--num-beams", "2"]) == 0
    assert beams == [2] * 6 and "beam search with 2 beams." in capsys.readouterr().out  # (train evaluates greedily)
    for extra in ([], ["--num-beams", "2"]):
        assert main(["generate", str(run), "--device", "cpu", "--prompt", "What is 2 plus 3 ?",
                     "--max-new-tokens", "3", *extra]) == 0  # fmt: skip
        assert "->" in capsys.readouterr().out
