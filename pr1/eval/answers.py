"""Rule-based answer extraction and checking for evaluation.

Where it sits: for each response the runner calls `extract_answer(response)` and then
`check_answer(problem, extracted)`. True/False are final; None means the rules cannot decide
(free text that no rule can compare) and the runner may ask an LLM judge, as the paper does for
every problem. A response with nothing to extract scores False, not None.

Extraction takes the LAST complete `<answer>...</answer>` (and inside it the last `\\boxed{...}`,
braces balanced), else the last `\\boxed{...}` anywhere. Training's accuracy reward takes the FIRST
answer block (pr1.rewards.accuracy, as released); for evaluation the last one is the model's final
word (a response that drafts an answer and then corrects it is scored on the correction), and boxes
follow the same rule.

Multiple choice: a letter in any usual form ("B", "(B)", "B.", "B: 4 cm", "Option B", "\\text{B}",
"the answer is B"), or the text of an option (compared after normalizing LaTeX and spacing, then with
units stripped, then by math equivalence: "4" picks option "4.0", "\\frac12" picks "0.5"). Naming two
different options is wrong. Free form: plain numbers compare exactly (no sympy), MathVista floats
after rounding both to `precision` decimals (half up), lists element-wise, everything else with
math-verify through `pr1.rewards.verify.verify_answer` (which boxes the gold answer). Trailing units
(the problem's `unit`, cm/m/mm/km, degrees, °, ^\\circ, ...) are stripped from both sides first;
units are not converted (5 m vs gold 5 cm counts as equal: gold answers mix units and plain numbers).

math-verify runs sympy, which can hang on adversarial input. The default, `inline_math_equal`, runs
it in this process under a SIGALRM timer when called from the main thread (math-verify's own guard
works the same way) and UNGUARDED from other threads; `scorer_math_equal(AccuracyScorer(...))` runs
it in the accuracy reward's worker pool instead, with its soft and hard timeouts. A timer cannot
interrupt sympy inside C code (huge integer powers); only the pool's hard deadline can.
"""

from __future__ import annotations

import logging
import re
import signal
import threading
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from fractions import Fraction
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from pr1.eval.problems import EvalProblem
    from pr1.rewards.accuracy import AccuracyScorer

MathEqual = Callable[[str, str], "bool | None"]  # (prediction, gold) -> equal? None: undecided
MATH_TIMEOUT_S = 5.0

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"  # as problems.LETTERS; not imported: this module stays light
_ANSWER = re.compile(r"<answer>((?:(?!<answer>).)*?)</answer>", re.DOTALL)
_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")

# ---- extraction -----------------------------------------------------------------------------


def boxed_contents(text: str) -> list[str]:
    """Contents of the top-level \\boxed{...} (and \\fbox{...}) in order; unclosed ones are skipped."""
    out, pos = [], 0
    while (m := _BOX.search(text, pos)) is not None:
        depth, j = 1, m.end()
        while j < len(text) and depth:
            c = text[j]
            if c == "\\" and j + 1 < len(text) and text[j + 1] in "{}":
                j += 2  # \{ and \} are literal braces, not grouping
                continue
            depth += (c == "{") - (c == "}")
            j += 1
        if depth:
            pos = m.end()
            continue
        out.append(text[m.end() : j - 1])
        pos = j
    return out


def _last_box(text: str) -> str | None:
    """The last non-empty \\boxed content, with \\boxed{\\boxed{5}} read as 5."""
    boxes = [b.strip() for b in boxed_contents(text) if b.strip()]
    if not boxes:
        return None
    inner = boxes[-1]
    while (
        (m := _BOX.match(inner))
        and (nested := boxed_contents(inner))
        and len(m.group(0)) + len(nested[0]) + 1 == len(inner)
    ):
        inner = nested[0].strip()
    return inner or None


def extract_answer(response: str | None) -> tuple[str | None, str]:
    """(answer, how): how is "answer_tag" (from the last non-empty <answer> block, its last \\boxed
    if any), "boxed" (the last \\boxed anywhere) or "none" (answer None)."""
    if not isinstance(response, str) or not response.strip():
        return None, "none"
    for content in reversed(_ANSWER.findall(response)):
        box = _last_box(content)
        if box:
            return box, "answer_tag"
        content = re.sub(
            r"\\(?:boxed|fbox)\s*\{\s*\}", "", content
        ).strip()  # an empty \\boxed{} says nothing
        if content:
            return content, "answer_tag"
    box = _last_box(response)
    if box:
        return box, "boxed"
    return None, "none"


# ---- normalization --------------------------------------------------------------------------

_WRAPPERS = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_DEGREE = re.compile(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|\\degree|°|º")
_UNITS = (
    r"cm|mm|km|dm|m|meters?|metres?|centimeters?|centimetres?|millimeters?|kilometers?|inches|inch|"
    r"feet|foot|ft|yards?|miles?|units?|degrees?|deg|°|seconds?|sec|s|minutes?|min|hours?|h|kg|g|"
    r"grams?|liters?|litres?|l|ml|years?|days?|dollars?|cents?|\\?%"
)
_UNIT_TAIL = re.compile(
    rf"(?<=[\d}}).])(?:\s|\\,|\\;|\\ |~)*(?:\\(?:text|mathrm|mbox)\s*\{{)?"
    rf"(?:\s|\\,|\\;|\\ |~)*(?:{_UNITS})\s*\}}?\s*"
    rf"(?:\^\s*\{{?\s*[23]\s*\}}?|[²³])?\s*\}}?\s*\.?$",
    re.IGNORECASE,
)


def normalize(text: str) -> str:
    """Text for exact comparison: LaTeX wrappers and $ dropped, \\dfrac -> \\frac, degree signs
    unified, whitespace and a final period removed, lower case."""
    s = str(text).strip()
    s = s.replace("$", "").replace("\\left", "").replace("\\right", "").replace("\\!", "")
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    for _ in range(3):
        s = _WRAPPERS.sub(r"\1", s)
    s = _DEGREE.sub("°", s)
    s = re.sub(r"\s+", "", s).rstrip(".").lower()
    return s


def strip_units(text: str, unit: str | None = None) -> str:
    """`text` without trailing units after a number ("5 cm", "30^\\circ", "12 \\text{ m}^2"), and
    without the problem's own `unit`."""
    s = str(text).strip().replace("$", "").strip()
    if unit:
        s = re.sub(rf"(?<=[\d}}).])\s*(?:\\text\s*\{{\s*)?{re.escape(unit.strip())}\s*\}}?\s*$", "", s)
    for _ in range(3):
        new = _UNIT_TAIL.sub("", _DEGREE.sub("°", s)).strip()
        if new == s or _has_variables(new):  # "x^2+2h": h is a variable, not hours
            break
        s = new
    return s


def _has_variables(text: str) -> bool:
    return bool(re.search(r"[A-Za-z]", re.sub(r"\\[A-Za-z]+", "", text)))


_NUMBER = re.compile(
    r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+(?:[eE][-+]?\d+)?"
)


def plain_number(text: str) -> Fraction | None:
    """A plain decimal, integer (thousands commas allowed) or a/b fraction, exactly; else None."""
    s = str(text).strip().replace("$", "").replace("\\!", "").strip()
    if m := re.fullmatch(r"([-+]?)\s*\\[dt]?frac\s*\{\s*([^{}]+?)\s*\}\s*\{\s*([^{}]+?)\s*\}", s):
        if m.group(2).lstrip().startswith(("-", "+")):
            return None
        s = f"{m.group(1)}{m.group(2)}/{m.group(3)}"
    parts = s.split("/")
    if len(parts) > 2 or not all(_NUMBER.fullmatch(p.strip()) for p in parts):
        return None
    try:
        values = [Fraction(Decimal(p.strip().replace(",", ""))) for p in parts]
    except (InvalidOperation, ValueError):
        return None
    if len(values) == 2:
        return values[0] / values[1] if values[1] else None
    return values[0]


def _looks_mathematical(text: str) -> bool:
    return bool(re.search(r"[\d\\^=]", text)) and len(text) <= 300


def _is_value(text: str) -> bool:
    """A bare value ("5 cm", "x = 3", "\\frac{1}{2}"), not a sentence: math-verify would pick some
    number out of "The answer is 5 because AB = 6", and the rules must not guess which."""
    words = re.findall(r"[A-Za-z]{3,}", re.sub(r"\\[A-Za-z]+", " ", text))
    return len(text) <= 120 and len(words) <= 1


# ---- math equivalence -----------------------------------------------------------------------


class _Timeout(BaseException):
    # BaseException: math-verify catches Exception and would report a timeout as "not equal".
    pass


def _on_alarm(signum, frame):
    raise _Timeout()


def _boxed(text: str) -> str:
    return text if "\\boxed" in text else "\\boxed{" + text + "}"


def inline_math_equal(pred: str, gold: str, *, timeout: float = MATH_TIMEOUT_S) -> bool | None:
    """math-verify equivalence of `pred` and `gold` in this process; None on timeout or error.

    In the main thread a SIGALRM interval timer bounds the call; elsewhere it runs unguarded (sympy
    can then hang on adversarial input: use `scorer_math_equal` there).
    """
    from pr1.rewards.verify import verify_answer

    # With its own timeouts off (we guard instead) math-verify warns on every call.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    if threading.current_thread() is not threading.main_thread():
        try:
            return bool(verify_answer(_boxed(pred), gold))
        except Exception:
            return None
    old = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        return bool(verify_answer(_boxed(pred), gold))
    except _Timeout:
        return None
    except Exception:
        return None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def scorer_math_equal(scorer: "AccuracyScorer") -> MathEqual:
    """A `math_equal` that runs math-verify in the accuracy reward's worker pool (timeouts there
    score 0, so a timeout reads as "not equal" here)."""

    def equal(pred: str, gold: str) -> bool | None:
        return scorer.score(_boxed(pred), gold) > 0.5

    return equal


# ---- checking -------------------------------------------------------------------------------

_FILLER = re.compile(
    r"\b(?:the|final|correct|right|answer|answers|option|options|choice|choices|is|are|"
    r"and|or|should|be|would|letter)\b",
    re.IGNORECASE,
)
_LEADING_LETTER = re.compile(r"\(?([A-Z])\)?\s*[.:：)]\s*\S.*|\(([A-Z])\)\s*\S.*", re.DOTALL)


def named_letters(text: str) -> list[str] | None:
    """The option letters an answer names ("B", "(B)", "Option B", "the answer is B", "B. 4 cm",
    "B and C"), in order; None when it is not a letter answer."""
    s = str(text).strip().replace("$", "")
    for _ in range(3):
        s = _WRAPPERS.sub(r"\1", s)
    s = s.strip()
    words = re.sub(r"[()\[\].,:;：&/*]", " ", _FILLER.sub(" ", s)).split()
    if words and all(len(w) == 1 and w in LETTERS for w in words):
        return list(dict.fromkeys(words))
    m = _LEADING_LETTER.fullmatch(s)
    if m:
        return [m.group(1) or m.group(2)]
    return None


def check_answer(
    problem: "EvalProblem", extracted: str | None, *, math_equal: MathEqual | None = None
) -> bool | None:
    """Is `extracted` (from `extract_answer`) the problem's answer? None: the rules cannot decide."""
    if extracted is None or not str(extracted).strip():
        return False
    equal = math_equal or inline_math_equal
    text = str(extracted).strip()
    gold = _gold_letters(problem)
    if gold is not None:
        return _check_choice(problem, text, gold, equal)
    return _check_free(problem, text, equal)


def _gold_letters(problem) -> list[str] | None:
    n = len(problem.choices) if problem.choices else len(LETTERS)
    if problem.answer_type == "choice":
        letters = named_letters(problem.answer)
        if letters and all(LETTERS.index(x) < n for x in letters):
            return letters
        return None  # released in another form (a few MathVerse answers): compare as free text
    if re.fullmatch(r"[A-H]", problem.answer.strip()):
        return [problem.answer.strip()]  # MathVision free-form questions with options drawn in the image
    return None


def _check_choice(problem, text: str, gold: list[str], equal: MathEqual) -> bool | None:
    choices = problem.choices
    letters = named_letters(text)
    if choices and letters is not None and len(letters) > 1:
        # Options that are themselves letter lists ("A and B", "R, D, N"): the answer spells an option.
        spelled = [LETTERS[i] for i, c in enumerate(choices) if normalize(c) == normalize(text)]
        letters = spelled or letters
    if letters is None:
        letters = _letters_by_text(choices, text, problem.unit, equal) if choices else None
        if letters is None:
            return None
    if not choices:
        return set(letters) == set(gold) and (len(gold) > 1 or len(letters) == 1)

    def same(letter):  # options repeated in the release (MathVista 587, 740, 781) are one answer
        i = LETTERS.index(letter)
        if i >= len(choices):
            return letter
        return LETTERS[[normalize(c) for c in choices].index(normalize(choices[i]))]

    named, want = {same(x) for x in letters}, {same(x) for x in gold}
    return named == want


def _letters_by_text(choices, text: str, unit: str | None, equal: MathEqual) -> list[str] | None:
    """Letters of the options `text` spells out; [] when it is a value no option has; None when undecided."""
    norm = normalize(text)
    exact = [LETTERS[i] for i, c in enumerate(choices) if normalize(c) == norm]
    if exact:
        return exact
    bare = normalize(strip_units(text, unit))
    stripped = [LETTERS[i] for i, c in enumerate(choices) if normalize(strip_units(c, unit)) == bare]
    if stripped:
        return stripped
    if not (_looks_mathematical(text) and _is_value(text)):
        return None
    pred = strip_units(text, unit)
    verdicts = [equal(pred, strip_units(c, unit)) if _looks_mathematical(c) else False for c in choices]
    hits = [LETTERS[i] for i, v in enumerate(verdicts) if v]
    if len({normalize(choices[LETTERS.index(x)]) for x in hits}) > 1:
        return None  # equal to two different options (e.g. "4" and "4.0"): leave it to the judge
    if hits:
        return hits
    if all(_looks_mathematical(c) for c in choices) and None not in verdicts:
        return []
    return None


def _check_free(problem, text: str, equal: MathEqual) -> bool | None:
    gold_raw = problem.answer
    pred, gold = strip_units(text, problem.unit), strip_units(gold_raw, problem.unit)

    if problem.subsets.get("answer_type") == "list" or (gold.startswith("[") and gold.endswith("]")):
        g, p = _number_list(gold), _number_list(pred)
        if g is not None and p is not None:
            return g == p

    gp, pp = plain_number(gold), plain_number(pred)
    if problem.precision is not None and gp is not None and pp is not None:
        return _round(pp, problem.precision) == _round(gp, problem.precision)
    if gp is not None and pp is not None:
        return gp == pp

    if normalize(pred) == normalize(gold):
        return True
    if not _is_value(pred):
        return None
    verdict = equal(pred, gold)
    if verdict:
        return True
    if verdict is False and _looks_mathematical(pred) and _looks_mathematical(gold):
        return False
    return None


def _round(x: Fraction, places: int) -> Decimal:
    # Half up on the exact value, so "1.235" -> 1.24 whatever binary floats would do.
    return (Decimal(x.numerator) / Decimal(x.denominator)).quantize(Decimal(1).scaleb(-places), ROUND_HALF_UP)


def _number_list(text: str) -> list[Fraction] | None:
    s = str(text).strip().replace("$", "").replace("\\left", "").replace("\\right", "").strip()
    if s[:1] in "[(" and s[-1:] in "])":
        s = s[1:-1]
    items = [i.strip() for i in s.split(",")]
    values = [plain_number(i) for i in items]
    return values if items and all(v is not None for v in values) else None
