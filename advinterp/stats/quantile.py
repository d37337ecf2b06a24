"""Streaming per-unit quantiles: a KLL sketch run on every unit at once.

Network Dissection thresholds each unit at the top-0.5% quantile of its
activations over every spatial position of every probe image (Bau et al.
2017). Storing those activations and sorting them (NetDissect-Lite) costs
gigabytes; this sketch (Karnin, Lang & Liberty 2016, as davidbau/dissect's
``runningstats.Quantile``) keeps ``O(resolution)`` values per unit, whatever
the number of images.

The sketch is a stack of levels; an item at level ``l`` stands for ``2**l``
inputs. A level over its capacity is *compacted*: sorted, and every other item
(from a random offset) promoted to the next level. Every unit receives the same
number of values, so all units share one level structure and each level is a
``units × n`` tensor: a compaction is one batched sort and gather, never a
Python loop over units. Each compaction moves a rank by at most ``2**l`` with
mean zero; summed over levels the relative rank error has a standard deviation
of about ``1.4 / resolution`` (``≈ 2e-4`` at the default 8192).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from advinterp.errors import UserError

__all__ = ["Quantile"]

# Lower levels get geometrically smaller capacities (KLL's c = 2/3): their items
# weigh little, so their errors matter little, and memory stays ≈ 3 × resolution.
_SHRINK = 2 / 3
_MIN_CAPACITY = 8


def _sorted_rows(values: torch.Tensor) -> torch.Tensor:
    """Each row sorted ascending. On the CPU numpy's vectorised sort is ~10× torch's (which also
    builds an index we do not need); the sorted values are the same either way."""
    if values.device.type == "cpu":
        return torch.from_numpy(np.sort(values.numpy(), axis=1))
    return values.sort(dim=1).values


class Quantile:
    """Quantiles of each of ``num_units`` units over a stream of values.

    ``add(values)`` takes an ``N×U`` batch (for a conv map, every spatial
    position of every image: ``maps.permute(0, 2, 3, 1).reshape(-1, U)``);
    ``quantile(q)`` gives each unit's ``q``-quantile (``U``), within a rank
    error of about ``1.4 / resolution`` (one standard deviation). Memory is
    about ``3 × resolution`` values per unit. Stored as float32 on the device of
    the first batch; the random compaction offsets come from a generator seeded
    with ``seed``, so the same stream gives the same answer.

    Example::

        q = Quantile(512)
        for x in images:
            q.add(recorder(x)...)              # N·h·w × 512
        thresholds = q.quantile(0.995)         # 512
    """

    def __init__(self, num_units: int, resolution: int = 8192, seed: int = 0):
        if num_units < 1 or resolution < 2 * _MIN_CAPACITY:
            raise UserError(
                f"a quantile sketch needs at least one unit and resolution ≥ {2 * _MIN_CAPACITY} "
                f"(got units={num_units}, resolution={resolution})"
            )
        self.num_units = int(num_units)
        self.resolution = int(resolution)
        self.seed = int(seed)
        self.count = 0
        self.levels: list[torch.Tensor] = [torch.empty(self.num_units, 0)]
        self.generator = torch.Generator().manual_seed(self.seed)
        self._placed = False

    def _capacity(self, level: int) -> int:
        depth = len(self.levels) - 1 - level
        return max(_MIN_CAPACITY, math.ceil(self.resolution * _SHRINK**depth))

    def add(self, values: torch.Tensor) -> None:
        """Fold in a batch: ``values`` is ``N×U`` (rows are observations, columns units)."""
        if values.dim() != 2 or values.shape[1] != self.num_units:
            raise ValueError(f"expected N×{self.num_units} values, got {tuple(values.shape)}")
        if values.shape[0] == 0:
            return
        if not self._placed:
            self.to(values.device)
        batch = values.detach().to(self.levels[0].device, torch.float32).t()
        self.levels[0] = torch.cat([self.levels[0], batch], dim=1)
        self.count += values.shape[0]
        self._compress()

    def _compress(self) -> None:
        level = 0
        while level < len(self.levels):
            if self.levels[level].shape[1] <= self._capacity(level):
                level += 1
                continue
            self._compact(level)
            # A new top level shrinks every capacity below it: look again from the bottom.
            level = 0

    def _compact(self, level: int) -> None:
        items = _sorted_rows(self.levels[level])
        n = items.shape[1]
        # An odd item out stays behind (the largest; any choice keeps the total weight).
        pairs = n // 2
        offset = torch.randint(0, 2, (self.num_units, 1), generator=self.generator)
        index = offset.to(items.device) + 2 * torch.arange(pairs, device=items.device)
        promoted = items.gather(1, index)
        self.levels[level] = items[:, 2 * pairs :]
        if level + 1 == len(self.levels):
            self.levels.append(items.new_empty(self.num_units, 0))
        self.levels[level + 1] = torch.cat([self.levels[level + 1], promoted], dim=1)

    def merge(self, other: Quantile) -> None:
        """Fold in a sketch of other values (a shard): as accurate as one pass over both."""
        if other.num_units != self.num_units:
            raise ValueError(
                f"cannot merge a sketch of {other.num_units} units into one of {self.num_units}"
            )
        if not self._placed and other._placed:
            self.to(other.levels[0].device)
        device = self.levels[0].device
        while len(self.levels) < len(other.levels):
            self.levels.append(self.levels[0].new_empty(self.num_units, 0))
        for i, items in enumerate(other.levels):
            self.levels[i] = torch.cat([self.levels[i], items.to(device)], dim=1)
        self.count += other.count
        self._compress()

    def _weighted(self) -> tuple[torch.Tensor, torch.Tensor]:
        values = torch.cat(self.levels, dim=1)
        weights = torch.cat(
            [
                torch.full((lv.shape[1],), 2.0**i, device=values.device)
                for i, lv in enumerate(self.levels)
            ]
        )
        return values, weights

    def quantile(self, q: float | torch.Tensor) -> torch.Tensor:
        """Each unit's ``q``-quantile: ``U`` for a number, ``U×len(q)`` for a 1-D tensor of them.

        The smallest kept value whose weighted rank reaches ``q`` of the total."""
        if self.count == 0:
            raise UserError("no values were added: cannot compute a quantile of nothing")
        scalar = not torch.is_tensor(q) or q.dim() == 0
        qs = torch.as_tensor(q, dtype=torch.float64).reshape(-1)
        if (qs < 0).any() or (qs > 1).any():
            raise UserError(f"quantiles must lie in [0, 1], got {qs.tolist()}")
        values, weights = self._weighted()
        order = values.argsort(dim=1)
        sorted_values = values.gather(1, order)
        cumulative = weights.to(torch.float64)[order].cumsum(dim=1)  # U×M
        total = cumulative[:, -1:]
        targets = (qs.to(values.device) * total).contiguous()  # U×len(q)
        index = torch.searchsorted(cumulative, targets).clamp(max=values.shape[1] - 1)
        result = sorted_values.gather(1, index)
        return result[:, 0] if scalar else result

    def result(self, q: float = 0.995) -> torch.Tensor:
        """Alias of :meth:`quantile`, in the runningstats vocabulary."""
        return self.quantile(q)

    def to(self, device) -> Quantile:
        self.levels = [lv.to(device) for lv in self.levels]
        self._placed = True
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only, so ``advinterp.io.save_tensors`` can write it."""
        return {
            "values": torch.cat(self.levels, dim=1).contiguous(),
            "sizes": torch.tensor([lv.shape[1] for lv in self.levels], dtype=torch.int64),
            "count": torch.tensor(self.count, dtype=torch.int64),
            "resolution": torch.tensor(self.resolution, dtype=torch.int64),
            "generator": self.generator.get_state(),
        }

    def set_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        try:
            values, sizes, count = state["values"], state["sizes"], state["count"]
        except KeyError as e:
            raise UserError(
                f"quantile state lacks {e}; the checkpoint is not a quantile sketch"
            ) from None
        if (
            values.dim() != 2
            or values.shape[0] != self.num_units
            or values.shape[1] != int(sizes.sum())
        ):
            raise UserError(
                f"quantile state holds {tuple(values.shape)} values for {self.num_units} units: "
                "it was saved for another layer"
            )
        self.levels = list(values.to(torch.float32).split(sizes.tolist(), dim=1))
        self.levels = [lv.clone() for lv in self.levels]
        self.count = int(count)
        if "resolution" in state:
            self.resolution = int(state["resolution"])
        if "generator" in state:
            self.generator.set_state(state["generator"].to(torch.uint8))
        self._placed = False

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> Quantile:
        sketch = cls(state["values"].shape[0], int(state.get("resolution", 8192)))
        sketch.set_state_dict(state)
        return sketch
