"""Generated arithmetic word problems: the package's default task.

MAWPS/SVAMP-style problems, easy enough that a ~1M-parameter Pilot trained from scratch on two CPU cores
solves about half of them after a few hundred steps, and hard enough that it keeps making mistakes of every
kind (operation, operand, sum) for a Copilot to correct.

Each *schema* is one piece of arithmetic (``a + b``, ``a * b + c``, ...) told by several story sentences
and asked by several questions. A *template* is one (story, question) pair. Train and test use disjoint
templates: every story and every question appears in training, but the test split only holds pairings the
training split never shows, so test accuracy measures generalisation to new phrasings rather than recall.
Some schemas share a story and differ only in what is asked (the SVAMP "question swap"), so the question
must be read to pick the operation; distractor sentences add numbers that do not enter the answer.

Items come in the LLM-Adapters JSON shape ``{"instruction", "input", "output", "answer"}``; the output is a
rationale with one equation per step, then ``The answer is N.``, e.g. ``"7 + 5 = 12. The answer is 12."``.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = [
    "Template",
    "TEMPLATES",
    "SCHEMAS",
    "DEFAULT_MAX_NUMBER",
    "generate_arithmetic",
    "arithmetic_splits",
    "save_json",
]

SPLITS = ("train", "test")
# Measured with a 0.87M-parameter Llama Pilot, batch 32, 300 AdamW steps (lr 3e-3, one-cycle), greedy:
# operands up to 10 gave 60% exact match on train templates and 49% on held-out ones (errors of every kind
# left: wrong operation, wrong operand, wrong sum); up to 20 gave about 20% even after 400 steps.
DEFAULT_MAX_NUMBER = 10
# The two-subtraction schema needs a start of at least 6 to leave every count and the answer >= 2.
MIN_MAX_NUMBER = 6

# Small closed lists keep the word vocabulary well under 150 types, so a tiny embedding table suffices.
MALE_NAMES = ("Tom", "Ben", "Sam", "Max")
FEMALE_NAMES = ("Amy", "Lily", "Emma", "Mia")
OBJECTS = ("apples", "pencils", "marbles", "stickers", "books", "cookies", "cards", "shells")

# Sentences with a number that must not enter the answer. They always talk about another kind of object
# ({o2}), so even the questions that ask about every object in the story stay unambiguous.
DISTRACTORS = (
    "{k} has {d} {o2}.",
    "There are {d} {o2} on the table.",
    "{n} also has {d} {o2}.",
)
# "also" only reads well after the story's subject was introduced, so that one never opens the problem.
_OPENING_DISTRACTORS = (0, 1)


@dataclass(frozen=True)
class _Schema:
    name: str
    stories: tuple[str, ...]
    questions: tuple[str, ...]
    sample: Callable[[random.Random, int], tuple[int, ...]]
    steps: Callable[[tuple[int, ...]], tuple[tuple[int, str, int], ...]]
    expression: str


@dataclass(frozen=True)
class Template:
    """One (story, question) phrasing of a schema; ``split`` says which split may use it."""

    id: int
    schema: str
    expression: str
    n_steps: int
    split: str
    story: str
    question: str

    @property
    def text(self) -> str:
        return f"{self.story} {self.question}"


def _r(rng: random.Random, lo: int, hi: int) -> int:
    return rng.randint(lo, hi)


# Samplers take the largest operand ``top``. Every count a story states is at least 2, so it never says
# "1 apples", and every answer is at least 2 for the same reason.
def _pair_sum(rng, top):
    return _r(rng, 2, top), _r(rng, 2, top)


def _pair_diff(rng, top):
    a = _r(rng, 4, top)
    return a, _r(rng, 2, a - 2)


def _start_unknown(rng, top):
    start, gain = _r(rng, 2, top), _r(rng, 2, top)
    return start + gain, gain


# Factors stay in the small times table whatever ``top`` is: products are the hardest facts to learn.
def _groups(rng, top):
    return _r(rng, 2, 5), _r(rng, 2, min(10, top))


def _gain_loss(rng, top):
    # Three quarters of ``top`` keeps the intermediate sum near the one-step answers.
    a, b = _r(rng, 2, max(3, top * 3 // 4)), _r(rng, 2, max(3, top * 3 // 4))
    return a, b, _r(rng, 2, min(top, a + b - 2))


def _loss_loss(rng, top):
    a = _r(rng, 6, top)
    b = _r(rng, 2, a - 4)
    return a, b, _r(rng, 2, a - b - 2)


def _groups_plus(rng, top):
    return _r(rng, 2, 5), _r(rng, 2, min(10, top)), _r(rng, 2, top)


def _add(v):
    return ((v[0], "+", v[1]),)


def _sub(v):
    return ((v[0], "-", v[1]),)


def _mul(v):
    return ((v[0], "*", v[1]),)


def _add_sub(v):
    s = v[0] + v[1]
    return ((v[0], "+", v[1]), (s, "-", v[2]))


def _sub_sub(v):
    s = v[0] - v[1]
    return ((v[0], "-", v[1]), (s, "-", v[2]))


def _mul_add(v):
    s = v[0] * v[1]
    return ((v[0], "*", v[1]), (s, "+", v[2]))


# Placeholders: {n} the protagonist, {m} a second person, {P}/{p} the protagonist's pronoun, {o} the object,
# {a} {b} {c} the numbers in the order the expression uses them.
_SCHEMAS: tuple[_Schema, ...] = (
    _Schema(
        "gain",
        (
            "{n} has {a} {o}. {P} buys {b} more {o}.",
            "{n} had {a} {o}. {m} gave {n} {b} more {o}.",
            "{n} found {a} {o} on Monday and {b} {o} on Tuesday.",
        ),
        (
            "How many {o} does {n} have now?",
            "How many {o} does {n} have in all?",
            "How many {o} does {n} have altogether?",
        ),
        _pair_sum,
        _add,
        "a + b",
    ),
    _Schema(
        "combine",
        (
            "{n} has {a} {o} and {m} has {b} {o}.",
            "{n} has {a} {o}. {m} has {b} {o}.",
            "There are {a} {o} in a box and {b} {o} in a bag.",
        ),
        (
            "How many {o} are there in all?",
            "How many {o} are there altogether?",
            "What is the total number of {o}?",
        ),
        _pair_sum,
        _add,
        "a + b",
    ),
    _Schema(
        "loss",
        (
            "{n} has {a} {o}. {P} gives {b} {o} to {m}.",
            "{n} had {a} {o}. {P} lost {b} of them.",
            "There were {a} {o} in a box. {n} took {b} {o} out of the box.",
        ),
        ("How many {o} are left?", "How many {o} are left now?", "How many {o} remain?"),
        _pair_diff,
        _sub,
        "a - b",
    ),
    # Same stories as "combine": only the question tells which operation is wanted.
    _Schema(
        "compare",
        (
            "{n} has {a} {o} and {m} has {b} {o}.",
            "{n} has {a} {o}. {m} has {b} {o}.",
            "{m} has {b} {o}. {n} has {a} {o}.",
        ),
        (
            "How many more {o} does {n} have than {m}?",
            "How many fewer {o} does {m} have than {n}?",
            "How many more {o} does {n} have?",
        ),
        _pair_diff,
        _sub,
        "a - b",
    ),
    _Schema(
        "more_than",
        (
            "{m} has {a} {o}. {n} has {b} more {o} than {m}.",
            "{n} has {b} more {o} than {m}. {m} has {a} {o}.",
            "{m} has {a} {o}, and {n} has {b} more {o} than {m}.",
        ),
        (
            "How many {o} does {n} have?",
            "How many {o} does {n} have now?",
            "What is the number of {o} {n} has?",
        ),
        _pair_sum,
        _add,
        "a + b",
    ),
    # Question swap of "more_than": the known total belongs to {n}, the question asks for {m}.
    _Schema(
        "less_than",
        (
            "{n} has {a} {o}. {n} has {b} more {o} than {m}.",
            "{n} has {b} more {o} than {m}. {n} has {a} {o}.",
            "{n} has {a} {o}, and {m} has {b} fewer {o} than {n}.",
        ),
        (
            "How many {o} does {m} have?",
            "How many {o} does {m} have now?",
            "What is the number of {o} {m} has?",
        ),
        _pair_diff,
        _sub,
        "a - b",
    ),
    # Question swap of "gain": the end state is known, the start is asked.
    _Schema(
        "start_unknown",
        (
            "{n} had some {o}. {P} bought {b} more {o}. Now {p} has {a} {o}.",
            "{n} had some {o}. {m} gave {n} {b} more {o}, and now {n} has {a} {o}.",
            "{n} found {b} more {o}. Now {n} has {a} {o}.",
        ),
        (
            "How many {o} did {n} have at first?",
            "How many {o} did {n} have before?",
            "How many {o} did {n} start with?",
        ),
        _start_unknown,
        _sub,
        "a - b",
    ),
    # Question swap of "loss": the amount given away is asked.
    _Schema(
        "change_unknown",
        (
            "{n} had {a} {o}. {P} gave some {o} to {m}. Now {p} has {b} {o}.",
            "{n} had {a} {o}. After {p} gave some of them to {m}, {p} has {b} {o} left.",
            "{n} had {a} {o} and gave some to {m}. Now {n} has {b} {o} left.",
        ),
        (
            "How many {o} did {n} give to {m}?",
            "How many {o} did {m} get?",
            "How many {o} did {m} get from {n}?",
        ),
        _pair_diff,
        _sub,
        "a - b",
    ),
    _Schema(
        "groups",
        (
            "{n} has {a} bags. There are {b} {o} in each bag.",
            "{n} has {a} boxes with {b} {o} in each box.",
            "{n} buys {a} bags of {o}. Each bag has {b} {o}.",
        ),
        (
            "How many {o} does {n} have in all?",
            "How many {o} are there in all?",
            "How many {o} does {n} have?",
        ),
        _groups,
        _mul,
        "a * b",
    ),
    _Schema(
        "gain_loss",
        (
            "{n} has {a} {o}. {P} buys {b} more {o}. Then {p} gives {c} {o} to {m}.",
            "{n} had {a} {o}. {m} gave {n} {b} more {o}. Then {n} lost {c} {o}.",
            "{n} found {a} {o} on Monday and {b} {o} on Tuesday. {P} gave {c} of them to {m}.",
        ),
        ("How many {o} does {n} have now?", "How many {o} does {n} have left?", "How many {o} are left?"),
        _gain_loss,
        _add_sub,
        "a + b - c",
    ),
    _Schema(
        "loss_loss",
        (
            "{n} has {a} {o}. {P} gives {b} {o} to {m} and {c} {o} to {k}.",
            "{n} had {a} {o}. {P} lost {b} of them and gave {c} to {m}.",
            "{n} had {a} {o}. {P} lost {b} {o} on Monday and {c} {o} on Tuesday.",
        ),
        ("How many {o} are left?", "How many {o} does {n} have left?", "How many {o} remain?"),
        _loss_loss,
        _sub_sub,
        "a - b - c",
    ),
    _Schema(
        "combine_loss",
        (
            "{n} has {a} {o} and {m} has {b} {o}. They lose {c} {o}.",
            "{n} has {a} {o}. {m} has {b} {o}. They give {c} {o} to {k}.",
            "There are {a} {o} in a box and {b} {o} in a bag. {n} took {c} {o} out.",
        ),
        ("How many {o} are left?", "How many {o} are left now?", "How many {o} remain?"),
        _gain_loss,
        _add_sub,
        "a + b - c",
    ),
    _Schema(
        "groups_plus",
        (
            "{n} has {a} bags with {b} {o} in each bag. {P} also has {c} more {o}.",
            "{n} buys {a} bags of {o}. Each bag has {b} {o}. {m} gives {n} {c} more {o}.",
            "There are {a} boxes with {b} {o} in each box and {c} more {o} on the table.",
        ),
        (
            "How many {o} are there in all?",
            "How many {o} are there altogether?",
            "What is the total number of {o}?",
        ),
        _groups_plus,
        _mul_add,
        "a * b + c",
    ),
)

SCHEMAS: dict[str, _Schema] = {s.name: s for s in _SCHEMAS}


def _build_templates() -> tuple[Template, ...]:
    out = []
    for schema in _SCHEMAS:
        k = len(schema.stories)
        if len(schema.questions) != k:
            raise ValueError(f"schema {schema.name!r}: need as many questions as stories")
        for i, story in enumerate(schema.stories):
            for j, question in enumerate(schema.questions):
                # A Latin-square hold-out: the test pairs sit on one diagonal, so each story and each question
                # still appears with k-1 different partners in training.
                split = "test" if (i + j) % k == k - 1 else "train"
                n_steps = sum(ch in "+-*" for ch in schema.expression)
                out.append(
                    Template(len(out), schema.name, schema.expression, n_steps, split, story, question)
                )
    return tuple(out)


TEMPLATES: tuple[Template, ...] = _build_templates()


def _fmt_steps(steps: Sequence[tuple[int, str, int]]) -> tuple[str, int]:
    parts = []
    result = 0
    for x, op, y in steps:
        result = x + y if op == "+" else x - y if op == "-" else x * y
        parts.append(f"{x} {op} {y} = {result}.")
    return " ".join(parts), result


def _render(template: Template, rng: random.Random, distractor_prob: float, max_number: int) -> dict:
    schema = SCHEMAS[template.schema]
    values = schema.sample(rng, max_number)
    male = rng.random() < 0.5
    n = rng.choice(MALE_NAMES if male else FEMALE_NAMES)
    m, k = rng.sample([x for x in MALE_NAMES + FEMALE_NAMES if x != n], 2)
    o, o2 = rng.sample(OBJECTS, 2)
    slots = dict(n=n, m=m, k=k, o=o, o2=o2, P="He" if male else "She", p="he" if male else "she")
    slots.update(zip("abc", values))
    story = template.story.format(**slots)
    question = template.question.format(**slots)
    text = [story, question]
    if rng.random() < distractor_prob:
        which = rng.randrange(len(DISTRACTORS))
        sentence = DISTRACTORS[which].format(d=_r(rng, 2, max_number), **slots)
        at_start = which in _OPENING_DISTRACTORS and rng.random() < 0.5
        text = [sentence, story, question] if at_start else [story, sentence, question]
    rationale, answer = _fmt_steps(schema.steps(values))
    return {
        "instruction": " ".join(text),
        "input": "",
        "output": f"{rationale} The answer is {answer}.",
        "answer": str(answer),
        "_meta": {"template": template.id, "schema": template.schema, "values": list(values)},
    }


def generate_arithmetic(
    n: int,
    split: str = "train",
    seed: int = 0,
    *,
    max_number: int = DEFAULT_MAX_NUMBER,
    distractor_prob: float = 0.3,
    schemas: Sequence[str] | None = None,
    with_meta: bool = False,
) -> list[dict]:
    """``n`` word problems drawn uniformly from the templates of ``split`` ("train" or "test").

    ``max_number`` bounds the operands of additions and subtractions (factors stay in 2..5 x 2..10), and so
    sets the difficulty: answers stay at most ``2 * max_number`` except for products. ``distractor_prob``
    is the chance of one sentence with an irrelevant number; ``schemas`` restricts to some schemas (names in
    ``SCHEMAS``), e.g. the one-step ones. Deterministic in its arguments and independent of the global
    ``random`` state; the first ``k`` items of a call with ``n >= k`` equal those of the call with ``n = k``.
    ``with_meta`` adds a ``"meta"`` entry (template id, schema, sampled numbers) for per-template analysis.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if not isinstance(max_number, int) or max_number < MIN_MAX_NUMBER:
        raise ValueError(f"max_number must be an int >= {MIN_MAX_NUMBER}, got {max_number!r}")
    if not 0.0 <= distractor_prob <= 1.0:
        raise ValueError(f"distractor_prob must lie in [0, 1], got {distractor_prob!r}")
    if schemas is not None:
        unknown = sorted(set(schemas) - set(SCHEMAS))
        if unknown or not schemas:
            raise ValueError(f"schemas must be a non-empty subset of {sorted(SCHEMAS)}, got {list(schemas)}")
    # The split enters the seed so that train and test streams with the same seed are unrelated.
    rng = random.Random(seed * len(SPLITS) + SPLITS.index(split))
    pool = [t for t in TEMPLATES if t.split == split and (schemas is None or t.schema in schemas)]
    items = []
    for _ in range(n):
        item = _render(rng.choice(pool), rng, distractor_prob, max_number)
        meta = item.pop("_meta")
        if with_meta:
            item["meta"] = meta
        items.append(item)
    return items


def arithmetic_splits(n_train: int, n_test: int, seed: int = 0, **kwargs) -> tuple[list[dict], list[dict]]:
    """(train, test) items from disjoint template sets; ``kwargs`` go to :func:`generate_arithmetic`."""
    return (
        generate_arithmetic(n_train, "train", seed, **kwargs),
        generate_arithmetic(n_test, "test", seed, **kwargs),
    )


def save_json(items: Sequence[dict], path: str | os.PathLike) -> None:
    """Write ``items`` as one JSON list, the format of the LLM-Adapters data files."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(list(items), f, ensure_ascii=False, indent=1)
        f.write("\n")
