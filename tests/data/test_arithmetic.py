import json
import random
import re
from collections import Counter

import pytest

from tcopilot.data.arithmetic import TEMPLATES, arithmetic_splits, generate_arithmetic, save_json
from tcopilot.data.scoring import extract_answer

FIELDS = {"instruction", "input", "output", "answer"}
_STEP = re.compile(r"(\d+) ([-+*]) (\d+) = (\d+)\.")


def _check_output(item):
    """Recompute every equation of the rationale, check the chain and the final answer."""
    rationale, _, tail = item["output"].partition(" The answer is ")
    steps = _STEP.findall(rationale)
    assert steps and " ".join(f"{a} {op} {b} = {r}." for a, op, b, r in steps) == rationale
    previous = None
    for a, op, b, r in steps:
        a, b, r = int(a), int(b), int(r)
        assert r == {"+": a + b, "-": a - b, "*": a * b}[op]
        if previous is not None:
            assert a == previous, "a second step must start from the first step's result"
        previous = r
    assert tail == f"{previous}."
    assert item["answer"] == str(previous)
    return previous


def test_shape_and_answers():
    items = generate_arithmetic(600, "train", seed=3, with_meta=True) + generate_arithmetic(
        300, "test", seed=3
    )
    for item in items:
        assert FIELDS <= set(item) and item["input"] == ""
        answer = _check_output(item)
        assert answer >= 0
        assert extract_answer(item["output"]) == answer
        # Every operand of the rationale's first step is written in the question.
        first = _STEP.match(item["output"])
        numbers = re.findall(r"\d+", item["instruction"])
        assert first.group(1) in numbers and first.group(3) in numbers
        if "meta" in item:
            template = TEMPLATES[item["meta"]["template"]]
            assert template.schema == item["meta"]["schema"] and template.split == "train"
            assert len(_STEP.findall(item["output"])) == template.n_steps
    assert all(set(item) == FIELDS for item in generate_arithmetic(20))


def test_deterministic_and_independent_of_global_random():
    random.seed(1)
    a = generate_arithmetic(200, "train", seed=7)
    random.seed(2)
    b = generate_arithmetic(200, "train", seed=7)
    assert a == b
    assert generate_arithmetic(50, "train", seed=7) == a[:50]
    assert generate_arithmetic(200, "train", seed=8) != a
    assert generate_arithmetic(200, "test", seed=7) != generate_arithmetic(200, "test", seed=8)


def test_splits_use_disjoint_templates():
    train_ids = {t.id for t in TEMPLATES if t.split == "train"}
    test_ids = {t.id for t in TEMPLATES if t.split == "test"}
    assert train_ids and test_ids and not train_ids & test_ids
    assert {t.text for t in TEMPLATES if t.split == "train"}.isdisjoint(
        t.text for t in TEMPLATES if t.split == "test"
    )
    # Every schema is tested, and each test template's story and question are seen in training.
    for schema in {t.schema for t in TEMPLATES}:
        train = [t for t in TEMPLATES if t.schema == schema and t.split == "train"]
        test = [t for t in TEMPLATES if t.schema == schema and t.split == "test"]
        assert train and test
        for t in test:
            assert any(u.story == t.story for u in train) and any(u.question == t.question for u in train)
    train, test = arithmetic_splits(800, 400, seed=0, with_meta=True)
    assert {x["meta"]["template"] for x in train} <= train_ids
    assert {x["meta"]["template"] for x in test} <= test_ids
    assert {x["instruction"] for x in train}.isdisjoint(x["instruction"] for x in test)


def test_mix_of_operations_distractors_and_question_swaps():
    items = generate_arithmetic(2000, "train", seed=0, with_meta=True)
    schemas = Counter(x["meta"]["schema"] for x in items)
    assert set(schemas) == {t.schema for t in TEMPLATES}
    ops = Counter(op for x in items for _, op, _, _ in _STEP.findall(x["output"]))
    assert ops["+"] and ops["-"] and 0 < ops["*"] < ops["+"]
    two_step = sum(len(_STEP.findall(x["output"])) == 2 for x in items)
    assert 0.15 < two_step / len(items) < 0.5
    # A distractor adds a sentence, hence a number the answer does not use.
    with_extra = sum(len(re.findall(r"\d+", x["instruction"])) > len(x["meta"]["values"]) for x in items)
    assert 0.15 < with_extra / len(items) < 0.45
    assert not any(
        len(re.findall(r"\d+", x["instruction"])) > len(x["meta"]["values"])
        for x in generate_arithmetic(300, seed=0, distractor_prob=0.0, with_meta=True)
    )


def test_small_numbers_and_vocabulary():
    train, test = arithmetic_splits(5000, 1000, seed=0)
    numbers = [int(n) for x in train for n in re.findall(r"\d+", x["instruction"])]
    assert min(numbers) >= 2 and max(numbers) <= 40
    assert max(int(x["answer"]) for x in train) <= 80

    def words(items):
        return {w for x in items for w in re.findall(r"[A-Za-z]+", x["instruction"] + " " + x["output"])}

    assert len(words(train)) < 150
    assert words(test) <= words(train), "a test-only word would be <unk> to a tokenizer built on train"


@pytest.mark.parametrize("max_number", [6, 10, 30])
def test_max_number_and_schemas(max_number):
    items = generate_arithmetic(400, "train", seed=1, max_number=max_number, with_meta=True)
    for item in items:
        _check_output(item)
        values = item["meta"]["values"]
        if item["meta"]["schema"] not in ("groups", "groups_plus", "start_unknown"):
            assert max(values) <= max_number
        assert int(item["answer"]) >= 2
    one_step = ["gain", "loss", "groups"]
    items = generate_arithmetic(100, "test", seed=1, schemas=one_step, with_meta=True)
    assert {x["meta"]["schema"] for x in items} == set(one_step)


def test_save_json_round_trip(tmp_path):
    items = generate_arithmetic(5, seed=1)
    path = tmp_path / "items.json"
    save_json(items, path)
    assert json.loads(path.read_text(encoding="utf-8")) == items


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        generate_arithmetic(3, "valid")
    with pytest.raises(ValueError, match="n must"):
        generate_arithmetic(-1)
    with pytest.raises(ValueError, match="max_number"):
        generate_arithmetic(3, max_number=5)
    with pytest.raises(ValueError, match="schemas"):
        generate_arithmetic(3, schemas=["gain", "division"])
    with pytest.raises(ValueError, match="distractor_prob"):
        generate_arithmetic(3, distractor_prob=1.5)
    assert generate_arithmetic(0) == []
