"""The bootstrap against cases whose answer is known in closed form."""

import math

import pytest
import torch

from advinterp.errors import UserError
from advinterp.stats.bootstrap import (
    bootstrap_mean,
    mean_interval,
    percentile_interval,
    resample_counts,
    weighted_mean,
    weighted_slope,
)


def test_counts_are_draws_with_replacement_and_seeded():
    counts = resample_counts(7, draws=500, seed=3)
    assert counts.shape == (500, 7)
    assert torch.equal(counts.sum(1), torch.full((500,), 7.0, dtype=torch.float64))
    assert (counts >= 0).all() and torch.equal(counts, counts.round())
    assert torch.equal(counts, resample_counts(7, draws=500, seed=3))
    assert not torch.equal(counts, resample_counts(7, draws=500, seed=4))
    # Each item is drawn Binomial(n, 1/n) times: mean 1, variance (n − 1)/n.
    big = resample_counts(7, draws=20000, seed=0)
    assert float(big.mean()) == pytest.approx(1.0)
    assert float(big.var()) == pytest.approx(6 / 7, rel=0.05)


def test_weighted_statistics_equal_the_statistic_of_the_drawn_items():
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(9, generator=g), torch.rand(9, generator=g)
    counts = resample_counts(9, draws=5, seed=1)
    for row, mean, slope in zip(
        counts, weighted_mean(counts, y), weighted_slope(counts, x, y), strict=True
    ):
        drawn = torch.repeat_interleave(torch.arange(9), row.long())
        xs, ys = x[drawn].double(), y[drawn].double()
        assert float(mean) == pytest.approx(float(ys.mean()))
        ref = float(((xs - xs.mean()) * (ys - ys.mean())).sum() / ((xs - xs.mean()) ** 2).sum())
        assert float(slope) == pytest.approx(ref)
    # Every item once: the ordinary least-squares slope of y = 2x + 1.
    ones = torch.ones(1, 9, dtype=torch.float64)
    assert float(weighted_slope(ones, x, 2 * x + 1)[0]) == pytest.approx(2.0)
    # All draws on one item: no slope.
    one = torch.zeros(1, 9, dtype=torch.float64)
    one[0, 4] = 9
    assert math.isnan(float(weighted_slope(one, x, y)[0]))


def test_mean_interval_matches_the_normal_theory_interval():
    # n = 400 draws of N(5, 2²): the 95% interval is about mean ± 1.96·σ̂/√n.
    g = torch.Generator().manual_seed(0)
    x = 5 + 2 * torch.randn(400, generator=g, dtype=torch.float64)
    mean, low, high = mean_interval(x, draws=4000, seed=0)
    half = 1.96 * float(x.std()) / math.sqrt(len(x))
    assert mean == pytest.approx(float(x.mean()))
    assert low == pytest.approx(mean - half, abs=0.1 * half)
    assert high == pytest.approx(mean + half, abs=0.1 * half)


def test_mean_interval_covers_the_true_mean_95_percent_of_the_time():
    g = torch.Generator().manual_seed(1)
    samples = torch.randn(400, 60, generator=g, dtype=torch.float64)  # true mean 0
    covered = 0
    for i, x in enumerate(samples):
        low, high = percentile_interval(bootstrap_mean(x, draws=1000, seed=i))
        covered += low <= 0 <= high
    # 400 trials: a binomial 95% band around 0.95 is ±0.021; the percentile interval runs
    # a little short at n = 60 (about 0.94).
    assert 0.91 <= covered / len(samples) <= 0.98


def test_percentile_interval_and_mistakes():
    r = torch.arange(1001, dtype=torch.float64)  # 0 … 1000
    assert percentile_interval(r) == pytest.approx((25.0, 975.0))
    assert percentile_interval(torch.tensor([1.0, math.nan, 3.0]), level=0.5) == pytest.approx(
        (1.5, 2.5)
    )
    assert all(math.isnan(v) for v in percentile_interval(torch.tensor([math.nan])))
    assert all(math.isnan(v) for v in mean_interval(torch.tensor([])))
    with pytest.raises(UserError, match="level"):
        percentile_interval(r, level=95)
    with pytest.raises(UserError, match="at least one item"):
        resample_counts(0)
