import json
from pathlib import Path

import pytest

from tcopilot.data.loader import (
    convert_mawps_item,
    count_overlap,
    drop_overlap,
    equation_to_expression,
    format_number,
    load_llm_adapters,
    normalize_question,
)
from tcopilot.data.scoring import extract_answer

DATA = Path("/work/shared/data/llm-adapters")
needs_data = pytest.mark.skipif(
    not (DATA / "mawps_trainset.json").exists(), reason="LLM-Adapters files absent"
)


def test_format_number():
    assert format_number(2.0) == "2" and format_number("18.0") == "18" and format_number(58) == "58"
    assert format_number(0.7) == "0.7" and format_number("-0.211") == "-0.211"


@pytest.mark.parametrize(
    "equation, expression",
    [
        ("X=((22.0-14.0)/4.0)", "(22 - 14) / 4"),
        ("x=3*6", "3 * 6"),
        ("X=(2.0+4.0)/(3.0-1.0)", "(2 + 4) / (3 - 1)"),
        ("x=0.5+0.1+0.1", "0.5 + 0.1 + 0.1"),
        ("number=1.477/-7.0", "1.477 / -7"),
    ],
)
def test_equation_to_expression(equation, expression):
    assert equation_to_expression(equation) == expression


def test_equation_to_expression_rejects_equations_to_solve():
    for bad in ("X-6=52", "7=3+x", "x=2^3"):
        with pytest.raises(ValueError, match="equation"):
            equation_to_expression(bad)


def test_convert_mawps_item():
    item = {
        "original_text": "A waiter had 22 customers .  If 14 left",
        "equation": "X=((22.0-14.0)/4.0)",
        "ans": 2.0,
    }
    assert convert_mawps_item(item) == {
        "instruction": "A waiter had 22 customers . If 14 left",
        "input": "",
        "output": "(22 - 14) / 4 = 2. The answer is 2.",
        "answer": "2",
    }
    solved = convert_mawps_item({"original_text": "q", "equation": "X-6=52", "ans": 58})
    assert solved["output"] == "x - 6 = 52, so x = 58. The answer is 58."


def test_load_plain_file_and_errors(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps([{"instruction": "q", "input": "", "output": None, "answer": "1.0"}]))
    assert load_llm_adapters(path) == [{"instruction": "q", "input": "", "output": "", "answer": "1.0"}]
    path.write_text(json.dumps({"instruction": "q"}))
    with pytest.raises(ValueError, match="JSON list"):
        load_llm_adapters(path)
    path.write_text(json.dumps([{"question": "q"}]))
    with pytest.raises(ValueError, match="keys"):
        load_llm_adapters(path)


def test_normalize_and_overlap():
    assert normalize_question("  Tom  has\n7 Apples . ") == "tom has 7 apples ."
    train = [
        {"instruction": "Tom has 7 apples ."},
        {"original_text": "tom HAS 7  apples ."},
        {"instruction": "other"},
    ]
    test_a = [{"instruction": "Tom has 7 apples ."}, {"instruction": "Tom has 7 apples ."}]
    test_b = [{"instruction": "OTHER"}]
    kept, dropped = drop_overlap(train, test_a)
    assert dropped == 2 and kept == [train[2]]
    assert drop_overlap(train, [test_a, test_b]) == ([], 3)
    assert drop_overlap(train, []) == (train, 0)
    assert count_overlap(train, test_a) == 2


@needs_data
def test_real_mawps_files():
    train = load_llm_adapters(DATA / "mawps_trainset.json")
    test = load_llm_adapters(DATA / "mawps_test.json")
    assert len(train) == 1898 and len(test) == 238
    for item in train:
        assert set(item) == {"instruction", "input", "output", "answer"}
        assert not item["answer"].endswith(".0")
        assert extract_answer(item["output"]) == pytest.approx(float(item["answer"]))
    assert train[0]["output"] == "(22 - 14) / 4 = 2. The answer is 2."
    # The README reports 28 MAWPS test questions found in mawps_trainset: test items, and one of the covered
    # questions occurs twice in mawps_test, so 27 distinct training items are dropped.
    assert count_overlap(train, test) == 28
    kept, dropped = drop_overlap(train, test)
    assert dropped == 27 and len(kept) == 1898 - 27
    assert count_overlap(kept, test) == 0


@needs_data
def test_real_commonsense_and_math_files():
    boolq = load_llm_adapters(DATA / "boolq_test.json")
    assert len(boolq) == 3270 and {x["answer"] for x in boolq} == {"true", "false"}
    obqa = load_llm_adapters(DATA / "openbookqa_test.json")
    assert {x["answer"] for x in obqa} == {"answer1", "answer2", "answer3", "answer4"}
    svamp = load_llm_adapters(DATA / "SVAMP_test.json")
    math_data = load_llm_adapters(DATA / "math_data.json")
    assert count_overlap(math_data, svamp) == 800
    kept, dropped = drop_overlap(math_data, [svamp, load_llm_adapters(DATA / "mawps_test.json")])
    assert dropped > 0 and count_overlap(kept, svamp) == 0
