"""Reading the LLM-Adapters benchmark files, and removing training questions that leak into test sets.

Every file is a JSON list of ``{"instruction", "input", "output", "answer"}`` except ``mawps_trainset.json``,
whose items (``original_text``, ``equation``, ``ans``) are converted here into the same shape, with an output
in the style of the generated task: ``"(22 - 14) / 4 = 2. The answer is 2."``.

Leakage is measured the way the data README measures it: exact match of the question text after lower-casing
and collapsing whitespace.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence

__all__ = [
    "load_llm_adapters",
    "convert_mawps_item",
    "equation_to_expression",
    "format_number",
    "normalize_question",
    "question_of",
    "drop_overlap",
    "count_overlap",
]

FIELDS = ("instruction", "input", "output", "answer")
_MAWPS_FIELDS = ("original_text", "equation", "ans")
_EQ_TOKEN = re.compile(r"\d+\.\d*|\.\d+|\d+|[A-Za-z]+|[-+*/()=]")


def format_number(value: str | float | int) -> str:
    """``2.0 -> "2"``, ``0.7 -> "0.7"``: integral values without a trailing ``.0``, others in full."""
    x = float(value)
    if x.is_integer():
        return str(int(x))
    return repr(x)


def _tokenize_equation(equation: str) -> list[str]:
    compact = equation.replace(" ", "")
    tokens = _EQ_TOKEN.findall(compact)
    if not tokens or "".join(tokens) != compact:
        raise ValueError(f"equation must hold numbers, variables and + - * / ( ) =, got {equation!r}")
    return tokens


def _render(tokens: Sequence[str]) -> str:
    out: list[str] = []
    prev = None
    for tok in tokens:
        # A minus that follows nothing, an operator, "(" or "=" is a sign: glue it to what follows.
        if tok == "-" and (prev is None or prev in "+-*/(="):
            out.append("-")
        elif tok in "+-*/=":
            out.append(f" {tok} ")
        elif tok in "()":
            out.append(tok)
        elif tok[0].isalpha():
            out.append("x")
        else:
            out.append(format_number(tok))
        prev = tok
    return "".join(out)


def equation_to_expression(equation: str) -> str:
    """``"X=((22.0-14.0)/4.0)" -> "(22 - 14) / 4"``: drop the unknown, tidy numbers, spaces and outer parens.

    ValueError unless the equation is ``<unknown> = <arithmetic on numbers>``.
    """
    tokens = _tokenize_equation(equation)
    if (
        len(tokens) < 3
        or not tokens[0][0].isalpha()
        or tokens[1] != "="
        or any(t == "=" or t[0].isalpha() for t in tokens[2:])
    ):
        raise ValueError(f"equation must be '<unknown>=<arithmetic on numbers>', got {equation!r}")
    tokens = tokens[2:]
    # Parentheses around the whole expression say nothing; peel them while they match each other.
    while tokens[0] == "(" and tokens[-1] == ")" and _matching_paren(tokens, 0) == len(tokens) - 1:
        tokens = tokens[1:-1]
    return _render(tokens)


def _matching_paren(tokens: Sequence[str], start: int) -> int:
    depth = 0
    for i in range(start, len(tokens)):
        depth += tokens[i] == "("
        depth -= tokens[i] == ")"
        if depth == 0:
            return i
    return -1


def convert_mawps_item(item: Mapping) -> dict:
    """One ``mawps_trainset.json`` item in the LLM-Adapters shape.

    ``x=<expression>`` (all but 19 of 1898 items) becomes ``"<expression> = N. The answer is N."``; an
    equation to solve (``"X-6=52"``) becomes ``"x - 6 = 52, so x = N. The answer is N."``.
    """
    answer = format_number(item["ans"])
    equation = str(item["equation"])
    try:
        rationale = f"{equation_to_expression(equation)} = {answer}."
    except ValueError:
        rationale = f"{_render(_tokenize_equation(equation))}, so x = {answer}."
    return {
        "instruction": " ".join(str(item["original_text"]).split()),
        "input": "",
        "output": f"{rationale} The answer is {answer}.",
        "answer": answer,
    }


def load_llm_adapters(path: str | os.PathLike) -> list[dict]:
    """The items of one LLM-Adapters JSON file as ``{"instruction", "input", "output", "answer"}`` dicts.

    Values are returned as strings (``answer`` as in the file, e.g. "18.0"); ``mawps_trainset.json`` style
    items are converted by :func:`convert_mawps_item`.
    """
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, list):
        raise ValueError(f"{os.fspath(path)!r} must hold a JSON list, got {type(data).__name__}")
    out = []
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise ValueError(f"{os.fspath(path)!r} item {i} must be an object, got {type(item).__name__}")
        if all(k in item for k in _MAWPS_FIELDS):
            out.append(convert_mawps_item(item))
        elif "instruction" in item and "answer" in item:
            out.append({k: "" if item.get(k) is None else str(item.get(k)) for k in FIELDS})
        else:
            raise ValueError(
                f"{os.fspath(path)!r} item {i} must have keys {FIELDS} or {_MAWPS_FIELDS}, got {sorted(item)}"
            )
    return out


def normalize_question(text: str) -> str:
    """Lower case, whitespace runs collapsed to one space, ends stripped: the README's leakage measure."""
    return " ".join(text.lower().split())


def question_of(item: Mapping) -> str:
    """The question text of an item in either file shape."""
    if "instruction" in item:
        return item["instruction"]
    if "original_text" in item:
        return item["original_text"]
    raise ValueError(f"item must have an 'instruction' or 'original_text' key, got {sorted(item)}")


def _question_set(tests: Iterable) -> set[str]:
    tests = list(tests)
    # One test set (a list of items) or several (a list of lists).
    sets = [tests] if tests and isinstance(tests[0], Mapping) else tests
    return {normalize_question(question_of(item)) for test in sets for item in test}


def drop_overlap(train: Sequence[Mapping], tests: Iterable) -> tuple[list, int]:
    """``(kept, n_dropped)``: the training items whose question appears in none of ``tests``.

    ``tests`` is one test set or a list of test sets. ``n_dropped`` counts training items, which can differ
    from :func:`count_overlap` (test items found in training): mawps_trainset vs mawps_test drops 27 training
    items while 28 test items are covered, because one covered question occurs twice in mawps_test.
    """
    questions = _question_set(tests)
    kept = [item for item in train if normalize_question(question_of(item)) not in questions]
    return kept, len(train) - len(kept)


def count_overlap(train: Iterable[Mapping], test: Sequence[Mapping]) -> int:
    """How many ``test`` items have their question in ``train`` (the number the data README reports)."""
    seen = {normalize_question(question_of(item)) for item in train}
    return sum(normalize_question(question_of(item)) in seen for item in test)
