"""Paired comparisons over seeds: differences, t intervals, detectable difference."""
import math
import statistics

import pytest

from umae_plugin.analysis import paired

ROWS = [
    {"arm": "mae", "seed": "0", "acc": "50.0"}, {"arm": "umae", "seed": "0", "acc": "51.5"},
    {"arm": "mae", "seed": "1", "acc": "49.0"}, {"arm": "umae", "seed": "1", "acc": "51.0"},
    {"arm": "mae", "seed": "2", "acc": "52.0"}, {"arm": "umae", "seed": "2", "acc": "52.5"},
    {"arm": "umae", "seed": "3", "acc": "60.0"},                       # no MAE partner: left out
    {"arm": "mae", "seed": "4", "acc": "50.0"}, {"arm": "umae", "seed": "4", "acc": ""},  # value absent
]


def test_differences_pair_by_seed_and_skip_unpaired_or_absent():
    assert paired.paired_differences(ROWS, "umae", "acc") == [1.5, 2.0, 0.5]
    assert paired.paired_differences(ROWS, "umae", "missing") == []


def test_interval_is_the_t_interval_by_hand():
    d = [1.5, 2.0, 0.5]
    mean, low, high = paired.mean_interval(d)
    sd = math.sqrt(sum((x - 4 / 3) ** 2 for x in d) / 2)   # 0.7638
    half = 4.303 * sd / math.sqrt(3)                          # t_{0.975, 2}
    assert mean == pytest.approx(4 / 3) and low == pytest.approx(4 / 3 - half) and high == pytest.approx(4 / 3 + half)
    assert paired.format_interval(d) == f"+1.33 [{4 / 3 - half:+.2f}, {4 / 3 + half:+.2f}]"
    assert paired.format_interval([0.25]) == "+0.25 (one pair)"
    assert paired.format_interval([]) == "-"
    assert paired.mean_interval([1.0]) is None


def test_detectable_difference_three_pairs_is_about_three_sds():
    d = [1.5, 2.0, 0.5]
    assert paired.detectable_difference(d) == pytest.approx((4.303 + 1.061) * statistics.stdev(d) / math.sqrt(3))
    assert paired.detectable_difference([1.0]) is None


def test_tables_equal_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in list(paired.T975):
        assert paired.t975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=6e-4)
        assert paired.t80(df) == pytest.approx(stats.t.ppf(0.80, df), abs=6e-4)
    assert paired.t975(12) == paired.T975[10]   # between tabulated values: the smaller df (wider interval)
    with pytest.raises(ValueError, match="degrees of freedom"):
        paired.t975(0)
