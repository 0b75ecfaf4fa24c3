"""The repetition penalty r_p: a negative reward for responses that loop on the same n-grams.

Where it sits: added unweighted to the total reward by `combine`. Definition as released with
Perception-R1: whitespace-split lower-cased words, n = 20, penalty = max_penalty * (1 - unique
n-grams / total n-grams); responses shorter than n words are not penalised.
"""

from __future__ import annotations


def repetition_penalty(response: str, n: int = 20, max_penalty: float = -2.0) -> float:
    """max_penalty * (1 - #unique n-grams / #n-grams) over response.lower().split(), in [max_penalty, 0].

    Fewer than n words gives 0.0; exactly n words is one n-gram, hence unique, hence 0.0. A response
    that is one word repeated w >= n times has w - n + 1 n-grams of which 1 is unique.
    """
    if n < 1:
        raise ValueError(f"repetition n must be >= 1, got {n}")
    words = response.lower().split()
    total = len(words) - n + 1
    if total < 1:
        return 0.0
    unique = len({tuple(words[i : i + n]) for i in range(total)})
    # `+ 0.0` turns the -0.0 of a repetition-free response into 0.0 (cleaner metrics and goldens).
    return max_penalty * (1.0 - unique / total) + 0.0
