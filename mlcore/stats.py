"""Intervals for results over seeds: the t-interval of a mean and of paired differences.

With ``n`` seeds, values ``x_1..x_n``, mean ``x̄`` and sample standard deviation ``s``::

    x̄ ± t_{0.975, n−1} · s / √n

A method compared with a baseline is paired by seed: the interval is that of the per-seed
differences ``d_i = x_i − b_i``, which removes the variation the two share (data order, the
partition, the initial weights). With ``n = 1`` there is no interval: the bounds are None,
never invented.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from scipy import stats


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float | None
    high: float | None
    n: int

    def excludes_zero(self) -> bool:
        return self.low is not None and (self.low > 0 or self.high < 0)

    def format(self, scale: float = 100.0, digits: int = 2) -> str:
        """``mean [low, high]`` scaled (percent by default); ``mean (n=1)`` without bounds."""
        if self.low is None:
            return f"{scale * self.mean:.{digits}f} (n={self.n})"
        return (
            f"{scale * self.mean:.{digits}f} [{scale * self.low:.{digits}f}, "
            f"{scale * self.high:.{digits}f}]"
        )


def mean_interval(values: Sequence[float], level: float = 0.95) -> Interval:
    """Two-sided t-interval of the mean of ``values`` (NaN/None entries are dropped).

    Raises:
        ValueError: No finite value.
    """
    xs = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not xs:
        raise ValueError("no finite value to average")
    n = len(xs)
    mean = sum(xs) / n
    if n == 1:
        return Interval(mean, None, None, 1)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = stats.t.ppf(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


def paired_interval(
    values: Sequence[float], baseline: Sequence[float], level: float = 0.95
) -> Interval:
    """t-interval of the mean per-seed difference ``values[i] − baseline[i]``.

    Raises:
        ValueError: The sequences differ in length, or no pair is finite.
    """
    if len(values) != len(baseline):
        raise ValueError(f"{len(values)} values against {len(baseline)} baseline values")
    diffs = [
        v - b
        for v, b in zip(values, baseline, strict=True)
        if v is not None and b is not None and math.isfinite(v) and math.isfinite(b)
    ]
    return mean_interval(diffs, level)
