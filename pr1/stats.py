"""McNemar's exact test: did a model's per-problem correctness change between two runs?

Where it sits: `pr1.analyze` labels each paired problem correct/wrong for model A and model B (the
answer's `correct` field, or perception labels from hand or a judge), `contingency` counts the 2x2
table, and `mcnemar` gives the paper's p-value from the discordant pairs.

The test (reference/paper.md, "The statistical claim"): under H0 a discordant pair is equally likely
to go either way, so with b + c discordant pairs X ~ Binomial(b + c, 1/2) and the two-sided EXACT
p-value is p = min(1, 2 * P(X <= min(b, c))); b = c = 0 gives 1. The chi-square variants (with or
without continuity correction) do not reproduce the paper's numbers; this does: (1, 5) -> 0.21875,
(2, 4) -> 0.6875, (2, 10) -> 0.0386.

Convention of the table (rows: model A, columns: model B):
                  B correct   B wrong
    A correct         a           b
    A wrong           c           d
b counts problems A got right and B got wrong, c those A got wrong and B got right. Put the model
"before" (the base) as A and the one "after" (the RL model) as B: c > b means B improved.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from fractions import Fraction
from typing import Iterable

# Up to this many discordant pairs the tail is summed in exact integers (about 0.1 s at the
# limit); beyond it a float sum in log space (relative error ~1e-13) keeps the time small.
_EXACT_MAX_N = 50_000


def _count(name: str, value) -> int:
    if isinstance(value, bool):  # True is an int in Python, but a boolean here is a caller's bug
        raise ValueError(f"McNemar {name} must be a non-negative integer count, got the boolean {value!r}")
    try:
        n = operator.index(value)
    except TypeError:
        raise ValueError(
            f"McNemar {name} must be a non-negative integer count, got {value!r} ({type(value).__name__})"
        ) from None
    if n < 0:
        raise ValueError(f"McNemar {name} must be a non-negative integer count, got {n}")
    return n


def mcnemar_fraction(b: int, c: int) -> Fraction:
    """The exact p-value as a fraction: min(1, 2 * sum_{k <= min(b,c)} C(b+c, k) / 2^(b+c))."""
    b, c = _count("b", b), _count("c", c)
    n, m = b + c, min(b, c)
    if 2 * m >= n:  # b == c: the doubled tail is 1 + P(X = n/2) >= 1
        return Fraction(1)
    return Fraction(2 * _binomial_prefix_sum(n, m), 1 << n)


def _binomial_prefix_sum(n: int, m: int) -> int:
    term = total = 1
    for k in range(m):
        term = term * (n - k) // (k + 1)  # C(n, k+1) from C(n, k): the division is exact
        total += term
    return total


def mcnemar(b: int, c: int) -> float:
    """Two-sided exact binomial McNemar p-value from the discordant counts b and c.

    b: pairs where A was correct and B wrong; c: A wrong and B correct (symmetric in b and c).
    Raises ValueError for anything but non-negative integers.
    """
    b, c = _count("b", b), _count("c", c)
    n, m = b + c, min(b, c)
    if 2 * m >= n:
        return 1.0
    if n <= _EXACT_MAX_N:
        # int / int is correctly rounded in Python, however large both are (and underflows to 0.0).
        return min(1.0, 2 * _binomial_prefix_sum(n, m) / (1 << n))
    return min(1.0, math.exp(math.log(2.0) + _log_binomial_tail(n, m)))


def _log_binomial_tail(n: int, m: int) -> float:
    """log P(X <= m) for X ~ Binomial(n, 1/2), 0 <= m < n/2, summed down from the largest term."""
    # Terms relative to the top one, t_{k-1} / t_k = k / (n - k + 1) < 1: they only shrink.
    rel = total = 1.0
    for k in range(m, 0, -1):
        rel *= k / (n - k + 1)
        total += rel
        if rel < 1e-17 * total:
            break
    return _log_half_binomial_pmf(n, m) + math.log(total)


def _log_half_binomial_pmf(n: int, m: int) -> float:
    """log C(n, m) 2^-n by Loader's saddle-point form (as R's dbinom and SciPy use).

    lgamma(n + 1) - lgamma(m + 1) - ... loses ~1e-9 (an ulp of numbers near n log n); this form
    adds only small, accurately computed terms.
    """
    if m == 0:
        return -n * math.log(2.0)
    half = n / 2
    lc = (
        _stirling_error(n)
        - _stirling_error(m)
        - _stirling_error(n - m)
        - _deviance(m, half)
        - _deviance(n - m, half)
    )
    return lc - 0.5 * math.log(2 * math.pi * m * (n - m) / n)


def _stirling_error(k: int) -> float:
    """log(k!) - log(sqrt(2 pi k) (k/e)^k)."""
    if k <= 15:
        return math.lgamma(k + 1) - (k + 0.5) * math.log(k) + k - 0.5 * math.log(2 * math.pi)
    kk = k * k
    return (1 / 12 - (1 / 360 - (1 / 1260 - (1 / 1680 - 1 / (1188 * kk)) / kk) / kk) / kk) / k


def _deviance(x: float, mean: float) -> float:
    """x log(x / mean) + mean - x, without its cancellation when x is near mean."""
    if abs(x - mean) < 0.1 * (x + mean):
        v = (x - mean) / (x + mean)
        s = (x - mean) * v
        ej = 2 * x * v
        j = 1
        while True:
            ej *= v * v
            s1 = s + ej / (2 * j + 1)
            if s1 == s:
                return s1
            s = s1
            j += 1
    return x * math.log(x / mean) + mean - x


@dataclasses.dataclass(frozen=True)
class McNemarTable:
    """The paired 2x2 table (see the module docstring for which cell is which) and its p-value."""

    a: int  # A correct, B correct
    b: int  # A correct, B wrong
    c: int  # A wrong, B correct
    d: int  # A wrong, B wrong

    @property
    def n(self) -> int:
        return self.a + self.b + self.c + self.d

    @property
    def p(self) -> float:
        return mcnemar(self.b, self.c)

    def as_dict(self) -> dict:
        return dict(a=self.a, b=self.b, c=self.c, d=self.d, n=self.n, p=self.p)


def contingency(labels_a: Iterable[bool], labels_b: Iterable[bool]) -> McNemarTable:
    """The table of two aligned label sequences (labels_a[i] and labels_b[i] are one problem).

    Labels must be booleans or 0/1; sequences of different lengths are an error.
    """
    labels_a, labels_b = list(labels_a), list(labels_b)
    if len(labels_a) != len(labels_b):
        raise ValueError(
            f"contingency needs one label per problem from each model; got {len(labels_a)} "
            f"labels for A and {len(labels_b)} for B"
        )
    cells = {(True, True): 0, (True, False): 0, (False, True): 0, (False, False): 0}
    for i, pair in enumerate(zip(labels_a, labels_b)):
        for side, v in zip("AB", pair):
            if v not in (0, 1) or isinstance(v, float):
                raise ValueError(f"label {i} of {side} is {v!r}; labels must be booleans or 0/1")
        cells[bool(pair[0]), bool(pair[1])] += 1
    return McNemarTable(
        a=cells[True, True], b=cells[True, False], c=cells[False, True], d=cells[False, False]
    )
