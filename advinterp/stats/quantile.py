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
from advinterp.stats.sparse import above

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

    def summary(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The sketch itself: each unit's kept values, ascending (``U×M``), and how many
        values each stands for (``U×M``): what any quantile read-out interpolates."""
        values, weights = self._weighted()
        order = values.argsort(dim=1)
        return values.gather(1, order), weights[order]

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


def _top_count(q: float, n: int) -> int:
    """How many of ``n`` values an upper ``q``-quantile reads (linear interpolation, as
    ``torch.quantile``): the value at sorted position ``⌊q·(n−1)⌋`` and every one above it."""
    if n < 1:
        return 0
    return n - math.floor(_sorted_position(q, n))


def _sorted_position(q: float, n: int) -> float:
    """Where the ``q``-quantile of ``n`` float32 values sits in their ascending order, as
    ``torch.quantile`` computes it: ``q`` rounded to float32, times ``n − 1`` in float64."""
    return float(torch.tensor(q, dtype=torch.float32)) * (n - 1)


class TopQuantile:
    """Exact upper quantiles of each of ``num_units`` units: each unit's largest values, kept.

    A ``q``-quantile of ``n`` values depends only on the ``n − ⌊q·(n−1)⌋`` largest of
    them: for Network Dissection's 0.995, on the top 0.5% (Bau et al. 2017's threshold
    needs no sketch). This keeps them, with a running top-k merge, and answers any
    quantile ≥ ``q`` exactly, as ``torch.quantile`` (linear interpolation) over every
    value would, bit for bit. ``add`` a batch (``N×U`` values, or ``N×U×…`` maps: every
    position is a value); ``quantile()`` gives ``U`` thresholds; :meth:`top` the values at
    given ranks from the top. Memory is the kept values: ``U × (r + 8·√r + 64)`` float32
    with ``total`` known, ``r = 0.005·n`` (NetDissect-Lite holds all ``U × n`` as float64).

    Args:
        num_units: units (columns).
        q: the lowest quantile to answer exactly.
        total: how many values each unit will receive, when known (images × positions):
            the store then holds what that many need from the start, and is exact
            whatever the order of the values. Unknown, it holds twice what the values
            so far need (+64), exact unless the stream brings a long run of small values
            after large ones; :meth:`exact` tells, per unit.

    Streaming and mergeable like the other statistics (``merge``, ``state_dict``,
    ``set_state_dict``); a merge of shards is exact when each was made with the
    shards' ``total``.

    Example::

        top = TopQuantile(512, 0.995, total=len(probe) * 7 * 7)
        for x, _ in probe:
            top.add(recorder(x)[layer])          # N×512×7×7
        thresholds = top.quantile()              # 512, exact
    """

    def __init__(self, num_units: int, q: float = 0.995, total: int | None = None):
        if num_units < 1 or not 0 < q < 1:
            raise UserError(
                f"a top quantile needs at least one unit and q in (0, 1) (got units={num_units}, "
                f"q={q})"
            )
        self.num_units = int(num_units)
        self.q = float(q)
        self.total = None if total is None else int(total)
        self.count = 0
        self.values = torch.empty(self.num_units, 0)
        # Sorted ascending. An upper bound on every value let go (-inf: none): kept values
        # at or above it are the exact largest values of the stream.
        self.floor = torch.full((self.num_units,), -math.inf)
        self._placed = False

    def capacity(self, count: int) -> int:
        """Values kept per unit after ``count`` values: what the quantile and the ranks
        around it (:func:`tail_window`) need."""
        if self.total is not None and count <= self.total:
            need = _top_count(self.q, self.total)
            return need + math.ceil(8 * math.sqrt(need)) + 64
        return 2 * _top_count(self.q, count) + 64

    def add(self, values: torch.Tensor) -> None:
        """Fold in a batch: ``N×U`` values, or ``N×U×…`` maps (each position a value)."""
        if values.dim() < 2 or values.shape[1] != self.num_units:
            raise ValueError(f"expected N×{self.num_units}(×…) values, got {tuple(values.shape)}")
        per_unit = values.numel() // self.num_units
        if per_unit == 0:
            return
        if not self._placed:
            self.to(values.device)
        values = values.detach().to(self.values.device, torch.float32)
        cap = self.capacity(self.count + per_unit)
        kept = self.values.shape[1]
        packed = None
        if kept > 0:
            # Only values above a unit's smallest kept one can enter, as long as enough do.
            least = self.values[:, 0]
            grid = values.reshape(values.shape[0], self.num_units, -1)
            # Counted unit by unit (U×N×…), so that the entering values come grouped by unit.
            flat = above(grid, least.view(1, -1, 1), order=(1, 0, 2)).to(grid.device)
            n, positions = grid.shape[0], grid.shape[2]
            unit = flat // (n * positions)
            per = torch.bincount(unit, minlength=self.num_units)
            if bool((per + kept >= cap).all()):
                self.floor = torch.maximum(self.floor, least)
                image = flat // positions % n
                where = (image * self.num_units + unit) * positions + flat % positions
                new = grid.reshape(-1).index_select(0, where)
                start = (per.cumsum(0) - per).index_select(0, unit)
                width = int(per.max())
                slot = unit * width + torch.arange(len(unit), device=unit.device) - start
                packed = new.new_full((self.num_units, width), -math.inf)
                packed.view(-1).index_copy_(0, slot, new)
        if packed is None:
            packed = values.transpose(0, 1).reshape(self.num_units, -1)
        self._keep(torch.cat([self.values, packed], dim=1), cap)
        self.count += per_unit

    def _keep(self, values: torch.Tensor, cap: int) -> None:
        """Keep the ``cap`` largest of ``values`` per row, sorted ascending."""
        values = _sorted_rows(values)
        if values.shape[1] > cap:
            self.floor = torch.maximum(self.floor, values[:, -cap - 1])
            values = values[:, -cap:].contiguous()
        self.values = values

    def top(self, ranks) -> torch.Tensor:
        """Each unit's values at ``ranks`` (1 = the largest; an int, or a 1-D sequence):
        ``U`` or ``U×len(ranks)``."""
        scalar = isinstance(ranks, int)
        ranks = torch.as_tensor([ranks] if scalar else list(ranks), dtype=torch.int64)
        kept = self.values.shape[1]
        if self.count == 0:
            raise UserError("no values were added: a quantile of nothing")
        if (ranks < 1).any() or (ranks > kept).any():
            raise ValueError(f"ranks must lie in 1..{kept} (the values kept), got {ranks.tolist()}")
        out = self.values[:, (kept - ranks).to(self.values.device)]
        return out[:, 0] if scalar else out

    def lower_bound(self) -> torch.Tensor:
        """``U`` values the store's ``q``-quantile of the whole stream cannot fall below, from
        the values so far; ``-inf`` until ``total`` is known and that many values' quantile
        rank has been reached (it only rises as values come)."""
        need = _top_count(self.q, self.total or 0)
        known = self.total is not None and self.count <= self.total
        if not known or self.count < need or self.values.shape[1] < need:
            return torch.full_like(self.floor, -math.inf)
        return self.top(need)

    def _positions(self, q: float) -> tuple[int, int, torch.Tensor]:
        """Ranks from the top of the values below and above sorted position ``q·(n−1)``,
        and the interpolation weight, computed as ``torch.quantile`` computes them."""
        if not self.q <= q < 1:
            raise UserError(f"this store answers quantiles in [{self.q}, 1), not {q}")
        if self.count == 0:
            raise UserError("no values were added: a quantile of nothing")
        n = self.count
        rank = _sorted_position(q, n)
        below = math.floor(rank)
        weight = torch.tensor(rank - below, dtype=torch.float32)
        return n - below, n - math.ceil(rank), weight

    def quantile(self, q: float | None = None) -> torch.Tensor:
        """Each unit's ``q``-quantile (default: the store's ``q``), ``U`` float32: the same
        numbers as ``torch.quantile`` over all the unit's values."""
        low, high, weight = self._positions(self.q if q is None else float(q))
        pair = self.top([low, high])
        return torch.lerp(pair[:, 0], pair[:, 1], weight.to(pair.device))

    def result(self) -> torch.Tensor:
        """The store's ``q``-quantile (:meth:`quantile`), in the runningstats vocabulary."""
        return self.quantile()

    def exact(self, q: float | None = None) -> torch.Tensor:
        """``U`` booleans: whether :meth:`quantile` is exact (always, when ``total`` was given
        and not exceeded)."""
        low, _, _ = self._positions(self.q if q is None else float(q))
        sure = (self.values >= self.floor[:, None]).sum(1)
        return (sure >= low).cpu()

    def merge(self, other: TopQuantile) -> None:
        """Fold in a store of other values (a shard): as if one store had seen both."""
        if other.num_units != self.num_units or other.q != self.q:
            raise ValueError("cannot merge top quantiles of another layer or quantile")
        if not self._placed and other._placed:
            self.to(other.values.device)
        device = self.values.device
        self.floor = torch.maximum(self.floor, other.floor.to(device))
        self.count += other.count
        both = torch.cat([self.values, other.values.to(device)], dim=1)
        self._keep(both, self.capacity(self.count))

    def to(self, device) -> TopQuantile:
        self.values = self.values.to(device)
        self.floor = self.floor.to(device)
        self._placed = True
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only, so ``advinterp.io.save_tensors`` can write it."""
        return {
            "values": self.values.contiguous(),
            "floor": self.floor,
            "count": torch.tensor(self.count, dtype=torch.int64),
            "q": torch.tensor(self.q, dtype=torch.float64),
            "total": torch.tensor(-1 if self.total is None else self.total, dtype=torch.int64),
        }

    def set_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        try:
            values, floor, count = state["values"], state["floor"], state["count"]
        except KeyError as e:
            raise UserError(
                f"top-quantile state lacks {e}; the checkpoint is not a top-quantile store"
            ) from None
        if values.dim() != 2 or values.shape[0] != self.num_units:
            raise UserError(
                f"top-quantile state holds {tuple(values.shape)} values for {self.num_units} "
                "units: it was saved for another layer"
            )
        self.values = _sorted_rows(values.to(torch.float32)).clone()
        self.floor = floor.to(torch.float32).clone()
        self.count = int(count)
        if "q" in state:
            self.q = float(state["q"])
        if "total" in state:
            self.total = None if int(state["total"]) < 0 else int(state["total"])
        self._placed = False

    load_state_dict = set_state_dict

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> TopQuantile:
        store = cls(state["values"].shape[0], float(state.get("q", 0.995)))
        store.set_state_dict(state)
        return store


def tail_window(store: TopQuantile, spread: float = 8.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each unit's ``store.q``-quantile of the whole stream will lie, seen from the values
    so far: the values ``spread·√r + 16`` ranks below and above its rank ``r`` from the top
    (``U`` lows and highs, exact values of the stream). The count of a sample's values
    above a level varies by about its square root, more where values come in clusters (the
    positions of one image), so the quantile of the finished stream stays inside unless
    the stream drifts; :class:`~advinterp.stats.DeferredIoU` keeps its finest bins there."""
    r = _top_count(store.q, store.count)
    margin = math.ceil(spread * math.sqrt(r)) + 16
    kept = store.values.shape[1]
    low, high = store.top([min(kept, r + margin), max(1, r - margin)]).unbind(1)
    return low, high
