"""The format reward r_f: does the response follow the think/answer/boxed template of the prompt?

Where it sits: one of the host-side reward terms that `combine` mixes into the total (weight 0.1 in
the released run). The pattern is the one Perception-R1 released, used verbatim so a format score
here means the same as theirs.
"""

from __future__ import annotations

import re

# `$` is kept as released; under fullmatch it changes nothing (a trailing newline after </answer>
# is still not matched, because nothing after `$` may consume it). DOTALL lets .*? span lines.
FORMAT_PATTERN = re.compile(r"^<think>\n.*?\n</think>\n<answer>\n.*?\\boxed{.+?}.*?\n</answer>$", re.DOTALL)


def format_reward(response: str) -> float:
    """1.0 if the whole response is `<think>\\n…\\n</think>\\n<answer>\\n…\\boxed{…}…\\n</answer>`.

    The match is over the entire string (no stripping): leading or trailing text, a missing
    newline after a tag, or an answer without a non-empty \\boxed{} all give 0.0.
    """
    return 1.0 if FORMAT_PATTERN.fullmatch(response) else 0.0
