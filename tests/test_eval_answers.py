"""Rule-based answer extraction and checking: hand-derived golden cases, right and wrong.

Every case states its expected verdict exactly (`is True` / `is False` / `is None`), so a checker
that always says True, or never decides, fails.
"""

import time

import pytest

from pr1.eval.answers import check_answer, extract_answer, inline_math_equal, scorer_math_equal
from pr1.eval.problems import EvalProblem


def free(answer, **kw):
    return EvalProblem(benchmark="t", id="1", question="q", images=(), answer=answer, **kw)


def choice(answer, choices, **kw):
    return EvalProblem(
        benchmark="t",
        id="1",
        question="q",
        images=(),
        answer=answer,
        choices=tuple(choices),
        answer_type="choice",
        **kw,
    )


def grade(problem, response):
    extracted, _ = extract_answer(response)
    return check_answer(problem, extracted)


# ---- extraction -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "response, expected",
    [
        (
            "<think>\nx\n</think>\n<answer>\nSo \\boxed{\\frac{3}{4}}\n</answer>",
            ("\\frac{3}{4}", "answer_tag"),
        ),
        # the LAST complete block wins (a corrected answer), and its last box
        ("<answer>A</answer> wait, no. <answer>\\boxed{A} hmm \\boxed{B}</answer>", ("B", "answer_tag")),
        ("<answer> the answer is B </answer>", ("the answer is B", "answer_tag")),
        # nested braces inside the box
        ("<answer>\\boxed{\\frac{\\sqrt{3}}{2}}</answer>", ("\\frac{\\sqrt{3}}{2}", "answer_tag")),
        ("<answer>\\boxed{\\{1, 2\\}}</answer>", ("\\{1, 2\\}", "answer_tag")),
        ("\\boxed{\\boxed{5}}", ("5", "boxed")),
        # no answer block: the last box anywhere
        ("First \\boxed{3}, then \\boxed{x^{2}+1}.", ("x^{2}+1", "boxed")),
        ("<answer></answer> but \\boxed{7}", ("7", "boxed")),
        ("<answer>\\boxed{}</answer>", (None, "none")),
        ("<answer>5", (None, "none")),  # not a complete block
        ("\\boxed{3", (None, "none")),  # unbalanced box
        ("I think it is five.", (None, "none")),
        ("", (None, "none")),
        (None, (None, "none")),
    ],
)
def test_extract_answer(response, expected):
    assert extract_answer(response) == expected


# ---- free form ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "gold, response, expected",
    [
        ("0.75", "<answer>\\boxed{\\frac{3}{4}}</answer>", True),
        ("0.75", "<answer>\\boxed{3/4}</answer>", True),
        ("0.75", "<answer>\\boxed{\\dfrac{3}{4}}</answer>", True),
        ("3/4", "<answer>\\boxed{0.75}</answer>", True),
        ("\\frac{3}{4}", "<answer>\\boxed{0.75}</answer>", True),
        ("0.75", "<answer>\\boxed{\\frac{3}{5}}</answer>", False),
        ("0.75", "<answer>\\boxed{0.76}</answer>", False),
        ("\\frac{\\sqrt{3}}{2}", "<answer>\\boxed{\\frac{\\sqrt{3}}{2}}</answer>", True),
        ("\\frac{\\sqrt{3}}{2}", "<answer>\\boxed{\\frac{\\sqrt{2}}{2}}</answer>", False),
        ("2\\sqrt{3}", "\\boxed{\\sqrt{12}}", True),
        ("2\\sqrt{3}", "\\boxed{3}", False),
        ("1000", "<answer>1,000</answer>", True),
        ("5", "<answer>5.0</answer>", True),
        ("$\\frac{1}{3}$", "<answer>\\boxed{1/3}</answer>", True),  # MathVision writes gold in $...$
        ("4.4 m", "<answer>\\boxed{4.4}</answer>", True),  # MathVerse gold with its unit
    ],
)
def test_free_form(gold, response, expected):
    assert grade(free(gold), response) is expected


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("5 cm", True),
        ("5cm", True),
        ("5 \\text{ cm}", True),
        ("5\\,\\mathrm{cm}", True),
        ("6 cm", False),
    ],
)
def test_units_with_mathvista_unit(answer, expected):
    assert check_answer(free("5", unit="cm"), answer) is expected


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("30°", True),
        ("30^\\circ", True),
        ("30^{\\circ}", True),
        ("30 degrees", True),
        ("31°", False),
    ],
)
def test_degrees(answer, expected):
    assert check_answer(free("30"), answer) is expected


@pytest.mark.parametrize(
    "answer, expected",
    [
        # MathVista rounds the extracted float to `precision` decimals:
        # 1.235 -> 1.24 (half up), 1.2449 -> 1.24
        ("1.235", True),
        ("1.24", True),
        ("1.2449", True),
        ("1.23", False),
        ("1.2", False),
        ("1.245", False),
    ],
)
def test_mathvista_precision(answer, expected):
    assert check_answer(free("1.24", precision=2), answer) is expected


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("[2014, 2016]", True),
        ("2014, 2016", True),
        ("[2016, 2014]", False),
        ("[2014]", False),
    ],
)
def test_list_answers(answer, expected):
    assert check_answer(free("[2014, 2016]", subsets={"answer_type": "list"}), answer) is expected


def test_missing_and_undecidable():
    p = free("5")
    assert check_answer(p, None) is False
    assert check_answer(p, "   ") is False
    assert grade(p, "I think it is five.") is False  # nothing to extract at all
    assert check_answer(p, "five") is None  # words: the rules cannot compare them
    assert check_answer(p, "The answer is 5 because AB = 6") is None  # a sentence, not a value
    assert check_answer(free("Yes"), "yes") is True
    assert check_answer(free("Yes"), "No") is None


# ---- multiple choice ------------------------------------------------------------------------

CM = choice("B", ["3 cm", "4 cm", "5 cm"])


@pytest.mark.parametrize(
    "response, expected",
    [
        ("<answer>\\boxed{B}</answer>", True),
        ("<answer>(B)</answer>", True),
        ("<answer>B.</answer>", True),
        ("<answer>Option B</answer>", True),
        ("<answer>\\boxed{\\text{B}}</answer>", True),
        ("<answer>the answer is B</answer>", True),
        ("<answer>B. 4 cm</answer>", True),
        ("<answer>\\boxed{4 cm}</answer>", True),  # the option's text
        ("<answer>\\boxed{4}</answer>", True),  # its value without the unit
        ("<answer>\\boxed{A}</answer>", False),
        ("<answer>(C)</answer>", False),
        ("<answer>\\boxed{3 cm}</answer>", False),
        ("<answer>\\boxed{5}</answer>", False),
        ("<answer>\\boxed{7}</answer>", False),  # a value no option has
        ("<answer>B and C</answer>", False),  # two different letters
        ("<answer>A, B</answer>", False),
        ("<answer>\\boxed{E}</answer>", False),  # no such option
    ],
)
def test_choice_letters_and_texts(response, expected):
    assert grade(CM, response) is expected


def test_choice_by_math_equivalence():
    opts = ["2", "4.0", "0.5"]
    assert check_answer(choice("B", opts), "4") is True  # "4" is option B "4.0"
    assert check_answer(choice("C", opts), "\\frac12") is True  # "\frac12" is option C "0.5"
    assert check_answer(choice("C", opts), "\\frac{1}{2}") is True
    assert check_answer(choice("B", opts), "\\frac12") is False
    assert check_answer(choice("A", opts), "\\sqrt{4}") is True
    assert check_answer(choice("A", opts), "3") is False


def test_choice_special_cases():
    # MathVista 781 repeats an option: either letter of the repeated text is right.
    dup = choice("C", ["9", "12", "18", "18"])
    assert (
        check_answer(dup, "D") is True and check_answer(dup, "18") is True and check_answer(dup, "B") is False
    )
    # MathVerse answers with two letters ("C\nD" as released -> "C,D"): both and only both.
    two = choice("C,D", ["1", "2", "3", "4"])
    assert check_answer(two, "C and D") is True and check_answer(two, "C") is False
    # MathVision free-form questions whose options are drawn in the image: the gold is a letter.
    drawn = free("C")
    assert check_answer(drawn, "(C)") is True and check_answer(drawn, "B") is False
    # Options that are letter lists themselves: the answer spells an option.
    lists = choice("B", ["A and B", "A and C"])
    assert check_answer(lists, "A and C") is True and check_answer(lists, "A and B") is False
    # Free text the options do not contain: undecided, for the judge.
    words = choice("A", ["Tilapia", "Common water flea"])
    assert check_answer(words, "the water flea") is None
    assert check_answer(words, "tilapia") is True


# ---- math-verify guards ---------------------------------------------------------------------


def test_inline_math_equal_times_out(monkeypatch):
    import pr1.rewards.verify as verify

    def stuck(content, answer):
        time.sleep(30)
        return 1.0

    monkeypatch.setattr(verify, "verify_answer", stuck)
    t0 = time.monotonic()
    assert inline_math_equal("x^2", "y", timeout=0.2) is None
    assert time.monotonic() - t0 < 5
    # A checker given an undecided math comparison does not guess.
    assert check_answer(free("\\sqrt{2}"), "2^{1/2}", math_equal=lambda a, b: None) is None


def test_scorer_math_equal_boxes_the_prediction():
    calls = []

    class FakeScorer:
        def score(self, response, answer):
            calls.append((response, answer))
            return 1.0 if response == "\\boxed{\\pi/2}" else 0.0

    eq = scorer_math_equal(FakeScorer())
    assert check_answer(free("\\frac{\\pi}{2}"), "\\pi/2", math_equal=eq) is True
    assert check_answer(free("\\frac{\\pi}{2}"), "\\pi/3", math_equal=eq) is False
    assert calls[0] == ("\\boxed{\\pi/2}", "\\frac{\\pi}{2}")


def test_rules_decide_units_and_fractions_without_math_verify():
    # With math-verify undecided everywhere, our own unit stripping and exact arithmetic still decide.
    undecided = lambda a, b: None  # noqa: E731
    for answer, gold, unit, expected in [
        ("5 cm", "5", None, True),
        ("5\\,\\mathrm{cm}", "5", None, True),
        ("12 \\text{ m}^2", "12", None, True),
        ("30^{\\circ}", "30", None, True),
        ("3 years", "3", "years", True),
        ("25\\%", "25", None, True),
        ("\\dfrac{3}{4}", "0.75", None, True),
        ("6 cm", "5", None, False),
        ("2,016", "2016", None, True),
        ("-\\frac{1}{2}", "0.5", None, False),
    ]:
        assert check_answer(free(gold, unit=unit), answer, math_equal=undecided) is expected, (answer, gold)
    assert check_answer(CM, "4", math_equal=undecided) is True  # "4" is "4 cm" without its unit
