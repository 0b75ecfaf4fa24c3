"""The LLM half of answer checking in evaluation: an answer extractor and a verdict judge.

Where it sits: `pr1.eval.run` checks every response by rules first (`pr1.eval.answers`); when a
checker LLM is configured (any OpenAI-compatible server, e.g. SGLang serving Qwen2.5-72B-Instruct
as in the paper), it asks it (1) to extract the final answer when the rules found none, and (2) to
say whether an answer matches the ground truth when the rules cannot decide (or for every problem
with mode "all", which is the paper's protocol: an LLM verdict on every answer).

The prompts are our own. Both ask for a one-line, machine-readable reply ("ANSWER: ..." and
"VERDICT: CORRECT|INCORRECT"); a reply without it is retried once as a new request and otherwise
reported as a failure. A failed LLM check never becomes a verdict: the record keeps
`correct = null` with the error, the report counts it as unchecked, and a re-run re-checks it.
"""

from __future__ import annotations

import dataclasses
import re

from pr1.chat import ChatClient

EXTRACTOR_SYSTEM = (
    "You read a model's solution to a math problem and report the final answer it commits to. "
    "Copy the answer as the solution states it (a number, an expression, a choice letter or an option's "
    "text); do not solve the problem yourself and do not correct the solution. If the solution never "
    "commits to a final answer, say NONE.\n"
    "Reply with exactly one line: `ANSWER: <the final answer>` or `ANSWER: NONE`."
)

EXTRACTOR_EXAMPLES = [
    (
        "Question: What is the area of the square?\n\nSolution: Each side is 4, so the area is 4 x 4 = 16 "
        "square units.",
        "ANSWER: 16",
    ),
    (
        "Question: Which angle is largest?\nChoices:\n(A) angle 1\n(B) angle 2\n(C) angle 3\n\n"
        "Solution: Angle 2 faces the longest side, so option B is the one.",
        "ANSWER: B",
    ),
    (
        "Question: Find x.\n\nSolution: We know that the triangle is isosceles, so the base angles",
        "ANSWER: NONE",
    ),
]

JUDGE_SYSTEM = (
    "You decide whether a student's final answer to a math problem matches the reference answer. "
    "Answers match when they are mathematically equivalent (2/4 and 0.5; 30 and 30 degrees when the "
    "question asks for degrees), or, for a multiple-choice question, when they pick the same option (by "
    "letter or by the option's text). Rounding to the precision the question asks for is fine; a "
    "different value, a different option, or several options at once do not match. Do not solve the "
    "problem again.\n"
    "Reply with exactly one line: `VERDICT: CORRECT` or `VERDICT: INCORRECT`."
)

JUDGE_EXAMPLES = [
    (
        "Question: What is the value of y?\nReference answer: 1.5\nStudent answer: \\frac{3}{2}",
        "VERDICT: CORRECT",
    ),
    (
        "Question: Which option is right?\nChoices:\n(A) 12\n(B) 15\n(C) 18\nReference answer: B\n"
        "Student answer: 18",
        "VERDICT: INCORRECT",
    ),
    ("Question: How long is AB? (Unit: cm)\nReference answer: 7\nStudent answer: 7 cm", "VERDICT: CORRECT"),
]

_ANSWER = re.compile(r"^\W*ANSWER\s*:\s*(.*?)\s*$", re.IGNORECASE | re.MULTILINE)
_VERDICT = re.compile(r"^\W*VERDICT\s*:\s*\W*(CORRECT|INCORRECT)\b", re.IGNORECASE | re.MULTILINE)
_NONE = {"none", "n/a", "no answer", ""}


def _few_shot(system: str, examples, user: str) -> list[dict]:
    messages = [{"role": "system", "content": system}]
    for question, reply in examples:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]
    return messages + [{"role": "user", "content": user}]


def _question_block(problem) -> str:
    # The question text already lists the choices when the benchmark has them (EvalProblem.question).
    text = f"Question: {problem.question.strip()}"
    if problem.unit:
        text += f" (Unit: {problem.unit})"
    return text


def extraction_messages(problem, response: str) -> list[dict]:
    return _few_shot(
        EXTRACTOR_SYSTEM, EXTRACTOR_EXAMPLES, f"{_question_block(problem)}\n\nSolution: {response.strip()}"
    )


def verdict_messages(problem, answer: str) -> list[dict]:
    reference = problem.answer
    if problem.choices and problem.answer_type == "choice":
        letter = problem.answer.strip().upper()
        index = ord(letter) - ord("A") if len(letter) == 1 and letter.isalpha() else -1
        if 0 <= index < len(problem.choices):
            reference = f"{letter} ({problem.choices[index]})"
    return _few_shot(
        JUDGE_SYSTEM,
        JUDGE_EXAMPLES,
        f"{_question_block(problem)}\nReference answer: {reference}\nStudent answer: {answer}",
    )


def parse_extraction(text: str) -> tuple[bool, str | None]:
    """(well_formed, answer): the last `ANSWER:` line; NONE → (True, None)."""
    found = _ANSWER.findall(text or "")
    if not found:
        return False, None
    answer = found[-1].strip().strip("`").strip()
    return True, (None if answer.lower() in _NONE else answer)


def parse_verdict(text: str) -> bool | None:
    """True/False from the last `VERDICT:` line, None when there is none."""
    found = _VERDICT.findall(text or "")
    return None if not found else found[-1].upper() == "CORRECT"


@dataclasses.dataclass
class LLMResult:
    value: object = None  # the extracted answer (str | None) or the verdict (bool)
    ok: bool = False  # False: the server failed or never replied in the asked form
    raw: str = ""
    error: str = ""


class LLMChecker:
    """Extractor and judge over one chat client (the same model does both, as in the paper).

    mode: "undecided" asks for a verdict only where the rules cannot decide; "all" asks for every
    problem that has an answer (the paper's protocol; the rules' verdict is kept in the record).
    """

    def __init__(self, client: ChatClient, *, mode: str = "undecided", max_tokens: int = 256):
        if mode not in ("undecided", "all"):
            raise ValueError(f"llm check mode must be 'undecided' or 'all', got {mode!r}")
        self.client = client
        self.mode = mode
        self.max_tokens = int(max_tokens)

    async def _ask(self, messages, parse) -> LLMResult:
        raw, error = "", ""
        for _ in range(2):  # one more request when the reply is not in the asked form
            reply = await self.client.complete(messages, temperature=0.0, max_tokens=self.max_tokens)
            if reply.failed:
                return LLMResult(ok=False, error=reply.error)
            raw = reply.text
            ok, value = parse(raw)
            if ok:
                return LLMResult(value=value, ok=True, raw=raw)
            self.client.counters["unparsed_replies"] += 1
            error = f"{self.client.role} {self.client.url}: reply not in the asked form: {raw[:200]!r}"
        return LLMResult(ok=False, raw=raw, error=error)

    async def extract(self, problem, response: str) -> LLMResult:
        return await self._ask(extraction_messages(problem, response), parse_extraction)

    async def verdict(self, problem, answer: str) -> LLMResult:
        def parse(text):
            v = parse_verdict(text)
            return v is not None, v

        return await self._ask(verdict_messages(problem, answer), parse)
