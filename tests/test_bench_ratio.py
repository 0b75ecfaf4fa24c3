"""pr1.bench.ratio: interleaving order, warm-up exclusion, per-pair ratios, median and min-max."""

import pytest

from pr1.bench import ratio


def test_pairs_alternate_after_the_warmup_and_ratios_are_per_pair():
    calls = []
    ours_values = iter([100.0, 10.0, 20.0, 30.0, 40.0, 50.0])  # the first is the warm-up
    peer_values = iter([1.0, 10.0, 5.0, 10.0, 4.0, 25.0])

    def ours():
        calls.append("A")
        return next(ours_values)

    def peer():
        calls.append("B")
        return next(peer_values)

    (r,) = ratio.interleaved(ours, peer, repeats=5, warmup=1, log=None).values()
    assert calls == ["A", "B", "A", "B", "B", "A", "A", "B", "B", "A", "A", "B"]
    assert r.ours == [10.0, 20.0, 30.0, 40.0, 50.0] and r.peer == [10.0, 5.0, 10.0, 4.0, 25.0]
    assert r.ratios == [1.0, 4.0, 3.0, 10.0, 2.0]
    assert (r.median, r.lo, r.hi, r.repeats) == (3.0, 1.0, 10.0, 5)
    assert r.ours_median == 30.0 and r.peer_median == 10.0


def test_dict_measures_give_one_ratio_each_and_must_match():
    out = ratio.interleaved(
        lambda: {"prefill": 6.0, "decode": 2.0},
        lambda: {"prefill": 3.0, "decode": 4.0},
        repeats=3,
        warmup=0,
        log=None,
    )
    assert out["prefill"].ratios == [2.0] * 3 and out["decode"].ratios == [0.5] * 3
    with pytest.raises(ValueError, match="decode"):
        ratio.interleaved(lambda: {"prefill": 1.0}, lambda: {"decode": 1.0}, repeats=1, warmup=0, log=None)


def test_from_pairs_and_machine():
    r = ratio.from_pairs([1, 2, 3], [2, 2, 2])
    assert r.ratios == [0.5, 1.0, 1.5] and r.median == 1.0
    with pytest.raises(ValueError):
        ratio.from_pairs([1], [])
    m = ratio.machine()
    assert m["cpu_count"] >= 1 and len(m["loadavg_1_5_15"]) == 3
