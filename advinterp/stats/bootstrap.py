"""The nonparametric bootstrap (Efron 1979), vectorised: every resample at once.

A resample of ``n`` items drawn with replacement is a row of counts (how many
times each item was drawn), so a statistic that is a weighted sum over items —
a mean, a least-squares slope, summed IoU counts — is one matrix product for
all resamples. :func:`resample_counts` draws those rows from a seeded
generator: the same seed and ``n`` give the same resamples, so statistics of
two sets of the same items (two models on the same probe images) resampled
with the same seed are paired. The interval is the percentile interval.

Example::

    counts = resample_counts(len(x), draws=2000, seed=0)   # B×n
    means = counts @ x / len(x)                            # B resampled means
    low, high = percentile_interval(means)
"""

from __future__ import annotations

import torch

from advinterp.errors import UserError

__all__ = [
    "DRAWS",
    "bootstrap_mean",
    "mean_interval",
    "percentile_interval",
    "resample_counts",
    "weighted_mean",
    "weighted_slope",
]

#: Resamples per interval: the percentile bounds move by about 0.1 of the standard error
#: between seeds at this count.
DRAWS = 2000
_BLOCK = 256


def resample_counts(
    n: int, draws: int = DRAWS, seed: int = 0, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """``draws × n`` counts: row ``b`` says how often resample ``b`` drew each of ``n``
    items (``n`` draws with replacement; each row sums to ``n``). Seeded, on the CPU;
    ``float32`` halves the memory of many items and is exact below 2²⁴."""
    if n < 1 or draws < 1:
        raise UserError(f"a bootstrap needs at least one item and one draw (got {n}, {draws})")
    gen = torch.Generator().manual_seed(int(seed))
    counts = torch.zeros(draws, n, dtype=dtype)
    # A block of rows at a time: the draws' indices take 8 bytes an item.
    for start in range(0, draws, _BLOCK):
        rows = counts[start : start + _BLOCK]
        picks = torch.randint(n, rows.shape, generator=gen)
        rows.scatter_add_(1, picks, torch.ones(rows.shape, dtype=dtype))
    return counts


def weighted_mean(counts: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Per resample, the mean of ``values`` (``n``) weighted by ``counts`` (``B×n``), in
    ``counts``' precision."""
    return (counts @ values.to(counts.dtype) / counts.sum(1)).double()


def weighted_slope(counts: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per resample, the least-squares slope of ``y`` on ``x`` over the drawn items; NaN
    where the drawn ``x`` do not vary."""
    x, y = x.to(torch.float64), y.to(torch.float64)
    total = counts.sum(1)
    mx, my = counts @ x / total, counts @ y / total
    cov = counts @ (x * y) / total - mx * my
    var = counts @ (x * x) / total - mx * mx
    # Below this the drawn x are one value up to rounding.
    flat = var <= 1e-12 * (counts @ (x * x) / total).clamp(min=1e-300)
    return torch.where(flat, torch.nan, cov / var.clamp(min=1e-300))


def percentile_interval(replicates: torch.Tensor, level: float = 0.95) -> tuple[float, float]:
    """The ``level`` percentile interval of bootstrap ``replicates`` (NaN ones left out);
    ``(nan, nan)`` when none is finite."""
    if not 0 < level < 1:
        raise UserError(f"the interval's level must be in (0, 1), got {level}")
    r = replicates.to(torch.float64).flatten()
    r = r[r.isfinite()]
    if not r.numel():
        return float("nan"), float("nan")
    tail = (1 - level) / 2
    low, high = torch.quantile(r, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return low, high


def mean_interval(
    values: torch.Tensor, draws: int = DRAWS, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """``(mean, low, high)``: the mean of ``values`` (NaN ones left out) and its bootstrap
    ``level`` interval."""
    values = values.to(torch.float64).flatten()
    values = values[values.isfinite()]
    if not values.numel():
        return float("nan"), float("nan"), float("nan")
    low, high = percentile_interval(bootstrap_mean(values, draws, seed), level)
    return float(values.mean()), low, high


def bootstrap_mean(values: torch.Tensor, draws: int = DRAWS, seed: int = 0) -> torch.Tensor:
    """``draws`` bootstrap replicates of the mean of ``values`` (one per resample)."""
    values = values.to(torch.float64).flatten()
    return weighted_mean(resample_counts(len(values), draws, seed), values)
