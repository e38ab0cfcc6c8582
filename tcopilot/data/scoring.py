"""Answer extraction and exact-match scoring, close to LLM-Adapters' evaluate.py.

Arithmetic: the number after the first "answer is" if there is one (the model's committed answer; a model
that keeps generating past it often starts a new problem), else the last number in the text (what
LLM-Adapters does). Multiple choice / true-false: the first listed choice after "answer is", else the first
one anywhere in the text (what LLM-Adapters does).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

__all__ = [
    "extract_answer",
    "parse_number",
    "is_correct",
    "exact_match_accuracy",
    "extract_choice",
    "answer_format_choices",
    "is_correct_choice",
]

# A sign counts only where it cannot be a binary minus: "7-5" is 7 and 5, "x=-5" and "is -5" are -5.
# Thousands separators only in groups of three, so "3,4" stays two numbers.
_NUMBER = re.compile(
    r"(?:(?<![\w)\].])[-\u2212])?"
    r"(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
)
_ANSWER_IS = re.compile(r"answer\s+is", re.IGNORECASE)
_ANSWER_FORMAT = re.compile(r"answer\s+format\s*:\s*([\w/ ]+)", re.IGNORECASE)


def _to_float(token: str) -> float:
    return float(token.replace(",", "").replace("\u2212", "-"))


def extract_answer(text: str) -> float | None:
    """The numeric answer in a model's output, or None when it holds no number."""
    m = _ANSWER_IS.search(text)
    if m:
        # Only the same sentence may supply the number: "The answer is. 5 + 3" is no answer of 5.
        tail = re.split(r"(?<!\d)\.(?!\d)|\n", text[m.end() :], maxsplit=1)[0]
        found = _NUMBER.search(tail)
        if found:
            return _to_float(found.group())
    numbers = _NUMBER.findall(text)
    return _to_float(numbers[-1]) if numbers else None


def parse_number(answer: str | float | int) -> float:
    """A reference answer ("12", "12.0", "1,234", 12) as a float; ValueError when it is not a number."""
    if isinstance(answer, bool):
        raise ValueError(f"answer must be a number or a numeric string, got {answer!r}")
    if isinstance(answer, (int, float)):
        return float(answer)
    text = str(answer).strip()
    if not _NUMBER.fullmatch(text):
        raise ValueError(f"answer must be a number or a numeric string, got {answer!r}")
    return _to_float(text)


def is_correct(prediction_text: str, answer: str | float | int, rel_tol: float = 1e-4) -> bool:
    """Whether the number extracted from ``prediction_text`` equals ``answer`` to ``rel_tol``.

    An absolute tolerance of ``rel_tol`` as well, so that an answer of 0 can be matched.
    """
    pred = extract_answer(prediction_text)
    if pred is None:
        return False
    return math.isclose(pred, parse_number(answer), rel_tol=rel_tol, abs_tol=rel_tol)


def exact_match_accuracy(
    predictions: Sequence[str], answers: Sequence[str | float | int], rel_tol: float = 1e-4
) -> float:
    """Fraction of predictions whose extracted number matches the reference answer."""
    if len(predictions) != len(answers):
        raise ValueError(
            f"predictions and answers must have the same length, got {len(predictions)} and {len(answers)}"
        )
    if not predictions:
        raise ValueError("predictions must not be empty: accuracy over no items is undefined")
    return sum(is_correct(p, a, rel_tol) for p, a in zip(predictions, answers)) / len(predictions)


def _choice_pattern(choices: Sequence[str]) -> re.Pattern:
    # Longest first, and whole words only, so that "answer1" never matches inside "answer10".
    alts = "|".join(re.escape(c) for c in sorted(choices, key=len, reverse=True))
    return re.compile(rf"(?<![\w])(?:{alts})(?![\w])", re.IGNORECASE)


def extract_choice(text: str, choices: Sequence[str]) -> str | None:
    """The choice (as spelled in ``choices``) a model picked, e.g. "true"/"false" or "answer1".."answer4"."""
    if not choices:
        raise ValueError("choices must not be empty")
    pattern = _choice_pattern(choices)
    by_lower = {c.lower(): c for c in choices}
    m = _ANSWER_IS.search(text)
    found = pattern.search(text, m.end()) if m else None
    if found is None:
        found = pattern.search(text)
    return by_lower[found.group().lower()] if found else None


def answer_format_choices(instruction: str) -> list[str] | None:
    """The choices an LLM-Adapters commonsense prompt lists after "Answer format:", e.g. ["true", "false"]."""
    m = _ANSWER_FORMAT.search(instruction)
    if not m:
        return None
    choices = [c.strip() for c in m.group(1).split("/") if c.strip()]
    return choices or None


def is_correct_choice(prediction_text: str, answer: str, choices: Sequence[str]) -> bool:
    picked = extract_choice(prediction_text, choices)
    return picked is not None and picked.lower() == answer.strip().lower()
