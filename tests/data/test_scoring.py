import pytest

from tcopilot.data.scoring import (
    answer_format_choices,
    exact_match_accuracy,
    extract_answer,
    extract_choice,
    is_correct,
    is_correct_choice,
    parse_number,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("7 + 5 = 12. The answer is 12.", 12.0),
        ("The answer is 12. Q: Tom has 3 apples", 12.0),
        ("the ANSWER is -4.", -4.0),
        ("The answer is $1,023.65 dollars", 1023.65),
        ("The answer is 0.5", 0.5),
        ("The answer is .5", 0.5),
        ("So 3 + 4 = 7", 7.0),
        ("20 - 3 = 17 apples, and 1,234,567 pencils", 1234567.0),
        ("7-5", 5.0),
        ("x =-5", -5.0),
        ("The answer is. 3 + 4 = 9", 9.0),
        ("between 3,4", 4.0),
        ("The answer is \u22123", -3.0),
        ("no number here", None),
        ("", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_parse_number():
    assert (
        parse_number("18.0") == 18.0 and parse_number("-15.0") == -15.0 and parse_number(" 1,234 ") == 1234.0
    )
    assert parse_number(3) == 3.0 and parse_number("1.8333333333333335") == pytest.approx(1.8333333333)
    for bad in ("twelve", "", "1 2", True):
        with pytest.raises(ValueError, match="answer"):
            parse_number(bad)


def test_is_correct():
    assert is_correct("The answer is 12.", "12.0")
    assert is_correct("The answer is 12.", 12)
    assert not is_correct("The answer is 13.", "12")
    assert not is_correct("I do not know", "12")
    assert is_correct("The answer is 0", "0.0")
    assert is_correct("The answer is 1.83333", "1.8333333333333335")
    assert not is_correct("The answer is 1.83", "1.8333333333333335")
    assert is_correct("The answer is 1.83", "1.8333333333333335", rel_tol=1e-2)
    # The first "answer is" wins over numbers a runaway generation adds later.
    assert is_correct("The answer is 12. Q: Amy has 3 cards. A: 3 + 4 = 7. The answer is 7.", "12")


def test_exact_match_accuracy():
    assert exact_match_accuracy(
        ["The answer is 1.", "2", "The answer is 4."], ["1", "2.0", "3"]
    ) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="same length"):
        exact_match_accuracy(["1"], ["1", "2"])
    with pytest.raises(ValueError, match="empty"):
        exact_match_accuracy([], [])


def test_extract_choice():
    tf = ["true", "false"]
    assert extract_choice("the correct answer is false", tf) == "false"
    assert extract_choice("True, because ...", tf) == "true"
    assert extract_choice("It is not true; the answer is false.", tf) == "false"
    assert extract_choice("untrue statement", tf) is None
    opts = ["answer1", "answer2", "answer3", "answer4"]
    assert extract_choice("the correct answer is Answer3", opts) == "answer3"
    assert extract_choice("answer10 or answer2", opts) == "answer2"
    assert extract_choice("the correct answer is answer2 not answer1", opts) == "answer2"
    assert extract_choice("nothing", opts) is None
    assert is_correct_choice("the correct answer is answer2", "answer2", opts)
    assert not is_correct_choice("no idea", "answer2", opts)
    with pytest.raises(ValueError, match="choices"):
        extract_choice("x", [])


def test_answer_format_choices():
    boolq = "Please answer ... question: is it?\n\nAnswer format: true/false"
    assert answer_format_choices(boolq) == ["true", "false"]
    obqa = "Answer1: a Answer2: b\n\nAnswer format: answer1/answer2/answer3/answer4"
    assert answer_format_choices(obqa) == ["answer1", "answer2", "answer3", "answer4"]
    assert answer_format_choices("What is 2 + 2?") is None
