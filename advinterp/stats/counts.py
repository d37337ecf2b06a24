"""Integer counts summed over a stream: hits per measure, images seen.

The smallest statistic in ``runningstats`` style (``add``, ``merge``,
``state_dict``/``set_state_dict``): accuracy's top-1/top-5 hits, clean and
under attack, are a few of these. Integers, so any split over processes or
chunks sums to the same numbers.
"""

from __future__ import annotations

import torch

from advinterp.errors import UserError

__all__ = ["Counts"]


class Counts:
    """``size`` int64 counters and the number of items they were counted over.

    Example::

        hits = Counts(2)
        hits.add(torch.tensor([top1_hits, top5_hits]), len(y))
        top1, top5 = (100 * hits.counts / hits.count).tolist()
    """

    def __init__(self, size: int):
        if size < 1:
            raise UserError(f"counts need at least one counter, got {size}")
        self.counts = torch.zeros(int(size), dtype=torch.int64)
        self.count = 0

    def add(self, counts: torch.Tensor, items: int) -> None:
        """Add ``counts`` (``size`` integers) counted over ``items`` more items."""
        counts = torch.as_tensor(counts).detach().to("cpu", torch.int64).flatten()
        if counts.shape != self.counts.shape:
            raise ValueError(f"expected {len(self.counts)} counts, got {tuple(counts.shape)}")
        self.counts += counts
        self.count += int(items)

    def merge(self, other: Counts) -> None:
        """Add another shard's counts."""
        if other.counts.shape != self.counts.shape:
            raise ValueError(
                f"cannot merge {len(other.counts)} counters into {len(self.counts)} counters"
            )
        self.counts += other.counts
        self.count += other.count

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"counts": self.counts, "count": torch.tensor(self.count, dtype=torch.int64)}

    def set_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        try:
            counts, count = state["counts"], state["count"]
        except KeyError as e:
            raise UserError(f"counts state lacks {e}; the checkpoint holds no counts") from None
        if counts.shape != self.counts.shape:
            raise UserError(
                f"counts state holds {tuple(counts.shape)} counters, expected "
                f"{len(self.counts)}: it was saved by another pass"
            )
        self.counts = counts.to(torch.int64).clone()
        self.count = int(count)
