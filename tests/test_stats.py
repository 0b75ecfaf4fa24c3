"""pr1.stats: the exact McNemar test against the paper's numbers (worked out by hand below), SciPy's
binomial test, and its input checks; the 2x2 contingency table's cell convention."""

import math
from fractions import Fraction

import numpy as np
import pytest
from scipy.stats import binomtest

from pr1.stats import McNemarTable, contingency, mcnemar, mcnemar_fraction

# (b, c) -> p by hand: n = b + c, p = 2 * sum_{k <= min(b,c)} C(n, k) / 2^n.
#   (1, 5):  n = 6,  2 * (1 + 6) / 64             = 14/64     = 0.21875     (paper: ~0.22)
#   (2, 4):  n = 6,  2 * (1 + 6 + 15) / 64        = 44/64     = 0.6875      (paper: ~0.69)
#   (2, 10): n = 12, 2 * (1 + 12 + 66) / 4096     = 158/4096  = 0.03857...  (paper: ~0.04)
PAPER = [
    ((1, 5), Fraction(14, 64), 0.22),
    ((2, 4), Fraction(44, 64), 0.69),
    ((2, 10), Fraction(158, 4096), 0.04),
]


@pytest.mark.parametrize("bc, exact, reported", PAPER)
def test_paper_numbers(bc, exact, reported):
    assert mcnemar_fraction(*bc) == exact
    assert mcnemar(*bc) == float(exact)
    assert round(mcnemar(*bc), 2) == reported
    assert mcnemar(*reversed(bc)) == float(exact)


def test_hand_values_at_the_edges():
    assert mcnemar(0, 0) == 1.0 and mcnemar_fraction(0, 0) == 1
    assert mcnemar(0, 1) == 1.0  # 2 * 1/2, capped
    assert mcnemar(0, 5) == 2 / 32  # only the all-one-way outcome is as extreme
    assert mcnemar(3, 3) == 1.0  # 2 * P(X <= 3) = 1 + P(X = 3) > 1, capped
    assert mcnemar(0, 2000) == 0.0  # 2^-1999 underflows: a clean 0.0, not an error


def test_matches_scipy_binomtest_for_all_small_tables():
    worst = 0.0
    for b in range(41):
        for c in range(41):
            want = binomtest(min(b, c), b + c, 0.5, alternative="two-sided").pvalue if b + c else 1.0
            got = mcnemar(b, c)
            assert 0.0 <= got <= 1.0
            assert got == mcnemar(c, b)
            assert got == pytest.approx(want, rel=1e-12), (b, c)
            if b == c:
                assert got == 1.0
            worst = max(worst, abs(got - want) / want)
    assert worst < 1e-12


def test_scipy_two_sided_is_the_doubled_tail_only_because_p_is_one_half():
    # For p = 1/2 the distribution is symmetric, so SciPy's "as or less likely" two-sided sum is
    # the doubled smaller tail; for another p it is not, which is why the paper's formula needs 1/2.
    for n, k in [(6, 1), (12, 2), (30, 9)]:
        doubled = 2 * sum(math.comb(n, j) for j in range(k + 1)) / 2**n
        assert binomtest(k, n, 0.5).pvalue == pytest.approx(min(1.0, doubled), rel=1e-12)
        assert mcnemar(k, n - k) == pytest.approx(doubled, rel=1e-12)
        assert binomtest(k, n, 0.3).pvalue != pytest.approx(
            2 * sum(math.comb(n, j) * 0.3**j * 0.7 ** (n - j) for j in range(k + 1)), rel=1e-3
        )


@pytest.mark.parametrize(
    "b, c",
    [
        (300, 350),
        (350, 300),
        (5000, 5100),
        (24_990, 25_000),
        # beyond the exact-integer limit: the log-space sum
        (30_000, 30_500),
        (49_000, 50_000),
        (499_000, 500_000),
        (10, 200_000),
    ],
)
def test_large_tables_match_scipy(b, c):
    n, k = b + c, min(b, c)
    want = binomtest(k, n, 0.5).pvalue
    assert mcnemar(b, c) == pytest.approx(want, rel=1e-10)


def test_large_exact_fraction_against_a_direct_sum():
    b, c = 300, 350
    direct = Fraction(2 * sum(math.comb(650, j) for j in range(301)), 2**650)
    assert mcnemar_fraction(b, c) == direct
    assert mcnemar(b, c) == float(direct)


@pytest.mark.parametrize("bad", [-1, 1.5, 2.0, "3", None, True])
def test_rejects_anything_but_non_negative_integer_counts(bad):
    with pytest.raises(ValueError, match="non-negative integer"):
        mcnemar(bad, 3)
    with pytest.raises(ValueError, match="McNemar c"):
        mcnemar(3, bad)


def test_accepts_numpy_integers():
    assert mcnemar(np.int64(1), np.int32(5)) == 0.21875


def test_contingency_cells():
    a = [1, 1, 1, 0, 0, 0, 1, 0, True, False]
    b = [1, 0, 0, 1, 1, 1, 1, 0, True, True]
    # pairs: (1,1) x3 [0, 6, 8]; (1,0) x2 [1, 2]; (0,1) x4 [3, 4, 5, 9]; (0,0) x1 [7]
    t = contingency(a, b)
    assert t == McNemarTable(a=3, b=2, c=4, d=1)
    assert t.n == 10 and t.p == mcnemar(2, 4) == 0.6875
    assert t.as_dict() == dict(a=3, b=2, c=4, d=1, n=10, p=0.6875)
    with pytest.raises(ValueError, match="3 labels for A and 2 for B"):
        contingency([1, 0, 1], [1, 0])
    with pytest.raises(ValueError, match="label 1 of B is 2"):
        contingency([1, 0], [1, 2])
    with pytest.raises(ValueError, match="label 0 of A is 0.5"):
        contingency([0.5], [1])
