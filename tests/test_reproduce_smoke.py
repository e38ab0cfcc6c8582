"""Smoke test of examples/reproduce.py on a tiny random Llama with a word tokenizer (no network, no data files)."""

from __future__ import annotations

import importlib.util
import json
import os

from tcopilot.data import WordTokenizer
from tcopilot.testing import tiny_pilot

_PATH = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "reproduce.py")


def _module():
    spec = importlib.util.spec_from_file_location("reproduce", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _write_data(folder) -> list[dict]:
    train = [{"original_text": f"Tom had {a} apples and got {b} more . How many apples does he have ?",
              "equation": f"X=({a}.0+{b}.0)", "ans": float(a + b)} for a in range(2, 6) for b in range(1, 4)]
    test = [{"instruction": train[k]["original_text"], "input": "", "output": "", "answer": str(train[k]["ans"])}
            for k in (0, 5)]
    test += [{"instruction": "Sam had 9 pears and ate 4 . How many pears are left ?", "input": "", "output": "",
              "answer": "5.0"}]
    with open(os.path.join(folder, "mawps_trainset.json"), "w") as fh:
        json.dump(train, fh)
    with open(os.path.join(folder, "mawps_test.json"), "w") as fh:
        json.dump(test, fh)
    return train + [{"original_text": t["instruction"]} for t in test]


def _tokenizer(items) -> WordTokenizer:
    texts = [x["original_text"] for x in items]
    texts += ["Below is an instruction that describes a task. Write a response that appropriately completes the "
              "request.\n\n### Instruction:\n\n### Response:\n x = + - * / ( ) . The answer is"]
    return WordTokenizer.build(texts)


def test_reproduce_main_tiny(tmp_path):
    mod = _module()
    items = _write_data(tmp_path)
    tok = _tokenizer(items)

    def factory():
        return tiny_pilot(vocab=tok.vocab_size), tok

    run_dir = tmp_path / "run"
    result = mod.main(
        ["--data-dir", str(tmp_path), "--run-dir", str(run_dir), "--steps", "3", "--batch-size", "4",
         "--max-length", "64", "--train-layers", "1", "--copilot-layers", "1,0", "--lams", "0.5,1.0",
         "--eval-batch-size", "2", "--max-new-tokens", "4", "--warmup", "1"],
        pilot_factory=factory, tokenizer=tok,
    )
    assert result["n_train_dropped"] == 2
    assert result["n_train_kept"] == 10
    # The Copilot's loss never reaches the Pilot: both runs end with the same Pilot weights.
    assert result["pilot_weight_max_abs_diff"] < 1e-5
    rows = result["rows"]
    assert len(rows) == 1 + 1 + 2 * 2
    assert all(len(r["correct"]) == 3 for r in rows)
    assert (run_dir / "results.json").exists()


def test_reproduce_skip_pilot_only_with_beams(tmp_path):
    mod = _module()
    items = _write_data(tmp_path)
    tok = _tokenizer(items)

    def factory():
        return tiny_pilot(vocab=tok.vocab_size), tok

    result = mod.main(
        ["--data-dir", str(tmp_path), "--run-dir", str(tmp_path / "run"), "--steps", "2", "--batch-size", "4",
         "--max-length", "64", "--train-layers", "1", "--copilot-layers", "1,0", "--lams", "1.0",
         "--fusions", "probs", "--eval-batch-size", "4", "--max-new-tokens", "3", "--warmup", "1",
         "--skip-pilot-only", "--beams", "2", "--beam-settings", "0.0:probs,1.0:probs",
         "--test-limit", "2", "--limit-mawps"],
        pilot_factory=factory, tokenizer=tok,
    )
    assert "pilot_only" not in result["train"] and result["pilot_weight_max_abs_diff"] is None
    rows = result["rows"]
    # greedy: Copilot off + 1 setting; beams: 2 settings. MAWPS cut to its first 2 items.
    assert [(r["beams"], r["lam"]) for r in rows] == [(1, 0.0), (1, 1.0), (2, 0.0), (2, 1.0)]
    assert all(r["n"] == 2 and len(r["correct"]) == 2 for r in rows)
    # Each beam row's sign test is against the beam Pilot-alone row: that row against itself gains/loses nothing.
    assert rows[2]["gained"] == rows[2]["lost"] == 0


def _report_module():
    path = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "reproduce_report.py")
    spec = importlib.util.spec_from_file_location("reproduce_report", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_reproduce_report_aggregates_seeds(tmp_path):
    mod = _report_module()
    base = "Pilot of the joint run, Copilot off"

    def row(system, fusion, lam, beams, correct):
        return {"test": "mawps", "n": 4, "system": system, "fusion": fusion, "lam": lam, "beams": beams,
                "correct": correct, "accuracy": sum(correct) / 4}

    runs = [
        [row(base, "-", 0.0, 1, [1, 0, 0, 0]), row("Pilot + Copilot", "probs", 0.5, 1, [1, 1, 0, 0])],
        [row(base, "-", 0.0, 1, [0, 0, 1, 1]), row("Pilot + Copilot", "probs", 0.5, 1, [0, 1, 1, 1])],
    ]
    dirs = []
    for k, rows in enumerate(runs):
        d = tmp_path / f"seed{k}"
        d.mkdir()
        (d / "results.json").write_text(json.dumps({"rows": rows}))
        dirs.append(str(d))
    summary = mod.aggregate([json.loads((tmp_path / f"seed{k}" / "results.json").read_text()) for k in range(2)])
    cop = summary[1]
    assert cop["accs"] == [0.5, 0.75] and abs(cop["acc_mean"] - 0.625) < 1e-12
    assert (cop["gained"], cop["lost"]) == (2, 0)  # one question gained in each seed, none lost
    assert abs(cop["rel"] - (0.625 - 0.375) / 0.375) < 1e-12
    text = mod.main(dirs)
    assert "| MAWPS (4) | greedy | 37.5 ± 17.7 | 62.5 ± 17.7 (probs 0.5) | +66.7% |" in text


def test_score_uses_the_answer_format_choices():
    mod = _module()
    boolq = {"instruction": "Please answer the following question with true or false, question: is it?\n\n"
                            "Answer format: true/false", "answer": "true"}
    obqa = {"instruction": "Please choose the correct answer to the question: x\n\nAnswer1: a Answer2: b\n\n"
                           "Answer format: answer1/answer2", "answer": "answer2"}
    math = {"instruction": "Tom had 3 apples and got 2 more.", "answer": "5.0"}
    assert mod.score("the correct answer is true", boolq) and not mod.score("the correct answer is false", boolq)
    assert mod.score("the correct answer is answer2", obqa) and not mod.score("answer1", obqa)
    assert mod.score("3 + 2 = 5. The answer is 5.", math) and not mod.score("The answer is 6.", math)


def test_reproduce_report_pools_test_sets():
    mod = _report_module()
    rows = [{"test": t, "n": 2, "system": "Pilot + Copilot", "fusion": "probs", "lam": 1.0, "beams": 1,
             "correct": c, "predictions": ["a", "b"], "accuracy": sum(c) / 2}
            for t, c in (("x", [1, 0]), ("y", [1, 1]))]
    pooled = mod.with_pooled({"rows": rows})["rows"][-1]
    assert pooled["test"] == "all" and pooled["n"] == 4 and pooled["correct"] == [1, 0, 1, 1]
    assert pooled["accuracy"] == 0.75
