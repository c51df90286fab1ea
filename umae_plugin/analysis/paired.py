"""Paired comparisons over seeds: arm minus baseline on the same seed, with a 95% t interval and
the smallest difference the pairs could detect.

Rows are mappings with "arm", "seed" and measured values (numbers or strings, "" for absent), as
the recipes' CSV files and result JSON files hold them. The t quantiles are tabulated (no SciPy
dependency); tests check them against SciPy where it is installed.
"""
from __future__ import annotations

import math
import statistics
from typing import Any, Mapping, Sequence

# Two-sided 95% (t_0.975) and one-sided 80% (t_0.80) quantiles of Student's t by degrees of freedom.
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        15: 2.131, 20: 2.086, 30: 2.042}
T80 = {1: 1.376, 2: 1.061, 3: 0.978, 4: 0.941, 5: 0.920, 6: 0.906, 7: 0.896, 8: 0.889, 9: 0.883, 10: 0.879,
       15: 0.866, 20: 0.860, 30: 0.854}


def _quantile(table: Mapping[int, float], df: int, normal: float) -> float:
    """The tabulated quantile at `df`, else the next smaller tabulated df (conservative), else normal."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df > max(table):
        return normal if df > 120 else table[max(table)]
    return table[max(k for k in table if k <= df)]


def t975(df: int) -> float:
    return _quantile(T975, df, 1.960)


def t80(df: int) -> float:
    return _quantile(T80, df, 0.842)


def _value(row: Mapping[str, Any], key: str) -> float | None:
    v = row.get(key, "")
    return None if v in ("", None) else float(v)


def paired_differences(rows: Sequence[Mapping[str, Any]], arm: str, key: str, base: str = "mae") -> list[float]:
    """`arm - base` of `key` for each seed both arms have a value for, in seed order."""
    by = {(r["arm"], int(r["seed"])): r for r in rows}
    diffs = []
    for seed in sorted(s for (a, s) in by if a == arm and (base, s) in by):
        a, b = _value(by[(arm, seed)], key), _value(by[(base, seed)], key)
        if a is not None and b is not None:
            diffs.append(a - b)
    return diffs


def mean_interval(diffs: Sequence[float]) -> tuple[float, float, float] | None:
    """Mean and 95% t interval (low, high) of paired differences; None for fewer than two pairs."""
    n = len(diffs)
    if n < 2:
        return None
    mean = statistics.fmean(diffs)
    half = t975(n - 1) * statistics.stdev(diffs) / math.sqrt(n)
    return mean, mean - half, mean + half


def format_interval(diffs: Sequence[float], digits: int = 2) -> str:
    """`+0.31 [-0.52, +1.14]`, `+0.31 (one pair)` or `-`."""
    if not diffs:
        return "-"
    ci = mean_interval(diffs)
    if ci is None:
        return f"{diffs[0]:+.{digits}f} (one pair)"
    mean, low, high = ci
    return f"{mean:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]"


def detectable_difference(diffs: Sequence[float]) -> float | None:
    """The true mean difference a two-sided paired t test at 5% would detect with 80% power, given the
    spread of these pairs: (t_0.975 + t_0.80) * sd / sqrt(n), with n - 1 degrees of freedom."""
    n = len(diffs)
    if n < 2:
        return None
    return (t975(n - 1) + t80(n - 1)) * statistics.stdev(diffs) / math.sqrt(n)
